"""Property-based fuzzing (hypothesis) of what lrpt reads: adapter directories and data files.

The property (issue 14): whatever a file contains, lrpt raises an :class:`LrptError` or gives a
valid result, never another exception. A loaded adapter must also survive what `inspect`,
`eval` and `generate` do with it next (describe it, format its template); data rows that pass
the checks must encode. Bounded to about a minute in CI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lrpt import Adapter, BaseModelInfo, PromptSpec  # noqa: E402
from lrpt.adapter import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from lrpt.cli import _description_lines, describe  # noqa: E402
from lrpt.data import encode_examples, load_examples  # noqa: E402
from lrpt.errors import LrptError  # noqa: E402
from lrpt.tasks import Task, get_task  # noqa: E402

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize=True)

SPECS = {
    "prompt": PromptSpec("prompt", n_tokens=3),
    "lopt1": PromptSpec("lopt1", n_tokens=3, rank=2),
    "lopt2": PromptSpec("lopt2", n_tokens=3, rank=2),
    "lopa": PromptSpec("lopa", n_tokens=2, rank=1, head_hidden=4),
}
BASE = BaseModelInfo("tiny", "llama", 8, 50, {"scheme": "rowmeanabs-v1", "values": [0.1] * 8})


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for method, spec in SPECS.items():
        out[method] = Adapter.create(spec, 8, seed=1, task=get_task("demo"), base_model=BASE).save(root / method)
    return out


# -- values a hostile file may hold -----------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([10**400, -1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["{text:>2000000000}", "{0}", "{x.__class__}", "{x!z}", "{}", "a\x00", "\ud800", "\x1b[2J",
                     "float32", "bfloat16", "lopt1", "classification", "completion", "{sentence}", "F32", "BF16"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=8)


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def mutate_json(doc: Any, data: st.DataObject) -> Any:
    """Replace, delete or add one value somewhere in ``doc``."""
    doc = json.loads(json.dumps(doc))
    where = data.draw(st.sampled_from(paths(doc)))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[where[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
    else:
        parent[where[-1]] = data.draw(json_values)
    return doc


def check_usable(adapter: Adapter, path: Path) -> None:
    """What the commands do with an adapter once it has loaded must not raise either."""
    adapter.validate()
    info = describe(adapter, path)
    _description_lines(info)
    json.dumps(info)
    if adapter.task is not None:
        adapter.task.format({f: "some text" for f in adapter.task.template_fields()})
    if adapter.spec.is_static:
        assert np.all(np.isfinite(adapter.materialize()))


def load_or_lrpt_error(path: Path) -> None:
    try:
        adapter = Adapter.load(path)
    except LrptError:
        return
    check_usable(adapter, path)


# -- adapter directories -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(SPECS))
@FUZZ
@given(data=st.data())
def test_mutated_config_json(originals, method, data):
    original = originals[method]
    config = json.loads((original / CONFIG_NAME).read_text())
    mutated = mutate_json(config, data)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        shutil.copytree(original, d)
        (d / CONFIG_NAME).write_text(json.dumps(mutated, ensure_ascii=data.draw(st.booleans())),
                                     encoding="utf-8", errors="surrogatepass")
        load_or_lrpt_error(d)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize("method", ["lopt1", "lopa"])
@FUZZ
@given(data=st.data())
def test_mutated_safetensors_bytes(originals, method, data):
    raw = (originals[method] / WEIGHTS_NAME).read_bytes()
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "append", "header"]))
    if kind == "header":  # a well-formed file whose header says something else
        header, body = _split(raw)
        head = json.dumps(mutate_json(header, data)).encode()
        raw = len(head).to_bytes(8, "little") + head + body
    else:
        at = data.draw(st.integers(0, len(raw)))
        if kind == "flip":
            at = min(at, len(raw) - 1)
            raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
        elif kind == "truncate":
            raw = raw[:at]
        elif kind == "insert":
            raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=16)) + raw[at:]
        else:
            raw = raw + data.draw(st.binary(min_size=1, max_size=16))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        shutil.copytree(originals[method], d)
        (d / WEIGHTS_NAME).write_bytes(raw)
        load_or_lrpt_error(d)


# -- data files ---------------------------------------------------------------------------------------

row_values = st.one_of(json_values, st.text(max_size=20), st.sampled_from([0, 1, 2, -1, "negative", " positive", "1"]))
rows = st.fixed_dictionaries({}, optional={"sentence": row_values, "label": row_values, "completion": row_values,
                                           "extra": row_values})
raw_lines = st.one_of(
    rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),
    st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"sentence": "caf\xe9", "label": 0}', b"", b"   ", b"null", b"[]",
                     b'{"sentence": "\\ud800", "label": 0}', b'{"sentence": "ok", "label": 1' + b"0" * 5000 + b"}"]),
)
TASKS = [get_task("demo"), Task("gen", kind="completion", template="{sentence}")]


def _tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))[:64] or [1]


@FUZZ
@given(lines=st.lists(raw_lines, min_size=1, max_size=6), which=st.sampled_from([0, 1]),
       limit=st.one_of(st.none(), st.integers(1, 4)))
def test_data_files(lines, which, limit):
    task = TASKS[which]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        try:
            got = load_examples(task, "train", tmp, limit=limit)
        except LrptError:
            return
    encoded = encode_examples(task, _tokenize, got)  # rows that pass the checks always encode
    assert len(encoded) == len(got) and (limit is None or len(got) <= limit)
