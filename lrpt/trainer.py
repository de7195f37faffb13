"""The training loop both backends share: schedule, evaluation, checkpoints, exact resume.

A backend supplies the framework work through :class:`TrainOps` (one optimizer step, an
evaluation, its state as arrays); everything else lives here once: which batches come
next, when to log, evaluate, checkpoint or stop, how a run directory looks, and how a run
resumes. A run directory holds::

    adapter/                 the adapter to use (best evaluation if keep_best, else last)
    checkpoints/step-NNNNNN/ adapter files + optimizer.safetensors + trainer_state.json
                             (+ best-adapter/: adapter/ as it was, under keep_best)
    metrics.jsonl            one JSON object per log or evaluation
    train_config.json        the TrainConfig of the run
    data_args.json           the CLI's data flags (lrpt train), checked on --resume

Checkpoints are complete directories built aside and renamed into place, so a crash
never leaves a half-written one; resuming from one continues bit for bit (on CPU).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .adapter import Adapter
from .average import TailAverage, split_state
from .data import epoch_batches, lr_factor
from .errors import BaseModelMismatchError, TrainingError
from .fileio import atomic_dir, atomic_write, atomic_write_json, encode_safetensors, read_safetensors
from .flags import knob
from .retry import LR_FACTOR, MIN_STEPS, split_initial
from .retry import SUFFIX as INITIAL_SUFFIX

SCHEDULES = ("cosine", "linear", "constant")
COMPILE_SCOPES = ("blocks", "step", "graphs")
# Divergence guard: a finite loss can still mean a run that has blown up (``--lr 1e9`` gave prompt
# values of 7e18 and exit 0). Stop when a parameter grows this many times past its starting scale
# (at least 1), or the loss this many times past the first one logged (at least 1).
DIVERGED_PARAM_FACTOR = 1e4
DIVERGED_LOSS_FACTOR = 1e3
# With --epochs unset, a run is one pass over the data or, on small data, as many passes as make
# this many optimizer steps (CB's 250 rows are 16 steps at batch 16: too few to train a prompt).
# 200 -> 500 raised the mean of lopt1 and lopa (at their defaults) on 6 of their 8 four-task, 3-seed
# runs (benchmarks/RESULTS.md, "third grid"); 500 -> 1000 raised 6 of 8 again, TREC by 4-5 points and
# lopt1's RTE by 6, lowering only lopt1's CB (-3.0, within its seed spread) and SST-2 (-0.1)
# (RESULTS.md, "1,000 steps").
AUTO_MIN_STEPS = 1000
TRAIN_CONFIG_FILE = "train_config.json"  # the TrainConfig a run stores in its directory, for --resume


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 integer: bool = False, low_open: bool = False, error: type[Exception] = TrainingError) -> Any:
    """One clear error for a number out of range, NaN, infinite or of the wrong type; returns ``value``.

    ``name`` is shown with dashes, as the flag the user typed (``eval_every`` → ``--eval-every``).
    """
    flag = "--" + name.replace("_", "-")
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise error(f"{flag} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise error(f"{flag} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise error(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise error(f"{flag} must be <= {high:g}, got {value:g}")
    return value


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a run (the same on both backends)."""

    steps: int | None = knob(None, "optimizer steps (overrides --epochs); unset: auto, from --epochs")
    epochs: float | None = knob(None, "passes over the training data; unset: auto, one pass, or more on small data"
                                      " to make --min-steps optimizer steps")
    min_steps: int | None = knob(None, "the fewest optimizer steps of an auto-length run (no --steps or --epochs);"
                                       f" unset: auto, the method's (lrpt.spec.METHOD_DEFAULTS), else {AUTO_MIN_STEPS}")
    lr: float | None = knob(None, "peak learning rate of AdamW; unset: auto, the method's default"
                                  " (lrpt.spec.METHOD_DEFAULTS)")
    lr_probe: bool = knob(False, "before training, try the lr × 1/3, × 1 and × 3 for a few steps each and train"
                                 " with the one of lowest loss on held-out training rows (lrpt.probe; a new run"
                                 " only, not on --resume)")
    batch_size: int = knob(16, "rows per micro-batch")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    weight_decay: float = knob(0.0, "AdamW's decoupled weight decay")
    warmup: float = knob(0.06, "warmup: a fraction of the steps if < 1, else a number of steps")
    schedule: str = knob("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    max_grad_norm: float | None = knob(1.0, "clip the gradient norm to this ('none': no clipping)")
    eval_every: int = knob(0, "steps between evaluations (0: only at the end)")
    eval_batch_size: int = knob(32, "rows per evaluation batch")
    save_every: int = knob(0, "steps between checkpoints (0: at each evaluation and at the end)")
    keep_checkpoints: int = knob(2, "checkpoints kept in RUN/checkpoints")
    keep_best: bool = knob(True, "RUN/adapter is the best evaluation's (else the last step's)")
    early_stopping: int = knob(0, "evaluations without improvement before stopping (0: never)")
    average: float | None = knob(None, "end with the mean of the prompt's parameters over this final fraction of"
                                       " the steps (tail averaging, sampled at up to 50 steps; lrpt.average); 0:"
                                       " the last step's; unset: auto, the method's default"
                                       " (lrpt.spec.METHOD_DEFAULTS)")
    retry_collapsed: bool = knob(True, f"a classification run of at least {MIN_STEPS} steps that ends no better than"
                                       " the majority label on its training rows trains once more from its start"
                                       f" at the lr × {LR_FACTOR:.3g} (lrpt.retry)")
    log_every: int = knob(10, "steps between loss records in metrics.jsonl")
    seed: int = knob(0, "seed of the prompt's initialisation, data order and dropout")
    bucket: bool = knob(True, "batch rows of similar length together (less padding)")
    pad_to_multiple: int = knob(8, "pad batch widths to a multiple of this (fewer shapes to compile)")
    shared_prefix: bool | None = knob(None, "run a static prompt (prompt, lopt1, lopt2) once per batch and let every"
                                      " row attend to it: the same loss and gradients, less work where launches are"
                                      " free; unset: auto, on for a step compiled whole (--compile-scope step) and on"
                                      " CPU/MLX, off for an eager step on CUDA, for compiled blocks and for CUDA graphs"
                                      " (lrpt.prefix)")
    compile: bool | None = knob(None, "speed the step up in a few fixed batch shapes: recorded as CUDA graphs or"
                                      " compiled (torch, --compile-scope), mx.compile (MLX); unset: auto, on CUDA"
                                      " when the run repays it (lrpt.shapes)")
    compile_scope: str | None = knob(None, "what runs compiled: each transformer block under torch.compile (one"
                                     " compilation serves every block and width), the whole step under torch.compile"
                                     " (the fastest step, but each batch shape compiles every block), or graphs: the"
                                     " eager step recorded as one CUDA graph per batch shape, no compiler (CUDA only);"
                                     " unset: graphs where they apply, else blocks; torch only",
                                     choices=COMPILE_SCOPES)
    compile_mode: str | None = knob(None, "torch.compile mode, e.g. reduce-overhead (CUDA graphs; auto's choice);"
                                          " torch only")
    deterministic: bool = knob(True, "on CUDA, kernels that give the same bits every run, so a seed fixes the result"
                                     " and --resume continues bit for bit (torch.use_deterministic_algorithms; off:"
                                     " attention's backward sums long rows in a varying order); torch only")
    grad_checkpoint: bool = knob(False, "recompute layer activations in the backward pass; MLX only")
    fsdp: bool = knob(False, "shard the frozen model's blocks over the GPUs with FSDP2 (torch, under torchrun)")
    progress: bool = knob(True, "show a progress bar")

    def validate(self) -> TrainConfig:
        """Refuse impossible values before any work starts (the optimizer, built later, crashes on NaN)."""
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}: use {', '.join(SCHEDULES)}")
        if self.compile_scope is not None and self.compile_scope not in COMPILE_SCOPES:
            raise TrainingError(f"unknown compile scope {self.compile_scope!r}: use {', '.join(COMPILE_SCOPES)}")
        if self.compile_scope == "graphs" and self.compile_mode:
            raise TrainingError("--compile-mode is torch.compile's, and --compile-scope graphs records the eager step"
                                " without it: drop one of them")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "eval_batch_size",
                     "pad_to_multiple"):
            check_number(name, getattr(self, name), low=1, integer=True)
        for name in ("eval_every", "save_every", "early_stopping"):
            check_number(name, getattr(self, name), low=0, integer=True)
        for name in ("steps", "min_steps"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=1, integer=True)
        check_number("seed", self.seed, low=0, high=2**32 - 1, integer=True)
        if self.lr is not None:
            check_number("lr", self.lr, low=0, low_open=True)
        if self.epochs is not None:
            check_number("epochs", self.epochs, low=0, low_open=True, high=1e6)
        check_number("warmup", self.warmup, low=0, high=1e9)
        check_number("weight_decay", self.weight_decay, low=0)
        if self.average is not None:
            check_number("average", self.average, low=0, high=1)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        return self

    def for_method(self, method: str) -> TrainConfig:
        """This config with an unset ``lr``, ``average`` and ``min_steps`` filled by ``method``'s defaults
        (lrpt.spec.METHOD_DEFAULTS; ``average`` 0 and ``min_steps`` AUTO_MIN_STEPS where it names none)."""
        from .spec import METHOD_DEFAULTS

        mine = METHOD_DEFAULTS[method]
        return replace(self, lr=mine["lr"] if self.lr is None else self.lr,
                       average=mine.get("average", 0.0) if self.average is None else self.average,
                       min_steps=mine.get("min_steps", AUTO_MIN_STEPS) if self.min_steps is None else self.min_steps)


