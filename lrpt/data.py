"""Framework-free data handling shared by both backends: reading, encoding, batching, metrics.

Both backends draw their batches from :func:`epoch_batches`, so for one seed they see the
same examples in the same order, and a resumed run finds its place from a single counter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .tasks import Task

Tokenize = Callable[[str], list[int]]  # text -> ids; special tokens (BOS) as the model wants


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


@dataclass
class Encoded:
    """One example as token ids: ``ids`` is the templated input; ``target`` the label index
    (classification) or the completion's token ids (completion)."""

    ids: list[int]
    target: int | list[int]
    idx: Any = None


def encode_examples(
    task: Task,
    tokenize: Tokenize,
    examples: Sequence[dict[str, Any]],
    tokenize_target: Tokenize | None = None,
    max_length: int | None = None,
) -> list[Encoded]:
    """Template and tokenise examples; check labels and fields with clear errors."""
    out = []
    k = len(task.label_words)
    for i, ex in enumerate(examples):
        ids = tokenize(task.format(ex))
        if not ids:
            raise DataError(f"example {i} tokenizes to nothing")
        if max_length and len(ids) > max_length:
            ids = ids[-max_length:]  # keep the end: the answer position follows it
        if task.kind == "classification":
            if task.label_field not in ex:
                raise DataError(
                    f"example {i} has no label field {task.label_field!r} (fields: {', '.join(sorted(ex))})"
                )
            label = ex[task.label_field]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k:
                raise DataError(f"example {i}: label {label!r} is not an integer in [0, {k})")
            target: int | list[int] = label
        else:
            if task.completion_field not in ex:
                raise DataError(f"example {i} has no field {task.completion_field!r}")
            target = (tokenize_target or tokenize)(str(ex[task.completion_field]))
            if not target:
                raise DataError(f"example {i}: the completion tokenizes to nothing")
        out.append(Encoded(ids, target, ex.get("idx", i)))
    return out


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True
) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; a pure function of its arguments.

    With ``bucket``, examples are shuffled, cut into chunks of 64 batches, sorted by length
    inside a chunk, split into batches and the batches shuffled: similar lengths share a
    batch (little padding) while the order stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not bucket:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    chunk = batch_size * 64
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk].tolist(), key=lambda j: (lengths[j], j))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def metric(name: str, labels: Sequence[int], preds: Sequence[int], num_labels: int) -> float:
    """accuracy, f1 (binary, positive class 1) or macro_f1, in [0, 1]."""
    y, p = np.asarray(labels), np.asarray(preds)
    if len(y) == 0:
        return float("nan")
    if name == "accuracy":
        return float((y == p).mean())

    def f1(c: int) -> float:
        tp = float(((p == c) & (y == c)).sum())
        fp = float(((p == c) & (y != c)).sum())
        fn = float(((p != c) & (y == c)).sum())
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if name == "f1":
        return f1(1)
    if name == "macro_f1":
        return float(np.mean([f1(c) for c in range(num_labels)]))
    raise DataError(f"unknown metric {name!r}")


def classification_metrics(task: Task, labels: Sequence[int], scores: np.ndarray) -> dict[str, float]:
    """``metric`` (the task's, used by keep-best and early stopping) and ``accuracy`` from label scores."""
    preds, k = np.asarray(scores).argmax(-1), len(task.label_words)
    return {"metric": metric(task.metric, labels, preds, k), "accuracy": metric("accuracy", labels, preds, k)}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warmup, then the schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + np.cos(np.pi * progress))
    raise DataError(f"unknown schedule {schedule!r}: use cosine, linear or constant")


def target_positions(seqs: Sequence[Sequence[int]], n_targets: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where to read log-probabilities of the last ``n_targets[i]`` tokens of each sequence.

    Returns (token index of the predicting position, target id, weight 1/0), each (B, Kmax):
    the logits at token t predict token t+1, so target j of row i is read at
    ``len(seq) - n + j - 1``. Both backends score label words and completions this way.
    """
    width = max(n_targets)
    index = np.zeros((len(seqs), width), np.int64)
    target = np.zeros((len(seqs), width), np.int64)
    weight = np.zeros((len(seqs), width), np.float32)
    for i, (seq, k) in enumerate(zip(seqs, n_targets)):
        start = len(seq) - k - 1
        index[i, :k] = np.arange(start, start + k)
        target[i, :k] = seq[len(seq) - k :]
        weight[i, :k] = 1.0
    return index, target, weight


_MULTI_CONFIG = ("glue", "super_glue")  # hub datasets addressed as NAME/CONFIG


def load_examples(task: Task, split: str, data_dir: str | Path | None = None, limit: int | None = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Rows of ``split`` for ``task``: from ``data_dir`` (``{split}.jsonl``), the built-in demo
    data, or HF ``datasets`` (online). ``limit`` keeps a fixed-seed random subset."""
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise DataError(f"data directory {directory} does not exist")
        path = directory / f"{split}.jsonl"
        if not path.exists() and split == "validation" and (directory / "test.jsonl").exists():
            path = directory / "test.jsonl"
        rows = read_jsonl(path)
        where = str(path)
    elif task.data == "builtin:demo":
        from .demo_data import demo_rows

        rows, where = demo_rows(split), "the built-in demo data"
    elif task.data:
        rows, where = _load_hub(task.data, split), f"dataset {task.data}"
    else:
        raise DataError(f"task {task.name!r} has no data source: pass --data DIR")
    if not rows:
        raise DataError(f"{where} has no rows")
    check_fields(task, rows[0], where)
    if limit is not None and limit < len(rows):
        keep = np.random.default_rng(seed).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(keep)]
    return rows


def check_fields(task: Task, row: dict[str, Any], where: str) -> None:
    """Fail early, naming the source, when rows lack a field the task needs."""
    need = task.template_fields() + ([task.label_field] if task.kind == "classification" else [task.completion_field])
    missing = [f for f in need if f not in row]
    if missing:
        raise DataError(f"{where}: rows have no field {missing[0]!r} (fields: {', '.join(sorted(row))});"
                        " pass --text-field/--label-field or --template")


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading {name} needs HF datasets: pip install 'lrpt[data]', or pass --data DIR") from None
    parts = name.split("/", 1)
    args = parts if parts[0] in _MULTI_CONFIG and len(parts) == 2 else [name]
    try:
        available = datasets.get_dataset_split_names(*args)
        if split not in available and split == "validation" and "test" in available:
            split = "test"
        return [dict(r) for r in datasets.load_dataset(*args, split=split)]
    except Exception as exc:  # network and hub errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load dataset {name} ({first}): pass --data DIR with {split}.jsonl") from None
