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
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ... import methods
from ...basemodel import BaseModelInfo, fingerprint_from_rows, fingerprint_rows
from ...errors import LrptError
from ...layout import Batch, pack
from ...reference import init_params
from ...spec import PromptSpec
from . import ops
from .prompts import PromptModule

_DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
           "float16": mx.float16, "fp16": mx.float16}


class _State:
    """Per-model call state read by the patched modules (a plain object: not in the weight tree)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.splice: tuple[mx.array, mx.array, mx.array] | None = None  # rows, src, is_prompt
        self.gather: mx.array | None = None
        self.override: mx.array | None = None


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
    """Give the embedding and backbone their prompt-aware subclasses (idempotent)."""
    state = model.__dict__.get("_lrpt_state")
    if state is not None:
        return state
    state = _State()
    object.__setattr__(model, "_lrpt_state", state)
    emb, core = _embedding(model), backbone(model)
    emb.__class__ = _spliced(type(emb))
    core.__class__ = _gathering(type(core))
    emb._lrpt_state_ref = state
    core._lrpt_state_ref = state
    state.scale = _probe_scale(model)
    return state


def _state(module) -> _State:
    return module.__dict__["_lrpt_state_ref"]


_CLASS_CACHE: dict[tuple[str, type], type] = {}


def _spliced(cls: type) -> type:
    key = ("splice", cls)
    if key not in _CLASS_CACHE:
        def __call__(self, x):  # noqa: N807
            out = cls.__call__(self, x)
            st = _state(self).splice
            if st is None:
                return out
            rows, src, is_prompt = st
            return mx.where(is_prompt[..., None], mx.take_along_axis(rows, src[..., None], axis=1).astype(out.dtype), out)

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
    dim = hidden_size(model)
    spec.validate(dim)
    ids = None
    if spec.init == "text":
        ids = hf_tokenizer(tokenizer)(spec.init_text, add_special_tokens=False)["input_ids"]
    params = init_params(spec, dim, seed, None, ids, sigma=embedding_std(model), vocab_size=_rows(_embedding(model)),
                         embed_rows=lambda rows: embedding_rows(model, rows))
    return PromptModule(spec, params)


# -- batches ----------------------------------------------------------------------------------


def make_batch(
    tokens: Sequence[Sequence[int]],
    n_prompt: int | Sequence[int],
    padding_side: str = "right",
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    device=None,
) -> Batch:
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
    state = attach(model)
    if kind == "embed":
        states = embed(model, batch.token_ids)
    else:
        state.splice = state.gather = state.override = None
        states = backbone(model)(batch.token_ids)  # right padded: causal, exact
    return mx.stop_gradient(methods.pool(ops, states.astype(mx.float32), batch.lengths, pooling))


def prompt_rows(model, prompt, batch: Batch, which: Sequence[int] | None = None) -> mx.array:
    """(B, n_max, d) float32 prompt rows: one prompt for all, ``prompt[which[b]]``, or none (the core's)."""
    return methods.prompt_rows(ops, prompt, which, batch.token_ids.shape[0], lambda key: encode(model, batch, *key),
                               lambda: _empty_prompt(model, batch))


def _empty_prompt(model, batch: Batch) -> mx.array:
    return mx.zeros((batch.token_ids.shape[0], 0, hidden_size(model)))


def _call_backbone(model, prompt_embeds: mx.array, batch: Batch, gather: mx.array | None) -> mx.array:
    state = attach(model)
    rows = prompt_embeds if state.scale == 1.0 else prompt_embeds / state.scale
    # No prompt (the plain model): nothing to splice, and no row a gather could read.
    # ``src`` also indexes token slots (past the prompt rows): point those at row 0 before the
    # gather, since MLX does not bounds-check gathers and the splice reads only prompt slots.
    src = mx.where(batch.is_prompt, batch.src, 0)
    state.splice = (rows, src, batch.is_prompt) if rows.shape[1] else None
    state.gather, state.override = gather, None
    try:
        cache = None
        if batch.left_padded:
            cache = [_LeftPadCache(batch.left_pad)] * len(model.layers)
        return backbone(model)(batch.ids, cache=cache) if cache else backbone(model)(batch.ids)
    finally:
        state.splice = state.gather = None


def forward_hidden(model, prompt_embeds: mx.array, batch: Batch) -> mx.array:
    """Last hidden states (B, W, d) of the backbone on the prompted batch."""
    return _call_backbone(model, prompt_embeds, batch, None)


def logits_at(model, hidden: mx.array, index: mx.array) -> mx.array:
    """Float32 logits (B, K, V) at packed positions ``index`` (B, K) only, by the model's own head."""
    picked = mx.take_along_axis(hidden, index[..., None], axis=1)
    return head(model, picked)


def head(model, hidden: mx.array) -> mx.array:
    """The model's own head (lm_head or tied embedding, soft-capping...) on some hidden states."""
    state = attach(model)
    state.override = hidden
    try:
        return model(mx.zeros(hidden.shape[:2], mx.int32)).astype(mx.float32)
    finally:
        state.override = None


def forward_logits(model, prompt, batch: Batch, which: Sequence[int] | None = None) -> mx.array:
    """Float32 logits (B, T, V) at every real token of every row (for tests and tools)."""
    index = batch.token_pos  # padded token slots point at the last real token
    rows = prompt_rows(model, prompt, batch, which)
    hidden = _call_backbone(model, rows, batch, index)
    return head(model, hidden)
