"""Decoding rules both backends share: when a prompt's KV cache is reused, how a row's text ends.

The frameworks generate tokens (transformers' ``generate``, mlx-lm's ``BatchGenerator``); what
a row's text is, and when a static prompt's cache is worth reusing, is decided here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def wants_prefix_cache(spec, requested: bool | None) -> bool:
    """Whether to decode behind a static prompt's reused KV cache. Only static prompts can, and by
    default (``None``) none does: on an H100 the cache copy made time to first token 9–11% worse
    than prefilling the prompt again, for prompts of 20, 128 and 512 tokens (benchmarks/RESULTS.md).
    """
    if spec is None or not spec.is_static:
        return False
    return bool(requested)


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
