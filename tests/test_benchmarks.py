"""The benchmark scripts run end to end in their reduced CPU configuration (not timed tests)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lrpt.spec import METHOD_DEFAULTS

pytest.importorskip("torch")
pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    # Head and tail: under torchrun a rank's own error comes first, the launcher's traceback last.
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]
    return r.stdout


def json_lines(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines()]


@pytest.fixture
def script(monkeypatch):
    """``script(name)``: benchmarks/NAME.py loaded in this process, for scripts whose smoke needs no
    launcher of its own (a launch costs ~10 s of imports on a 2-core machine). What a script changes
    for its process is undone after the test: sys.path (they put benchmarks/ on it), the working
    directory, torch's thread count (cpu.py sets it)."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(ROOT)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"lrpt_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)


def test_speed_smoke(tmp_path, script, capsys):
    """One run of every CPU variant kind, with profiles."""
    assert script("speed").main(["--device", "cpu", "--smoke", "--methods", "lopt1", "lopa", "--shared", "lopt1",
                                 "--json", str(tmp_path / "s.json"), "--out", str(tmp_path / "logs"),
                                 "--profile", str(tmp_path / "prof")]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "s.json").read_text())
    rows = data["train"]
    assert {r["variant"] for r in rows} == {"floor", "peft", "peft-keep1", "lrpt-lopt1", "lrpt-lopa",
                                            "lrpt-lopt1-shared"}
    assert all(r["tok_s"] > 0 and r["vs_floor"] > 0 and r["reference"] == "floor" for r in rows)
    lines = [json.loads(x) for x in out.splitlines()]  # stdout is JSON lines, the same as the log file
    assert lines == [json.loads(x) for x in (tmp_path / "logs" / "speed.jsonl").read_text().splitlines()]
    assert lines[0]["shape"] == "tiny" and lines[1:] == rows
    first_loss = {r["variant"]: r["first_loss"] for r in rows}  # the floor has none; lrpt's is its 1st step's
    assert first_loss["floor"] is None and all(first_loss[v] is not None for v in first_loss if v.startswith("lrpt"))
    tables = {p.name: p.read_text() for p in (tmp_path / "prof").iterdir()}
    assert set(tables) == {f"profile-custom-{r['variant']}.txt" for r in rows}  # --smoke: one custom input shape
    assert all("aten::mm" in t for t in tables.values())


