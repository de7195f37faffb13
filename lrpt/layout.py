"""Where every prompt row and token sits in a padded batch: the positions-and-padding rule, once.

Row b's content is ``[prompt (n_b)][tokens (l_b)]`` with position ids 0..n_b+l_b−1, padded on the
left (``[pads][prompt][tokens]``) or the right (``[prompt][tokens][pads]``) to a common width.
Both backends build their batches from :func:`pack` (NumPy on the host, once per batch), so the
layout, and with it every result, is the same on PyTorch and MLX.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import LrptError


@dataclass
class Layout:
    """Index arrays of a packed batch (B rows, width W, at most T tokens, prompts up to n_max).

    ``src[b, w]`` reads the concatenation ``[prompt rows (n_max); tokens (T)]`` of row b (pads
    read the first token slot, and are masked); ``ids`` holds token ids at token slots and
    ``pad_id`` elsewhere, for backends that splice prompt rows into an embedding lookup.
    """

    ids: np.ndarray  # (B, W) token ids at token slots
    src: np.ndarray  # (B, W) index into [prompt (n_max); tokens (T)]
    is_prompt: np.ndarray  # (B, W) bool
    attention_mask: np.ndarray  # (B, W) 1 at real (prompt or token) slots
    position_ids: np.ndarray  # (B, W)
    token_ids: np.ndarray  # (B, T) right-padded real tokens
    token_pos: np.ndarray  # (B, T) packed index of each token (padded slots: the last token's)
    lengths: np.ndarray  # (B,) tokens per row
    n_prompt: np.ndarray  # (B,) prompt length per row
    left_pad: np.ndarray  # (B,) pads before each row's content
    last_pos: np.ndarray  # (B,) packed index of each row's last token


def pack(tokens: Sequence[Sequence[int]], n_prompt: int | Sequence[int], padding_side: str = "left",
         pad_id: int = 0, pad_to_multiple: int = 1, width: int | None = None,
         token_width: int | None = None) -> Layout:
    """Lay out rows of token ids behind prompts of ``n_prompt`` tokens (per row or shared).

    ``width`` and ``token_width`` fix W and T instead of fitting them to the rows (a compiled
    step traces once per shape, so its batches come in a few fixed shapes: :mod:`lrpt.shapes`);
    the extra slots are padding, masked like any other."""
    if padding_side not in ("left", "right"):
        raise LrptError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    b = len(tokens)
    n = np.full(b, int(n_prompt)) if isinstance(n_prompt, (int, np.integer)) else np.array(n_prompt, np.int64)
    lengths = np.array([len(t) for t in tokens], np.int64)
    if b == 0 or lengths.min() < 1:
        raise LrptError("a row has no tokens: every input needs at least one token")
    n_max, t_max = int(n.max()), int(lengths.max())
    content = n + lengths
    fitted = int(math.ceil(int(content.max()) / pad_to_multiple) * pad_to_multiple)
    if width is None:
        width = fitted
    elif width < int(content.max()):
        raise LrptError(f"a batch row needs {int(content.max())} positions, more than the fixed width {width}")
    if token_width is not None:
        if token_width < t_max:
            raise LrptError(f"a batch row has {t_max} tokens, more than the fixed token width {token_width}")
        t_max = token_width
    ids = np.full((b, width), pad_id, np.int64)
    src = np.full((b, width), n_max, np.int64)
    is_prompt = np.zeros((b, width), bool)
    mask = np.zeros((b, width), np.int64)
    pos = np.zeros((b, width), np.int64)
    token_ids = np.full((b, t_max), pad_id, np.int64)
    token_pos = np.zeros((b, t_max), np.int64)
    left = np.zeros(b, np.int64)
    for i, row in enumerate(tokens):
        ni, li, ci = int(n[i]), int(lengths[i]), int(content[i])
        start = width - ci if padding_side == "left" else 0
        left[i] = start
        src[i, start : start + ni] = np.arange(ni)
        src[i, start + ni : start + ci] = n_max + np.arange(li)
        is_prompt[i, start : start + ni] = True
        ids[i, start + ni : start + ci] = row
        mask[i, start : start + ci] = 1
        pos[i, start : start + ci] = np.arange(ci)
        token_ids[i, :li] = row
        token_pos[i, :li] = start + ni + np.arange(li)
        token_pos[i, li:] = start + ci - 1  # padded token slots repeat the row's last token
    last = token_pos[np.arange(b), lengths - 1]
    return Layout(ids, src, is_prompt, mask, pos, token_ids, token_pos, lengths, n, left, last)


@dataclass
class Batch:
    """A :class:`Layout` on a framework: the same fields as arrays of that framework (converted once by
    a backend's ``make_batch``), plus whether it is left padded, known on the host so compiled code
    never reads it back. Both backends use this one class; each reads the fields it needs."""

    ids: Any
    src: Any
    is_prompt: Any
    attention_mask: Any
    position_ids: Any
    token_ids: Any
    token_pos: Any
    lengths: Any
    n_prompt: Any
    left_pad: Any
    last_pos: Any
    left_padded: bool = False

    @classmethod
    def from_layout(cls, lay: Layout, asarray: Callable[[np.ndarray], Any]) -> Batch:
        return cls(**{f.name: asarray(getattr(lay, f.name)) for f in fields(lay)},
                   left_padded=bool(lay.left_pad.max() > 0))

    def arrays(self, prefix: str = "") -> dict[str, Any]:
        """The array fields (for a compiled function, which takes pytrees of arrays), keys prefixed."""
        return {prefix + f.name: getattr(self, f.name) for f in fields(self) if f.name != "left_padded"}

    @classmethod
    def unpack(cls, arrays: dict[str, Any], prefix: str) -> Batch:
        """The batch whose :meth:`arrays` were stored under ``prefix`` (scoring and training are right padded)."""
        return cls(**{k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})


def fixed_width(n_max: int, tokens: int | None, pad_to_multiple: int) -> int | None:
    """The width W of a batch whose token width is fixed at ``tokens`` (None: fitted to the rows)."""
    if tokens is None:
        return None
    return int(math.ceil((n_max + tokens) / pad_to_multiple) * pad_to_multiple)


@dataclass
class Suffix:
    """The token part of a right-padded batch whose rows all follow one shared prompt of ``n`` tokens.

    The prompt sits once, at positions 0..n−1, in front of every row (a batch-1 prefix the rows
    attend to); a row's tokens follow at positions n..n+ℓ−1, then its pads, which the mask hides.
    Index k of these arrays is packed index n+k of the :class:`Batch` they come from, so states
    computed for them answer a packed index ``i`` at ``i − n``.
    """

    ids: Any  # (B, W−n) token ids, pads after each row's tokens
    attention_mask: Any  # (B, W−n) 1 at real tokens
    position_ids: Any  # (B, W−n) n.. at real tokens
    n: int


def after_prefix(batch: Batch, n: int) -> Suffix:
    """The token part of a right-padded ``batch`` whose rows all carry the same ``n``-token prompt.

    Right padding puts every row's prompt at slots 0..n−1, so the suffix is a plain slice (no
    gather); a left-padded batch would leave pads between prompt and tokens, which sliding-window
    attention (it measures distance in slots) would count: it is refused here.
    """
    if batch.left_padded:
        raise LrptError("a shared prompt prefix needs a right-padded batch")
    return Suffix(batch.ids[:, n:], batch.attention_mask[:, n:], batch.position_ids[:, n:], n)


def scoring_arrays(rows: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], n: Sequence[int],
                   pad_id: int = 0, pad_to_multiple: int = 1, tokens: int | None = None) -> dict[str, Any]:
    """Host-side layout for label scoring (right padded), as ``{name: Layout or array}``.

    Single-token label words need the input batch only (``in``) and the ids (``label_ids``);
    multi-token words add one input+word sequence per (row, label) (``seq``) and the positions of
    the word's tokens (``index``, ``target``, ``weight``). ``tokens`` fixes the input batch's
    token width (and with it every shape here), for compiled steps.
    """
    n_max = int(max(n))
    out: dict[str, Any] = {"in": pack(rows, n, "right", pad_id, pad_to_multiple,
                                      fixed_width(n_max, tokens, pad_to_multiple), tokens)}
    if all(len(ids) == 1 for ids in label_ids):
        out["label_ids"] = np.array([ids[0] for ids in label_ids], np.int64)
        return out
    k = len(label_ids)
    long_rows = [list(r) + list(ids) for r in rows for ids in label_ids]
    seq_tokens = None if tokens is None else tokens + max(map(len, label_ids))
    out["seq"] = pack(long_rows, [x for x in n for _ in range(k)], "right", pad_id, pad_to_multiple,
                      fixed_width(n_max, seq_tokens, pad_to_multiple), seq_tokens)
    return {**out, **_targets(long_rows, [len(label_ids[j % k]) for j in range(len(long_rows))])}


def completion_arrays(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], n: int, pad_id: int = 0,
                      pad_to_multiple: int = 1, tokens: int | None = None,
                      target_width: int | None = None) -> dict[str, Any]:
    """Host-side layout for the completion loss: the input alone (``in``, LoPA encodes it) and
    input+target (``seq``) with the target tokens' positions. ``tokens`` fixes the token width of
    both batches and ``target_width`` the width of the target arrays, for compiled steps."""
    seqs = [list(a) + list(t) for a, t in zip(inputs, targets)]
    width = fixed_width(n, tokens, pad_to_multiple)
    return {"in": pack(inputs, n, "right", pad_id, 1 if tokens is None else pad_to_multiple, width, tokens),
            "seq": pack(seqs, n, "right", pad_id, pad_to_multiple, width, tokens),
            **_targets(seqs, [len(t) for t in targets], target_width)}


def _targets(seqs, n_targets, width: int | None = None) -> dict[str, np.ndarray]:
    from .data import target_positions

    index, target, weight = target_positions(seqs, n_targets, width)
    return {"index": index, "target": target, "weight": weight}


def to_arrays(host: dict[str, Any], asarray: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """A flat dict of framework arrays from :func:`scoring_arrays` / :func:`completion_arrays`
    (layouts become ``in_*`` / ``seq_*`` fields): one pytree, ready for a compiled step."""
    out: dict[str, Any] = {}
    for key, value in host.items():
        if isinstance(value, Layout):
            out.update(Batch.from_layout(value, asarray).arrays(f"{key}_"))
        else:
            out[key] = asarray(value)
    return out
