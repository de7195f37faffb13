"""Backends realise a PromptSpec on a framework. They are imported only when asked for.

``get_backend("torch")`` returns the module ``lrpt.backends.torch``; ``"mlx"`` returns
``lrpt.backends.mlx``; ``"auto"`` picks MLX on Apple silicon when it is installed, else
PyTorch, else MLX. Both modules satisfy :class:`Backend`: the same names, the same arguments
(checked by a test), so the mirror enforces itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

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


def backend_for(model: Any) -> ModuleType:
    """The backend a loaded model belongs to (mlx-lm models are MLX modules; everything else is torch)."""
    return get_backend("mlx" if type(model).__module__.split(".")[0] in ("mlx", "mlx_lm") else "torch")


class Backend(Protocol):
    """What a backend module provides: framework work only (the algorithm is the core's).

    ``ops`` is the core's op set (:mod:`lrpt.ops`). The rest: load a model; place, create, load and
    snapshot prompts; lay a batch out in the framework's arrays; run the model's blocks on prompted
    embeddings (or behind one prompt's keys and values, run once: :mod:`lrpt.prefix`) and its own
    head at chosen positions; generate with the framework's machinery; and
    a ``Stepper`` for autograd, the optimizer and compilation. ``score_labels``, ``classify``,
    ``evaluate`` and ``train`` are the core's own, re-exported.
    """

    NAME: str
    ops: ModuleType
    PromptModule: type
    Stepper: type
    load_model: Callable[..., tuple[Any, Any]]
    device_kind: Callable[[Any], str]
    hf_tokenizer: Callable[[Any], Any]
    base_model_info: Callable[[Any], Any]
    init_prompt: Callable[..., Any]
    prompt_from_adapter: Callable[..., Any]
    prompt_to_adapter: Callable[..., Any]
    place: Callable[[Any, Any], None]
    make_batch: Callable[..., Any]
    asarray_for: Callable[[Any], Callable[[Any], Any]]
    inference: Callable[[Any], Any]
    embed: Callable[[Any, Any], Any]
    prompt_rows: Callable[..., Any]
    forward_hidden: Callable[[Any, Any, Any], Any]
    shares_prefix: Callable[[Any], bool]
    forward_after_prefix: Callable[[Any, Any, Any], Any]
    logits_at: Callable[[Any, Any, Any], Any]
    forward_logits: Callable[..., Any]
    generate: Callable[..., list[str]]
    prefix_cache: Callable[[Any, Any], Any]
    score_labels: Callable[..., Any]
    classify: Callable[..., Any]
    evaluate: Callable[..., Any]
    train: Callable[..., Any]


def populate(namespace: dict[str, Any]) -> None:
    """Fill a backend package with the :class:`Backend` names: ``ops`` and the names its files
    define (``prompts``, ``model``, ``decode``, ``step``), and the core's scoring and training entry
    points. The protocol is the one list of what a backend exports."""
    from .. import scoring, training

    package = namespace["__name__"]
    namespace["ops"] = importlib.import_module(f"{package}.ops")
    sources = [importlib.import_module(f"{package}.{m}") for m in ("prompts", "model", "decode", "step")]
    for name in Backend.__annotations__:
        if name in namespace:
            continue
        found = [getattr(m, name) for m in (*sources, scoring, training) if hasattr(m, name)]
        if not found:
            raise ImportError(f"{package} does not provide {name!r}, which lrpt.backends.Backend requires")
        namespace[name] = found[0]
    namespace["__all__"] = sorted(Backend.__annotations__)
