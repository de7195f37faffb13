"""Fixed batch shapes for compiled steps (lrpt.shapes): the ladder, exactness of padded batches, and
the rule that decides whether a run compiles."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lrpt.shapes import (
    AUTO_MIN_STEPS_BLOCKS,
    AUTO_MIN_STEPS_PER_GRAPH,
    AUTO_MIN_STEPS_PER_SHAPE,
    Shape,
    ShapePlan,
    bucket,
    choose_compile,
    ladder,
)
from lrpt.trainer import TrainConfig, run_micro_batches


def test_ladder_is_bounded_geometric_and_ends_at_the_longest_need():
    rungs = ladder(26, 95, 8)
    assert rungs == [32, 48, 72, 96]
    assert all(r % 8 == 0 for r in rungs) and all(b >= 1.5 * a for a, b in zip(rungs, rungs[1:-1]))
    assert ladder(5, 5, 8) == [8]
    assert len(ladder(1, 8192, 8)) <= 20  # a few shapes even for a huge spread of lengths
    assert bucket(33, rungs) == 48 and bucket(32, rungs) == 32
    with pytest.raises(ValueError):
        bucket(97, rungs)


def test_plan_gives_every_micro_batch_of_a_run_one_of_few_shapes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 80, 1000).tolist()
    config = TrainConfig(batch_size=32, epochs=2)
    plan = ShapePlan(lengths, 20, 32, 8)
    counts = plan.count(run_micro_batches(lengths, config))
    assert sum(counts.values()) == 2 * 32  # ceil(1000 / 32) micro-batches per epoch
    assert len(counts) <= len(plan.widths) <= 5
    for idx in run_micro_batches(lengths, config):
        shape = plan.shape(idx)
        assert shape.rows == 32 and shape.tokens >= max(lengths[i] for i in idx)


def test_choose_compile_rule():
    few, many = Counter({Shape(32, 40): 100, Shape(32, 60): 100}), Counter({Shape(32, 40): AUTO_MIN_STEPS_PER_SHAPE})
    assert AUTO_MIN_STEPS_PER_SHAPE >= AUTO_MIN_STEPS_BLOCKS  # a shape compiled whole costs at least the blocks
    short = Counter({Shape(32, 40): AUTO_MIN_STEPS_BLOCKS // 2, Shape(32, 60): AUTO_MIN_STEPS_BLOCKS // 2 - 1})
    assert not choose_compile(None, None, "torch", "cpu", False, many).compiled
    assert not choose_compile(None, None, "mlx", "gpu", False, many).compiled
    # blocks (the default scope): one compilation for the run, so the run's steps count
    spread = Counter({Shape(32, w): AUTO_MIN_STEPS_BLOCKS // 4 for w in (40, 48, 56, 64)})
    assert choose_compile(None, None, "torch", "cuda", False, spread).compiled
    assert not choose_compile(None, None, "torch", "cuda", False, short).compiled
    blocks = choose_compile(None, None, "torch", "cuda", False, Counter({Shape(32, 40): AUTO_MIN_STEPS_BLOCKS}))
    assert blocks.compiled and blocks.scope == "blocks" and "(blocks, reduce-overhead)" in blocks.line()
    # step: each shape compiled, so the steps per shape count
    assert not choose_compile(None, None, "torch", "cuda", False, few, "step").compiled
    assert not choose_compile(None, None, "torch", "cuda", False, spread, "step").compiled  # 500 a shape: 2,000 steps, 4 compilations
    auto = choose_compile(None, None, "torch", "cuda", False, many, "step")
    assert auto.compiled and auto.mode == "reduce-overhead" and "per shape" in auto.line() and auto.scope == "step"
    assert choose_compile(None, "default", "torch", "cuda", False, many).mode == "default"
    assert not choose_compile(None, None, "torch", "cuda", True, many).compiled  # fsdp: not measured
    lopa = choose_compile(None, None, "torch", "cuda", False, many, encoder_runs_blocks=True)
    assert not lopa.compiled and "LoPA" in lopa.reason  # its encoder runs the blocks: not measured
    assert choose_compile(True, None, "torch", "cuda", False, many, encoder_runs_blocks=True).compiled
    forced = choose_compile(True, None, "torch", "cpu", False, few)
    assert forced.compiled and forced.mode is None and "--compile" in forced.reason and forced.scope == "blocks"
    assert choose_compile(True, None, "mlx", "cpu", False, few).scope == "step"  # mx.compile: the whole step
    assert not choose_compile(False, "reduce-overhead", "torch", "cuda", False, many).compiled
    for choice in (auto, forced, blocks):
        assert "\n" not in choice.line()


def test_choose_compile_records_cuda_graphs_where_the_step_can_be_recorded():
    """A step with no dropout on one CUDA process is recorded (scope graphs) once each shape gets
    AUTO_MIN_STEPS_PER_GRAPH micro-steps; asking for a torch.compile mode, FSDP, several processes or
    a step that cannot be recorded keep the torch.compile rules."""
    enough = Counter({Shape(32, w): AUTO_MIN_STEPS_PER_GRAPH for w in (40, 48)})
    thin = Counter({Shape(32, 40): AUTO_MIN_STEPS_PER_GRAPH, Shape(32, 48): AUTO_MIN_STEPS_PER_GRAPH - 2})
    graphs = choose_compile(None, None, "torch", "cuda", False, enough, capturable=True)
    assert graphs.compiled and graphs.scope == "graphs" and graphs.mode is None
    assert graphs.line().startswith("training step: CUDA graphs") and "per shape" in graphs.reason
    below = choose_compile(None, None, "torch", "cuda", False, thin, capturable=True)
    assert not below.compiled and f"{AUTO_MIN_STEPS_PER_GRAPH} per shape" in below.reason
    assert choose_compile(None, None, "torch", "cuda", False, enough, "graphs", capturable=True).scope == "graphs"
    # the same run where graphs do not apply: the blocks rule, which 20 steps do not repay
    for kw in (dict(capturable=False), dict(capturable=True, processes=2)):
        assert not choose_compile(None, None, "torch", "cuda", False, enough, **kw).compiled
    assert not choose_compile(None, None, "torch", "cuda", True, enough, capturable=True).compiled  # fsdp
    assert not choose_compile(None, None, "torch", "cpu", False, enough, capturable=True).compiled
    assert choose_compile(None, "default", "torch", "cuda", False, enough, capturable=True).scope != "graphs"
    # --compile with no scope: graphs where they apply, blocks elsewhere; lopa's base encoder is no obstacle
    assert choose_compile(True, None, "torch", "cuda", False, thin, capturable=True).scope == "graphs"
    assert choose_compile(True, None, "torch", "cpu", False, thin, capturable=True).scope == "blocks"
    assert choose_compile(True, None, "torch", "cuda", False, thin, capturable=True, processes=2).scope == "blocks"
    lopa = choose_compile(None, None, "torch", "cuda", False, enough, encoder_runs_blocks=True, capturable=True)
    assert lopa.compiled and lopa.scope == "graphs"


def test_graphs_scope_refuses_what_it_cannot_record():
    from lrpt.errors import TrainingError

    with pytest.raises(TrainingError, match="--compile-mode is torch.compile's"):
        TrainConfig(compile=True, compile_scope="graphs", compile_mode="reduce-overhead").validate()
    pytest.importorskip("torch")
    import torch

    from lrpt.backends.torch.graphs import refusal

    assert "on cpu: drop it" in refusal(torch.device("cpu"), False, False)
    assert "--dropout 0" in refusal(torch.device("cuda"), True, False)
    assert "--fsdp" in refusal(torch.device("cuda"), False, True)
    assert refusal(torch.device("cuda"), False, False) is None


# -- padded batches give the unpadded loss and gradients (torch, fp32, CPU) -----------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    from lrpt.backends import get_backend

    return get_backend("torch").load_model(tiny_dirs["llama"], device="cpu")


def _training(llama, method: str, task, rows: list[dict], **config):
    from tiny import spec_for

    from lrpt.backends import get_backend
    from lrpt.data import encode_examples
    from lrpt.tokens import target_tokenize_fn, tokenize_fn
    from lrpt.training import Training

    be = get_backend("torch")
    model, tok = llama
    prompt = be.init_prompt(spec_for(method, dropout=0.0), model, tok, seed=0)
    data = encode_examples(task, tokenize_fn(tok), rows, target_tokenize_fn(tok))
    cfg = TrainConfig(**{"batch_size": 8, "progress": False, **config})
    return Training(be, model, tok, prompt, task, data, None, cfg), data


def _loss_and_grads(ops, rows, shape=None):
    for p in ops.prompt.parameters():
        p.grad = None
    loss = ops.loss(ops.prepare(rows, shape))
    loss.backward()
    return float(loss.detach()), [p.grad.detach().clone() for p in ops.prompt.parameters() if p.requires_grad]


def _tasks():
    from tiny import toy_task

    from lrpt import Task

    multi = Task("multi", template="Review: {text}\nSentiment:", label_words=[" bad plot", " very good"])
    completion = Task("gen", kind="completion", template="{prompt}")
    return {"single-token labels": toy_task(), "multi-token labels": multi, "completion": completion}


@pytest.mark.parametrize("kind", ["single-token labels", "multi-token labels", "completion"])
@pytest.mark.parametrize("method", ["lopt1", "lopa"])
def test_padded_batch_has_the_loss_and_gradients_of_the_unpadded_one(llama, kind, method):
    from tiny import sentences, toy_data

    task = _tasks()[kind]
    if task.kind == "completion":
        rows = [{"prompt": a, "completion": " " + b} for a, b in zip(sentences(5, seed=3), sentences(5, seed=4))]
    else:
        rows = toy_data(5, seed=2)
    ops, data = _training(llama, method, task, rows)
    plain_loss, plain_grads = _loss_and_grads(ops, data)
    longest = max(ops.lengths)
    targets = max(len(e.target) for e in data) + 3 if task.kind == "completion" else 0
    shape = Shape(rows=8, tokens=longest + 11, targets=targets)  # 3 copied rows, wider than needed
    padded = ops.prepare(data, shape)
    width = padded["in_token_ids"].shape
    assert width == (8, longest + 11) or task.kind == "completion"
    padded_loss, padded_grads = _loss_and_grads(ops, data, shape)
    assert padded_loss == pytest.approx(plain_loss, abs=1e-6, rel=1e-5)
    for a, b in zip(plain_grads, padded_grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_a_compiled_run_pads_every_micro_batch_to_the_plan(llama):
    """With compilation on, each micro-batch (the last, short one too) has its bucket's shape."""
    from tiny import toy_data, toy_task

    ops, data = _training(llama, "lopt1", toy_task(), toy_data(21, seed=2), steps=3)
    ops.compile_choice = choose_compile(True, None, "torch", "cpu", False, Counter())  # shapes only, no compile
    seen = []
    ops.prepare = lambda rows, shape=None: seen.append((len(rows), shape)) or {}
    ops.stepper.step = lambda batches, weights, lr, seed: None
    for idx in run_micro_batches(ops.lengths, ops.config):
        ops.step([idx], 0.1)
    assert sorted(n for n, _ in seen) == [5, 8, 8]
    assert all(shape is not None and shape.rows == 8 for _, shape in seen)
    assert {s.tokens + ops.prompt.spec.n_tokens for _, s in seen} <= set(ops.shapes.widths)


