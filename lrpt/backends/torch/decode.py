"""Decoding on PyTorch: transformers' ``generate`` fed lrpt's prompted batches.

Decoding runs on transformers' ``generate`` (its logits processors, stopping criteria and
static-cache compilation), fed the prompted batch as ``inputs_embeds`` with lrpt's positions.
A static prompt's key/value cache can be computed once and reused (``use_prefix_cache``):
rows then read ``[prompt][pads][tokens]`` with the pads masked and token positions from n,
the same function as a full forward. What a row's text is, is :mod:`lrpt.decoding`'s.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ...decoding import eos_ids, row_text, wants_prefix_cache
from ...scoring import eval_mode, prompt_lengths
from ...tokens import encode_texts
from .model import embed, make_batch, prompt_rows
from .prompts import PromptModule, place

# Prefix caches by prompt module, held weakly: nothing is stored on the user's modules.
_PREFIX_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_cache(model, prompt: PromptModule):
    """The static prompt's per-layer (keys, values) at batch 1, computed once and reused while the
    prompt's parameters and the model are unchanged."""
    from transformers import DynamicCache

    key = (id(model), tuple(p._version for p in prompt.parameters()), str(model.device), model.dtype)
    held = _PREFIX_CACHES.get(prompt)
    if held is not None and held[0] == key:
        return held[1]
    with torch.no_grad():
        x = prompt().unsqueeze(0).to(model.dtype)
        n = x.shape[1]
        cache = DynamicCache(config=model.config)
        model(inputs_embeds=x, position_ids=torch.arange(n, device=model.device)[None], past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    kv = _layer_kv(cache)
    _PREFIX_CACHES[prompt] = (key, kv)
    return kv


def _layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a DynamicCache (transformers 5 layers, or 4.x lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _expanded_cache(model, kv, batch: int):
    """A fresh cache holding the prompt's keys/values for ``batch`` rows, without copying them:
    the first update of each layer keeps the (expanded) tensors, later ones concatenate."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
    return cache


def generate(
    model,
    tokenizer,
    prompt: PromptModule | Sequence[PromptModule] | None,
    texts: Sequence[str],
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    which: Sequence[int] | None = None,
    use_prefix_cache: bool | None = None,
    compile: bool = False,
) -> list[str]:
    """Continue each (templated) text with transformers' ``generate``; greedy when ``temperature == 0``.

    The prompted batch enters as ``inputs_embeds`` laid out ``[pads][prompt][tokens]`` with explicit
    position ids (prompt at 0..n−1, tokens from n), which transformers extends step by step, so
    batched results equal one-by-one results. Stops at EOS or a ``stop`` string (transformers'
    ``stop_strings``; the string is cut from the output) or after ``max_tokens``. ``compile``
    decodes with a static cache under ``torch.compile`` (transformers' own auto-compilation);
    ``use_prefix_cache`` reuses a static prompt's KV cache (None: where it pays, see
    :func:`lrpt.decoding.wants_prefix_cache`). Sampling draws from torch's global generator (``seed``
    seeds it), as transformers does.
    """
    place(prompt, model)
    rows = encode_texts(tokenizer, texts)
    if not rows:
        return []
    pad = tokenizer.pad_token_id or 0
    spec = prompt.spec if isinstance(prompt, PromptModule) else None
    # Sliding-window attention measures distance in cache slots, so pads between the cached prompt
    # and the tokens would shift its window: there, only pad-free batches use the cache.
    # A sliding layer keeps only its last window − 1 keys, so a prompt as long cannot be cached whole.
    window = _sliding_window(model)
    cached = (wants_prefix_cache(spec, use_prefix_cache) and not compile
              and (window is None or (len({len(r) for r in rows}) == 1 and spec.n_tokens < window - 1)))
    eos = sorted(eos_ids(tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)))
    options = dict(max_new_tokens=max_tokens, pad_token_id=pad, eos_token_id=eos or None,
                   do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                   top_p=top_p, repetition_penalty=1.0, num_beams=1)  # no hidden model defaults
    if temperature > 0:
        options.update(top_k=0)  # sampling: only top-p filters (greedy takes no top_k: transformers warns)
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    if compile:
        options.update(cache_implementation="static")
    if seed is not None:
        torch.manual_seed(seed)
    with eval_mode(prompt):
        # No autocast here: the prompt math is float32 and cast once to the model's dtype where it
        # enters; autocast's per-op dispatch cost made eager decoding ~13% slower on an H100.
        with torch.no_grad():
            inputs = _cached_inputs(model, prompt, rows, pad) if cached else _embedded_inputs(model, prompt, rows,
                                                                                              which, pad)
            out = model.generate(**inputs, **options)
    new = out[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out
    return [row_text(tokenizer, ids, eos, stop) for ids in new.tolist()]


def _embedded_inputs(model, prompt, rows, which, pad_id) -> dict[str, torch.Tensor]:
    """``[pads][prompt][tokens]`` embeddings, mask and positions (LoPA, mixed adapters, no prompt, or
    a static prompt prefilled in full)."""
    n = prompt_lengths(prompt, len(rows), which)
    batch = make_batch(rows, n, "left", pad_id, device=model.device)
    tok = embed(model, batch.token_ids)
    rows_x = prompt_rows(model, prompt, batch, which).to(tok.dtype)
    both = torch.cat([rows_x, tok], dim=1)
    inputs = both.gather(1, batch.src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    return {"inputs_embeds": inputs, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}


def _cached_inputs(model, prompt: PromptModule, rows, pad_id) -> dict:
    """Tokens behind the cached prompt: layout ``[prompt][pads][tokens]``, the prompt's n slots
    already in the cache (their ids are placeholders transformers skips), tokens at positions n.."""
    n, t = prompt.spec.n_tokens, max(len(r) for r in rows)
    ids = torch.full((len(rows), n + t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n + t), dtype=torch.long)
    pos = torch.zeros((len(rows), n + t), dtype=torch.long)
    mask[:, :n] = 1
    pos[:, :n] = torch.arange(n)
    for i, r in enumerate(rows):
        ids[i, n + t - len(r):] = torch.tensor(r)
        mask[i, n + t - len(r):] = 1
        pos[i, n + t - len(r):] = n + torch.arange(len(r))
    dev = model.device
    cache = _expanded_cache(model, prefix_cache(model, prompt), len(rows))
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": pos.to(dev),
            "past_key_values": cache}


def _sliding_window(model) -> int | None:
    """The model's sliding attention window (0: it slides, by an unknown window), None where no layer slides."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    window = getattr(cfg, "sliding_window", None)
    slides = "sliding_attention" in (getattr(cfg, "layer_types", None) or ()) or (
        bool(window) and getattr(cfg, "use_sliding_window", True) is not False)
    return int(window or 0) if slides else None
