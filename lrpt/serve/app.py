"""The HTTP side of ``lrpt serve``: an OpenAI-compatible FastAPI app over one :class:`Scheduler`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/classify`` (lrpt's own), ``POST /v1/adapters/reload``. ``model`` names an adapter (its
folder name) or the base model (no prompt).

Streams are server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; events are
encoded by ``sse-starlette`` and sent through Starlette's ``StreamingResponse`` (so uvicorn's
graceful shutdown lets a running stream finish). A client that goes away mid-stream, or while
waiting for a non-streamed answer, has its rows cancelled within one decode step.

Chat: the tokenizer's chat template (``add_generation_prompt``) when it has one, tokenized without
extra special tokens (the template writes them); otherwise a plain format, one ``role: content``
line per message followed by ``assistant:``, tokenized like a raw completion prompt.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sse_starlette import ServerSentEvent

from ..errors import LrptError, ServeError, first_line
from .protocol import ChatRequest, ClassifyRequest, CompletionRequest, Message, error_body, from_validation
from .registry import Registry
from .scheduler import Choice, Scheduler


@dataclass
class ServerConfig:
    """What the app needs besides the scheduler and the registry."""

    base_name: str
    backend: str
    max_tokens_limit: int = 1024
    context_length: int | None = None
    shutdown_timeout: float = 30.0


def plain_chat(messages: list[Message]) -> str:
    """The documented fallback chat format for tokenizers without a chat template."""
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"


def create_app(scheduler: Scheduler, registry: Registry, config: ServerConfig, backend) -> FastAPI:
    """The FastAPI app; ``backend`` is the backend module (for ``score_labels``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.stop, config.shutdown_timeout)

    app = FastAPI(title="lrpt serve", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = from_validation(list(exc.errors()))
        return JSONResponse(error_body(str(err), err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # still OpenAI's shape, one line, no traceback
        first = first_line(exc)
        return JSONResponse(error_body(f"internal error: {first}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": config.backend, "model": config.base_name,
                "adapters": sorted(registry.adapters), **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": config.base_name, "object": "model", "created": now, "owned_by": "lrpt", "root": config.base_name,
                 "parent": None}]
        for name, served in sorted(registry.adapters.items()):
            data.append({"id": name, "object": "model", "created": now, "owned_by": "lrpt",
                         "root": config.base_name, "parent": config.base_name,
                         "method": served.adapter.spec.method, "n_tokens": served.adapter.spec.n_tokens})
        return {"object": "list", "data": data}

    @app.post("/v1/adapters/reload")
    async def reload():
        fut = scheduler.call(registry.reload)
        report = await asyncio.wrap_future(fut)
        return report.to_dict()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = _prompt_of(body.model)
        rows = [scheduler.encode(p) for p in body.prompt]
        return await _run(request, body, prompt, rows, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        prompt = _prompt_of(body.model)
        hf = scheduler.text
        if getattr(hf, "chat_template", None):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                with scheduler.tokenizer_lock:
                    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja errors: e.g. a template that wants alternating roles
                first = first_line(exc)
                raise ServeError(f"the chat template cannot render these messages: {first}",
                                 param="messages") from None
            row = scheduler.encode(text, special=False)
        else:
            row = scheduler.encode(plain_chat(body.messages))
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _run(request, body, prompt, [row], chat=True)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        served = registry.get(body.model)
        if served is None:
            if body.model == config.base_name:
                raise ServeError("the base model has no task: name an adapter with a classification task",
                                 param="model", code="no_task")
            raise _unknown(body.model)
        task = served.adapter.task
        if task is None or task.kind != "classification" or len(task.template_fields()) != 1:
            raise ServeError(f"adapter {body.model!r} has no single-field classification task", param="model",
                             code="no_task")
        texts = [task.template.format(**{task.template_fields()[0]: x}) for x in body.input]
        longest = max(len(scheduler.encode(t)) for t in texts) + max(len(scheduler.encode(w, special=False))
                                                                     for w in task.label_words)
        if config.context_length is not None and _n(served.prompt) + longest > config.context_length:
            raise ServeError(f"this model's maximum context length is {config.context_length} tokens; an input needs"
                             f" {_n(served.prompt) + longest}", param="input", code="context_length_exceeded")
        fut = scheduler.call(lambda: backend.score_labels(scheduler.model, scheduler.tokenizer, served.prompt, texts,
                                                          task.label_words))
        try:
            scores = await asyncio.wrap_future(fut)
        except LrptError as exc:
            raise ServeError(str(exc)) from None
        data = []
        for i, (text, row) in enumerate(zip(body.input, scores.tolist())):
            best = max(range(len(row)), key=row.__getitem__)
            data.append({"index": i, "input": text, "label": best, "label_word": task.label_words[best],
                         "scores": row})
        return {"object": "list", "model": body.model, "task": task.name, "label_words": task.label_words,
                "data": data}

    def _prompt_of(name: str):
        if name == config.base_name:
            return None
        served = registry.get(name)
        if served is None:
            raise _unknown(name)
        return served.prompt

    def _unknown(name: str) -> ServeError:
        return ServeError(f"the model {name!r} does not exist: GET /v1/models lists the base model and the adapters",
                          status=404, param="model", code="model_not_found")

    async def _run(request: Request, body, prompt, rows: list[list[int]], chat: bool):
        limit = config.max_tokens_limit
        max_tokens = body.max_tokens
        if max_tokens is None:  # chat without max_tokens: as much as the limits allow
            room = None if config.context_length is None else config.context_length - _n(prompt) - max(map(len, rows))
            max_tokens = max(1, min(limit, room if room is not None else limit))
        if max_tokens > limit:
            raise ServeError(f"max_tokens is {max_tokens}, over this server's limit of {limit}", param="max_tokens",
                             code="max_tokens_over_limit")
        for row in rows:
            if not row:
                raise ServeError("the prompt tokenizes to nothing", param="messages" if chat else "prompt")
            total = _n(prompt) + len(row) + max_tokens
            if config.context_length is not None and total > config.context_length:
                raise ServeError(
                    f"this model's maximum context length is {config.context_length} tokens; the request needs {total}"
                    f" ({_n(prompt)} prompt vectors + {len(row)} prompt tokens + {max_tokens} max_tokens)",
                    param="messages" if chat else "prompt", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        choices = []
        for i, row in enumerate(rows):
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                choices.append(Choice(index=i * body.n + j, ids=row, prompt=prompt, max_tokens=max_tokens,
                                      temperature=body.temperature, top_p=body.top_p, seed=seed, stop=body.stops,
                                      sink=sink))
        scheduler.submit(choices)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        usage_prompt = sum(len(r) for r in rows) * body.n
        if body.stream:
            stream = _stream(request, events, choices, body, ident, chat, usage_prompt)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        return await _collect(request, events, choices, body, ident, chat, usage_prompt)

    async def _collect(request, events, choices, body, ident, chat, usage_prompt):
        texts = {c.index: [] for c in choices}
        ends: dict[int, tuple[str, int]] = {}
        checked = time.monotonic()
        try:
            while len(ends) < len(choices):
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.5:  # text keeps coming: look at the client now and then
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                if event is None:
                    continue
                if event[0] == "text":
                    texts[event[1]].append(event[2])
                elif event[0] == "end":
                    ends[event[1]] = (event[2], event[3])
                else:
                    raise ServeError(event[2], status=500, kind="server_error", code="generation_failed")
        finally:
            scheduler.cancel([c for c in choices if c.index not in ends])
        completion = sum(n for _, n in ends.values())
        out = []
        for c in choices:
            text = "".join(texts[c.index])
            reason = ends[c.index][0]
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": reason})
            else:
                out.append({"index": c.index, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": out, "usage": _usage(usage_prompt, completion)}

    async def _stream(request, events, choices, body, ident, chat, usage_prompt) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        open_choices = {c.index for c in choices}
        completion = 0

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({"id": ident, "object": obj, "created": created, "model": body.model, "choices": [choice]})

        try:
            if chat:
                for c in choices:
                    yield chunk(c.index, "", None, role=True)
            while open_choices:
                event = await events.get()
                if event[0] == "text":
                    yield chunk(event[1], event[2], None)
                elif event[0] == "end":
                    open_choices.discard(event[1])
                    completion += event[3]
                    yield chunk(event[1], None if chat else "", event[2])
                else:
                    yield _sse(error_body(event[2], "server_error", None, "generation_failed"))
                    break
            if body.include_usage and not open_choices:
                yield _sse({"id": ident, "object": obj, "created": created, "model": body.model, "choices": [],
                            "usage": _usage(usage_prompt, completion)})
            yield ServerSentEvent(data="[DONE]").encode()
        finally:
            scheduler.cancel([c for c in choices if not c.done])

    return app


def _n(prompt) -> int:
    return 0 if prompt is None else prompt.spec.n_tokens


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict) -> bytes:
    return ServerSentEvent(data=json.dumps(obj, ensure_ascii=False)).encode()
