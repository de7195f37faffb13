"""Decode primitives for continuous batching (``lrpt serve``); mirrors ``lrpt/backends/mlx/serving.py``.

One :class:`DecodeState` holds the running batch: a transformers ``DynamicCache`` with every
row left-padded to one width, the 2-D attention mask, each row's next position id and its last
emitted token. Rows may carry different prompts (mixed adapters) or none (the base model).

- :func:`add` prefills newly arrived rows in one forward, laid out as the backends'
  ``make_batch(..., "left")``: ``[pads][prompt][tokens]``, prompt at positions 0..n−1, tokens
  from n. It samples each new row's first token (returned at once, so time to first token is
  one prefill) and merges the new cache into the running one: the shorter is padded on the
  left and the mask extended with zeros. Positions are explicit, so left pads change nothing.
- :func:`step` feeds every row's last token in one forward with per-row position ids and
  samples the next one.
- :func:`remove` drops finished rows (``index_select`` on the cache) and trims pad columns
  that no remaining row needs.

Sliding-window layers keep only their last ``window − 1`` slots; because every row's content
ends at the same slot, merging and trimming keep their windows aligned too.

Sampling is per row (temperature, top-p, seed), with the same arithmetic as
:func:`lrpt.backends.torch.decode.generate`, so a seeded request alone samples what
``generate`` samples for it alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ...basemodel import context_from
from ...errors import LrptError
from .model import autocast, embed, make_batch, prompt_rows


@dataclass
class _Row:
    key: Hashable
    temperature: float
    top_p: float
    generator: torch.Generator | None


@dataclass
class DecodeState:
    """The running batch (rows in cache order)."""

    pad_id: int
    max_batch: int
    rows: list[_Row] = field(default_factory=list)
    cache: object | None = None  # transformers DynamicCache
    mask: torch.Tensor | None = None  # (B, L) long
    pos: torch.Tensor | None = None  # (B,) position of each row's last token + 1
    tokens: torch.Tensor | None = None  # (B,) each row's last emitted token

    def __len__(self) -> int:
        return len(self.rows)


def text_tokenizer(tokenizer):
    """The HF tokenizer that encodes and decodes text (the torch backend uses it directly)."""
    return tokenizer


def context_length(model) -> int | None:
    """The longest sequence (prompt + tokens + new tokens) the model's positions allow, if known."""
    return context_from(model.config)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generation (the tokenizer's EOS and the generation config's)."""
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def start(model, tokenizer, max_batch: int) -> DecodeState:
    """An empty running batch; refuses models whose caches cannot be merged row-wise."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    probe = DynamicCache(config=model.config)
    odd = {type(layer).__name__ for layer in probe.layers
           if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)}
    if odd:
        raise LrptError(f"lrpt serve needs attention KV caches; this model uses {', '.join(sorted(odd))}")
    pad = text_tokenizer(tokenizer).pad_token_id
    return DecodeState(pad_id=int(pad or 0), max_batch=max_batch)


