"""The GPU half of the suite (`make test-gpu`): the same product on a real CUDA device.

CI has no GPU, so these tests skip there; they run on the GPU machine before any backend change
lands, and the last run is recorded in benchmarks/RESULTS.md ("GPU test suite"). SmolLM2 tests run
when $LRPT_SMOLLM2 names an HF folder of it (made with `lrpt convert-model`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

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

from lrpt import Adapter  # noqa: E402

TRAIN = ["--task", "demo", "--method", "lopt1", "--tokens", "4", "--rank", "2", "--batch-size", "8",
         "--train-limit", "64", "--eval-limit", "16"]
BF16_ATOL = 0.15  # max |Δ log-prob| of a label score, bf16 CUDA vs fp32 CPU (tiny random models)


def lrpt(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lrpt.cli", *map(str, args)], capture_output=True, text=True, **kw)


def ok(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def tb():
    from lrpt.backends import get_backend

    return get_backend("torch")


def _adapter(method, seed=3, dim=32):
    return Adapter.create(spec_for(method), dim, seed=seed)


# -- the CLI end to end on CUDA ---------------------------------------------------------------------


def test_cli_train_eval_generate_init_from_resume_convert(tiny_dirs, tmp_path):
    model = tiny_dirs["llama"]
    run = tmp_path / "run"
    r = ok(lrpt("train", "--backend", "torch", "--model", model, *TRAIN, "--steps", 6, "--eval-every", 3, "--out", run))
    assert "best validation accuracy" in r.stdout
    assert json.loads((run / "train_config.json").read_text())["backend"] == "torch"
    ev = json.loads(ok(lrpt("eval", "--backend", "torch", "--model", model, "--adapter", run / "adapter",
                            "--limit", 16, "--json")).stdout)
    assert ev["examples"] == 16 and 0 <= ev["accuracy"] <= 1
    gen = json.loads(ok(lrpt("generate", "--backend", "torch", "--model", model, "--adapter", run / "adapter",
                             "--max-tokens", 4, "--json", "the plot was fun")).stdout)
    assert len(gen) == 1 and isinstance(gen[0]["output"], str)
    ok(lrpt("train", "--backend", "torch", "--model", model, "--init-from", run / "adapter", "--train-limit", 32,
            "--eval-limit", 0, "--steps", 2, "--out", tmp_path / "cont"))
    ok(lrpt("convert", run / "adapter", tmp_path / "peft", "--to", "peft", "--method", "prompt"))


def test_cli_kill_and_resume_on_cuda(tiny_dirs, tmp_path):
    """kill -9 after the first checkpoint, then --resume: the run finishes with every step logged once."""
    model, run = tiny_dirs["llama"], tmp_path / "run"
    args = ["train", "--backend", "torch", "--model", model, *TRAIN, "--steps", 400, "--save-every", 5,
            "--eval-limit", 0, "--out", run]
    proc = subprocess.Popen([sys.executable, "-m", "lrpt.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob("step-*")), "no checkpoint appeared"
    ok(lrpt(*args, "--resume"))
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert steps[-1] == 400 and len(steps) == len(set(steps))


# -- numerics: CUDA vs CPU ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_fp32_cuda_scores_equal_cpu(tiny_dirs, tb, method):
    adapter = _adapter(method)
    texts = [toy_task().format(r) for r in toy_data(24)]
    words = toy_task().label_words
    out = {}
    for dev in ("cpu", "cuda"):
        model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device=dev, quiet=True)
        out[dev] = tb.score_labels(model, tok, tb.prompt_from_adapter(adapter, model), texts, words)
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=0, atol=1e-4)


def test_bf16_cuda_scores_within_tolerance(tiny_dirs, tb):
    adapter = _adapter("lopt1")
    texts = [toy_task().format(r) for r in toy_data(64)]
    words = toy_task().label_words
    cpu_model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cpu", quiet=True)
    gpu_model, _ = tb.load_model(tiny_dirs["llama"], device="cuda", quiet=True)  # bf16 by default on CUDA
    assert gpu_model.dtype == torch.bfloat16
    ref = tb.score_labels(cpu_model, tok, tb.prompt_from_adapter(adapter, cpu_model), texts, words)
    for shared in (False, True):  # the plain path and the shared prompt prefix (lrpt.prefix)
        got = tb.score_labels(gpu_model, tok, tb.prompt_from_adapter(adapter, gpu_model), texts, words,
                              shared_prefix=shared)
        assert np.abs(got - ref).max() <= BF16_ATOL


def shared_vs_plain(tb, model, tok, kind: str) -> dict[bool, tuple[float, list[np.ndarray]]]:
    """The training loss of one batch and its gradients, by path (shared prompt prefix or plain)."""
    from lrpt import Task
    from lrpt.data import encode_examples
    from lrpt.tokens import target_tokenize_fn, tokenize_fn
    from lrpt.trainer import TrainConfig
    from lrpt.training import Training

    if kind == "classification":
        task, rows = toy_task(), toy_data(16)
    else:
        task = Task("echo", kind="completion", template="Q: {prompt}\nA:")
        rows = [{"prompt": s, "completion": " " + s.split()[0]} for s in sentences(16, seed=2)]
    data = encode_examples(task, tokenize_fn(tok), rows, target_tokenize_fn(tok))
    out = {}
    for shared in (False, True):
        prompt = tb.prompt_from_adapter(_adapter("lopt1"), model)
        ops = Training(tb, model, tok, prompt, task, data, None, TrainConfig(shared_prefix=shared))
        loss = ops.loss(ops.prepare(data[:8]))
        loss.backward()
        out[shared] = (float(loss), [p.grad.detach().cpu().numpy() for p in prompt.parameters()])
    return out


@pytest.mark.parametrize("kind", ["classification", "completion"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_loss_and_gradients_equal_the_plain_path_on_cuda(tiny_dirs, tb, arch, kind):
    """fp32 on CUDA: the prompt run once per batch gives the plain path's loss, and its gradients within
    1e-5 absolute, relative for elements above 1 (cuBLAS's other summation order for the other shapes
    moved phi3's gradients, of magnitude up to 12, by up to 1.4e-5; a per-tensor relative bound failed
    qwen2's, of norm 0.04, by 4.5e-7)."""
    model, tok = tb.load_model(tiny_dirs[arch], dtype="float32", device="cuda", quiet=True)
    out = shared_vs_plain(tb, model, tok, kind)
    assert abs(out[True][0] - out[False][0]) <= 1e-5
    for a, b in zip(out[True][1], out[False][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["classification", "completion"])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3"])  # gemma3: not packable, two passes
def test_packed_prefix_loss_and_gradients_equal_the_two_passes_on_cuda(tiny_dirs, tb, arch, kind):
    """fp32 on CUDA, eagerly: the shared prefix packed with the rows (the default of a step compiled
    whole) gives the two-pass path's loss, and its gradients within 1e-5 (relative above 1), and
    runs as one pass of n + B·T; with the test above, the plain path's."""
    model, tok = tb.load_model(tiny_dirs[arch], dtype="float32", device="cuda", quiet=True)
    n = 5
    out, widths = packed_vs_two_passes(tb, model, tok, kind, n)
    (b, w), packed_width = widths[1], widths[-1]
    assert len(widths) == 3 and packed_width == (1, n + b * w)
    assert abs(out[0][0] - out[1][0]) <= 1e-5
    for k, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], g, rtol=1e-5, atol=1e-5)


