"""Load an HF causal LM, put a prompt in front of each sequence, and run it with correct positions.

How a prompt enters (DESIGN.md, "Positions and padding"): each row's content is
``[prompt][tokens]`` with position ids 0..n+ℓ−1, and the batch is padded on the left
(``[pads][prompt][tokens]``) or the right (``[prompt][tokens][pads]``). The layout is built
once on the CPU as a gather index (:class:`Batch`), so the step itself is one embedding
lookup, one gather and the frozen model: no host synchronisation, no per-row Python.
Rows may carry different prompts, even of different lengths (mixed adapters).

Only the hidden states of the backbone (``model.base_model``) are computed for every
position; the LM head runs only where logits are needed (:func:`logits_at`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache  # here, not in the traced step: an import there is a graph break

from ... import methods
from ...adapter import dtype_name
from ...basemodel import BaseModelInfo, fingerprint_from_rows, fingerprint_rows
from ...errors import LrptError, first_line
from ...layout import Batch, Suffix, pack
from ...reference import init_for_model
from ...spec import PromptSpec
from . import ops
from .packed import forward_packed, is_packed
from .prompts import PromptModule

try:  # transformers 5 checks a config's field types through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: a bad field is a TypeError or ValueError
    StrictDataclassError = ValueError
# what a bad folder or config raises from transformers (a wrong-typed field: TypeError or the strict error)
_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, StrictDataclassError)


def default_device() -> torch.device:
    """CUDA when present (under ``torchrun``, this process's GPU: ``LOCAL_RANK``), else the CPU."""
    import os

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               quiet: bool = False, fsdp: bool = False):
    """Load a frozen causal LM and its tokenizer from an HF folder (or hub name).

    dtype defaults to bfloat16 on CUDA and float32 elsewhere. All base weights are frozen.
    ``quiet`` hides transformers' weight-loading progress bar. ``fsdp`` (under torchrun): the
    weights are read into CPU memory and only this GPU's share reaches it (:func:`.step.shard_model`),
    so a base larger than one GPU trains over several.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()

    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype_name(dtype, LrptError))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except _LOAD_ERRORS as exc:
        first = first_line(exc)
        raise LrptError(f"cannot load model {path}: {first}") from None
    model.eval().requires_grad_(False)
    if fsdp:
        from .step import shard_model

        shard_model(model, device)
    else:
        model.to(device)
    model.name_or_path = str(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass
class GGUFModel:
    """A GGUF model read by transformers: float32 NumPy weights (a tied head stored once),
    its config as a dict, its tokenizer and generation config (both with ``save_pretrained``)."""

    state: dict[str, np.ndarray]
    config: dict
    tokenizer: object
    generation_config: object | None


def read_gguf(path: str | Path) -> GGUFModel:
    """Read (and dequantise) a GGUF model; see :func:`lrpt.conversions.gguf.gguf_to_hf`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...errors import ConversionError

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        first = first_line(exc)
        raise ConversionError(f"cannot read {path} as a GGUF model ({first})") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.detach().float().contiguous().numpy() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    return GGUFModel(state, config, tokenizer, getattr(model, "generation_config", None))


def device_kind(model) -> str:
    """Where the model computes: ``cuda``, ``cpu``, ``mps``... (whether compiling pays depends on it)."""
    return model.device.type


def hf_tokenizer(tokenizer):
    """The HF tokenizer (the torch backend uses it directly; MLX unwraps mlx-lm's wrapper)."""
    return tokenizer