@dataclass
class TrainResult:
    step: int
    final_loss: float
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    adapter_dir: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0  # training inputs cut to fit the model's context
    compile_choice: str = ""  # how the step ran (eager or compiled) and why
    lr_probe: Any = None  # lrpt.probe.ProbeResult of a run that chose its lr (--lr-probe)
    averaged: str = ""  # what the tail average made of the final prompt (--average); "" for none
    retried: str = ""  # why the run trained a second time at a lower lr (--retry-collapsed); "" for not
    baseline: tuple[float, str] | None = None  # the metric and label word of always answering the evaluation rows'
    # most frequent label (classification with evaluation rows; lrpt.data.majority_baseline)


class TrainOps(Protocol):
    """What a backend provides to :func:`run_training`."""

    lengths: list[int]  # token count of each training example (for bucketing)

    def step(self, micro_batches: list[list[int]], lr: float) -> Any:
        """One optimizer step over ``grad_accum`` micro-batches; returns a lazy loss handle."""

    def loss_value(self, handles: list[Any]) -> float:
        """Mean loss over handles (the only host synchronisation of the loop)."""

    def evaluate(self) -> dict[str, float]:
        """Validation metrics; the key ``metric`` is the one keep-best and early stopping use."""

    def finite(self) -> bool:
        """True when every trainable tensor is finite."""

    def adapter(self) -> Adapter:
        """The current prompt as an adapter."""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Optimizer tensors (float32 arrays) and JSON-able state (optimizer scalars, RNG)."""

    def load_state(self, adapter: Adapter, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` and :meth:`adapter` captured."""

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """Set the prompt's tensors (canonical names, as ``adapter().params``), e.g. to a tail average."""

    def collapsed(self) -> str | None:
        """Why the prompt as it is now is no better than the majority label on training rows, or None."""

    def restart(self, params: dict[str, np.ndarray]) -> None:
        """The prompt set to ``params`` (as ``adapter().params``), a fresh optimizer, step 0."""


