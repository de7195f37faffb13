"""Both backends, one suite: every test runs on PyTorch and on MLX (tiny random fp32 models, CPU).

The NumPy reference (:mod:`lrpt.reference`, the core run with NumPy ops) is the oracle where it
applies. What differs between frameworks in a test (running the plain model, spying on its head)
sits in :class:`Kit`, so a test body reads the same for both.
"""

from __future__ import annotations

import importlib
import inspect
import json
from functools import cache

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from tiny import (  # noqa: E402
    ARCHS,
    METHODS,
    TEXTS,
    Crash,
    crash_after_checkpoint,
    packed_vs_two_passes,
    save_tiny,
    sentences,
    spec_for,
    toy_data,
    toy_task,
)

from lrpt import Adapter, PromptSpec, Task, TrainingError  # noqa: E402
from lrpt.backends import BACKENDS, Backend, get_backend  # noqa: E402
from lrpt.data import chance_warning  # noqa: E402
from lrpt.fileio import read_safetensors  # noqa: E402
from lrpt.reference import materialize  # noqa: E402
from lrpt.tokens import label_token_ids  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402

TASK = toy_task()


class Kit:
    """The few framework-specific things the tests need, with the same names on both backends."""

    def __init__(self, name: str):
        self.be = get_backend(name)
        self.name = name
        self.M = importlib.import_module(f"lrpt.backends.{name}.model")
        self.D = importlib.import_module(f"lrpt.backends.{name}.decode")

    def no_grad(self):
        if self.name == "torch":
            import torch

            return torch.no_grad()
        import contextlib

        return contextlib.nullcontext()

    def np(self, x) -> np.ndarray:
        return self.be.ops.to_numpy(x)

    def array(self, x):
        return self.be.ops.asarray(np.asarray(x))

    def ids(self, tok, texts) -> list[list[int]]:
        hf = self.be.hf_tokenizer(tok)
        return [hf(t)["input_ids"] for t in texts]

    def logits(self, model, prompt, rows, n, side="right", which=None, pad_to_multiple=1) -> np.ndarray:
        with self.be.inference(model):
            batch = self.be.make_batch(rows, n, side, pad_to_multiple=pad_to_multiple)
            return self.np(self.be.forward_logits(model, prompt, batch, which))

    def plain_logits(self, model, ids) -> np.ndarray:
        """The model run on token ids by its own framework, no lrpt in the way."""
        if self.name == "torch":
            import torch

            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0].float().numpy()
        return self.np(model(self.array([ids]))[0])

    def plain_hidden(self, model, ids) -> np.ndarray:
        if self.name == "torch":
            import torch

            with torch.no_grad():
                return model.base_model(torch.tensor([ids])).last_hidden_state[0].numpy()
        return self.np(importlib.import_module("lrpt.backends.mlx.splice").backbone(model)(self.array([ids]))[0])

    def head_shapes(self, model, run) -> list[tuple]:
        """The input shapes the model's output head saw while ``run()`` ran."""
        seen: list[tuple] = []
        if self.name == "torch":
            hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
            try:
                run()
            finally:
                hook.remove()
            return seen
        cls = type(model.lm_head)
        model.lm_head.__class__ = type("Spy", (cls,), {"__call__": lambda s, x: seen.append(tuple(x.shape)) or cls.__call__(s, x)})
        try:
            run()
        finally:
            model.lm_head.__class__ = cls
        return seen

    def trainable(self, module) -> set[str]:
        if self.name == "torch":
            return {n for n, p in module.named_parameters() if p.requires_grad}
        from mlx.utils import tree_flatten

        return {k for k, _ in tree_flatten(module.trainable_parameters())}

    def layer_input_shapes(self, model, run) -> list[tuple]:
        """The (batch, length) of every input the first transformer block saw while ``run()`` ran."""
        seen: list[tuple] = []
        if self.name == "torch":
            def spy(module, args, kwargs):
                seen.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))

            hook = model.base_model.layers[0].register_forward_pre_hook(spy, with_kwargs=True)
            try:
                run()
            finally:
                hook.remove()
            return seen
        layer = model.layers[0]
        cls = type(layer)
        layer.__class__ = type("Spy", (cls,), {"__call__": lambda s, x, *a, **k: seen.append(tuple(x.shape[:2]))
                                                or cls.__call__(s, x, *a, **k)})
        try:
            run()
        finally:
            layer.__class__ = cls
        return seen

    def value_and_grads(self, prompt, loss) -> tuple[float, dict[str, np.ndarray]]:
        """``loss()`` (a scalar of the prompt's parameters) and its gradient by canonical name."""
        if self.name == "torch":
            prompt.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            return float(value), {n: p.grad.numpy().copy() for n, p in prompt.named_parameters() if p.requires_grad}
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        value, grads = nn.value_and_grad(prompt, loss)()
        return float(value), {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.fixture(params=BACKENDS, scope="module")
def kit(request) -> Kit:
    return Kit(request.param)


@cache
def _load(name, path):
    return get_backend(name).load_model(path)


@pytest.fixture(params=ARCHS)
def arch_model(request, kit, tiny_dirs):
    return _load(kit.name, str(tiny_dirs[request.param]))


@pytest.fixture
def llama(kit, tiny_dirs):
    return _load(kit.name, str(tiny_dirs["llama"]))


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


# -- the mirror enforces itself --------------------------------------------------------------------


def test_both_backends_satisfy_the_protocol_with_the_same_signatures():
    mods = {name: get_backend(name) for name in BACKENDS}
    for name in Backend.__annotations__:
        for mod in mods.values():
            assert hasattr(mod, name), f"lrpt.backends.{mod.NAME} lacks {name}"
        objs = [getattr(m, name) for m in mods.values()]
        if callable(objs[0]) and not isinstance(objs[0], type):
            sigs = [list(inspect.signature(o).parameters) for o in objs]
            assert sigs[0] == sigs[1], f"{name}: {sigs[0]} vs {sigs[1]}"
    ops = [set(n for n in dir(m.ops) if not n.startswith("_") and callable(getattr(m.ops, n))) for m in mods.values()]
    core = importlib.import_module("lrpt.ops")
    core_ops = {n for n in dir(core) if not n.startswith("_") and callable(getattr(core, n))}
    for names in ops:
        assert core_ops - names <= {"annotations"}, f"ops missing {core_ops - names}"


# Files one backend has and the other needs not: MLX's splice.py puts prompts into mlx-lm models,
# which mostly take no embeddings (transformers' take ``inputs_embeds``); torch's graphs.py records
# the step as CUDA graphs (MLX has none: mx.compile is its whole-step compilation); torch's packed.py
# packs the shared prefix through transformers' AttentionInterface (mlx-lm models have none).
ONLY_IN = {"torch": {"graphs.py", "packed.py"}, "mlx": {"splice.py"}}


def test_mirrored_files():
    from pathlib import Path

    root = Path(importlib.import_module("lrpt.backends").__file__).parent
    files = {b: {p.name for p in (root / b).glob("*.py")} - ONLY_IN[b] for b in BACKENDS}
    assert files["torch"] == files["mlx"]


def test_a_loaded_adapter_is_in_eval_mode(kit):
    """forward_logits on a loaded LoPA adapter must not apply its head dropout (training switches it on)."""
    spec = PromptSpec("lopa", n_tokens=3, rank=2, head_hidden=8, dropout=0.5)
    prompt = kit.be.prompt_from_adapter(Adapter.create(spec, 32, seed=0, task=TASK))
    assert prompt.training is False


def test_get_backend(kit):
    assert get_backend(kit.name).NAME == kit.name


# -- prompt modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_module_names_and_reference(kit, method):
    spec = spec_for(method)
    adapter = Adapter.create(spec, 16, seed=2)
    module = kit.be.prompt_from_adapter(adapter)
    assert set(module.to_params()) == set(spec.param_shapes(16))
    assert kit.trainable(module) == set(spec.trainable_names())
    enc = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32) if method == "lopa" else None
    module.eval()
    with kit.no_grad():
        got = kit.np(module(None if enc is None else kit.array(enc)))
    close(got, materialize(spec, adapter.params, enc), atol=1e-6)
    back = kit.be.prompt_to_adapter(module)
    assert back.created_by["backend"] == kit.name
    assert all(np.array_equal(back.params[k], adapter.params[k]) for k in adapter.params)


@pytest.mark.parametrize("gate", ["sigmoid", "add", "max"])
def test_lopa_gates_match_reference(kit, gate):
    spec = spec_for("lopa", gate=gate)
    adapter = Adapter.create(spec, 16, seed=1)
    enc = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    module = kit.be.prompt_from_adapter(adapter)
    module.eval()
    with kit.no_grad():
        close(kit.np(module(kit.array(enc))), materialize(spec, adapter.params, enc), atol=1e-6)


def test_same_seed_same_init_and_text_init(kit, llama):
    model, tok = llama
    a = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=7).to_params()
    b = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=7).to_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = kit.be.init_prompt(spec_for("prompt", init="text", init_text="the movie"), model, tok).to_params()
    ids = kit.be.hf_tokenizer(tok)("the movie", add_special_tokens=False)["input_ids"]
    close(c["prompt_embeddings"], kit.M.embedding_rows(model, np.resize(np.array(ids), 4)), atol=0)
    table = kit.M.embedding_rows(model, np.arange(320))
    assert abs(kit.M.embedding_std(model) - float(table.std())) <= 1e-5 * float(table.std())


BF16_ATOL = 0.15  # max |Δ log-prob| of a label score, bf16 vs fp32 (tiny random models; as the GPU suite)


def test_bf16_scores_within_stated_tolerance(kit, tiny_dirs):
    path = str(tiny_dirs["llama"])
    m32, tok = _load(kit.name, path)
    m16, _ = kit.be.load_model(path, dtype="bfloat16")
    adapter = kit.be.prompt_to_adapter(kit.be.init_prompt(spec_for("lopt1"), m32, tok, seed=0))
    texts = sentences(32, seed=4)
    s32, s16 = (kit.be.score_labels(m, tok, kit.be.prompt_from_adapter(adapter), texts, [" good", " bad"])
                for m in (m32, m16))
    assert 0 < np.abs(s32 - s16).max() <= BF16_ATOL


