"""An experiment, not in the library: the shared static prompt packed with the rows' tokens.

lrpt's shared prefix (:mod:`lrpt.prefix`) runs the prompt through every block at batch 1, then the
rows behind its cached keys and values. Profiled on an H200 (Llama-3.2-1B shape, 32 × 48 tokens +
20, compiled; benchmarks/RESULTS.md), the prompt's own pass cost about 2 ms of the step: every
block's weights are read once more for 20 tokens, in many small kernels. Packing runs the prompt's
n rows and the B·T token rows through every projection and MLP as one sequence of n + B·T, so
the weights are read once; only attention sees the structure.

Earlier packed versions (280ac4d, 592a8dd, 4018b40) timed slower than the two-pass path, but they
switched the model's attention inside the compiled step, where torch 2.11 ran the model's own SDPA
over the packed sequence instead (benchmarks/RESULTS.md, "fourth version"). Kind ``sdpa`` changes
nothing in attention but the packing: the prompt attends causally to itself at batch 1, and the
rows attend to ``[prompt keys; own keys]`` under the same kind of 4-D mask that transformers builds
for the two-pass path, both through transformers' own SDPA call. With its attention switched
outside the compiled step (:func:`packed`) it measured 1.29× the compiled floor against 1.13× for
the two passes (32 × (48+20), 1B shape, H200).

A second kind, ``flex``, runs attention as one call over the whole packed sequence with
``torch.nn.attention.flex_attention``: the layout is a mask function (a token sees the prompt, and
causally its own row), so nothing is copied or expanded and the kernel (Triton, under torch.compile)
skips the blocks the mask rules out. FlexAttention has no backward on the CPU: there it is checked
forward only; its gradients run on CUDA.

``speed.py --packed METHOD [--packed-kinds sdpa flex]`` measures them (variants
``lrpt-METHOD-packed-KIND+compile``); ``tests/test_benchmarks.py`` checks them on a tiny Llama.
Models with attention soft-capping or sliding windows are refused (not implemented here).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from lrpt.backends.torch.model import embed
from lrpt.layout import Suffix

NAME = "lrpt_packed_prefix_experiment"


def _no_mask(*args, **kwargs) -> None:
    return None  # the packed forward builds its own layout and passes it to the attention function


def _check(layout, kwargs: dict) -> None:
    if layout is None:
        raise RuntimeError("the packed experiment's attention runs only inside forward_packed")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError("the packed experiment implements neither sliding windows nor soft-capping")


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              lrpt_packed=None, **kwargs):
    """Attention over the packed sequence: query, key, value (1, heads, n + B·T, head_dim) in, output
    (1, n + B·T, heads, head_dim) out, as transformers' own attention functions."""
    _check(lrpt_packed, kwargs)
    n, b, row_mask = lrpt_packed
    t = (query.shape[2] - n) // b

    def rows(x: torch.Tensor) -> torch.Tensor:  # (1, h, n + B·T, d) -> (B, h, T, d), views
        x = x[0].transpose(0, 1)[n:]  # (B·T, h, d): the projections' own layout
        return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)

    prompt, _ = sdpa_attention_forward(module, query[:, :, :n], key[:, :, :n], value[:, :, :n], None,
                                       scaling=scaling, is_causal=True)  # (1, n, h, d)
    keys = torch.cat([key[:, :, :n].expand(b, -1, -1, -1), rows(key)], dim=2)
    values = torch.cat([value[:, :, :n].expand(b, -1, -1, -1), rows(value)], dim=2)
    out, _ = sdpa_attention_forward(module, rows(query), keys, values, row_mask, scaling=scaling)  # (B, T, h, d)
    return torch.cat([prompt[0], out.reshape(b * t, *out.shape[2:])])[None], None


