"""Load an mlx-lm model, put a prompt in front of each sequence, and run it with correct positions.

Mirrors ``lrpt/backends/torch/model.py`` function by function. What differs is how the
prompt gets in: most mlx-lm models do not take input embeddings, so :func:`attach` gives
two modules of the loaded model a subclass (their weights and names are untouched):

- the token-embedding module splices the prompt rows in at the prompt positions
  (``as_linear`` of tied heads keeps working, it is the same module);
- the backbone (``model.model``) can return its states at chosen positions only, or
  return given states without running: :func:`logits_at` uses that to apply the
  model's own head (lm_head or tied ``as_linear``, soft-capping...) to a few positions.

Some models scale embeddings inside the backbone (Gemma multiplies by √d, rounded to
bf16). :func:`attach` measures that scale once, by probing what reaches the first layer
for two tokens, and prompts are divided by it, so the file's prompt space (the output of
HF's ``get_input_embeddings()``) holds on MLX too.

Padding: right padding (``[prompt][tokens][pads]``) needs nothing from the model, since a
causal mask never lets real tokens see later pads. Left padding passes a stateless
per-layer cache that shifts positions by the pad count and masks the pads, the same
mechanism as mlx-lm's batched generation.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ... import methods
from ...basemodel import BaseModelInfo, fingerprint_from_rows, fingerprint_rows
from ...errors import LrptError
from ...layout import Batch, pack
from ...reference import init_for_model
from ...spec import PromptSpec
from . import ops
from .prompts import PromptModule

_DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
           "float16": mx.float16, "fp16": mx.float16}


class _State:
    """Per-model call state read by the subclassed modules. It lives in a registry keyed by the
    modules' ids (MLX modules are dicts: unhashable, so no WeakKeyDictionary), never on them."""

    def __init__(self, scale: float = 1.0, takes_embeddings: bool = False):
        self.scale = scale
        self.takes_embeddings = takes_embeddings  # the backbone accepts input_embeddings= (no splice needed)
        self.splice: tuple[mx.array, mx.array, mx.array] | None = None  # rows, src, is_prompt
        self.gather: mx.array | None = None
        self.override: mx.array | None = None


_STATES: dict[int, _State] = {}  # id(model), id(its embedding), id(its backbone) → the model's state


@contextlib.contextmanager
def _scoped(state: _State, **values):
    """Set call state for one call and restore what was there before (calls may nest)."""
    before = {k: getattr(state, k) for k in values}
    for k, v in values.items():
        setattr(state, k, v)
    try:
        yield state
    finally:
        for k, v in before.items():
            setattr(state, k, v)


def load_model(path: str | Path, dtype: str | None = None, device=None, quiet: bool = False):
    """Load a frozen mlx-lm model and its tokenizer from an HF folder.

    ``device`` and ``quiet`` exist for parity with the torch backend (mlx-lm shows no loading bar).
    """
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise LrptError(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None
    if dtype is not None:
        model.set_dtype(_DTYPES[dtype])
    model.freeze()
    model.eval()
    model.name_or_path = str(path)
    attach(model)
    return model, tokenizer


def hf_tokenizer(tokenizer):
    """The HF tokenizer inside mlx-lm's wrapper (the same one the torch backend uses)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def backbone(model) -> nn.Module:
    for name in ("model", "transformer", "backbone"):
        if isinstance(model.get(name) if isinstance(model, dict) else None, nn.Module):
            return model[name]
    raise LrptError(f"{type(model).__module__}: cannot find the backbone (model.model) of this mlx-lm model")


def _embedding(model) -> nn.Module:
    """The token-embedding module: the backbone's embedding child with the most rows."""
    found = [m for _, m in backbone(model).children().items()
             if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))]
    if not found:
        raise LrptError("cannot find the token embedding of this mlx-lm model")
    return max(found, key=lambda m: _rows(m))


def _rows(emb) -> int:
    return int(emb.weight.shape[0])


