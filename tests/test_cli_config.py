"""`lrpt train` flags derived from the dataclasses, `-c FILE.yaml`, and what `--resume` accepts."""

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

from lrpt import Adapter  # noqa: E402
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
    # more steps, and how the step is computed (the plain path instead of the shared prefix): allowed
    assert main(["train", *common, "--resume", "--steps", "4", "--no-shared-prefix"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


@pytest.mark.parametrize("src, dst", [("torch", "mlx"), ("mlx", "torch")])
def test_cross_backend_resume_from_the_cli(tiny_dirs, tmp_path, src, dst):
    """6 steps on one backend + `--resume --backend other` to 12 == 12 straight steps (1e-5 relative)."""
    model = ["--model", str(tiny_dirs["llama"])]
    steps = ["--log-every", "2", "--save-every", "6"]
    assert main(["train", "--backend", src, *model, *DATA, *steps, "--steps", "12", "--out", str(tmp_path / "s")]) == 0
    assert main(["train", "--backend", src, *model, *DATA, *steps, "--steps", "6", "--out", str(tmp_path / "m")]) == 0
    assert main(["train", "--backend", dst, *model, *DATA, "--steps", "12", "--out", str(tmp_path / "m"),
                 "--resume"]) == 0
    a, b = Adapter.load(tmp_path / "s" / "adapter"), Adapter.load(tmp_path / "m" / "adapter")
    assert b.created_by["backend"] == dst
    for k in a.params:
        assert np.linalg.norm(a.params[k] - b.params[k]) <= 1e-5 * np.linalg.norm(a.params[k]), k