def test_python_api_moves_a_cpu_prompt_to_the_model(tiny_dirs, tb):
    """A prompt built on the CPU (no device given) still works with a CUDA model."""
    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    prompt = tb.prompt_from_adapter(_adapter("lopa"))  # on the CPU
    scores = tb.score_labels(model, tok, prompt, TEXTS, [" bad", " good"])
    assert np.isfinite(scores).all()
    assert tb.generate(model, tok, prompt, TEXTS[:1], max_tokens=3)


def test_mixed_adapters_in_one_batch_on_cuda(tiny_dirs, tb):
    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    prompts = [tb.prompt_from_adapter(_adapter(m, seed=i), model) for i, m in enumerate(METHODS)]
    which = [i % len(prompts) for i in range(8)]
    texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
    mixed = tb.score_labels(model, tok, prompts, texts, [" bad", " good"], which=which)
    alone = np.concatenate([tb.score_labels(model, tok, prompts[w], [t], [" bad", " good"])
                            for t, w in zip(texts, which)])
    np.testing.assert_allclose(mixed, alone, rtol=0, atol=1e-4)
    gen_mixed = tb.generate(model, tok, prompts, texts, max_tokens=6, which=which)
    gen_alone = [tb.generate(model, tok, prompts[w], [t], max_tokens=6)[0] for t, w in zip(texts, which)]
    assert gen_mixed == gen_alone


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
def test_generation_batched_equals_one_by_one_on_cuda(tiny_dirs, tb, method):
    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    prompt = tb.prompt_from_adapter(_adapter(method), model)
    batched = tb.generate(model, tok, prompt, TEXTS, max_tokens=12)
    assert batched == [tb.generate(model, tok, prompt, [t], max_tokens=12)[0] for t in TEXTS]


