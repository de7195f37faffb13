"""PyTorch backend on tiny random models of five architectures (CPU, float32)."""

import importlib
import json
from functools import cache

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny import ARCHS, METHODS, TEXTS, sentences, spec_for, toy_data, toy_task  # noqa: E402

from lrpt import Adapter, PromptSpec, Task, TrainingError  # noqa: E402
from lrpt.backends import get_backend  # noqa: E402

G = importlib.import_module("lrpt.backends.torch.generate")
from lrpt.backends.torch import model as M  # noqa: E402
from lrpt.backends.torch.prompts import PromptModule, prompt_from_adapter, prompt_to_adapter  # noqa: E402
from lrpt.backends.torch.train import evaluate, train  # noqa: E402
from lrpt.reference import materialize  # noqa: E402
from lrpt.tokens import label_token_ids  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402


@cache
def _load(path):
    return M.load_model(path)


@pytest.fixture(params=ARCHS)
def arch_model(request, tiny_dirs):
    return _load(str(tiny_dirs[request.param]))


@pytest.fixture
def llama(tiny_dirs):
    return _load(str(tiny_dirs["llama"]))


def test_get_backend_returns_torch():
    assert get_backend("torch").NAME == "torch"


# -- prompt modules -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_module_names_and_reference(method):
    spec = spec_for(method)
    adapter = Adapter.create(spec, 16, seed=2)
    module = prompt_from_adapter(adapter)
    assert set(module.state_dict()) == set(spec.param_shapes(16))
    trainable = {n for n, p in module.named_parameters()}
    assert trainable == set(spec.trainable_names())
    assert all(p.dtype == torch.float32 for p in module.parameters())
    enc = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32) if method == "lopa" else None
    with torch.no_grad():
        got = module.eval()(None if enc is None else torch.from_numpy(enc)).numpy()
    np.testing.assert_allclose(got, materialize(spec, adapter.params, enc), rtol=1e-5, atol=1e-6)
    back = prompt_to_adapter(module)
    assert back.created_by["backend"] == "torch"
    for k in adapter.params:
        np.testing.assert_array_equal(back.params[k], adapter.params[k])


@pytest.mark.parametrize("gate", ["sigmoid", "add", "max"])
def test_lopa_gates_match_reference(gate):
    spec = spec_for("lopa", gate=gate)
    adapter = Adapter.create(spec, 16, seed=1)
    enc = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    got = prompt_from_adapter(adapter).eval()(torch.from_numpy(enc)).detach().numpy()
    np.testing.assert_allclose(got, materialize(spec, adapter.params, enc), rtol=1e-5, atol=1e-6)


def test_same_seed_same_init(llama):
    model, tok = llama
    a = M.init_prompt(spec_for("lopt1"), model, tok, seed=7).to_params()
    b = M.init_prompt(spec_for("lopt1"), model, tok, seed=7).to_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = M.init_prompt(spec_for("prompt", init="text", init_text="the movie"), model, tok).to_params()
    ids = tok("the movie", add_special_tokens=False)["input_ids"]
    want = np.resize(np.array(ids), 4)
    emb = M.embedding_matrix(model)
    np.testing.assert_allclose(c["prompt_embeddings"], emb[want])


