"""Decode primitives for continuous batching (``lrpt serve``); mirrors ``lrpt/backends/torch/serving.py``.

The running batch is mlx-lm's own continuous-batching engine, ``mlx_lm.generate.BatchGenerator``.
Each new row gets a KV cache prefilled with ``[prompt][tokens[:-1]]`` at positions 0.. (its
prompt rows come from :func:`~lrpt.backends.mlx.model.prompt_rows`, so rows may carry different
adapters, LoPA included), and is inserted with its last token: the generator merges the caches
(left-padded, per-row offsets) into the batch between decode steps and runs every row in the
same forward passes. The generator's own stop and length rules are switched off: the caller
(the server's scheduler) decides when a row ends, and removes it.

Sampling is per row: greedy rows share the generator's greedy sampler (one batched argmax);
sampled rows carry their own PRNG key (``seed``), so their draws do not depend on the batch.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ...basemodel import context_from
from .decode import fill_cache, sample_tokens
from .model import make_batch, prompt_rows

_NO_LIMIT = 1 << 30  # max_tokens given to the generator: the scheduler ends rows itself


@dataclass
class DecodeState:
    """The running batch: mlx-lm's BatchGenerator and the row keys of its uids."""

    generator: object
    max_batch: int
    uid_of: dict = field(default_factory=dict)
    key_of: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uid_of)


def text_tokenizer(tokenizer):
    """The HF tokenizer inside mlx-lm's wrapper (the one that encodes and decodes text)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def context_length(model) -> int | None:
    """The longest sequence (prompt + tokens + new tokens) the model's positions allow, if known."""
    return context_from(getattr(model, "args", None))


def eos_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generation (mlx-lm's wrapper merges the tokenizer's and the config's)."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return {int(t) for t in ids}
    eos = text_tokenizer(tokenizer).eos_token_id
    return {int(eos)} if eos is not None else set()


def start(model, tokenizer, max_batch: int) -> DecodeState:
    """An empty running batch of at most ``max_batch`` rows."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=max_batch, prefill_batch_size=max_batch, max_tokens=_NO_LIMIT)
    return DecodeState(generator=gen, max_batch=max_batch)


def add(model, state: DecodeState, keys: Sequence[Hashable], prompts: Sequence, rows: Sequence[Sequence[int]],
        temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int | None]) -> list[tuple]:
    """Prefill each new row's cache and insert it; its tokens come from later :func:`step` calls.

    Returns ``[]`` (the generator emits a row's first token at its next step).
    """
    from mlx_lm.generate import StopSequences
    from mlx_lm.models.cache import make_prompt_cache

    caches, lasts, samplers = [], [], []
    for prompt, row, t, p, s in zip(prompts, rows, temperatures, top_ps, seeds):
        cache = make_prompt_cache(model)
        x = None if prompt is None else prompt_rows(model, prompt, make_batch([list(row)], prompt.spec.n_tokens))
        fill_cache(model, cache, x, list(row)[:-1])
        caches.append(cache)
        lasts.append(list(row)[-1:])
        samplers.append(_sampler(t, p, s))
    uids = state.generator.insert(lasts, max_tokens=[_NO_LIMIT] * len(lasts), caches=caches, samplers=samplers,
                                  stop_sequences=[StopSequences()] * len(lasts))
    for key, uid in zip(keys, uids):
        state.uid_of[key], state.key_of[uid] = uid, key
    return []


def step(model, state: DecodeState) -> list[tuple]:
    """One generator step: ``(key, token)`` for every row that produced a token."""
    if not state.uid_of:
        return []
    _, responses = state.generator.next()
    return [(state.key_of[r.uid], int(r.token)) for r in responses if r.uid in state.key_of]


def remove(state: DecodeState, keys: Sequence[Hashable]) -> None:
    """Drop rows (unknown keys are ignored)."""
    uids = [state.uid_of.pop(k) for k in keys if k in state.uid_of]
    for uid in uids:
        state.key_of.pop(uid, None)
    if uids:
        state.generator.remove(uids)


# -- internals ----------------------------------------------------------------------------------


def _sampler(temperature: float, top_p: float, seed: int | None):
    """None (greedy, the generator's batched default) or a sampler with its own PRNG key."""
    if temperature <= 0:
        return None
    key = mx.random.key(int(seed) if seed is not None else random.getrandbits(32))

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return sample_tokens(logprobs, temperature, top_p, key=sub)

    return sample


__all__ = ["DecodeState", "add", "context_length", "eos_token_ids", "remove", "start", "step", "text_tokenizer"]
