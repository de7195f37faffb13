"""Data-parallel training: `torchrun` (gloo on CPU) and `mlx.launch` (ring on CPU) with two processes
give the adapter one process gives for the same global batch (fp32, constant schedule, no dropout)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

from lrpt import Adapter  # noqa: E402
from lrpt.cli import main  # noqa: E402

ARGS = ["--task", "demo", "--method", "lopt1", "--tokens", "4", "--rank", "2", "--batch-size", "12",
        "--train-limit", "60", "--eval-limit", "11", "--eval-every", "3", "--steps", "6", "--lr", "0.02",
        "--schedule", "constant", "--warmup", "0", "--grad-accum", "2", "--no-progress", "--save-every", "3",
        "--init", "text", "--init-text", "a good film"]  # a text init reads the embeddings, kept whole under FSDP


# Every run here is on the CPU, one thread per process (two processes share a 2-core machine).
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def train(backend: str, model: Path, out: Path, *extra: str) -> list[str]:
    """The ``lrpt`` arguments of a training run with ARGS."""
    return ["train", "--backend", backend, "--model", str(model), *ARGS, "--out", str(out), *extra]


def launch(backend: str, *args: str) -> subprocess.CompletedProcess:
    """``lrpt ARGS`` in two processes, under torchrun (torch) or mlx.launch (mlx)."""
    cli = ["-m", "lrpt.cli", *args]
    if backend == "torch":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", *cli]
    else:
        launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
        cmd = [launcher, "-n", "2", "--", sys.executable, *cli]
    return subprocess.run(cmd, capture_output=True, text=True, env=CPU_ENV, timeout=600)


def one_process(*args: str) -> None:
    """``lrpt ARGS`` in one process: this one (a launch costs ~10 s of imports on a 2-core machine), or,
    where CUDA is visible, a child with it hidden, as the launches here run on the CPU."""
    import torch

    if not torch.cuda.is_available():
        assert main(list(args)) == 0
        return
    r = subprocess.run([sys.executable, "-m", "lrpt.cli", *args], capture_output=True, text=True, timeout=600,
                       env=CPU_ENV)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    """``reference(backend)``: one process's run of ARGS, made once per backend; every launch below must
    reproduce it."""
    runs = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"one-{backend}") / "run"
            one_process(*train(backend, tiny_dirs["llama"], out))
            runs[backend] = out
        return runs[backend]

    return get


def relative_close(a: Adapter, b: Adapter, tol: float = 1e-5) -> None:
    for k in a.params:
        assert np.linalg.norm(a.params[k] - b.params[k]) <= tol * np.linalg.norm(a.params[k]), k


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_processes_train_the_adapter_one_process_trains(backend, tiny_dirs, tmp_path, reference):
    model = tiny_dirs["llama"]
    one, two = reference(backend), tmp_path / "two"
    r = launch(backend, *train(backend, model, two))
    assert r.returncode == 0, r.stderr[-2000:]
    relative_close(Adapter.load(one / "adapter"), Adapter.load(two / "adapter"))
    # rank 0 alone wrote the run: one record per log point, the same evaluations
    strip = [[{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}
              for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [sorted(r) for r in strip[0]] == [sorted(r) for r in strip[1]]
    for a, b in zip(strip[0], strip[1]):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    # a two-process run resumes in one process (any world size), and the other way round
    shutil.rmtree(two / "checkpoints" / "step-000006")
    one_process(*train(backend, model, two, "--resume"))
    relative_close(Adapter.load(one / "adapter"), Adapter.load(two / "adapter"))


def test_two_nodes_of_one_process_train_the_adapter_one_process_trains(tiny_dirs, tmp_path, reference):
    """Multi-node torchrun, emulated on one host: two launchers (``--nnodes 2 --node-rank 0|1``), one
    process each, so both ranks have LOCAL_RANK 0; rank 0 (global) alone writes the shared run."""
    cli = ["-m", "lrpt.cli", *train("torch", tiny_dirs["llama"], tmp_path / "two")]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", "29537", *cli],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CPU_ENV) for i in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-2000:]
    relative_close(Adapter.load(reference("torch") / "adapter"), Adapter.load(tmp_path / "two" / "adapter"))


def test_fsdp_shards_the_blocks_and_trains_the_same_adapter(tiny_dirs, tmp_path, reference):
    """FSDP2 (gloo, CPU): blocks sharded over two processes, the same adapter as one unsharded process,
    from a text init; uneven evaluation shares still run in lockstep (11 rows over 2 ranks)."""
    r = launch("torch", *train("torch", tiny_dirs["llama"], tmp_path / "fsdp", "--fsdp"))
    assert r.returncode == 0, r.stderr[-2000:]
    relative_close(Adapter.load(reference("torch") / "adapter"), Adapter.load(tmp_path / "fsdp" / "adapter"))
    last = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "eval_accuracy" in last


def test_fsdp_needs_torchrun_and_torch(tiny_dirs, tmp_path, capsys):
    from lrpt.cli import main

    for backend, needle in (("torch", "launch `torchrun"), ("mlx", "drop --fsdp")):
        code = main(["train", "--backend", backend, "--model", str(tiny_dirs["llama"]), *ARGS, "--fsdp",
                     "--out", str(tmp_path / backend)])
        assert code == 2 and needle in capsys.readouterr().err


def test_two_processes_on_a_completion_task_weight_by_target_tokens(tiny_dirs, tmp_path):
    """Completion loss is a mean over target tokens: ranks whose rows hold more tokens weigh more."""
    from tiny import sentences

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": s, "completion": " " + " ".join(s.split()[: 1 + i % 4])} for i, s in enumerate(sentences(40))]
    for split, part in (("train", rows[:32]), ("validation", rows[32:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    args = ["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--data", str(data), "--tokens", "4",
            "--rank", "2", "--batch-size", "8", "--steps", "4", "--lr", "0.02", "--schedule", "constant",
            "--warmup", "0", "--no-progress"]
    one_process(*args, "--out", str(tmp_path / "one"))
    r = launch("torch", *args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-2000:]
    relative_close(Adapter.load(tmp_path / "one" / "adapter"), Adapter.load(tmp_path / "two" / "adapter"))
    evals = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("one", "two")]
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-5)


def test_fsdp_holds_the_blocks_once_over_the_ranks_and_loads_only_this_ranks_share(tiny_dirs):
    """After --fsdp's sharding each rank holds the non-block weights whole and 1/N of the blocks; and
    ``load_model(fsdp=True)`` (what ``lrpt train --fsdp`` calls) returns the model sharded already."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29535", str(Path(__file__).with_name("fsdp_probe.py")), str(tiny_dirs["llama"]), "shard",
                        "load"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    shard, load = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert shard["after"] == pytest.approx(shard["expected"], rel=0.02) and shard["after"] < shard["before"]
    assert load["local"] == pytest.approx(load["expected"], rel=0.02) and load["local"] < load["whole"]
    assert load["gathered_after_forward"] == 0  # each block frees its gathered weights after its forward
