"""MLX modules for the four methods, with parameters under their canonical names.

Mirrors ``lrpt/backends/torch/prompts.py``: ``self.lopt.U`` flattens to ``lopt.U``, and
``self.lopa.u`` is a list of two ``nn.Linear``, which MLX flattens to ``lopa.u.0.weight``:
exactly the file's names. ``lopt.X0`` is frozen. Linear
weights are (out, in) in MLX as in the file, so no transposition is needed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...adapter import Adapter
from ...basemodel import BaseModelInfo
from ...methods import materialize
from ...spec import PromptSpec
from ...tasks import Task
from . import ops


class _Namespace(nn.Module):
    """An empty module that only gives its children a name prefix (``lopt.``, ``lopa.``)."""


class PromptModule(nn.Module):
    """A soft prompt. ``__call__()`` gives (n, d) for static methods; ``__call__(enc)`` (B, n, d) for lopa."""

    def __init__(self, spec: PromptSpec, params: dict[str, np.ndarray]):
        super().__init__()
        self.spec = spec
        key = {"prompt": "prompt_embeddings", "lopa": "lopa.Z_S"}.get(spec.method, "lopt.V")
        self.dim = int(params[key].shape[1])
        if spec.method in ("lopt1", "lopt2"):
            self.lopt = _Namespace()
        elif spec.method == "lopa":
            n, r, h2 = spec.n_tokens, spec.rank, spec.head_hidden
            self.lopa = _Namespace()  # LoPA heads: indices 0 and 1 as in the file (the math is the core's)
            self.lopa.u = [nn.Linear(self.dim, h2), nn.Linear(h2, n * r)]
            self.lopa.v = [nn.Linear(self.dim, h2), nn.Linear(h2, self.dim * r)]
        self.load_params(params)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """Copy canonical-named NumPy arrays in (strict: every tensor, exact shapes)."""
        expected = self.spec.param_shapes(self.dim)
        if set(params) != set(expected):
            raise ValueError(f"expected tensors {sorted(expected)}, got {sorted(params)}")
        arrays = [(k, mx.array(np.asarray(v, dtype=np.float32))) for k, v in params.items()]
        for k, a in arrays:
            if tuple(a.shape) != expected[k]:
                raise ValueError(f"tensor {k} has shape {tuple(a.shape)}, expected {expected[k]}")
        if self.spec.method == "prompt":
            self.prompt_embeddings = arrays[0][1]
        else:
            for k, a in arrays:
                self._set(k, a)
        if self.spec.method == "lopt2":
            self.lopt.freeze(keys=["X0"], recurse=False)

    def _set(self, name: str, value: mx.array) -> None:
        parts = name.split(".")
        obj = self
        for p in parts[:-1]:
            obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
        setattr(obj, parts[-1], value)

    def to_params(self) -> dict[str, np.ndarray]:
        """Canonical-named float32 NumPy copies of every tensor (X0 included)."""
        flat = dict(tree_flatten(self.parameters()))
        return {k: np.array(v.astype(mx.float32)) for k, v in flat.items()}

    def tensors(self) -> dict[str, mx.array]:
        """Every array by canonical name (parameters and the frozen X0), for the core's math."""
        return dict(tree_flatten(self.parameters()))

    def __call__(self, encoding: mx.array | None = None) -> mx.array:
        drop = self.spec.dropout if self.training and self.spec.method == "lopa" else 0.0
        enc = None if encoding is None else encoding.astype(mx.float32)
        return materialize(ops, self.spec, self.tensors(), enc, drop)


def prompt_from_adapter(adapter: Adapter, model=None) -> PromptModule:
    """A trainable module holding the adapter's tensors (float32; MLX memory is unified, so
    ``model`` is only there to mirror the torch backend's placement), in eval mode: a loaded
    adapter is for use (no LoPA dropout); training switches it to train mode."""
    module = PromptModule(adapter.spec, adapter.params)
    module.eval()
    return module


def place(prompt, model) -> None:
    """Nothing to move on MLX (unified memory); mirrors the torch backend."""


def prompt_to_adapter(prompt: PromptModule, task: Task | None = None, base_model: BaseModelInfo | None = None) -> Adapter:
    """Snapshot a module as an :class:`Adapter` (validated; tensors copied to NumPy)."""
    from ... import __version__

    adapter = Adapter(prompt.spec, prompt.to_params(), task, base_model, {"backend": "mlx", "lrpt_version": __version__})
    return adapter.validate()
