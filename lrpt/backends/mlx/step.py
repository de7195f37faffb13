"""Training on MLX: autograd, AdamW and compilation for the core's step (mirrors ``torch/step.py``).

``nn.value_and_grad`` over the prompt, mlx's AdamW with the same update rule as torch's
(bias-corrected moments, decoupled weight decay), ``mx.compile`` of the loss and gradients
(traced once per batch shape), and optionally gradient checkpointing of the model's layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ...errors import TrainingError
from ...trainer import TrainConfig


def refuse_fsdp() -> None:
    raise TrainingError("fsdp is PyTorch's FSDP2: with --backend mlx drop --fsdp (mlx.launch replicates the"
                        " model on every process)")


class Stepper:
    """One optimizer step over micro-batches; the AdamW moments in the core's checkpoint schema."""

    def __init__(self, model, prompt, loss: Callable[[dict[str, Any]], mx.array], config: TrainConfig,
                 shapes: int = 1, auto: bool = False, shared: bool = False):
        """``auto``: the compile choice was lrpt's (torch then falls back from CUDA graphs that cannot be
        recorded and says why in ``fell_back``; mx.compile has no such case, so it is unused here).
        ``shared``: the loss runs the shared prefix (torch packs it in a step compiled whole; MLX's
        two-pass prefix is its only one, so it is unused here)."""
        self.fell_back: str | None = None
        self.packs = False  # the shared prefix packed with the rows: torch's, in a step compiled whole
        if config.compile_mode:
            raise TrainingError("compile_mode is torch.compile's: with --backend mlx use --compile alone")
        if config.compile_scope:
            raise TrainingError("--compile-scope is the torch backend's (mx.compile traces the whole step):"
                                " drop it with --backend mlx")
        if config.fsdp:
            refuse_fsdp()
        self.model, self.prompt, self.config = model, prompt, config
        self.opt = optim.AdamW(learning_rate=config.lr, betas=[0.9, 0.999], eps=1e-8,
                               weight_decay=config.weight_decay, bias_correction=True)
        self.opt.init(prompt.trainable_parameters())
        self.restore = _checkpoint_layers(model) if config.grad_checkpoint else []
        # ``shapes``: how many fixed batch shapes a compiled run traces (torch sizes its recompile
        # limit from it; mx.compile keeps one trace per shape with no limit, so it is not needed here).
        del shapes
        self.grad_fn = nn.value_and_grad(prompt, loss)
        if config.compile:
            state = [prompt.state, mx.random.state]
            self.grad_fn = mx.compile(self.grad_fn, inputs=state, outputs=state)
        self.world = world()
        self.lockstep = False  # ranks need not run the same number of forwards (no FSDP on MLX)

    def step(self, batches: list[dict[str, mx.array]], weights: list[float], lr: float, seed: int) -> mx.array:
        """Accumulate ``weights[i] * loss(batches[i])``; data parallel, combine the ranks' gradients
        with mlx's ``average_gradients`` (weights scaled by the world size, so the average is the sum)."""
        mx.random.seed(seed)  # dropout from (seed, step) only
        self.opt.learning_rate = mx.array(lr, dtype=mx.float32)
        size = self.world[1]
        total, grads = mx.array(0.0), None
        for arrays, weight in zip(batches, weights):
            loss, g = self.grad_fn(arrays)
            g = tree_map(lambda x, w=weight * size: x * w, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + loss * weight
        if grads is None:  # no rows for this rank in this step: it still joins the collective
            grads = tree_map(mx.zeros_like, self.prompt.trainable_parameters())
        if size > 1:
            grads = nn.average_gradients(grads)
            total = mx.distributed.all_sum(total)
        if self.config.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        self.opt.update(self.prompt, grads)
        mx.eval(self.prompt.parameters(), self.opt.state, total)  # bound the lazy graph; no read-back
        return total

    def all_gather(self, rows: np.ndarray) -> np.ndarray:
        """Equal-shaped host arrays of every rank, concatenated in rank order."""
        if self.world[1] == 1:
            return rows
        dtype = mx.float32 if rows.dtype == np.float64 else None  # no float64 collectives on every device
        out = mx.distributed.all_gather(mx.array(rows, dtype=dtype) if dtype else mx.array(rows))
        return np.array(out).astype(rows.dtype)

    def kernels(self) -> contextlib.AbstractContextManager:
        """The block a run's steps and evaluations run in (torch's deterministic mode); MLX has no such switch."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """The run is over: checkpointed layers get their own class back (the model is the user's)."""
        for layer, cls in self.restore:
            layer.__class__ = cls
        self.restore = []

    def loss_value(self, handles: list[mx.array]) -> float:
        return float(mx.stack(handles).mean().item())

    def finite(self) -> bool:
        return all(bool(mx.isfinite(v).all().item()) for _, v in tree_flatten(self.prompt.trainable_parameters()))

    def moments(self) -> dict[str, np.ndarray]:
        flat = dict(tree_flatten(self.opt.state))
        names = {"m": "exp_avg", "v": "exp_avg_sq"}
        return {f"{k.rsplit('.', 1)[0]}.{names[k.rsplit('.', 1)[1]]}": np.array(v.astype(mx.float32))
                for k, v in flat.items() if k.rsplit(".", 1)[-1] in names}

    def load_moments(self, tensors: dict[str, np.ndarray], step: int) -> None:
        self.opt = optim.AdamW(learning_rate=self.config.lr, betas=[0.9, 0.999], eps=1e-8,
                               weight_decay=self.config.weight_decay, bias_correction=True)
        self.opt.init(self.prompt.trainable_parameters())
        if not step:
            return
        names = {"exp_avg": "m", "exp_avg_sq": "v"}
        state = tree_unflatten([(f"{k.rsplit('.', 1)[0]}.{names[k.rsplit('.', 1)[1]]}", mx.array(v))
                                for k, v in tensors.items()])
        state["step"] = mx.array(step, dtype=mx.uint64)
        state["learning_rate"] = mx.array(self.config.lr, dtype=mx.float32)
        self.opt.state = state


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpoint_layers(model) -> list[tuple[Any, type]]:
    """Recompute each of ``model``'s transformer layers in the backward pass (idempotent); returns
    (layer, its class) for :meth:`Stepper.close` to put back when the run ends.

    Not mlx-lm's ``grad_checkpoint``: it replaces the layer *class's* ``__call__``, so every model of
    that class in the process (loaded before or after) would run checkpointed, and lose the shared
    prefix (:func:`lrpt.backends.mlx.model.shares_prefix`). Here each layer of this model moves to a
    subclass of its own class whose call runs under ``mx.checkpoint``, until the run ends; other
    models are untouched.
    """
    swapped = []
    for layer in model.layers:
        cls = type(layer)
        if getattr(cls, "_lrpt_checkpointed", False):
            continue
        if cls not in _CHECKPOINTED_CLASSES:
            _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {
                "__call__": _checkpointed_call(cls.__call__), "_lrpt_checkpointed": True,
                "__module__": cls.__module__})
        layer.__class__ = _CHECKPOINTED_CLASSES[cls]
        swapped.append((layer, cls))
    return swapped


def _checkpointed_call(call: Callable) -> Callable:
    """``call`` under ``mx.checkpoint``: its activations are recomputed in the backward pass. The
    layer's trainable parameters (none for a frozen base) enter as arrays, so they would get gradients."""

    def checkpointed(layer, *args, **kwargs):
        def inner(params, *args, **kwargs):
            layer.update(params)
            return call(layer, *args, **kwargs)

        return mx.checkpoint(inner)(layer.trainable_parameters(), *args, **kwargs)

    return checkpointed


def world() -> tuple[int, int]:
    """(rank, size) of the data-parallel group: ``mlx.launch`` sets it up, ``mx.distributed`` joins
    it (a group of one when the process was started alone)."""
    group = mx.distributed.init()
    return group.rank(), group.size()