def test_a_bad_config_or_dtype_is_one_error_naming_the_fault(kit, tiny_dirs, tmp_path):
    """Through the Python API (the CLI wraps anything): a wrong-typed config field raised
    huggingface_hub's validation error (torch) and an unknown dtype a bare KeyError (both)."""
    import shutil

    from lrpt import LrptError

    with pytest.raises(LrptError, match="unsupported dtype 'int8': use float32"):
        kit.be.load_model(str(tiny_dirs["llama"]), dtype="int8")
    path = shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    with pytest.raises(LrptError, match="cannot load model") as err:
        kit.be.load_model(str(path))
    assert "\n" not in str(err.value)


# -- positions, padding and prompt space -----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_batch_invariance(kit, arch_model, method):
    """Per position: every real token's logits, left- and right-padded in a batch, equal the row alone."""
    model, tok = arch_model
    prompt = kit.be.init_prompt(spec_for(method), model, tok, seed=0)
    prompt.eval()
    rows = kit.ids(tok, TEXTS)
    batched = {side: kit.logits(model, prompt, rows, 4, side, pad_to_multiple=8) for side in ("left", "right")}
    for i, r in enumerate(rows):
        alone = kit.logits(model, prompt, [r], 4)[0]
        for side, out in batched.items():
            assert np.abs(out[i, : len(r)] - alone).max() <= 1e-5, f"{side} row {i}"


def test_prompt_space_is_input_embedding_output(kit, arch_model):
    """A prompt made of the embeddings of tokens A behaves exactly like the tokens A (Gemma's √d too)."""
    model, tok = arch_model
    hf = kit.be.hf_tokenizer(tok)
    a = hf("the plot", add_special_tokens=True)["input_ids"]
    b = hf(" was great fun", add_special_tokens=False)["input_ids"]
    rows = kit.M.embedding_rows(model, a)
    prompt = kit.be.PromptModule(PromptSpec("prompt", n_tokens=len(a)), {"prompt_embeddings": rows})
    prompt.eval()
    close(kit.logits(model, prompt, [b], len(a))[0], kit.plain_logits(model, a + b)[len(a):], atol=2e-5)


def test_lopa_encoders_and_per_instance_prompts(kit, llama):
    model, tok = llama
    rows = kit.ids(tok, TEXTS)
    batch = kit.be.make_batch(rows, 4)
    with kit.be.inference(model):
        for kind, pooling in (("base", "mean"), ("base", "last"), ("embed", "mean")):
            enc = kit.np(kit.M.encode(model, batch, kind, pooling))
            for i, r in enumerate(rows):
                states = kit.plain_hidden(model, r) if kind == "base" else kit.M.embedding_rows(model, r)
                close(enc[i], states.mean(0) if pooling == "mean" else states[-1])
        prompt = kit.be.init_prompt(spec_for("lopa", encoder="embed"), model, tok)
        prompt.eval()
        z = kit.np(kit.be.prompt_rows(model, prompt, batch))
    assert z.shape == (3, 4, 32) and not np.allclose(z[0], z[1])


def test_mixed_adapters_in_one_batch(kit, llama):
    model, tok = llama
    prompts = [kit.be.init_prompt(spec_for("lopt1", n=3), model, tok, seed=1),
               kit.be.init_prompt(spec_for("lopa", n=5), model, tok, seed=2),
               kit.be.init_prompt(spec_for("prompt", n=2), model, tok, seed=3)]
    for p in prompts:
        p.eval()
    texts = TEXTS + ["fun film", "dull"]
    which = [0, 1, 2, 1, 0]
    rows = kit.ids(tok, texts)
    n = [prompts[w].spec.n_tokens for w in which]
    mixed = kit.logits(model, prompts, rows, n, "left", which)
    for i, (r, w) in enumerate(zip(rows, which)):
        close(mixed[i, : len(r)], kit.logits(model, prompts[w], [r], n[i])[0])
    scores = kit.be.score_labels(model, tok, prompts, texts, [" good", " bad"], which=which)
    for i, w in enumerate(which):
        close(scores[i], kit.be.score_labels(model, tok, prompts[w], [texts[i]], [" good", " bad"])[0])
    assert kit.be.generate(model, tok, prompts, texts, max_tokens=5, which=which) == [
        kit.be.generate(model, tok, prompts[w], [t], max_tokens=5)[0] for t, w in zip(texts, which)]


def test_scoring_refuses_a_wrong_which_or_batch_size_in_one_error(kit, llama):
    """A `which` naming no prompt, or of the wrong length, raised IndexError, or broadcasting errors
    that differed between the backends; batch_size 0 a bare ValueError; a padding side a ValueError."""
    from lrpt import LrptError

    model, tok = llama
    prompts = [kit.be.init_prompt(spec_for("lopt1", n=3), model, tok, seed=1),
               kit.be.init_prompt(spec_for("prompt", n=2), model, tok, seed=3)]
    texts = TEXTS[:3]
    for which, needle in (([0, 1, 2], "there are 2 prompts"), ([0, 1, -1], "holds -1"),
                          ([0, 1], "2 entries for 3 rows"), ([0, 1, 0, 1], "4 entries for 3 rows"),
                          ([0, 1.0, 0], "holds 1.0")):
        with pytest.raises(LrptError, match=needle):
            kit.be.score_labels(model, tok, prompts, texts, [" good", " bad"], which=which)
    with pytest.raises(LrptError, match="batch_size must be"):
        kit.be.score_labels(model, tok, prompts[0], texts, [" good", " bad"], batch_size=0)
    with pytest.raises(LrptError, match="padding_side must be"):
        kit.be.make_batch([[5, 6], [7]], 3, "middle")
    with pytest.raises(LrptError, match="label words ' bad' and ' bad' are the same tokens"):
        kit.be.classify(model, tok, prompts[0], texts, [" good", " bad", " bad"])  # a tie: backends answered 1 or 2


# -- scoring ---------------------------------------------------------------------------------------


def test_scoring_runs_the_head_only_at_answer_positions(kit, llama):
    from lrpt.scoring import score_rows

    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    prompt.eval()
    rows = kit.ids(tok, TEXTS)
    out = {}
    shapes = kit.head_shapes(model, lambda: out.setdefault("s", score_rows(kit.be, model, prompt, rows, [[5], [9]])))
    assert shapes == [(3, 1, 32)]  # one position per row, never (B, W, d)
    for i, r in enumerate(rows):
        last = kit.logits(model, prompt, [r], 4)[0, -1].astype(np.float64)
        logp = last - np.log(np.exp(last - last.max()).sum()) - last.max()
        close(out["s"][i], logp[[5, 9]])


def test_multi_token_label_words_sum_logprobs(kit, llama):
    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt2"), model, tok)
    prompt.eval()
    words = [" good", " really bad film"]
    ids = label_token_ids(kit.be.hf_tokenizer(tok), words)
    assert max(len(i) for i in ids) > 1
    got = kit.be.score_labels(model, tok, prompt, TEXTS, words)
    for i, r in enumerate(kit.ids(tok, TEXTS)):
        for k, w in enumerate(ids):
            logits = kit.logits(model, prompt, [r + w], 4)[0].astype(np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            assert abs(got[i, k] - sum(logp[len(r) - 1 + j, w[j]] for j in range(len(w)))) < 1e-4
    assert list(kit.be.classify(model, tok, prompt, TEXTS, words)) == list(got.argmax(-1))


# -- the shared static-prompt prefix (lrpt.prefix) ------------------------------------------------


def _batch_arrays(kit, model, tok, kind, n, label_words=(" good", " bad")):
    """Host layouts of a small batch (rows of different lengths, widths padded to 8) on the backend."""
    from lrpt.layout import completion_arrays, scoring_arrays, to_arrays

    rows = kit.ids(tok, TEXTS + ["fun film"])
    if kind == "completion":
        host = completion_arrays(rows, [r[:3] for r in reversed(rows)], n, pad_to_multiple=8)
    else:
        host = scoring_arrays(rows, label_token_ids(kit.be.hf_tokenizer(tok), list(label_words)), [n] * len(rows),
                              pad_to_multiple=8)
        host["labels"] = np.array([0, 1, 1, 0])
    return to_arrays(host, kit.be.asarray_for(model))


SHARED_CASES = {"label": (TASK, (" good", " bad")), "multi-token label": (TASK, (" good", " really bad film")),
                "completion": (Task("echo", kind="completion", template="{prompt}"), ())}


@pytest.mark.parametrize("case", SHARED_CASES)
@pytest.mark.parametrize("method", ["prompt", "lopt1", "lopt2"])
def test_shared_prefix_gives_the_same_loss_and_gradients(kit, arch_model, method, case):
    """The prompt run once per batch (shared prefix) is exact: loss and gradients of the plain path."""
    from lrpt.scoring import task_loss

    model, tok = arch_model
    task, words = SHARED_CASES[case]
    prompt = kit.be.init_prompt(spec_for(method, n=5), model, tok, seed=1)
    arrays = _batch_arrays(kit, model, tok, task.kind, 5, words)
    out = {shared: kit.value_and_grads(prompt, lambda s=shared: task_loss(kit.be, model, prompt, task, arrays,
                                                                          len(words), s))
           for shared in (False, True)}
    assert abs(out[True][0] - out[False][0]) <= 1e-5
    for name, grad in out[False][1].items():
        assert np.abs(grad).max() > 0
        close(out[True][1][name], grad, atol=1e-5)


def test_shared_prefix_longer_than_the_sliding_window(kit, tiny_dirs):
    """Gemma 3's sliding layers (window 6) behind a 9-token shared prompt: the window still counts
    from each token over the prompt's keys, as in the plain path."""
    from lrpt.scoring import task_loss

    model, tok = _load(kit.name, str(tiny_dirs["gemma3"]))
    prompt = kit.be.init_prompt(spec_for("lopt1", n=9), model, tok, seed=1)
    arrays = _batch_arrays(kit, model, tok, "classification", 9)
    out = [kit.value_and_grads(prompt, lambda s=s: task_loss(kit.be, model, prompt, TASK, arrays, 2, s))
           for s in (False, True)]
    assert abs(out[1][0] - out[0][0]) <= 1e-5
    for name, grad in out[0][1].items():
        close(out[1][1][name], grad, atol=1e-5)


def test_shared_prefix_applies_only_to_one_static_prompt(kit, llama):
    """LoPA (per-row prompts), mixed adapters and left-padded batches keep the plain path."""
    from lrpt.prefix import shared_prompt

    model, tok = llama
    static = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    lopa = kit.be.init_prompt(spec_for("lopa"), model, tok)
    rows = kit.ids(tok, TEXTS)
    right, left = (kit.be.make_batch(rows, 4, side) for side in ("right", "left"))
    assert shared_prompt(kit.be, model, static, None, right) is static
    assert shared_prompt(kit.be, model, [lopa, static], [1, 1, 1], right) is static
    assert shared_prompt(kit.be, model, static, None, right, enabled=False) is None
    assert shared_prompt(kit.be, model, static, None, left) is None
    assert shared_prompt(kit.be, model, lopa, None, right) is None
    assert shared_prompt(kit.be, model, [static, static], [0, 1, 0], right) is None
    assert shared_prompt(kit.be, model, None, None, right) is None


def test_shared_prefix_runs_the_prompt_once(kit, llama):
    """Shared: the blocks see the prompt at batch 1 and B rows of tokens only (no B×n prompt rows)."""
    from lrpt.scoring import label_scores

    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("prompt", n=5), model, tok)
    arrays = _batch_arrays(kit, model, tok, "classification", 5)
    rows, width = arrays["seq_ids" if "seq_ids" in arrays else "in_ids"].shape
    shapes = {s: kit.layer_input_shapes(model, lambda s=s: label_scores(kit.be, model, prompt, arrays, 2, shared=s))
              for s in (False, True)}
    assert shapes[False] == [(rows, width)]
    assert shapes[True] == [(1, 5), (rows, width - 5)]


