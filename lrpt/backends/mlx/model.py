"""Load an mlx-lm model, put a prompt in front of each sequence, and run it with correct positions.

Mirrors ``lrpt/backends/torch/model.py`` function by function. How the prompt gets into an
mlx-lm model (its ``input_embeddings=`` or a spliced embedding, states at chosen positions, the
model's own head on given states, Gemma's embedding scale) is :mod:`.splice`'s.

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
from ...adapter import dtype_name
from ...basemodel import BaseModelInfo, fingerprint_from_rows, fingerprint_rows
from ...errors import LrptError, first_line
from ...layout import Batch, Suffix, pack
from ...reference import init_for_model
from ...spec import PromptSpec
from . import ops
from .prompts import PromptModule
from .splice import attach, embedding_module, run_backbone, scoped, table_rows


def load_model(path: str | Path, dtype: str | None = None, device=None, quiet: bool = False, fsdp: bool = False):
    """Load a frozen mlx-lm model and its tokenizer from an HF folder.

    ``dtype`` defaults to the checkpoint's own (as mlx-lm loads it; torch's default is float32 off CUDA,
    so a bf16 folder scores a little differently there unless both are given one dtype). ``device``
    and ``quiet`` exist for parity with the torch backend (mlx-lm shows no loading bar); ``fsdp`` is
    refused (PyTorch's).
    """
    import mlx_lm

    if fsdp:
        from .step import refuse_fsdp

        refuse_fsdp()

    try:
        model, tokenizer = mlx_lm.load(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:  # TypeError/KeyError: mlx-lm reading a config
        first = first_line(exc)
        raise LrptError(f"cannot load model {path} with mlx-lm: {first}") from None
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype_name(dtype, LrptError)))  # as torch: the canonical name is the dtype's
    model.freeze()
    model.eval()
    model.name_or_path = str(path)
    attach(model)
    return model, tokenizer


def device_kind(model) -> str:
    """Where the model computes: mlx's default device, ``gpu`` (Metal or CUDA) or ``cpu``."""
    del model  # mlx computes on its default device, not a model's
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def hf_tokenizer(tokenizer):
    """The HF tokenizer inside mlx-lm's wrapper (the same one the torch backend uses)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def hidden_size(model) -> int:
    emb = embedding_module(model)
    if isinstance(emb, nn.QuantizedEmbedding):
        return int(emb(mx.array([0])).shape[-1])
    return int(emb.weight.shape[1])


def embed(model, ids: mx.array) -> mx.array:
    """Token embeddings in prompt space: what enters the first layer (Gemma's scale included)."""
    state = attach(model)
    out = embedding_module(model)(ids)
    return out * state.scale if state.scale != 1.0 else out


def embedding_std(model) -> float:
    """The std of the input-embedding table in prompt space, in two chunked passes (mean, then
    squared deviations), so no copy of the table is ever held."""
    vocab = table_rows(embedding_module(model))

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
    vocab = table_rows(embedding_module(model))
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
    params = init_for_model(spec, seed, hidden_size(model), hf_tokenizer(tokenizer), table_rows(embedding_module(model)),
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
    if batch.left_padded and not attention_only(model):
        raise LrptError(f"{model.model_type}: left padding needs attention-only layers; pad on the right"
                        " (lrpt's default), which this model runs exactly")
    cache = [_LeftPadCache(batch.left_pad)] * len(model.layers) if batch.left_padded else None
    return run_backbone(model, batch.ids, cache, prompt_embeds, src, batch.is_prompt, gather)


def forward_hidden(model, prompt_embeds: mx.array, batch: Batch) -> mx.array:
    """Last hidden states (B, W, d) of the backbone on the prompted batch."""
    return _call_backbone(model, prompt_embeds, batch, None)


def shares_prefix(model) -> bool:
    """Whether :func:`forward_after_prefix` runs ``model`` exactly, gradients included.

    mlx-lm models attend to whatever keys their per-layer cache objects hand back, at positions from
    its offset, and ``mx.grad`` flows through them: yes, unless the layers run checkpointed
    (``--grad-checkpoint``, :func:`lrpt.backends.mlx.step._checkpoint_layers`, or mlx-lm's own
    ``grad_checkpoint``, which patches the layer class). ``mx.checkpoint``
    differentiates only through the arrays passed to the layer, and the cache (holding the prompt's
    keys and values) is an object it does not look into: the prompt's gradient through them is lost
    (measured: a different step). Nor where a layer keeps state other than keys and values (hybrid
    models: LFM2's convolutions, Mamba and linear-attention layers): the stand-in caches have nothing
    for those layers to read.
    """
    cls = type(model.layers[0])
    mlx_lm_patched = getattr(cls.__call__, "__qualname__", "").startswith("grad_checkpoint.")  # mlx-lm's own
    return not (getattr(cls, "_lrpt_checkpointed", False) or mlx_lm_patched) and attention_only(model)


def attention_only(model) -> bool:
    """Whether every layer's mlx-lm cache is a plain KV cache (full or sliding), which lrpt's one-pass
    stand-ins (shared prefix, left padding) imitate; found once per model, when it is attached."""
    return attach(model).attention_only


class _OnePass:
    """A stand-in for one layer's KV cache for a single pass: tokens sit at positions ``offset``..,
    and the mask is mlx-lm's causal one for that offset (with the layer's window, if any)."""

    offset = 0

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(n, self.offset, return_array, window_size)


class _Recorder(_OnePass):
    """Keeps the keys and values of the pass (the prompt's, at positions 0..n−1) and hands them back."""

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class _Behind(_OnePass):
    """Puts a prompt's keys and values, broadcast over the batch, before the pass's own: tokens attend
    to them and sit at positions n.., exactly as behind the prompt in one sequence."""

    def __init__(self, keys: mx.array, values: mx.array, batch: int):
        self.prefix = (mx.broadcast_to(keys, (batch, *keys.shape[1:])),
                       mx.broadcast_to(values, (batch, *values.shape[1:])))
        self.offset = keys.shape[2]

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.prefix[0], keys], axis=2), mx.concatenate([self.prefix[1], values], axis=2)


def forward_after_prefix(model, prefix_embeds: mx.array, suffix: Suffix) -> mx.array:
    """Last hidden states (B, W−n, d) of the suffix's tokens behind one shared (n, d) prompt.

    The prompt runs once, at batch 1, and each layer's keys and values are kept; the tokens then run
    behind them, broadcast over the rows, at positions n.. (the caches' offset). The batch is right
    padded (:func:`lrpt.layout.after_prefix`), so the causal mask alone keeps real tokens off the
    pads, and the suffix's mask and positions need not be read. Gradients flow through the kept
    keys and values into the prompt, once.
    """
    n, layers = suffix.n, len(model.layers)
    recorders = [_Recorder() for _ in range(layers)]
    run_backbone(model, mx.zeros((1, n), mx.int32), recorders, prefix_embeds[None], mx.arange(n)[None],
                 mx.ones((1, n), mx.bool_))
    batch = suffix.ids.shape[0]
    return run_backbone(model, suffix.ids, [_Behind(r.keys, r.values, batch) for r in recorders])


def logits_at(model, hidden: mx.array, index: mx.array) -> mx.array:
    """Float32 logits (B, K, V) at packed positions ``index`` (B, K) only, by the model's own head."""
    picked = mx.take_along_axis(hidden, index[..., None], axis=1)
    return head(model, picked)


def head(model, hidden: mx.array) -> mx.array:
    """The model's own head (lm_head or tied embedding, soft-capping...) on some hidden states."""
    with scoped(attach(model), override=hidden, splice=None, gather=None):
        return model(mx.zeros(hidden.shape[:2], mx.int32)).astype(mx.float32)


def forward_logits(model, prompt, batch: Batch, which: Sequence[int] | None = None) -> mx.array:
    """Float32 logits (B, T, V) at every real token of every row (for tests and tools)."""
    index = batch.token_pos  # padded token slots point at the last real token
    rows = prompt_rows(model, prompt, batch, which)
    hidden = _call_backbone(model, rows, batch, index)
    return head(model, hidden)