def plan(config: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) for a run."""
    per_epoch = math.ceil(n_examples / config.batch_size)
    if config.steps:
        total = config.steps
    elif config.epochs is None:  # auto: one pass, at least min_steps (the method's, else AUTO_MIN_STEPS)
        total = max(math.ceil(per_epoch / config.grad_accum), config.min_steps or AUTO_MIN_STEPS)
    else:
        total = max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))
    warmup = int(config.warmup * total) if config.warmup < 1 else int(config.warmup)
    return total, min(warmup, total)


def run_micro_batches(lengths: list[int], config: TrainConfig) -> Iterator[list[int]]:
    """Every micro-batch of a whole run, in order (what :func:`run_training` will step through):
    a compiled run reads it ahead to know its batch shapes."""
    total, _ = plan(config, len(lengths))
    cache: dict[int, list[list[int]]] = {}
    for m in range(total * config.grad_accum):
        yield _batches_for(m, cache, lengths, config)


def run_training(
    ops: TrainOps,
    config: TrainConfig,
    out_dir: str | Path | None,
    resume: bool = False,
    higher_is_better: bool = True,
    backend: str = "?",
    writer: bool = True,
    log: Callable[[str], None] | None = None,
    note: str | None = None,
    start: Callable[[TrainConfig], tuple[TrainConfig, str]] | None = None,
    run_files: dict[str, Any] | None = None,
) -> TrainResult:
    """Drive a run to its end (or early stop); write checkpoints, metrics and the final adapter.

    ``writer`` is False on every data-parallel rank but the first: those read the run directory
    (to resume) and never write it. ``note`` goes to ``log`` once the run is checked and starts
    (a refused run says only why it was refused). ``start`` runs once a new run (not a resumed
    one) is checked and its directory locked, before its settings are stored: it returns the
    settings to train with and a note to add (the lr probe, :mod:`lrpt.probe`). ``run_files``: more
    JSON files a new run stores in its directory (name → object; the CLI's data flags), written under
    the lock like its TrainConfig, so a refused second run cannot overwrite the first's."""
    config.validate()
    if config.lr is None:  # lrpt.train and Training fill it from the method; a direct caller must
        raise TrainingError("TrainConfig.lr is unset: pass lr=..., or config.for_method(prompt.spec.method)")
    n = len(ops.lengths)
    if n == 0:
        raise TrainingError("no training examples")
    total, warmup = plan(config, n)
    run = RunDir(Path(out_dir), writer) if out_dir is not None else None
    if run and writer:
        run.root.mkdir(parents=True, exist_ok=True)
        run.lock()
        run.clean_temp()
    try:
        return _run(ops, config, run, resume, higher_is_better, backend, n, total, warmup, log, note or "", start,
                    run_files or {})
    finally:
        if run:
            run.unlock()


def _run(ops: TrainOps, config: TrainConfig, run: RunDir | None, resume: bool, higher_is_better: bool, backend: str,
         n: int, total: int, warmup: int, log: Callable[[str], None] | None, note: str,
         start: Callable[[TrainConfig], tuple[TrainConfig, str]] | None, run_files: dict[str, Any]) -> TrainResult:
    """The loop of :func:`run_training`, inside the run directory's lock."""
    step, micro = 0, 0
    retry: dict[str, Any] | None = None  # the second attempt (lrpt.retry): where it began, its lr, why
    initial: dict[str, np.ndarray] | None = None  # the starting prompt; None: no retry can come (any more)
    best, best_step, bad_evals = None, None, 0
    attempt_best = None  # the best evaluation of the attempt running: early stopping's reference
    average, averaged = None, False  # the tail average (--average), once the run's settings are known
    stopped_early = False
    history: list[dict[str, Any]] = []
    guard_state = None  # a resumed run's divergence guard: its reference as at step 0 of the attempt
    if run:
        if resume:
            ckpt = run.latest_checkpoint()
            if ckpt is None:
                raise TrainingError(f"--resume: no checkpoint in {run.root / 'checkpoints'}")
            config = check_resume_config(run.root / TRAIN_CONFIG_FILE, config)
            meta, sums, initial = run.load_checkpoint(ckpt, ops)
            step, micro, retry = meta["step"], meta["micro"], meta.get("retry")
            guard_state = meta.get("guard")
            average = TailAverage(config.average, total) if config.average else None
            if average is not None and not average.load_state(sums, meta.get("average")):
                note += f"; the tail average restarts at step {step} (the run's length or --average changed)"
            best, best_step, bad_evals = meta["best"], meta["best_step"], meta["bad_evals"]
            if config.keep_best and best_step is not None:
                run.restore_best(ckpt)
            attempt_best = meta.get("attempt_best", best)
            history = run.truncate_metrics(step)
            if config.early_stopping and bad_evals >= config.early_stopping:  # it ended there: it stays ended
                stopped_early = True
                note += (f"; the run stopped early at step {step}: nothing to resume (to train on, start a new"
                         f" run with --init-from {run.root / 'adapter'})")
        elif run.latest_checkpoint() is not None:
            raise TrainingError(f"{run.root} already holds a run: pass --resume to continue it or choose another --out")
    if start is not None and not resume:
        config, more = start(config)
        note += more
    if not (config.retry_collapsed and total >= MIN_STEPS):
        initial = None
    elif not resume:
        initial = {k: np.array(v, copy=True) for k, v in ops.adapter().params.items()}
    elif initial is None and retry is None:  # started without it (or shorter): its start was not kept
        note += "; --retry-collapsed has no effect on this resumed run: its checkpoints hold no starting prompt"
    if average is None and config.average:
        average = TailAverage(config.average, total)
    if average is not None:  # said here, where the settings are final (a resumed run's are its own)
        note += f"; ends with the mean of its last {config.average:.0%} of steps (--average)"
    if run and run.writer:
        atomic_write_json(run.root / TRAIN_CONFIG_FILE, {"backend": backend, **asdict(config)})
        if not resume:  # a resumed run keeps the files it started with
            for name, data in run_files.items():
                atomic_write_json(run.root / name, data)
    if log is not None and note:
        log(note)
    epoch_cache: dict[int, list[list[int]]] = {}

    def next_micro_batches(start: int) -> list[list[int]]:
        return [_batches_for(m, epoch_cache, ops.lengths, config) for m in range(start, start + config.grad_accum)]

    def attempt() -> tuple[int, int, float]:
        """(first step, first micro-batch, peak lr) of the attempt running: a retry starts over."""
        return (retry["step"], retry["micro"], retry["lr"]) if retry else (0, 0, config.lr)

    first, first_micro, peak = attempt()
    end = first + total
    if step > end:  # fewer steps than it has done: nothing would train, and adapter/ would be rewritten
        raise TrainingError(f"--resume: the run is already at step {step}, past the {end} steps these flags give:"
                            f" resume with --steps {step - first} or more")
    bar = _progress(end, step, config.progress)
    guard = DivergenceGuard(ops, guard_state)
    pending: list[Any] = []
    last_loss = float("nan")
    started = time.perf_counter()
    try:
        while step < end and not stopped_early:
            lr = peak * lr_factor(step - first, total, warmup, config.schedule)
            pending.append(ops.step(next_micro_batches(micro - first_micro), lr))
            micro += config.grad_accum
            step += 1
            if bar is not None:
                bar.update(1)
            is_last = step == end
            do_eval = is_last or (config.eval_every and step % config.eval_every == 0)
            do_save = run is not None and (
                is_last or (do_eval and not config.save_every) or (config.save_every and step % config.save_every == 0)
            )
            if step % config.log_every == 0 or do_eval or do_save:
                last_loss = ops.loss_value(pending)
                pending = []
                problem = None
                if not math.isfinite(last_loss) or not ops.finite():
                    problem = f"loss became {last_loss} by step {step}"
                else:
                    problem = guard.check(last_loss, step)
                if problem:
                    where = run.latest_checkpoint() if run else None
                    keep = f"; the last good checkpoint is {where}" if where else ""
                    raise TrainingError(f"{problem}: lower --lr{keep}")
                rec = {
                    "step": step,
                    "epoch": round((micro - first_micro) * config.batch_size / n, 4),  # of the attempt
                    "loss": last_loss,
                    "lr": lr,
                    "elapsed_s": round(time.perf_counter() - started, 3),
                }
                history.append(rec)
                if run:
                    run.log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}")
            last_iterate = None  # the trajectory's own parameters, for the checkpoint, once the mean replaces them
            if average is not None and average.due(step - first):
                now = ops.adapter()
                average.add({k: now.params[k] for k in now.spec.trainable_names()}, step - first)  # lopt2's X0: not
                if is_last:  # the run ends with the mean: evaluated and saved as its adapter
                    ops.load_params(average.applied(now.params))
                    last_iterate, averaged = now.params, True
            if do_eval:
                metrics = ops.evaluate()
                if metrics:
                    value = metrics["metric"]
                    if _beats(value, best, higher_is_better):  # keep-best: over the run (a retry's both attempts)
                        best, best_step = value, step
                        if run and run.writer and config.keep_best:
                            ops.adapter().save(run.root / "adapter")
                    if _beats(value, attempt_best, higher_is_better):  # early stopping: within the attempt
                        attempt_best, bad_evals = value, 0
                    else:
                        bad_evals += 1
                    rec = {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
                    history.append(rec)
                    if run:
                        run.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", eval=f"{value:.4f}")
                    if config.early_stopping and bad_evals >= config.early_stopping:
                        stopped_early = True
            why = ops.collapsed() if is_last and not stopped_early and initial is not None else None
            if why:  # lrpt.retry: the same run again from its start, at a lower lr
                retry = {"step": step, "micro": micro, "lr": peak * LR_FACTOR, "reason": why}
                first, first_micro, peak = attempt()
                ops.restart(initial)
                end, initial, last_iterate, averaged = first + total, None, None, False
                attempt_best, bad_evals = None, 0
                if average is not None:
                    average.reset()
                guard = DivergenceGuard(ops)
                rec = {"step": step, "retry": why, "lr": peak}
                history.append(rec)
                if run:
                    run.log(rec)
                if log is not None:
                    log(f"{why}: training once more from the start at lr {peak:.3g} (--no-retry-collapsed: keep"
                        " the run as it is)")
                if bar is not None:
                    bar.total = end
                    bar.refresh()
            if do_save or (stopped_early and run):
                sums, tail = average.state() if average is not None else ({}, None)
                if initial is not None:
                    sums = {**sums, **{k + INITIAL_SUFFIX: v for k, v in initial.items()}}
                run.save_checkpoint(
                    step,
                    ops,
                    {"step": step, "micro": micro, "best": best, "best_step": best_step, "bad_evals": bad_evals,
                     "attempt_best": attempt_best, "average": tail, "retry": retry, "guard": guard.state()},
                    config.keep_checkpoints,
                    sums,
                    last_iterate,
                    with_best=config.keep_best and best_step is not None,
                )
            if stopped_early:
                break
    finally:
        if bar is not None:
            bar.close()
    if pending:
        last_loss = ops.loss_value(pending)
    ends_averaged = average is not None and average.count and step == end
    if ends_averaged and not averaged:  # a finished run resumed: its checkpoint held the last iterate
        ops.load_params(average.applied(ops.adapter().params))
    kept = run is not None and config.keep_best and best_step is not None  # adapter/: the best evaluation's
    adapter_dir = None
    if run:
        adapter_dir = str(run.root / "adapter")
        if run.writer and not kept:
            ops.adapter().save(run.root / "adapter")
    result = TrainResult(step, last_loss, best, best_step, stopped_early, adapter_dir, history)
    if ends_averaged:
        result.averaged = average.describe(offset=first) + (
            f"; evaluated at step {end}, adapter/ holds step {best_step}'s, the best evaluation (keep-best)"
            if kept and best_step != end else "")
    if retry:
        result.retried = f"{retry['reason']}: trained again from step {retry['step']} at lr {retry['lr']:.3g}"
    return result


# What a resumed run may change: how long it runs, how often it reports, and how fast it computes.
# Anything else (lr, batch, seed, schedule...) would silently make it another run.
RESUMABLE_CHANGES = frozenset({"steps", "epochs", "min_steps", "eval_every", "save_every", "keep_checkpoints", "log_every",
                               "eval_batch_size", "progress", "compile", "compile_mode", "grad_checkpoint",
                               "fsdp", "shared_prefix", "compile_scope", "lr_probe",
                               "deterministic", "retry_collapsed"})


def stored_config(path: Path) -> dict[str, Any] | None:
    """What a run stored in a JSON file of its directory (its train_config.json: the TrainConfig)
    as a dict; None for a run from before the file existed. Damaged: one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise TrainingError(f"--resume: {path} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"--resume: {path} is not a JSON object")
    return data


def stored_train_config(path: Path) -> dict[str, Any] | None:
    """A run's stored TrainConfig (its train_config.json, :func:`stored_config`), with the values a run
    stored before a field existed ran with: no tail average, the AUTO_MIN_STEPS floor."""
    stored = stored_config(path)
    if stored is not None:
        stored.setdefault("average", 0.0)
        stored.setdefault("min_steps", AUTO_MIN_STEPS)
    return stored


def resumed_floor(path: Path, config: TrainConfig) -> TrainConfig:
    """``config`` with an unset ``min_steps`` taken from the run stored at ``path`` (its
    train_config.json): a resumed auto-length run keeps the floor it started with, even where the
    method's default has changed since. No stored run, or a floor typed: ``config`` as it is."""
    stored = stored_train_config(path) if config.min_steps is None else None
    return config if stored is None else replace(config, min_steps=stored["min_steps"])


def check_resume_config(path: Path, config: TrainConfig) -> TrainConfig:
    """Refuse to resume with settings that differ from the run's own, naming each difference; the
    config to resume with (a probing run's lr is the one its probe chose, stored with the run)."""
    stored = stored_train_config(path)
    if stored is None:
        return config  # a run from before train_config.json existed: nothing to compare
    if config.lr_probe and stored.get("lr_probe") and isinstance(stored.get("lr"), (int, float)):
        config = replace(config, lr=float(stored["lr"]))
    new = asdict(config)
    changed = [f"{k} {stored[k]!r} → {new[k]!r}" + (" (the run's --lr-probe chose it: resume with --lr-probe)"
                                                    if k == "lr" and stored.get("lr_probe") else "")
               for k in new if k in stored and k not in RESUMABLE_CHANGES and stored[k] != new[k]]
    if changed:
        raise TrainingError(f"--resume with other settings than the run's ({'; '.join(changed)}): drop those flags,"
                            " or start a new run with --init-from RUN/adapter")
    return config


class DivergenceGuard:
    """Stops a run whose loss or parameters explode while staying finite (the NaN check misses those)."""

    def __init__(self, ops: TrainOps, state: dict[str, Any] | None = None):
        """``state`` (:meth:`state`, from a checkpoint): a resumed run keeps the references its start
        set, so it stops where the unbroken run would (a guard rebuilt then would measure from the
        resumed prompt and loss)."""
        self.ops = ops
        if isinstance(state, dict) and isinstance(state.get("start"), dict):
            self.start = {k: float(v) for k, v in state["start"].items()}
            self.first_loss = state.get("first_loss")
        else:
            self.start = {k: max(1.0, s) for k, s in self._scales().items()}
            self.first_loss: float | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the guard: its parameter scales at the start and its first loss."""
        return {"start": self.start, "first_loss": self.first_loss}

    def _scales(self) -> dict[str, float]:
        return {k: float(np.max(np.abs(v))) if np.size(v) else 0.0 for k, v in self.ops.adapter().params.items()}

    def check(self, loss: float, step: int) -> str | None:
        """A one-line reason when the run diverged at ``step``, else None."""
        if self.first_loss is None:
            self.first_loss = loss
        elif loss > DIVERGED_LOSS_FACTOR * max(self.first_loss, 1.0):
            return f"training diverged by step {step}: loss {loss:.4g}, from {self.first_loss:.4g}"
        for name, scale in self._scales().items():
            if scale > DIVERGED_PARAM_FACTOR * self.start[name]:
                return (f"training diverged by step {step}: {name} reached {scale:.3g} in absolute value"
                        f" (it started below {self.start[name]:.3g})")
        return None


def _beats(value: float, ref: float | None, higher_is_better: bool) -> bool:
    """Whether an evaluation improves on ``ref`` (None: nothing to beat yet)."""
    return ref is None or (value > ref if higher_is_better else value < ref)


def _batches_for(m: int, cache: dict[int, list[list[int]]], lengths: list[int], config: TrainConfig) -> list[int]:
    """Micro-batch number ``m`` of the whole run (epochs follow one another)."""
    per_epoch = math.ceil(len(lengths) / config.batch_size)
    epoch, index = divmod(m, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(lengths, config.batch_size, config.seed, epoch, config.bucket)
    return cache[epoch][index]


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


# What every checkpoint's trainer_state.json holds (others came later: a checkpoint without them is older).
CHECKPOINT_KEYS = ("step", "micro", "best", "best_step", "bad_evals", "backend_state")
BEST_COPY = "best-adapter"  # a checkpoint's copy of adapter/ under keep-best
_CHECKPOINT_NAME = re.compile(r"step-\d+")
# ".NAME.XXXXXXXX" (tempfile.mkdtemp) and ".NAME.XXXXXXXX.tmp" (tempfile.mkstemp), as fileio names them.
_TEMP_NAME = re.compile(r"\.(adapter|step-\d+|[\w.-]+\.(json|jsonl|safetensors|png))\.[a-z0-9_]{8}(\.tmp)?")


class RunDir:
    """Files of one run directory (see the module docstring)."""

    def __init__(self, root: Path, writer: bool = True):
        self.root = root
        self.writer = writer  # False: a data-parallel rank that only reads (rank 0 writes)
        self._lock: Any = None

    def lock(self) -> None:
        """Hold ``.lock`` for the whole run: a second run in the same directory refuses to start.

        An OS lock (``flock``), not a marker file: the kernel drops it when the process dies,
        so a run killed with ``kill -9`` never leaves a stale lock behind.
        """
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs there are not guarded
            return
        handle = (self.root / ".lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise TrainingError(f"another lrpt run is using {self.root}: wait for it to finish or choose another --out")\
                from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def clean_temp(self) -> list[Path]:
        """Remove what a killed run left half-written: the hidden temp files and directories that
        :func:`~lrpt.fileio.atomic_write` and :func:`~lrpt.fileio.atomic_dir` build before their rename.

        Called under the lock, so no other run is writing them; only lrpt's own temp names match.
        """
        removed = []
        for d in (self.root, self.root / "checkpoints", self.root / "adapter"):
            if not d.is_dir() or d.is_symlink():
                continue
            for entry in d.iterdir():
                if not _TEMP_NAME.fullmatch(entry.name):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> list[dict[str, Any]]:
        """Keep the records up to ``step`` (a resumed run rewrites what came after)."""
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= step:
                    kept.append(rec)
        if self.writer:
            atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints, oldest first: by step number, not by name (step-1000000 follows step-999999)."""
        d = self.root / "checkpoints"
        if not d.is_dir():
            return []
        found = [p for p in d.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, step: int, ops: TrainOps, meta: dict[str, Any], keep: int,
                        extra: dict[str, np.ndarray] | None = None,
                        params: dict[str, np.ndarray] | None = None, with_best: bool = False) -> Path:
        """``extra``: more float32 tensors for optimizer.safetensors (the tail average's sums);
        ``params``: the adapter's tensors, where the prompt now holds others (the tail average);
        ``with_best``: keep a copy of adapter/ (keep-best: the best evaluation's prompt) as
        ``best-adapter/``, which a resume puts back (:meth:`restore_best`)."""
        final = self.root / "checkpoints" / f"step-{step:06d}"
        if not self.writer:
            return final  # the optimizer state is the same on every rank: rank 0 writes it
        with atomic_dir(final, replace=True) as tmp:
            adapter = ops.adapter()
            (replace(adapter, params=params) if params is not None else adapter).save(tmp / "adapter")
            tensors, state = ops.state()
            atomic_write(tmp / "optimizer.safetensors", encode_safetensors({**tensors, **(extra or {})}))
            atomic_write_json(tmp / "trainer_state.json", {**meta, "backend_state": state})
            if with_best and (self.root / "adapter").is_dir():
                Adapter.load(self.root / "adapter").save(tmp / BEST_COPY)
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore_best(self, path: Path) -> None:
        """adapter/ back to the best prompt the checkpoint at ``path`` knew: a run killed after
        writing a new best to adapter/ and before its next checkpoint may, resumed, not meet that
        evaluation again (another --eval-every, nondeterministic kernels), and adapter/ must hold
        the prompt of the best_step the run reports."""
        if self.writer and (path / BEST_COPY).is_dir():
            Adapter.load(path / BEST_COPY).save(self.root / "adapter")

    def load_checkpoint(self, path: Path, ops: TrainOps
                        ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Restore ``ops`` from the checkpoint at ``path``; its trainer state, tail-average sums and
        the run's starting prompt (None where the checkpoint holds none: lrpt.retry)."""
        def unreadable(why: str) -> TrainingError:
            return TrainingError(f"checkpoint {path} is unreadable ({why}): delete it to resume from an earlier one")

        try:
            meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise unreadable(str(exc)) from None
        if not isinstance(meta, dict):
            raise unreadable("its trainer_state.json is not a JSON object")
        missing = [k for k in CHECKPOINT_KEYS if k not in meta]
        if missing:
            raise unreadable(f"no {', '.join(missing)} in its trainer_state.json")
        adapter = Adapter.load(path / "adapter")
        here = ops.adapter().base_model
        if here is not None:  # a run resumed on another model trained on silently, or crashed on a width
            try:
                adapter.check_model(here)
            except BaseModelMismatchError as exc:
                raise BaseModelMismatchError(f"--resume: {str(exc).split(': use ')[0]}: resume on the run's model"
                                             " (lrpt train --model), or start a new run from its adapter"
                                             " (--init-from, with --force for a variant of the model)") from None
        tensors, _, _ = read_safetensors(path / "optimizer.safetensors")
        tensors, initial = split_initial(tensors)
        tensors, sums = split_state(tensors)
        ops.load_state(adapter, tensors, meta["backend_state"])
        return meta, sums, initial