def test_shared_prefix_is_the_default_in_scoring_and_training(kit, llama, monkeypatch):
    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    calls = []
    real = kit.be.forward_after_prefix
    monkeypatch.setattr(kit.be, "forward_after_prefix", lambda *a: calls.append(1) or real(*a))
    plain = kit.be.score_labels(model, tok, prompt, TEXTS, [" good", " bad"], shared_prefix=False)
    assert not calls
    close(kit.be.score_labels(model, tok, prompt, TEXTS, [" good", " bad"]), plain)
    assert calls
    calls.clear()
    kit.be.train(model, tok, prompt, TASK, toy_data(16), None, cfg(steps=1, eval_every=0))
    assert calls
    calls.clear()
    kit.be.train(model, tok, prompt, TASK, toy_data(16), None, cfg(steps=1, eval_every=0, shared_prefix=False))
    assert not calls


def test_shared_prefix_auto_is_off_for_eager_cuda_and_on_for_compiled_steps(kit, llama, monkeypatch):
    """Auto (lrpt.prefix.prefix_pays): an eager step on CUDA is launch-bound and the shared path doubles
    the launches, so it is off there; a step compiled whole takes it wherever it runs (mx.compile always
    compiles the whole step); torch's compiled blocks do not (behind a cache, a block compiles per layer).
    (CUDA graphs, also on, need a real GPU: tests/test_gpu.py.)"""
    from lrpt.prefix import shared_prompt
    from lrpt.training import Training

    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    right = kit.be.make_batch(kit.ids(tok, TEXTS), 4, "right")
    assert shared_prompt(kit.be, model, prompt, None, right) is prompt  # CPU: on
    monkeypatch.setattr(kit.be, "device_kind", lambda m: "cuda")
    assert shared_prompt(kit.be, model, prompt, None, right) is None
    assert shared_prompt(kit.be, model, prompt, None, right, enabled=True) is prompt
    data = _encoded(kit, tok, toy_data(8))
    cases = [(False, None, None), (True, None, True)] if kit.name == "mlx" else [
        (False, None, None), (True, "step", True), (True, "blocks", False)]
    for compile_, scope, shared in cases:
        ops = Training(kit.be, model, tok, prompt, TASK, data, None, cfg(compile=compile_, compile_scope=scope))
        assert ops.shared is shared
        packs = kit.name == "torch" and scope == "step"  # compiled whole: packed with the rows (torch)
        assert ops.stepper.packs is packs
        assert ops.prefix_note().endswith(("once per batch (shared prefix, packed with the rows)" if packs else
                                           "once per batch (shared prefix)") if shared else "in every row (plain path)")


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
def test_batched_generation_equals_one_by_one(kit, arch_model, method):
    model, tok = arch_model
    prompt = kit.be.init_prompt(spec_for(method), model, tok, seed=0)
    batched = kit.be.generate(model, tok, prompt, TEXTS, max_tokens=8)
    assert batched == [kit.be.generate(model, tok, prompt, [t], max_tokens=8)[0] for t in TEXTS]


def test_prefix_cache_is_reused_invalidated_and_exact(kit, llama):
    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    first = kit.be.prefix_cache(model, prompt)
    assert kit.be.prefix_cache(model, prompt) is first  # computed once per prompt
    params = prompt.to_params()
    prompt.load_params({**params, "lopt.U": params["lopt.U"] + 0.1})  # a changed prompt invalidates it
    assert kit.be.prefix_cache(model, prompt) is not first
    assert kit.be.generate(model, tok, prompt, TEXTS, max_tokens=8, use_prefix_cache=True) == \
        kit.be.generate(model, tok, prompt, TEXTS, max_tokens=8, use_prefix_cache=False)


@pytest.mark.parametrize("n", [4, 8])  # the tiny gemma3's window is 6: 8 prompt rows do not fit a sliding layer
def test_prefix_cache_is_exact_on_sliding_window_layers(kit, tiny_dirs, n):
    model, tok = _load(kit.name, str(tiny_dirs["gemma3"]))
    prompt = kit.be.init_prompt(spec_for("lopt1", n=n), model, tok, seed=0)
    one = TEXTS[:1]  # equal lengths: the cache's condition on sliding layers
    assert kit.be.generate(model, tok, prompt, one, max_tokens=8, use_prefix_cache=True) == \
        kit.be.generate(model, tok, prompt, one, max_tokens=8, use_prefix_cache=False)


def test_sampling_seed_and_stop_strings(kit, llama):
    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("prompt"), model, tok, seed=0)
    a = kit.be.generate(model, tok, prompt, TEXTS, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a == kit.be.generate(model, tok, prompt, TEXTS, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    full = kit.be.generate(model, tok, prompt, TEXTS[:1], max_tokens=12)[0]
    assert len(full) > 2
    stop = full[1:3]
    assert kit.be.generate(model, tok, prompt, TEXTS[:1], max_tokens=12, stop=[stop])[0] == full[: full.find(stop)]


# -- training --------------------------------------------------------------------------------------


def cfg(**kw):
    return TrainConfig(**{**dict(steps=12, lr=0.05, batch_size=8, eval_every=4, log_every=2, progress=False), **kw})


def _encoded(kit, tok, rows):
    from lrpt.data import encode_examples
    from lrpt.tokens import target_tokenize_fn, tokenize_fn

    hf = kit.be.hf_tokenizer(tok)
    return encode_examples(TASK, tokenize_fn(hf), rows, target_tokenize_fn(hf))


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss_and_writes_run_dir(kit, llama, tmp_path, method):
    model, tok = llama
    data = toy_data()
    prompt = kit.be.init_prompt(spec_for(method), model, tok, seed=0)
    res = kit.be.train(model, tok, prompt, TASK, data[:80], data[80:], cfg(steps=16, lr=0.1), tmp_path / "run")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in x for x in lines) and lines[-1]["step"] == 16
    saved = Adapter.load(tmp_path / "run" / "adapter")
    assert saved.task == TASK and saved.spec == prompt.spec and saved.created_by["backend"] == kit.name
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000012", "step-000016"]  # keep_checkpoints=2
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "step-000016").iterdir()} == {
        "adapter", "optimizer.safetensors", "trainer_state.json", "best-adapter"}  # keep-best's copy of adapter/


def test_existing_run_needs_resume_and_resume_needs_checkpoint(kit, llama, tmp_path):
    model, tok = llama
    data = toy_data(32)
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    with pytest.raises(TrainingError, match="no checkpoint"):
        kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=2), tmp_path / "r", resume=True)
    kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=2), tmp_path / "r")
    with pytest.raises(TrainingError, match="--resume"):
        kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=2), tmp_path / "r")


def test_shared_prefix_forced_where_it_cannot_apply_is_refused(kit, llama):
    """`--shared-prefix` with LoPA (a prompt per input) or with MLX's gradient checkpointing was
    silently ignored: a forced option either applies or is refused; the start-up line names LoPA's path."""
    from lrpt.training import Training

    model, tok = llama
    enc = _encoded(kit, tok, toy_data(8))
    lopa = kit.be.init_prompt(spec_for("lopa"), model, tok)
    with pytest.raises(TrainingError, match="--shared-prefix cannot apply: lopa's prompt depends on each input"):
        Training(kit.be, model, tok, lopa, TASK, enc, None, cfg(shared_prefix=True))
    assert "plain path" in Training(kit.be, model, tok, lopa, TASK, enc, None, cfg()).prefix_note()
    if kit.name == "mlx":
        lopt1 = kit.be.init_prompt(spec_for("lopt1"), model, tok)
        with pytest.raises(TrainingError, match="--grad-checkpoint runs every block on the plain path"):
            Training(kit.be, model, tok, lopt1, TASK, enc, None, cfg(shared_prefix=True, grad_checkpoint=True))