# -- positions, padding and prompt space ----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_batch_invariance(arch_model, method):
    model, tok = arch_model
    prompt = M.init_prompt(spec_for(method), model, tok, seed=0).eval()
    rows = [tok(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        batched = {
            side: M.forward_logits(model, prompt, M.make_batch(rows, 4, side, pad_to_multiple=8))
            for side in ("left", "right")
        }
        for i, r in enumerate(rows):
            alone = M.forward_logits(model, prompt, M.make_batch([r], 4))[0]
            for side, out in batched.items():
                torch.testing.assert_close(out[i, : len(r)], alone, rtol=0, atol=1e-5, msg=f"{side} row {i}")


def test_prompt_space_is_input_embedding_output(arch_model):
    """A prompt made of the embeddings of tokens A behaves exactly like the tokens A themselves."""
    model, tok = arch_model
    a = tok("the plot", add_special_tokens=True)["input_ids"]
    b = tok(" was great fun", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        rows = M.embed(model, torch.tensor(a)).float().numpy()
        prompt = PromptModule(PromptSpec("prompt", n_tokens=len(a)), {"prompt_embeddings": rows}).eval()
        got = M.forward_logits(model, prompt, M.make_batch([b], len(a)))[0]
        want = model(torch.tensor([a + b])).logits[0, len(a) :].float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lopa_encoders(llama):
    model, tok = llama
    rows = [tok(t)["input_ids"] for t in TEXTS]
    batch = M.make_batch(rows, 4)
    enc = M.encode(model, batch, "base", "mean")
    for i, r in enumerate(rows):
        with torch.no_grad():
            h = model.base_model(torch.tensor([r])).last_hidden_state[0]
        torch.testing.assert_close(enc[i], h.mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(M.encode(model, batch, "base", "last")[i], h[-1], rtol=0, atol=1e-5)
        e = M.embed(model, torch.tensor(r)).mean(0)
        torch.testing.assert_close(M.encode(model, batch, "embed", "mean")[i], e, rtol=0, atol=1e-6)
    prompt = M.init_prompt(spec_for("lopa", encoder="embed"), model, tok).eval()
    z = M.prompt_rows(model, prompt, batch)
    assert z.shape == (3, 4, 32) and not torch.allclose(z[0], z[1])  # per-instance prompts


def test_mixed_adapters_in_one_batch(llama):
    model, tok = llama
    prompts = [
        M.init_prompt(spec_for("lopt1", n=3), model, tok, seed=1).eval(),
        M.init_prompt(spec_for("lopa", n=5), model, tok, seed=2).eval(),
        M.init_prompt(spec_for("prompt", n=2), model, tok, seed=3).eval(),
    ]
    texts = TEXTS + ["fun film", "dull"]
    which = [0, 1, 2, 1, 0]
    rows = [tok(t)["input_ids"] for t in texts]
    n = [prompts[w].spec.n_tokens for w in which]
    with torch.no_grad():
        mixed = M.forward_logits(model, prompts, M.make_batch(rows, n, "left"), which)
        for i, (r, w) in enumerate(zip(rows, which)):
            alone = M.forward_logits(model, prompts[w], M.make_batch([r], prompts[w].spec.n_tokens))[0]
            torch.testing.assert_close(mixed[i, : len(r)], alone, rtol=0, atol=1e-5)
    scores = G.score_labels(model, tok, prompts, texts, [" good", " bad"], which=which)
    for i, w in enumerate(which):
        alone = G.score_labels(model, tok, prompts[w], [texts[i]], [" good", " bad"])
        np.testing.assert_allclose(scores[i], alone[0], atol=1e-5)
    mixed_gen = G.generate(model, tok, prompts, texts, max_tokens=6, which=which)
    assert mixed_gen == [G.generate(model, tok, prompts[w], [t], max_tokens=6)[0] for t, w in zip(texts, which)]


# -- scoring ---------------------------------------------------------------------------------------


def test_scoring_uses_head_only_at_answer_positions(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("lopt1"), model, tok).eval()
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        label_ids = [[5], [9]]
        rows = [tok(t)["input_ids"] for t in TEXTS]
        with torch.no_grad():
            s = G.score_rows(model, prompt, rows, label_ids)
    finally:
        hook.remove()
    assert seen == [(3, 1, 32)]  # one position per row, never (B, W, d)
    for i, r in enumerate(rows):
        full = M.forward_logits(model, prompt, M.make_batch([r], 4))[0, -1]
        logp = torch.log_softmax(full, -1)
        torch.testing.assert_close(s[i], logp[[5, 9]], rtol=0, atol=1e-5)


def test_multi_token_label_words_sum_logprobs(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("lopt2"), model, tok).eval()
    words = [" good", " really bad film"]
    ids = label_token_ids(tok, words)
    assert max(len(i) for i in ids) > 1
    got = G.score_labels(model, tok, prompt, TEXTS, words)
    for i, t in enumerate(TEXTS):
        r = tok(t)["input_ids"]
        for k, w in enumerate(ids):
            with torch.no_grad():
                logits = M.forward_logits(model, prompt, M.make_batch([r + w], 4))[0]
            logp = torch.log_softmax(logits, -1)
            want = sum(float(logp[len(r) - 1 + j, w[j]]) for j in range(len(w)))
            assert abs(got[i, k] - want) < 1e-4
    assert list(G.classify(model, tok, prompt, TEXTS, words)) == list(got.argmax(-1))


def test_label_word_that_tokenizes_to_nothing(llama):
    from lrpt import DataError

    with pytest.raises(DataError, match="tokenizes to nothing"):
        label_token_ids(llama[1], ["", " good"])


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
def test_batched_generation_equals_one_by_one(arch_model, method):
    model, tok = arch_model
    prompt = M.init_prompt(spec_for(method), model, tok, seed=0)
    batched = G.generate(model, tok, prompt, TEXTS, max_tokens=10)
    assert batched == [G.generate(model, tok, prompt, [t], max_tokens=10)[0] for t in TEXTS]


def test_prefix_cache_equals_full_forward_and_is_reused(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    rows = [tok(t)["input_ids"] for t in TEXTS]
    n = prompt.spec.n_tokens
    with torch.no_grad():
        c = G._cached_inputs(model, prompt, rows, 0)
        cached_logits = model(input_ids=c["input_ids"][:, n:], attention_mask=c["attention_mask"],
                              position_ids=c["position_ids"][:, n:], past_key_values=c["past_key_values"]).logits[:, -1]
        full_logits = model(**G._embedded_inputs(model, prompt, rows, None, 0)).logits[:, -1]
    torch.testing.assert_close(cached_logits, full_logits, rtol=0, atol=1e-5)
    first = G.prefix_cache(model, prompt)
    assert G.prefix_cache(model, prompt) is first  # computed once per prompt
    with torch.no_grad():
        prompt.lopt.U.add_(0.1)  # a changed prompt invalidates it
    assert G.prefix_cache(model, prompt) is not first
    a = G.generate(model, tok, prompt, TEXTS, max_tokens=8, use_prefix_cache=True)
    assert a == G.generate(model, tok, prompt, TEXTS, max_tokens=8, use_prefix_cache=False)


def test_sampling_seed_and_stop_strings(llama):
    model, tok = llama
    prompt = M.init_prompt(spec_for("prompt"), model, tok, seed=0)
    a = G.generate(model, tok, prompt, TEXTS, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    b = G.generate(model, tok, prompt, TEXTS, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a == b
    full = G.generate(model, tok, prompt, TEXTS[:1], max_tokens=12)[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = G.generate(model, tok, prompt, TEXTS[:1], max_tokens=12, stop=[stop])[0]
    assert cut == full[: full.find(stop)]


# -- training --------------------------------------------------------------------------------------

TASK = toy_task()


def cfg(**kw):
    base = dict(steps=12, lr=0.05, batch_size=8, eval_every=4, log_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss_and_writes_run_dir(llama, tmp_path, method):
    model, tok = llama
    data = toy_data()
    prompt = M.init_prompt(spec_for(method), model, tok, seed=0)
    res = train(model, tok, prompt, TASK, data[:80], data[80:], cfg(steps=16, lr=0.1), tmp_path / "run")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in x for x in lines) and lines[-1]["step"] == 16
    saved = Adapter.load(tmp_path / "run" / "adapter")
    assert saved.task == TASK and saved.base_model.hidden_size == 32 and saved.spec == prompt.spec
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000012", "step-000016"]  # keep_checkpoints=2
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "step-000016").iterdir()} == {
        "adapter",
        "optimizer.safetensors",
        "trainer_state.json",
    }


def test_existing_run_needs_resume_and_resume_needs_checkpoint(llama, tmp_path):
    model, tok = llama
    data = toy_data(32)
    prompt = M.init_prompt(spec_for("lopt1"), model, tok)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(model, tok, prompt, TASK, data, None, cfg(steps=2), tmp_path / "r", resume=True)
    train(model, tok, prompt, TASK, data, None, cfg(steps=2), tmp_path / "r")
    with pytest.raises(TrainingError, match="--resume"):
        train(model, tok, prompt, TASK, data, None, cfg(steps=2), tmp_path / "r")


def test_continue_training_a_saved_adapter(llama, tmp_path):
    model, tok = llama
    data = toy_data()
    prompt = M.init_prompt(spec_for("prompt"), model, tok, seed=0)
    train(model, tok, prompt, TASK, data[:80], None, cfg(steps=6), tmp_path / "one")
    adapter = Adapter.load(tmp_path / "one" / "adapter")
    again = prompt_from_adapter(adapter)
    before = evaluate(model, tok, again, TASK, _enc(tok, data[:80]))[1]
    res = train(model, tok, again, TASK, data[:80], None, cfg(steps=10, lr=0.05, warmup=0), tmp_path / "two")
    assert res.step == 10
    after = evaluate(model, tok, again, TASK, _enc(tok, data[:80]))[1]
    ce = lambda s: float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(80), [d["label"] for d in data[:80]]]))  # noqa: E731
    assert ce(after) < ce(before)


def _enc(tok, data):
    from lrpt.data import encode_examples
    from lrpt.tokens import target_tokenize_fn, tokenize_fn

    return encode_examples(TASK, tokenize_fn(tok), data, target_tokenize_fn(tok))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(llama, tmp_path, monkeypatch):
    from lrpt.backends.torch.train import TorchOps

    model, tok = llama
    data = toy_data(48)
    prompt = M.init_prompt(spec_for("lopt1"), model, tok)
    real = TorchOps.step

    def poisoned(self, batches, lr):
        loss = real(self, batches, lr)
        if self.opt.state and next(iter(self.opt.state.values()))["step"] >= 5:
            with torch.no_grad():
                self.prompt.lopt.U.fill_(float("nan"))
        return loss

    monkeypatch.setattr(TorchOps, "step", poisoned)
    with pytest.raises(TrainingError, match="last good checkpoint is .*step-000004"):
        train(model, tok, prompt, TASK, data, None, cfg(steps=12, save_every=4, log_every=1), tmp_path / "r")
    Adapter.load(tmp_path / "r" / "checkpoints" / "step-000004" / "adapter")  # intact and finite


def test_keep_best_and_early_stopping(llama, tmp_path):
    model, tok = llama
    data = toy_data()
    prompt = M.init_prompt(spec_for("lopt1"), model, tok)
    res = train(
        model,
        tok,
        prompt,
        TASK,
        data[:80],
        data[80:],
        cfg(steps=40, lr=1e-6, eval_every=2, early_stopping=2),
        tmp_path / "r",
    )
    assert res.stopped_early and res.step < 40
    assert res.best_step is not None and Adapter.load(tmp_path / "r" / "adapter")


def test_completion_task_trains_on_targets(llama, tmp_path):
    model, tok = llama
    task = Task("echo", kind="completion", template="Q: {prompt}\nA:")
    data = [{"prompt": s, "completion": " " + s.split()[0]} for s in sentences(48, seed=2)]
    prompt = M.init_prompt(spec_for("lopt1"), model, tok)
    res = train(model, tok, prompt, task, data[:40], data[40:], cfg(steps=12, lr=0.1), tmp_path / "r")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < losses[0] and "eval_loss" in res.history[-1]
