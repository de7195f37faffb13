"""Tokenisation rules both backends share (they hold the same HF tokenizer).

Inputs get the model's special tokens (BOS) and the prompt goes before them; label words
and completions get none, and completions end with EOS so the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import DataError


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[list[int]]:
    """Token ids of each label word (no special tokens); an empty tokenisation is an error, and so
    are two words of the same tokens: they score alike, and which one a tie answers differed
    between the backends by float rounding."""
    out = []
    for word in label_words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"label word {word!r} tokenizes to nothing: choose another label word")
        if list(ids) in out:
            same = label_words[out.index(list(ids))]
            raise DataError(f"label words {same!r} and {word!r} are the same tokens: give each label its own word")
        out.append(list(ids))
    return out


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of model inputs, with the model's special tokens."""
    rows = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
    for text, row in zip(texts, rows):
        if not row:
            raise DataError(f"input {text[:40]!r} tokenizes to nothing")
    return [list(r) for r in rows]


def tokenize_fn(tokenizer):
    """Text → ids with the model's special tokens (BOS). Its ``head`` attribute counts the special
    tokens put before the text, which a cut to the context keeps (:func:`lrpt.data.keep_end`)."""

    def run(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    plain, full = tokenizer("a b", add_special_tokens=False)["input_ids"], run("a b")
    run.head = len(full) - len(plain) if plain and list(full[len(full) - len(plain):]) == list(plain) else 0
    return run


def target_tokenize_fn(tokenizer):
    """Completion text → ids without special tokens, plus EOS."""
    eos = tokenizer.eos_token_id

    def run(text: str) -> list[int]:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + ([eos] if eos is not None else [])

    return run