def test_lr_probe_chooses_the_lowest_held_out_loss_and_leaves_no_trace(kit, llama, monkeypatch):
    """--lr-probe: every candidate trains from the same start; the lowest held-out loss wins (a
    diverged one never does); the prompt, the optimizer and the step count are as before, so the
    run then trains exactly as a run given the chosen lr does."""
    import lrpt.probe as P
    from lrpt.training import Training

    model, tok = llama
    data = toy_data(64)
    enc = _encoded(kit, tok, data)
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    start = prompt.to_params()
    ops = Training(kit.be, model, tok, prompt, TASK, enc, None, cfg(lr=0.05))
    monkeypatch.setattr(P, "PROBE_STEPS", 4)
    res = P.probe_lr(ops, 0.05, seed=0, steps=4, factors=(0.2, 1.0, 1e9))
    assert list(res.losses) == pytest.approx([0.01, 0.05, 5e7])
    finite = {lr: loss for lr, loss in res.losses.items() if np.isfinite(loss)}
    assert res.lr == min(finite, key=finite.get) and res.lr != pytest.approx(5e7)
    assert len(set(res.losses.values())) == 3  # the candidates trained differently
    for k, v in prompt.to_params().items():
        np.testing.assert_array_equal(v, start[k])
    assert ops.t == 0 and not any(np.any(m) for m in ops.stepper.moments().values())  # a fresh optimizer
    assert "chosen by the lr probe" in res.note()
    assert P.probe_lr(Training(kit.be, model, tok, prompt, TASK, enc[:7], None, cfg(lr=0.05)), 0.05, 0) is None

    monkeypatch.setattr(P, "PROBE_STEPS", 3)
    runs = {}
    for probe in (True, False):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        config = cfg(steps=5, lr=runs[True][0] if not probe else 0.05, lr_probe=probe, eval_every=0)
        r = kit.be.train(model, tok, prompt, TASK, data, None, config)
        runs[probe] = (r.lr_probe.lr if probe else config.lr, prompt.to_params(), r.compile_choice)
    assert "chosen by the lr probe" in runs[True][2] and "lr probe" not in runs[False][2]
    for k in runs[True][1]:
        np.testing.assert_allclose(runs[True][1][k], runs[False][1][k], rtol=1e-6, atol=1e-7)


def test_lr_probe_runs_once_a_resumed_run_keeps_its_lr(kit, llama, tmp_path, monkeypatch):
    """A run that probed, stopped and resumed equals the straight run: --resume does not probe again."""
    import lrpt.probe as P

    monkeypatch.setattr(P, "PROBE_STEPS", 3)
    model, tok = llama
    data = toy_data(48)
    out = {}
    for name, parts in (("straight", [8]), ("resumed", [4, 8])):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        for i, steps in enumerate(parts):
            config = cfg(steps=steps, lr_probe=True, save_every=4, eval_every=0, schedule="constant", warmup=0)
            r = kit.be.train(model, tok, prompt, TASK, data, None, config, tmp_path / name, resume=i > 0)
            assert (r.lr_probe is None) == (i > 0)
        out[name] = Adapter.load(tmp_path / name / "adapter").params
    for k in out["straight"]:
        np.testing.assert_allclose(out["resumed"][k], out["straight"][k], rtol=1e-6, atol=1e-7)
    chosen = json.loads((tmp_path / "straight" / "train_config.json").read_text())["lr"]
    with pytest.raises(TrainingError, match="--lr-probe chose it"):  # resumed without the probe: told why
        kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=12, save_every=4, eval_every=0, lr=2 * chosen,
                     schedule="constant", warmup=0), tmp_path / "straight", resume=True)
    # a new run into a directory that holds one is refused before any probing
    monkeypatch.setattr("lrpt.training.probe_lr", lambda *a, **k: pytest.fail("probed before the directory was checked"))
    with pytest.raises(TrainingError, match="already holds a run"):
        kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=8, lr_probe=True), tmp_path / "straight")


def test_tail_average_ends_the_run_with_the_mean_of_the_sampled_iterates(kit, llama, monkeypatch):
    """--average 0.5 over 8 steps: the prompt ends as the mean of the iterates after steps 5-8
    (recorded after every step; both runs follow the same trajectory, only their ends differ)."""
    from lrpt.average import TailAverage
    from lrpt.training import Training

    model, tok = llama
    data = toy_data(48)
    seen: dict[int, dict] = {}
    real = Training.step

    def recording(self, micro_batches, lr):
        handle = real(self, micro_batches, lr)
        seen[self.t] = self.prompt.to_params()
        return handle

    monkeypatch.setattr(Training, "step", recording)
    ends, said = {}, {}
    for average in (0.0, 0.5):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=8, lr=0.05, average=average))
        ends[average], said[average] = prompt.to_params(), res.averaged
    assert said == {0.0: "", 0.5: "mean of 4 iterates (steps 5-8 every 1; --average)"}  # the CLI's summary row
    for k, v in ends[0.5].items():
        want = np.mean([seen[t][k] for t in (5, 6, 7, 8)], axis=0)
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)
        if k.endswith(("U", "V")):
            assert not np.allclose(v, ends[0.0][k])  # the mean is not the last iterate
    prompt = kit.be.init_prompt(spec_for("lopt2"), model, tok, seed=0)  # a fixed tensor stays out of the mean
    x0 = prompt.to_params()["lopt.X0"]
    kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=6, lr=0.05, average=0.5))  # 3 samples: (x+x+x)/3 need not be x
    np.testing.assert_array_equal(prompt.to_params()["lopt.X0"], x0)
    # at most SAMPLES iterates, evenly spaced, the last step always among them
    tail = TailAverage(0.5, 1000)
    due = [s for s in range(1, 1001) if tail.due(s)]
    assert len(due) == 50 and due[-1] == 1000 and due[0] == 510 and set(np.diff(due)) == {10}
    assert TailAverage(0.07, 100).first == 94  # a window of 7, though 0.07 × 100 is 7.000000000000001
    with pytest.raises(TrainingError, match="--average must be <= 1"):
        cfg(average=1.5).validate()


def test_tail_average_checkpoints_hold_the_trajectory_and_extensions_stay_exact(kit, llama, tmp_path):
    """A finished averaged run extended to twice its length ends as the straight run (its checkpoint
    holds the last iterate, not the mean, and the new tail's sums start afresh, as the log says); a
    finished run resumed with nothing left to do keeps the mean as its adapter."""
    model, tok = llama
    data = toy_data(48)
    config = dict(lr=0.05, average=0.5, eval_every=0, save_every=3, schedule="constant", warmup=0)
    ends, notes, said = {}, [], {}
    for name, parts in (("straight", [12]), ("extended", [6, 12]), ("longer", [12, 18])):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        for i, steps in enumerate(parts):
            res = kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=steps, **config), tmp_path / name,
                               resume=i > 0, log=notes.append)
        ends[name], said[name] = Adapter.load(tmp_path / name / "adapter").params, res.averaged
        np.testing.assert_array_equal(ends[name]["lopt.U"], prompt.to_params()["lopt.U"])
    for k in ends["straight"]:
        np.testing.assert_array_equal(ends["extended"][k], ends["straight"][k])
    # the summary names the steps in the mean: 12 -> 18 restarts the sums after step 12, inside the new tail
    assert said == {"straight": "mean of 6 iterates (steps 7-12 every 1; --average)",
                    "extended": "mean of 6 iterates (steps 7-12 every 1; --average)",
                    "longer": "mean of 6 iterates (steps 13-18 every 1; --average)"}
    notes = notes[:3]
    assert sum("tail average restarts at step 6" in n for n in notes) == 1
    assert len(notes) == 3 and all("ends with the mean of its last 50% of steps" in n for n in notes)
    last = Adapter.load(tmp_path / "straight" / "checkpoints" / "step-000012" / "adapter").params
    assert not np.allclose(last["lopt.U"], ends["straight"]["lopt.U"])  # the checkpoint: the last iterate
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=5)
    kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=12, **config), tmp_path / "straight", resume=True)
    np.testing.assert_array_equal(Adapter.load(tmp_path / "straight" / "adapter").params["lopt.U"],
                                  ends["straight"]["lopt.U"])
    np.testing.assert_array_equal(prompt.to_params()["lopt.U"], ends["straight"]["lopt.U"])
    # a run started before --average existed (its settings name none) ended with its last step: it
    # resumes only without averaging, as a run resumes only with its own lr
    stored = tmp_path / "extended" / "train_config.json"
    stored.write_text(json.dumps({k: v for k, v in json.loads(stored.read_text()).items() if k != "average"}))
    with pytest.raises(TrainingError, match="average 0.0 → 0.5"):
        kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=15, **config), tmp_path / "extended",
                     resume=True)
    notes.clear()
    res = kit.be.train(model, tok, prompt, TASK, data, None, cfg(steps=15, **{**config, "average": 0.0}),
                       tmp_path / "extended", resume=True, log=notes.append)
    last = Adapter.load(tmp_path / "extended" / "checkpoints" / "step-000015" / "adapter").params
    np.testing.assert_array_equal(prompt.to_params()["lopt.U"], last["lopt.U"])
    assert "--average" not in notes[0] and res.averaged == ""


def test_a_resumed_auto_length_run_keeps_the_floor_it_started_with(kit, llama, tmp_path, monkeypatch):
    """Resumed through the Python API with no floor typed, an auto-length run plans the length it
    started with, not the method's default of today: a run stored with its floor keeps that floor,
    and one stored before the field existed keeps AUTO_MIN_STEPS (as the CLI's --resume does)."""
    import lrpt.trainer
    from lrpt.spec import METHOD_DEFAULTS

    monkeypatch.setattr(lrpt.trainer, "AUTO_MIN_STEPS", 4)
    monkeypatch.setitem(METHOD_DEFAULTS, "lopt1", {**METHOD_DEFAULTS["lopt1"], "min_steps": 10})
    model, tok = llama
    data = toy_data(8)  # one batch of 8: the floor alone sets the length
    auto = dict(steps=None, eval_every=0, save_every=2, average=0.0)
    for name, floor in (("stored", 6), ("old", 4)):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        assert kit.be.train(model, tok, prompt, TASK, data, None, cfg(min_steps=floor, **auto), tmp_path / name).step == floor
        if name == "old":  # a run stored before min_steps was a setting
            stored = tmp_path / name / "train_config.json"
            stored.write_text(json.dumps({k: v for k, v in json.loads(stored.read_text()).items() if k != "min_steps"}))
        res = kit.be.train(model, tok, prompt, TASK, data, None, cfg(**auto), tmp_path / name, resume=True)
        assert res.step == floor, name
    # a floor typed on resume still extends the run; a new run takes the method's floor
    res = kit.be.train(model, tok, prompt, TASK, data, None, cfg(min_steps=8, **auto), tmp_path / "old", resume=True)
    assert res.step == 8
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    assert kit.be.train(model, tok, prompt, TASK, data, None, cfg(**auto), tmp_path / "new").step == 10


