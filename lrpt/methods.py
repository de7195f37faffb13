"""Every method's prompt, written once against an op set ``xp`` (see :mod:`lrpt.ops`).

``materialize(xp, spec, params, encoding)`` is the prompt: (n, d) for the static methods,
(B, n, d) for LoPA given (B, h) encodings. ``params`` maps the adapter file's canonical tensor
names to ``xp`` arrays, so the same function runs on NumPy (the reference), PyTorch and MLX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import SpecError
from .spec import PromptSpec


def activation(xp, name: str, x):
    """LoPT-2's σ."""
    try:
        return {"elu": xp.elu, "relu": xp.relu, "gelu": xp.gelu}[name](x)
    except KeyError:
        raise SpecError(f"unknown activation {name!r}") from None


def gate(xp, name: str, z_s, z_i):
    """LoPA's g: how the shared part Z_S and the instance part Z_I combine."""
    if name == "sigmoid":
        return z_s * xp.sigmoid(z_i)
    if name == "add":
        return z_s + z_i
    if name == "max":
        return xp.maximum(z_s, z_i)
    raise SpecError(f"unknown gate {name!r}")


def lopa_head(xp, params: Mapping[str, Any], head: str, x, dropout: float = 0.0):
    """One LoPA head: Dropout → Linear(h, h′) → tanh → Linear(h′, k), on (B, h) encodings."""
    if dropout:
        x = xp.dropout(x, dropout)
    hidden = xp.tanh(xp.linear(x, params[f"lopa.{head}.0.weight"], params[f"lopa.{head}.0.bias"]))
    return xp.linear(hidden, params[f"lopa.{head}.1.weight"], params[f"lopa.{head}.1.bias"])


def materialize(xp, spec: PromptSpec, params: Mapping[str, Any], encoding=None, dropout: float = 0.0):
    """The prompt matrix of ``spec`` from its tensors (``dropout``: LoPA heads, training only)."""
    if spec.method == "prompt":
        return params["prompt_embeddings"]
    if spec.method == "lopt1":
        return xp.matmul(params["lopt.U"], params["lopt.V"])
    if spec.method == "lopt2":
        return xp.matmul(activation(xp, spec.activation, xp.matmul(params["lopt.X0"], params["lopt.U"])),
                         params["lopt.V"])
    if spec.method != "lopa":
        raise SpecError(f"unknown method {spec.method!r}")
    if encoding is None:
        raise SpecError("lopa is instance-dependent: it needs the (B, h) encodings of the inputs")
    if len(encoding.shape) != 2:
        raise SpecError(f"lopa encodings must be (B, h), got shape {tuple(encoding.shape)}")
    b, n, r = encoding.shape[0], spec.n_tokens, spec.rank
    d = params["lopa.Z_S"].shape[1]
    u = xp.reshape(lopa_head(xp, params, "u", encoding, dropout), (b, n, r))
    v = xp.reshape(lopa_head(xp, params, "v", encoding, dropout), (b, d, r))
    return gate(xp, spec.gate, params["lopa.Z_S"][None], xp.matmul(u, xp.swap_last(v)))


def pool(xp, hidden, lengths, pooling: str):
    """LoPA's x′ from (B, T, h) right-padded states: the mean over each row's real tokens, or its last."""
    if pooling == "last":
        return xp.row_at(hidden, lengths - 1)
    valid = xp.float32(xp.arange(hidden.shape[1], like=hidden)[None] < lengths[:, None])
    return xp.sum(hidden * valid[..., None], 1) / xp.float32(lengths)[:, None]


def prompt_list(prompt: Any) -> list:
    """None → [], one prompt → [it], a sequence of prompts (mixed adapters) → a list."""
    if prompt is None:
        return []
    return [prompt] if hasattr(prompt, "spec") else list(prompt)


def prompt_rows(xp, prompt: Any, which: Sequence[int] | None, b: int, encode: Callable[[tuple[str, str]], Any],
                empty: Callable[[], Any]):
    """(B, n_max, d) float32 prompt rows of a batch of ``b`` rows: one prompt for all, row b carrying
    ``prompt[which[b]]`` (mixed adapters), or ``empty()`` (B, 0, d) for the plain model.

    Static prompts are computed once and broadcast to their rows; LoPA prompts run on their
    rows' encodings, ``encode((encoder, pooling))`` (each kind computed once for the whole batch).
    Shorter prompts are zero-padded to n_max (the layout never reads past a row's own n).
    """
    if prompt is None:
        return empty()
    prompts = prompt_list(prompt)
    which = [0] * b if which is None else list(which)
    n_max = max(prompts[w].spec.n_tokens for w in set(which))
    pieces, order, encodings = [], [], {}
    for k, p in enumerate(prompts):
        idx = [b for b, w in enumerate(which) if w == k]
        if not idx:
            continue
        if p.spec.is_static:
            x = xp.expand_batch(xp.float32(p()), len(idx))
        else:
            key = (p.spec.encoder, p.spec.pooling)
            if key not in encodings:
                encodings[key] = encode(key)
            rows = encodings[key]
            # all rows: no gather (an index built on the host could not be recorded in a CUDA graph)
            x = xp.float32(p(rows if idx == list(range(b)) else xp.take0(rows, idx)))
        pieces.append(xp.pad_axis1(x, n_max))
        order += idx
    if len(pieces) == 1 and order == list(range(len(which))):
        return pieces[0]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return xp.take0(xp.concat0(pieces), inverse)
