"""Decoding rules both backends share: when a prompt's KV cache is reused, how a row's text ends.

The frameworks generate tokens (transformers' ``generate``, mlx-lm's ``BatchGenerator``); what
a row's text is, and when a static prompt's cache is worth reusing, is decided here once.
"""

from __future__ import annotations

import functools
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
    return cut_at_stop(decode_new(tokenizer, ids[:end]), stop)


def decode_new(tokenizer, ids: Sequence[int]) -> str:
    """The text of tokens that continue a text (generated ones, or a row's last few), special tokens dropped.

    Decoded alone, a SentencePiece-style tokenizer (Llama 2, Mistral) drops its first token's
    leading space, so " Q:" came back as "Q:" and a stop string " Q:" was never found. They are
    decoded behind one ordinary token whose text is then removed; byte-level vocabularies
    (GPT-2, Llama 3, SmolLM2) give the same text either way."""
    ids = list(ids)
    try:
        anchor = _anchor(tokenizer)
    except TypeError:  # an unhashable tokenizer: not cached
        anchor = _anchor.__wrapped__(tokenizer)
    if anchor is not None and ids:
        full = tokenizer.decode([anchor[0], *ids], skip_special_tokens=True)
        if full.startswith(anchor[1]):
            return full[len(anchor[1]):]
    return tokenizer.decode(ids, skip_special_tokens=True)


@functools.lru_cache(maxsize=16)  # serving decodes every new token's row: the anchor is looked up once
def _anchor(tokenizer) -> tuple[int, str] | None:
    """An ordinary token to decode in front of a continuation, and its text; or None: the token of
    "a" where the vocabulary has one, else the first token id that decodes to some text."""
    if not hasattr(tokenizer, "encode"):  # a decoder alone: nothing to anchor with
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    first = tokenizer.encode("a", add_special_tokens=False)[-1:]
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    for tid in [*first, *range(min(size, 4096))]:
        if tid not in special:
            head = tokenizer.decode([tid], skip_special_tokens=True)
            if head.strip():
                return int(tid), head
    return None


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
