"""MLX backend on tiny random models of five architectures (Linux CPU via mlx[cpu], float32)."""

import importlib
import json
from functools import cache

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from tiny import ARCHS, METHODS, TEXTS, spec_for, toy_data, toy_task  # noqa: E402

from lrpt import Adapter, PromptSpec, TrainingError  # noqa: E402
from lrpt.backends import get_backend  # noqa: E402
from lrpt.backends.mlx import model as M  # noqa: E402
from lrpt.backends.mlx.prompts import PromptModule, prompt_from_adapter, prompt_to_adapter  # noqa: E402
from lrpt.backends.mlx.train import evaluate, train  # noqa: E402
from lrpt.reference import materialize  # noqa: E402
from lrpt.tokens import target_tokenize_fn, tokenize_fn  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402

G = importlib.import_module("lrpt.backends.mlx.generate")
TASK = toy_task()



@cache
def _load(path):
    return M.load_model(path)


@pytest.fixture(params=ARCHS)
def arch_model(request, tiny_dirs):
    return _load(str(tiny_dirs[request.param]))


@pytest.fixture
def llama(tiny_dirs):
    return _load(str(tiny_dirs["llama"]))


def ids(tok, texts):
    hf = M.hf_tokenizer(tok)
    return [hf(t)["input_ids"] for t in texts]


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=atol)


def test_get_backend_returns_mlx():
    assert get_backend("mlx").NAME == "mlx"


@pytest.mark.parametrize("method", METHODS)
def test_module_names_and_reference(method):
    spec = spec_for(method)
    adapter = Adapter.create(spec, 16, seed=2)
    module = prompt_from_adapter(adapter)
    from mlx.utils import tree_flatten

    assert {k for k, _ in tree_flatten(module.parameters())} == set(spec.param_shapes(16))
    assert {k for k, _ in tree_flatten(module.trainable_parameters())} == set(spec.trainable_names())
    enc = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32) if method == "lopa" else None
    module.eval()
    got = module(None if enc is None else mx.array(enc))
    close(got, materialize(spec, adapter.params, enc), atol=1e-6)
    back = prompt_to_adapter(module)
    assert back.created_by["backend"] == "mlx"
    assert all(np.array_equal(back.params[k], adapter.params[k]) for k in adapter.params)


