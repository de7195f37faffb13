"""Decoding rules both backends share: when a prompt's KV cache is reused, how a row's text ends.

The frameworks generate tokens (transformers' ``generate``, mlx-lm's ``BatchGenerator``); what
a row's text is, and when a static prompt's cache is worth reusing, is decided here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Reusing a static prompt's KV cache saves prefilling its n tokens but costs a cache copy per
# request; on an H100 it did not pay for short prompts (benchmarks/RESULTS.md), so by default
# the cache is used only from this many prompt tokens on.
PREFIX_CACHE_MIN_TOKENS = 128


def wants_prefix_cache(spec, requested: bool | None) -> bool:
    """Whether to decode behind a cached prompt: only static prompts can; ``None`` means where it pays."""
    if spec is None or not spec.is_static:
        return False
    return spec.n_tokens >= PREFIX_CACHE_MIN_TOKENS if requested is None else bool(requested)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (the stop string itself dropped)."""
    hits = [text.find(s) for s in stop or () if s and s in text]
    return text[: min(hits)] if hits else text


def row_text(tokenizer, ids: Sequence[int], eos: Iterable[int], stop: Sequence[str] | None) -> str:
    """The text of one generated row: up to its first EOS, special tokens dropped, cut at a stop string."""
    eos = set(eos)
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return cut_at_stop(tokenizer.decode(list(ids[:end]), skip_special_tokens=True), stop)


def stop_window(stop: Sequence[str] | None) -> int:
    """How many trailing tokens to decode to see a stop string that just appeared (every token
    decodes to at least one character, or to part of one for byte-level vocabularies)."""
    return 4 * max((len(s) for s in stop or ()), default=0) + 4


def eos_ids(*sources) -> set[int]:
    """EOS token ids from the tokenizer and the model's generation config (ints or lists)."""
    ids: set[int] = set()
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple, set)):
            ids.update(int(x) for x in src)
    return ids
