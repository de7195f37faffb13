"""Choosing the learning rate from the run's own data: a short range test (``--lr-probe``).

Why: the best lr of a prompt method depends on the task. On SmolLM2 (RESULTS.md "Accuracy on four
tasks"), lopt1 (vocab init) did best at 3e-1 on TREC and CB, where one SST-2 seed diverged at it.
Before the run trains, each candidate (the run's lr × 1/3, × 1 and × 3) trains the freshly
initialised prompt for :data:`PROBE_STEPS` optimizer steps on training rows, under the run's
schedule (``--schedule``) after a fixed :data:`PROBE_WARMUP`-step linear warm-up, so that a high lr
is not scored mid-flight on noise, and is scored by its loss on a held-out slice of the training
rows (never the evaluation rows, which keep-best and early stopping read). The prompt and the
optimizer then return to their starting state, and the run trains with the candidate of lowest
held-out loss (a candidate that diverged never wins).

It runs only when a new run starts (checked, its directory locked), never on ``--resume``: the
chosen lr is stored with the run's settings, and a resumed run continues with it
(:func:`lrpt.trainer.check_resume_config`). Data parallel, every rank takes the first rank's
choice. Its cost is ``3 × PROBE_STEPS`` steps and three held-out passes, on top of the run. The
probe is written once over :class:`lrpt.training.Training`, so both backends run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import lr_factor
from .scoring import eval_mode

PROBE_STEPS = 30  # optimizer steps per candidate
PROBE_WARMUP = 5  # of them, linear warm-up (the run's own schedule warms up too)
FACTORS = (1 / 3, 1.0, 3.0)  # candidates, as multiples of the run's lr
HELD_OUT = 128  # at most this many training rows score the candidates (at most a quarter of the rows)
MIN_ROWS = 8  # fewer training rows: nothing to hold out, no probe


@dataclass
class ProbeResult:
    """The lr chosen and every candidate's held-out loss (NaN: diverged)."""

    lr: float
    losses: dict[float, float]

    def note(self) -> str:
        """What the start-up line says about it."""
        tried = ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in self.losses.items())
        return f"; lr {self.lr:.3g} chosen by the lr probe (held-out loss {tried})"


def probe_lr(ops, base_lr: float, seed: int, steps: int | None = None,
             factors: Sequence[float] = FACTORS) -> ProbeResult | None:
    """Try ``base_lr × factors`` from ``ops``' current prompt (see the module docstring); leave the
    prompt, the optimizer and the step count as they were, and return the choice (None: fewer than
    :data:`MIN_ROWS` training rows, no probe)."""
    steps = PROBE_STEPS if steps is None else steps
    n = len(ops.train_data)
    if n < MIN_ROWS:
        return None
    order = np.random.default_rng(seed).permutation(n)
    held = order[: min(HELD_OUT, n // 4)].tolist()
    pool = order[len(held):].tolist()
    per_step = ops.config.batch_size * ops.config.grad_accum
    start = ops.prompt.to_params()
    losses: dict[float, float] = {}
    for factor in factors:
        lr = base_lr * factor
        ops.restart(start)
        for step in range(steps):
            rows = [pool[(step * per_step + i) % len(pool)] for i in range(per_step)]
            micro = [rows[i:i + ops.config.batch_size] for i in range(0, per_step, ops.config.batch_size)]
            ops.step(micro, lr * lr_factor(step, steps, min(PROBE_WARMUP, steps), ops.config.schedule))
        losses[lr] = held_out_loss(ops, held) if ops.finite() else math.nan
    ops.restart(start)
    if ops.world[1] > 1:  # every rank takes the first rank's losses, so all train with one lr
        first = ops.stepper.all_gather(np.array([list(losses.values())], np.float64))[0]
        losses = dict(zip(losses, map(float, first)))
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    return ProbeResult(min(finite, key=finite.get) if finite else base_lr, losses)


def held_out_loss(ops, rows: list[int]) -> float:
    """The training loss of the prompt as it is now on ``rows``, without gradients or dropout."""
    size = ops.config.eval_batch_size
    total = 0.0
    with eval_mode(ops.prompt), ops.be.inference(ops.model), ops.stepper.kernels():
        for i in range(0, len(rows), size):
            part = rows[i:i + size]
            loss = ops.loss(ops.prepare([ops.train_data[j] for j in part]))
            total += ops.stepper.loss_value([loss]) * len(part)
    return total / len(rows)