def test_tail_average_competes_with_earlier_evaluations_under_keep_best(kit, llama, tmp_path):
    """With evaluation rows and keep-best, the mean is the last evaluation: adapter/ is the mean only
    if it scores best, and the summary says which step adapter/ holds when it is not."""
    model, tok = llama
    data = toy_data(64)
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    res = kit.be.train(model, tok, prompt, TASK, data[:48], data[48:], cfg(steps=8, lr=0.5, eval_every=2,
                       average=0.5), tmp_path / "r")
    saved = Adapter.load(tmp_path / "r" / "adapter").params
    assert res.averaged.startswith("mean of 4 iterates (steps 5-8")
    assert res.best_step == 6  # here the mean (step 8) only ties step 6's score, which keep-best keeps
    assert not np.array_equal(saved["lopt.U"], prompt.to_params()["lopt.U"])
    assert "evaluated at step 8, adapter/ holds step 6's, the best evaluation (keep-best)" in res.averaged
    res = kit.be.train(model, tok, prompt, TASK, data[:48], data[48:], cfg(steps=8, lr=0.5, eval_every=2,
                       average=0.5, keep_best=False), tmp_path / "last")
    np.testing.assert_array_equal(Adapter.load(tmp_path / "last" / "adapter").params["lopt.U"],
                                  prompt.to_params()["lopt.U"])  # without keep-best, adapter/ is the mean
    assert "keep-best" not in res.averaged


def test_continue_training_a_saved_adapter(kit, llama, tmp_path):
    model, tok = llama
    data = toy_data()
    prompt = kit.be.init_prompt(spec_for("prompt"), model, tok, seed=0)
    kit.be.train(model, tok, prompt, TASK, data[:80], None, cfg(steps=6), tmp_path / "one")
    again = kit.be.prompt_from_adapter(Adapter.load(tmp_path / "one" / "adapter"))
    enc = _encoded(kit, tok, data[:80])
    labels = [d["label"] for d in data[:80]]

    def ce(scores):
        return float(np.mean(np.log(np.exp(scores).sum(1)) - scores[np.arange(80), labels]))

    before = ce(kit.be.evaluate(model, tok, again, TASK, enc)[1])
    res = kit.be.train(model, tok, again, TASK, data[:80], None, cfg(steps=10, warmup=0), tmp_path / "two")
    assert res.step == 10 and ce(kit.be.evaluate(model, tok, again, TASK, enc)[1]) < before


def test_nan_guard_stops_and_keeps_last_good_checkpoint(kit, llama, tmp_path, monkeypatch):
    from lrpt.training import Training

    model, tok = llama
    real = Training.step

    def poisoned(self, micro_batches, lr):
        handle = real(self, micro_batches, lr)
        if self.t >= 5:
            self.prompt.load_params({k: v * np.float32("nan") for k, v in self.prompt.to_params().items()})
        return handle

    monkeypatch.setattr(Training, "step", poisoned)
    with pytest.raises(TrainingError, match="last good checkpoint is .*step-000004"):
        kit.be.train(model, tok, kit.be.init_prompt(spec_for("lopt1"), model, tok), TASK, toy_data(48), None,
                     cfg(steps=12, save_every=4, log_every=1), tmp_path / "r")
    Adapter.load(tmp_path / "r" / "checkpoints" / "step-000004" / "adapter")  # intact and finite


def test_keep_best_and_early_stopping(kit, llama, tmp_path):
    model, tok = llama
    data = toy_data()
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    res = kit.be.train(model, tok, prompt, TASK, data[:80], data[80:], cfg(steps=40, lr=1e-6, eval_every=2,
                                                                            early_stopping=2), tmp_path / "r")
    assert res.stopped_early and res.step < 40
    assert res.best_step is not None and Adapter.load(tmp_path / "r" / "adapter")
    saved, notes = Adapter.load(tmp_path / "r" / "adapter").params, []
    again = kit.be.train(model, tok, prompt, TASK, data[:80], data[80:], cfg(steps=40, lr=1e-6, eval_every=2,
                         early_stopping=2), tmp_path / "r", resume=True, log=notes.append)
    assert again.stopped_early and again.step == res.step and "stopped early" in notes[0]  # it stays stopped
    assert all(np.array_equal(saved[k], Adapter.load(tmp_path / "r" / "adapter").params[k]) for k in saved)


def test_a_run_no_better_than_the_majority_label_says_so(kit, llama):
    """Evaluation rows of one label: always answering it scores 1.0, which no prompt beats, so the run
    records that baseline and logs the warning (lrpt.data.chance_warning)."""
    model, tok = llama
    data, notes = toy_data(), []
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    one_label = [dict(r, label=1) for r in data[80:]]
    res = kit.be.train(model, tok, prompt, TASK, data[:80], one_label, cfg(steps=2, lr=1e-3), log=notes.append)
    assert res.baseline == (1.0, " good") and res.best_metric <= 1.0
    assert [m for m in notes if m.startswith("warning:")] == [chance_warning(TASK, (1.0, " good"), res.best_metric)]
    res = kit.be.train(model, tok, prompt, TASK, data[:80], None, cfg(steps=2, lr=1e-3))
    assert res.baseline is None  # no evaluation rows, nothing to compare


def test_a_collapsed_run_trains_once_more_from_its_start_at_a_lower_lr(kit, llama, tmp_path, monkeypatch):
    """Training rows of one label: always answering it scores 1.0 on them, which no prompt beats, so
    the run counts as collapsed (lrpt.retry) and trains once more from its starting prompt at the lr
    × 1/3, steps numbered on. Its second attempt is exactly a run given that lr from the start; a run
    killed in either attempt and resumed ends as the unbroken one; the second attempt never retries;
    a run shorter than MIN_STEPS, or with --no-retry-collapsed, never does."""
    import lrpt.trainer as T
    from lrpt.retry import LR_FACTOR
    from lrpt.training import Training

    monkeypatch.setattr(T, "MIN_STEPS", 6)
    model, tok = llama
    one = [dict(r, label=1) for r in toy_data(40)]
    base = dict(steps=6, lr=0.05, eval_every=0, save_every=3, average=0.5)

    def run(out=None, resume=False, notes=None, **kw):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = kit.be.train(model, tok, prompt, TASK, one, None, cfg(**{**base, **kw}), out, resume=resume,
                           log=notes.append if notes is not None else None)
        return res, prompt.to_params()

    notes: list[str] = []
    res, ends = run(tmp_path / "straight", notes=notes)
    assert res.step == 12 and res.retried.startswith("the final prompt's accuracy on 40 training rows")
    assert res.retried.endswith(f"trained again from step 6 at lr {0.05 * LR_FACTOR:.3g}")
    assert any(n.endswith("(--no-retry-collapsed: keep the run as it is)") for n in notes)
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["lr"]) for x in lines if "retry" in x] == [(6, pytest.approx(0.05 * LR_FACTOR))]
    assert lines[-1]["step"] == 12 and [x["step"] for x in lines] == sorted(x["step"] for x in lines)
    lower, direct = run(lr=0.05 * LR_FACTOR, retry_collapsed=False)
    assert lower.step == 6 and not lower.retried
    for k in ends:
        np.testing.assert_allclose(ends[k], direct[k], rtol=1e-6, atol=1e-7)
    # killed after 5 steps (attempt 1, last checkpoint step 3), 6 (the retry's own checkpoint, at its
    # step 0: no moments) or 10 (attempt 2, step 9), then resumed
    real = Training.step
    for kill in (5, 6, 10):
        calls = {"n": 0}

        def dying(self, micro_batches, lr, kill=kill, calls=calls):
            calls["n"] += 1
            if calls["n"] > kill:
                raise KeyboardInterrupt
            return real(self, micro_batches, lr)

        monkeypatch.setattr(Training, "step", dying)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / f"kill{kill}")
        monkeypatch.setattr(Training, "step", real)
        kept = {p.name: read_safetensors(p / "optimizer.safetensors")[0]
                for p in (tmp_path / f"kill{kill}" / "checkpoints").iterdir()}
        # attempt 1's checkpoints hold the starting prompt (a retry may come); attempt 2's do not
        assert {n: any(k.endswith(".initial") for k in t) for n, t in kept.items()} == {
            5: {"step-000003": True}, 6: {"step-000003": True, "step-000006": False},
            10: {"step-000006": False, "step-000009": False}}[kill]
        assert not kept.get("step-000006", {})  # the retry starts with a fresh optimizer: nothing to hold
        resumed, params = run(tmp_path / f"kill{kill}", resume=True)
        assert resumed.step == 12 and resumed.retried == res.retried
        for k in ends:
            np.testing.assert_allclose(params[k], ends[k], rtol=1e-6, atol=1e-7)
    assert run(steps=5)[0].step == 5 and run(retry_collapsed=False)[0].step == 6


def test_a_retry_has_its_own_early_stopping_and_an_early_stopped_run_never_retries(kit, llama, monkeypatch):
    """Evaluations scripted (the collapse check still scores the one-label training rows): a run that
    stops early at its last step stays stopped, without a retry; a retry's patience counts from its own
    evaluations (attempt 1's best, 0.95, is not what it must beat to go on), while keep-best keeps
    the best of both attempts."""
    import lrpt.trainer as T
    from lrpt.training import Training

    monkeypatch.setattr(T, "MIN_STEPS", 6)
    model, tok = llama
    data = toy_data(40)
    one = [dict(r, label=1) for r in data]
    real = Training.evaluate
    script: list[float] = []

    def scripted(self, rows=None):
        if rows is not None:
            return real(self, rows)
        value = script.pop(0)
        return {"metric": value, "accuracy": value}

    monkeypatch.setattr(Training, "evaluate", scripted)
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    script[:] = [0.9, 0.8]
    res = kit.be.train(model, tok, prompt, TASK, one, data[:8], cfg(steps=6, eval_every=3, early_stopping=1))
    assert (res.step, res.stopped_early, res.retried) == (6, True, "") and not script
    script[:] = [0.9, 0.95, 0.94, 0.6, 0.7, 0.65]
    res = kit.be.train(model, tok, prompt, TASK, one, data[:8], cfg(steps=6, eval_every=2, early_stopping=2))
    assert res.retried and (res.step, res.stopped_early) == (12, False) and not script
    assert (res.best_metric, res.best_step) == (0.95, 4)


