"""``lrpt serve``: the OpenAI-compatible server, talked to with the real ``openai`` client.

Servers run on 127.0.0.1 (uvicorn in a thread, or ``lrpt serve`` as a subprocess) over tiny
random models. Every generation is compared with the backend's own ``generate`` for the same
adapter and text alone, on a second copy of the model (the server's thread owns its copy).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tiny import sentences, spec_for, tokenizer, toy_task  # noqa: E402

from lrpt import Adapter  # noqa: E402
from lrpt.backends import get_backend, is_available  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"a0": ("lopt1", 3), "a1": ("prompt", 4), "a2": ("lopa", 5)}
METHODS_LIST = [m for m, _ in METHODS.values()]
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not is_available(b), reason=f"{b} not installed"))
            for b in ("torch", "mlx")]


def _make_adapter(model_dir: Path, method: str, n: int, seed: int, out: Path) -> None:
    torch_backend = get_backend("torch")
    model, tok = torch_backend.load_model(model_dir, quiet=True)
    prompt = torch_backend.init_prompt(spec_for(method, n=n), model, tok, seed=seed)
    torch_backend.prompt_to_adapter(prompt, toy_task(), torch_backend.base_model_info(model)).save(out)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_dirs) -> Path:
    """Three adapters for the tiny llama, one made for the tiny gemma3 (refused), one plain folder."""
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (method, n)) in enumerate(METHODS.items()):
        _make_adapter(tiny_dirs["llama"], method, n, i, root / name)
    _make_adapter(tiny_dirs["gemma3"], "lopt1", 3, 9, root / "for_gemma")
    (root / "notes").mkdir()
    return root


class _Server(SimpleNamespace):
    def generate(self, name: str, text: str, max_tokens: int, stop=None) -> str:
        """What ``lrpt generate --raw`` gives for ``text`` alone (the reference)."""
        prompt = None if name == "tiny" else self.prompts[name]
        return self.backend.generate(self.ref_model, self.ref_tok, prompt, [text], max_tokens=max_tokens,
                                     temperature=0.0, stop=stop)[0]


def _start(backend_name: str, tiny_dirs, adapters_dir: Path, **kw):
    from lrpt.serve.server import ThreadedServer, build

    backend = get_backend(backend_name)
    lines: list[str] = []
    built = build(backend_name, tiny_dirs["llama"], adapters_dir, model_name="tiny", log=lines.append, **kw)
    ref_model, ref_tok = backend.load_model(tiny_dirs["llama"], quiet=True)
    prompts = {}
    for name in METHODS:
        prompts[name] = backend.prompt_from_adapter(Adapter.load(adapters_dir / name), ref_model)
        prompts[name].eval()
    server = ThreadedServer(built.app)
    url = server.__enter__()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    return server, _Server(url=url, built=built, client=client, backend=backend, ref_model=ref_model,
                           ref_tok=ref_tok, prompts=prompts, lines=lines)


@pytest.fixture(scope="module")
def torch_server(tiny_dirs, adapters_dir):
    server, s = _start("torch", tiny_dirs, adapters_dir, max_batch=32, max_tokens_limit=200)
    yield s
    server.__exit__()


@pytest.fixture(scope="module")
def mlx_server(tiny_dirs, adapters_dir):
    server, s = _start("mlx", tiny_dirs, adapters_dir, max_batch=32, max_tokens_limit=200)
    yield s
    server.__exit__()


def _server(request, name: str) -> _Server:
    return request.getfixturevalue(f"{name}_server")


TEXTS = sentences(16, seed=11, length=(2, 10))


# -- the batch primitives alone: rows join and leave mid-decode, outputs stay exact -------------


@pytest.mark.parametrize("backend_name,arch",
                         [("torch", "llama"), ("torch", "gemma3"), ("mlx", "llama"), ("mlx", "gemma3")])
def test_rows_join_and_leave_between_steps(backend_name, arch, tiny_dirs):
    if not is_available(backend_name):
        pytest.skip(f"{backend_name} not installed")
    import importlib

    backend = get_backend(backend_name)
    serving = importlib.import_module(f"lrpt.backends.{backend_name}.serving")
    model, tok = backend.load_model(tiny_dirs[arch], quiet=True)
    prompts = [backend.init_prompt(spec_for(m, n=3 + i), model, tok, seed=i) for i, m in enumerate(METHODS_LIST)]
    for p in prompts:
        p.eval()
    assign = [None, 0, 1, 2, 0, None, 2, 1]
    texts = sentences(8, seed=3, length=(1, 9))
    limits = [12, 5, 12, 9, 12, 12, 3, 12]  # rows leave at different steps
    ref = [backend.generate(model, tok, None if a is None else prompts[a], [t], max_tokens=m)[0]
           for t, a, m in zip(texts, assign, limits)]
    hf, eos = serving.text_tokenizer(tok), serving.eos_token_ids(model, tok)
    state = serving.start(model, tok, 16)
    outs: dict[int, list[int]] = {i: [] for i in range(8)}
    done: set[int] = set()

    def handle(results):
        finished = []
        for key, token in results:
            if key in done:
                continue
            if token not in eos:
                outs[key].append(token)
            if token in eos or len(outs[key]) >= limits[key]:
                done.add(key)
                finished.append(key)
        serving.remove(state, finished)

    def add(ids):
        rows = [hf(texts[i])["input_ids"] for i in ids]
        handle(serving.add(model, state, ids, [None if assign[i] is None else prompts[assign[i]] for i in ids], rows,
                           [0.0] * len(ids), [1.0] * len(ids), [None] * len(ids)))

    add([0, 1, 2])
    handle(serving.step(model, state))
    handle(serving.step(model, state))
    add([3])
    handle(serving.step(model, state))
    add([4, 5, 6])
    handle(serving.step(model, state))
    add([7])
    for _ in range(40):
        if not len(state):
            break
        handle(serving.step(model, state))
    assert len(state) == 0
    assert [hf.decode(outs[i], skip_special_tokens=True) for i in range(8)] == ref



# -- the API ------------------------------------------------------------------------------------


def test_models_health_and_refused_adapters(torch_server):
    s = torch_server
    assert [m.id for m in s.client.models.list().data] == ["tiny", "a0", "a1", "a2"]
    assert len(s.lines) == 1 and s.lines[0].startswith("lrpt: refused adapter for_gemma: ")
    assert "fingerprint" in s.lines[0] and "\n" not in s.lines[0]
    health = httpx.get(s.url + "/health").json()
    assert health["status"] == "ok" and health["adapters"] == ["a0", "a1", "a2"]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_completion_equals_generate(backend_name, request):
    s = _server(request, backend_name)
    r = s.client.completions.create(model="a2", prompt=TEXTS[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == s.generate("a2", TEXTS[0], 10)
    assert r.object == "text_completion" and r.model == "a2"
    assert r.usage.prompt_tokens == len(tokenizer()(TEXTS[0])["input_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sixteen_concurrent_requests_over_three_adapters_and_the_base(backend_name, request):
    s = _server(request, backend_name)
    names = ["a0", "a1", "a2", "tiny"]
    jobs = [(names[i % 4], TEXTS[i], 6 + (i % 5) * 2) for i in range(16)]
    before = s.built.scheduler.stats()["steps"]

    def ask(job):
        name, text, k = job
        return s.client.completions.create(model=name, prompt=text, max_tokens=k, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [s.generate(name, text, k) for name, text, k in jobs]
    stats = s.built.scheduler.stats()
    assert stats["steps"] > before
    assert stats["peak_rows"] > 1 and stats["peak_prompts"] > 1  # rows of different adapters in one forward


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_streamed_chunks_concatenate_to_the_completion(backend_name, request):
    s = _server(request, backend_name)
    kw = dict(model="a0", prompt=TEXTS[1], max_tokens=12, temperature=0, n=2)
    whole = s.client.completions.create(**kw)
    parts = {0: [], 1: []}
    reasons = {}
    usage = None
    for chunk in s.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts[c.index].append(c.text)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    for c in whole.choices:
        assert "".join(parts[c.index]) == c.text == s.generate("a0", TEXTS[1], 12)
        assert reasons[c.index] == c.finish_reason
    assert len(parts[0]) > 2  # really streamed, not one piece
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_reproduces_generate(torch_server):
    s = torch_server
    r = s.client.completions.create(model="a2", prompt=TEXTS[10], max_tokens=10, temperature=0.9, top_p=0.95,
                                    seed=5, n=2)
    for choice in r.choices:  # choice i samples with seed + i, as `lrpt generate --seed` would alone
        want = s.backend.generate(s.ref_model, s.ref_tok, s.prompts["a2"], [TEXTS[10]], max_tokens=10,
                                  temperature=0.9, top_p=0.95, seed=5 + choice.index)[0]
        assert choice.text == want
    assert r.choices[0].text != r.choices[1].text


def test_stop_strings_end_generation_as_they_appear(torch_server):
    s = torch_server
    full = s.generate("a1", TEXTS[2], 16)
    letters = [i for i, ch in enumerate(full) if ch.isascii() and ch.isalpha() and i >= 3]
    assert letters, full
    stop = full[letters[0]]
    r = s.client.completions.create(model="a1", prompt=TEXTS[2], max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == s.generate("a1", TEXTS[2], 16, stop=[stop, "zzzz"]) == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16  # it stopped there, it did not run to max_tokens and cut
    chunks = s.client.completions.create(model="a1", prompt=TEXTS[2], max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_chat_plain_format_and_chat_template(torch_server):
    s = torch_server
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the movie was"}]
    r = s.client.chat.completions.create(model="a0", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == s.generate("a0", "system: be kind\nuser: the movie was\nassistant:", 8)
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok = s.built.scheduler.text
    tok.chat_template = template
    try:
        r = s.client.chat.completions.create(model="a0", messages=messages, max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in s.client.chat.completions.create(
            model="a0", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
    finally:
        tok.chat_template = None
    rendered = "<s>system\nbe kind</s>\n<s>user\nthe movie was</s>\n<s>assistant\n"
    assert r.choices[0].message.content == streamed == s.generate("a0", rendered, 8)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_classify_equals_score_labels(backend_name, request):
    s = _server(request, backend_name)
    inputs = TEXTS[:5]
    body = httpx.post(s.url + "/v1/classify", json={"model": "a2", "input": inputs}, timeout=60).json()
    task = toy_task()
    want = s.backend.score_labels(s.ref_model, s.ref_tok, s.prompts["a2"],
                                  [task.template.format(text=x) for x in inputs], task.label_words)
    got = np.array([d["scores"] for d in body["data"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [d["label"] for d in body["data"]] == want.argmax(-1).tolist()
    assert body["label_words"] == task.label_words
    one = httpx.post(s.url + "/v1/classify", json={"model": "a2", "input": inputs[0]}, timeout=60).json()
    assert len(one["data"]) == 1


def _error(resp) -> dict:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_clear_openai_errors(torch_server):
    s = torch_server
    with pytest.raises(openai.NotFoundError) as exc:
        s.client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert "nope" in str(exc.value)
    post = lambda path, body: httpx.post(s.url + path, json=body, timeout=30)  # noqa: E731
    err = _error(post("/v1/completions", {"model": "nope", "prompt": "x"}))
    assert err["code"] == "model_not_found" and err["param"] == "model"
    cases = [
        ({"model": "a0", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "a0", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "a0", "prompt": "x", "n": 0}, "n"),
        ({"model": "a0", "prompt": "x", "seed": -1, "temperature": 1}, "seed"),  # MLX's PRNG refused it: a 500
        ({"model": "a0", "prompt": "x", "seed": 2**64, "temperature": 1}, "seed"),
        ({"model": "a0", "prompt": ""}, "prompt"),
        ({"model": "a0", "prompt": "x", "max_tokens": 201}, "max_tokens"),  # over --max-tokens-limit
        ({"model": "a0", "prompt": "x " * 150, "max_tokens": 100}, "prompt"),  # past the context length
        ({"model": "a0", "prompt": "x", "logprobs": 3}, "logprobs"),
        ({"model": "a0", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x"}, "model"),
    ]
    for body, param in cases:
        resp = post("/v1/completions", body)
        assert resp.status_code == 400, (body, resp.text)
        err = _error(resp)
        assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
        assert "\n" not in err["message"]
    assert _error(post("/v1/completions", {"model": "a0", "prompt": "x " * 150, "max_tokens": 100}))["code"] \
        == "context_length_exceeded"
    resp = post("/v1/chat/completions", {"model": "a0", "messages": []})
    assert resp.status_code == 400 and _error(resp)["param"] == "messages"
    resp = post("/v1/classify", {"model": "tiny", "input": "x"})
    assert resp.status_code == 400 and _error(resp)["code"] == "no_task"
    resp = post("/v1/classify", {"model": "a2", "input": "x " * 300})
    assert resp.status_code == 400 and _error(resp)["code"] == "context_length_exceeded"
    bad_template = "{{ raise_exception('roles must alternate') }}"
    s.built.scheduler.text.chat_template = bad_template
    try:
        resp = post("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}]})
    finally:
        s.built.scheduler.text.chat_template = None
    assert resp.status_code == 400 and "roles must alternate" in _error(resp)["message"]
    resp = httpx.post(s.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        s.client.completions.create(model="a0", prompt="x", max_tokens=500)
    # the server still serves
    assert s.client.completions.create(model="a0", prompt=TEXTS[3], max_tokens=4, temperature=0).choices[0].text \
        == s.generate("a0", TEXTS[3], 4)


def test_a_client_that_disconnects_frees_its_slot(torch_server):
    s = torch_server
    sched = s.built.scheduler
    real = sched.serving

    def slow_step(model, state):  # a slow model, so the request is surely still running when the client leaves
        time.sleep(0.02)
        return real.step(model, state)

    sched.serving = SimpleNamespace(**{k: getattr(real, k) for k in ("add", "remove", "start")}, step=slow_step)
    eos, sched.eos = sched.eos, set()  # and no early end: every request runs to max_tokens unless cancelled
    try:
        before = sched.stats()["cancelled"]
        with httpx.Client(timeout=30) as h, h.stream("POST", s.url + "/v1/completions", json={
                "model": "a0", "prompt": TEXTS[4], "max_tokens": 200, "temperature": 0, "stream": True}) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (sched.stats()["running"] or sched.stats()["cancelled"] == before):
            time.sleep(0.05)
        assert sched.stats()["running"] == 0 and sched.stats()["cancelled"] == before + 1
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
            httpx.post(s.url + "/v1/completions", json={"model": "a1", "prompt": TEXTS[4], "max_tokens": 200,
                                                        "temperature": 0}, timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (sched.stats()["running"] or sched.stats()["cancelled"] == before + 1):
            time.sleep(0.05)
        assert sched.stats()["running"] == 0 and sched.stats()["cancelled"] == before + 2
    finally:
        sched.serving, sched.eos = real, eos


def test_one_failing_request_does_not_break_its_batch(torch_server):
    s = torch_server
    sched = s.built.scheduler
    real = sched.serving
    poison = "a poison pill review"
    poison_ids = sched.encode(poison)

    def add(model, state, keys, prompts, rows, *rest):
        if any(list(r) == poison_ids for r in rows):
            raise RuntimeError("this row cannot be prefilled")
        return real.add(model, state, keys, prompts, rows, *rest)

    gate = threading.Event()
    sched.serving = SimpleNamespace(**{k: getattr(real, k) for k in ("step", "remove", "start")}, add=add)
    try:
        hold = sched.call(lambda: gate.wait(20))  # keeps the scheduler busy until every request is queued
        jobs = [("a0", TEXTS[5]), ("a1", poison), ("a2", TEXTS[6]), ("tiny", TEXTS[7])]

        def ask(job):
            try:
                return s.client.completions.create(model=job[0], prompt=job[1], max_tokens=6, temperature=0) \
                    .choices[0].text
            except openai.InternalServerError as exc:
                return exc

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, j) for j in jobs]
            time.sleep(1.0)
            gate.set()
            got = [f.result() for f in futures]
        hold.result()
    finally:
        sched.serving = real
    assert isinstance(got[1], openai.InternalServerError) and "prefill failed" in str(got[1])
    assert [got[i] for i in (0, 2, 3)] == [s.generate(n, t, 6) for n, t in (jobs[0], jobs[2], jobs[3])]


def test_reload_picks_up_new_adapters(torch_server, adapters_dir, tiny_dirs):
    s = torch_server
    _make_adapter(tiny_dirs["llama"], "lopt2", 3, 7, adapters_dir / "late")
    try:
        report = httpx.post(s.url + "/v1/adapters/reload", timeout=30).json()
        assert report["loaded"] == ["late"] and "for_gemma" in report["refused"]
        assert "late" in [m.id for m in s.client.models.list().data]
        s.prompts["late"] = s.backend.prompt_from_adapter(Adapter.load(adapters_dir / "late"), s.ref_model)
        r = s.client.completions.create(model="late", prompt=TEXTS[8], max_tokens=6, temperature=0)
        assert r.choices[0].text == s.generate("late", TEXTS[8], 6)
    finally:
        shutil.rmtree(adapters_dir / "late")
        assert httpx.post(s.url + "/v1/adapters/reload", timeout=30).json()["removed"] == ["late"]


def test_registry_checks_width_and_keeps_a_good_version_over_a_broken_change(adapters_dir, tiny_dirs, tmp_path):
    from lrpt.adapter import WEIGHTS_NAME
    from lrpt.serve.registry import Registry

    backend = get_backend("torch")
    model, _ = backend.load_model(tiny_dirs["llama"], quiet=True)
    root = tmp_path / "ads"
    shutil.copytree(adapters_dir / "a0", root / "good")
    width = backend.base_model_info(model).hidden_size
    Adapter.create(spec_for("lopt1", n=3), width + 8, seed=0, task=toy_task()).save(root / "narrow")  # no base named
    registry = Registry(backend, model, root, base_name="tiny")
    report = registry.reload()
    assert report.loaded == ["good"] and f"{width + 8} wide" in report.refused["narrow"]
    served = registry.get("good")
    (root / "good" / ".adapter_model.safetensors.x1y2z3w4.tmp").write_bytes(b"half")  # a save in progress
    assert registry.reload().kept == ["good"]
    (root / "good" / WEIGHTS_NAME).write_bytes(b"not safetensors")
    report = registry.reload()
    assert "still served" in report.refused["good"] and registry.get("good") is served


# -- the command ----------------------------------------------------------------------------------


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lrpt serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("lrpt serve did not come up")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")
def test_lrpt_serve_command_sighup_reload_and_sigterm_drain(tiny_dirs, adapters_dir, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    adapters = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "a0", adapters / "a0")
    shutil.copytree(adapters_dir / "for_gemma", adapters / "for_gemma")
    err = open(tmp_path / "stderr", "w+")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lrpt.cli", "serve", "--backend", "torch", "--model",
                             str(tiny_dirs["llama"]), "--adapters", str(adapters), "--port", str(port),
                             "--max-tokens-limit", "100"], stderr=err, stdout=subprocess.DEVNULL, env=env)
    try:
        _wait_for(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [str(tiny_dirs["llama"]), "a0"]
        shutil.copytree(adapters_dir / "a1", adapters / "a1")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "a1" not in [m.id for m in client.models.list().data] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "a1" in [m.id for m in client.models.list().data]
        whole = client.completions.create(model="a1", prompt=TEXTS[9], max_tokens=100, temperature=0).choices[0]
        stream = client.completions.create(model="a1", prompt=TEXTS[9], max_tokens=100, temperature=0, stream=True)
        parts, reason = [], None
        for i, chunk in enumerate(stream):
            if i == 0:
                proc.send_signal(signal.SIGTERM)  # in-flight requests finish, then the server exits
            parts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        assert "".join(parts) == whole.text and reason == whole.finish_reason
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.seek(0)
    log = err.read()
    assert sum(line.startswith("lrpt: refused adapter for_gemma: ") for line in log.splitlines()) >= 1
    assert "Traceback" not in log


def test_serve_without_the_extra_is_one_clear_line(tmp_path):
    code = ("import sys, importlib.util as u\n"
            "real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'fastapi' else real(name, *a)\n"
            "import lrpt, lrpt.cli\n"
            "assert 'fastapi' not in sys.modules and 'torch' not in sys.modules\n"
            "sys.exit(lrpt.cli.main(['serve', '--model', 'x']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "lrpt: error: lrpt serve needs fastapi, which is not installed: pip install 'lrpt[serve]'"


def test_stream_text_holds_back_what_may_change():
    from lrpt.serve.textstream import find_stop, streamable

    assert streamable("hello wor", ["world"]) == "hello "
    assert streamable("hello w\ufffd", []) == "hello w"
    assert streamable("abc", ["x"]) == "abc"
    assert find_stop("one. two. three", [". t", "thr"]) == 3
    assert find_stop("abc", ["z"]) is None


def test_benchmark_smoke(tiny_dirs, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--model", str(tiny_dirs["llama"]), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["runs"]) == {"8 adapters", "1 adapter", "one at a time"}
    for run in result["runs"].values():
        assert run["requests"] == 4 and run["p50_latency_s"] <= run["p99_latency_s"]
        assert 0 < run["p50_ttft_s"] <= run["p50_latency_s"]
        assert run["completion_tokens"] > 0


def test_serve_with_a_missing_adapter_directory_or_a_busy_port_is_one_clear_line(tiny_dirs, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lrpt.cli", "serve", "--backend", "torch", "--model",
                          str(tiny_dirs["llama"]), "--adapters", str(tmp_path / "nope")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"lrpt: error: --adapters {tmp_path / 'nope'}: not a directory"
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "lrpt.cli", "serve", "--backend", "torch", "--model",
                              str(tiny_dirs["llama"]), "--port", str(port)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"lrpt: error: cannot listen on 127.0.0.1:{port}: ")
    assert len(out.stderr.strip().splitlines()) == 1


def test_serving_modules_mirror_each_other():
    import importlib
    import inspect

    if not (is_available("torch") and is_available("mlx")):
        pytest.skip("needs both backends")
    mods = [importlib.import_module(f"lrpt.backends.{b}.serving") for b in ("torch", "mlx")]
    assert mods[0].__all__ == mods[1].__all__
    for name in mods[0].__all__:
        a, b = (getattr(m, name) for m in mods)
        if inspect.isfunction(a):
            assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters), name


class _FakeServing:
    """A framework-free stand-in for a backend's serving module: every row emits token 7 forever."""

    @staticmethod
    def text_tokenizer(tokenizer):
        return SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "x" * len(ids))

    @staticmethod
    def eos_token_ids(model, tokenizer):
        return {2}

    @staticmethod
    def context_length(model):
        return None

    @staticmethod
    def start(model, tokenizer, max_batch):
        return []

    @staticmethod
    def add(model, state, keys, prompts, rows, temperatures, top_ps, seeds):
        state.extend(keys)
        return []

    @staticmethod
    def step(model, state):
        time.sleep(0.005)
        return [(k, 7) for k in state]

    @staticmethod
    def remove(state, keys):
        state[:] = [k for k in state if k not in keys]