# -- compiled vs eager ------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["blocks", "step"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_loss_and_gradients_match_eager(tiny_dirs, tb, mode, shared, scope):
    from lrpt.data import encode_examples
    from lrpt.tokens import tokenize_fn
    from lrpt.trainer import TrainConfig
    from lrpt.training import Training

    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    task = toy_task()
    data = encode_examples(task, tokenize_fn(tok), toy_data(16))
    grads = {}
    for compiled in (False, True):
        prompt = tb.prompt_from_adapter(_adapter("lopt1"), model)
        ops = Training(tb, model, tok, prompt, task, data, None,
                       TrainConfig(compile=compiled, compile_mode=mode, shared_prefix=shared, compile_scope=scope))
        # Compiled whole, the shared prefix runs packed with the rows (lrpt.backends.torch.packed).
        assert ops.stepper.packs == (compiled and shared and scope == "step")
        for _ in range(3 if compiled else 1):  # compiled: warm up (CUDA graphs record on later calls)
            prompt.zero_grad(set_to_none=True)
            loss = ops.stepper.loss(ops.prepare(data[:8]))  # the Stepper's (compiled) loss
            loss.backward()
        grads[compiled] = (float(loss), [p.grad.detach().clone() for p in prompt.parameters()])
    assert abs(grads[True][0] - grads[False][0]) <= 1e-4 * max(1.0, abs(grads[False][0]))
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_step_compiled_whole_is_one_cuda_graph_compiled_once(tiny_dirs, tb, monkeypatch):
    """The shared-prefix step compiled whole (reduce-overhead; the prefix packed with the rows) is one
    graph, compiled once per shape, its CUDA graphs not skipped: on torch 2.11 an import statement traced in the step (transformers'
    lazy module) was a graph break, and a memo written under tracing made the first shape compile twice."""
    from torch._dynamo.utils import counters

    from lrpt.backends.torch import model as torch_model
    from lrpt.trainer import TrainConfig

    monkeypatch.setattr(torch_model, "_CACHE_KWARG", {})  # as in a fresh process
    model, tok = tb.load_model(tiny_dirs["llama"], dtype="bfloat16", device="cuda", quiet=True)
    prompt = tb.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            res = tb.train(model, tok, prompt, toy_task(), toy_data(48), None, TrainConfig(
                steps=4, batch_size=8, compile=True, compile_scope="step", compile_mode="reduce-overhead",
                shared_prefix=True, pad_to_multiple=64, progress=False))
        breaks, skips = dict(counters["graph_break"]), counters["inductor"]["cudagraph_skips"]
    finally:
        torch._dynamo.reset()
    assert "shared prefix, packed with the rows" in res.compile_choice and np.isfinite(res.final_loss)
    assert not breaks and not skips