def test_completion_task_trains_on_targets(kit, llama, tmp_path):
    model, tok = llama
    task = Task("echo", kind="completion", template="Q: {prompt}\nA:")
    data = [{"prompt": s, "completion": " " + s.split()[0]} for s in sentences(48, seed=2)]
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    res = kit.be.train(model, tok, prompt, task, data[:40], data[40:], cfg(steps=12, lr=0.1), tmp_path / "r")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < losses[0] and "eval_loss" in res.history[-1]


def test_accumulation_equals_one_big_batch(kit, llama):
    """grad_accum=2 micro-batches of 4 rows is the same step as one batch of the same 8 rows."""
    model, tok = llama
    out = []
    for accum in (1, 2):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        kit.be.train(model, tok, prompt, TASK, toy_data(32), None,
                     cfg(steps=3, batch_size=8 // accum, grad_accum=accum, bucket=False, pad_to_multiple=16, eval_every=0))
        out.append(prompt.to_params())
    for k in out[0]:
        close(out[0][k], out[1][k], atol=2e-5)


def test_compiled_step_matches_eager(kit, llama):
    model, tok = llama
    out = []
    for compile_ in (False, True):
        prompt = kit.be.init_prompt(spec_for("lopa", dropout=0.0), model, tok, seed=0)  # compiled RNG differs
        res = kit.be.train(model, tok, prompt, TASK, toy_data(48), None, cfg(steps=4, compile=compile_,
                                                                                pad_to_multiple=16))
        out.append((res.final_loss, prompt.to_params()))
    assert abs(out[0][0] - out[1][0]) < 1e-4
    for k in out[0][1]:
        close(out[0][1][k], out[1][1][k], atol=1e-4)


def test_compiled_shared_prefix_step_matches_eager_plain(kit, llama):
    """The default shared-prefix step compiles (torch.compile / mx.compile) and trains like the plain path."""
    model, tok = llama
    out = []
    for compile_, shared in ((False, False), (False, True), (True, True)):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = kit.be.train(model, tok, prompt, TASK, toy_data(48), None,
                           cfg(steps=4, compile=compile_, shared_prefix=shared, pad_to_multiple=16))
        out.append((res.final_loss, prompt.to_params()))
    for loss, params in out[1:]:
        assert abs(loss - out[0][0]) < 1e-4
        for k in params:
            close(params[k], out[0][1][k], atol=1e-4)


def test_torch_step_compiled_whole_with_the_shared_prefix_is_one_graph_compiled_once(kit, llama, monkeypatch):
    """A step compiled whole behind the shared prefix is one graph, compiled once per batch shape:
    nothing it traces writes state dynamo guards on (a memo written under tracing made the first
    shape compile twice) or breaks the graph. The compiler's backend is "eager": tracing only. (On
    torch 2.11, an import statement in the step was a graph break; this machine's torch traces it:
    tests/test_gpu.py checks the device's.)"""
    if kit.name != "torch":
        pytest.skip("torch.compile's graphs and recompilations")
    import torch
    from torch._dynamo.utils import counters

    from lrpt.backends.torch import model as torch_model
    from lrpt.backends.torch import step as torch_step

    real = torch.compile
    monkeypatch.setattr(torch_step.torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=False))
    monkeypatch.setattr(torch_model, "_CACHE_KWARG", {})  # as in a fresh process
    torch._dynamo.reset()
    counters.clear()
    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            res = kit.be.train(model, tok, prompt, TASK, toy_data(32), None,
                               cfg(steps=3, compile=True, compile_scope="step", shared_prefix=True,
                                   pad_to_multiple=64))
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert "shared prefix" in res.compile_choice and np.isfinite(res.final_loss)
    assert not breaks


@pytest.mark.parametrize("kind", ["classification", "completion"])
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_packed_prefix_equals_the_two_pass_prefix(tiny_dirs, arch, kind):
    """The shared prefix packed with the rows (lrpt.backends.torch.packed) gives the two-pass path's
    loss and gradients (fp32, rows of different lengths, right padded) and does run packed: one pass
    of n + B·T. A model it does not implement (gemma3's sliding window) is not packable."""
    import torch

    from lrpt.backends.torch.packed import packable

    be = get_backend("torch")
    model, tok = be.load_model(str(tiny_dirs[arch]), dtype="float32", device="cpu", quiet=True)
    if arch == "gemma3":
        assert not packable(model)
        return
    assert packable(model)
    n = 5
    out, widths = packed_vs_two_passes(be, model, tok, kind, n)
    assert model.config._attn_implementation == "sdpa"  # switched back
    (one, _), (b, w), packed_width = widths[0], widths[1], widths[-1]  # two passes (prompt, rows), then one
    assert one == 1 and len(widths) == 3 and packed_width == (1, n + b * w)
    assert abs(out[0][0] - out[1][0]) <= 1e-5
    for k, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], g, rtol=1e-5, atol=1e-5)


