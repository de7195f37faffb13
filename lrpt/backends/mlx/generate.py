"""Classification scoring and decoding on MLX (mirrors ``lrpt/backends/torch/generate.py``).

Decoding goes through mlx-lm's own ``BatchGenerator`` with one pre-filled KV cache per
request. For a static prompt (``prompt``, ``lopt1``, ``lopt2``) the prompt is run once into
a cache (recomputed only when the prompt's arrays change) and every request gets a copy:
the tokens then start at position n, exactly as in a full forward. LoPA prompts depend on
the input, so each request's cache is filled with its prompt and all but its last token.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ...data import target_positions
from ...decoding import eos_ids, row_text, stop_window, wants_prefix_cache
from ...errors import LrptError
from ...tokens import encode_texts, label_token_ids
from .._common import prompt_lengths, restore_modes, set_eval
from .model import Batch, attach, forward_hidden, hf_tokenizer, logits_at, make_batch, prompt_rows
from .prompts import PromptModule, place


def prepare_scoring(rows: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], n: Sequence[int],
                    pad_id: int = 0, pad_to_multiple: int = 1) -> dict[str, mx.array]:
    """Host-side layout for :func:`label_scores` (kept apart so the device part can be compiled).

    Single-token label words need the input batch only; multi-token words add one
    input+word sequence per (row, label) and the positions to read.
    """
    batch = make_batch(rows, n, "right", pad_id, pad_to_multiple)
    arrays = {f"in_{k}": v for k, v in batch.arrays().items()}
    if all(len(ids) == 1 for ids in label_ids):
        arrays["label_ids"] = mx.array([ids[0] for ids in label_ids], dtype=mx.int32)
        return arrays
    k = len(label_ids)
    long_rows = [list(r) + list(ids) for r in rows for ids in label_ids]
    long = make_batch(long_rows, [x for x in n for _ in range(k)], "right", pad_id, pad_to_multiple)
    index, target, weight = target_positions(long_rows, [len(label_ids[j % k]) for j in range(len(long_rows))])
    arrays.update({f"seq_{k_}": v for k_, v in long.arrays().items()})
    arrays.update(index=mx.array(index.astype(np.int32)), target=mx.array(target.astype(np.int32)),
                  weight=mx.array(weight))
    return arrays


def unpack(arrays: dict[str, mx.array], prefix: str) -> Batch:
    return Batch(**{k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})


def target_logprobs(model, prompts: mx.array, arrays: dict[str, mx.array]) -> mx.array:
    """(B', K) log-probabilities of the target tokens of the ``seq_`` batch (0 where weight is 0)."""
    seq = unpack(arrays, "seq_")
    hidden = forward_hidden(model, prompts, seq)
    packed = mx.take_along_axis(seq.token_pos, arrays["index"], axis=1)
    logits = logits_at(model, hidden, packed)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, arrays["target"][..., None], axis=2)[..., 0] * arrays["weight"]


def label_scores(model, prompt, arrays: dict[str, mx.array], num_labels: int,
                 which: Sequence[int] | None = None) -> mx.array:
    """(B, K) label log-probabilities from :func:`prepare_scoring`'s arrays (differentiable)."""
    inputs = unpack(arrays, "in_")
    prompts = prompt_rows(model, prompt, inputs, which)
    if "label_ids" in arrays:
        hidden = forward_hidden(model, prompts, inputs)
        logits = logits_at(model, hidden, inputs.last_pos[:, None])[:, 0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return logp[:, arrays["label_ids"]]
    picked = target_logprobs(model, mx.repeat(prompts, num_labels, axis=0), arrays)
    return picked.sum(1).reshape(-1, num_labels)


def score_rows(model, prompt, rows: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]],
               which: Sequence[int] | None = None, pad_id: int = 0, pad_to_multiple: int = 1) -> mx.array:
    """(B, K) float32 label log-probabilities for token rows (differentiable w.r.t. the prompt)."""
    arrays = prepare_scoring(rows, label_ids, prompt_lengths(prompt, len(rows), which), pad_id, pad_to_multiple)
    return label_scores(model, prompt, arrays, len(label_ids), which)