@pytest.mark.parametrize("gate", ["sigmoid", "add", "max"])
def test_lopa_gates_match_reference(gate):
    spec = spec_for("lopa", gate=gate)
    adapter = Adapter.create(spec, 16, seed=1)
    enc = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    module = prompt_from_adapter(adapter)
    module.eval()
    close(module(mx.array(enc)), materialize(spec, adapter.params, enc), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_batch_invariance(arch_model, method):
    model, tok = arch_model
    prompt = M.init_prompt(spec_for(method), model, tok, seed=0)
    prompt.eval()
    rows = ids(tok, TEXTS)
    batched = {side: M.forward_logits(model, prompt, M.make_batch(rows, 4, side, pad_to_multiple=8))
               for side in ("left", "right")}
    for i, r in enumerate(rows):
        alone = M.forward_logits(model, prompt, M.make_batch([r], 4))[0]
        for out in batched.values():
            close(out[i, : len(r)], alone)


def test_prompt_space_is_input_embedding_output(arch_model):
    """Embeddings of tokens A used as a prompt behave exactly like A (Gemma's √d scale undone)."""
    model, tok = arch_model
    hf = M.hf_tokenizer(tok)
    a = hf("the plot", add_special_tokens=True)["input_ids"]
    b = hf(" was great fun", add_special_tokens=False)["input_ids"]
    rows = np.array(M.embed(model, mx.array(a)))
    prompt = PromptModule(PromptSpec("prompt", n_tokens=len(a)), {"prompt_embeddings": rows})
    got = M.forward_logits(model, prompt, M.make_batch([b], len(a)))[0]
    want = model(mx.array([a + b]))[0, len(a):]
    close(got, want, atol=2e-5)


def test_gemma_scale_is_measured(tiny_dirs):
    model, _ = _load(str(tiny_dirs["gemma3"]))
    assert M.attach(model).scale == pytest.approx(32 ** 0.5, rel=1e-3)
    assert M.attach(_load(str(tiny_dirs["llama"]))[0]).scale == 1.0


def test_lopa_encoders_and_mixed_adapters(llama):
    model, tok = llama
    rows = ids(tok, TEXTS)
    batch = M.make_batch(rows, 4)
    enc = M.encode(model, batch, "base", "mean")
    for i, r in enumerate(rows):
        h = M.backbone(model)(mx.array([r]))[0]
        close(enc[i], h.mean(0))
        close(M.encode(model, batch, "embed", "last")[i], M.embed(model, mx.array(r))[-1])
    prompts = [M.init_prompt(spec_for("lopt1", n=3), model, tok, seed=1),
               M.init_prompt(spec_for("lopa", n=5), model, tok, seed=2),
               M.init_prompt(spec_for("prompt", n=2), model, tok, seed=3)]
    for p in prompts:
        p.eval()
    texts = TEXTS + ["fun film", "dull"]
    which = [0, 1, 2, 1, 0]
    rows = ids(tok, texts)
    n = [prompts[w].spec.n_tokens for w in which]
    mixed = M.forward_logits(model, prompts, M.make_batch(rows, n), which)
    for i, (r, w) in enumerate(zip(rows, which)):
        close(mixed[i, : len(r)], M.forward_logits(model, prompts[w], M.make_batch([r], n[i]))[0])
    scores = G.score_labels(model, tok, prompts, texts, [" good", " bad"], which=which)
    for i, w in enumerate(which):
        close(scores[i], G.score_labels(model, tok, prompts[w], [texts[i]], [" good", " bad"])[0])
    assert G.generate(model, tok, prompts, texts, max_tokens=5, which=which) == [
        G.generate(model, tok, prompts[w], [t], max_tokens=5)[0] for t, w in zip(texts, which)]


def test_head_runs_only_at_answer_positions(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("lopt1"), model, tok)
    seen = []
    cls = type(model.lm_head)
    model.lm_head.__class__ = type("Spy", (cls,), {"__call__": lambda self, x: seen.append(x.shape) or cls.__call__(self, x)})
    try:
        s = G.score_rows(model, prompt, ids(tok, TEXTS), [[5], [9]])
    finally:
        model.lm_head.__class__ = cls
    assert seen == [(3, 1, 32)]
    for i, r in enumerate(ids(tok, TEXTS)):
        full = M.forward_logits(model, prompt, M.make_batch([r], 4))[0, -1]
        logp = full - mx.logsumexp(full)
        close(s[i], logp[mx.array([5, 9])])


def test_multi_token_label_words(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("lopt2"), model, tok)
    words = [" good", " really bad film"]
    got = G.score_labels(model, tok, prompt, TEXTS, words)
    hf = M.hf_tokenizer(tok)
    for i, r in enumerate(ids(tok, TEXTS)):
        for k, w in enumerate(words):
            wid = hf(w, add_special_tokens=False)["input_ids"]
            logits = M.forward_logits(model, prompt, M.make_batch([r + wid], 4))[0]
            logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            want = sum(logp[len(r) - 1 + j, wid[j]] for j in range(len(wid)))
            assert abs(got[i, k] - want) < 1e-4


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
def test_batched_generation_equals_one_by_one(arch_model, method):
    model, tok = arch_model
    prompt = M.init_prompt(spec_for(method), model, tok, seed=0)
    batched = G.generate(model, tok, prompt, TEXTS, max_tokens=8)
    assert batched == [G.generate(model, tok, prompt, [t], max_tokens=8)[0] for t in TEXTS]


def test_prefix_cache_matches_full_forward(llama):
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = llama
    prompt = M.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    r = ids(tok, TEXTS[:1])[0]
    cache = G.prefix_cache(model, prompt)
    assert G.prefix_cache(model, prompt) is cache  # computed once
    import copy

    mine = copy.deepcopy(cache)
    logits = model(mx.array([r]), cache=mine)[0]
    want = M.forward_logits(model, prompt, M.make_batch([r], 4))[0]
    close(logits, want)
    fresh = make_prompt_cache(model)
    G._fill(model, fresh, prompt()[None], r[:-1])
    close(model(mx.array([r[-1:]]), cache=fresh)[0, -1], want[-1])
    prompt.lopt.U = prompt.lopt.U + 0.1
    assert G.prefix_cache(model, prompt) is not cache  # a changed prompt invalidates it
    assert G.generate(model, tok, prompt, TEXTS, max_tokens=6, use_prefix_cache=True) == G.generate(
        model, tok, prompt, TEXTS, max_tokens=6, use_prefix_cache=False)


def test_sampling_seed_and_stop(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("prompt"), model, tok)
    a = G.generate(model, tok, prompt, TEXTS, max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert a == G.generate(model, tok, prompt, TEXTS, max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    full = G.generate(model, tok, prompt, TEXTS[:1], max_tokens=12)[0]
    stop = full[1:3]
    assert G.generate(model, tok, prompt, TEXTS[:1], max_tokens=12, stop=[stop])[0] == full[: full.find(stop)]


# -- training --------------------------------------------------------------------------------------



def cfg(**kw):
    return TrainConfig(**{**dict(steps=12, lr=0.05, batch_size=8, eval_every=4, log_every=2, progress=False), **kw})


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss(llama, tmp_path, method):
    model, tok = llama
    data = toy_data()
    prompt = M.init_prompt(spec_for(method), model, tok, seed=0)
    res = train(model, tok, prompt, TASK, data[:80], data[80:], cfg(steps=16, lr=0.1), tmp_path / "run")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    saved = Adapter.load(tmp_path / "run" / "adapter")
    assert saved.created_by["backend"] == "mlx" and saved.task == TASK
    assert any("eval_accuracy" in json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_compiled_step_matches_eager(llama, tmp_path):
    model, tok = llama
    data = toy_data(48)
    out = []
    for compile_ in (False, True):
        prompt = M.init_prompt(spec_for("lopa"), model, tok, seed=0)
        res = train(model, tok, prompt, TASK, data, None, cfg(steps=6, compile=compile_, pad_to_multiple=16))
        out.append((res.final_loss, prompt.to_params()))
    assert abs(out[0][0] - out[1][0]) < 1e-4
    for k in out[0][1]:
        np.testing.assert_allclose(out[0][1][k], out[1][1][k], atol=1e-4)


def test_grad_checkpoint_and_accumulation_train(llama):
    model, tok = llama
    data = toy_data(48)
    a = M.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    b = M.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    train(model, tok, a, TASK, data, None, cfg(steps=4, grad_accum=2))
    train(model, tok, b, TASK, data, None, cfg(steps=4, grad_accum=2, grad_checkpoint=True))
    pa, pb = a.to_params(), b.to_params()
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5)


def test_continue_training_a_saved_adapter_and_nan_guard(llama, tmp_path, monkeypatch):
    from lrpt.backends.mlx.train import MLXOps
    from lrpt.data import encode_examples

    model, tok = llama
    data = toy_data()
    prompt = M.init_prompt(spec_for("prompt"), model, tok, seed=0)
    train(model, tok, prompt, TASK, data[:80], None, cfg(steps=6), tmp_path / "one")
    again = prompt_from_adapter(Adapter.load(tmp_path / "one" / "adapter"))
    hf = M.hf_tokenizer(tok)
    enc = encode_examples(TASK, tokenize_fn(hf), data[:80], target_tokenize_fn(hf))
    ce = lambda s: float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(80), [d["label"] for d in data[:80]]]))  # noqa: E731
    before = ce(evaluate(model, tok, again, TASK, enc)[1])
    train(model, tok, again, TASK, data[:80], None, cfg(steps=10, warmup=0), tmp_path / "two")
    assert ce(evaluate(model, tok, again, TASK, enc)[1]) < before

    real = MLXOps.step

    def poisoned(self, batches, lr):
        loss = real(self, batches, lr)
        if self.t >= 5:
            self.prompt.prompt_embeddings = self.prompt.prompt_embeddings * float("nan")
        return loss

    monkeypatch.setattr(MLXOps, "step", poisoned)
    with pytest.raises(TrainingError, match="last good checkpoint is .*step-000004"):
        train(model, tok, M.init_prompt(spec_for("prompt"), model, tok), TASK, data, None,
              cfg(steps=12, save_every=4, log_every=1), tmp_path / "nan")
    Adapter.load(tmp_path / "nan" / "checkpoints" / "step-000004" / "adapter")


def test_trains_through_a_4bit_quantized_model(tiny_dirs, tmp_path):
    import mlx_lm

    q = tmp_path / "q4"
    mlx_lm.convert(str(tiny_dirs["llama"]), str(q), quantize=True, q_group_size=32, q_bits=4)
    model, tok = M.load_model(q)
    import mlx.nn as nn

    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    prompt = M.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    before = {k: v.copy() for k, v in prompt.to_params().items()}
    res = train(model, tok, prompt, TASK, toy_data(48), None, cfg(steps=8, lr=0.1))
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert any(not np.array_equal(before[k], v) for k, v in prompt.to_params().items())