def attach(model) -> _State:
    """Give the backbone (and, for models without ``input_embeddings=``, the embedding) their
    prompt-aware subclasses, once per model; weights and names are untouched."""
    state = _STATES.get(id(model))
    if state is not None:
        return state
    emb, core = _embedding(model), backbone(model)
    takes = "input_embeddings" in inspect.signature(type(core).__call__).parameters
    state = _State(takes_embeddings=takes)
    for module in (model, emb, core):
        _STATES[id(module)] = state
        weakref.finalize(module, _STATES.pop, id(module), None)
    if not takes:
        emb.__class__ = _spliced(type(emb))  # the fallback: splice the rows in as tokens are embedded
    core.__class__ = _gathering(type(core))
    state.scale = _probe_scale(model)
    return state


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
        tokens = _embedding(model)(ids)
        kwargs["input_embeddings"] = _spliced_rows(tokens, *splice)
        splice = None
    with _scoped(state, splice=splice, gather=gather, override=None):
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

        _CLASS_CACHE[key] = type(f"Prompted{cls.__name__}", (cls,), {"__call__": __call__})
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
    x = np.array(seen["x"].astype(mx.float32))[:, 0]
    e = np.array(_embedding(model)(ids).astype(mx.float32))[:, 0]
    dx, de = (x[0] - x[1]).astype(np.float64), (e[0] - e[1]).astype(np.float64)
    scale = float(dx @ de / (de @ de))
    if not np.allclose(dx, scale * de, rtol=1e-2, atol=1e-4 * np.abs(dx).max()):
        raise LrptError(f"{model.model_type}: the backbone transforms embeddings non-linearly; lrpt cannot place prompts")
    return 1.0 if abs(scale - 1.0) < 1e-6 else scale


def hidden_size(model) -> int:
    emb = _embedding(model)
    if isinstance(emb, nn.QuantizedEmbedding):
        return int(emb(mx.array([0])).shape[-1])
    return int(emb.weight.shape[1])


def embed(model, ids: mx.array) -> mx.array:
    """Token embeddings in prompt space: what enters the first layer (Gemma's scale included)."""
    state = attach(model)
    out = _embedding(model)(ids)
    return out * state.scale if state.scale != 1.0 else out


def embedding_std(model) -> float:
    """The std of the input-embedding table in prompt space, in two chunked passes (mean, then
    squared deviations), so no copy of the table is ever held."""
    vocab = _rows(_embedding(model))

    def chunks():
        for i in range(0, vocab, 8192):
            yield embed(model, mx.arange(i, min(i + 8192, vocab))).astype(mx.float32)

    count = vocab * hidden_size(model)
    mean = sum(float(c.sum()) for c in chunks()) / count
    return (sum(float(mx.square(c - mean).sum()) for c in chunks()) / count) ** 0.5


def embedding_rows(model, ids) -> np.ndarray:
    """Rows of the input-embedding table in prompt space, float32 on the host."""
    return np.array(embed(model, mx.array(np.asarray(ids, dtype=np.int32))).astype(mx.float32))


def base_model_info(model) -> BaseModelInfo:
    """What an adapter records about ``model`` (sizes and an embedding fingerprint)."""
    vocab = _rows(_embedding(model))
    rows = np.array(embed(model, mx.array(fingerprint_rows(vocab))).astype(mx.float32))
    return BaseModelInfo(
        name_or_path=getattr(model, "name_or_path", None),
        model_type=getattr(model, "model_type", None) or getattr(model.args, "model_type", None),
        hidden_size=int(rows.shape[1]),
        vocab_size=vocab,
        embedding_fingerprint=fingerprint_from_rows(rows),
    )


def init_prompt(spec: PromptSpec, model, tokenizer=None, seed: int = 0) -> PromptModule:
    """A new prompt for ``model`` initialised by the core (same seed, same prompt on PyTorch)."""
    params = init_for_model(spec, seed, hidden_size(model), hf_tokenizer(tokenizer), _rows(_embedding(model)),
                            embedding_std(model), lambda rows: embedding_rows(model, rows))
    return PromptModule(spec, params)


# -- batches ----------------------------------------------------------------------------------


