"""Cross-backend parity: an adapter trained on one backend gives the same answers on the other.

For every method × architecture and both directions: a few training steps on one backend,
save, load on the other; logits within 1e-4 (relative, Frobenius), the same classification
predictions and the same 20-token greedy generations on 16 inputs. Training resumed on the
other backend from the saved adapter keeps lowering the loss.
"""

import importlib
from functools import cache

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from tiny import ARCHS, METHODS, sentences, spec_for, toy_data, toy_task  # noqa: E402

from lrpt import Adapter  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402

B = {name: importlib.import_module(f"lrpt.backends.{name}") for name in ("torch", "mlx")}
MODEL = {name: importlib.import_module(f"lrpt.backends.{name}.model") for name in B}
GEN = {name: importlib.import_module(f"lrpt.backends.{name}.generate") for name in B}
TASK = toy_task()
TEXTS = sentences(16, seed=11)


@cache
def load(backend, path):
    return MODEL[backend].load_model(path)


def data(n=48):
    return toy_data(n)


def logits(backend, model, tok, adapter):
    prompt = B[backend].prompt_from_adapter(adapter)
    prompt.eval()
    hf = MODEL[backend].hf_tokenizer(tok)
    rows = [hf(TASK.template.format(text=t))["input_ids"] for t in TEXTS]
    batch = MODEL[backend].make_batch(rows, adapter.spec.n_tokens, "right")
    if backend == "torch":
        with torch.no_grad():
            return MODEL[backend].forward_logits(model, prompt, batch).numpy()
    return np.array(MODEL[backend].forward_logits(model, prompt, batch))


def answers(backend, model, tok, adapter):
    prompt = B[backend].prompt_from_adapter(adapter)
    texts = [TASK.template.format(text=t) for t in TEXTS]
    preds = B[backend].classify(model, tok, prompt, texts, TASK.label_words)
    gens = B[backend].generate(model, tok, prompt, texts, max_tokens=20)
    return list(preds), gens


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src, dst", [("torch", "mlx"), ("mlx", "torch")])
def test_trained_adapter_gives_the_same_answers_on_the_other_backend(tiny_dirs, tmp_path, arch, method, src, dst):
    spec = spec_for(method)
    model, tok = load(src, str(tiny_dirs[arch]))
    prompt = B[src].init_prompt(spec, model, tok, seed=0)
    B[src].train(model, tok, prompt, TASK, data(), None, TrainConfig(steps=3, lr=0.05, batch_size=16, progress=False))
    B[src].prompt_to_adapter(prompt, TASK, B[src].base_model_info(model)).save(tmp_path / "a")
    adapter = Adapter.load(tmp_path / "a")
    other, otok = load(dst, str(tiny_dirs[arch]))
    adapter.base_model.check_compatible(B[dst].base_model_info(other))  # the fingerprint holds across backends
    a, b = logits(src, model, tok, adapter), logits(dst, other, otok, adapter)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4
    assert answers(src, model, tok, adapter) == answers(dst, other, otok, adapter)


def _train_loss(backend, model, tok, adapter, rows):
    ev = importlib.import_module(f"lrpt.backends.{backend}.train")
    from lrpt.data import encode_examples
    from lrpt.tokens import target_tokenize_fn, tokenize_fn

    hf = MODEL[backend].hf_tokenizer(tok)
    enc = encode_examples(TASK, tokenize_fn(hf), rows, target_tokenize_fn(hf))
    scores = ev.evaluate(model, tok, B[backend].prompt_from_adapter(adapter), TASK, enc)[1]
    labels = np.array([r["label"] for r in rows])
    return float(np.mean(np.log(np.exp(scores).sum(1)) - scores[np.arange(len(rows)), labels]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("src, dst", [("torch", "mlx"), ("mlx", "torch")])
def test_training_continues_on_the_other_backend(tiny_dirs, tmp_path, method, src, dst):
    spec = spec_for(method)
    rows = data()
    model, tok = load(src, str(tiny_dirs["llama"]))
    prompt = B[src].init_prompt(spec, model, tok, seed=0)
    cfg = TrainConfig(steps=4, lr=0.05, batch_size=16, progress=False, warmup=0, schedule="constant")
    B[src].train(model, tok, prompt, TASK, rows, None, cfg)
    B[src].prompt_to_adapter(prompt, TASK, B[src].base_model_info(model)).save(tmp_path / "a")
    adapter = Adapter.load(tmp_path / "a")
    other, otok = load(dst, str(tiny_dirs["llama"]))
    before = _train_loss(dst, other, otok, adapter, rows)
    again = B[dst].prompt_from_adapter(adapter)
    B[dst].train(other, otok, again, TASK, rows, None, TrainConfig(steps=8, lr=0.05, batch_size=16, progress=False))
    after = _train_loss(dst, other, otok, B[dst].prompt_to_adapter(again), rows)
    assert after < before


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_resume_is_bitwise_exact(tiny_dirs, tmp_path, backend, method):
    """A run stopped after a checkpoint and resumed ends with bitwise the same tensors (CPU)."""
    import lrpt.trainer as T

    model, tok = load(backend, str(tiny_dirs["llama"]))
    spec = spec_for(method)
    rows = data(96)
    cfg = TrainConfig(steps=12, lr=0.05, batch_size=8, eval_every=4, log_every=2, save_every=4, grad_accum=2,
                      progress=False)
    full = B[backend].init_prompt(spec, model, tok, seed=0)
    B[backend].train(model, tok, full, TASK, rows[:80], rows[80:], cfg, tmp_path / "a")

    class Crash(Exception):
        pass

    orig = T.RunDir.save_checkpoint

    def crash_after_8(self, step, *a, **k):
        out = orig(self, step, *a, **k)
        if step == 8:
            raise Crash
        return out

    T.RunDir.save_checkpoint = crash_after_8
    try:
        with pytest.raises(Crash):
            B[backend].train(model, tok, B[backend].init_prompt(spec, model, tok, seed=0), TASK, rows[:80], rows[80:],
                             cfg, tmp_path / "b")
    finally:
        T.RunDir.save_checkpoint = orig
    fresh = B[backend].init_prompt(spec, model, tok, seed=99)  # resuming overwrites it
    B[backend].train(model, tok, fresh, TASK, rows[:80], rows[80:], cfg, tmp_path / "b", resume=True)
    a, b = full.to_params(), fresh.to_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    strip = [[{k: v for k, v in __import__("json").loads(x).items() if k != "elapsed_s"}
              for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("a", "b")]
    assert strip[0] == strip[1]