def add(model, state: DecodeState, keys: Sequence[Hashable], prompts: Sequence, rows: Sequence[Sequence[int]],
        temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int | None]) -> list[tuple]:
    """Prefill new rows (``prompts[i]`` a PromptModule or None) and merge them into the batch.

    Returns ``(key, first token)`` for every new row, or ``(key, exception)`` where sampling failed.
    """
    from transformers import DynamicCache

    if not keys:
        return []
    dev = model.device
    n = [0 if p is None else p.spec.n_tokens for p in prompts]
    batch = make_batch(rows, n, "left", state.pad_id, device=dev)
    with torch.no_grad(), autocast(model):  # the model's own dtype, as generate
        tok = embed(model, batch.token_ids)
        x = torch.zeros(len(rows), max(n), tok.shape[-1], device=dev, dtype=tok.dtype)
        prompted = [i for i, p in enumerate(prompts) if p is not None]
        if prompted:
            uniq: list = []
            for i in prompted:
                if not any(prompts[i] is u for u in uniq):
                    uniq.append(prompts[i])
            which = [next(k for k, u in enumerate(uniq) if u is prompts[i]) for i in prompted]
            sub = make_batch([rows[i] for i in prompted], [n[i] for i in prompted], "left", state.pad_id, device=dev)
            px = prompt_rows(model, uniq, sub, which).to(tok.dtype)
            x[torch.tensor(prompted, device=dev), : px.shape[1]] = px
        both = torch.cat([x, tok], dim=1)
        inputs = both.gather(1, batch.src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
        cache = DynamicCache(config=model.config)
        out = model(inputs_embeds=inputs, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
    new_rows = [_Row(k, float(t), float(p), _generator(dev, s, t)) for k, t, p, s in zip(keys, temperatures, top_ps, seeds)]
    sampled = _sample_rows(logits, new_rows)
    first = torch.tensor([t if isinstance(t, int) else state.pad_id for t in sampled], device=dev)
    pos = batch.n_prompt.to(dev) + batch.lengths.to(dev)
    _merge(state, cache, batch.attention_mask, pos, first, new_rows)
    return list(zip(keys, sampled))


def step(model, state: DecodeState) -> list[tuple]:
    """One decode step for every row: ``(key, token)`` each, or ``(key, exception)`` where sampling failed."""
    if not state.rows:
        return []
    b = len(state.rows)
    with torch.no_grad(), autocast(model):  # the model's own dtype, as generate
        state.mask = torch.cat([state.mask, torch.ones(b, 1, dtype=state.mask.dtype, device=state.mask.device)], 1)
        out = model(input_ids=state.tokens[:, None], attention_mask=state.mask, position_ids=state.pos[:, None],
                    past_key_values=state.cache, use_cache=True)
        logits = out.logits[:, -1].float()
    state.pos = state.pos + 1
    sampled = _sample_rows(logits, state.rows)
    state.tokens = torch.tensor([t if isinstance(t, int) else state.pad_id for t in sampled], device=logits.device)
    return [(r.key, t) for r, t in zip(state.rows, sampled)]


def remove(state: DecodeState, keys: Sequence[Hashable]) -> None:
    """Drop rows (unknown keys are ignored) and the pad columns no remaining row needs."""
    gone = set(keys)
    keep = [i for i, r in enumerate(state.rows) if r.key not in gone]
    if len(keep) == len(state.rows):
        return
    if not keep:
        state.rows, state.cache, state.mask, state.pos, state.tokens = [], None, None, None, None
        return
    idx = torch.tensor(keep, device=state.mask.device)
    state.rows = [state.rows[i] for i in keep]
    state.mask, state.pos, state.tokens = state.mask[idx], state.pos[idx], state.tokens[idx]
    for layer in state.cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
    used = state.mask.any(0).nonzero()
    cut = int(used[0, 0]) if used.numel() else 0
    if cut:
        state.mask = state.mask[:, cut:]
        width = state.mask.shape[1]
        for layer in state.cache.layers:
            if getattr(layer, "keys", None) is None or not layer.keys.numel():
                continue
            keep_slots = min(width, layer.sliding_window - 1) if layer.is_sliding else width
            if layer.is_sliding:
                layer.cumulative_length = width
            start_slot = layer.keys.shape[-2] - keep_slots
            if start_slot > 0:
                layer.keys, layer.values = layer.keys[..., start_slot:, :], layer.values[..., start_slot:, :]


# -- internals ----------------------------------------------------------------------------------


def _merge(state: DecodeState, cache, mask: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
           rows: list[_Row]) -> None:
    """Append prefilled rows to the running batch, left-padding whichever cache is shorter."""
    if not state.rows:
        state.cache, state.mask, state.pos, state.tokens, state.rows = cache, mask, pos, tokens, list(rows)
        return
    width = max(state.mask.shape[1], mask.shape[1])
    for old, new in zip(state.cache.layers, cache.layers):
        kv_old, kv_new = _kv(old), _kv(new)
        if kv_old is None and kv_new is None:
            continue
        ref = kv_old if kv_old is not None else kv_new
        slots = min(width, old.sliding_window - 1) if old.is_sliding else width
        parts = []
        for kv, b in ((kv_old, len(state.rows)), (kv_new, len(rows))):
            if kv is None:
                kv = tuple(ref[j].new_zeros(b, ref[j].shape[1], 0, ref[j].shape[3]) for j in range(2))
            parts.append(tuple(_left_pad(t, slots) for t in kv))
        if not old.is_initialized:
            old.lazy_initialization(*parts[0])
        old.keys = torch.cat([parts[0][0], parts[1][0]], 0)
        old.values = torch.cat([parts[0][1], parts[1][1]], 0)
        if old.is_sliding:
            old.cumulative_length = width
    state.mask = torch.cat([_left_pad(state.mask, width, dim=1), _left_pad(mask, width, dim=1)], 0)
    state.pos = torch.cat([state.pos, pos])
    state.tokens = torch.cat([state.tokens, tokens])
    state.rows.extend(rows)


def _kv(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    keys = getattr(layer, "keys", None)
    if not getattr(layer, "is_initialized", False) or keys is None or keys.dim() != 4:
        return None
    return layer.keys, layer.values


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _generator(device, seed: int | None, temperature: float) -> torch.Generator | None:
    if temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _sample_rows(logits: torch.Tensor, rows: list[_Row]) -> list:
    """Greedy rows in one argmax; sampled rows one by one with their own generator (as ``generate``)."""
    out: list = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.temperature <= 0:
            continue
        try:
            probs = torch.softmax(logits[i : i + 1] / row.temperature, dim=-1)
            if row.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < row.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
            out[i] = int(torch.multinomial(probs, 1, generator=row.generator)[0, 0])
        except RuntimeError as exc:  # e.g. non-finite probabilities: this row fails, the others go on
            out[i] = exc
    return out


__all__ = ["DecodeState", "add", "context_length", "eos_token_ids", "remove", "start", "step", "text_tokenizer"]
