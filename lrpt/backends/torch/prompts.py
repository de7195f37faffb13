"""PyTorch modules for the four methods, with parameters under their canonical names.

Submodules spell the names: ``self.lopt.U`` is the state-dict key ``lopt.U`` and
``self.lopa.u[0].weight`` is ``lopa.u.0.weight``, so conversion to and from an
:class:`~lrpt.adapter.Adapter` is a plain name-for-name copy. Parameters are float32; the
prompt is cast to the model's dtype where it enters the model (``model.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...adapter import Adapter
from ...basemodel import BaseModelInfo
from ...methods import materialize, prompt_list
from ...spec import PromptSpec
from ...tasks import Task
from . import ops


class _Namespace(nn.Module):
    """An empty module that only gives its children a name prefix (``lopt.``, ``lopa.``)."""


def _head(h: int, hidden: int, k: int) -> nn.ModuleList:
    """A LoPA head's two linear layers, indices 0 and 1 as in the file (the math is the core's)."""
    return nn.ModuleList([nn.Linear(h, hidden), nn.Linear(hidden, k)])


class PromptModule(nn.Module):
    """A soft prompt. ``forward()`` gives (n, d) for static methods; ``forward(enc)`` (B, n, d) for lopa."""

    def __init__(self, spec: PromptSpec, params: dict[str, np.ndarray]):
        super().__init__()
        self.spec = spec
        dim = params[{"prompt": "prompt_embeddings", "lopa": "lopa.Z_S"}.get(spec.method, "lopt.V")].shape[1]
        self.dim = int(dim)
        shapes = spec.param_shapes(self.dim)
        if spec.method == "prompt":
            self.prompt_embeddings = nn.Parameter(torch.empty(shapes["prompt_embeddings"]))
        elif spec.method in ("lopt1", "lopt2"):
            self.lopt = _Namespace()
            if spec.method == "lopt2":
                self.lopt.register_buffer("X0", torch.empty(shapes["lopt.X0"]))
            self.lopt.U = nn.Parameter(torch.empty(shapes["lopt.U"]))
            self.lopt.V = nn.Parameter(torch.empty(shapes["lopt.V"]))
        else:
            self.lopa = _Namespace()
            self.lopa.Z_S = nn.Parameter(torch.empty(shapes["lopa.Z_S"]))
            n, r, h2 = spec.n_tokens, spec.rank, spec.head_hidden
            self.lopa.u = _head(self.dim, h2, n * r)
            self.lopa.v = _head(self.dim, h2, self.dim * r)
        self.load_params(params)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """Copy canonical-named NumPy arrays in (strict: every tensor, exact shapes)."""
        state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in params.items()}
        self.load_state_dict(state, strict=True)

    def to_params(self) -> dict[str, np.ndarray]:
        """Canonical-named float32 NumPy copies of every tensor (X0 included)."""
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.state_dict().items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by canonical name (parameters and the fixed X0), for the core's math."""
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def forward(self, encoding: torch.Tensor | None = None) -> torch.Tensor:
        drop = self.spec.dropout if self.training and self.spec.method == "lopa" else 0.0
        return materialize(ops, self.spec, self.tensors(), None if encoding is None else encoding.float(), drop)


def prompt_from_adapter(adapter: Adapter, model=None) -> PromptModule:
    """A trainable module holding the adapter's tensors (float32, on ``model``'s device), in eval
    mode: a loaded adapter is for use (no LoPA dropout); training switches it to train mode."""
    module = PromptModule(adapter.spec, adapter.params).eval()
    return module.to(model.device) if model is not None else module


def place(prompt, model) -> None:
    """Move prompt module(s) to the model's device (in place), so no caller has to say where."""
    for m in prompt_list(prompt):
        p = next(m.parameters(), None)
        if p is not None and p.device != model.device:
            m.to(model.device)


def prompt_to_adapter(
    prompt: PromptModule, task: Task | None = None, base_model: BaseModelInfo | None = None
) -> Adapter:
    """Snapshot a module as an :class:`Adapter` (validated; tensors copied to NumPy)."""
    adapter = Adapter(
        prompt.spec, prompt.to_params(), task, base_model, {"backend": "torch", "lrpt_version": _version()}
    )
    return adapter.validate()


def _version() -> str:
    from ... import __version__

    return __version__
