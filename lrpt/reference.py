"""NumPy reference of every method: initialisation and materialisation. This is the truth.

Backends initialise their parameters from :func:`init_params` (so the same seed gives the
same prompt on every backend) and are tested against :func:`materialize`. Everything here is
float32 in and out; internal arithmetic is float64 where it is cheap, to stay a good
reference for float32 backends.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SpecError
from .spec import PromptSpec

DEFAULT_SIGMA = 0.02  # embedding scale assumed when no embedding matrix is given
HEAD_INIT_STD = 0.02  # LoPA second-layer weights: small, so u vᵀ ≈ 0 at init

_erf = np.frompyfunc(math.erf, 1, 1)


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """σ of LoPT-2. ``gelu`` is the exact (erf) form, as ``torch.nn.functional.gelu``."""
    x = np.asarray(x, dtype=np.float64)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
    raise SpecError(f"unknown activation {name!r}")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# -- initialisation -------------------------------------------------------------------------


def init_params(
    spec: PromptSpec,
    dim: int,
    seed: int,
    embedding_matrix: np.ndarray | None = None,
    init_token_ids: list[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Seeded initial parameters for ``spec`` on a model of width ``dim`` (see spec.py).

    ``embedding_matrix`` (vocab, dim) sets the scale σ and is needed by ``init="vocab"``
    and ``init="text"``; ``init_token_ids`` are the tokens of ``spec.init_text`` (the
    caller tokenises, the core has no tokenizer).
    """
    shapes = spec.param_shapes(dim)
    rng = np.random.default_rng(seed)
    emb = None if embedding_matrix is None else np.asarray(embedding_matrix, dtype=np.float32)
    if emb is not None and (emb.ndim != 2 or emb.shape[1] != dim):
        raise SpecError(f"embedding matrix has shape {emb.shape}, expected (vocab, {dim})")
    sigma = float(emb.std()) if emb is not None else DEFAULT_SIGMA
    n, r = spec.n_tokens, spec.rank

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def start_matrix() -> np.ndarray | None:
        """The (n, d) matrix the prompt starts from for vocab/text init, else None."""
        if spec.init == "normal":
            return None
        if emb is None:
            raise SpecError(f'init="{spec.init}" needs the model\'s embedding matrix')
        if spec.init == "vocab":
            rows = rng.integers(0, emb.shape[0], size=n)
        else:
            if init_token_ids is None or len(init_token_ids) == 0:
                raise SpecError('init="text" needs the token ids of init_text (it tokenised to nothing?)')
            ids = np.asarray(init_token_ids, dtype=np.int64)
            rows = np.resize(ids, n)  # repeat or cut to n
            if rows.min() < 0 or rows.max() >= emb.shape[0]:
                raise SpecError("init token ids fall outside the embedding matrix")
        return emb[rows].copy()

    start = start_matrix()
    if spec.method == "prompt":
        return {"prompt_embeddings": start if start is not None else normal(shapes["prompt_embeddings"], sigma)}
    if spec.method == "lopt1":
        if start is None:
            return {"lopt.U": normal((n, r), 1.0 / math.sqrt(r)), "lopt.V": normal((r, dim), sigma)}
        a, s, bt = np.linalg.svd(start.astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:r])
        return {
            "lopt.U": (a[:, :r] * root).astype(np.float32),
            "lopt.V": (root[:, None] * bt[:r]).astype(np.float32),
        }
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


def lopa_head(params: dict[str, np.ndarray], head: str, x: np.ndarray) -> np.ndarray:
    """One LoPA head in eval mode: Linear → tanh → Linear, on (B, h) encodings."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k.startswith(f"lopa.{head}.")}
    hidden = np.tanh(x @ p[f"lopa.{head}.0.weight"].T + p[f"lopa.{head}.0.bias"])
    return hidden @ p[f"lopa.{head}.1.weight"].T + p[f"lopa.{head}.1.bias"]


def gate(name: str, z_s: np.ndarray, z_i: np.ndarray) -> np.ndarray:
    """Combine the shared part Z_S with the instance part Z_I."""
    if name == "sigmoid":
        return z_s * sigmoid(z_i)
    if name == "add":
        return z_s + z_i
    if name == "max":
        return np.maximum(z_s, z_i)
    raise SpecError(f"unknown gate {name!r}")


def materialize(spec: PromptSpec, params: dict[str, np.ndarray], encoding: np.ndarray | None = None) -> np.ndarray:
    """The prompt matrix: (n, d) for static methods, (B, n, d) for lopa given (B, h) encodings."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    if spec.method == "prompt":
        out = p["prompt_embeddings"]
    elif spec.method == "lopt1":
        out = p["lopt.U"] @ p["lopt.V"]
    elif spec.method == "lopt2":
        out = activation(spec.activation, p["lopt.X0"] @ p["lopt.U"]) @ p["lopt.V"]
    elif spec.method == "lopa":
        if encoding is None:
            raise SpecError("lopa is instance-dependent: materialize needs the (B, h) encodings")
        x = np.asarray(encoding, np.float64)
        if x.ndim != 2:
            raise SpecError(f"lopa encodings must be (B, h), got shape {x.shape}")
        n, r = spec.n_tokens, spec.rank
        d = p["lopa.Z_S"].shape[1]
        u = lopa_head(params, "u", x).reshape(-1, n, r)
        v = lopa_head(params, "v", x).reshape(-1, d, r)
        z_i = u @ v.transpose(0, 2, 1)
        out = gate(spec.gate, p["lopa.Z_S"][None], z_i)
    else:
        raise SpecError(f"unknown method {spec.method!r}")
    return out.astype(np.float32)
