"""`lrpt train` flags derived from the dataclasses, `-c FILE.yaml`, and what `--resume` accepts."""

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

from lrpt import Adapter, LrptError  # noqa: E402
from lrpt.cli import build_parser, main  # noqa: E402
from lrpt.spec import PromptSpec  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402

DATA = ["--task", "demo", "--train-limit", "48", "--eval-limit", "0", "--batch-size", "8", "--tokens", "4",
        "--rank", "2", "--schedule", "constant", "--warmup", "0", "--lr", "0.01", "--no-progress"]


def test_every_spec_and_train_field_is_a_flag_with_help():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for cls in (PromptSpec, TrainConfig):
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in text, f"{cls.__name__}.{f.name} has no flag"
            assert f.metadata["help"].split()[0] in text


def test_yaml_config_and_flags_override_it(tiny_dirs, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: lopt2\nhead-hidden: 8\nlr: 0.5\nsteps: 2\nmax_grad_norm: none\nbucket: false\n")
    out = tmp_path / "r"
    assert main(["train", "-c", str(cfg), "--backend", "torch", "--model", str(tiny_dirs["llama"]), *DATA,
                 "--lr", "0.02", "--out", str(out)]) == 0
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["lr"] == 0.02 and stored["steps"] == 2 and stored["max_grad_norm"] is None and not stored["bucket"]
    assert Adapter.load(out / "adapter").spec.method == "lopt2"


def test_bad_config_key_is_one_line(tiny_dirs, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert main(["train", "-c", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_needs_no_flags(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "r"
    common = ["--backend", "torch", "--model", str(tiny_dirs["llama"]), "--out", str(out)]
    assert main(["train", *common, *DATA, "--method", "lopa", "--head-hidden", "8", "--steps", "2"]) == 0
    assert "training step: eager" in capsys.readouterr().err  # a started run says how its step runs
    for change, needle in ((["--lr", "0.5"], "lr 0.01 → 0.5"), (["--seed", "3"], "seed 0 → 3"),
                           (["--method", "lopt1"], "method 'lopa' → 'lopt1'"),
                           (["--labels", "positive,negative"], "labels None → 'positive,negative'"),
                           (["--train-limit", "40"], "train_limit 48 → 40")):
        assert main(["train", *common, "--resume", "--steps", "4", *change]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    # more steps, and how the step is computed (the plain path instead of the shared prefix, CUDA's
    # kernels left nondeterministic): allowed
    assert main(["train", *common, "--resume", "--steps", "4", "--no-shared-prefix", "--no-deterministic"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_resume_takes_the_runs_model_and_refuses_another(tiny_dirs, tmp_path, capsys):
    """--resume without --model loaded the default hub model (and crashed on a size mismatch), and a
    --model of another model resumed silently on it: the run stores its model, and the checkpoint's
    base-model check refuses another one in one line."""
    from tiny import save_tiny

    out = tmp_path / "r"
    assert main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--out", str(out), *DATA,
                 "--steps", "2"]) == 0
    assert json.loads((out / "data_args.json").read_text())["model"] == str(tiny_dirs["llama"].resolve())
    assert main(["train", "--backend", "torch", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    capsys.readouterr()
    other = save_tiny("llama", tmp_path / "other", seed=7)  # the same shapes, other weights
    assert main(["train", "--backend", "torch", "--model", str(other), "--out", str(out), "--resume",
                 "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "fingerprint mismatch" in err and err.count("\n") == 1, err
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_run_from_before_average_resumes_without_it(tiny_dirs, tmp_path, capsys):
    """`--resume` with no flags continues a run whose settings name no --average (made before it
    existed) without averaging, as it ended; asking for averaging then is refused, naming it."""
    out = tmp_path / "old"
    common = ["--backend", "torch", "--model", str(tiny_dirs["llama"]), "--out", str(out)]
    assert main(["train", *common, *DATA, "--method", "lopt1", "--steps", "2"]) == 0
    stored = out / "train_config.json"
    stored.write_text(json.dumps({k: v for k, v in json.loads(stored.read_text()).items() if k != "average"}))
    capsys.readouterr()
    assert main(["train", *common, "--resume", "--steps", "4"]) == 0
    assert "--average" not in capsys.readouterr().err and json.loads(stored.read_text())["average"] == 0.0
    assert main(["train", *common, "--resume", "--steps", "6", "--average", "0.5"]) == 2
    assert "average 0.0 → 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("src, dst", [("torch", "mlx"), ("mlx", "torch")])
def test_cross_backend_resume_from_the_cli(tiny_dirs, tmp_path, src, dst):
    """6 steps on one backend + `--resume --backend other` to 12 == 12 straight steps (1e-5 relative);
    the first backend's own speed flags (stored with the run) do not stop the other from resuming."""
    model = ["--model", str(tiny_dirs["llama"])]
    steps = ["--log-every", "2", "--save-every", "6"]
    own = {"torch": ["--no-compile", "--compile-mode", "reduce-overhead", "--compile-scope", "step"],
           "mlx": ["--grad-checkpoint"]}[src]
    assert main(["train", "--backend", src, *model, *DATA, *steps, "--steps", "12", "--out", str(tmp_path / "s")]) == 0
    assert main(["train", "--backend", src, *model, *DATA, *steps, *own, "--steps", "6",
                 "--out", str(tmp_path / "m")]) == 0
    assert main(["train", "--backend", dst, *model, *DATA, "--steps", "12", "--out", str(tmp_path / "m"),
                 "--resume"]) == 0
    a, b = Adapter.load(tmp_path / "s" / "adapter"), Adapter.load(tmp_path / "m" / "adapter")
    assert b.created_by["backend"] == dst
    for k in a.params:
        assert np.linalg.norm(a.params[k] - b.params[k]) <= 1e-5 * np.linalg.norm(a.params[k]), k


def test_each_method_gets_its_own_defaults_under_flags_and_config(tiny_dirs, tmp_path, capsys):
    """No tuning flags: the method's rank, LoPA's h′ and its lr (lrpt.spec.METHOD_DEFAULTS); a typed
    flag or a config key still wins over them."""
    from lrpt.spec import METHOD_DEFAULTS

    base = ["--backend", "torch", "--model", str(tiny_dirs["llama"]), "--task", "demo", "--train-limit", "16",
            "--eval-limit", "0", "--batch-size", "8", "--tokens", "4", "--steps", "1", "--no-progress"]
    runs = {"lopa": [], "lopt1": [], "prompt": [], "lopa-typed": ["--rank", "1", "--lr", "0.5"]}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("head-hidden: 8\n")
    for name, extra in runs.items():
        method = name.split("-")[0]
        out = tmp_path / name
        assert main(["train", *base, "--method", method, *extra, "--out", str(out),
                     *(["-c", str(cfg)] if name == "lopa-typed" else [])]) == 0
        spec = Adapter.load(out / "adapter").spec
        summary = capsys.readouterr().out  # lopt1's summary says what its final prompt is
        assert ("final prompt" in summary and "mean of 1 iterate (steps 1-1" in summary) == (method == "lopt1")
        stored = json.loads((out / "train_config.json").read_text())
        lr = stored["lr"]
        want = METHOD_DEFAULTS[method]
        assert stored["average"] == want.get("average", 0.0)  # lopt1 ends with its tail average, the others not
        if name == "lopa-typed":
            assert (spec.rank, spec.head_hidden, lr) == (1, 8, 0.5)
        else:
            assert lr == want["lr"] and spec.rank == want.get("rank")
            assert spec.head_hidden == want.get("head_hidden", PromptSpec.head_hidden)
    assert METHOD_DEFAULTS["lopa"]["lr"] != METHOD_DEFAULTS["lopt1"]["lr"]  # so the test tells them apart


def test_auto_length_is_one_pass_or_enough_passes_for_the_minimum_steps():
    from lrpt.trainer import AUTO_MIN_STEPS, plan
    from lrpt.training import length_note

    auto = TrainConfig(batch_size=16)
    assert plan(auto, 250)[0] == AUTO_MIN_STEPS  # CB-sized: 16 steps a pass, so several passes
    assert plan(auto, 67_349)[0] == 4210  # large: one pass
    assert plan(TrainConfig(batch_size=16, epochs=1), 250)[0] == 16  # typed: exactly that
    assert plan(TrainConfig(batch_size=16, steps=7), 250)[0] == 7
    assert f"{AUTO_MIN_STEPS} optimizer steps (auto: {AUTO_MIN_STEPS / 16:.1f} passes over 250 rows" in length_note(auto, 250)
    assert length_note(auto, 67_349) == "" and length_note(TrainConfig(epochs=1), 250) == ""


def test_auto_length_floor_is_the_methods_and_a_run_keeps_the_one_it_started_with(tmp_path):
    """lopt1's auto-length floor is its own (METHOD_DEFAULTS), the others' AUTO_MIN_STEPS; --min-steps
    wins; and a run stored before the floor was a setting resumes with the floor it was started with."""
    from lrpt.cli import _run_settings
    from lrpt.spec import METHOD_DEFAULTS
    from lrpt.trainer import AUTO_MIN_STEPS, plan
    from lrpt.training import length_note

    auto = TrainConfig(batch_size=16)
    mine = METHOD_DEFAULTS["lopt1"]["min_steps"]
    assert mine != AUTO_MIN_STEPS  # so the test tells them apart
    assert plan(auto.for_method("lopt1"), 250)[0] == mine
    assert f"at least {mine})" in length_note(auto.for_method("lopt1"), 250)
    for method in ("prompt", "lopt2", "lopa"):
        assert plan(auto.for_method(method), 250)[0] == AUTO_MIN_STEPS
    typed = TrainConfig(batch_size=16, min_steps=300).for_method("lopt1")
    assert plan(typed, 250)[0] == 300 and plan(typed, 67_349)[0] == 4210  # a floor, never a cut
    with pytest.raises(LrptError, match="--min-steps"):
        TrainConfig(min_steps=0).validate()
    (tmp_path / "train_config.json").write_text(json.dumps({"lr": 0.05, "average": 0.5}))
    assert _run_settings(tmp_path, "torch")[0]["min_steps"] == AUTO_MIN_STEPS
    (tmp_path / "train_config.json").write_text(json.dumps({"lr": 0.05, "average": 0.5, "min_steps": 2000}))
    assert _run_settings(tmp_path, "torch")[0]["min_steps"] == 2000


def test_resume_reads_the_runs_stored_settings_or_says_they_are_unreadable(tmp_path):
    """A resumed run's floor and checks come from its train_config.json: absent (a run from before
    the file), it is left alone; damaged, both say which file in one line instead of a traceback."""
    from lrpt.errors import TrainingError
    from lrpt.trainer import check_resume_config, resumed_floor

    path, config = tmp_path / "train_config.json", TrainConfig(lr=0.05)
    assert resumed_floor(path, config) is config and check_resume_config(path, config) is config
    for damage, said in ((b'{"lr": 0.05, "min_steps": 300', "is unreadable"),  # cut short
                         (b'{"lr": "\xff"}', "is unreadable"), (b"[0.05]", "is not a JSON object")):
        path.write_bytes(damage)
        for read in (resumed_floor, check_resume_config):
            with pytest.raises(TrainingError, match=f"train_config.json {said}"):
                read(path, config)
    path.write_text(json.dumps({"lr": 0.05, "min_steps": 300}))
    assert resumed_floor(path, config).min_steps == 300
    assert resumed_floor(path, dataclasses.replace(config, min_steps=50)).min_steps == 50  # typed: kept


def test_auto_is_a_word_only_where_unset_means_auto(tmp_path, capsys):
    """`--epochs auto` / `--lr auto` unset them (auto); `--max-grad-norm auto` is refused, not read as none."""
    import argparse

    from lrpt import flags

    parser = argparse.ArgumentParser()
    flags.add_flags(parser, TrainConfig)
    args = parser.parse_args(["--epochs", "auto", "--lr", "auto", "--max-grad-norm", "none"])
    assert args.epochs is None and args.lr is None and args.max_grad_norm is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-grad-norm", "auto"])
    assert "'auto' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--average", "--steps", "--min-steps"])
def test_off_is_no_word_for_an_auto_number(capsys, flag):
    """`--average off` once meant auto, i.e. the method's tail average on: only `auto` (or 0) now.
    `--steps auto` / `--min-steps auto` (the length chosen per run and per method) were refused,
    while `none` and `off` unset them."""
    import argparse

    from lrpt import flags

    parser = argparse.ArgumentParser()
    flags.add_flags(parser, TrainConfig)
    dest = flag[2:].replace("-", "_")
    assert getattr(parser.parse_args([flag, "auto"]), dest) is None
    assert getattr(parser.parse_args([flag, "0"]), dest) == 0
    for word in ("off", "none"):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, word])
        assert f"{word!r} is not a" in capsys.readouterr().err


def test_config_nulls_flag_names_and_resume_keys(tiny_dirs, tmp_path, capsys):
    """A bare `keep_best:` is an error (it read as off); `tokens:` is --tokens; `resume: true` in the
    config resumes as the flag does (it started half a resume)."""
    model = ["--backend", "torch", "--model", str(tiny_dirs["llama"])]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("keep_best:\n")
    assert main(["train", "-c", str(cfg), *model, *DATA, "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "keep_best has no value" in capsys.readouterr().err
    cfg.write_text("tokens: 3\n")
    data = [x for x in DATA if x not in ("--tokens", "4")]
    assert main(["train", "-c", str(cfg), *model, *data, "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    assert Adapter.load(tmp_path / "b" / "adapter").spec.n_tokens == 3
    cfg.write_text("resume: true\nsteps: 2\n")
    capsys.readouterr()
    assert main(["train", "-c", str(cfg), "--backend", "torch", "--model", str(tiny_dirs["llama"]),
                 "--out", str(tmp_path / "b")]) == 0  # no other flag: the run's own settings, as --resume
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_length_note_is_silent_for_one_pass_with_accumulation():
    from lrpt.trainer import AUTO_MIN_STEPS
    from lrpt.training import length_note

    rows = 16 * (3 * AUTO_MIN_STEPS + 1)  # 3·MIN + 1 micro-batches = MIN + 1 optimizer steps: one pass
    assert length_note(TrainConfig(batch_size=16, grad_accum=3), rows) == ""
    assert "optimizer steps (auto:" in length_note(TrainConfig(batch_size=16, grad_accum=3), 160)


def test_run_training_refuses_an_unset_lr():
    from lrpt.errors import TrainingError
    from lrpt.trainer import run_training

    class Ops:
        lengths = [3, 4]

    with pytest.raises(TrainingError, match="lr is unset"):
        run_training(Ops(), TrainConfig(), None)


def test_train_says_when_a_collapsed_run_trained_again(tiny_dirs, tmp_path, capsys, monkeypatch):
    """Training rows of one label (a prompt can only tie the majority label there): the run retries
    once (lrpt.retry), says why on stderr and in its summary, and --no-retry-collapsed keeps it as it is."""
    import lrpt.trainer as T
    from lrpt.spec import METHOD_DEFAULTS

    monkeypatch.setattr(T, "MIN_STEPS", 4)
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "label": 1}) for i in range(16)))
    base = ["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--data", str(d), "--labels",
            "bad,good", "--eval-limit", "0", "--steps", "4", "--batch-size", "4", "--no-progress"]
    for extra, steps in (([], 8), (["--no-retry-collapsed"], 4)):
        assert main([*base, *extra, "--out", str(tmp_path / f"r{steps}")]) == 0
        out, err = capsys.readouterr()
        rows = dict(line.split(None, 1) for line in out.splitlines() if line.startswith(("steps", "retried")))
        assert rows["steps"].strip() == str(steps)
        assert ("retried" in rows) == (steps == 8) and ("training once more from the start" in err) == (steps == 8)
        if steps == 8:  # the tail average's steps are the run's, in its second attempt
            assert "mean of 2 iterates (steps 7-8 every 1; --average)" in out
            lr = METHOD_DEFAULTS["lopt1"]["lr"] / 3
            assert rows["retried"].strip().endswith(f"trained again from step 4 at lr {lr:.3g}")
