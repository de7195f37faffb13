"""How a prompt gets into an mlx-lm model, which (unlike transformers) mostly takes no embeddings.

:func:`attach` gives two modules of the loaded model a subclass, once (weights and names untouched):

- the backbone (``model.model``) can return its states at chosen positions only, or return given
  states without running: ``model.logits_at`` uses that to apply the model's own head (lm_head or
  tied ``as_linear``, soft-capping...) to a few positions;
- where the backbone takes no ``input_embeddings=`` (gpt2, phi3, ...), the token-embedding
  module splices the prompt rows in at the prompt positions (``as_linear`` of tied heads keeps
  working: it is the same module). Models that take ``input_embeddings=`` get the rows that way.

Some models scale embeddings inside the backbone (Gemma multiplies by √d, rounded to bf16).
:func:`attach` measures that scale once, by probing what reaches the first layer for two tokens,
and prompts are divided by it, so the file's prompt space (the output of HF's
``get_input_embeddings()``) holds on MLX too; where HF itself scales outside that module (a config's
``embedding_multiplier``, Granite), prompt space is the unscaled embedding and prompts are not divided. The per-call state lives in a registry keyed by the
modules' ids, never on the user's objects, and each call scopes and restores it (reentrant).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...errors import LrptError


class _State:
    """Per-model call state read by the subclassed modules. It lives in a registry keyed by the
    modules' ids (MLX modules are dicts: unhashable, so no WeakKeyDictionary), never on them."""

    def __init__(self, scale: float = 1.0, takes_embeddings: bool = False):
        self.scale = scale  # prompt space → what the embedding module outputs: the backbone's factor, or 1
        self.takes_embeddings = takes_embeddings  # the backbone accepts input_embeddings= (no splice needed)
        self.attention_only = True  # every layer's mlx-lm cache is a KV cache (see model.attention_only)
        self.splice: tuple[mx.array, mx.array, mx.array] | None = None  # rows, src, is_prompt
        self.gather: mx.array | None = None
        self.override: mx.array | None = None


_STATES: dict[int, _State] = {}  # id(model), id(its backbone), id(its spliced embedding) → the model's state


@contextlib.contextmanager
def scoped(state: _State, **values):
    """Set call state for one call and restore what was there before (calls may nest)."""
    before = {k: getattr(state, k) for k in values}
    for k, v in values.items():
        setattr(state, k, v)
    try:
        yield state
    finally:
        for k, v in before.items():
            setattr(state, k, v)


def backbone(model) -> nn.Module:
    """The transformer under the LM head: ``model.model`` (most), ``transformer`` (GPT-2), ``backbone``,
    or inside ``language_model`` (mlx-lm's wrappers of multimodal checkpoints: Gemma 3 4B+, Mistral 3)."""
    for holder in (model, model.get("language_model") if isinstance(model, dict) else None):
        for name in ("model", "transformer", "backbone"):
            if isinstance(holder, dict) and isinstance(holder.get(name), nn.Module):
                return holder[name]
    raise LrptError(f"{type(model).__module__}: cannot find the backbone (model.model) of this mlx-lm model")


def embedding_module(model) -> nn.Module:
    """The token-embedding module: the backbone's embedding child with the most rows."""
    found = [m for _, m in backbone(model).children().items()
             if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))]
    if not found:
        raise LrptError("cannot find the token embedding of this mlx-lm model")
    return max(found, key=lambda m: table_rows(m))


def table_rows(emb) -> int:
    return int(emb.weight.shape[0])


def attach(model) -> _State:
    """Give the backbone (and, for models without ``input_embeddings=``, the embedding) their
    prompt-aware subclasses, once per model; weights and names are untouched."""
    state = _STATES.get(id(model))
    if state is not None:
        if not state.takes_embeddings:  # the embedding may have been replaced since (nn.quantize after load)
            _splice_embedding(model, state)
        return state
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    core = backbone(model)
    takes = "input_embeddings" in inspect.signature(type(core).__call__).parameters
    state = _State(takes_embeddings=takes)
    state.attention_only = all(type(c) in (KVCache, RotatingKVCache) for c in make_prompt_cache(model))
    for module in (model, core):
        _register(module, state)
    if not takes:
        _splice_embedding(model, state)  # the fallback: splice the rows in as tokens are embedded
    core.__class__ = _gathering(type(core))
    state.scale = _probe_scale(model)
    # HF applies a config's embedding_multiplier (Granite) to inputs_embeds in the model body, outside
    # get_input_embeddings(): there prompt space is the unscaled embedding, and prompts get the factor
    # as tokens do. Gemma's √d is inside HF's embedding module: prompt space includes it.
    outside = getattr(getattr(model, "args", None), "embedding_multiplier", None)
    if isinstance(outside, (int, float)) and outside and abs(state.scale / outside - 1.0) < 1e-2:
        state.scale = 1.0
    return state


