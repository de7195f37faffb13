"""Build and run a server: load the model and the adapters, start the scheduler, run uvicorn.

``lrpt serve`` calls :func:`run`; tests and benchmarks call :func:`build` and run the app their
own way (uvicorn in a thread on 127.0.0.1).
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LrptError
from .registry import Registry
from .scheduler import Scheduler


@dataclass
class Built:
    app: object
    scheduler: Scheduler
    registry: Registry
    base_name: str


def build(backend_name: str, model_path: str | Path, adapters: str | Path | None, *, model_name: str | None = None,
          dtype: str | None = None, max_batch: int = 32, max_tokens_limit: int = 1024,
          shutdown_timeout: float = 30.0, loaded=None, log: Callable[[str], None] | None = None) -> Built:
    """Everything a server needs, its scheduler thread started.

    ``loaded`` is an already loaded ``(model, tokenizer)`` (tests); refused adapters are reported
    through ``log``, one line each.
    """
    from ..backends import get_backend, resolve
    from .app import ServerConfig, create_app

    if adapters is not None and not Path(adapters).is_dir():
        raise LrptError(f"--adapters {adapters}: not a directory")
    if max_batch < 1 or max_tokens_limit < 1:
        raise LrptError("--max-batch and --max-tokens-limit must be at least 1")
    name = resolve(backend_name)
    backend = get_backend(name)
    serving = importlib.import_module(f"lrpt.backends.{name}.serving")
    model, tokenizer = loaded if loaded is not None else backend.load_model(model_path, dtype=dtype, quiet=True)
    base_name = model_name or str(model_path)
    registry = Registry(backend, model, adapters, base_name)
    report = registry.reload()
    for adapter, reason in report.refused.items():
        (log or _stderr)(f"lrpt: refused adapter {adapter}: {reason}")
    scheduler = Scheduler(serving, model, tokenizer, max_batch)
    scheduler.on_reload = lambda: _log_refused(registry.reload(), log or _stderr)
    config = ServerConfig(base_name=base_name, backend=name, max_tokens_limit=max_tokens_limit,
                          context_length=serving.context_length(model), shutdown_timeout=shutdown_timeout)
    app = create_app(scheduler, registry, config, backend)
    scheduler.start()
    return Built(app, scheduler, registry, base_name)


def run(args) -> int:
    """``lrpt serve``: serve until SIGTERM / Ctrl-C; SIGHUP reloads the adapters."""
    import uvicorn

    from ..fetch import resolve_model

    _check_port(args.host, args.port)  # before minutes of model loading, not after
    path = resolve_model(args.model, log=_stderr)
    built = build(args.backend, path, args.adapters, model_name=args.model, dtype=args.dtype,
                  max_batch=args.max_batch, max_tokens_limit=args.max_tokens_limit,
                  shutdown_timeout=args.shutdown_timeout)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: setattr(built.scheduler, "reload_requested", True))
    names = ", ".join(sorted(built.registry.adapters)) or "none"
    _stderr(f"lrpt: serving {built.base_name} with adapters: {names} on http://{args.host}:{args.port}")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler it found:
    # a handler that ignores it makes that re-raise a no-op, so a requested stop exits with 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(built.app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.shutdown_timeout)
    _stderr("lrpt: server stopped")
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise LrptError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _log_refused(report, log: Callable[[str], None]) -> None:
    for adapter, reason in report.refused.items():
        log(f"lrpt: refused adapter {adapter}: {reason}")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ThreadedServer:
    """uvicorn serving ``app`` on ``host``:a free port from a background thread (tests, benchmarks).

    ``with ThreadedServer(app) as url:`` waits until the server accepts requests and stops it
    (graceful shutdown, then the app's lifespan stops the scheduler) on exit.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.timeout = timeout
        self.thread = None

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, name="lrpt-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LrptError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