def test_generate_smoke(tmp_path, script):
    assert script("generate").main(["--smoke", "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert {r["bench"] for r in rows} == {"decode b=1", "decode b=3", "ttft"}
    assert all(r["median_ms"] > 0 for r in rows)
    assert any(r["case"] == "n=512 cached prefix" for r in rows)


def test_generate_mlx_smoke(tmp_path, script):
    pytest.importorskip("mlx_lm")
    assert script("generate").main(["--smoke", "--backend", "mlx", "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert {r["case"] for r in rows} == {"mlx_lm.generate no prompt", "lrpt mlx n=4"}


def test_accuracy_smoke(tmp_path):
    """Every kind of run, two seeds, two worker processes; the summary reads the results back."""
    runs = ["zero-shot", "lrpt:lopt1", "lrpt:lopt1:init=text:lr=1e-1", "lrpt:lopt1:probe=1", "lrpt:lopa:lr=1e-3",
            "lrpt:lopt1:n_tokens=7:average=0.5", "lrpt:lopt1:uscale=0.5", "peft-prompt:init=text:lr=1e-2",
            "peft-prompt:init=vocab:lr=1e-2:average=0.5:schedule=constant",
            "peft-lora:lr=1e-3:steps=3"]
    run("benchmarks/accuracy.py", "--smoke", "--seeds", "0", "1", "--workers", "2", "--out", tmp_path,
        "--lrpt-step", "auto", "--runs", *runs)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["seed"]) for r in rows) == sorted(
        [("zero-shot", 0)] + [(r, s) for r in runs[1:] for s in (0, 1)])
    assert all("error" not in r and 0 <= r["accuracy"] <= 1 for r in rows), rows
    assert all(r["params"] > 0 for r in rows if r["run"] != "zero-shot")
    assert next(r["lr"] for r in rows if r["run"] == "lrpt:lopt1") == METHOD_DEFAULTS["lopt1"]["lr"]
    assert next(r["lr"] for r in rows if r["run"] == "lrpt:lopt1:init=text:lr=1e-1") == 1e-1
    candidates = [METHOD_DEFAULTS["lopt1"]["lr"] * f for f in (1 / 3, 1, 3)]
    assert all(any(r["lr"] == pytest.approx(c) for c in candidates) for r in rows if r["run"] == "lrpt:lopt1:probe=1")
    assert all(len(r["probe_losses"]) == 3 for r in rows if r["run"] == "lrpt:lopt1:probe=1")
    assert {r["steps"] for r in rows if r["run"].endswith("steps=3")} == {3}  # a run's own length
    assert {r["uscale"] for r in rows if r["run"].startswith("lrpt:lopt1")} == {1.0, 0.5}
    params = {r["run"]: r["params"] for r in rows if r["run"] != "zero-shot"}  # a longer prompt, same rank: n × r more
    assert params["lrpt:lopt1:n_tokens=7:average=0.5"] - params["lrpt:lopt1"] == 3 * METHOD_DEFAULTS["lopt1"]["rank"]
    trained = {r["run"]: r["train"] for r in rows if r["run"] != "zero-shot"}  # the training settings a run names
    assert trained["lrpt:lopt1:n_tokens=7:average=0.5"] == {"average": 0.5} and trained["lrpt:lopt1"] == {}
    assert trained["peft-prompt:init=vocab:lr=1e-2:average=0.5:schedule=constant"] == {"average": 0.5,
                                                                                        "schedule": "constant"}
    assert {r["step_path"] for r in rows if r["run"].startswith("lrpt")} == {"eager"}  # auto, on the CPU
    table = run("benchmarks/accuracy.py", "--summary", tmp_path / "results.jsonl")
    assert table.count("\ndemo") == len(runs) and "±" in table


def test_cpu_smoke(script, capsys):
    pytest.importorskip("mlx_lm")
    assert script("cpu").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert set(json.loads(out.splitlines()[0])["step_ms"]) == {"mlx eager", "mlx compiled", "torch eager"}


def test_ddp_fsdp_smoke(script, capsys):
    """benchmarks/ddp.py on the CPU: one process, and two under torchrun with --fsdp (gloo)."""
    small = ["--shape", "tiny", "--per-gpu", "2", "--length", "16", "--steps", "1", "--rounds", "1"]
    assert script("ddp").main(small) == 0  # one process: this one
    one = json.loads(capsys.readouterr().out.splitlines()[-1])
    two = json.loads(next(line for line in run("-m", "torch.distributed.run", "--nproc-per-node", "2",
                                               "--master-port", "29538", "benchmarks/ddp.py", *small,
                                               "--fsdp").splitlines() if line.startswith("{")))
    assert (one["gpus"], two["gpus"], two["fsdp"]) == (1, 2, True) and one["tok_s"] > 0 and two["tok_s"] > 0


def test_epoch_smoke(tiny_dirs, tmp_path):
    """benchmarks/epoch.py runs `lrpt train` per variant and reports wall clock, accuracy and the choice."""
    from tiny import toy_data

    data = tmp_path / "data"
    data.mkdir()
    for split, seed in (("train", 1), ("validation", 2)):
        rows = [{"sentence": r["text"], "label": r["label"]} for r in toy_data(24, seed=seed)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run("benchmarks/epoch.py", "--model", tiny_dirs["llama"], "--data", data, "--preset", "sst2",
              "--limit", "16", "--batch-size", "8", "--variants", "eager", "auto", "--out", tmp_path / "logs")
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines == [json.loads(x) for x in (tmp_path / "logs" / "epoch.jsonl").read_text().splitlines()]
    runs = {r["variant"]: r for r in lines if "round" in r}
    assert set(runs) == {"eager", "auto"} and all(r["exit"] == 0 and r["wall_s"] > 0 for r in runs.values())
    assert all(0 <= r["accuracy"] <= 1 and r["steps_logged"] == 2 for r in runs.values())
    assert runs["eager"]["choice"].startswith("eager: compilation is off")
    assert runs["auto"]["choice"].startswith("eager: auto: on cpu")
    summary = {r["summary"]: r for r in lines if "summary" in r}
    assert summary["eager"]["vs_eager"] == 1.0 and summary["auto"]["runs"] == 1
    assert (tmp_path / "logs" / "auto-r0.log").read_text().count("lrpt: training step:") == 1


def test_backends_smoke(tmp_path, script, capsys):
    """benchmarks/backends.py --smoke: both backends' training step and scoring on the CPU."""
    pytest.importorskip("mlx_lm")
    assert script("backends").main(["--smoke", "--json", str(tmp_path / "b.json")]) == 0
    lines = json_lines(capsys.readouterr().out)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["errors"] == [] and data["info"]["mlx_device"].startswith("Device(cpu")
    assert [r["variant"] for r in data["train"]] == ["torch", "mlx", "mlx+compile"]
    assert all(r["step_ms"] > 0 and r["tok_s"] > 0 for r in data["train"])
    assert "compiled" in data["train"][2]["step"] and data["train"][1]["step"].startswith("eager")
    assert [r["variant"] for r in data["score"]] == ["torch score", "mlx score"]
    assert all(r["rows_s"] > 0 for r in data["score"])
    (ratio,) = data["ratios"]
    assert set(ratio["step"]) == {"mlx", "mlx+compile"} and ratio["score"] > 0
    assert lines == [data["info"], *data["train"], *data["score"], ratio]  # stdout: the same records, as JSON lines


def test_backends_mlx_failure_keeps_torch(script, capsys):
    """The torch figures are still reported when MLX fails its probe."""
    pytest.importorskip("mlx_lm")
    backends = script("backends")
    backends.PROBE = 'import sys; sys.exit("libnccl.so.2: cannot open shared object file")'
    assert backends.main(["--smoke"]) == 0
    lines = json_lines(capsys.readouterr().out)
    err = next(r for r in lines if "error" in r)
    assert err["backend"] == "mlx" and "libnccl.so.2" in err["error"] and "exited 1" in err["error"]
    assert [r["variant"] for r in lines if "variant" in r and "error" not in r] == ["torch", "torch score"]
    assert lines[-1]["step"] == {} and lines[-1]["score"] is None
