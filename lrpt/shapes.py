"""Fixed batch shapes for compiled training steps, and whether compiling a run pays.

A compiled step (``torch.compile``, ``mx.compile``) is traced, and on CUDA with
``reduce-overhead`` captured as a CUDA graph, once per distinct input shape; the eager step
recorded as CUDA graphs without a compiler (``--compile-scope graphs``) is recorded once per shape
too. Fitting every batch to its own longest row gives real, variable-length data a new shape almost
every step, so a compiled run spends its time compiling. Here every micro-batch of a compiled run is padded to
one of a few **buckets**: widths on a geometric ladder of multiples of ``pad_to_multiple``,
from the shortest row's need up to the longest row's, and always the same row count (a short
batch gets copies of its first row with weight 0). Padding is masked and padded rows weigh
nothing, so a bucketed batch has the loss and gradients of the unpadded one (tested in fp32).

Whether compiling pays is decided from the run itself (:func:`choose_compile`): the number of
micro-steps against what compiling costs. The thresholds below come from whole ``lrpt train``
runs measured by ``benchmarks/epoch.py`` at one model size (SmolLM2-135M on an H200); other sizes
are not measured.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Each bucket is at least this many times wider than the one below it (then rounded up to a
# multiple of pad_to_multiple). 1.5 keeps padding under a third of a batch's width, and SST-2's
# widths (about 26 to 95 positions with a 20-token prompt) in 4 shapes. Provisional.
BUCKET_GROWTH = 1.5
# ``auto`` with ``--compile-scope step`` compiles when the run takes at least this many micro-steps
# per distinct batch shape. Each shape compiles every block: measured on SST-2 (10k rows, 4 shapes,
# H200), no step had run after 150 s, so a shape costs at least what the blocks' one compilation
# costs (below), and needs at least as many steps to repay it.
AUTO_MIN_STEPS_PER_SHAPE = 2000
# The same for ``--compile-scope blocks`` (the default): one dynamic-shape compilation of one block
# serves the whole run, so the rule counts the run's micro-steps, whatever its shapes. Measured
# (H200, SmolLM2-135M shape, SST-2, batch 32, lopt1; RESULTS.md "Whole runs"): eager steps take
# 0.10 s; compiling (with its CUDA-graph recordings) took over 55 s before the 10th step, and the
# 2,105-step full epoch ran in 0.80× eager's wall clock, so a run repays it somewhere between
# ~1,150 and ~1,650 steps. 313 steps (10k rows) and 171 (TREC) were slower compiled than eager.
AUTO_MIN_STEPS_BLOCKS = 2000
# ``auto`` records CUDA graphs (``--compile-scope graphs``: the eager step, no compiler) when the run
# takes at least this many micro-steps per distinct batch shape. Measured (H200, SmolLM2-135M, batch
# 32, lopt1; RESULTS.md "Whole runs"): an eager step takes about 0.11 s and a replayed one 0.017 s;
# TREC's 171 steps over 4 shapes trained in 6.2 s recorded against 18.6 s eager, so recording a shape
# cost about 0.8 s, the time of 7 eager steps, repaid after about 9 steps of that shape.
AUTO_MIN_STEPS_PER_GRAPH = 10
# The torch.compile mode ``auto`` uses when --compile-mode is not given: CUDA graphs remove
# the launch overhead that dominates the eager step of small models.
AUTO_COMPILE_MODE = "reduce-overhead"


def ladder(shortest: int, longest: int, multiple: int, growth: float = BUCKET_GROWTH) -> list[int]:
    """Bucket widths covering needs from ``shortest`` to ``longest``: multiples of ``multiple``,
    each at least ``growth`` times the one below, the last exactly the longest need rounded up."""
    top = _round_up(longest, multiple)
    rungs = [min(_round_up(max(shortest, 1), multiple), top)]
    while rungs[-1] < top:
        rungs.append(min(max(rungs[-1] + multiple, _round_up(math.ceil(rungs[-1] * growth), multiple)), top))
    return rungs


def bucket(need: int, rungs: Sequence[int]) -> int:
    """The narrowest rung that holds ``need``."""
    for r in rungs:
        if r >= need:
            return r
    raise ValueError(f"{need} is wider than the widest bucket {rungs[-1]}")


@dataclass(frozen=True)
class Shape:
    """What fixes a training batch's array shapes: its row count, the token width of its input
    (classification) or input+target (completion) batch, and the completion target width."""

    rows: int
    tokens: int
    targets: int = 0


class ShapePlan:
    """The bucketed shape of every micro-batch of a run, from the examples' lengths.

    ``lengths[i]`` is example i's input tokens (+ its target tokens for completion), what one
    packed row holds after the ``n_prompt`` prompt positions; ``targets[i]`` its completion
    target length (None: classification).
    """

    def __init__(self, lengths: Sequence[int], n_prompt: int, rows: int, multiple: int,
                 targets: Sequence[int] | None = None, growth: float = BUCKET_GROWTH):
        self.lengths, self.n_prompt, self.rows, self.targets = lengths, n_prompt, rows, targets
        self.widths = ladder(n_prompt + min(lengths), n_prompt + max(lengths), multiple, growth)
        self.target_widths = ladder(min(targets), max(targets), multiple, growth) if targets else []

    def shape(self, idx: Sequence[int]) -> Shape:
        """The shape of the micro-batch of examples ``idx`` (the whole batch: every data-parallel
        rank pads its share to the same shape, so all ranks compile the same graphs)."""
        width = bucket(self.n_prompt + max(self.lengths[i] for i in idx), self.widths)
        targets = bucket(max(self.targets[i] for i in idx), self.target_widths) if self.targets else 0
        return Shape(self.rows, width - self.n_prompt, targets)

    def count(self, micro_batches: Iterable[Sequence[int]]) -> Counter:
        """How many of ``micro_batches`` fall in each shape."""
        return Counter(self.shape(idx) for idx in micro_batches)


@dataclass(frozen=True)
class CompileChoice:
    """Whether the step runs compiled, in which torch.compile mode, and the one-line reason."""

    compiled: bool
    mode: str | None
    reason: str
    scope: str = "blocks"

    def line(self) -> str:
        """What ``lrpt train`` prints about it."""
        if not self.compiled:
            how = "eager"
        elif self.scope == "graphs":
            how = "CUDA graphs (the eager step recorded once per batch shape)"
        else:
            how = f"compiled ({self.scope}, {self.mode or 'default mode'})"
        return f"training step: {how}: {self.reason}"


def choose_compile(setting: bool | None, mode: str | None, backend: str, device: str, fsdp: bool,
                   shapes: Counter, scope: str | None = None, encoder_runs_blocks: bool = False,
                   capturable: bool = False, processes: int = 1) -> CompileChoice:
    """``setting`` True/False is the user's word; None (``auto``) decides from the run: on CUDA
    (torch), record CUDA graphs or compile when the run's micro-steps repay it.

    ``shapes`` counts the run's micro-batches per bucketed shape. With a saving s per step, a cost C
    of getting a shape ready pays when steps × s > C. ``scope`` "graphs" (the default where the step
    can be recorded: ``capturable``, one process, no ``mode`` asked for) records each shape in about
    0.8 s at SmolLM2 size (7 eager steps), so a few steps per shape repay it
    (:data:`AUTO_MIN_STEPS_PER_GRAPH`); with
    "step" each shape is compiled, so the mean steps per shape must reach
    :data:`AUTO_MIN_STEPS_PER_SHAPE`; with "blocks" one compilation serves every shape, so the run's
    steps must reach :data:`AUTO_MIN_STEPS_BLOCKS`.

    ``capturable``: nothing in the step stops a CUDA graph (LoPA's dropout does). ``processes``: the
    data-parallel world size (graphs under several processes are not tested, so only an explicit
    ``--compile-scope graphs`` gets them there).
    ``encoder_runs_blocks``: the prompt runs the model too (LoPA's base encoder), a compiled step
    not measured yet, so auto leaves it eager unless it can be recorded.
    """
    steps, distinct = sum(shapes.values()), max(len(shapes), 1)
    counted = f"{steps} micro-steps over {distinct} batch shape{'s' * (distinct != 1)}"
    per_shape = steps / distinct
    if setting is False:
        return CompileChoice(False, None, "compilation is off (--no-compile)")
    graphs_apply = backend == "torch" and device == "cuda" and capturable and not fsdp and not mode
    if scope is None and backend == "torch":
        scope = "graphs" if graphs_apply and processes == 1 else "blocks"
    if setting:
        if scope == "graphs":
            return CompileChoice(True, None, f"asked for (--compile); {counted}, each recorded once", "graphs")
        whole = scope == "step" or backend != "torch"  # mx.compile traces the whole step
        each = "each shape compiled once" if whole else "one compilation for every block and shape"
        return CompileChoice(True, mode, f"asked for (--compile); {counted}, {each}", "step" if whole else "blocks")
    if backend != "torch":
        return CompileChoice(False, None, f"auto: the {backend} backend trains eagerly unless --compile is given"
                                          " (compiling it is not measured to pay)")
    if device != "cuda":
        return CompileChoice(False, None, f"auto: on {device}, compiling does not pay; --compile forces it")
    if fsdp:
        return CompileChoice(False, None, "auto: compiling under --fsdp is not measured; --compile forces it")
    if scope == "graphs":
        if per_shape < AUTO_MIN_STEPS_PER_GRAPH:
            return CompileChoice(False, None, f"auto: {counted} ({per_shape:.0f} per shape) is below the"
                                              f" {AUTO_MIN_STEPS_PER_GRAPH} per shape that repay recording CUDA"
                                              " graphs; --compile forces it")
        return CompileChoice(True, None, f"auto: {counted} ({per_shape:.0f} per shape, at least the"
                                         f" {AUTO_MIN_STEPS_PER_GRAPH} that repay recording each)", "graphs")
    if encoder_runs_blocks:
        return CompileChoice(False, None, "auto: compiling LoPA's step, whose encoder runs the model too, is not"
                                          " measured; --compile forces it")
    if scope != "step":
        if steps < AUTO_MIN_STEPS_BLOCKS:
            return CompileChoice(False, None, f"auto: {counted} is below the {AUTO_MIN_STEPS_BLOCKS} that repay"
                                              " compiling the blocks; --compile forces it")
        return CompileChoice(True, mode or AUTO_COMPILE_MODE, f"auto: {counted}, at least the {AUTO_MIN_STEPS_BLOCKS}"
                                                              " that repay compiling the blocks", "blocks")
    if per_shape < AUTO_MIN_STEPS_PER_SHAPE:
        return CompileChoice(False, None, f"auto: {counted} ({per_shape:.0f} per shape) is below the"
                                          f" {AUTO_MIN_STEPS_PER_SHAPE} per shape that repay a compilation"
                                          "; --compile forces it")
    mode = mode or AUTO_COMPILE_MODE
    return CompileChoice(True, mode, f"auto: {counted} ({per_shape:.0f} per shape, at least the"
                                     f" {AUTO_MIN_STEPS_PER_SHAPE} that repay a compilation)",
                         "step")


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)
