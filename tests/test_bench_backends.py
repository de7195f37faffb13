"""benchmarks/backends.py end to end on the CPU (--smoke): both backends' training step and scoring,
and the torch figures still reported when MLX fails its probe (not timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_backends_smoke(tmp_path):
    lines = run("benchmarks/backends.py", "--smoke", "--json", tmp_path / "b.json")
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


def test_backends_mlx_failure_keeps_torch():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import backends;"
            " backends.PROBE = 'import sys; sys.exit(\"libnccl.so.2: cannot open shared object file\")';"
            " backends.main(['--smoke'])")
    lines = run("-c", code)
    err = next(r for r in lines if "error" in r)
    assert err["backend"] == "mlx" and "libnccl.so.2" in err["error"] and "exited 1" in err["error"]
    assert [r["variant"] for r in lines if "variant" in r and "error" not in r] == ["torch", "torch score"]
    assert lines[-1]["step"] == {} and lines[-1]["score"] is None
