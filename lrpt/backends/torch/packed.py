"""The shared static prompt packed with the rows' tokens: one pass over ``[prompt; row 1; …; row B]``.

The first shared path ran the prompt through every block at batch 1 and then the rows behind its
cached keys and values. Profiled on an H200 (Llama-3.2-1B shape, 32 × 48 tokens + 20, compiled;
benchmarks/RESULTS.md), that second pass cost 2 ms of a 15 ms step: each block's weights were read
twice, once for 20 tokens. Every block's work but attention is per token, so here the prompt's n
rows and the B·T token rows go through each projection and MLP as one sequence of n + B·T, and only
attention sees the structure: the prompt attends causally to itself; row b's tokens attend to the
prompt's keys (shared, expanded over the rows) and causally to their own, as in the plain path.

Transformers calls attention through its ``AttentionInterface`` (models with
``_supports_attention_backend``), so the layout is one attention function, registered once and
selected on the model's config for the duration of the forward; positions, rotary tables, norms and
embedding scales stay the model's own code. Rows are right padded (the shared path's rule), so a
token never attends to a pad: pads sit after a row's last token.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ...layout import Suffix

# Imported here, not where they are used: an import statement traced by torch.compile is a graph
# break (transformers is a lazy module), and a step compiled whole then runs in pieces or eagerly.
try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # transformers < 4.53: no attention interface; the cached-prefix path runs
    AttentionInterface = None

NAME = "lrpt_packed_prefix"
_TAKES_KWARGS: dict[type, bool] = {}


def packs_prefix(model) -> bool:
    """Whether this model's attention runs through transformers' attention interface with nothing
    the packed function does not implement (logit soft-capping), and its forward passes keyword
    arguments down to attention (the layout travels that way). Under torch.compile's tracing the
    memo is read, never written (a write there fails dynamo's guards: the step compiles twice)."""
    cfg = text_config(model)
    if not getattr(model, "_supports_attention_backend", False) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    cls = type(model.base_model)
    takes = _TAKES_KWARGS.get(cls)
    if takes is None:
        params = inspect.signature(cls.forward).parameters.values()
        takes = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        if not torch.compiler.is_compiling():
            _TAKES_KWARGS[cls] = takes
    return takes and REGISTERED


def _no_mask(*args, **kwargs) -> None:
    return None


def text_config(model):
    return getattr(model.config, "get_text_config", lambda: model.config)()


@contextlib.contextmanager
def packed_attention(model):
    """The model's attention implementation switched to :func:`attention` for one forward."""
    cfg = text_config(model)
    real = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = NAME
    try:
        yield
    finally:
        cfg._attn_implementation_internal = real


def forward_packed(model, prefix_embeds: torch.Tensor, suffix: Suffix, embed) -> torch.Tensor:
    """Last hidden states (B, T, d) of the suffix's tokens behind one shared (n, d) prompt."""
    n = suffix.n
    tok = embed(model, suffix.ids)
    b, t, d = tok.shape
    x = torch.cat([prefix_embeds.to(tok.dtype), tok.reshape(b * t, d)])[None]
    pos = torch.cat([torch.arange(n, device=tok.device), suffix.position_ids.reshape(-1)])[None]
    with packed_attention(model):
        out = model.base_model(inputs_embeds=x, position_ids=pos, use_cache=False, lrpt_prefix=(n, b))
    return out.last_hidden_state[0, n:].reshape(b, t, d)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, lrpt_prefix: tuple[int, int] | None = None, **kwargs):
    """Attention over the packed sequence (query, key, value: (1, heads, n + B·T, head_dim)).

    Returns (1, n + B·T, heads, head_dim) like transformers' own functions. ``attention_mask`` is
    None (the mask function registered beside this one builds none): the layout is the mask.

    Attention alone is unpacked: each row's sequence is rebuilt as the plain path sees it, ``[prompt;
    row b]`` (B, n + T), and goes through transformers' own SDPA call, causal with no mask, so the
    same flash/cuDNN kernels and grouped-head handling run as for the plain model (a first version
    with boolean masks and repeated heads made the compiled step slower than the plain path). The
    prompt's outputs are identical in every row (causally it sees only itself); row 0's stand for
    them, and the other rows' n prompt queries are wasted attention work, small beside the
    projections and MLPs that now run once for the prompt.
    """
    if lrpt_prefix is None:
        raise RuntimeError(f"the {NAME} attention runs only inside lrpt's packed shared-prefix forward")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"the packed shared prefix does not implement attention {name}")
    n, b = lrpt_prefix
    heads, length, dim = query.shape[1], query.shape[2], query.shape[3]
    t = (length - n) // b

    def per_row(x: torch.Tensor) -> torch.Tensor:  # (1, h, n + B·T, d) -> (B, h, n + T, d)
        x = x[0].transpose(0, 1)  # (n + B·T, h, d), the projections' own layout
        rows = x[n:].reshape(b, t, *x.shape[1:])
        return torch.cat([x[None, :n].expand(b, -1, -1, -1), rows], dim=1).transpose(1, 2)

    mask = None
    if sliding_window and sliding_window < n + t:  # the window needs a mask (is_causal cannot say it)
        pos = torch.arange(n + t, device=query.device)
        mask = ((pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] < sliding_window))[None, None]
    out, _ = sdpa_attention_forward(module, per_row(query), per_row(key), per_row(value), mask,
                                    dropout=dropout if module.training else 0.0, scaling=scaling, is_causal=True)
    # out: (B, n + T, heads, dim)
    return torch.cat([out[0, :n], out[:, n:].reshape(b * t, heads, dim)])[None], None


REGISTERED = AttentionInterface is not None
if REGISTERED:
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _no_mask)  # the function builds its own masks
