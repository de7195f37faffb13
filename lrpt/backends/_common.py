"""Framework-free helpers both backends share (they work on either backend's PromptModule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def prompt_list(prompt: Any) -> list:
    """None → [], one prompt → [it], a sequence of prompts (mixed adapters) → a list."""
    if prompt is None:
        return []
    return [prompt] if hasattr(prompt, "spec") else list(prompt)


def prompt_lengths(prompt: Any, b: int, which: Sequence[int] | None) -> list[int]:
    """Prompt length of each of ``b`` rows (0 for the plain model)."""
    if prompt is None:
        return [0] * b
    prompts = prompt_list(prompt)
    which = which if which is not None else [0] * b
    return [prompts[w].spec.n_tokens for w in which]


def set_eval(prompt: Any) -> list[bool]:
    """Put prompt modules in eval mode (no dropout); returns their previous modes."""
    flags = [m.training for m in prompt_list(prompt)]
    for m in prompt_list(prompt):
        m.eval()
    return flags


def restore_modes(prompt: Any, flags: list[bool]) -> None:
    for m, f in zip(prompt_list(prompt), flags):
        m.train(f)
