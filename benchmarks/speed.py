"""Training and inference speed: HF PEFT prompt tuning vs lrpt, same model, batch and dtype, one process.

Training rows (batch B × L input tokens, an n-token prompt, AdamW on the prompt only, the
loss of a 2-way label-word classifier at the last position):

- ``peft``: HF PEFT prompt tuning (PeftModelForCausalLM), logits at every position, as PEFT does;
- ``frozen-last``: the frozen model alone with the head at the last position only (anchor: the
  cost of a forward and an activation-gradient backward, no prompt machinery);
- ``lrpt-<method>``: lrpt's real training step (``lrpt.training.Training.step``), eager or compiled.

Variants alternate in rounds after warm-up; each figure is the median over rounds of the
mean step time of a round, timed with CUDA events (wall clock on CPU). Throughput counts
input tokens (B × L). Generation speed is benchmarks/generate.py's.

    python benchmarks/speed.py --device cuda --shape smollm2-135m
    python benchmarks/speed.py --device cpu --smoke        # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrpt import PromptSpec, Task  # noqa: E402
from lrpt.backends import get_backend  # noqa: E402
from lrpt.backends.torch.prompts import PromptModule  # noqa: E402
from lrpt.data import Encoded  # noqa: E402
from lrpt.reference import init_params  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402
from lrpt.training import Training  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8x4096": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
LABELS = [[11], [13]]


class LabelTokenizer:
    """The two things the training step asks of a tokenizer here: a pad id and the label words' ids."""

    pad_token_id = 0

    def __call__(self, word, add_special_tokens=False):
        return {"input_ids": LABELS[int(word.strip()[-1])]}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def nonembedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings().weight
    tied = out.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return sum(p.numel() for p in model.parameters()) - emb - (0 if tied else out.numel())


def lrpt_step(model, method: str, rows: list[list[int]], labels: list[int], n: int, compile_mode: str | None):
    rank = None if method == "prompt" else 4
    spec = PromptSpec(method, n_tokens=n, rank=rank)
    dim = model.config.hidden_size
    prompt = PromptModule(spec, init_params(spec, dim, 0)).to(model.device)
    task = Task("bench", template="{text}", label_words=[" 0", " 1"])
    data = [Encoded(r, y) for r, y in zip(rows, labels)]
    cfg = TrainConfig(compile=compile_mode is not None, compile_mode=compile_mode or None, pad_to_multiple=1)
    ops = Training(get_backend("torch"), model, LabelTokenizer(), prompt, task, data, None, cfg)
    batch = [list(range(len(rows)))]
    return lambda: ops.step(batch, 1e-3)


def peft_step(model, ids, mask, labels, n: int):
    from peft import PeftModelForCausalLM, PromptTuningConfig

    peft_model = PeftModelForCausalLM(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    fused = model.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-3, fused=fused)
    label_ids = torch.tensor([x[0] for x in LABELS], device=model.device)

    def step():
        with _autocast(model):
            logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
            loss = torch.nn.functional.cross_entropy(torch.log_softmax(logits, -1)[:, label_ids], labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, peft_model


def frozen_last_step(model, ids, labels):
    label_ids = torch.tensor([x[0] for x in LABELS], device=model.device)

    def step():
        with _autocast(model):
            x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, logits_to_keep=1).logits[:, -1].float()
            loss = torch.nn.functional.cross_entropy(torch.log_softmax(logits, -1)[:, label_ids], labels)
        loss.backward()
        return loss.detach()

    return step


def _autocast(model):
    from lrpt.backends.torch.model import autocast  # the one lrpt trains under

    return autocast(model)


def time_steps(fn, steps: int, device: str) -> float:
    """Mean milliseconds per call over ``steps`` calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) * 1000 / steps


def bench_training(model, args) -> list[dict]:
    dev = model.device
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    rows = [rng.integers(100, vocab, args.seq).tolist() for _ in range(args.batch)]
    labels = rng.integers(0, 2, args.batch).tolist()
    ids = torch.tensor(rows, device=dev)
    mask = torch.ones_like(ids)
    y = torch.tensor(labels, device=dev)
    variants: dict[str, object] = {}
    variants["frozen-last"] = frozen_last_step(model, ids, y)
    peft_fn, _ = peft_step(model, ids, mask, y, args.tokens)
    variants["peft"] = peft_fn
    for method in args.methods:
        variants[f"lrpt-{method}"] = lrpt_step(model, method, rows, labels, args.tokens, None)
    for method in args.compiled:
        variants[f"lrpt-{method}+{args.compile_mode}"] = lrpt_step(model, method, rows, labels, args.tokens,
                                                                  args.compile_mode)
    peak, times = {}, {k: [] for k in variants}
    for name, fn in variants.items():  # warm-up (compilation, graph capture), peak memory over it
        t0 = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  warmed {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(time_steps(fn, args.steps, dev.type))
    tokens = args.batch * args.seq
    ms_peft = statistics.median(times["peft"])
    out = []
    for name in variants:
        ms = statistics.median(times[name])
        out.append({"variant": name, "step_ms": round(ms, 3), "tok_s": round(tokens / ms * 1000),
                    "vs_peft": round(ms_peft / ms, 3), "peak_gib": round(peak.get(name, float("nan")), 2),
                    "spread_ms": round(max(times[name]) - min(times[name]), 3)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--methods", nargs="*", default=["prompt", "lopt1", "lopt2", "lopa"])
    ap.add_argument("--compiled", nargs="*", default=[], help="methods to also run compiled")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps (CPU test)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.batch, args.seq, args.warmup, args.steps, args.rounds = "tiny", 2, 16, 1, 1, 2
        args.tokens = 4
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, args.device, dtype)
    info = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "dtype": str(dtype), "batch": args.batch, "seq": args.seq, "prompt_tokens": args.tokens,
            "nonembedding_params": nonembedding_params(model), "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    train = bench_training(model, args)
    flops_per_token = 4 * info["nonembedding_params"]  # forward + activation-gradient backward
    for r in train:
        r["tflops"] = round(r["tok_s"] * flops_per_token / 1e12, 1)
    print(f"\n{'variant':<34}{'step ms':>10}{'tok/s':>12}{'vs PEFT':>9}{'peak GiB':>10}{'TFLOP/s':>9}")
    for r in train:
        print(f"{r['variant']:<34}{r['step_ms']:>10.2f}{r['tok_s']:>12,}{r['vs_peft']:>9.2f}"
              f"{r['peak_gib']:>10.2f}{r['tflops']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "train": train}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