def score_labels(model, tokenizer, prompt, texts: Sequence[str], label_words: Sequence[str],
                 which: Sequence[int] | None = None, batch_size: int = 32) -> np.ndarray:
    """(N, K) label log-probabilities for already templated ``texts``."""
    place(prompt, model)
    hf = hf_tokenizer(tokenizer)
    label_ids = label_token_ids(hf, label_words)
    rows = encode_texts(hf, texts)
    flags = set_eval(prompt)
    out = []
    for i in range(0, len(rows), batch_size):
        sub = None if which is None else which[i : i + batch_size]
        s = score_rows(model, prompt, rows[i : i + batch_size], label_ids, sub, hf.pad_token_id or 0)
        out.append(np.array(s.astype(mx.float32)))
    restore_modes(prompt, flags)
    return np.concatenate(out) if out else np.zeros((0, len(label_words)), np.float32)


def classify(model, tokenizer, prompt, texts, label_words, which=None, batch_size=32) -> np.ndarray:
    """Predicted label index for each templated text (argmax of :func:`score_labels`)."""
    return score_labels(model, tokenizer, prompt, texts, label_words, which, batch_size).argmax(-1)


# -- decoding ---------------------------------------------------------------------------------


def _fill(model, cache, prompt_embeds: mx.array | None, tokens: Sequence[int]) -> None:
    """Run [prompt][tokens] of one sequence through ``model`` into ``cache`` (positions from 0)."""
    from .model import backbone

    n = 0 if prompt_embeds is None else prompt_embeds.shape[1]
    if n + len(tokens) == 0:
        return
    ids = mx.array([[0] * n + list(tokens)], dtype=mx.int32)
    src = mx.array([list(range(n)) + [0] * len(tokens)], dtype=mx.int32)
    is_prompt = mx.array([[True] * n + [False] * len(tokens)])
    state = attach(model)
    if prompt_embeds is not None:
        rows = prompt_embeds if state.scale == 1.0 else prompt_embeds / state.scale
        state.splice = (rows, src, is_prompt)
    try:
        out = backbone(model)(ids, cache=cache)
        mx.eval(out, [c.state for c in cache])
    finally:
        state.splice = None


# Prefix caches by prompt module id, dropped when the module is collected: nothing is stored on
# the user's modules (MLX modules are dicts, so they cannot key a WeakKeyDictionary).
_PREFIX_CACHES: dict[int, tuple] = {}


def prefix_cache(model, prompt: PromptModule) -> list:
    """The static prompt's KV cache, computed once and reused while the prompt is unchanged."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    arrays = [a for _, a in tree_flatten(prompt.parameters())]
    held = _PREFIX_CACHES.get(id(prompt))
    if held is not None and held[0] is model and len(held[1]) == len(arrays) and all(
            a is b for a, b in zip(held[1], arrays)):
        return held[2]
    cache = make_prompt_cache(model)
    _fill(model, cache, prompt()[None], [])
    if id(prompt) not in _PREFIX_CACHES:
        weakref.finalize(prompt, _PREFIX_CACHES.pop, id(prompt), None)
    _PREFIX_CACHES[id(prompt)] = (model, arrays, cache)
    return cache


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
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    if compile:
        raise LrptError("compiled generation is the torch backend's (a static cache under torch.compile):"
                        " drop --compile with --backend mlx")
    place(prompt, model)
    hf = hf_tokenizer(tokenizer)
    rows = encode_texts(hf, texts)
    if not rows:
        return []
    flags = set_eval(prompt)
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
            x = prompt_rows(model, p, make_batch([row], p.spec.n_tokens))
            cache = make_prompt_cache(model)
            _fill(model, cache, x, row[:-1])
            caches.append(cache)
            requests.append(row[-1:])
    if seed is not None:
        mx.random.seed(seed)
    eos = eos_ids(hf.eos_token_id, getattr(tokenizer, "eos_token_ids", None))
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(eos)],
                         sampler=make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0))
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
                    tail = hf.decode(out[r.uid][-window:], skip_special_tokens=True)
                    if any(s in tail for s in stop):
                        stopped.append(r.uid)
            if stopped:
                gen.remove(stopped)
    finally:
        gen.close()
        restore_modes(prompt, flags)
    return [row_text(hf, out[u], eos, stop) for u in uids]


__all__ = ["classify", "generate", "label_token_ids", "prefix_cache", "score_labels", "score_rows"]
