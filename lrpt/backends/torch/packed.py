"""The shared static prompt packed with the rows' tokens: one pass, for a training step compiled whole.

The two-pass shared prefix (:func:`.model.forward_after_prefix`) runs the prompt through every
block at batch 1, then the rows behind its cached keys and values, so every block's weights are
read twice, once for only n tokens. Packing runs ``[prompt (n); row 1 (T); …; row B (T)]`` as one
sequence of n + B·T through every projection and MLP, so the weights are read once; only attention
sees the structure, and it is the two-pass path's attention: the prompt causal on itself at batch
1, then each row's tokens over ``[prompt keys; own keys]`` under the same 4-D mask (bottom-right
causal, padding masked), both through transformers' own SDPA call. Same loss and gradients as the
two-pass path, up to float rounding (tests/test_backends.py, tests/test_gpu.py).

Measured on an H200 (Llama-3.2-1B shape, bf16, the step compiled whole with CUDA graphs;
benchmarks/RESULTS.md): at 32 × (48+20) 13.88 ms, 1.29× the compiled hand-written floor, against
15.73 ms (1.14×) for the two-pass path; at 16 × (256+20) 1.09× against 1.04×, same runs.

How it is switched on: the model's attention implementation is set to this module's function
**outside** the compiled step (:func:`packed_attention`, entered by :func:`.step.compiled`) and
read inside it by :func:`.model.forward_after_prefix`. Switched inside the traced step (four earlier
tries), torch 2.11's compiled step ran the model's own SDPA over the packed sequence instead.
Only for a step compiled whole: eagerly (the prompt pass's launches are what packing saves, and
eager CUDA steps take the plain path anyway) it is not used. Models with attention soft-capping,
sliding windows or a text sub-config are not packed (:func:`packable`): they keep the two-pass path.
"""

from __future__ import annotations

import contextlib

import torch

try:  # a transformers with attention and mask registries (5.x has them); older ones keep two passes
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - the test environment's transformers has them
    AttentionInterface = None

from ...errors import LrptError
from ...layout import Suffix

NAME = "lrpt_packed_prefix"


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              lrpt_packed=None, **kwargs):
    """Attention over the packed sequence: query, key, value (1, heads, n + B·T, head_dim) in, output
    (1, n + B·T, heads, head_dim) out, as transformers' own attention functions."""
    if lrpt_packed is None:
        raise LrptError("the packed prefix's attention ran outside forward_packed: the model's attention is"
                        " switched only around a packed step (lrpt.backends.torch.packed)")
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


def _no_mask(*args, **kwargs) -> None:
    return None  # forward_packed builds its own layout and hands it to the attention function


# Registered at import, not in the traced step: registering there changes state dynamo guards on.
if AttentionInterface is not None:
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _no_mask)


def packable(model) -> bool:
    """Whether ``model`` runs packed: a transformers model that calls attention through its
    ``AttentionInterface`` with SDPA (what the packed attention reproduces), one config (no text
    sub-config), no attention soft-capping and no sliding window (not implemented here)."""
    cfg = model.config
    return (AttentionInterface is not None and getattr(model, "_supports_attention_backend", False) and cfg._attn_implementation == "sdpa"
            and cfg.get_text_config() is cfg
            and not getattr(cfg, "attn_logit_softcapping", None) and not getattr(cfg, "sliding_window", None))


def is_packed(model) -> bool:
    """Whether ``model``'s attention is switched to the packed layout now (read inside the step)."""
    return model.config._attn_implementation == NAME


@contextlib.contextmanager
def packed_attention(model, enabled: bool = True):
    """The model's attention switched to the packed layout for the block (outside any compiled step)."""
    if not enabled:
        yield
        return
    cfg = model.config
    real = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = NAME
    try:
        yield
    finally:
        cfg._attn_implementation_internal = real


def forward_packed(model, prefix_embeds: torch.Tensor, tok: torch.Tensor, suffix: Suffix) -> torch.Tensor:
    """Last hidden states (B, T, d) of the suffix's embedded tokens ``tok`` behind one shared (n, d)
    prompt, in one packed pass (rows right padded: a real token never sees a pad)."""
    n = suffix.n
    b, t, d = tok.shape
    x = torch.cat([prefix_embeds.to(tok.dtype), tok.reshape(b * t, d)])[None]
    pos = torch.cat([torch.arange(n, device=tok.device), suffix.position_ids.reshape(-1)])[None]
    # Row query i (position n + i) sees every prompt key and its own keys 0..i that are not padding:
    # the two-pass path's mask (bottom-right causal over [prompt; row]).
    q = torch.arange(t, device=tok.device)
    k = torch.arange(n + t, device=tok.device)
    causal = k[None, :] <= q[:, None] + n
    valid = torch.cat([suffix.attention_mask.new_ones(b, n), suffix.attention_mask], dim=1).bool()
    layout = (n, b, causal[None, None] & valid[:, None, None, :])
    out = model.base_model(inputs_embeds=x, position_ids=pos, use_cache=False, lrpt_packed=layout)
    return out.last_hidden_state[0, n:].reshape(b, t, d)
