"""Backends realise a PromptSpec on a framework. They are imported only when asked for.

``get_backend("torch")`` returns the module ``lrpt.backends.torch``; ``"mlx"`` returns
``lrpt.backends.mlx``; ``"auto"`` picks MLX on Apple silicon when it is installed, else
PyTorch, else MLX. Both modules expose the same functions with the same arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from types import ModuleType

from ..errors import BackendUnavailableError

BACKENDS = ("torch", "mlx")
_NEEDS = {"torch": ("torch", "transformers"), "mlx": ("mlx", "mlx_lm")}


def is_available(name: str) -> bool:
    """True when every package the backend needs can be imported (without importing it)."""
    return all(importlib.util.find_spec(pkg) is not None for pkg in _NEEDS[name])


def resolve(name: str = "auto") -> str:
    """Turn ``auto`` into a concrete backend name; check the name."""
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        order = ("mlx", "torch") if apple else ("torch", "mlx")
        for candidate in order:
            if is_available(candidate):
                return candidate
        raise BackendUnavailableError("no backend is installed: pip install 'lrpt[torch]' (or 'lrpt[mlx]' on a Mac)")
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}: use torch, mlx or auto")
    return name


def get_backend(name: str = "auto") -> ModuleType:
    """Import and return a backend module, or raise naming the extra to install."""
    name = resolve(name)
    missing = [pkg for pkg in _NEEDS[name] if importlib.util.find_spec(pkg) is None]
    if missing:
        raise BackendUnavailableError(
            f"the {name} backend needs {', '.join(missing)}, which is not installed: pip install 'lrpt[{name}]'"
        )
    return importlib.import_module(f"lrpt.backends.{name}")
