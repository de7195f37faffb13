"""Label scoring, the completion loss and evaluation: written once, run by every backend.

The score of a label is the log-probability of its label word(s) after the templated input.
Single-token label words (the common case) need one forward and the model's head at one
position per row; multi-token words are scored as input+word sequences, summing the
log-probabilities of the word's tokens. The vocabulary projection never runs anywhere else.

Functions here take ``be``, a backend module: its op set (``be.ops``) for the math and its
framework work (``prompt_rows``, ``forward_hidden``, ``logits_at``, ``inference``, ...). The
public entry points (:func:`score_labels`, :func:`classify`, :func:`evaluate`) find the
backend from the model they are given, so each backend exports them as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .basemodel import loaded_context
from .data import Encoded, classification_metrics
from .errors import DataError
from .layout import Batch, completion_arrays, scoring_arrays, to_arrays
from .methods import prompt_list
from .prefix import prompted_hidden
from .tasks import Task
from .tokens import encode_texts, label_token_ids


def label_scores(be, model, prompt, arrays: dict[str, Any], num_labels: int, which: Sequence[int] | None = None,
                 shared: bool | None = None):
    """(B, K) label log-probabilities from :func:`lrpt.layout.scoring_arrays` (differentiable).

    ``shared``: a static prompt runs once for the batch where it applies (:mod:`lrpt.prefix`)."""
    xp = be.ops
    inputs = Batch.unpack(arrays, "in_")
    if "label_ids" in arrays:
        hidden, shift = prompted_hidden(be, model, prompt, which, inputs, inputs, shared=shared)
        logits = be.logits_at(model, hidden, inputs.last_pos[:, None] - shift)[:, 0]
        return xp.index_last(xp.log_softmax(logits), arrays["label_ids"])
    picked = target_logprobs(be, model, prompt, arrays, which, num_labels, shared)
    return xp.reshape(xp.sum(picked, 1), (-1, num_labels))


def target_logprobs(be, model, prompt, arrays: dict[str, Any], which: Sequence[int] | None = None, repeat: int = 1,
                    shared: bool | None = None):
    """(B', K) log-probabilities of the target tokens of the ``seq_`` batch (0 where weight is 0);
    its rows are ``repeat`` consecutive copies per row of the ``in_`` batch."""
    xp = be.ops
    seq = Batch.unpack(arrays, "seq_")
    hidden, shift = prompted_hidden(be, model, prompt, which, Batch.unpack(arrays, "in_"), seq, repeat, shared)
    logits = be.logits_at(model, hidden, xp.take_last(seq.token_pos, arrays["index"]) - shift)
    return xp.take_last(xp.log_softmax(logits), arrays["target"][..., None])[..., 0] * arrays["weight"]


def completion_nll(be, model, prompt, arrays: dict[str, Any], axis: int | None = None, shared: bool | None = None):
    """Summed negative log-likelihood of the completion tokens, and their count (targets only);
    ``axis=-1``: per row."""
    xp = be.ops
    return -xp.sum(target_logprobs(be, model, prompt, arrays, shared=shared), axis), xp.sum(arrays["weight"], axis)


def cross_entropy(xp, scores, labels):
    """Mean cross-entropy of (B, K) label scores against (B,) label indices."""
    return -xp.mean(xp.take_last(xp.log_softmax(scores), labels[:, None]))


def weighted_cross_entropy(xp, scores, labels, row_weight):
    """Cross-entropy of (B, K) label scores summed with (B,) row weights (1/real rows, 0 for padding)."""
    return -xp.sum(xp.take_last(xp.log_softmax(scores), labels[:, None])[:, 0] * row_weight)


def task_loss(be, model, prompt, task: Task, arrays: dict[str, Any], num_labels: int, shared: bool | None = None):
    """The training loss of one batch: cross-entropy over label scores, or the mean completion NLL.

    A batch padded to a fixed shape (``row_weight``, :meth:`lrpt.training.Training.prepare`) averages
    over its real rows only; its copied rows weigh 0 (their completion targets too)."""
    if task.kind == "classification":
        scores = label_scores(be, model, prompt, arrays, num_labels, shared=shared)
        if "row_weight" in arrays:
            return weighted_cross_entropy(be.ops, scores, arrays["labels"], arrays["row_weight"])
        return cross_entropy(be.ops, scores, arrays["labels"])
    nll, count = completion_nll(be, model, prompt, arrays, shared=shared)
    return nll / be.ops.clamp_min(count, 1.0)


def prompt_lengths(prompt: Any, b: int, which: Sequence[int] | None) -> list[int]:
    """Prompt length of each of ``b`` rows (0 for the plain model); ``which`` checked (:func:`check_which`)."""
    if prompt is None:
        return [0] * b
    prompts = prompt_list(prompt)
    return [prompts[w].spec.n_tokens for w in check_which(which, b, len(prompts))]


def check_which(which: Sequence[int] | None, rows: int, prompts: int) -> list[int]:
    """The prompt index of each of ``rows`` rows: ``which`` itself, checked, or all 0. A wrong one
    raised IndexError, or a broadcasting error that differed between the backends."""
    if which is None:
        return [0] * rows
    which = list(which)
    if len(which) != rows:
        raise DataError(f"which has {len(which)} entries for {rows} rows: give one prompt index per row")
    bad = [w for w in which if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w < prompts]
    if bad:
        raise DataError(f"which holds {bad[0]!r}, but there are {prompts} prompts: use indices 0 to {prompts - 1}")
    return [int(w) for w in which]


@contextlib.contextmanager
def eval_mode(prompt: Any):
    """Prompt modules in eval mode (no dropout) for the block, then back in the modes they had."""
    modules = prompt_list(prompt)
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, f in zip(modules, flags):
            m.train(f)


def check_context(model, rows: Sequence[Sequence[int]], prompt_lens: Sequence[int], extra: Sequence[int]) -> None:
    """Refuse (:class:`DataError`) a row whose prompt, input and answer need more positions than the
    model's context: past it a model with a position table indexes out of range (torch) or reads
    garbage (MLX: NaN scores, answered as label 0). :func:`lrpt.data.fit_to_context` cuts inputs to fit."""
    context = loaded_context(model)
    if context is None:
        return
    for i, (row, n, x) in enumerate(zip(rows, prompt_lens, extra)):
        if n + len(row) + x > context:
            raise DataError(f"row {i} needs {n + len(row) + x} positions (prompt {n}, input {len(row)}, answer {x}),"
                            f" more than the model's context of {context}: shorten it, or cut the inputs with"
                            " lrpt.data.fit_to_context (the CLI does)")


def _backend(model):
    from .backends import backend_for

    return backend_for(model)


def score_rows(be, model, prompt, rows: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]],
               which: Sequence[int] | None = None, pad_id: int = 0, batch_size: int = 32,
               shared_prefix: bool | None = None) -> np.ndarray:
    """(N, K) float32 label log-probabilities of token rows, in batches, without gradients
    (``shared_prefix``: see :mod:`lrpt.prefix`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a whole number of rows, at least 1, got {batch_size!r}")
    longest = max(map(len, label_ids), default=1)
    check_context(model, rows, prompt_lengths(prompt, len(rows), which), [0 if longest == 1 else longest] * len(rows))
    asarray = be.asarray_for(model)
    out = []
    with be.inference(model):
        for i in range(0, len(rows), batch_size):
            sub, sw = rows[i : i + batch_size], None if which is None else which[i : i + batch_size]
            host = scoring_arrays(sub, label_ids, prompt_lengths(prompt, len(sub), sw), pad_id)
            scores = label_scores(be, model, prompt, to_arrays(host, asarray), len(label_ids), sw, shared_prefix)
            out.append(be.ops.to_numpy(scores))
    return np.concatenate(out) if out else np.zeros((0, len(label_ids)), np.float32)


def score_labels(model, tokenizer, prompt, texts: Sequence[str], label_words: Sequence[str],
                 which: Sequence[int] | None = None, batch_size: int = 32, shared_prefix: bool | None = None) -> np.ndarray:
    """(N, K) label log-probabilities for already templated ``texts`` (one prompt, mixed prompts
    chosen per row by ``which``, or None for the plain model); ``shared_prefix``: a static prompt
    runs once per batch (:mod:`lrpt.prefix`; the same scores, less work)."""
    be = _backend(model)
    be.place(prompt, model)
    hf = be.hf_tokenizer(tokenizer)
    with eval_mode(prompt):
        return score_rows(be, model, prompt, encode_texts(hf, texts), label_token_ids(hf, label_words), which,
                          hf.pad_token_id or 0, batch_size, shared_prefix)


def classify(model, tokenizer, prompt, texts, label_words, which=None, batch_size=32,
             shared_prefix: bool | None = None) -> np.ndarray:
    """Predicted label index for each templated text (argmax of :func:`score_labels`)."""
    return score_labels(model, tokenizer, prompt, texts, label_words, which, batch_size, shared_prefix).argmax(-1)


def completion_metrics(nll: np.ndarray) -> dict[str, float]:
    """Mean NLL per target token from per-row (NLL, count) pairs."""
    loss = float(nll[:, 0].sum() / max(float(nll[:, 1].sum()), 1.0))
    return {"metric": loss, "loss": loss}


def evaluate(model, tokenizer, prompt, task: Task, data: list[Encoded],
             batch_size: int = 32, shared_prefix: bool | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics on encoded examples, and per row: the (N, K) label scores for classification, the
    (N, 2) completion NLL and target-token count for completion (``shared_prefix``: :mod:`lrpt.prefix`)."""
    be = _backend(model)
    be.place(prompt, model)
    hf = be.hf_tokenizer(tokenizer)
    pad = hf.pad_token_id or 0
    with eval_mode(prompt):
        if task.kind == "classification":
            scores = score_rows(be, model, prompt, [r.ids for r in data], label_token_ids(hf, task.label_words),
                                None, pad, batch_size, shared_prefix)
            return classification_metrics(task, [r.target for r in data], scores), scores
        n = prompt_lengths(prompt, 1, None)[0]  # one prompt (or none: the plain model)
        check_context(model, [r.ids for r in data], [n] * len(data), [len(r.target) for r in data])
        per_row, asarray = [], be.asarray_for(model)
        with be.inference(model):
            for i in range(0, len(data), batch_size):
                rows = data[i : i + batch_size]
                host = completion_arrays([r.ids for r in rows], [r.target for r in rows], n, pad)
                a, b = completion_nll(be, model, prompt, to_arrays(host, asarray), axis=-1, shared=shared_prefix)
                per_row.append(np.stack([be.ops.to_numpy(a), be.ops.to_numpy(b)], -1).astype(np.float64))
        nll = np.concatenate(per_row) if per_row else np.zeros((0, 2))
        return completion_metrics(nll), nll
