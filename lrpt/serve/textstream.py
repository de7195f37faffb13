"""Text of a generation as tokens arrive: stop strings, and what is safe to stream yet.

Framework-free. The rules are those of :func:`lrpt.backends.torch.decode.generate`: the text is
the decode of all tokens so far (special tokens skipped); a stop string ends the generation as
soon as it appears and is cut with everything after it. While streaming, text that may still
change is held back: trailing replacement characters (an incomplete UTF-8 sequence) and a
suffix that could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def streamable(text: str, stops: Sequence[str]) -> str:
    """The prefix of an unfinished generation's text that later tokens cannot change or cut."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return text[: end - hold]
