"""NumPy reference of every method: initialisation and materialisation. This is the truth.

Backends initialise their parameters from :func:`init_params` (so the same seed gives the
same prompt on every backend) and are tested against :func:`materialize`, which is the core's
one implementation (:mod:`lrpt.methods`) run with the NumPy op set (:mod:`lrpt.ops`) in float64:
not a third transcription. Arrays are float32 in and out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from . import methods, ops
from .errors import SpecError
from .spec import PromptSpec

DEFAULT_SIGMA = 0.02  # embedding scale assumed when no embedding matrix is given
HEAD_INIT_STD = 0.02  # LoPA second-layer weights: small, so u vᵀ ≈ 0 at init



def activation(name: str, x: np.ndarray) -> np.ndarray:
    """σ of LoPT-2 in float64 (``gelu`` is the exact, erf form, as ``torch.nn.functional.gelu``)."""
    return methods.activation(ops, name, np.asarray(x, dtype=np.float64))


# -- initialisation -------------------------------------------------------------------------


def init_params(
    spec: PromptSpec,
    dim: int,
    seed: int,
    embedding_matrix: np.ndarray | None = None,
    init_token_ids: list[int] | np.ndarray | None = None,
    *,
    sigma: float | None = None,
    vocab_size: int | None = None,
    embed_rows: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded initial parameters for ``spec`` on a model of width ``dim`` (see spec.py).

    The model enters in one of two ways. ``embedding_matrix`` (vocab, dim), the whole table, sets
    the scale σ (its std) and gives the rows ``init="vocab"`` and ``init="text"`` start from. Or,
    so that a backend never copies the whole table to the host, ``sigma`` (computed where the
    table lives), ``vocab_size`` and ``embed_rows(ids) -> (len(ids), dim)`` for just the rows
    needed. ``init_token_ids`` are the tokens of ``spec.init_text`` (the caller tokenises).
    """
    shapes = spec.param_shapes(dim)
    rng = np.random.default_rng(seed)
    emb = None if embedding_matrix is None else np.asarray(embedding_matrix, dtype=np.float32)
    if emb is not None and (emb.ndim != 2 or emb.shape[1] != dim):
        raise SpecError(f"embedding matrix has shape {emb.shape}, expected (vocab, {dim})")
    if emb is not None:
        sigma, vocab_size = float(emb.std()), emb.shape[0]
        embed_rows = emb.__getitem__
    sigma = DEFAULT_SIGMA if sigma is None else float(sigma)
    n, r = spec.n_tokens, spec.rank

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def start_matrix() -> np.ndarray | None:
        """The (n, d) matrix the prompt starts from for vocab/text init, else None."""
        if spec.init == "normal":
            return None
        if embed_rows is None or vocab_size is None:
            raise SpecError(f'init="{spec.init}" needs the model\'s embedding rows')
        if spec.init == "vocab":
            rows = rng.integers(0, vocab_size, size=n)
        else:
            if init_token_ids is None or len(init_token_ids) == 0:
                raise SpecError('init="text" needs the token ids of init_text (it tokenised to nothing?)')
            ids = np.asarray(init_token_ids, dtype=np.int64)
            rows = np.resize(ids, n)  # repeat or cut to n
            if rows.min() < 0 or rows.max() >= vocab_size:
                raise SpecError("init token ids fall outside the embedding matrix")
        return np.array(embed_rows(rows), dtype=np.float32)

    start = start_matrix()
    if spec.method == "prompt":
        return {"prompt_embeddings": start if start is not None else normal(shapes["prompt_embeddings"], sigma)}
    if spec.method == "lopt1":
        if start is None:
            return {"lopt.U": normal((n, r), 1.0 / math.sqrt(r)), "lopt.V": normal((r, dim), sigma)}
        a, s, bt = np.linalg.svd(start.astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:r])
        u, v = a[:, :r] * root, root[:, None] * bt[:r]
        # A start of rank < r (a text of fewer distinct tokens than r, e.g. two label words) leaves
        # components with s = 0: U's column and V's row both zero get zero gradient forever. Those
        # start as LoRA does (U column ~ N(0, 1/r), V row 0): X is unchanged and V learns at once.
        dead = s[:r] <= s[0] * 1e-6
        u[:, dead] = normal((n, int(dead.sum())), 1.0 / math.sqrt(r))
        v[dead] = 0.0
        return {"lopt.U": u.astype(np.float32), "lopt.V": v.astype(np.float32)}
    if spec.method == "lopt2":
        x0 = start if start is not None else normal((n, dim), sigma)
        return {
            "lopt.X0": x0,
            "lopt.U": normal((dim, r), 1.0 / (math.sqrt(dim) * sigma)),
            "lopt.V": normal((r, dim), sigma / math.sqrt(r)),
        }
    # lopa
    params = {"lopa.Z_S": start if start is not None else normal((n, dim), sigma)}
    bound = 1.0 / math.sqrt(dim)
    for head in ("u", "v"):
        h2, k = shapes[f"lopa.{head}.1.weight"][1], shapes[f"lopa.{head}.1.weight"][0]
        params[f"lopa.{head}.0.weight"] = rng.uniform(-bound, bound, (h2, dim)).astype(np.float32)
        params[f"lopa.{head}.0.bias"] = rng.uniform(-bound, bound, (h2,)).astype(np.float32)
        params[f"lopa.{head}.1.weight"] = normal((k, h2), HEAD_INIT_STD)
        params[f"lopa.{head}.1.bias"] = np.zeros((k,), np.float32)
    return params


# -- materialisation ------------------------------------------------------------------------


def materialize(spec: PromptSpec, params: dict[str, np.ndarray], encoding: np.ndarray | None = None) -> np.ndarray:
    """The prompt matrix: (n, d) for static methods, (B, n, d) for lopa given (B, h) encodings.

    This is :func:`lrpt.methods.materialize` (the code every backend runs) with the NumPy op set,
    in float64, in evaluation mode (no dropout).
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = None if encoding is None else np.asarray(encoding, np.float64)
    return np.asarray(methods.materialize(ops, spec, p, x), dtype=np.float32)


def init_for_model(spec: PromptSpec, seed: int, dim: int, tokenizer, vocab_size: int, sigma: float,
                   embed_rows) -> dict[str, np.ndarray]:
    """:func:`init_params` for a loaded model, the same on every backend: validate ``spec`` against
    the width ``dim``, tokenize ``init_text`` (``tokenizer``: an HF tokenizer), and read only the
    embedding rows the init needs (``embed_rows(ids)``); σ is the embeddings' std."""
    spec.validate(dim)
    ids = tokenizer(spec.init_text, add_special_tokens=False)["input_ids"] if spec.init == "text" else None
    return init_params(spec, dim, seed, None, ids, sigma=sigma, vocab_size=vocab_size, embed_rows=embed_rows)