def hidden_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings in prompt space: the output of ``get_input_embeddings()``."""
    return model.get_input_embeddings()(ids)


def embedding_std(model) -> float:
    """The std of the input-embedding table in prompt space, computed on the model's device in
    two chunked passes (mean, then squared deviations), so no copy of the table is ever held."""
    weight = model.get_input_embeddings().weight

    def chunks():
        for i in range(0, weight.shape[0], 8192):
            yield embed(model, torch.arange(i, min(i + 8192, weight.shape[0]), device=weight.device)).double()

    with torch.no_grad():
        mean = sum(float(c.sum()) for c in chunks()) / weight.numel()
        return (sum(float(((c - mean) ** 2).sum()) for c in chunks()) / weight.numel()) ** 0.5


def embedding_rows(model, ids) -> np.ndarray:
    """Rows of the input-embedding table in prompt space (Gemma's √d scale included), float32 on the host."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        return embed(model, torch.as_tensor(np.asarray(ids), device=weight.device)).float().cpu().numpy()


def base_model_info(model) -> BaseModelInfo:
    """What an adapter records about ``model`` (sizes and an embedding fingerprint)."""
    weight = model.get_input_embeddings().weight
    ids = torch.tensor(fingerprint_rows(weight.shape[0]), device=weight.device)
    with torch.no_grad():
        rows = embed(model, ids).float().cpu().numpy()
    return BaseModelInfo(
        name_or_path=getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        model_type=model.config.model_type,
        hidden_size=int(weight.shape[1]),
        vocab_size=int(weight.shape[0]),
        embedding_fingerprint=fingerprint_from_rows(rows),
    )


def init_prompt(spec: PromptSpec, model, tokenizer=None, seed: int = 0) -> PromptModule:
    """A new prompt for ``model`` initialised by the core (same seed, same prompt on MLX)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    params = init_for_model(spec, seed, hidden_size(model), tokenizer, vocab, embedding_std(model),
                            lambda rows: embedding_rows(model, rows))
    return PromptModule(spec, params).to(model.device)


# -- batches ----------------------------------------------------------------------------------


def make_batch(tokens: Sequence[Sequence[int]], n_prompt: int | Sequence[int], padding_side: str = "right",
               pad_id: int = 0, pad_to_multiple: int = 1, device=None) -> Batch:
    """Rows of token ids behind prompts of ``n_prompt`` tokens (:func:`lrpt.layout.pack`), as tensors.

    Row b's packed sequence reads the concatenation ``[prompt rows (n_max)] + [tokens (T)]``
    through ``src``; ``token_pos[b, t]`` is where its token t landed.
    """
    return Batch.from_layout(pack(tokens, n_prompt, padding_side, pad_id, pad_to_multiple),
                             lambda a: ops.asarray(a, device))


def asarray_for(model):
    """Host arrays → tensors on the model's device (the boundary the core's layouts cross)."""
    return lambda a: ops.asarray(a, model.device)


def inference(model):
    """The context scoring runs in: no gradients, and the model's half dtype where it has one."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(autocast(model))
    return stack


def autocast(model, cache: bool = True):
    """Autocast to the model's own half dtype on CUDA (the float32 prompt math joins it there);
    a float32 model computes in float32: loading in fp32 must mean fp32 results. ``cache``: keep
    half copies of float32 weights for the region (off while recording a CUDA graph)."""
    if model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=model.dtype, cache_enabled=cache)
    return torch.autocast(model.device.type, enabled=False)


# -- prompts for a batch ----------------------------------------------------------------------


def encode(model, batch: Batch, kind: str = "base", pooling: str = "mean") -> torch.Tensor:
    """LoPA's x′: the frozen model on the input alone (``base``) or the token embeddings (``embed``)."""
    with torch.no_grad():
        if kind == "embed":
            states = embed(model, batch.token_ids)
        else:
            valid = (
                torch.arange(batch.token_ids.shape[1], device=batch.token_ids.device)[None] < batch.lengths[:, None]
            ).long()
            states = model.base_model(
                input_ids=batch.token_ids, attention_mask=valid, use_cache=False
            ).last_hidden_state
        return methods.pool(ops, states.float(), batch.lengths, pooling)


def prompt_rows(model, prompt, batch: Batch, which: Sequence[int] | None = None) -> torch.Tensor:
    """(B, n_max, d) float32 prompt rows: one prompt for all, ``prompt[which[b]]``, or none (the core's)."""
    return methods.prompt_rows(ops, prompt, which, batch.token_ids.shape[0], lambda key: encode(model, batch, *key),
                               lambda: _empty_prompt(model, batch))


def _empty_prompt(model, batch: Batch) -> torch.Tensor:
    return torch.zeros(batch.token_ids.shape[0], 0, hidden_size(model), device=batch.token_ids.device)


def forward_hidden(model, prompt_embeds: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Last hidden states (B, W, d) of the backbone on the prompted batch."""
    tok = embed(model, batch.token_ids)
    both = torch.cat([prompt_embeds.to(tok.dtype), tok], dim=1)
    src = batch.src.unsqueeze(-1).expand(-1, -1, both.shape[-1])
    inputs = both.gather(1, src)
    out = model.base_model(
        inputs_embeds=inputs, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    return out.last_hidden_state


def shares_prefix(model) -> bool:
    """Whether :func:`forward_after_prefix` runs ``model``: transformers models take a filled KV cache
    and attend to it, with autograd through it, so every model this backend loads does, unless its
    blocks are sharded by FSDP2 (``--fsdp``). FSDP2 reshards a block after each forward, and a block
    run twice in one step (prompt, then tokens) failed its backward on freed parameter storage. Nor
    hybrid models (a config's ``layer_types`` naming convolution, Mamba or linear-attention layers,
    e.g. LFM2): their caches hold state that is not keys and values, and the prefix path crashed."""
    return not fsdp_sharded(model) and attention_only(model)


def attention_only(model) -> bool:
    """Whether every layer the config lists is an attention layer (full, sliding or chunked)."""
    config = getattr(model.config, "text_config", None) or model.config
    kinds = getattr(config, "layer_types", None) or ()
    return all(str(k).endswith("attention") for k in kinds)


def transformer_blocks(model) -> torch.nn.ModuleList | None:
    """The model's transformer blocks: its longest ``ModuleList`` (no per-architecture table)."""
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)


