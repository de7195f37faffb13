"""Training on PyTorch: autograd, AdamW and compilation for the core's step (:mod:`lrpt.training`).

Plain AdamW (fused on CUDA) on the prompt's float32 parameters, autocast to the model's half
dtype on CUDA, gradient accumulation and clipping. Nothing reads a value back to the host: the
loss stays on the device until the shared loop asks for it at a log point.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ...errors import TrainingError
from ...trainer import TrainConfig
from .graphs import CapturedSteps, NotRecordable, refusal
from .model import autocast, fsdp_sharded, transformer_blocks
from .packed import packable, packed_attention


class Stepper:
    """One optimizer step over micro-batches; the AdamW moments in the core's checkpoint schema."""

    def __init__(self, model, prompt, loss: Callable[[dict[str, Any]], torch.Tensor], config: TrainConfig,
                 shapes: int = 1, auto: bool = False, shared: bool = False):
        """``auto``: the compile choice was lrpt's (a step that cannot be recorded as CUDA graphs then
        runs eagerly, ``fell_back`` says why). ``shared``: the loss runs the shared prefix, which a
        step compiled whole runs packed where the model allows it (:mod:`.packed`)."""
        if config.grad_checkpoint:
            raise TrainingError("grad_checkpoint is the MLX backend's (recomputing layers in the backward pass):"
                                " drop --grad-checkpoint with --backend torch")
        self.model, self.prompt, self.config = model, prompt, config
        self.auto = auto  # graphs were lrpt's choice: a step that cannot be recorded runs eagerly
        self.fell_back: str | None = None  # why, when it did
        self.named = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.dropout = prompt.spec.method == "lopa" and prompt.spec.dropout > 0
        capture = bool(config.compile) and config.compile_scope == "graphs"
        if capture and (why := refusal(model.device, self.dropout, config.fsdp)):
            raise TrainingError(why)
        # Recorded updates read the learning rate from a device tensor (set before each replay).
        lr = torch.tensor(float(config.lr), device=model.device) if capture else config.lr
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=config.weight_decay,
                                     fused=model.device.type == "cuda", capturable=capture)
        self.loss = loss
        # The shared prefix packed with the rows: a step compiled whole, on a model packing implements.
        self.packs = bool(config.compile) and config.compile_scope == "step" and shared and packable(model)
        if config.compile and not capture:
            self.loss = compiled(model, loss, config, shapes, pack=self.packs)
        self.world = world(need_group=config.fsdp)
        # Under FSDP every forward and backward is a collective: ranks run the same number of them.
        self.lockstep = config.fsdp
        if config.fsdp:
            shard_model(model)
        self.graphs = CapturedSteps(model, self.params, self.opt, loss, config.max_grad_norm,
                                    self._all_reduce if self.world[1] > 1 else None) if capture else None

    def kernels(self) -> contextlib.AbstractContextManager:
        """The block in which this run's CUDA work happens (its steps, evaluations and probes):
        torch's deterministic mode is on inside it with ``--deterministic`` and back as it was after.

        Why a block and not the Stepper's lifetime: the mode is process-wide, and a run's objects
        outlive it (a notebook keeps them, a test or benchmark builds a Training and never closes it);
        held for the run, one such object left every later torch call in the process in the mode."""
        return deterministic_kernels(self.model.device, self.config.deterministic)

    def step(self, batches: list[dict[str, torch.Tensor]], weights: list[float], lr: float, seed: int) -> torch.Tensor:
        """Accumulate ``weights[i] * loss(batches[i])``; data parallel, sum the gradients of all ranks."""
        try:
            with self.kernels():
                return self._step(batches, weights, lr, seed)
        except RuntimeError as exc:
            if "use_deterministic_algorithms" not in str(exc):
                raise
            op = str(exc).split(" does not have", 1)[0].strip().splitlines()[-1]
            raise TrainingError(f"{op} has no deterministic CUDA kernel in this torch: train with"
                                " --no-deterministic (runs of one seed may then differ)") from None

    def _step(self, batches: list[dict[str, torch.Tensor]], weights: list[float], lr: float, seed: int) -> torch.Tensor:
        if self.graphs is not None:
            try:
                return self.graphs.step(batches, weights, lr)
            except NotRecordable as exc:
                if not self.auto:
                    raise
                self.graphs = None  # found before any recording or replay: this step runs eagerly below
                self.fell_back = str(exc)
                if self.world[0] == 0:
                    print(f"lrpt: training step: eager from here: {exc}", file=sys.stderr, flush=True)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.model.device)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.dropout):  # dropout from (seed, step) only
            if self.dropout:
                torch.manual_seed(seed)
            for arrays, weight in zip(batches, weights):
                with autocast(self.model):
                    loss = self.loss(arrays) * weight
                loss.backward()
                total = total + loss.detach()
        if self.world[1] > 1:
            self._all_reduce(total)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def _all_reduce(self, total: torch.Tensor) -> None:
        """Sum the prompt's gradients and the loss over ranks in one flat collective (they are small)."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [total.reshape(1)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            summed = flat[offset:offset + g.numel()].view_as(p)
            if p.grad is None:
                p.grad = summed
            else:  # in place: recorded CUDA graphs read and write these very buffers
                p.grad.copy_(summed)
            offset += g.numel()
        total.copy_(flat[-1])

    def all_gather(self, rows: np.ndarray) -> np.ndarray:
        """Equal-shaped host arrays of every rank, concatenated in rank order."""
        import torch.distributed as dist

        if self.world[1] == 1:
            return rows
        mine = torch.from_numpy(np.ascontiguousarray(rows)).to(self.model.device)
        out = [torch.empty_like(mine) for _ in range(self.world[1])]
        dist.all_gather(out, mine)
        return torch.cat(out).cpu().numpy()

    def close(self) -> None:
        """The run is over. Nothing to undo on torch: the deterministic mode is held per call (kernels)."""

    def loss_value(self, handles: list[torch.Tensor]) -> float:
        return float(torch.stack(handles).mean().item())

    def finite(self) -> bool:
        return bool(all(torch.isfinite(p).all() for p in self.params))

    def moments(self) -> dict[str, np.ndarray]:
        out = {}
        for name, p in self.named:
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"{name}.{key}"] = st[key].detach().float().cpu().numpy()
        return out

    def load_moments(self, tensors: dict[str, np.ndarray], step: int) -> None:
        if self.graphs is not None and self.graphs.update is not None:
            self.graphs.load_moments(self.named, tensors, step)  # in place, under the recorded update
            return
        self.opt.state.clear()
        if not step:
            return
        step_device = self.model.device if self.opt.defaults.get("fused") else "cpu"
        for name, p in self.named:
            self.opt.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=step_device),
                "exp_avg": torch.from_numpy(tensors[f"{name}.exp_avg"]).to(p.device),
                "exp_avg_sq": torch.from_numpy(tensors[f"{name}.exp_avg_sq"]).to(p.device),
            }


@contextlib.contextmanager
def deterministic_kernels(device: torch.device, on: bool = True) -> Iterator[None]:
    """Inside the block, CUDA kernels give the same bits every run (``--deterministic``, the default).

    Why: the backward pass of SDPA's memory-efficient attention, which a padded batch runs, splits a
    long row's keys over thread blocks and adds their parts of the query gradient with atomics, in
    whatever order the blocks finish. A prompt's gradient comes back through that sum in every layer,
    so on rows past ~100 tokens two runs of one seed drift apart, and on a small task they end far
    apart (RTE moved one seed 13.7 points; benchmarks/RESULTS.md). torch's deterministic mode runs
    that kernel unsplit and refuses ops that have no deterministic kernel. CPU kernels are
    deterministic already, so the switch is left alone there.
    """
    if not on or device.type != "cuda":
        yield
        return
    import torch.utils.deterministic as det

    # cuBLAS is deterministic only with a fixed workspace; torch refuses to run it in this mode
    # without the setting (a user's own value wins).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    # The mode also fills every new uninitialised buffer with NaN, to expose reads of garbage; that
    # costs a kernel per allocation and changes no result of code that reads none.
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]


def compiled(model, loss: Callable[[dict[str, Any]], torch.Tensor], config: TrainConfig, shapes: int,
             pack: bool = False):
    """``loss`` with torch.compile, over ``config.compile_scope``:

    - ``blocks``: each transformer block's call is compiled, with dynamic shapes. Every block runs
      the same code, so one compilation serves all of them and every batch width (CUDA graphs with
      ``reduce-overhead`` are still recorded per block and shape); the embedding lookup, prompt,
      head and loss between them run eagerly. Measured at SmolLM2 size on an H200, this cost over
      55 s before the 10th step (lrpt.shapes sets auto's threshold from it).
    - ``step``: the whole loss, once per fixed batch shape (lrpt.shapes), each a static graph: the
      fastest step, but each shape compiles every block, which takes minutes on real, many-shaped
      data.

    The whole step compiled once with dynamic shapes was tried and dropped (commit 2135de0): on the
    full SST-2 epoch it had not run 10 steps after 285 s, where the whole eager run took 170 s.

    ``pack`` (a step compiled whole that runs the shared prefix): the prefix runs packed with the
    rows (:mod:`.packed`), the model's attention switched around each call, outside the compiled code.

    Dynamo's recompile limit (8 by default; past it a step silently runs eager) is raised to cover
    the ``shapes`` (step) or one compilation per block (blocks run behind a KV cache: the shared
    prefix, which auto leaves off with blocks).
    """
    limits = torch._dynamo.config
    name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"  # older torch
    blocks = transformer_blocks(model) if config.compile_scope != "step" else None
    # Blocks behind a KV cache (the shared prefix, when asked for) compile once per layer and pass.
    setattr(limits, name, max(getattr(limits, name), shapes + 8, 2 * len(blocks or ()) + 8))
    mark = config.compile_mode == "reduce-overhead" and model.device.type == "cuda"
    if config.compile_scope == "step":
        step = torch.compile(loss, mode=config.compile_mode, dynamic=False)
    else:
        if blocks is None or len(blocks) == 0:
            raise TrainingError(f"--compile-scope blocks: cannot find the transformer blocks of {type(model).__name__};"
                                " use --compile-scope step")
        calls = [torch.compile(b._call_impl, mode=config.compile_mode, dynamic=True) for b in blocks]

        def step(arrays: dict[str, Any]) -> torch.Tensor:
            # nn.Module.compile's own hook (``_compiled_call_impl``), set only while the step's
            # forward runs, so evaluation and generation in the same process stay eager.
            for b, call in zip(blocks, calls):
                b._compiled_call_impl = call
            try:
                return loss(arrays)
            finally:
                for b in blocks:
                    b._compiled_call_impl = None

    def run(arrays: dict[str, Any]) -> torch.Tensor:
        if mark:  # a new iteration: CUDA graphs may reuse the memory of the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with packed_attention(model, pack):
            return step(arrays)

    return run


def world(need_group: bool = False) -> tuple[int, int]:
    """(rank, size) of the data-parallel group: ``torchrun`` sets the environment, and the group is
    started here once (NCCL on CUDA, gloo on CPU); (0, 1) otherwise. ``need_group``: start it even
    for one process (FSDP needs one), which must then have been launched by torchrun."""
    import os

    import torch.distributed as dist

    if need_group and "WORLD_SIZE" not in os.environ:
        raise TrainingError("--fsdp shards the model over the processes of torchrun: launch"
                            " `torchrun --nproc-per-node N $(which lrpt) train ... --fsdp`")
    if not dist.is_available() or (int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not need_group):
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard_model(model, device: torch.device | None = None) -> None:
    """FSDP2 over the frozen model: each transformer block its own unit (``fully_shard``), gathered
    for its forward and backward only. The rest (embeddings, final norm, head: what lrpt calls
    outside the model's own forward, and what init and fingerprints read) stays whole on every GPU
    and outside FSDP: sharding it as a root unit and gathering it for good would hold it twice. The
    blocks are found as the model's longest ``ModuleList``, so no per-architecture table is needed.

    A model still on the CPU reaches ``device`` one block at a time: ``fully_shard`` moves a block
    and keeps this rank's shard, so the GPU never holds more than one whole block."""
    from torch.distributed.fsdp import fully_shard

    if fsdp_sharded(model):
        return
    world(need_group=True)
    blocks = transformer_blocks(model)
    if blocks is None or len(blocks) == 0:
        raise TrainingError(f"--fsdp: cannot find the transformer blocks of {type(model).__name__}")
    for block in blocks:
        # Explicit: with no FSDP root above them each block is a root, and a root by default keeps its
        # weights gathered after forward (for its backward), which would gather every block at once.
        fully_shard(block, reshard_after_forward=True)
    if device is not None:
        model.to(device)  # the rest, whole; FSDP's own _apply keeps the sharded blocks as they are