@pytest.mark.parametrize("scope", ["blocks", "step"])
def test_compiled_training_over_many_widths_equals_eager(tiny_dirs, tb, scope):
    """A whole compiled run with CUDA graphs over rows of many lengths (several bucket widths, the
    short last batch too) ends where the eager run ends, and evaluation after it stays right."""
    from lrpt.trainer import TrainConfig

    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    rows = toy_data(90, seed=5)
    out = {}
    for compiled in (False, True):
        prompt = tb.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = tb.train(model, tok, prompt, toy_task(), rows, rows[:16], TrainConfig(
            steps=14, batch_size=8, compile=compiled, compile_mode="reduce-overhead", compile_scope=scope,
            pad_to_multiple=4, progress=False, eval_every=7))
        out[compiled] = (res.final_loss, res.best_metric, prompt.to_params())
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-4) and out[True][1] == out[False][1]
    for k in out[False][2]:
        np.testing.assert_allclose(out[True][2][k], out[False][2][k], atol=1e-4)


# -- CUDA graphs (--compile-scope graphs) ----------------------------------------------------------


@pytest.mark.parametrize("method,shared,accum,average", [
    ("lopt1", False, 1, 0.0), ("lopt1", True, 1, 0.0), ("lopt1", False, 2, 0.0), ("prompt", True, 2, 0.0),
    ("lopa", False, 1, 0.0), ("lopt1", False, 1, 0.5)])
def test_cuda_graph_training_over_many_widths_equals_eager(tiny_dirs, tb, method, shared, accum, average):
    """A whole run recorded as CUDA graphs (several bucket widths, the short last batch, gradient
    accumulation, evaluation between steps) ends where the eager run ends; LoPA without dropout
    records too (its encoder runs the model inside the graph); the tail average (--average) reads
    the graphs' parameters as it reads eager ones."""
    from dataclasses import replace

    from lrpt.trainer import TrainConfig

    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    rows = toy_data(90, seed=5)
    spec = replace(spec_for(method), dropout=0.0) if method == "lopa" else spec_for(method)
    out = {}
    for compiled in (False, True):
        prompt = tb.init_prompt(spec, model, tok, seed=0)
        res = tb.train(model, tok, prompt, toy_task(), rows, rows[:16], TrainConfig(
            steps=14, batch_size=8, grad_accum=accum, compile=compiled, compile_scope="graphs", pad_to_multiple=4,
            progress=False, eval_every=7, shared_prefix=shared, average=average))
        assert ("CUDA graphs" in res.compile_choice) == compiled
        out[compiled] = (res.final_loss, res.best_metric, prompt.to_params())
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-4) and out[True][1] == out[False][1]
    for k in out[False][2]:
        np.testing.assert_allclose(out[True][2][k], out[False][2][k], atol=1e-4)