def fsdp_sharded(model) -> bool:
    """Whether FSDP2 manages any of ``model``'s modules (``--fsdp``, :func:`.step.shard_model`)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def forward_after_prefix(model, prefix_embeds: torch.Tensor, suffix: Suffix) -> torch.Tensor:
    """Last hidden states (B, W−n, d) of the suffix's tokens behind one shared (n, d) prompt.

    The prompt runs once, at batch 1, into a transformers cache; its per-layer keys and values are
    expanded (views) to the B rows, and the tokens run behind them with positions n.. and the mask
    ``[ones(n), row mask]`` (the cache concatenates the prompt's keys with the tokens' per layer).
    Autograd flows through the cache into the prompt, once.
    """
    n = suffix.n
    dev = suffix.ids.device
    tok = embed(model, suffix.ids)
    if is_packed(model):  # a step compiled whole, switched to the packed layout around its call (.packed)
        return forward_packed(model, prefix_embeds, tok, suffix)
    backbone = model.base_model
    cache = {_cache_kwarg(type(backbone)): DynamicCache(config=model.config)}
    backbone(inputs_embeds=prefix_embeds.to(tok.dtype)[None], position_ids=torch.arange(n, device=dev)[None],
             use_cache=True, **cache)
    _expand_cache(*cache.values(), tok.shape[0])
    mask = torch.cat([suffix.attention_mask.new_ones(tok.shape[0], n), suffix.attention_mask], dim=1)
    out = backbone(inputs_embeds=tok, attention_mask=mask, position_ids=suffix.position_ids, use_cache=True, **cache)
    return out.last_hidden_state


_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(backbone_class: type) -> str:
    """The name a model class's forward takes its KV cache by (transformers 5 renames
    ``past_key_values``); read once per class, not at every step. A plain dict, not
    ``functools.cache``: torch.compile traces through this and warns on an lru_cache wrapper.
    Under tracing the memo is read, never written: a write there fails the dict's guard on the next
    call, and a step compiled whole would compile its first shape twice."""
    name = _CACHE_KWARG.get(backbone_class)
    if name is None:
        params = inspect.signature(backbone_class.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        if not torch.compiler.is_compiling():
            _CACHE_KWARG[backbone_class] = name
    return name


def _expand_cache(cache, batch: int) -> None:
    """Each layer's batch-1 keys and values as views over ``batch`` rows (the next update concatenates)."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            layer.keys = layer.keys.expand(batch, -1, -1, -1)
            layer.values = layer.values.expand(batch, -1, -1, -1)
        return
    for kv in (cache.key_cache, cache.value_cache):  # transformers 4.x: per-layer lists
        kv[:] = [t.expand(batch, -1, -1, -1) for t in kv]


def logits_at(model, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Float32 logits (B, K, V) at packed positions ``index`` (B, K) only."""
    picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return head(model, picked)


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on some hidden states, with the model's final soft-capping/scaling if any."""
    logits = model.get_output_embeddings()(hidden).float()
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(cfg, "logits_scaling", None)  # Granite divides
    if scale:
        logits = logits / scale
    for name in ("logit_scale", "lm_head_multiplier"):  # Cohere, Falcon-H1 multiply
        factor = getattr(cfg, name, None)
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor != 1:
            logits = logits * factor
    return logits


def forward_logits(
    model, prompt: PromptModule | Sequence[PromptModule], batch: Batch, which: Sequence[int] | None = None
) -> torch.Tensor:
    """Float32 logits (B, T, V) at every real token of every row (for tests and tools).

    Row b's logits[t] predict its token t+1; padded token slots repeat the last real one.
    """
    hidden = forward_hidden(model, prompt_rows(model, prompt, batch, which), batch)
    index = batch.token_pos  # padded token slots point at the last real token
    return logits_at(model, hidden, index)
