"""`lrpt inspect`, lazy framework imports and backend selection (no framework needed)."""

import json
import subprocess
import sys

import pytest

from lrpt import Adapter, BackendUnavailableError, BaseModelInfo, PromptSpec
from lrpt.adapter import WEIGHTS_NAME
from lrpt.backends import get_backend, resolve
from lrpt.cli import main


def run_cli(*args):
    """`python -m lrpt` (lrpt/__main__.py), as a user without the console script on PATH runs it."""
    return subprocess.run([sys.executable, "-m", "lrpt", *args], capture_output=True, text=True)


@pytest.fixture
def adapter_dir(tmp_path):
    spec = PromptSpec("lopt2", n_tokens=6, rank=3)
    Adapter.create(spec, 32, seed=0, base_model=BaseModelInfo("tiny-llama", "llama", 32, 50)).save(tmp_path / "a")
    return tmp_path / "a"


def test_inspect_text(adapter_dir, capsys):
    assert main(["inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    for needle in (
        "method         lopt2",
        "n_tokens       6",
        "dim            32",
        "rank           3",
        "activation     elu",
        "192 parameters",
        "lopt.X0",
        "6×32",
        "float32",
        "tiny-llama",
        "lrpt v1",
    ):
        assert needle in out, needle


def test_inspect_json(adapter_dir, capsys):
    assert main(["inspect", "--json", str(adapter_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lopt2" and info["trainable_params"] == 2 * 3 * 32
    assert info["tensors"]["lopt.U"] == {"shape": [32, 3], "dtype": "float32"}
    assert info["base_model"]["name_or_path"] == "tiny-llama" and info["format_version"] == 1


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_inspect_invalid_adapter_one_line_exit_2(adapter_dir, damage):
    w = adapter_dir / WEIGHTS_NAME
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:40])
    else:
        w.unlink()
    r = run_cli("inspect", str(adapter_dir))
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("lrpt: error: ") and "Traceback" not in r.stderr


def test_core_imports_no_framework():
    code = (
        "import sys, lrpt, lrpt.cli, lrpt.backends, lrpt.reference, lrpt.adapter, lrpt.tasks\n"
        "bad = [m for m in ('torch', 'mlx', 'transformers', 'mlx_lm', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_get_backend_missing_framework_names_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlx_lm" else real(n, *a))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'lrpt\[mlx\]'"):
        get_backend("mlx")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        get_backend("jax")


def test_auto_prefers_mlx_only_on_apple_silicon(monkeypatch):
    import lrpt.backends as b

    monkeypatch.setattr(b, "is_available", lambda name: True)
    monkeypatch.setattr(b.sys, "platform", "linux")
    assert resolve("auto") == "torch"
    monkeypatch.setattr(b.sys, "platform", "darwin")
    monkeypatch.setattr(b.platform, "machine", lambda: "arm64")
    assert resolve("auto") == "mlx"
    monkeypatch.setattr(b, "is_available", lambda name: False)
    with pytest.raises(BackendUnavailableError, match="no backend"):
        resolve("auto")


def test_core_works_when_frameworks_cannot_be_imported(adapter_dir):
    """As in a virtualenv holding only numpy and safetensors: block every framework import."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'mlx', 'transformers', 'mlx_lm', 'peft', 'gguf'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from lrpt.cli import main\n"
        f"sys.exit(main(['inspect', {str(adapter_dir)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "lopt2" in r.stdout
