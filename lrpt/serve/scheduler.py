"""The scheduler: one thread owns the model and runs every request in one continuous batch.

Requests (one :class:`Choice` per generated sequence) wait in a queue; between decode steps the
thread admits as many as the batch has room for, prefills them together (mixed adapters in
one forward) through the backend's ``serving`` module, then runs one decode step for every row.
Each token is turned into text here (stop strings, EOS, ``max_tokens``); failed and cancelled
rows leave the batch at once. Finished rows retire: they stay in the decode batch (their tokens
ignored) until it is compacted, which happens when new rows are admitted, when retired rows are as
many as running ones, or before a retired row would run past the model's context. Admissions
come in groups (a quarter of the batch, or all that wait): when rows finish one by one, as EOS
makes them, compacting and re-padding the whole KV cache per row cost more than the idle rows
(measured: 0.73× of a one-adapter load before, see RESULTS.md). Other work that needs the model (classification,
adapter reloads) runs on the same thread between steps, through :meth:`Scheduler.call`.

Failures stay with their request: a prefill that fails is retried row by row and only the
failing rows get an error; a row whose sampling fails leaves alone. Only an error of a whole
decode step (which no row can be blamed for) fails the rows of that step; the server goes on.
Results go back through each choice's ``sink`` (called on this thread; the HTTP layer passes
``loop.call_soon_threadsafe``-based sinks).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..decoding import decode_new
from ..errors import ServeError
from .textstream import find_stop, streamable

log = logging.getLogger("lrpt.serve")

Event = tuple  # ("text", index, delta) | ("end", index, finish_reason, completion_tokens) | ("error", index, msg)


@dataclass(eq=False)
class Choice:
    """One sequence to generate (a request with ``n`` > 1 has n of them)."""

    index: int
    ids: list[int]
    prompt: Any  # the backend's prompt module, or None for the base model
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    sink: Callable[[Event], None] = lambda event: None
    out_ids: list[int] = field(default_factory=list)
    generated: int = 0
    sent: int = 0
    done: bool = False
    cancelled: bool = False


class Scheduler:
    """Runs :class:`Choice` rows through ``serving`` (a backend's serving module) on its own thread."""

    def __init__(self, serving, model, tokenizer, max_batch: int = 32):
        self.serving, self.model, self.tokenizer = serving, model, tokenizer
        self.max_batch = max_batch
        self.text = serving.text_tokenizer(tokenizer)
        self.eos = serving.eos_token_ids(model, tokenizer)
        self.tokenizer_lock = threading.Lock()  # HF tokenizers are not safe to share between threads
        self.reload_requested = False  # set from a signal handler: a plain flag, no lock
        self.on_reload: Callable[[], Any] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[Choice] = deque()
        self._active: set[Choice] = set()
        self._retired: dict[Choice, int] = {}  # finished rows still in the batch → steps they may still run
        self.context = serving.context_length(model)
        self._state = None
        self._stop_at: float | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_rows = 0  # most rows in one decode step
        self.peak_prompts = 0  # most different prompts (adapters, or none) in one decode step
        self.cancelled = 0  # rows dropped because their client went away

    # -- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        """Make the (empty) batch here, so a model the backend cannot batch fails at once; then start."""
        self._state = self.serving.start(self.model, self.tokenizer, self.max_batch)
        self._thread = threading.Thread(target=self._run, name="lrpt-scheduler", daemon=True)
        self._thread.start()

    def submit(self, choices: Sequence[Choice]) -> None:
        if self._stop_at is not None:
            raise ServeError("the server is shutting down", status=503, kind="server_error", code="shutting_down")
        self._inbox.put(("run", list(choices)))

    def cancel(self, choices: Sequence[Choice]) -> None:
        """Free the rows of a client that went away (they stop within one step)."""
        for c in choices:
            c.cancelled = True

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the scheduler thread (between steps); its result or exception comes in the future."""
        fut: Future = Future()
        if self._stop_at is not None:
            fut.set_exception(ServeError("the server is shutting down", status=503, kind="server_error"))
            return fut
        self._inbox.put(("call", (fn, fut)))
        return fut

    def encode(self, text: str, special: bool = True) -> list[int]:
        with self.tokenizer_lock:
            return list(self.text(text, add_special_tokens=special)["input_ids"])

    def stats(self) -> dict[str, int]:
        return {"running": len(self._active), "queued": len(self._pending), "retired": len(self._retired),
                "steps": self.steps,
                "peak_rows": self.peak_rows, "peak_prompts": self.peak_prompts,
                "cancelled": self.cancelled}

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is running for up to ``timeout`` seconds, cancel the rest, end the thread."""
        self._stop_at = time.monotonic() + timeout
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout + 10.0)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._iterate():
                    return
            except Exception as exc:  # a bug must not leave every client waiting forever
                log.exception("the scheduler failed; failing its requests and starting over")
                for c in [*self._active, *self._pending]:
                    self._fail(c, f"scheduler error: {exc}", remove=False)
                self._active.clear()
                self._pending.clear()
                self._retired.clear()
                self._state = self.serving.start(self.model, self.tokenizer, self.max_batch)

    def _iterate(self) -> bool:
        """One round: inbox, reload, shutdown check, admissions, one decode step. True when done."""
        self._take_inbox(block=not self._active and not self._pending)
        if self.reload_requested and self.on_reload is not None:
            self.reload_requested = False
            try:
                self.on_reload()
            except Exception:  # a reload must never stop the server
                log.exception("adapter reload failed")
        if self._stop_at is not None and (time.monotonic() > self._stop_at
                                          or not (self._active or self._pending)):
            for c in [*self._active, *self._pending]:
                self._fail(c, "the server shut down before this request finished", remove=False)
            self._pending.clear()
            self._active.clear()
            self._fail_calls()
            return True
        self._drop_cancelled()
        self._admit()
        if self._active:
            self._step()
        return False

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "run":
                self._pending.extend(payload)
            elif kind == "call":
                fn, fut = payload
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller, never raised here
                        fut.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_calls(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                payload[1].set_exception(ServeError("the server is shutting down", status=503, kind="server_error"))
            elif kind == "run":
                for c in payload:
                    self._fail(c, "the server shut down before this request started", remove=False)

    def _drop_cancelled(self) -> None:
        if any(c.cancelled for c in self._pending):
            self.cancelled += sum(c.cancelled for c in self._pending)
            self._pending = deque(c for c in self._pending if not c.cancelled)
        gone = [c for c in self._active if c.cancelled]
        if gone:
            self.cancelled += len(gone)
            self._active.difference_update(gone)
            self.serving.remove(self._state, gone)

    def _admit(self) -> None:
        room = self.max_batch - len(self._active)
        if self._active and room < min(len(self._pending), max(1, self.max_batch // 4)):
            return  # wait for a group's worth of room: one prefill and one cache merge for all of them
        group = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        if not group:
            return
        self._compact()
        try:
            results = self._prefill(group)
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0], f"prefill failed: {exc}", remove=False)
                return
            log.warning("a prefill of %d rows failed (%s); retrying them one by one", len(group), exc)
            results = []
            for c in group:
                try:
                    results += self._prefill([c])
                except Exception as one:
                    self._fail(c, f"prefill failed: {one}", remove=False)
        self._handle(results)

    def _prefill(self, group: list[Choice]) -> list[tuple]:
        out = self.serving.add(self.model, self._state, group, [c.prompt for c in group], [c.ids for c in group],
                               [c.temperature for c in group], [c.top_p for c in group], [c.seed for c in group])
        self._active.update(group)
        return out

    def _step(self) -> None:
        self.peak_rows = max(self.peak_rows, len(self._active))
        self.peak_prompts = max(self.peak_prompts, len({id(c.prompt) for c in self._active}))
        try:
            results = self.serving.step(self.model, self._state)
        except Exception as exc:
            log.exception("a decode step failed; its %d rows fail", len(self._active))
            for c in list(self._active):
                self._fail(c, f"decode step failed: {exc}", remove=False)
            self._active.clear()
            self._state = self.serving.start(self.model, self.tokenizer, self.max_batch)
            return
        self.steps += 1
        self._handle(results)
        for c in self._retired:
            self._retired[c] -= 1
        if self._retired and (not self._active or len(self._retired) >= len(self._active)
                              or min(self._retired.values()) <= 0):
            self._compact()

    def _retire(self, rows: list[Choice]) -> None:
        """Keep finished rows in the batch until :meth:`_compact`, within the model's context."""
        for c in rows:
            used = len(c.ids) + c.generated + (c.prompt.spec.n_tokens if c.prompt is not None else 0)
            self._retired[c] = (self.context - used - 1) if self.context else 64

    def _compact(self) -> None:
        if self._retired:
            self.serving.remove(self._state, list(self._retired))
            self._retired.clear()

    def _handle(self, results: list[tuple]) -> None:
        finished = []
        for c, token in results:
            if c.done or c not in self._active:
                continue
            try:
                if isinstance(token, BaseException):
                    raise token
                self._on_token(c, token)
            except Exception as exc:
                self._fail(c, f"generation failed: {exc}", remove=False)
            if c.done:
                finished.append(c)
        if finished:
            self._active.difference_update(finished)
            self._retire(finished)

    def _on_token(self, c: Choice, token: int) -> None:
        c.generated += 1
        if token in self.eos:
            self._finish(c, "stop", self._decode(c))
            return
        c.out_ids.append(token)
        text = self._decode(c)
        cut = find_stop(text, c.stop) if c.stop else None
        if cut is not None:
            self._finish(c, "stop", text[:cut])
        elif len(c.out_ids) >= c.max_tokens:
            self._finish(c, "length", text)
        else:
            visible = streamable(text, c.stop)
            if len(visible) > c.sent:
                c.sink(("text", c.index, visible[c.sent :]))
                c.sent = len(visible)

    def _decode(self, c: Choice) -> str:
        with self.tokenizer_lock:
            return decode_new(self.text, c.out_ids)  # a continuation: keeps a leading space

    def _finish(self, c: Choice, reason: str, text: str) -> None:
        c.done = True
        if len(text) > c.sent:
            c.sink(("text", c.index, text[c.sent :]))
            c.sent = len(text)
        c.sink(("end", c.index, reason, c.generated))

    def _fail(self, c: Choice, message: str, remove: bool = True) -> None:
        c.done = True
        if remove and c in self._active:
            self._active.discard(c)
            self.serving.remove(self._state, [c])
        try:
            c.sink(("error", c.index, message))
        except Exception:  # the client's loop may be gone at shutdown
            pass
