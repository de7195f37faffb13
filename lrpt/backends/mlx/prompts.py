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
from ...spec import PromptSpec
from ...tasks import Task

_ACTIVATIONS = {"elu": nn.elu, "relu": nn.relu, "gelu": nn.gelu}


class _Namespace(nn.Module):
    """An empty module that only gives its children a name prefix (``lopt.``, ``lopa.``)."""


class _Heads(nn.Module):
    """LoPA's two heads: Dropout → Linear(h, h′) → tanh → Linear(h′, k), as lists ``u`` and ``v``."""

    def __init__(self, dim: int, hidden: int, k_u: int, k_v: int, dropout: float):
        super().__init__()
        self.Z_S = mx.zeros((1, 1))  # replaced by load_params
        self.u = [nn.Linear(dim, hidden), nn.Linear(hidden, k_u)]
        self.v = [nn.Linear(dim, hidden), nn.Linear(hidden, k_v)]
        self.drop = nn.Dropout(dropout)

    def head(self, layers: list[nn.Linear], x: mx.array) -> mx.array:
        return layers[1](mx.tanh(layers[0](self.drop(x))))


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
            n, r = spec.n_tokens, spec.rank
            self.lopa = _Heads(self.dim, spec.head_hidden, n * r, self.dim * r, spec.dropout)
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

    def __call__(self, encoding: mx.array | None = None) -> mx.array:
        spec = self.spec
        if spec.method == "prompt":
            return self.prompt_embeddings
        if spec.method == "lopt1":
            return self.lopt.U @ self.lopt.V
        if spec.method == "lopt2":
            return _ACTIVATIONS[spec.activation](self.lopt.X0 @ self.lopt.U) @ self.lopt.V
        if encoding is None:
            raise ValueError("lopa needs the pooled encodings of the inputs")
        enc = encoding.astype(mx.float32)
        b = enc.shape[0]
        u = self.lopa.head(self.lopa.u, enc).reshape(b, spec.n_tokens, spec.rank)
        v = self.lopa.head(self.lopa.v, enc).reshape(b, self.dim, spec.rank)
        z_i = u @ v.transpose(0, 2, 1)
        z_s = self.lopa.Z_S[None]
        if spec.gate == "sigmoid":
            return z_s * mx.sigmoid(z_i)
        if spec.gate == "add":
            return z_s + z_i
        return mx.maximum(z_s, z_i)


def prompt_from_adapter(adapter: Adapter, model=None) -> PromptModule:
    """A trainable module holding the adapter's tensors (float32; MLX memory is unified, so
    ``model`` is only there to mirror the torch backend's placement)."""
    return PromptModule(adapter.spec, adapter.params)


def place(prompt, model) -> None:
    """Nothing to move on MLX (unified memory); mirrors the torch backend."""


def prompt_to_adapter(prompt: PromptModule, task: Task | None = None, base_model: BaseModelInfo | None = None) -> Adapter:
    """Snapshot a module as an :class:`Adapter` (validated; tensors copied to NumPy)."""
    from ... import __version__

    adapter = Adapter(prompt.spec, prompt.to_params(), task, base_model, {"backend": "mlx", "lrpt_version": __version__})
    return adapter.validate()
