"""The eager training step captured as CUDA graphs, one per batch shape (``--compile-scope graphs``).

A small model's eager step on a GPU is launch-bound: SmolLM2-135M's forward and backward launch
thousands of small kernels, and the GPU waits on Python between them. A CUDA graph records those
launches once and replays them as one. No compiler runs: the graph holds the very kernels the eager
step launches, so recording a shape costs a few eager steps (two warm-ups, the recording; about 0.8 s
at SmolLM2-135M size on an H200), where ``torch.compile`` spends tens of seconds per graph. With the run's batches padded to a few
bucketed shapes (:mod:`lrpt.shapes`), a run records a handful of graphs and replays them for every
step; the loss and gradients are the eager step's (tested on CUDA against the eager step).

What one step replays: for each micro-batch, its shape's forward+backward graph (the batch copied
into that graph's input buffers first; gradients accumulate into fixed ``.grad`` buffers), then
the update graph (clipping, fused AdamW with ``capturable=True`` and its learning rate as a device
tensor, gradients zeroed in place). Nothing is read back to the host; the step's loss is a device
tensor like the eager step's. All graphs share one memory pool: they replay one at a time, and
what outlives a replay (inputs, gradients, the optimizer's state) is held outside it; a recorded
loss lives in the pool, so each replay's is added to the step's total before the next replay.

Not captured, refused with one clear error instead: CPU runs, LoPA's dropout (its random numbers
are reseeded from (seed, step) on the host every step) and FSDP (its collectives run inside the
blocks). A model whose step waits on the host is found before recording (:class:`NotRecordable`): an
error when the user asked for graphs, eager steps from there on when lrpt chose them.
Data-parallel gradient sums run eagerly between the replays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ...errors import TrainingError, first_line
from .model import autocast

# Eager runs of a new graph's work on a side stream before its recording: the first lets cuBLAS, SDPA,
# autograd and AdamW set up what they keep (workspaces, kernel choices), the second runs as the replay
# will, with the sync check on (:meth:`CapturedSteps._record`).
WARMUP = 2


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream every warm-up and recording of this process runs on, per GPU.

    cuBLAS keeps a workspace for each (handle, stream) pair it has run on until the process ends
    (``empty_cache`` does not free them). A fresh stream per recording (PyTorch's pool has 32 per
    device) left about 50 MiB behind per recorded shape: 0.25-0.38 GiB more allocated after each
    ``train`` call at SmolLM2's size on an H200, and out-of-memory errors for 24 training processes
    sharing one GPU (benchmarks/RESULTS.md). Warming up on the stream the graph is recorded on also
    keeps that stream's workspace out of the graph's private pool."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class NotRecordable(TrainingError):
    """The step cannot be recorded as a CUDA graph: something in it waits on the host (an index
    built on the CPU, a value read back), found before any recording began. Where lrpt chose
    graphs, the run goes on eagerly instead."""


def refusal(device: torch.device, dropout: bool, fsdp: bool) -> str | None:
    """Why this step cannot be captured (one line naming what to change), or None when it can."""
    if device.type != "cuda":
        return f"--compile-scope graphs records CUDA graphs, and this model is on {device.type}: drop it"
    if dropout:
        return "--compile-scope graphs cannot replay LoPA's dropout: add --dropout 0 or drop --compile-scope graphs"
    if fsdp:
        return "--compile-scope graphs cannot record FSDP's collectives: drop --fsdp or --compile-scope graphs"
    return None


class CapturedSteps:
    """A Stepper's optimizer step as CUDA graph replays; a new batch shape is recorded on first sight."""

    def __init__(self, model, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                 loss: Callable[[dict[str, Any]], torch.Tensor], max_grad_norm: float,
                 all_reduce: Callable[[torch.Tensor], None] | None = None):
        self.model, self.params, self.opt, self.loss = model, params, opt, loss
        self.max_grad_norm, self.all_reduce = max_grad_norm, all_reduce
        self.pool = None  # one memory pool for every graph, made at the first recording
        self.weight = torch.zeros((), device=model.device)  # the micro-batch's share of the step
        self.micro: dict[tuple, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.update: Any = None
        for p in params:  # fixed buffers the backward graphs accumulate into
            p.grad = torch.zeros_like(p)

    def step(self, batches: list[dict[str, torch.Tensor]], weights: list[float], lr: float) -> torch.Tensor:
        """One optimizer step: ``Stepper.step``'s result, by replays."""
        for arrays in batches:  # record new shapes first: their warm-ups overwrite the gradients
            if key(arrays) not in self.micro:
                inputs = {name: value.clone() for name, value in arrays.items()}
                graph, out = self._record(lambda inputs=inputs: self._micro(inputs), self._zero_grads)
                self.micro[key(arrays)] = graph, inputs, out
        if self.update is None:
            self._init_state()
            self.update, _ = self._record(self._update, self._snapshot())
        for group in self.opt.param_groups:
            group["lr"].fill_(lr)
        total = torch.zeros((), device=self.model.device)
        for arrays, weight in zip(batches, weights):
            graph, inputs, out = self.micro[key(arrays)]
            for name, value in arrays.items():
                inputs[name].copy_(value, non_blocking=True)
            self.weight.fill_(weight)
            graph.replay()
            total = total + out  # a new tensor: the next replay may overwrite ``out``
        if self.all_reduce is not None:
            self.all_reduce(total)
        self.update.replay()
        return total

    def _record(self, run: Callable[[], torch.Tensor | None], undo: Callable[[], None]):
        """``run`` warmed up eagerly on a side stream (:data:`WARMUP` times; ``undo`` then reverts what
        they changed), then recorded: (the graph, what ``run`` returned while recording).

        The last warm-up runs :func:`as_recorded`: anything in the step that waits on the host (a
        value read back, an index built on the CPU) would break the recording, so it is found there,
        before any recording starts, as :class:`NotRecordable`, with the process untouched. A
        recording that fails anyway leaves CUDA's stream and allocator mid-capture: that is an
        error, never a fallback."""
        side = side_stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP - 1):
                run()
            try:
                with as_recorded():
                    run()
            except RuntimeError as exc:
                raise NotRecordable(f"this model's training step waits on the host ({first_line(exc)}), so it"
                                    " cannot be recorded as a CUDA graph: train with --no-compile or"
                                    " --compile-scope blocks") from exc
        torch.cuda.current_stream().wait_stream(side)
        undo()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                out = run()
        except RuntimeError as exc:
            raise TrainingError(f"recording the training step as a CUDA graph failed ({first_line(exc)}): train"
                                " with --no-compile or --compile-scope blocks") from exc
        return graph, out

    def _micro(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Autocast's weight-cast cache would hold tensors across the capture's end: off while recording.
        with autocast(self.model, cache=False):
            out = self.loss(inputs) * self.weight
        out.backward()
        return out.detach()

    def _update(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.opt.step()
        self._zero_grads()

    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad.zero_()

    def _snapshot(self) -> Callable[[], None]:
        """What puts parameters, gradients and AdamW's state back as they are now (the warm-ups change them)."""
        params, grads = [p.detach().clone() for p in self.params], [p.grad.clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in self.opt.state[p].items()} for p in self.params}

        def restore() -> None:
            with torch.no_grad():
                for p, value, grad in zip(self.params, params, grads):
                    p.copy_(value)
                    p.grad.copy_(grad)
                    for k, v in state[p].items():
                        self.opt.state[p][k].copy_(v)

        return restore

    def load_moments(self, named: list[tuple[str, torch.nn.Parameter]], tensors: dict, step: int) -> None:
        """Moments (NumPy, canonical names; none at step 0) copied into the state the update replays."""
        for name, p in named:
            state = self.opt.state[p]
            state["step"].fill_(float(step))
            for k in ("exp_avg", "exp_avg_sq"):
                if step:
                    state[k].copy_(torch.from_numpy(tensors[f"{name}.{k}"]))
                else:
                    state[k].zero_()

    def _init_state(self) -> None:
        """AdamW's state made before recording (it is created lazily at the first step otherwise):
        zeros and step 0, what that first step creates, unless a resumed run loaded its own."""
        for p in self.params:
            if p not in self.opt.state or not self.opt.state[p]:
                self.opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


@contextlib.contextmanager
def as_recorded():
    """Eager work run as a recording will run it: code that asks whether a CUDA stream capture is
    under way is told yes (transformers then builds attention masks without reading them back to the
    host, as it does while recording), and anything that still waits on the host raises (CUDA's
    sync check set to error)."""
    real, mode = torch.cuda.is_current_stream_capturing, torch.cuda.get_sync_debug_mode()
    torch.cuda.is_current_stream_capturing = lambda: True
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.is_current_stream_capturing = real


def key(arrays: dict[str, torch.Tensor]) -> tuple:
    """What makes two batches replay the same graph: their arrays' names, shapes and dtypes."""
    return tuple((name, tuple(v.shape), v.dtype) for name, v in arrays.items())
