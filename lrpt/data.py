"""Framework-free data handling shared by both backends: reading, encoding, batching, metrics.

Both backends draw their batches from :func:`epoch_batches`, so for one seed they see the
same examples in the same order, and a resumed run finds its place from a single counter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, first_line
from .fileio import regular_file
from .tasks import Task, check_text

Tokenize = Callable[[str], list[int]]  # text -> ids; special tokens (BOS) as the model wants


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line number.

    Lines are decoded one by one, so bad bytes, JSON nested past Python's recursion limit or
    integers too long to parse name their line instead of surfacing as a traceback.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    regular_file(path, "data file", DataError)
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors on Windows write
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            except ValueError as exc:  # e.g. an integer with more than 4300 digits
                raise DataError(f"{path}:{lineno}: malformed JSON line ({str(exc)[:100]})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
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
    head: int = 0  # leading special tokens (BOS) of ``ids``, which a cut keeps: see :func:`keep_end`


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
        head = getattr(tokenize, "head", 0)
        if max_length and len(ids) > max_length:
            ids = keep_end(ids, max_length, head)
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
        out.append(Encoded(ids, target, ex.get("idx", i), head))
    return out


def fit_to_context(data: list[Encoded], room: int | None, reserve: int = 0, truncate: bool = True) -> int:
    """Cut inputs so that input + target fits in ``room`` tokens (the model's context minus the prompt).

    ``reserve`` is the target length of classification (the longest label word); a completion
    target counts itself. Inputs keep their end, where the answer follows. With ``truncate``
    False an input that does not fit is an error. Returns how many inputs were cut. Without it
    a 10 MB line makes the model try to allocate terabytes.
    """
    if room is None:
        return 0
    cut = 0
    for i, e in enumerate(data):
        target = len(e.target) if isinstance(e.target, list) else reserve
        limit = room - target
        if limit < 1:
            raise DataError(f"example {i}: its target alone ({target} tokens) fills the model's context ({room} tokens"
                            " after the prompt)")
        if len(e.ids) > limit:
            if not truncate:
                raise DataError(f"example {i} has {len(e.ids)} input tokens, but the model's context leaves {limit}"
                                " after the prompt and target: shorten it, or drop --no-truncate to cut it")
            e.ids = keep_end(e.ids, limit, e.head)
            cut += 1
    return cut


def keep_end(ids: list[int], limit: int, head: int = 0) -> list[int]:
    """``ids`` cut to ``limit`` tokens: the end, where the answer follows, behind the ``head`` leading
    special tokens (a model trained with BOS first degrades without it)."""
    head = head if limit > head else 0
    return ids[:head] + ids[len(ids) - (limit - head):]


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
    if name == "macro_f1":  # over the classes present (labels or predictions), as sklearn and SuperGLUE:
        return float(np.mean([f1(int(c)) for c in np.union1d(y, p)]))  # a subset without a class is not 0 there
    raise DataError(f"unknown metric {name!r}")


def classification_metrics(task: Task, labels: Sequence[int], scores: np.ndarray) -> dict[str, float]:
    """``metric`` (the task's, used by keep-best and early stopping) and ``accuracy`` from label scores."""
    preds, k = np.asarray(scores).argmax(-1), len(task.label_words)
    return {"metric": metric(task.metric, labels, preds, k), "accuracy": metric("accuracy", labels, preds, k)}


def majority_baseline(task: Task, labels: Sequence[int]) -> tuple[float, str]:
    """The task's metric, and the label word, of the best constant answer on ``labels`` (ties: the
    first label; for accuracy and macro F1 the most frequent label, for binary F1 the positive one):
    the score a prompt that ignores its input gets at best, so a tuned prompt at or under it has
    learned nothing usable (lr 1e-1 ``lopt1`` once ended an SST-2 run at 48.6% accuracy, under its
    50.9%: benchmarks/RESULTS.md, "The SST-2 seed-1 collapse")."""
    k = len(task.label_words)
    scores = [metric(task.metric, labels, [c] * len(labels), k) for c in range(k)]
    best = int(np.argmax(scores))
    return scores[best], task.label_words[best]


def chance_warning(task: Task, baseline: tuple[float, str], best: float | None) -> str | None:
    """One line when the best evaluation (``best``, the task's metric) is no better than ``baseline``
    (:func:`majority_baseline` of the same rows), else None."""
    value, word = baseline
    if best is None or best > value:
        return None
    return (f"warning: the best evaluation ({task.metric} {best:.4f}) is no better than always answering {word!r}"
            f" ({value:.4f}): the prompt learned nothing usable; train again with a lower --lr or another --seed")


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


def target_positions(seqs: Sequence[Sequence[int]], n_targets: Sequence[int],
                     width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where to read log-probabilities of the last ``n_targets[i]`` tokens of each sequence.

    Returns (token index of the predicting position, target id, weight 1/0), each (B, Kmax):
    the logits at token t predict token t+1, so target j of row i is read at
    ``len(seq) - n + j - 1``. Both backends score label words and completions this way.
    ``width`` fixes Kmax (a compiled step's shapes); the extra slots have weight 0.
    """
    if width is None:
        width = max(n_targets)
    elif width < max(n_targets):
        raise DataError(f"a target has {max(n_targets)} tokens, more than the fixed target width {width}")
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
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_split(split: str) -> str:
    """A split is a name (``validation``, ``test``), never a path: ``../../x`` must not read outside --data."""
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split) or ".." in split:
        raise DataError(f"split {split!r} is not a split name: use letters, digits, '_', '-' or '.' (e.g. validation)")
    return split


def load_examples(task: Task, split: str, data_dir: str | Path | None = None, limit: int | None = None,
                  seed: int = 0, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows of ``split`` for ``task``: from ``data_dir`` (``{split}.jsonl``), the built-in demo
    data, or HF ``datasets`` (online). ``limit`` keeps a fixed-seed random subset.

    Every row is checked (:func:`check_rows`) and label names become indices, so training and
    evaluation accept exactly the same files. A local directory without ``validation.jsonl``
    is an error, never a silent switch to ``test.jsonl``; a hub dataset without a validation
    split uses its test split and says so through ``log``.
    """
    check_split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"a row limit must be an integer >= 1, got {limit!r}")
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise DataError(f"data directory {directory} does not exist")
        path = directory / f"{split}.jsonl"
        if not path.exists():
            others = sorted(p.stem for p in directory.glob("*.jsonl") if _SPLIT_NAME.fullmatch(p.stem))
            hint = f" (it has: {', '.join(others)}; choose one with --split)" if others else ""
            raise DataError(f"data directory {directory} has no {split}.jsonl{hint}")
        rows = read_jsonl(path)
        where = str(path)
    elif task.data and task.data.startswith("builtin:"):
        from .demo_data import BUILTIN

        name = task.data.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DataError(f"task {task.name!r}: no built-in data {name!r} (there are: {', '.join(BUILTIN)})")
        rows, where = BUILTIN[name](split), f"the built-in {name} data"
    elif task.data:
        rows, where = _load_hub(task.data, split, log), f"dataset {task.data}"
    else:
        raise DataError(f"task {task.name!r} has no data source: pass --data DIR")
    if not rows:
        raise DataError(f"{where} has no rows")
    rows = check_rows(task, rows, where)
    if limit is not None and limit < len(rows):
        keep = np.random.default_rng(seed).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(keep)]
    return rows


def check_rows(task: Task, rows: Sequence[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Check every row as training would use it; returns the rows with label names made indices.

    Text fields must be strings of valid text (``None`` or ``3`` would be trained on as
    ``"None"``/``"3"``); a label is an index in [0, K) or one of the label words; GLUE-style
    ``-1``, ``null``, ``"1"`` and unknown names are errors naming the row.
    """
    text_fields = task.template_fields() + ([task.completion_field] if task.kind == "completion" else [])
    need = text_fields + ([task.label_field] if task.kind == "classification" else [])
    missing = [f for f in need if f not in rows[0]]
    if missing:
        raise DataError(f"{where}: rows have no field {missing[0]!r} (fields: {_fields(rows[0])});"
                        " pass --text-field/--label-field or --template")
    k = len(task.label_words)
    names = {w.strip(): i for i, w in enumerate(task.label_words)}
    folded: dict[str, int | None] = {}
    for w, i in names.items():  # case-insensitive names, unless two words differ only by case
        folded[w.lower()] = None if w.lower() in folded else i
    out = []
    for n, row in enumerate(rows, 1):
        for f in need:
            if f not in row:
                raise DataError(f"{where}: row {n} has no field {f!r} (fields: {_fields(row)})")
        for f in text_fields:
            value = row[f]
            if not isinstance(value, str):
                raise DataError(f"{where}: row {n}: field {f!r} is {type(value).__name__}, not text")
            try:
                check_text(value.replace("\x00", " "), f"row {n}: field {f!r}")  # NUL is text here
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
        if task.kind == "classification":
            label = row[task.label_field]
            if isinstance(label, str):
                index = names.get(label.strip(), folded.get(label.strip().lower()))
                if index is None:
                    raise DataError(f"{where}: row {n}: label {label[:40]!r} is not a label index or one of the label"
                                    f" words ({', '.join(repr(w) for w in names)})")
                row = {**row, task.label_field: index}
            elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k:
                raise DataError(f"{where}: row {n}: label {str(label)[:40]} is not an integer in [0, {k})"
                                " or a label word (unlabelled test rows cannot be scored)")
        out.append(row)
    return out


def _fields(row: dict[str, Any]) -> str:
    return ", ".join(sorted(str(k)[:40] for k in row)[:20])


def _load_hub(name: str, split: str, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
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
            if log is not None:
                log(f"lrpt: {name} has no validation split: using its test split")
        return [dict(r) for r in datasets.load_dataset(*args, split=split)]
    except Exception as exc:  # network and hub errors come in many types
        first = first_line(exc)
        raise DataError(f"cannot load dataset {name} ({first}): pass --data DIR with {split}.jsonl") from None