def test_train_says_how_the_step_runs(llama):
    from tiny import spec_for, toy_data, toy_task

    from lrpt.backends import get_backend

    model, tok = llama
    be = get_backend("torch")
    prompt = be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    lines: list[str] = []
    result = be.train(model, tok, prompt, toy_task(), toy_data(16), None,
                      TrainConfig(steps=1, batch_size=8, progress=False), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("training step: eager: auto: on cpu,")
    assert result.compile_choice.startswith("eager")


def test_compile_flag_is_on_off_or_auto():
    import argparse

    from lrpt import flags
    from lrpt.errors import LrptError

    def parse(argv, config):
        parser = argparse.ArgumentParser()
        defaults = flags.add_flags(parser, TrainConfig)
        args = parser.parse_args(argv)
        flags.resolve(args, defaults, config, "run.yaml", {a.dest: a for a in parser._actions})
        return flags.build(TrainConfig, args).compile

    assert parse([], {}) is None and parse(["--compile"], {}) is True and parse(["--no-compile"], {}) is False
    assert parse([], {"compile": "auto"}) is None and parse([], {"compile": True}) is True
    assert parse(["--no-compile"], {"compile": True}) is False  # typed flags win
    with pytest.raises(LrptError, match="compile must be true, false or auto"):
        parse([], {"compile": "maybe"})
    with pytest.raises(LrptError, match="keep_best must be true or false"):
        parse([], {"keep_best": "auto"})


def test_compiled_blocks_compile_once_for_every_block_and_width(llama):
    """--compile-scope blocks (the default): one dynamic-shape compilation serves all blocks and
    every batch width, and the step trains as the eager one does; evaluation stays eager."""
    from tiny import spec_for, toy_data, toy_task
    from torch._dynamo.utils import counters

    from lrpt.backends import get_backend

    model, tok = llama
    be = get_backend("torch")
    data = toy_data(40, seed=3)
    out = {}
    for compile_ in (False, True):
        torch._dynamo.reset()
        counters.clear()
        prompt = be.init_prompt(spec_for("lopt1"), model, tok, seed=0)
        res = be.train(model, tok, prompt, toy_task(), data, data[:8], TrainConfig(
            steps=5, batch_size=8, compile=compile_, pad_to_multiple=4, progress=False))
        out[compile_] = (res.final_loss, prompt.to_params(), counters["stats"]["unique_graphs"])
        assert all(b._compiled_call_impl is None for b in model.model.layers)  # eager again after the step
    assert len(model.model.layers) > 1 and out[True][2] == 1 and out[False][2] == 0
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-4)
    for k in out[False][1]:
        np.testing.assert_allclose(out[True][1][k], out[False][1][k], atol=1e-4)