def make_batch(tokens: Sequence[Sequence[int]], n_prompt: int | Sequence[int], padding_side: str = "right",
               pad_id: int = 0, pad_to_multiple: int = 1, device=None) -> Batch:
    """Rows of token ids behind prompts of ``n_prompt`` tokens (:func:`lrpt.layout.pack`), as arrays
    (``device`` mirrors the torch backend; MLX memory is unified)."""
    return Batch.from_layout(pack(tokens, n_prompt, padding_side, pad_id, pad_to_multiple), ops.asarray)


def asarray_for(model):
    """Host arrays → MLX arrays (unified memory: no device to choose)."""
    return ops.asarray


def inference(model):
    """The context scoring runs in: nothing to switch on MLX (gradients exist only under value_and_grad)."""
    return contextlib.nullcontext()


class _LeftPadCache:
    """A stateless stand-in for a KV cache: shifts positions and masks left pads (one full pass)."""

    def __init__(self, left_pad: mx.array):
        self.offset = -left_pad
        self.left_pad = left_pad

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_):
        from mlx_lm.models.base import create_causal_mask

        return create_causal_mask(n, 0, window_size=window_size, left_padding=self.left_pad)

    def __bool__(self) -> bool:
        return True


# -- prompts for a batch ----------------------------------------------------------------------


def encode(model, batch: Batch, kind: str = "base", pooling: str = "mean") -> mx.array:
    """LoPA's x′: the frozen model on the input alone (``base``) or the token embeddings (``embed``)."""
    if kind == "embed":
        states = embed(model, batch.token_ids)
    else:
        states = run_backbone(model, batch.token_ids)  # right padded: causal, exact
    return mx.stop_gradient(methods.pool(ops, states.astype(mx.float32), batch.lengths, pooling))


def prompt_rows(model, prompt, batch: Batch, which: Sequence[int] | None = None) -> mx.array:
    """(B, n_max, d) float32 prompt rows: one prompt for all, ``prompt[which[b]]``, or none (the core's)."""
    return methods.prompt_rows(ops, prompt, which, batch.token_ids.shape[0], lambda key: encode(model, batch, *key),
                               lambda: _empty_prompt(model, batch))


def _empty_prompt(model, batch: Batch) -> mx.array:
    return mx.zeros((batch.token_ids.shape[0], 0, hidden_size(model)))


def _call_backbone(model, prompt_embeds: mx.array, batch: Batch, gather: mx.array | None) -> mx.array:
    # ``src`` also indexes token slots (past the prompt rows): point those at row 0 before the
    # gather, since MLX does not bounds-check gathers and only prompt slots are read.
    src = mx.where(batch.is_prompt, batch.src, 0)
    cache = [_LeftPadCache(batch.left_pad)] * len(model.layers) if batch.left_padded else None
    return run_backbone(model, batch.ids, cache, prompt_embeds, src, batch.is_prompt, gather)


def forward_hidden(model, prompt_embeds: mx.array, batch: Batch) -> mx.array:
    """Last hidden states (B, W, d) of the backbone on the prompted batch."""
    return _call_backbone(model, prompt_embeds, batch, None)


def logits_at(model, hidden: mx.array, index: mx.array) -> mx.array:
    """Float32 logits (B, K, V) at packed positions ``index`` (B, K) only, by the model's own head."""
    picked = mx.take_along_axis(hidden, index[..., None], axis=1)
    return head(model, picked)


def head(model, hidden: mx.array) -> mx.array:
    """The model's own head (lm_head or tied embedding, soft-capping...) on some hidden states."""
    with _scoped(attach(model), override=hidden, splice=None, gather=None):
        return model(mx.zeros(hidden.shape[:2], mx.int32)).astype(mx.float32)


def forward_logits(model, prompt, batch: Batch, which: Sequence[int] | None = None) -> mx.array:
    """Float32 logits (B, T, V) at every real token of every row (for tests and tools)."""
    index = batch.token_pos  # padded token slots point at the last real token
    rows = prompt_rows(model, prompt, batch, which)
    hidden = _call_backbone(model, rows, batch, index)
    return head(model, hidden)
