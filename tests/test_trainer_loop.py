"""The shared training loop (lrpt.trainer) driven by a framework-free fake TrainOps: what a run
directory holds after crashes, resumes and damaged files, in milliseconds and on any machine."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lrpt.adapter import Adapter
from lrpt.errors import TrainingError
from lrpt.spec import PromptSpec
from lrpt.trainer import BEST_COPY, RunDir, TrainConfig, run_training

SPEC = PromptSpec(method="prompt", n_tokens=2)
CONFIG = TrainConfig(steps=20, lr=0.1, progress=False, retry_collapsed=False, average=0.0)


class Crash(Exception):
    """The process dying mid-run."""


class FakeOps:
    """Every tensor holds the number of steps taken; evaluation reads a per-step table."""

    def __init__(self, metrics: dict[int, float] | None = None, crash_at: int | None = None):
        self.lengths = [5] * 40
        self.t = 0
        self.params = {k: np.zeros(shape, np.float32) for k, shape in SPEC.param_shapes(4).items()}
        self.metrics, self.crash_at = metrics or {}, crash_at

    def step(self, micro_batches, lr):
        if self.crash_at is not None and self.t + 1 == self.crash_at:
            raise Crash
        self.t += 1
        self.params = {k: np.full_like(v, self.t) for k, v in self.params.items()}
        return 1.0

    def loss_value(self, pending):
        return float(np.mean(pending))

    def evaluate(self):
        return {"metric": self.metrics.get(self.t, 0.0)}

    def finite(self):
        return True

    def adapter(self):
        return Adapter(spec=SPEC, params={k: v.copy() for k, v in self.params.items()})

    def state(self):
        return {}, {"t": self.t}

    def load_state(self, adapter, tensors, meta):
        self.params = {k: v.copy() for k, v in adapter.params.items()}
        self.t = meta["t"]

    def load_params(self, params):
        self.params = {k: np.asarray(v).copy() for k, v in params.items()}

    def collapsed(self):
        return None

    def restart(self, params):
        self.params, self.t = dict(params), 0


def _step_of(adapter_dir: Path) -> float:
    return float(next(iter(Adapter.load(adapter_dir).params.values())).flat[0])


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    run = RunDir(tmp_path)
    for step in (999_999, 1_000_000, 12):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-notes").mkdir()  # not a checkpoint's name
    assert [p.name for p in run.checkpoints()] == ["step-000012", "step-999999", "step-1000000"]
    assert run.latest_checkpoint().name == "step-1000000"


def test_resume_with_fewer_steps_than_done_is_refused(tmp_path):
    run_training(FakeOps(), CONFIG, tmp_path)
    with pytest.raises(TrainingError, match="already at step 20, past the 10 steps.*--steps 20 or more"):
        run_training(FakeOps(), replace(CONFIG, steps=10), tmp_path, resume=True)


@pytest.mark.parametrize("content", [b"\xff\xfe{", b"{}", b"[1]", b'{"step": 3'])
def test_a_damaged_trainer_state_is_one_clear_error(tmp_path, content):
    run_training(FakeOps(), CONFIG, tmp_path)
    (RunDir(tmp_path).latest_checkpoint() / "trainer_state.json").write_bytes(content)
    with pytest.raises(TrainingError, match="unreadable .*delete it to resume from an earlier one"):
        run_training(FakeOps(), CONFIG, tmp_path, resume=True)


def test_keep_best_adapter_matches_the_reported_best_after_a_crash(tmp_path):
    """A new best written to adapter/ at step 15, a crash at 17 before the next checkpoint (20); the
    resume evaluates only at 20, so the run's best is step 10's, and adapter/ must hold step 10's prompt."""
    metrics = {5: 1.0, 10: 2.0, 15: 9.0, 20: 0.0}
    config = replace(CONFIG, eval_every=5, save_every=10)
    with pytest.raises(Crash):
        run_training(FakeOps(metrics, crash_at=17), config, tmp_path)
    assert _step_of(tmp_path / "adapter") == 15  # the abandoned path's best
    assert _step_of(RunDir(tmp_path).latest_checkpoint() / BEST_COPY) == 10
    result = run_training(FakeOps(metrics), replace(config, eval_every=20), tmp_path, resume=True)
    assert (result.best_step, result.best_metric) == (10, 2.0)
    assert _step_of(tmp_path / "adapter") == 10


def test_the_divergence_guard_keeps_its_start_across_a_resume(tmp_path):
    run_training(FakeOps(), replace(CONFIG, steps=10, log_every=1), tmp_path)
    meta = json.loads((RunDir(tmp_path).latest_checkpoint() / "trainer_state.json").read_text())
    assert meta["guard"] == {"start": {"prompt_embeddings": 1.0}, "first_loss": 1.0}
    # resumed, the prompt's entries are 10: a guard rebuilt from them would allow 10× more growth
    result = run_training(FakeOps(), replace(CONFIG, steps=30, log_every=1), tmp_path, resume=True)
    assert result.step == 30
    meta = json.loads((RunDir(tmp_path).latest_checkpoint() / "trainer_state.json").read_text())
    assert meta["guard"]["start"] == {"prompt_embeddings": 1.0}


def test_run_files_are_written_by_a_new_run_only(tmp_path):
    run_training(FakeOps(), CONFIG, tmp_path, run_files={"data_args.json": {"train_limit": 5}})
    with pytest.raises(TrainingError, match="already holds a run"):  # refused: the first run's record stays
        run_training(FakeOps(), CONFIG, tmp_path, run_files={"data_args.json": {"train_limit": 9}})
    run_training(FakeOps(), replace(CONFIG, steps=25), tmp_path, resume=True,
                 run_files={"data_args.json": {"train_limit": 9}})
    assert json.loads((tmp_path / "data_args.json").read_text()) == {"train_limit": 5}


def test_retry_collapsed_switched_on_at_resume_says_it_cannot_act(tmp_path):
    config = replace(CONFIG, steps=200, save_every=100)  # retry_collapsed off: no starting prompt kept
    with pytest.raises(Crash):
        run_training(FakeOps(crash_at=150), config, tmp_path)
    notes: list[str] = []
    run_training(FakeOps(), replace(config, retry_collapsed=True), tmp_path, resume=True, log=notes.append)
    assert any("--retry-collapsed has no effect on this resumed run" in n for n in notes)