def test_shutdown_finishes_what_it_can_and_cancels_the_rest():
    from lrpt.serve.scheduler import Choice, Scheduler

    events = []
    sched = Scheduler(_FakeServing, None, None, max_batch=4)
    sched.start()
    short = Choice(index=0, ids=[1], prompt=None, max_tokens=3, sink=events.append)
    endless = Choice(index=1, ids=[1], prompt=None, max_tokens=10**9, sink=events.append)
    sched.submit([short, endless])
    time.sleep(0.1)
    began = time.monotonic()
    sched.stop(timeout=0.3)
    assert time.monotonic() - began < 5 and not sched._thread.is_alive()
    assert ("end", 0, "length", 3) in events
    assert events[-1] == ("error", 1, "the server shut down before this request finished")
    with pytest.raises(Exception, match="shutting down"):
        sched.submit([Choice(index=0, ids=[1], prompt=None, max_tokens=1)])


def test_rows_finishing_one_by_one_retire_and_leave_together():
    """Rows that end at different steps stay in the batch (ignored) and are compacted in one go;
    waiting requests join as a group, and every request still gets exactly its own tokens."""
    from lrpt.serve.scheduler import Choice, Scheduler

    class Counting(_FakeServing):
        removes: list[int] = []
        adds: list[int] = []

        @staticmethod
        def add(model, state, keys, prompts, rows, temperatures, top_ps, seeds):
            Counting.adds.append(len(keys))
            return _FakeServing.add(model, state, keys, prompts, rows, temperatures, top_ps, seeds)

        @staticmethod
        def remove(state, keys):
            Counting.removes.append(len(keys))
            _FakeServing.remove(state, keys)

    events = []
    sched = Scheduler(Counting, None, None, max_batch=8)
    rows = [Choice(index=i, ids=[1], prompt=None, max_tokens=2 + i, sink=events.append) for i in range(16)]
    sched.submit(rows)  # queued before the thread starts: the first 8 are admitted together
    sched.start()
    deadline = time.monotonic() + 10
    while sum(e[0] == "end" for e in events) < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.stop(timeout=1)
    ends = {e[1]: e[3] for e in events if e[0] == "end"}
    assert ends == {i: 2 + i for i in range(16)}  # each its own length
    assert len(Counting.removes) < 16 and all(n >= 2 for n in Counting.adds)  # grouped, not row by row