def flex(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
         lrpt_packed=None, **kwargs):
    """The packed sequence's attention as one FlexAttention call under the packed layout's block mask."""
    _check(lrpt_packed, kwargs)
    out = flex_attention(query, key, value, block_mask=lrpt_packed, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None  # (1, n + B·T, heads, head_dim)


def packed_block_mask(n: int, b: int, t: int, device):
    """FlexAttention's block mask of the layout ``[prompt (n); row 1 (t); …; row b (t)]``: a prompt
    token sees the prompt causally; a row's token sees the whole prompt and its own row causally.
    (Rows are right padded: a real token never sees a pad, which sits after the row's last token.)"""

    def mask(batch, head, q, k):
        q_row = torch.where(q < n, -1, (q - n) // t)
        k_row = torch.where(k < n, -1, (k - n) // t)
        q_pos = torch.where(q < n, q, n + (q - n) % t)
        k_pos = torch.where(k < n, k, n + (k - n) % t)
        return ((k < n) | (q_row == k_row)) & (k_pos <= q_pos)

    return create_block_mask(mask, None, None, n + b * t, n + b * t, device=device)


KINDS = {"sdpa": attention, "flex": flex}  # attention kind: its function, registered as NAME_kind
for _kind, _function in KINDS.items():
    AttentionInterface.register(f"{NAME}_{_kind}", _function)
    AttentionMaskInterface.register(f"{NAME}_{_kind}", _no_mask)


def forward_packed(model, prefix_embeds: torch.Tensor, suffix: Suffix, kind: str = "sdpa") -> torch.Tensor:
    """Drop-in for :func:`lrpt.backends.torch.model.forward_after_prefix`: last hidden states
    (B, T, d) of the suffix's tokens behind one shared (n, d) prompt, in one packed pass; ``kind``:
    attention as two SDPA calls (``sdpa``) or one FlexAttention call (``flex``)."""
    cfg = model.config
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "sliding_window", None):
        raise RuntimeError("the packed experiment runs models without soft-capping or sliding windows")
    if cfg._attn_implementation != f"{NAME}_{kind}":
        raise RuntimeError("forward_packed runs inside packed(), which selects its attention")
    n = suffix.n
    tok = embed(model, suffix.ids)
    b, t, d = tok.shape
    x = torch.cat([prefix_embeds.to(tok.dtype), tok.reshape(b * t, d)])[None]
    pos = torch.cat([torch.arange(n, device=tok.device), suffix.position_ids.reshape(-1)])[None]
    if kind == "flex":
        layout = packed_block_mask(n, b, t, tok.device)
    else:
        # Row query i (position n + i) sees every prompt key and its own keys 0..i that are not
        # padding: the two-pass path's mask (bottom-right causal over [prompt; row]).
        q = torch.arange(t, device=tok.device)
        k = torch.arange(n + t, device=tok.device)
        causal = k[None, :] <= q[:, None] + n
        valid = torch.cat([suffix.attention_mask.new_ones(b, n), suffix.attention_mask], dim=1).bool()
        layout = (n, b, causal[None, None] & valid[:, None, None, :])
    out = model.base_model(inputs_embeds=x, position_ids=pos, use_cache=False, lrpt_packed=layout)
    return out.last_hidden_state[0, n:].reshape(b, t, d)


@contextlib.contextmanager
def packed(be, model, kind: str = "sdpa"):
    """The torch backend ``be`` with its shared prefix packed (attention ``kind``) on ``model``, for
    the block. The model's attention is switched here, outside any compiled step. Switched inside
    it (the previous version), the compiled step under torch 2.11 on the H200 profiled as cuDNN SDPA
    kernels over the packed sequence and no FlexAttention kernel, and both kinds timed the same:
    the packed attention was, it seems, not the one that ran (the CPU's torch 2.13 ran it, exactly).
    speed.py now prints each variant's first loss, so a packed variant is checked where it is timed."""
    if kind not in KINDS:
        raise ValueError(f"packed attention kind {kind!r}: use one of {', '.join(KINDS)}")
    cfg = model.config
    real_forward, real_attention = be.forward_after_prefix, cfg._attn_implementation_internal
    be.forward_after_prefix = functools.partial(forward_packed, kind=kind)
    cfg._attn_implementation_internal = f"{NAME}_{kind}"
    try:
        yield
    finally:
        be.forward_after_prefix, cfg._attn_implementation_internal = real_forward, real_attention