def test_cuda_graphs_are_auto_on_cuda_and_refuse_lopa_dropout(tiny_dirs, tb):
    """No flag: a run with enough steps per shape records graphs and says so; LoPA's dropout cannot be
    replayed, so auto leaves it to the other rules and an explicit request is one clear error; the lr
    probe, which resets the optimizer between candidates, picks what the eager probe picks."""
    from lrpt.errors import TrainingError
    from lrpt.trainer import TrainConfig

    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    rows = toy_data(200, seed=2)
    runs = {}
    for compile_ in (None, False):
        prompt = tb.init_prompt(spec_for("lopt1"), model, tok, seed=1)
        res = tb.train(model, tok, prompt, toy_task(), rows, None, TrainConfig(
            steps=40, batch_size=8, compile=compile_, progress=False, lr_probe=True, pad_to_multiple=4))
        runs[compile_] = res, prompt.to_params()
    assert runs[None][0].compile_choice.startswith("CUDA graphs") and "auto" in runs[None][0].compile_choice
    assert runs[None][0].lr_probe.lr == runs[False][0].lr_probe.lr
    for k, v in runs[False][1].items():
        np.testing.assert_allclose(runs[None][1][k], v, atol=1e-4)
    lopa = tb.init_prompt(spec_for("lopa"), model, tok, seed=0)
    res = tb.train(model, tok, lopa, toy_task(), rows, None, TrainConfig(steps=3, batch_size=8, progress=False))
    assert "CUDA graphs" not in res.compile_choice
    with pytest.raises(TrainingError, match="dropout"):
        tb.train(model, tok, lopa, toy_task(), rows, None,
                 TrainConfig(steps=3, batch_size=8, progress=False, compile=True, compile_scope="graphs"))
    assert not torch.are_deterministic_algorithms_enabled()  # the refused run left no switch on


MEMORY_SCRIPT = """
import gc, sys, torch
sys.path.insert(0, "tests")
from tiny import spec_for, toy_data, toy_task
from lrpt.backends import get_backend
from lrpt.backends.torch import graphs
from lrpt.trainer import TrainConfig
if sys.argv[2] == "fresh":  # the old recorder: a new side stream for every recording
    graphs.side_stream = lambda device: torch.cuda.Stream(device)
tb = get_backend("torch")
model, tok = tb.load_model(sys.argv[1], dtype="float32", device="cuda", quiet=True)
for seed in range(4):
    prompt = tb.init_prompt(spec_for("lopt1"), model, tok, seed=seed)
    res = tb.train(model, tok, prompt, toy_task(), toy_data(90, seed=seed), None, TrainConfig(
        steps=12, batch_size=8, compile=True, compile_scope="graphs", pad_to_multiple=4, progress=False))
    assert "CUDA graphs" in res.compile_choice
    del prompt, res
    gc.collect()
    print(torch.cuda.memory_allocated(), flush=True)
"""


def test_cuda_graph_runs_leave_no_memory_behind(tiny_dirs):
    """Four CUDA-graph training runs in one fresh process: what stays allocated after the first stays
    the same (each run records several shapes; a new side stream per recording used to leave a cuBLAS
    workspace behind every time)."""
    r = ok(subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tiny_dirs["llama"]), "one"],
                          capture_output=True, text=True))
    after = [int(line) for line in r.stdout.split()]
    assert len(after) == 4 and max(after) - after[0] <= 2**20, after


# -- determinism on long rows (--deterministic, the default) -----------------------------------------


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
def test_long_rows_train_to_the_same_bits_twice_and_resume_exactly_on_cuda(tmp_path, tb, method):
    """bf16 rows of 150-300 tokens, where the attention backward, left to itself, adds the parts of a
    long row's query gradient in the order its thread blocks finish: eager and as CUDA graphs, two runs
    of one seed end with bitwise the same prompt, a run killed after its step-4 checkpoint and resumed
    ends where the unbroken run ends, and torch's deterministic mode is off again after each run."""
    from dataclasses import replace

    from lrpt.trainer import TrainConfig

    folder = save_tiny("llama", tmp_path / "m", max_position_embeddings=1024)
    model, tok = tb.load_model(folder, dtype="bfloat16", device="cuda", quiet=True)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(sentences(40, seed=3, length=(150, 300)))]
    spec = replace(spec_for(method), dropout=0.0) if method == "lopa" else spec_for(method)
    for graphs in (False, True) if method == "lopt1" else (False,):
        cfg = TrainConfig(steps=8, batch_size=8, lr=0.05, save_every=4, compile=graphs, compile_scope="graphs",
                          progress=False)
        ends = []
        for run in ("a", "b", "c"):
            prompt = tb.init_prompt(spec, model, tok, seed=0)
            if run == "c":
                with pytest.raises(Crash), crash_after_checkpoint(4):
                    tb.train(model, tok, prompt, toy_task(), rows, None, cfg, tmp_path / f"{graphs}{run}")
                prompt = tb.init_prompt(spec, model, tok, seed=99)  # resuming overwrites it
            tb.train(model, tok, prompt, toy_task(), rows, None, cfg, tmp_path / f"{graphs}{run}", resume=run == "c")
            assert not torch.are_deterministic_algorithms_enabled()
            ends.append(prompt.to_params())
        for k in ends[0]:
            assert np.array_equal(ends[0][k], ends[1][k]), (graphs, k, "two runs")
            assert np.array_equal(ends[0][k], ends[2][k]), (graphs, k, "resumed")


