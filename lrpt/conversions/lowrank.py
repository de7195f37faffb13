"""Low-rank compression of a prompt into ``lopt1``, and materialisation back to ``prompt``.

``compress`` takes the best rank-r approximation of X in Frobenius norm (Eckart–Young: the
truncated SVD X ≈ A_r S_r B_rᵀ) and splits it as U = A_r √S_r, V = √S_r B_rᵀ, so U and V have
balanced scales for further training. ``rank="auto"`` picks the smallest r whose relative
error ‖X − UV‖_F / ‖X‖_F is within ``tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..adapter import Adapter
from ..errors import ConversionError
from ..spec import PromptSpec


@dataclass
class Compression:
    adapter: Adapter
    rank: int
    relative_error: float
    param_ratio: float  # trainable parameters after / before


def _static_matrix(adapter: Adapter) -> np.ndarray:
    if not adapter.spec.is_static:
        raise ConversionError("lopa's prompt depends on each input: it has no single matrix to compress")
    return adapter.materialize().astype(np.float64)


def compress(adapter: Adapter, rank: int | str = "auto", tol: float = 0.01) -> Compression:
    """``prompt`` (or any static method) → ``lopt1`` of rank ``rank`` (or the smallest within ``tol``)."""
    x = _static_matrix(adapter)
    n, d = x.shape
    a, s, bt = np.linalg.svd(x, full_matrices=False)
    total = float(np.sqrt((s**2).sum())) or 1.0
    # error of rank r = sqrt(sum of the squared singular values left out)
    tail = np.sqrt(np.maximum(np.cumsum((s**2)[::-1])[::-1], 0.0))
    errors = np.append(tail[1:], 0.0) / total  # errors[r-1] = error with r kept
    if rank == "auto":
        if not tol >= 0:  # also NaN, which fails every comparison and would keep full rank unsaid
            raise ConversionError(f"--tol must be a number >= 0, got {tol}")
        rank = int(np.argmax(errors <= tol) + 1) if np.any(errors <= tol) else len(s)
    if not isinstance(rank, int) or not 1 <= rank <= min(n, d):
        raise ConversionError(f"rank must be between 1 and {min(n, d)} for a {n}×{d} prompt, or 'auto'")
    root = np.sqrt(s[:rank])
    params = {"lopt.U": (a[:, :rank] * root).astype(np.float32), "lopt.V": (root[:, None] * bt[:rank]).astype(np.float32)}
    spec = PromptSpec("lopt1", n_tokens=n, rank=rank)
    out = Adapter(spec, params, adapter.task, adapter.base_model, dict(adapter.created_by)).validate()
    before = adapter.spec.param_count(d)
    return Compression(out, rank, float(errors[rank - 1]), spec.param_count(d) / before)


def to_prompt(adapter: Adapter) -> Adapter:
    """``lopt1``/``lopt2`` (or ``prompt``) → a plain ``prompt`` adapter holding X."""
    x = _static_matrix(adapter).astype(np.float32)
    spec = PromptSpec("prompt", n_tokens=adapter.spec.n_tokens)
    return Adapter(spec, {"prompt_embeddings": x}, adapter.task, adapter.base_model, dict(adapter.created_by)).validate()