def test_torch_deterministic_kernels_switch_on_cuda_only_and_back(monkeypatch):
    """``--deterministic`` turns torch's deterministic mode on for a CUDA run only (with the cuBLAS
    workspace setting it needs, a user's own value kept, and no NaN-filling of new buffers), and
    puts back whatever the process had before, the user's own mode included."""
    import os

    import torch
    import torch.utils.deterministic as det

    from lrpt.backends.torch.step import deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    for device, on in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        with deterministic_kernels(device, on):
            assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_kernels(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not det.fill_uninitialized_memory
    assert not torch.are_deterministic_algorithms_enabled() and det.fill_uninitialized_memory
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_kernels(torch.device("cuda")):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_torch_the_deterministic_switch_is_on_only_inside_a_runs_steps_and_evaluations(tiny_dirs, monkeypatch):
    """torch's deterministic mode is process-wide, so a run holds it only while it steps, evaluates or
    probes: a Training built and never closed (a notebook's, a test's, a benchmark's), a refused
    configuration and a run that fails all leave it as they found it, and every step and evaluation
    of a whole run (lr probe included) runs under it."""
    import contextlib

    from lrpt.backends.torch import step as torch_step
    from lrpt.data import encode_examples
    from lrpt.tokens import tokenize_fn
    from lrpt.training import Training

    on, seen = [], []

    @contextlib.contextmanager
    def switch(device, enabled=True):  # stands in for the CUDA-only switch, here on the CPU
        on.append(True)
        try:
            yield
        finally:
            on.pop()

    monkeypatch.setattr(torch_step, "deterministic_kernels", switch)
    be = get_backend("torch")
    model, tok = be.load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu", quiet=True)
    prompt = be.init_prompt(PromptSpec("lopt1", n_tokens=4, rank=2), model, tok, seed=0)
    rows = toy_data(16, seed=0)
    with pytest.raises(TrainingError, match="graphs"):
        be.train(model, tok, prompt, toy_task(), rows, None,
                 TrainConfig(steps=2, batch_size=8, progress=False, compile=True, compile_scope="graphs"))
    assert on == []

    enc = encode_examples(toy_task(), tokenize_fn(be.hf_tokenizer(tok)), rows)
    ops = Training(be, model, tok, prompt, toy_task(), enc, enc[:4], TrainConfig(steps=2, batch_size=8, lr=0.05))
    assert on == []  # built, never closed: nothing switched
    ops.step([[0, 1, 2, 3]], 0.05)
    ops.evaluate()
    assert on == []

    real_step, real_eval = torch_step.Stepper._step, Training._evaluate

    def step(self, *a, **k):
        seen.append(("step", list(on)))
        return real_step(self, *a, **k)

    def evaluate(self, *a, **k):
        seen.append(("evaluate", list(on)))
        return real_eval(self, *a, **k)

    monkeypatch.setattr(torch_step.Stepper, "_step", step)
    monkeypatch.setattr(Training, "_evaluate", evaluate)
    be.train(model, tok, prompt, toy_task(), rows, rows[:4],
             TrainConfig(steps=3, batch_size=8, progress=False, lr_probe=True))
    assert on == [] and {k for k, _ in seen} == {"step", "evaluate"} and all(v == [True] for _, v in seen), seen

    def fail(*a, **k):
        raise TrainingError("stopped")

    monkeypatch.setattr(torch_step.Stepper, "_step", fail)
    with pytest.raises(TrainingError, match="stopped"):
        be.train(model, tok, prompt, toy_task(), rows, None, TrainConfig(steps=2, batch_size=8, progress=False))
    assert on == []


def test_torch_an_op_without_a_deterministic_kernel_is_one_clear_error(tiny_dirs, monkeypatch):
    """torch's refusal of an op that has no deterministic CUDA kernel becomes one TrainingError line
    naming the op and --no-deterministic; any other RuntimeError goes through unchanged."""
    from lrpt.backends.torch import step as torch_step

    be = get_backend("torch")
    model, tok = be.load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu", quiet=True)
    refusal = ("index_add_cuda_ does not have a deterministic implementation, but you set"
               " 'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation")
    for message, expected in ((refusal, TrainingError), ("CUDA out of memory", RuntimeError)):
        def fail(self, *a, message=message):
            raise RuntimeError(message)

        monkeypatch.setattr(torch_step.Stepper, "_step", fail)
        with pytest.raises(expected) as err:
            be.train(model, tok, be.init_prompt(spec_for("lopt1"), model, tok, seed=0), TASK, toy_data(16), None,
                     cfg(steps=1))
        assert type(err.value) is expected
        assert str(err.value) == ("CUDA out of memory" if expected is RuntimeError else
                                  "index_add_cuda_ has no deterministic CUDA kernel in this torch: train with"
                                  " --no-deterministic (runs of one seed may then differ)")


def test_torch_step_compiled_whole_packs_the_shared_prefix_and_trains_like_two_passes(kit, llama, monkeypatch):
    """A step compiled whole that runs the shared prefix runs it packed (one pass per block, the
    attention switched outside the compiled code and back after it) and trains as the eager
    two-pass step does; evaluation in between runs with the model's own attention."""
    if kit.name != "torch":
        pytest.skip("the torch backend's packing")
    import torch

    from lrpt.backends.torch import step as torch_step
    from lrpt.backends.torch.model import transformer_blocks

    real = torch.compile
    monkeypatch.setattr(torch_step.torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=False))
    model, tok = llama
    widths = []
    hook = transformer_blocks(model)[0].register_forward_pre_hook(
        lambda m, args, kw: widths.append(tuple((args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    out = {}
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            widths.clear()
            prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
            res = kit.be.train(model, tok, prompt, TASK, toy_data(32), toy_data(8, seed=3),
                               cfg(steps=3, compile=compiled, compile_scope="step" if compiled else None,
                                   shared_prefix=True, pad_to_multiple=64, eval_every=2))
            out[compiled] = (res.final_loss, res.best_metric, prompt.to_params(), list(widths))
    finally:
        hook.remove()
        torch._dynamo.reset()
    assert "packed" in res.compile_choice and model.config._attn_implementation == "sdpa"
    assert not any(w[0] == 1 and w[1] > 64 for w in out[False][3])  # eager: two passes, never packed
    assert any(w[0] == 1 and w[1] > 64 for w in out[True][3])  # compiled: packed (1, n + B·T) passes
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-4) and out[True][1] == out[False][1]
    for k, v in out[False][2].items():
        close(out[True][2][k], v, atol=1e-4)


@pytest.mark.parametrize("probe", [False, True])
def test_cuda_graph_bookkeeping_trains_like_the_eager_step(kit, llama, monkeypatch, tmp_path, probe):
    """torch's ``--compile-scope graphs`` (:mod:`lrpt.backends.torch.graphs`) on the CPU, with a stand-in
    recorder whose replay runs the recorded function again: what a real CUDA graph replays is the
    eager step (tests/test_gpu.py checks that on a GPU); what this checks without one is the
    bookkeeping around it: batches copied into the recorded input buffers, the warm-ups' gradients
    and optimizer step undone, learning rate and micro-batch weights read from tensors at each
    replay, gradients zeroed in place, the lr probe's resets and loaded moments landing in the
    buffers the update reads, and a resumed run continuing from its checkpoint."""
    if kit.name != "torch":
        pytest.skip("CUDA graphs are the torch backend's")
    import torch

    from lrpt.backends.torch import graphs, step

    def buffers(steps):  # what a real graph has baked in: every tensor it reads or writes, by identity
        tensors = [steps.weight, *(p.grad for p in steps.params), *(g["lr"] for g in steps.opt.param_groups),
                   *(t for st in steps.opt.state.values() for t in st.values())]
        return [(id(t), t.data_ptr()) for t in tensors]

    def record(self, run, undo):  # warm up and undo for real; "replay" reruns ``run`` on the same buffers
        for _ in range(graphs.WARMUP):
            run()
        undo()
        out, baked = torch.zeros(()), buffers(self)

        class Replay:
            @staticmethod
            def replay():
                assert buffers(self)[:len(baked)] == baked  # a real graph would read stale tensors
                value = run()
                if value is not None:
                    out.copy_(value)
        return Replay, out

    adamw = torch.optim.AdamW
    monkeypatch.setattr(graphs.CapturedSteps, "_record", record)
    monkeypatch.setattr(step, "refusal", lambda *a: None)
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, capturable=False, **kw: adamw(*a, **{**kw, "foreach": False}))
    model, tok = llama
    out = {}
    for graphed in (False, True):
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = kit.be.train(model, tok, prompt, TASK, toy_data(48), toy_data(8, seed=3), cfg(
            steps=8, grad_accum=2, compile=graphed, compile_scope="graphs", lr_probe=probe, pad_to_multiple=4))
        assert ("CUDA graphs" in res.compile_choice) == graphed
        out[graphed] = (res.final_loss, prompt.to_params())
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-5)
    for k in out[False][1]:
        close(out[True][1][k], out[False][1][k], atol=1e-5)
    if probe:
        return
    # a run that crashes after its step-4 checkpoint and resumes ends where the uninterrupted run ended
    config = cfg(steps=8, grad_accum=2, compile=True, compile_scope="graphs", pad_to_multiple=4, save_every=4)
    with pytest.raises(Crash), crash_after_checkpoint(4):
        kit.be.train(model, tok, kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0), TASK, toy_data(48),
                     toy_data(8, seed=3), config, out_dir=tmp_path)
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=5)  # resuming overwrites it
    kit.be.train(model, tok, prompt, TASK, toy_data(48), toy_data(8, seed=3), config, out_dir=tmp_path, resume=True)
    for k, v in prompt.to_params().items():
        close(v, out[True][1][k], atol=1e-5)
    # moments loaded after the update was recorded land in the state it reads
    from lrpt.data import encode_examples
    from lrpt.tokens import tokenize_fn
    from lrpt.training import Training

    data = encode_examples(TASK, tokenize_fn(tok), toy_data(16))
    ops = Training(kit.be, model, tok, prompt, TASK, data, None, cfg(compile=True, compile_scope="graphs"))
    ops.step([list(range(8))], 0.01)
    state = {k: v * 0 + 0.5 for k, v in ops.stepper.moments().items()}
    before = buffers(ops.stepper.graphs)
    ops.stepper.load_moments(state, 7)
    assert buffers(ops.stepper.graphs) == before
    assert all(np.all(v == 0.5) for v in ops.stepper.moments().values())
    assert all(float(st["step"]) == 7 for st in ops.stepper.opt.state.values())


def test_a_step_that_cannot_be_recorded_runs_eagerly_under_auto_and_fails_when_asked(kit, llama, monkeypatch, capsys):
    """A model whose step waits on the host cannot be recorded as a CUDA graph: when lrpt chose
    graphs (auto, or --compile with no scope), the run says so, goes on eagerly (the same training as
    an eager run) and its result says eager; when the user asked for --compile-scope graphs, one
    clear error says what to use instead."""
    if kit.name != "torch":
        pytest.skip("CUDA graphs are the torch backend's")
    import torch

    from lrpt import training
    from lrpt.backends.torch import graphs, step
    from lrpt.shapes import CompileChoice

    def record(self, run, undo):
        for _ in range(graphs.WARMUP):
            run()
        undo()
        raise graphs.NotRecordable("this model's training step cannot be recorded as a CUDA graph (test):"
                                   " train with --no-compile or --compile-scope blocks")

    adamw = torch.optim.AdamW
    monkeypatch.setattr(graphs.CapturedSteps, "_record", record)
    monkeypatch.setattr(step, "refusal", lambda *a: None)
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, capturable=False, **kw: adamw(*a, **{**kw, "foreach": False}))
    model, tok = llama
    out = []
    for compile_ in (False, None):  # eager, then auto made to choose graphs (as on a GPU)
        if compile_ is None:
            monkeypatch.setattr(training, "choose_compile",
                                lambda *a, **k: CompileChoice(True, None, "auto: test", "graphs"))
        prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = kit.be.train(model, tok, prompt, TASK, toy_data(48), None,
                           cfg(steps=6, compile=compile_, pad_to_multiple=4))
        out.append(prompt.to_params())
    assert "eager from here" in capsys.readouterr().err
    assert res.compile_choice.startswith("eager after all (this model's training step cannot be recorded")
    for k in out[0]:
        close(out[1][k], out[0][k], atol=1e-5)
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    with pytest.raises(TrainingError, match="--no-compile or --compile-scope blocks"):
        kit.be.train(model, tok, prompt, TASK, toy_data(48), None,
                     cfg(steps=6, compile=True, compile_scope="graphs", pad_to_multiple=4))


def test_options_of_one_backend_are_refused_by_the_other(kit, llama):
    """No silent no-ops: grad_checkpoint is MLX's, compile_mode is torch.compile's."""
    model, tok = llama
    other = {"torch": dict(grad_checkpoint=True), "mlx": dict(compile=True, compile_mode="reduce-overhead")}[kit.name]
    prompt = kit.be.init_prompt(spec_for("lopt1"), model, tok)
    with pytest.raises(TrainingError, match="drop|use --compile alone"):
        kit.be.train(model, tok, prompt, TASK, toy_data(16), None, cfg(steps=1, **other))


# -- MLX only: features torch has no counterpart for ---------------------------------------------


def test_mlx_grad_checkpoint_gives_the_same_step(tiny_dirs):
    """Recomputing layers in the backward pass changes nothing. mx.checkpoint does not differentiate
    through the layers' cache objects, so checkpointed layers take the plain path (and a forced
    --shared-prefix is refused: test_shared_prefix_forced_where_it_cannot_apply_is_refused). Only the
    trained model is checkpointed: another model of the same class, loaded before or after, keeps plain layers."""
    be = get_backend("mlx")
    before = be.load_model(str(tiny_dirs["llama"]), quiet=True)[0]
    model, tok = be.load_model(str(tiny_dirs["llama"]), quiet=True)
    out = []
    for gc in (False, True):
        prompt = be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = be.train(model, tok, prompt, TASK, toy_data(48), None,
                       cfg(steps=4, grad_accum=2, grad_checkpoint=gc, shared_prefix=False if not gc else None))
        out.append(prompt.to_params())
    assert "in every row (plain path)" in res.compile_choice  # checkpointed: never the shared prefix
    for k in out[0]:
        close(out[0][k], out[1][k])
    after = be.load_model(str(tiny_dirs["llama"]), quiet=True)[0]
    assert all(be.shares_prefix(m) for m in (before, model, after))  # the run's model gets its layers back
    assert type(before.layers[0]) is type(after.layers[0]) is type(model.layers[0])


def test_mlx_gemma_scale_is_measured(tiny_dirs):
    M = importlib.import_module("lrpt.backends.mlx.splice")
    assert M.attach(_load("mlx", str(tiny_dirs["gemma3"]))[0]).scale == pytest.approx(32 ** 0.5, rel=1e-3)
    assert M.attach(_load("mlx", str(tiny_dirs["llama"]))[0]).scale == 1.0


