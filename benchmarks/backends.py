"""MLX against PyTorch on one device: lrpt's training step and scoring, same model folder, shapes and dtype.

A random-weight Llama of a named shape (``benchmarks/speed.py``'s SHAPES) is written once as an HF
safetensors folder (bf16, or ``--dtype float32``) with a small word-level tokenizer, and loaded by
both backends' ``load_model``: torch (transformers) and mlx (mlx-lm; on Linux with an NVIDIA GPU,
the CUDA build of MLX). Per input shape (``long``: B=16 × 256 tokens, ``short``: B=32 × 48) each
variant runs lrpt's real training step (``lrpt.training.Training.step``: lopt1, n=20, rank 4, a
2-label classifier, clipping at 1.0): ``torch`` eager, ``mlx`` eager and ``mlx+compile``
(``TrainConfig(compile=True)``: mx.compile); with ``--torch-compile MODE`` also ``torch+compile``
(the whole step compiled, ``--compile-scope step``, as mx.compile does),
with ``--plain`` also ``mlx-plain`` (the eager MLX step without the shared prefix). Each backend's
shared-prefix default applies (lrpt.prefix: off for an eager torch step on CUDA, on for MLX and for
compiled steps); each row says what ran. Scoring: ``lrpt.scoring.evaluate`` of
``--score-batches`` × B rows in batches of B, as rows/s.

Variants alternate in rounds after warm-up; a figure is the median over rounds of a round's mean
step time (wall clock, the device synchronised at both ends: ``torch.cuda.synchronize``, and
``mx.eval`` inside lrpt's MLX step then ``mx.synchronize``). ``ratios`` gives each MLX variant's
step time over eager torch's (issue 13's target: ≤ 2) and the scoring time ratio. With float32,
MLX on CUDA multiplies in TF32 by default and torch does not (``info`` records torch's setting).

Before MLX runs in this process, a subprocess probes it (import, bf16 matmul, gradient, compiled
function on its default device, the GPU when torch runs on CUDA): what fails (a missing CUDA
library or header, no GPU) is printed as one JSON line ``{"backend": "mlx", "error": ...}`` and the
torch figures are measured all the same. Every result is one JSON line on stdout, printed at once.

    python3 benchmarks/backends.py --shape smollm2-135m --json logs/backends.json
    python3 benchmarks/backends.py --shape llama-3.2-1b --inputs long --plain
    python3 benchmarks/backends.py --smoke        # CPU, tiny model, seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import INPUTS, SHAPES, _commit, build_model, emit  # noqa: E402

from lrpt import PromptSpec, Task  # noqa: E402
from lrpt.backends import get_backend  # noqa: E402
from lrpt.data import Encoded  # noqa: E402
from lrpt.scoring import evaluate  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402
from lrpt.training import Training  # noqa: E402

ALIASES = {"llama-1b": "llama-3.2-1b"}
TASK = Task("bench", template="{text}", label_words=[" 0", " 1"])
PROBE = """
import mlx.core as mx
print(mx.__version__, mx.default_device(), flush=True)
a = mx.random.normal((256, 256)).astype(mx.bfloat16)
f = mx.compile(lambda x: mx.softmax((x @ x.T).astype(mx.float32), -1).sum())
g = mx.grad(lambda x: mx.sum(mx.square(x @ x.T)))
mx.eval(f(a), g(a.astype(mx.float32)))
mx.synchronize()
print("ok", flush=True)
"""


def write_folder(path: Path, shape: str, device: str, dtype: str) -> Path:
    """The random model as an HF folder both backends load (flat rope keys, as mlx-lm reads them)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build_model(shape, device, getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    conf = json.loads((path / "config.json").read_text())
    conf["rope_theta"] = (conf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    (path / "config.json").write_text(json.dumps(conf))
    words = ["<pad>", "<s>", "</s>", "<unk>", "0", "1"]  # label words " 0", " 1": one token each
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def probe_mlx(want_gpu: bool) -> str | None:
    """None when MLX computes on its default device (a GPU when ``want_gpu``), else what failed."""
    try:
        r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the MLX probe did not finish: {exc}"
    if r.returncode != 0 or "ok" not in r.stdout.split():
        return f"the MLX probe exited {r.returncode}: {(r.stderr + r.stdout).strip()[-3000:]}"
    first = r.stdout.splitlines()[0]
    return f"MLX {first}: its default device is no GPU (not the CUDA build, or no device)" if (
        want_gpu and "gpu" not in first) else None


def trainer(be, model, tok, data: list[Encoded], args, compiled: bool = False, mode: str | None = None,
            shared: bool | None = None) -> Training:
    """lrpt's training step for one fixed batch, as ``lrpt train`` builds it (auto shared prefix unless ``shared``)."""
    prompt = be.init_prompt(PromptSpec("lopt1", n_tokens=args.tokens, rank=args.rank), model, tok, seed=0)
    be.place(prompt, model)
    scope = "step" if compiled and be.NAME == "torch" else None  # one fixed shape: compile it whole
    # torch's default kernels, as the anchors run (epoch.py times --deterministic's mode on whole runs).
    cfg = TrainConfig(compile=compiled, compile_mode=mode, pad_to_multiple=1, batch_size=len(data), progress=False,
                      shared_prefix=shared, compile_scope=scope, deterministic=False)
    return Training(be, model, tok, prompt, TASK, data, None, cfg)


def timed(fns: dict, syncs: dict, args, errors: list, calls: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm each fn up (an MLX failure drops its variant, reported), then ms per call in alternating
    rounds; and the seconds each warm-up took (compilation, MLX's run-time kernel builds)."""
    warm = {}
    for key in list(fns):
        t0 = time.perf_counter()
        try:
            for _ in range(args.warmup):
                fns[key]()
            syncs[key]()
        except Exception as exc:  # any MLX failure is a result to report
            if not key.startswith("mlx"):
                raise
            errors.append(fail(key, "warm-up", exc))
            del fns[key]
            continue
        warm[key] = round(time.perf_counter() - t0, 2)
        print(f"  warmed {key} in {warm[key]:.1f} s", file=sys.stderr, flush=True)
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            syncs[key]()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            syncs[key]()
            times[key].append((time.perf_counter() - t) * 1000 / calls)
    return times, warm


def out(record: dict) -> dict:
    """Print ``record`` as one JSON line now (benchmarks/speed.py's ``emit``) and return it."""
    emit(record, None)
    return record


def fail(variant: str, stage: str, exc) -> dict:
    """An MLX failure as a result: what failed, where, with the exception's text."""
    return out({"backend": "mlx", "variant": variant, "stage": stage,
                "error": exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"})


def load(folder: Path, args, info: dict, errors: list) -> tuple[dict, dict, dict]:
    """Both backends' (model, tokenizer) from ``folder``, and how to synchronise each; MLX left out,
    with the reason printed, when its probe or its load fails."""
    import torch

    backends = {"torch": get_backend("torch")}
    models = {"torch": backends["torch"].load_model(folder, dtype=args.dtype, device=args.device, quiet=True)}
    sync = {"torch": torch.cuda.synchronize if args.device == "cuda" else (lambda: None)}
    why = probe_mlx(args.device == "cuda")
    if why is None:
        try:
            import mlx.core as mx
            import mlx_lm

            if args.device == "cpu":
                mx.set_default_device(mx.cpu)
            backends["mlx"] = get_backend("mlx")
            models["mlx"] = backends["mlx"].load_model(folder, dtype=args.dtype)
            sync["mlx"] = mx.synchronize
            info.update(mlx=mx.__version__, mlx_lm=mlx_lm.__version__, mlx_device=str(mx.default_device()))
        except Exception as exc:  # any MLX failure is a result to report
            why = exc
    out(info)
    if why is not None:
        errors.append(fail("mlx", "probe/load", why))
        models.pop("mlx", None)
    return backends, models, sync


def bench_input(name: str, batch: int, seq: int, backends: dict, models: dict, sync: dict, args,
                errors: list) -> tuple[list[dict], list[dict], dict]:
    """Every step variant, then each backend's scoring, on one input shape; and the MLX/torch ratios."""
    rng = np.random.default_rng(0)
    data = [Encoded(rng.integers(6, 512, seq).tolist(), int(rng.integers(0, 2))) for _ in range(batch)]
    plan = [("torch", "torch", {})]
    if args.torch_compile:
        plan.append(("torch+compile", "torch", {"compiled": True, "mode": args.torch_compile}))
    if "mlx" in models:
        plan.append(("mlx", "mlx", {}))
        plan += [("mlx-plain", "mlx", {"shared": False})] if args.plain else []
        plan += [] if args.no_mlx_compile else [("mlx+compile", "mlx", {"compiled": True})]
    ops, fns = {}, {}
    for key, be, kw in plan:
        ops[key] = trainer(backends[be], *models[be], data, args, **kw)
        fns[key] = lambda o=ops[key], idx=list(range(batch)): o.step([idx], 1e-3)
    times, warm = timed(fns, {key: sync[be] for key, be, _ in plan}, args, errors, args.steps)
    train = []
    for key, t in times.items():
        ms = statistics.median(t)
        how = (ops[key].compile_choice.line() + ops[key].prefix_note()).removeprefix("training step: ")
        train.append(out({"input": name, "batch": batch, "seq": seq, "variant": key, "step_ms": round(ms, 3),
                           "tok_s": round(batch * seq / ms * 1000), "spread_ms": round(max(t) - min(t), 3),
                           "warmup_s": warm[key], "step": how}))
    rows = data * args.score_batches
    sfns = {f"{be} score": (lambda m=models[be], o=ops[be], b=batch: evaluate(*m, o.prompt, TASK, rows, b))
            for be in models if be in times}
    stimes, swarm = timed(sfns, {k: sync[k.split()[0]] for k in sfns}, args, errors, 1)
    score = []
    for key, t in stimes.items():
        ms = statistics.median(t)
        score.append(out({"input": name, "batch": batch, "seq": seq, "variant": key, "rows": len(rows),
                           "call_ms": round(ms, 3), "rows_s": round(len(rows) / ms * 1000, 1),
                           "warmup_s": swarm[key]}))
    step = {r["variant"]: r["step_ms"] for r in train}
    call = {r["variant"]: r["call_ms"] for r in score}
    mlx = {k: round(v / step["torch"], 3) for k, v in step.items() if k.startswith("mlx")}
    ratio = {"input": name, "ratio": "mlx time / torch eager time", "step": mlx,
             "within_2x": {k: v <= 2.0 for k, v in mlx.items()},
             "score": round(call["mlx score"] / call["torch score"], 3) if "mlx score" in call else None}
    return train, score, out(ratio)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted([*SHAPES, *ALIASES]))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default=None, help="torch's device (default: cuda when there is one)")
    ap.add_argument("--inputs", nargs="+", default=["long", "short"], choices=sorted(INPUTS),
                    help="input shapes: long = 16 x 256 tokens, short = 32 x 48 tokens")
    ap.add_argument("--batch", type=int, help="a custom input shape instead of --inputs (with --seq)")
    ap.add_argument("--seq", type=int, help="input tokens of the custom shape")
    ap.add_argument("--tokens", type=int, default=20, help="prompt tokens n")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--torch-compile", metavar="MODE", help="also time torch.compile'd steps in this mode")
    ap.add_argument("--no-mlx-compile", action="store_true", help="skip the mx.compile'd step")
    ap.add_argument("--plain", action="store_true", help="also the eager MLX step without the shared prefix")
    ap.add_argument("--score-batches", type=int, default=4, help="batches of B rows per timed scoring call")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, float32, CPU, 2 steps (the test)")
    ap.add_argument("--json", help="write all results here as one JSON document")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.dtype, args.device, args.batch, args.seq, args.tokens = "tiny", "float32", "cpu", 2, 16, 4
        args.warmup, args.steps, args.rounds, args.score_batches = 1, 1, 2, 1
    if (args.batch is None) != (args.seq is None):
        ap.error("--batch and --seq go together")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = ALIASES.get(args.shape, args.shape)
    inputs = {"custom": (args.batch, args.seq)} if args.batch else {k: INPUTS[k] for k in args.inputs}
    info = {"shape": shape, "dtype": args.dtype, "inputs": inputs, "prompt_tokens": args.tokens, "rank": args.rank,
            "torch": torch.__version__, "torch_device": torch.cuda.get_device_name() if args.device == "cuda" else
            args.device, "torch_tf32": torch.backends.cuda.matmul.allow_tf32, "commit": _commit()}
    errors, train, score, ratios = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / shape, shape, args.device, args.dtype)
        backends, models, sync = load(folder, args, info, errors)
        for name, (batch, seq) in inputs.items():
            t, s, r = bench_input(name, batch, seq, backends, models, sync, args, errors)
            train += t
            score += s
            ratios.append(r)
    print(f"\n{'input':<8}{'variant':<16}{'ms':>10}{'tok/s or rows/s':>18}", file=sys.stderr)
    for r in train + score:
        print(f"{r['input']:<8}{r['variant']:<16}{r.get('step_ms', r.get('call_ms')):>10.2f}"
              f"{r.get('tok_s', r.get('rows_s')):>18,}", file=sys.stderr)
    for r in ratios:
        print(f"{r['input']}: mlx/torch step {r['step']}, score {r['score']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "train": train, "score": score, "ratios": ratios,
                                               "errors": errors}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