@pytest.mark.parametrize("graphs", [False, True])
def test_a_collapsed_run_retries_and_ends_as_a_run_at_the_lower_lr_on_cuda(tiny_dirs, tb, monkeypatch, graphs):
    """lrpt.retry on CUDA, eager and as CUDA graphs: training rows of one label (no prompt beats the
    majority label there) make the run train once more from its start at lr/3, resetting the
    optimizer state the graphs replay in place; it ends bitwise where a run given lr/3 ends."""
    import lrpt.trainer as T
    from lrpt.retry import LR_FACTOR
    from lrpt.trainer import TrainConfig

    monkeypatch.setattr(T, "MIN_STEPS", 6)
    model, tok = tb.load_model(tiny_dirs["llama"], dtype="float32", device="cuda", quiet=True)
    rows = [dict(r, label=1) for r in toy_data(40, seed=5)]
    ends = {}
    for lr, retry in ((0.05, True), (0.05 * LR_FACTOR, False)):
        prompt = tb.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = tb.train(model, tok, prompt, toy_task(), rows, None, TrainConfig(
            steps=6, batch_size=8, lr=lr, compile=graphs, compile_scope="graphs", progress=False,
            retry_collapsed=retry))
        assert ("CUDA graphs" in res.compile_choice) == graphs and bool(res.retried) == retry
        assert res.step == (12 if retry else 6)
        ends[retry] = prompt.to_params()
    for k in ends[True]:
        assert np.array_equal(ends[True][k], ends[False][k]), k


# -- the real model ------------------------------------------------------------------------------------

SMOL = os.environ.get("LRPT_SMOLLM2")
needs_smol = pytest.mark.skipif(not (SMOL and Path(SMOL, "config.json").is_file()), reason="set LRPT_SMOLLM2")


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smol") / "run"
    ok(lrpt("train", "--backend", "torch", "--model", SMOL, "--task", "demo", "--steps", 40, "--batch-size", 16,
            "--train-limit", 640, "--eval-limit", 64, "--out", run))
    return run


@needs_smol
def test_smollm2_cli_end_to_end(smol_run, tmp_path):
    ev = json.loads(ok(lrpt("eval", "--backend", "torch", "--model", SMOL, "--adapter", smol_run / "adapter",
                            "--limit", 64, "--json")).stdout)
    assert ev["examples"] == 64 and ev["accuracy"] >= 0.6
    ok(lrpt("generate", "--backend", "torch", "--model", SMOL, "--adapter", smol_run / "adapter", "--max-tokens", 8,
            "the plot was fun"))
    ok(lrpt("train", "--backend", "torch", "--model", SMOL, "--init-from", smol_run / "adapter", "--train-limit", 64,
            "--eval-limit", 0, "--steps", 2, "--out", tmp_path / "cont"))