def test_mlx_trains_through_a_4bit_quantized_model(tiny_dirs, tmp_path):
    import mlx.nn as nn
    import mlx_lm

    be = get_backend("mlx")
    q = tmp_path / "q4"
    mlx_lm.convert(str(tiny_dirs["llama"]), str(q), quantize=True, q_group_size=32, q_bits=4)
    model, tok = be.load_model(q)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    prompt = be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    before = prompt.to_params()
    res = be.train(model, tok, prompt, TASK, toy_data(48), None, cfg(steps=8, lr=0.1))
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert any(not np.array_equal(before[k], v) for k, v in prompt.to_params().items())


@pytest.mark.parametrize("field, value", [("logit_scale", 0.25)])  # Cohere multiplies its logits
def test_torch_head_applies_the_models_logit_multiplier(field, value):
    """lrpt's own head (scoring, training) must give the model's logits: the prompt as the tokens it embeds."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from lrpt.backends.torch import model as M

    torch.manual_seed(0)
    cfg = tf.CohereConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, **{field: value})
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    a, b = [1, 40, 77], [5, 120, 9]
    prompt = get_backend("torch").PromptModule(PromptSpec("prompt", n_tokens=len(a)),
                                               {"prompt_embeddings": M.embedding_rows(model, a)}).eval()
    with torch.no_grad():
        got = M.forward_logits(model, prompt, M.make_batch([b], len(a), "right"))[0]
        ref = model(torch.tensor([a + b])).logits[0, len(a):].float()
    close(got.numpy(), ref.numpy(), atol=1e-6)


def test_granite_prompt_space_is_the_same_on_both_backends(tmp_path):
    """HF multiplies Granite's embeddings outside get_input_embeddings(): MLX must not fold that
    factor into prompt space, or the same adapter scores differently and fingerprints disagree."""
    path = save_tiny("granite", tmp_path / "granite")
    adapter, scores, prints = None, {}, {}
    for name in ("torch", "mlx"):
        be = get_backend(name)
        model, tok = be.load_model(str(path))
        if adapter is None:
            adapter = be.prompt_to_adapter(be.init_prompt(spec_for("lopt1", n=3), model, tok, seed=0))
        prompt = be.prompt_from_adapter(adapter, model)
        prompt.eval()
        scores[name] = np.array(be.score_labels(model, tok, prompt, TEXTS[:2], [" good", " bad"]))
        prints[name] = be.base_model_info(model).embedding_fingerprint["values"]
    close(scores["mlx"], scores["torch"], atol=1e-4)
    close(np.array(prints["mlx"]), np.array(prints["torch"]), atol=1e-5)


def test_rows_past_the_context_are_refused_in_scoring_and_cut_in_training(kit, tiny_dirs):
    """The Python API bounds rows by the model's context as the CLI does: scoring refuses a row that
    does not fit (torch indexed past gpt2's position table, MLX scored NaN and answered label 0), and
    ``train`` without ``context=`` cuts to the one the model's config states."""
    from lrpt.data import encode_examples
    from lrpt.errors import DataError
    from lrpt.tokens import target_tokenize_fn, tokenize_fn

    model, tok = _load(kit.name, str(tiny_dirs["gpt2"]))  # n_positions 256
    prompt = kit.be.init_prompt(spec_for("lopt1", n=4), model, tok, seed=0)
    long_text = TASK.format({"text": "good film " * 200})
    with pytest.raises(DataError, match="more than the model's context of 256"):
        kit.be.score_labels(model, tok, prompt, [TEXTS[0], long_text], [" good", " bad"])
    hf = kit.be.hf_tokenizer(tok)
    data = encode_examples(TASK, tokenize_fn(hf), [{"text": "good film " * 200, "label": 1}], target_tokenize_fn(hf))
    with pytest.raises(DataError, match="row 0 needs"):
        kit.be.evaluate(model, tok, prompt, TASK, data)
    rows = toy_data(8) + [{"text": "good film " * 200, "label": 1}]
    res = kit.be.train(model, tok, prompt, TASK, rows, None, cfg(steps=2, eval_every=0))
    assert res.truncated == 1 and np.isfinite(res.final_loss)


def test_train_checks_rows_as_the_cli_does(kit, llama):
    """Text fields must be text (None would train as the word "None"); label names become indices."""
    from lrpt.errors import DataError

    model, tok = llama
    prompt = kit.be.init_prompt(spec_for("lopt1", n=2), model, tok, seed=0)
    with pytest.raises(DataError, match="'text' is NoneType, not text"):
        kit.be.train(model, tok, prompt, TASK, [*toy_data(4), {"text": None, "label": 0}], None, cfg(steps=1))
    named = [{"text": r["text"], "label": TASK.label_words[r["label"]].strip()} for r in toy_data(8)]
    assert kit.be.train(model, tok, prompt, TASK, named, None, cfg(steps=1, eval_every=0)).step == 1


def test_a_completion_task_evaluates_the_plain_model(kit, llama):
    from lrpt.data import encode_examples
    from lrpt.tokens import target_tokenize_fn, tokenize_fn

    model, tok = llama
    task = Task("echo", kind="completion", template="{prompt}")
    hf = kit.be.hf_tokenizer(tok)
    data = encode_examples(task, tokenize_fn(hf), [{"prompt": "good film", "completion": " bad"}], target_tokenize_fn(hf))
    metrics, nll = kit.be.evaluate(model, tok, None, task, data)
    assert nll.shape == (1, 2) and nll[0, 1] >= 1 and np.isfinite(metrics["loss"])


def test_mlx_loads_half_precision_models_whose_embeddings_are_rounded_before_layer_0(tiny_dirs):
    """bf16 Gemma 3 (e·√d rounded) and GPT-2 (token + position rows rounded) were refused as
    "transforms embeddings non-linearly" by a float32 tolerance; torch loads the same folders."""
    from lrpt.backends.mlx.splice import attach

    mlx = get_backend("mlx")
    for arch, scale in (("gemma3", 32 ** 0.5), ("gpt2", 1.0)):
        for dtype in ("bfloat16", "float16"):
            model, tok = mlx.load_model(str(tiny_dirs[arch]), dtype=dtype)
            assert attach(model).scale == pytest.approx(scale, rel=1e-2) and (scale != 1.0 or attach(model).scale == 1.0)
            prompt = mlx.init_prompt(spec_for("lopt1", n=3), model, tok, seed=0)
            assert np.isfinite(np.array(mlx.score_labels(model, tok, prompt, TEXTS[:2], [" good", " bad"]))).all()


def test_mlx_finds_the_backbone_inside_a_multimodal_wrapper():
    """mlx-lm keeps Gemma 3 4B+ and Mistral 3 text models under ``language_model``."""
    import mlx.nn as nn

    from lrpt.backends.mlx.splice import backbone

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = Text()

    w = Wrapper()
    assert backbone(w) is w.language_model.model


def test_a_hybrid_model_runs_without_the_shared_prefix(tmp_path):
    """LFM2's convolution layers keep state the one-pass stand-ins do not hold: the default path
    (shared prefix) crashed with a bare TypeError (MLX) or AttributeError (torch). Both backends now
    run such models on the plain path; MLX refuses left padding in one clear error and scores as
    torch; mlx-lm's own config errors are one LrptError."""
    import json

    from lrpt import LrptError

    path = save_tiny("lfm2", tmp_path / "lfm2")
    mlx, torch_be = get_backend("mlx"), get_backend("torch")
    model, tok = mlx.load_model(str(path))
    assert not mlx.shares_prefix(model)
    adapter = mlx.prompt_to_adapter(mlx.init_prompt(spec_for("lopt1", n=3), model, tok, seed=0))
    prompt = mlx.prompt_from_adapter(adapter, model)
    got = np.array(mlx.score_labels(model, tok, prompt, TEXTS[:2], [" good", " bad"]))
    tmodel, ttok = torch_be.load_model(str(path))
    assert not torch_be.shares_prefix(tmodel)
    tprompt = torch_be.prompt_from_adapter(adapter, tmodel)
    ref = torch_be.score_labels(tmodel, ttok, tprompt, TEXTS[:2], [" good", " bad"], shared_prefix=False)
    close(got, np.asarray(ref), atol=1e-4)
    close(np.asarray(torch_be.score_labels(tmodel, ttok, tprompt, TEXTS[:2], [" good", " bad"])), np.asarray(ref))
    torch_be.train(tmodel, ttok, tprompt, TASK, toy_data(8), None, cfg(steps=1, eval_every=0))
    mlx.train(model, tok, prompt, TASK, toy_data(8), None, cfg(steps=1, eval_every=0))
    with pytest.raises(LrptError, match="left padding needs attention-only layers"):
        mlx.forward_logits(model, prompt, mlx.make_batch([[5, 6], [7]], 3, "left"))
    config = json.loads((path / "config.json").read_text())
    del config["block_dim"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LrptError, match="cannot load model .* with mlx-lm"):
        mlx.load_model(str(path))


def test_mlx_prefix_cache_follows_an_in_place_edit_of_the_prompt(tiny_dirs):
    """An in-place write keeps the MLX array object: the identity check kept serving the old prompt."""
    from lrpt.backends.mlx.decode import prefix_cache

    mlx = get_backend("mlx")
    model, tok = _load("mlx", str(tiny_dirs["llama"]))
    prompt = mlx.init_prompt(spec_for("prompt", n=3), model, tok, seed=0)
    first = prefix_cache(model, prompt)
    assert prefix_cache(model, prompt) is first  # unchanged: reused
    prompt.prompt_embeddings[:] = prompt.prompt_embeddings * 2.0
    second = prefix_cache(model, prompt)
    assert second is not first
    assert not np.allclose(np.array(second[0].state[0]), np.array(first[0].state[0]))


def test_mlx_prompts_reach_a_model_quantized_after_load(tiny_dirs):
    """nn.quantize after load replaces the embedding module that splices prompts in (models without
    ``input_embeddings=``, phi3 here): the prompt was silently dropped."""
    import mlx.nn as nn

    mlx = get_backend("mlx")
    model, tok = mlx.load_model(str(tiny_dirs["phi3"]))
    nn.quantize(model, group_size=32, bits=8)
    scores = [np.array(mlx.score_labels(model, tok, mlx.init_prompt(spec_for("prompt", n=3), model, tok, seed=s),
                                        TEXTS[:2], [" good", " bad"], shared_prefix=False)) for s in (0, 1)]
    assert not np.allclose(scores[0], scores[1])
