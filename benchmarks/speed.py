"""Training speed: lrpt against fair anchors, same model, batch, dtype and process.

Every row is one training step (batch B × L input tokens, an n-token prompt, AdamW on the prompt
only, the loss of a 2-way label-word classifier at the last position), reported as tok/s and as a
ratio to **the compiled floor**:

- ``peft``: HF PEFT prompt tuning (PeftModelForCausalLM) eagerly, logits at every position, as
  PEFT does by default;
- ``peft-keep1``: the same with ``logits_to_keep=1``: PeftModelForCausalLM passes extra keyword
  arguments through to the base model for prompt tuning (peft 0.21: ``self.base_model(
  inputs_embeds=..., **kwargs)``), so the head runs at the last position only; checked at run time
  (the logits must have one position, else the script stops);
- ``peft+compile``: ``peft`` with its forward and loss under ``torch.compile`` (``--compile-mode``);
- ``floor`` / ``floor+compile``: what a skilled user writes by hand in ~20 lines: the frozen HF
  model, an ``nn.Parameter`` prompt concatenated in front of ``inputs_embeds``, the backbone
  (``model.model``), the head at the last position only, cross-entropy over the two label
  logits, backward, fused AdamW; eager and compiled with ``--compile-mode`` (reduce-overhead:
  CUDA graphs);
- ``lrpt-<method>`` / ``lrpt-<method>+compile``: lrpt's real training step
  (``lrpt.training.Training.step``, gradient clipping at 1.0 included), eager and compiled whole
  (``--compile-scope step``) with the same mode, with lrpt's default for the shared prefix (auto: a
  step compiled whole runs a static prompt once per batch as a shared prefix; an eager step on CUDA
  runs it in every row);
- ``lrpt-<method>+compile-blocks``: compiled with ``--compile-scope blocks`` (``lrpt train``'s default:
  each block compiled once, the rest eager; fast to compile, shared prefix off);
- ``lrpt-<method>-plain[+compile]`` (``--plain``): the same step with ``shared_prefix=False``, the
  prompt run in every row as the floor does;
- ``lrpt-<method>-two-pass+compile`` (``--two-pass``): the step compiled whole with the shared prefix
  in two passes (the prompt at batch 1, then the rows behind its cache) instead of packed with the
  rows into one (``lrpt.backends.torch.packed``, the default where the model allows it);
- ``lrpt-<method>-shared[+compile-blocks]`` (``--shared``): the step with ``shared_prefix=True``
  forced where auto leaves it off (eager, and compiled blocks), to measure whether it pays there.

Anchors get lrpt's advantages: bf16 weights and autocast on CUDA, fused AdamW on CUDA, the same
compile mode. ``vs_floor`` is the compiled floor's step time over the row's (> 1: faster than the
floor); where compiled variants are skipped (``--smoke``), the eager floor is the reference and the
JSON says so. Input shapes (``--inputs``): ``long`` is B=16 × 256 tokens, ``short`` B=32 × 48 tokens
(classification-sized); each runs as its own block of variants.

Variants alternate in rounds after warm-up; each figure is the median over rounds of the mean step
time of a round, timed with CUDA events (wall clock on CPU). Throughput counts input tokens (B × L).
Every result is printed as one JSON line as soon as its block ends (and appended to
``--out DIR``/speed.jsonl).

    python3 benchmarks/speed.py --device cuda --shape smollm2-135m --out logs/
    python3 benchmarks/speed.py --device cpu --smoke        # seconds; run by the test suite
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


INPUTS = {"long": (16, 256), "short": (32, 48)}  # name: (batch B, input tokens L)


def lrpt_step(model, method: str, rows: list[list[int]], labels: list[int], n: int, compile_mode: str | None,
              shared_prefix: bool | None = None, scope: str = "step"):
    """lrpt's own training step on one fixed batch (compiled with ``compile_mode``, or eager if None);
    ``shared_prefix``: lrpt's default (None: auto) or forced; False runs the prompt in every row;
    ``scope``: ``--compile-scope`` (the whole step, the fastest at one fixed shape, or blocks; graphs:
    the eager step recorded as a CUDA graph, no compiler, ``compile_mode`` unused)."""
    graphs = scope == "graphs"
    rank = None if method == "prompt" else 4
    spec = PromptSpec(method, n_tokens=n, rank=rank)
    dim = model.config.hidden_size
    prompt = PromptModule(spec, init_params(spec, dim, 0)).to(model.device)
    task = Task("bench", template="{text}", label_words=[" 0", " 1"])
    data = [Encoded(r, y) for r, y in zip(rows, labels)]
    # torch's default kernels, as the anchors run (epoch.py times --deterministic's mode on whole runs).
    cfg = TrainConfig(compile=graphs or compile_mode is not None, compile_mode=None if graphs else compile_mode,
                      pad_to_multiple=1, batch_size=len(rows), progress=False, shared_prefix=shared_prefix,
                      compile_scope=scope, deterministic=False)
    ops = Training(get_backend("torch"), model, LabelTokenizer(), prompt, task, data, None, cfg)
    batch = [list(range(len(rows)))]

    def step():
        return ops.step(batch, 1e-3)

    step.loss = lambda handle: ops.loss_value([handle])  # the first step's loss, a check across variants
    return step


def two_pass_step(model, method: str, rows, labels, n: int, compile_mode: str | None):
    """lrpt's step compiled whole with its shared prefix in two passes: packing is decided when the
    step is built (:class:`lrpt.backends.torch.step.Stepper`), so it is refused there."""
    from lrpt.backends.torch import step as torch_step

    real = torch_step.packable
    torch_step.packable = lambda model: False
    try:
        return lrpt_step(model, method, rows, labels, n, compile_mode, shared_prefix=True)
    finally:
        torch_step.packable = real


def peft_steps(model, ids, mask, labels, n: int, compile_mode: str | None) -> dict[str, object]:
    """PEFT prompt tuning as a user runs it: eager, eager with ``logits_to_keep=1``, and compiled."""
    from peft import PeftModelForCausalLM, PromptTuningConfig

    peft_model = PeftModelForCausalLM(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    label_ids = torch.tensor([x[0] for x in LABELS], device=model.device)

    def loss_fn(ids, mask, labels, keep):
        extra = {"logits_to_keep": keep} if keep else {}
        logits = peft_model(input_ids=ids, attention_mask=mask, **extra).logits
        if keep and logits.shape[1] != keep:
            raise SystemExit(f"PEFT did not pass logits_to_keep={keep} to the base model: {logits.shape[1]} positions")
        logits = logits[:, -1].float()
        return torch.nn.functional.cross_entropy(torch.log_softmax(logits, -1)[:, label_ids], labels)

    def make(fn, keep):
        opt = torch.optim.AdamW(params, lr=1e-3, fused=model.device.type == "cuda")

        def step():
            with _autocast(model):
                loss = fn(ids, mask, labels, keep)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    out = {"peft": make(loss_fn, 0), "peft-keep1": make(loss_fn, 1)}
    if compile_mode is not None:
        out["peft+compile"] = make(torch.compile(loss_fn, mode=compile_mode, dynamic=False), 0)
    return out


def floor_step(model, ids, labels, n: int, compile_mode: str | None):
    """The hand-written soft-prompt step a skilled user writes (the anchor every row is a ratio to)."""
    emb, dev = model.get_input_embeddings(), model.device
    torch.manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(n, emb.weight.shape[1], device=dev) * emb.weight.float().std())
    opt = torch.optim.AdamW([prompt], lr=1e-3, fused=dev.type == "cuda")
    label_ids = torch.tensor([x[0] for x in LABELS], device=dev)

    def loss_fn(ids, labels):
        x = emb(ids)
        x = torch.cat([prompt.to(x.dtype).expand(ids.shape[0], -1, -1), x], 1)
        h = model.model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1]
        logits = model.lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits[:, label_ids], labels)

    # dynamic=False as lrpt's step: each input shape compiled for itself (after a first shape,
    # automatic dynamic shapes would recompile the second one symbolically, slower and, on torch
    # 2.11 at 16x256 after 32x48, failing in inductor).
    fn = torch.compile(loss_fn, mode=compile_mode, dynamic=False) if compile_mode is not None else loss_fn

    def step():
        with _autocast(model):
            loss = fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
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


def profile(fn, path: Path, device: str, steps: int = 3) -> None:
    """Where a variant's step time goes: ``torch.profiler`` over ``steps`` warm steps, the kernels
    (or CPU ops) by their own time, written to ``path`` (the table's times are per ``steps`` steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} steps\n" + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90))
    print(f"  profile: {path}", file=sys.stderr, flush=True)


def bench_training(model, args, name: str, batch: int, seq: int, compiled: bool) -> list[dict]:
    """Every variant on one input shape, alternating in rounds; one result dict per variant."""
    dev = model.device
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    rows = [rng.integers(100, vocab, seq).tolist() for _ in range(batch)]
    labels = rng.integers(0, 2, batch).tolist()
    ids = torch.tensor(rows, device=dev)
    mask = torch.ones_like(ids)
    y = torch.tensor(labels, device=dev)
    mode = args.compile_mode if compiled else None
    variants: dict[str, object] = {"floor": floor_step(model, ids, y, args.tokens, None)}
    if compiled:
        variants["floor+compile"] = floor_step(model, ids, y, args.tokens, mode)
    if not args.no_peft:
        variants.update(peft_steps(model, ids, mask, y, args.tokens, mode))
    for method in args.methods:
        variants[f"lrpt-{method}"] = lrpt_step(model, method, rows, labels, args.tokens, None)
    for method in args.compiled if compiled else []:
        variants[f"lrpt-{method}+compile"] = lrpt_step(model, method, rows, labels, args.tokens, mode)
        if not args.no_blocks:
            variants[f"lrpt-{method}+compile-blocks"] = lrpt_step(model, method, rows, labels, args.tokens, mode,
                                                                  scope="blocks")
    for method in args.two_pass if compiled else []:  # the shared prefix compiled whole, not packed
        variants[f"lrpt-{method}-two-pass+compile"] = two_pass_step(model, method, rows, labels, args.tokens, mode)
    for method in args.plain:  # the same step without the shared prefix, as compiled as the rows above
        variants[f"lrpt-{method}-plain{'+compile' if compiled else ''}"] = lrpt_step(
            model, method, rows, labels, args.tokens, mode, shared_prefix=False)
    for method in args.shared:  # the shared prefix forced where auto leaves it off
        variants[f"lrpt-{method}-shared"] = lrpt_step(model, method, rows, labels, args.tokens, None,
                                                      shared_prefix=True)
        if compiled:
            variants[f"lrpt-{method}-shared+compile-blocks"] = lrpt_step(
                model, method, rows, labels, args.tokens, mode, shared_prefix=True, scope="blocks")
    for method in args.graphs:  # the eager step recorded as CUDA graphs: shared prefix forced, and plain (auto)
        variants[f"lrpt-{method}-shared+graphs"] = lrpt_step(model, method, rows, labels, args.tokens, None,
                                                             shared_prefix=True, scope="graphs")
        variants[f"lrpt-{method}+graphs"] = lrpt_step(model, method, rows, labels, args.tokens, None,
                                                      shared_prefix=False, scope="graphs")
    peak, warm, first_loss, times = {}, {}, {}, {k: [] for k in variants}
    for key, fn in variants.items():  # warm-up (compilation, graph capture), peak memory over it
        t0 = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup):
            handle = fn()
            if i == 0 and hasattr(fn, "loss"):
                first_loss[key] = fn.loss(handle)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak[key] = torch.cuda.max_memory_allocated() / 2**30
        warm[key] = time.perf_counter() - t0
        print(f"  [{name}] warmed {key} in {warm[key]:.1f} s", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for key, fn in variants.items():
            times[key].append(time_steps(fn, args.steps, dev.type))
    if args.profile:
        for key, fn in variants.items():
            safe = key.replace("+", "_")  # names with '+' do not travel back from the device tool
            profile(fn, Path(args.profile) / f"profile-{name}-{safe}.txt", dev.type)
    reference = "floor+compile" if compiled else "floor"
    ms_ref = statistics.median(times[reference])
    tokens = batch * seq
    out = []
    for key in variants:
        ms = statistics.median(times[key])
        out.append({"input": name, "batch": batch, "seq": seq, "variant": key, "step_ms": round(ms, 3),
                    "tok_s": round(tokens / ms * 1000), "vs_floor": round(ms_ref / ms, 3), "reference": reference,
                    "peak_gib": round(peak[key], 2) if key in peak else None, "warmup_s": round(warm[key], 1),
                    "spread_ms": round(max(times[key]) - min(times[key]), 3), "rounds": args.rounds,
                    "first_loss": first_loss.get(key)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--inputs", nargs="+", default=["long", "short"], choices=sorted(INPUTS),
                    help="input shapes: long = 16 x 256 tokens, short = 32 x 48 tokens")
    ap.add_argument("--batch", type=int, help="a custom input shape instead of --inputs (with --seq)")
    ap.add_argument("--seq", type=int, help="input tokens of the custom shape")
    ap.add_argument("--tokens", type=int, default=20, help="prompt tokens n")
    ap.add_argument("--methods", nargs="*", default=["lopt1"], help="lrpt methods to run eagerly")
    ap.add_argument("--compiled", nargs="*", default=["lopt1"], help="lrpt methods to run compiled")
    ap.add_argument("--plain", nargs="*", default=[], help="lrpt methods to run also without the shared prefix"
                    " (compiled when the compiled rows are)")
    ap.add_argument("--shared", nargs="*", default=[],
                    help="lrpt methods to run also with the shared prefix forced on (eager, compiled blocks)")
    ap.add_argument("--graphs", nargs="*", default=[],
                    help="lrpt methods to run also as recorded CUDA graphs (--compile-scope graphs; CUDA only)")
    ap.add_argument("--two-pass", nargs="*", default=[],
                    help="lrpt methods to run also compiled whole with the shared prefix in two passes, not packed")
    ap.add_argument("--profile", help="directory to write a torch.profiler table per variant to, after the timing")
    ap.add_argument("--no-blocks", action="store_true", help="skip the compiled-blocks rows of --compiled")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of every compiled row")
    ap.add_argument("--no-compile", action="store_true", help="skip every compiled row (the eager floor is the reference)")
    ap.add_argument("--no-peft", action="store_true",
                    help="skip the PEFT anchors (their compilation takes ~80 s at the 1B shape): for a quick look"
                         " at lrpt against the floor; a table of record keeps them")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps, no compiled rows (CPU test)")
    ap.add_argument("--json", help="write all results here as one JSON document")
    ap.add_argument("--out", help="directory to append the JSON lines to (speed.jsonl)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.warmup, args.steps, args.rounds, args.tokens = "tiny", 1, 1, 2, 4
        args.batch, args.seq, args.no_compile = 2, 16, True
    if (args.batch is None) != (args.seq is None):
        ap.error("--batch and --seq go together")
    inputs = {"custom": (args.batch, args.seq)} if args.batch else {k: INPUTS[k] for k in args.inputs}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, args.device, dtype)
    info = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "dtype": str(dtype), "inputs": inputs, "prompt_tokens": args.tokens,
            "compile_mode": None if args.no_compile else args.compile_mode,
            "nonembedding_params": nonembedding_params(model), "torch": torch.__version__,
            "commit": _commit()}
    log = Path(args.out) / "speed.jsonl" if args.out else None
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    emit(info, log)
    flops_per_token = 4 * info["nonembedding_params"]  # forward + activation-gradient backward
    train = []
    for name, (batch, seq) in inputs.items():
        for r in bench_training(model, args, name, batch, seq, compiled=not args.no_compile):
            r["tflops"] = round(r["tok_s"] * flops_per_token / 1e12, 1)
            emit(r, log)
            train.append(r)
    print(f"\n{'input':<8}{'variant':<26}{'step ms':>10}{'tok/s':>12}{'vs floor':>10}{'peak GiB':>10}"
          f"{'TFLOP/s':>9}{'1st loss':>10}", file=sys.stderr)
    for r in train:
        peak = f"{r['peak_gib']:>10.2f}" if r["peak_gib"] is not None else f"{'-':>10}"
        loss = f"{r['first_loss']:>10.4f}" if r["first_loss"] is not None else f"{'-':>10}"
        print(f"{r['input']:<8}{r['variant']:<26}{r['step_ms']:>10.2f}{r['tok_s']:>12,}{r['vs_floor']:>10.2f}"
              f"{peak}{r['tflops']:>9.1f}{loss}", file=sys.stderr)
    print(f"(vs floor: the step time of {train[0]['reference']} over the row's; 1st loss: an lrpt variant's"
          " loss at its first step, from the same prompt: equal across variants of one method)", file=sys.stderr,
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "train": train}, indent=2))
    return 0


def emit(record: dict, log: Path | None) -> None:
    """One JSON line on stdout now (unbuffered), and appended to the log file if there is one."""
    line = json.dumps(record)
    print(line, flush=True)
    if log is not None:
        with log.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def _commit() -> str | None:
    """The commit being measured (RESULTS.md names it), if this is a git checkout."""
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
