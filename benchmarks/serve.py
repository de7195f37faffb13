"""``lrpt serve`` under load: many clients over 8 adapters vs 1 adapter vs one-at-a-time ``generate``.

All requests arrive at once (64 concurrent clients, ~128-token prompts, 64 new tokens, greedy).
After a warm-up at the full load, the two server loads alternate for ``--rounds`` rounds (the
median round of each is kept); then the one-at-a-time baseline. On the same model and prompts:

- ``8 adapters``: the server, client i asks for adapter i mod 8 (mixed in one continuous batch);
- ``1 adapter``: the server, every client asks for the same adapter;
- ``one at a time``: no server, a loop of the backend's ``generate`` for one request at a time
  (the baseline a server replaces); a request's latency counts from the common start, and its
  first token is seen when its ``generate`` call returns.

Latency and time to first token (TTFT) are measured by the clients (streamed responses, wall
clock); p50 / p99 over requests. Adapters are random ``lopt1`` prompts (20 tokens, rank 4).

    python benchmarks/serve.py --backend torch --model HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/serve.py --smoke --model TINY_HF_FOLDER   # seconds on a CPU; run by the tests
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lrpt import PromptSpec  # noqa: E402
from lrpt.backends import get_backend  # noqa: E402
from lrpt.fetch import DEFAULT_MODEL  # noqa: E402

WORDS = ("the movie was a fine story about an actor who loved the plot but hated the long dull middle part "
         "and then the ending came as a surprise to everyone in the room").split()


def make_prompts(encode, count: int, tokens: int) -> list[str]:
    """``count`` different texts of about ``tokens`` tokens each."""
    out = []
    for i in range(count):
        words: list[str] = []
        j = i
        while len(encode(" ".join(words))) < tokens:
            words.append(WORDS[j % len(WORDS)])
            j += 7 + i
        out.append(" ".join(words))
    return out


def stats(latency: list[float], ttft: list[float], tokens: int, wall: float) -> dict:
    return {"requests": len(latency), "p50_latency_s": float(np.percentile(latency, 50)),
            "p99_latency_s": float(np.percentile(latency, 99)), "p50_ttft_s": float(np.percentile(ttft, 50)),
            "p99_ttft_s": float(np.percentile(ttft, 99)), "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall}


async def clients(url: str, names: list[str], texts: list[str], new_tokens: int) -> dict:
    """Every request at once through the real ``openai`` client, streamed."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()

    async def one(name: str, text: str):
        first = None
        tokens = 0
        stream = await client.completions.create(model=name, prompt=text, max_tokens=new_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        done = time.perf_counter() - start
        return done, first if first is not None else done, tokens

    results = await asyncio.gather(*(one(n, t) for n, t in zip(names, texts)))
    wall = time.perf_counter() - start
    await client.close()
    return stats([r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results), wall)


def one_at_a_time(backend, model, tok, hf, prompts: list, texts: list[str], new_tokens: int) -> dict:
    start = time.perf_counter()
    latency, tokens = [], 0
    for prompt, text in zip(prompts, texts):
        out = backend.generate(model, tok, prompt, [text], max_tokens=new_tokens, temperature=0.0)[0]
        latency.append(time.perf_counter() - start)
        tokens += len(hf(out, add_special_tokens=False)["input_ids"])  # re-encoded: an estimate
    wall = time.perf_counter() - start
    return stats(latency, latency, tokens, wall)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="4 clients, short prompts, 8 new tokens (CPU, seconds)")
    p.add_argument("--rounds", type=int, default=3, help="measured runs of each load, alternating (median kept)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.prompt_tokens, args.new_tokens, args.rounds = 4, 16, 8, 1

    from lrpt.fetch import resolve_model
    from lrpt.serve.server import ThreadedServer, build

    backend = get_backend(args.backend)
    path = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    model, tok = backend.load_model(path, dtype=args.dtype, quiet=True)
    hf = importlib.import_module(f"lrpt.backends.{backend.NAME}.serving").text_tokenizer(tok)
    texts = make_prompts(lambda t: hf(t, add_special_tokens=True)["input_ids"], args.clients, args.prompt_tokens)
    spec = PromptSpec("lopt1", n_tokens=20, rank=4)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = []
        for k in range(args.adapters):
            prompt = backend.init_prompt(spec, model, tok, seed=k)
            backend.prompt_to_adapter(prompt, None, backend.base_model_info(model)).save(Path(tmp) / f"a{k}")
            prompt.eval()
            prompts.append(prompt)
        built = build(args.backend, path, tmp, model_name="base", max_batch=args.clients,
                      max_tokens_limit=args.new_tokens, loaded=(model, tok))
        with ThreadedServer(built.app) as url:
            mixed = [f"a{i % args.adapters}" for i in range(args.clients)]
            loads = {f"{args.adapters} adapters": mixed, "1 adapter": ["a0"] * args.clients}
            # Warm-up at the full load: the first batch of this size grows the allocator and picks
            # kernels for every cache width, which would be charged to whichever run came first.
            asyncio.run(clients(url, mixed, texts, args.new_tokens))
            measured: dict[str, list[dict]] = {name: [] for name in loads}
            for r in range(args.rounds):  # alternate, so drift hits both loads alike
                for name in (loads if r % 2 == 0 else reversed(list(loads))):
                    measured[name].append(asyncio.run(clients(url, loads[name], texts, args.new_tokens)))
            for name, results in measured.items():  # the median round by throughput
                runs[name] = sorted(results, key=lambda x: x["tokens_per_s"])[len(results) // 2]
        loop_prompts = [prompts[i % args.adapters] for i in range(args.clients)]
        runs["one at a time"] = one_at_a_time(backend, model, tok, hf, loop_prompts, texts, args.new_tokens)
    prompt_lengths = [len(hf(t, add_special_tokens=True)["input_ids"]) for t in texts]
    result = {"config": {"backend": args.backend, "model": args.model, "clients": args.clients,
                         "prompt_tokens_mean": float(np.mean(prompt_lengths)), "new_tokens": args.new_tokens,
                         "adapters": args.adapters, "device": str(getattr(model, "device", "mlx"))},
              "runs": runs}
    print(f"{'run':<16}{'p50 lat':>10}{'p99 lat':>10}{'p50 TTFT':>10}{'p99 TTFT':>10}{'wall':>9}{'tok/s':>10}")
    for name, r in runs.items():
        print(f"{name:<16}{r['p50_latency_s']:>9.3f}s{r['p99_latency_s']:>9.3f}s{r['p50_ttft_s']:>9.3f}s"
              f"{r['p99_ttft_s']:>9.3f}s{r['wall_s']:>8.2f}s{r['tokens_per_s']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
