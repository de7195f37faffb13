"""Decoding on MLX: mlx-lm's ``BatchGenerator`` fed lrpt's prompted caches (mirrors ``torch/decode.py``).

Decoding goes through mlx-lm's own ``BatchGenerator`` with one pre-filled KV cache per
request. For a static prompt (``prompt``, ``lopt1``, ``lopt2``) the prompt can be run once into
a cache (recomputed only when the prompt's arrays change) and every request gets a copy:
the tokens then start at position n, exactly as in a full forward. Otherwise each request's
cache is filled with its prompt and all but its last token. What a row's text is, is
:mod:`lrpt.decoding`'s.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence

import mlx.core as mx

from ...decoding import decode_new, eos_ids, row_text, stop_window, wants_prefix_cache
from ...errors import LrptError
from ...scoring import eval_mode
from ...tokens import encode_texts
from .model import hf_tokenizer, make_batch, prompt_rows
from .prompts import PromptModule, place
from .splice import run_backbone


def fill_cache(model, cache, prompt_embeds: mx.array | None, tokens: Sequence[int]) -> None:
    """Run [prompt][tokens] of one sequence through ``model`` into ``cache`` (positions from 0)."""
    n = 0 if prompt_embeds is None else prompt_embeds.shape[1]
    if n + len(tokens) == 0:
        return
    ids = mx.array([[0] * n + list(tokens)], dtype=mx.int32)
    src = mx.array([list(range(n)) + [0] * len(tokens)], dtype=mx.int32)
    is_prompt = mx.array([[True] * n + [False] * len(tokens)])
    out = run_backbone(model, ids, cache, prompt_embeds, src, is_prompt)
    mx.eval(out, [c.state for c in cache])


# Prefix caches by prompt module id, dropped when the module is collected: nothing is stored on
# the user's modules (MLX modules are dicts, so they cannot key a WeakKeyDictionary).
_PREFIX_CACHES: dict[int, tuple] = {}


def prefix_cache(model, prompt: PromptModule) -> list:
    """The static prompt's KV cache, computed once and reused while the prompt's rows are unchanged.

    The rows are compared by value: an in-place write (``prompt.prompt_embeddings[:] = ...``) keeps
    the same array object, which an identity check took for the old prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    rows = prompt()
    held = _PREFIX_CACHES.get(id(prompt))
    if held is not None and held[0]() is model and held[1].shape == rows.shape and mx.array_equal(held[1], rows).item():
        return held[2]
    snapshot = rows * 1  # a copy: for `prompt` the rows are the parameter itself
    mx.eval(snapshot)
    cache = make_prompt_cache(model)
    fill_cache(model, cache, snapshot[None], [])
    if id(prompt) not in _PREFIX_CACHES:
        weakref.finalize(prompt, _PREFIX_CACHES.pop, id(prompt), None)
    _PREFIX_CACHES[id(prompt)] = (weakref.ref(model), snapshot, cache)  # weak: the cache must not keep a model alive
    return cache


def _prefilled(model, prompt, rows: list[list[int]], which, use_prefix_cache: bool | None) -> tuple[list, list]:
    """Each row's KV cache holding its prompt (and all but its last token), and what is left to feed."""
    from mlx_lm.models.cache import make_prompt_cache

    cached = wants_prefix_cache(prompt.spec if isinstance(prompt, PromptModule) else None, use_prefix_cache)
    caches, requests = [], []
    for i, row in enumerate(rows):
        if prompt is None:
            caches.append(make_prompt_cache(model))
            requests.append(row)
        elif cached:
            caches.append(copy.deepcopy(prefix_cache(model, prompt)))
            requests.append(row)
        else:
            p = prompt if isinstance(prompt, PromptModule) else prompt[which[i] if which is not None else 0]
            cache = make_prompt_cache(model)
            fill_cache(model, cache, prompt_rows(model, p, make_batch([row], p.spec.n_tokens)), row[:-1])
            caches.append(cache)
            requests.append(row[-1:])
    return caches, requests


def generate(model, tokenizer, prompt, texts: Sequence[str], max_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
             which: Sequence[int] | None = None, use_prefix_cache: bool | None = None,
             compile: bool = False) -> list[str]:
    """Continue each (templated) text with mlx-lm's ``BatchGenerator``; greedy at temperature 0.

    Each request gets its own prefilled cache (the static prompt's, copied, or LoPA's / a mixed
    batch's prompt and all but its last token), so tokens sit at positions n.. exactly as in
    training. A row stops at EOS, after ``max_tokens``, or as soon as a ``stop`` string appears
    (it is then removed from the batch, and the string cut from its text).
    """
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    if compile:
        raise LrptError("compiled generation is the torch backend's (a static cache under torch.compile):"
                        " drop --compile with --backend mlx")
    place(prompt, model)
    hf = hf_tokenizer(tokenizer)
    rows = encode_texts(hf, texts)
    if not rows:
        return []
    with eval_mode(prompt):
        caches, requests = _prefilled(model, prompt, rows, which, use_prefix_cache)
        if seed is not None:
            mx.random.seed(seed)
        eos = eos_ids(hf.eos_token_id, getattr(tokenizer, "eos_token_ids", None))
        gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(eos)],
                             sampler=make_sampler(temp=0.0) if temperature <= 0
                             else lambda logprobs: sample_tokens(logprobs, temperature, top_p))
        window = stop_window(stop)
        try:
            uids = gen.insert(requests, caches=caches)
            out: dict[int, list[int]] = {u: [] for u in uids}
            while responses := gen.next_generated():
                stopped = []
                for r in responses:
                    if r.finish_reason != "stop":
                        out[r.uid].append(r.token)
                    if stop and r.finish_reason is None:
                        tail = decode_new(hf, out[r.uid][-window:])
                        if any(s in tail for s in stop):
                            stopped.append(r.uid)
                if stopped:
                    gen.remove(stopped)
        finally:
            gen.close()
        return [row_text(hf, out[u], eos, stop) for u in uids]


def sample_tokens(logprobs: mx.array, temperature: float, top_p: float, key: mx.array | None = None) -> mx.array:
    """One token per row: the temperature first, then the nucleus of the tempered distribution, as
    HF's ``generate`` and the torch backend do (mlx-lm's ``make_sampler`` cuts the nucleus before
    the temperature, so the same flags would sample another set of tokens)."""
    from mlx_lm.sample_utils import apply_top_p

    scaled = logprobs * (1.0 / temperature)
    scaled = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
    if top_p < 1.0:
        scaled = apply_top_p(scaled, top_p)
    return mx.random.categorical(scaled, key=key)
