"""Generation speed: lrpt's ``generate`` with a soft prompt vs transformers' ``generate`` without one.

Same model, dtype and inputs, one process, variants alternating in rounds after warm-up; each
figure is a median over rounds with its spread (max − min). Models are built from a config with
random weights (speed does not depend on weight values) and a word-level tokenizer whose vocabulary
is the model's, so every generated id decodes; EOS is disabled so every run generates exactly
the requested number of tokens.

- decode: batch 1, a 128-token request, 128 new tokens, greedy. lrpt with a 20-token lopt1
  prompt vs ``model.generate`` with no prompt, eager; then both with a static cache compiled
  (``--compile``: lrpt ``generate(compile=True)``, transformers ``cache_implementation="static"``).
- mixed: batch 32 of 128-token requests, 64 new tokens, 32 different adapters mixed in the batch
  vs one adapter for all rows.
- ttft: one 128-token request, 1 new token: no prompt, a 20-token prompt prefilled in full, and
  the same prompt from its cached KV prefix; then n=128 and n=512 prompts (where the prefix cache
  starts to pay).
- ``--backend mlx``: ``lrpt generate --backend mlx`` with a 20-token prompt vs ``mlx_lm.generate``
  without one, same model folder (run on the CPU here, Metal on a Mac).

    python benchmarks/generate.py --shape smollm2-135m --json out.json        # CUDA, bf16
    python benchmarks/generate.py --smoke                                      # CPU, seconds
    python benchmarks/generate.py --backend mlx --shape smollm2-135m           # MLX vs mlx-lm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrpt import PromptSpec  # noqa: E402
from lrpt.reference import init_params  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
}


def save_model_folder(shape: str, path: Path) -> Path:
    """A random-weight llama of ``shape`` and a word-level tokenizer (``w0`` … ``wV−1``), as an HF
    folder that both transformers and mlx-lm load; no EOS anywhere."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w1").save_pretrained(path)
    cfg_json = json.loads((path / "config.json").read_text())
    cfg_json["rope_theta"] = 10000.0
    (path / "config.json").write_text(json.dumps(cfg_json))
    return path


def request_text(vocab: int, length: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(100, vocab, length))


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1000


def run_rounds(cases: dict, rounds: int, warmup: int, sync) -> dict[str, list[float]]:
    for name, fn in cases.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        print(f"  warmed {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn, sync))
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 3), "spread_ms": round(max(times) - min(times), 3),
            "runs": len(times)}


def torch_bench(folder: Path, args) -> list[dict]:
    import torch

    from lrpt.backends import get_backend

    tb = get_backend("torch")
    model, tok = tb.load_model(folder, device=args.device, quiet=True)  # bf16 on CUDA
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    dim, vocab = model.config.hidden_size, model.config.vocab_size

    def prompt(n: int, seed: int = 0):
        spec = PromptSpec("lopt1", n_tokens=n, rank=4)
        return tb.PromptModule(spec, init_params(spec, dim, seed)).to(model.device).eval()

    p20 = prompt(args.tokens)
    text = request_text(vocab, args.infer_len, 0)
    ids = tok([text], return_tensors="pt").to(model.device)
    hf = dict(do_sample=False, pad_token_id=0, eos_token_id=None, top_k=0, temperature=1.0, top_p=1.0)

    def hf_generate(new, **kw):
        return lambda: model.generate(**ids, max_new_tokens=new, **hf, **kw)

    def lrpt_generate(p, new, texts=(text,), **kw):
        return lambda: tb.generate(model, tok, p, list(texts), max_tokens=new, **kw)

    out = []
    # -- decode, batch 1
    new = args.new_tokens
    cases = {"hf no prompt (eager)": hf_generate(new), f"lrpt n={args.tokens} (eager)": lrpt_generate(p20, new)}
    if args.device == "cuda":
        cases["hf no prompt (static cache, compiled)"] = hf_generate(new, cache_implementation="static")
        cases[f"lrpt n={args.tokens} (--compile)"] = lrpt_generate(p20, new, compile=True)
    times = run_rounds(cases, args.rounds, args.warmup, sync)
    for k, v in times.items():
        s = summary(v)
        out.append({"bench": "decode b=1", "case": k, **s, "tok_s": round(new / s["median_ms"] * 1000, 1)})
    # -- 32 mixed adapters vs one
    texts = [request_text(vocab, args.infer_len, s) for s in range(args.batch)]
    many = [prompt(args.tokens, seed=s) for s in range(args.batch)]
    cases = {"one adapter": lrpt_generate(p20, args.batch_new, texts),
             f"{args.batch} adapters mixed": lrpt_generate(many, args.batch_new, texts, which=list(range(args.batch)))}
    times = run_rounds(cases, args.rounds, 1, sync)
    for k, v in times.items():
        s = summary(v)
        out.append({"bench": f"decode b={args.batch}", "case": k, **s,
                    "tok_s": round(args.batch * args.batch_new / s["median_ms"] * 1000, 1)})
    # -- time to first token
    cases = {"no prompt": lrpt_generate(None, 1), "hf no prompt": hf_generate(1)}
    for n in (args.tokens, 128, 512):
        pn = p20 if n == args.tokens else prompt(n)
        cases[f"n={n} full prefill"] = lrpt_generate(pn, 1, use_prefix_cache=False)
        cases[f"n={n} cached prefix"] = lrpt_generate(pn, 1, use_prefix_cache=True)
    times = run_rounds(cases, args.ttft_rounds, args.warmup, sync)
    base = statistics.median(times["no prompt"])
    for k, v in times.items():
        s = summary(v)
        out.append({"bench": "ttft", "case": k, **s, "vs_no_prompt": round(s["median_ms"] / base, 3)})
    return out


def mlx_bench(folder: Path, args) -> list[dict]:
    import mlx.core as mx
    import mlx_lm

    from lrpt.backends import get_backend

    mb = get_backend("mlx")
    model, tok = mb.load_model(folder, quiet=True)
    spec = PromptSpec("lopt1", n_tokens=args.tokens, rank=4)
    p = mb.PromptModule(spec, init_params(spec, model.args.hidden_size, 0))
    text = request_text(model.args.vocab_size, args.infer_len, 0)
    new = args.new_tokens
    cases = {"mlx_lm.generate no prompt": lambda: mlx_lm.generate(model, tok, text, max_tokens=new),
             f"lrpt mlx n={args.tokens}": lambda: mb.generate(model, tok, p, [text], max_tokens=new)}
    times = run_rounds(cases, args.rounds, args.warmup, lambda: mx.synchronize())
    return [{"bench": "decode b=1 (mlx)", "case": k, **summary(v),
             "tok_s": round(new / statistics.median(v) * 1000, 1)} for k, v in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=20, help="soft prompt length")
    ap.add_argument("--infer-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-new", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ttft-rounds", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few tokens (CPU test)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.infer_len, args.new_tokens, args.batch, args.batch_new = "tiny", 8, 4, 3, 2
        args.warmup, args.rounds, args.ttft_rounds, args.tokens = 1, 2, 2, 4
    if args.device is None and args.backend == "torch":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_folder(args.shape, Path(tmp) / "model")
        info = {"backend": args.backend, "shape": args.shape, "device": args.device or "mlx-default"}
        if args.device == "cuda":
            import torch

            info["device"] = torch.cuda.get_device_name()
        print(json.dumps(info), flush=True)
        rows = torch_bench(folder, args) if args.backend == "torch" else mlx_bench(folder, args)
    for r in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
