"""Tail averaging of the prompt's parameters (``--average F``): end a run with the mean of its last iterates.

Why: a prompt trained on little data wanders between iterates of unequal accuracy; the mean of
the iterates over the last part of a run (Polyak averaging, as in SWA) sits nearer the centre of the
region they wander in. For ``lopt1`` on CB (250 rows, 64 passes in 1,000 steps) averaging the last
half raised every seed's accuracy by 5-7 points, and moved the means of SST-2, RTE and TREC by -0.1 to +0.4
(benchmarks/RESULTS.md, "tail averaging"). It costs no steps: the trained tensors are read at up to
:data:`SAMPLES` evenly spaced steps of the final ``F`` of the run (a host copy each, like the
divergence guard's), summed in float32 (so a checkpoint holds the sum exactly and a resumed run ends
bit for bit as an unbroken one), and loaded into the prompt after the last step, before the final
evaluation and save; with keep-best (evaluation rows given) the mean is one more evaluation, and
``adapter/`` stays an earlier one's if that scored higher. A fixed tensor (``lopt2``'s X0) stays out of
the mean, bit for bit.

Only the run's planned last step averages: an early-stopped run keeps its iterate (and keep-best
its best evaluation). Checkpoints hold the trajectory's own iterate (the final one too) with the sums,
so training continues where it was: a run resumed with the same length ends exactly as an unbroken
one; one resumed with another length (``--resume --steps N``) has another tail, so its sums start
again from the resume point, which is exact when the new tail starts there or later (a finished run
extended to at least ``1 / (1 - F)`` times its length).
"""

from __future__ import annotations

import math

import numpy as np

SAMPLES = 50  # at most this many iterates enter the mean
SUFFIX = ".tail_sum"  # a checkpoint's optimizer.safetensors holds the running sums under {param}.tail_sum


class TailAverage:
    """The running sum of the parameters at the sampled steps of one run's tail."""

    def __init__(self, fraction: float, total: int):
        window = max(1, math.ceil(round(fraction * total, 9)))  # 0.07 × 100 is 7.000000000000001
        self.fraction, self.total = fraction, total
        self.stride = max(1, math.ceil(window / SAMPLES))
        self.first = total - window + 1  # steps are counted from 1 after each optimizer step
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0
        self.since = 0  # the first step in the sums (later than the tail's first where a resume restarted them)

    def due(self, step: int) -> bool:
        """Whether the parameters after ``step`` steps enter the mean (the last step always does)."""
        return self.first <= step <= self.total and (self.total - step) % self.stride == 0

    def add(self, params: dict[str, np.ndarray], step: int) -> None:
        """Add these tensors (the trained ones, by name), taken after ``step`` steps, to the sums."""
        if not self.sums:
            self.since = step
            self.sums = {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()}
        for k, v in params.items():
            self.sums[k] += np.asarray(v, np.float32)
        self.count += 1

    def describe(self, offset: int = 0) -> str:
        """What the run ended with, for its summary; ``offset``: the run's step where these steps count
        from (a retried run's second attempt, lrpt.retry)."""
        what = f"{self.count} iterates" if self.count != 1 else "1 iterate"
        return f"mean of {what} (steps {self.since + offset}-{self.total + offset} every {self.stride}; --average)"

    def mean(self) -> dict[str, np.ndarray]:
        """The mean of each averaged tensor."""
        return {k: s / np.float32(self.count) for k, s in self.sums.items()}

    def applied(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``params`` (every tensor of the prompt) with the averaged ones replaced by their means."""
        return {**params, **self.mean()}

    def reset(self) -> None:
        self.sums, self.count, self.since = {}, 0, 0

    def plan(self) -> dict[str, float | int]:
        """What decides which steps are sampled (stored with the sums: they only carry over under it)."""
        return {"fraction": self.fraction, "total": self.total}

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        """The sums as checkpoint tensors (``{param}.tail_sum``), and the sample count with the plan."""
        meta = {"count": self.count, "since": self.since, **self.plan()}
        return {k + SUFFIX: s for k, s in self.sums.items()}, meta

    def load_state(self, tensors: dict[str, np.ndarray], meta: dict[str, object] | None) -> bool:
        """Take a checkpoint's sums if they were taken under this plan; False: they were not (dropped)."""
        if not meta or {k: meta.get(k) for k in self.plan()} != self.plan():
            self.reset()
            return not tensors
        self.sums = {k.removesuffix(SUFFIX): np.asarray(v, np.float32).copy() for k, v in tensors.items()}
        self.count = int(meta["count"]) if self.sums else 0
        self.since = int(meta.get("since", 0)) if self.sums else 0
        return True


def split_state(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A checkpoint's tensors as (the optimizer's, the tail average's)."""
    mine = {k: v for k, v in tensors.items() if k.endswith(SUFFIX)}
    return {k: v for k, v in tensors.items() if k not in mine}, mine