@needs_smol
def test_smollm2_bf16_predictions_agree_with_fp32(smol_run, tb):
    """A trained adapter on the 400 demo validation rows: bf16 on CUDA and fp32 on CUDA predict the
    same label on >= 99% of rows (an untrained prompt has near-tie margins, where bf16 noise decides)."""
    from lrpt.demo_data import demo_rows

    adapter = Adapter.load(smol_run / "adapter")
    task = adapter.task
    texts = [task.format(r) for r in demo_rows("validation")]
    preds = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = tb.load_model(SMOL, dtype=dtype, device="cuda", quiet=True)
        preds[dtype] = tb.classify(model, tok, tb.prompt_from_adapter(adapter, model), texts, task.label_words)
    assert (preds["float32"] == preds["bfloat16"]).mean() >= 0.99


# -- several GPUs --------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_ddp_and_fsdp_on_two_gpus_train_the_adapter_one_gpu_trains(tiny_dirs, tmp_path):
    """NCCL data parallel, fp32: the same adapter as one GPU with the same global batch (1e-5 relative)."""
    args = ["train", "--backend", "torch", "--dtype", "float32", "--model", str(tiny_dirs["llama"]), "--task", "demo",
            "--tokens", "4", "--rank", "2", "--batch-size", "12", "--train-limit", "60", "--eval-limit", "10",
            "--steps", "6", "--lr", "0.02", "--schedule", "constant", "--warmup", "0", "--no-progress"]
    ok(lrpt(*args, "--out", tmp_path / "one"))
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):  # FSDP2: the blocks sharded over the two GPUs
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lrpt.cli",
                            *map(str, args), *extra, "--out", str(tmp_path / name)], capture_output=True, text=True)
        ok(r)
        a, b = (Adapter.load(tmp_path / d / "adapter") for d in ("one", name))
        for k in a.params:
            assert np.linalg.norm(a.params[k] - b.params[k]) <= 1e-5 * np.linalg.norm(a.params[k]), (name, k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_loading_never_holds_the_whole_model_on_a_gpu(tmp_path):
    """``lrpt train --fsdp`` loads into CPU memory and sends each GPU its share one block at a time:
    its peak is the non-block weights, its share of the blocks and at most one whole block more
    (12 blocks: loading whole would exceed that by 4.5 blocks)."""
    from tiny import save_tiny

    deep = save_tiny("llama", tmp_path / "deep", num_hidden_layers=12, hidden_size=256, intermediate_size=1024)
    r = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("fsdp_probe.py")), str(deep), "load"],
                          capture_output=True, text=True))
    got = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    assert got["device"].startswith("cuda") and got["local"] == pytest.approx(got["expected"], rel=0.02)
    assert got["peak"] <= got["expected"] + 1.5 * got["one_block"] < got["whole"]
    assert got["gathered_after_forward"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nodes_of_one_gpu_train_the_adapter_one_gpu_trains(tiny_dirs, tmp_path):
    """Multi-node torchrun emulated on one host: two launchers (``--nnodes 2``), each seeing one GPU as
    cuda:0 (LOCAL_RANK 0 on both), NCCL between them: the adapter of one GPU (1e-5 relative)."""
    args = ["train", "--backend", "torch", "--dtype", "float32", "--model", str(tiny_dirs["llama"]), "--task", "demo",
            "--tokens", "4", "--rank", "2", "--batch-size", "12", "--train-limit", "60", "--eval-limit", "10",
            "--steps", "6", "--lr", "0.02", "--schedule", "constant", "--warmup", "0", "--no-progress"]
    ok(lrpt(*args, "--out", tmp_path / "one"))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", "29541",
                               "-m", "lrpt.cli", *map(str, args), "--out", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}) for i in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-2000:]
    a, b = (Adapter.load(tmp_path / d / "adapter") for d in ("one", "two"))
    for k in a.params:
        assert np.linalg.norm(a.params[k] - b.params[k]) <= 1e-5 * np.linalg.norm(a.params[k]), k