def _register(module, state: _State) -> None:
    _STATES[id(module)] = state
    weakref.finalize(module, _STATES.pop, id(module), None)


def _splice_embedding(model, state: _State) -> None:
    """Give the model's current embedding module the splicing subclass (once per module)."""
    emb = embedding_module(model)
    if not getattr(type(emb), "_lrpt_spliced", False):
        _register(emb, state)
        emb.__class__ = _spliced(type(emb))


def _state(module) -> _State:
    return _STATES[id(module)]


def run_backbone(model, ids: mx.array, cache=None, rows: mx.array | None = None, src: mx.array | None = None,
                 is_prompt: mx.array | None = None, gather: mx.array | None = None) -> mx.array:
    """The backbone on token ids with prompt ``rows`` (prompt space) at the ``is_prompt`` slots
    (row ``src``), through ``input_embeddings=`` where the model takes it, else by the splice."""
    state = attach(model)
    splice = None
    if rows is not None and rows.shape[1]:
        rows = rows if state.scale == 1.0 else rows / state.scale
        splice = (rows, src, is_prompt)
    kwargs = {} if cache is None else {"cache": cache}
    if splice is not None and state.takes_embeddings:
        tokens = embedding_module(model)(ids)
        kwargs["input_embeddings"] = _spliced_rows(tokens, *splice)
        splice = None
    with scoped(state, splice=splice, gather=gather, override=None):
        return backbone(model)(ids, **kwargs)


def _spliced_rows(tokens: mx.array, rows: mx.array, src: mx.array, is_prompt: mx.array) -> mx.array:
    picked = mx.take_along_axis(rows, src[..., None], axis=1).astype(tokens.dtype)
    return mx.where(is_prompt[..., None], picked, tokens)


_CLASS_CACHE: dict[tuple[str, type], type] = {}


def _spliced(cls: type) -> type:
    key = ("splice", cls)
    if key not in _CLASS_CACHE:
        def __call__(self, x):  # noqa: N807
            out = cls.__call__(self, x)
            st = _state(self).splice
            return out if st is None else _spliced_rows(out, *st)

        _CLASS_CACHE[key] = type(f"Prompted{cls.__name__}", (cls,), {"__call__": __call__, "_lrpt_spliced": True})
    return _CLASS_CACHE[key]


def _gathering(cls: type) -> type:
    key = ("gather", cls)
    if key not in _CLASS_CACHE:
        def __call__(self, *args, **kwargs):  # noqa: N807
            st = _state(self)
            if st.override is not None:
                return st.override
            h = cls.__call__(self, *args, **kwargs)
            if st.gather is not None:
                h = mx.take_along_axis(h, st.gather[..., None], axis=1)
            return h

        _CLASS_CACHE[key] = type(f"Prompted{cls.__name__}", (cls,), {"__call__": __call__})
    return _CLASS_CACHE[key]


class _Stop(Exception):
    pass


def _probe_scale(model) -> float:
    """The factor by which the backbone multiplies token embeddings before layer 0 (1 for most)."""
    layer = model.layers[0]
    cls = type(layer)
    seen = {}

    def capture(self, x, *args, **kwargs):
        seen["x"] = x
        raise _Stop

    layer.__class__ = type("Probe", (cls,), {"__call__": capture})
    ids = mx.array([[1], [2]])
    try:
        backbone(model)(ids)
    except _Stop:
        pass
    finally:
        layer.__class__ = cls
    eps = float(np.finfo(np.float16).eps) if seen["x"].dtype == mx.float16 else \
        2.0 ** -7 if seen["x"].dtype == mx.bfloat16 else 1e-6
    x = np.array(seen["x"].astype(mx.float32))[:, 0].astype(np.float64)
    e = np.array(embedding_module(model)(ids).astype(mx.float32))[:, 0].astype(np.float64)
    dx, de = x[0] - x[1], e[0] - e[1]
    scale = float(dx @ de / (de @ de))
    # what layer 0 sees is rounded to the model's dtype (Gemma's e·√d, GPT-2's token + position rows in
    # bf16): the linearity check allows that rounding, a few ulps of each side
    tol = 1e-2 * np.abs(scale * de) + 1e-4 * np.abs(dx).max() + 4 * eps * (np.abs(x[0]) + np.abs(x[1]))
    if not np.all(np.abs(dx - scale * de) <= tol):
        raise LrptError(f"{model.model_type}: the backbone transforms embeddings non-linearly; lrpt cannot place prompts")
    return 1.0 if abs(scale - 1.0) < 8 * eps else scale  # a scale of 1 measured through rounding


