"""Where every prompt row and token sits in a padded batch: the positions-and-padding rule, once.

Row b's content is ``[prompt (n_b)][tokens (l_b)]`` with position ids 0..n_b+l_b−1, padded on the
left (``[pads][prompt][tokens]``) or the right (``[prompt][tokens][pads]``) to a common width.
Both backends build their batches from :func:`pack` (NumPy on the host, once per batch), so the
layout, and with it every result, is the same on PyTorch and MLX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    token_pos: np.ndarray  # (B, T) packed index of each token
    lengths: np.ndarray  # (B,) tokens per row
    n_prompt: np.ndarray  # (B,) prompt length per row
    left_pad: np.ndarray  # (B,) pads before each row's content


def pack(tokens: Sequence[Sequence[int]], n_prompt: int | Sequence[int], padding_side: str = "left",
         pad_id: int = 0, pad_to_multiple: int = 1) -> Layout:
    """Lay out rows of token ids behind prompts of ``n_prompt`` tokens (per row or shared)."""
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    b = len(tokens)
    n = np.full(b, int(n_prompt)) if isinstance(n_prompt, (int, np.integer)) else np.array(n_prompt, np.int64)
    lengths = np.array([len(t) for t in tokens], np.int64)
    if b == 0 or lengths.min() < 1:
        raise LrptError("a row has no tokens: every input needs at least one token")
    n_max, t_max = int(n.max()), int(lengths.max())
    content = n + lengths
    width = int(math.ceil(int(content.max()) / pad_to_multiple) * pad_to_multiple)
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
    return Layout(ids, src, is_prompt, mask, pos, token_ids, token_pos, lengths, n, left)
