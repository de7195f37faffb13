"""Training on PyTorch: autograd, AdamW and compilation for the core's step (:mod:`lrpt.training`).

Plain AdamW (fused on CUDA) on the prompt's float32 parameters, autocast to the model's half
dtype on CUDA, gradient accumulation and clipping. Nothing reads a value back to the host: the
loss stays on the device until the shared loop asks for it at a log point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...errors import TrainingError
from ...trainer import TrainConfig
from .model import autocast


class Stepper:
    """One optimizer step over micro-batches; the AdamW moments in the core's checkpoint schema."""

    def __init__(self, model, prompt, loss: Callable[[dict[str, Any]], torch.Tensor], config: TrainConfig):
        if config.grad_checkpoint:
            raise TrainingError("grad_checkpoint is the MLX backend's (recomputing layers in the backward pass):"
                                " drop --grad-checkpoint with --backend torch")
        self.model, self.prompt, self.config = model, prompt, config
        self.named = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                     fused=model.device.type == "cuda")
        # With ``compile``, traced once per batch shape (CUDA graphs with compile_mode="reduce-overhead").
        self.loss = torch.compile(loss, mode=config.compile_mode) if config.compile else loss
        self.dropout = prompt.spec.method == "lopa" and prompt.spec.dropout > 0

    def step(self, batches: list[dict[str, torch.Tensor]], lr: float, seed: int) -> torch.Tensor:
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.model.device)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.dropout):  # dropout from (seed, step) only
            if self.dropout:
                torch.manual_seed(seed)
            for arrays in batches:
                with autocast(self.model):
                    loss = self.loss(arrays) / len(batches)
                loss.backward()
                total = total + loss.detach()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

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
