"""An experiment, not in the library: the shared static prompt packed with the rows' tokens.

lrpt's shared prefix (:mod:`lrpt.prefix`) runs the prompt through every block at batch 1, then the
rows behind its cached keys and values. Profiled on an H200 (Llama-3.2-1B shape, 32 × 48 tokens +
20, compiled; benchmarks/RESULTS.md), the prompt's own pass cost about 2 ms of the step: every
block's weights are read once more for 20 tokens, in many small kernels. Packing runs the prompt's
n rows and the B·T token rows through every projection and MLP as one sequence of n + B·T, so
the weights are read once; only attention sees the structure.

Two packed versions were measured slower than the two-pass path and not taken (commits 280ac4d,
592a8dd/4018b40: boolean masks with repeated heads; each row's ``[prompt; row]`` rebuilt). This
version changes nothing in attention but the packing: the prompt attends causally to itself at
batch 1, and the rows attend to ``[prompt keys; own keys]`` under the same kind of 4-D mask that
transformers builds for the two-pass path, both through transformers' own SDPA call. If it is
still slower, packing itself costs more than it saves; if faster, attention was the cost before.

``speed.py --packed METHOD`` measures it (variant ``lrpt-METHOD-packed+compile``);
``tests/test_benchmarks.py`` checks it is exact on a tiny Llama. Models with attention soft-capping
or sliding windows are refused (this experiment does not implement them).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from lrpt.backends.torch.model import embed
from lrpt.layout import Suffix

NAME = "lrpt_packed_prefix_experiment"


def _no_mask(*args, **kwargs) -> None:
    return None  # the packed forward builds its own mask and passes it to :func:`attention`


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              lrpt_packed=None, **kwargs):
    """Attention over the packed sequence: query, key, value (1, heads, n + B·T, head_dim) in, output
    (1, n + B·T, heads, head_dim) out, as transformers' own attention functions."""
    if lrpt_packed is None:
        raise RuntimeError(f"the {NAME} attention runs only inside forward_packed")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError("the packed experiment implements neither sliding windows nor soft-capping")
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


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, _no_mask)


@contextlib.contextmanager
def _packed_attention(model):
    cfg = model.config
    real = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = NAME
    try:
        yield
    finally:
        cfg._attn_implementation_internal = real


def forward_packed(model, prefix_embeds: torch.Tensor, suffix: Suffix) -> torch.Tensor:
    """Drop-in for :func:`lrpt.backends.torch.model.forward_after_prefix`: last hidden states
    (B, T, d) of the suffix's tokens behind one shared (n, d) prompt, in one packed pass."""
    cfg = model.config
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "sliding_window", None):
        raise RuntimeError("the packed experiment runs models without soft-capping or sliding windows")
    n = suffix.n
    tok = embed(model, suffix.ids)
    b, t, d = tok.shape
    x = torch.cat([prefix_embeds.to(tok.dtype), tok.reshape(b * t, d)])[None]
    pos = torch.cat([torch.arange(n, device=tok.device), suffix.position_ids.reshape(-1)])[None]
    # Row query i (position n + i) sees every prompt key and its own keys 0..i that are not padding:
    # the two-pass path's mask (bottom-right causal over [prompt; row]).
    q = torch.arange(t, device=tok.device)
    k = torch.arange(n + t, device=tok.device)
    causal = k[None, :] <= q[:, None] + n
    valid = torch.cat([suffix.attention_mask.new_ones(b, n), suffix.attention_mask], dim=1).bool()
    mask = causal[None, None] & valid[:, None, None, :]
    with _packed_attention(model):
        out = model.base_model(inputs_embeds=x, position_ids=pos, use_cache=False, lrpt_packed=(n, b, mask))
    return out.last_hidden_state[0, n:].reshape(b, t, d)


@contextlib.contextmanager
def packed(be):
    """The torch backend ``be`` with its shared prefix packed, for the duration of the block."""
    real = be.forward_after_prefix
    be.forward_after_prefix = forward_packed
    try:
        yield
    finally:
        be.forward_after_prefix = real
