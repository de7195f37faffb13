"""A whole training run as a user runs it: `lrpt train` eager vs compiled vs auto, wall clock and accuracy.

Each run is `lrpt train` in a subprocess, so the wall clock holds everything a user waits for:
starting Python, loading the model, reading and tokenising the data, compiling (each compiled
run starts with empty torch.compile / Triton caches unless --warm-cache), training and the final
evaluation on the validation split. Variants alternate in rounds (eager, compiled, auto, eager, ...)
in one invocation, on the same rows, seed and settings:

- ``eager``: ``--no-compile``;
- ``compiled``: ``--compile --compile-mode reduce-overhead`` (CUDA graphs, fixed batch shapes;
  each transformer block compiled once, with dynamic shapes: the default ``--compile-scope blocks``);
- ``compiled-default``: ``--compile`` (torch.compile's default mode, fixed batch shapes);
- ``compiled-step``: ``--compile --compile-mode reduce-overhead --compile-scope step`` (the whole
  step compiled once per batch shape; the other compiled variants compile each block once);
- ``graphs``: ``--compile --compile-scope graphs`` (the eager step recorded as one CUDA graph per
  bucketed batch shape, no compiler) with the shared prefix forced on (``--shared-prefix``);
  ``graphs-plain``: the same on the plain path (``--no-shared-prefix``, auto's choice there);
- ``auto``: no flag: lrpt decides (its one-line choice is reported as ``choice``);
- ``eager-nondet``, ``auto-nondet``: ``eager`` and ``auto`` with ``--no-deterministic`` (CUDA's
  attention backward adding a long row's parts in the order they finish). Each run reports the
  SHA-256 of its adapter's tensors (``adapter_sha``): runs that trained to the same bits share it.

Data: a folder of ``train.jsonl`` / ``validation.jsonl`` given by path (never copied); ``--limit N``
trains on `lrpt train --train-limit N` (a fixed-seed random subset of N rows, the same in every
run). ``--preset sst2`` (``rte``) uses lrpt's sst2 (rte) task; ``--preset trec`` the TREC columns (text, labels
0-5) with the label words of ../shared/data/README.md. Every run prints one JSON line as it ends
(unbuffered), then one summary line per variant (median wall clock and its ratio to eager); with
--out DIR the lines go to DIR/epoch.jsonl and each run's output to DIR/VARIANT-rK.log.

    python3 benchmarks/epoch.py --model /root/smol/hf --data ../shared/data/sst2 --preset sst2 --limit 10000 --out logs/
    python3 benchmarks/epoch.py --model /root/smol/hf --data ../shared/data/sst2 --preset sst2 --out logs/   # 67,349 rows
    python3 benchmarks/epoch.py --model /root/smol/hf --data ../shared/data/trec --preset trec --out logs/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "eager": ["--no-compile"],
    "compiled": ["--compile", "--compile-mode", "reduce-overhead"],
    "compiled-default": ["--compile"],
    "compiled-step": ["--compile", "--compile-mode", "reduce-overhead", "--compile-scope", "step"],
    "graphs": ["--compile", "--compile-scope", "graphs", "--shared-prefix"],
    "graphs-plain": ["--compile", "--compile-scope", "graphs", "--no-shared-prefix"],
    "auto": [],
    "eager-nondet": ["--no-compile", "--no-deterministic"],
    "auto-nondet": ["--no-deterministic"],
}
PRESETS = {
    "sst2": ["--task", "sst2"],
    "rte": ["--task", "rte"],
    "trec": ["--text-field", "text", "--labels", "abbreviation,description,entity,person,location,number",
             "--template", "Question: {text}\nAnswer type:"],
}
CHOICE = re.compile(r"^lrpt: training step: (.*)$", re.M)


def lrpt_train_command(args, variant: str, run_dir: Path) -> list[str]:
    """The `lrpt train` command line of one run."""
    cmd = [sys.executable, "-m", "lrpt.cli", "train", "--backend", "torch", "--model", args.model,
           "--data", args.data, *PRESETS.get(args.preset, []), "--method", args.method,
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--no-progress", "--out", str(run_dir), *VARIANTS[variant]]
    if args.limit:
        cmd += ["--train-limit", str(args.limit)]
    return cmd + shlex.split(args.extra)


def run_once(args, variant: str, round_: int, work: Path, logs: Path | None) -> dict:
    """One `lrpt train` run; its wall clock, exit status, accuracy and how its step ran."""
    run_dir = work / f"{variant}-r{round_}"
    cmd = lrpt_train_command(args, variant, run_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not args.warm_cache:  # a cold compile, as a user's first run has it
        cache = work / f"cache-{variant}-r{round_}"
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started (compile workers)
        output, _ = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - started
    if logs is not None:
        (logs / f"{variant}-r{round_}.log").write_text(" ".join(map(shlex.quote, cmd)) + "\n\n" + output)
    records = _metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_accuracy" in r or "eval_metric" in r]
    steps = [r["step"] for r in records if "loss" in r]
    choice = CHOICE.search(output)
    return {"variant": variant, "round": round_, "wall_s": round(wall, 2), "exit": proc.returncode,
            "timed_out": timed_out, "steps_logged": max(steps) if steps else 0,
            "train_s": _train_seconds(output),
            "accuracy": evals[-1].get("eval_accuracy", evals[-1].get("eval_metric")) if evals else None,
            "choice": choice.group(1) if choice else None, "adapter_sha": _adapter_sha(run_dir / "adapter"),
            "error": None if proc.returncode == 0 else (output.strip().splitlines() or ["?"])[-1][:300]}


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
    return out


def _adapter_sha(folder: Path) -> str | None:
    """SHA-256 (first 16 hex digits) of the adapter's tensor files: equal for runs that trained to the same bits."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _train_seconds(output: str) -> float | None:
    """The "time" row of `lrpt train`'s summary table (training and evaluation, no loading)."""
    found = re.search(r"^time\s+([0-9.]+) s$", output, re.M)
    return float(found.group(1)) if found else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder (e.g. SmolLM2-135M's)")
    ap.add_argument("--data", required=True, help="folder of train.jsonl and validation.jsonl")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="sst2", help="task flags for the data's columns")
    ap.add_argument("--limit", type=int, help="train on N rows (lrpt train --train-limit; default: all)")
    ap.add_argument("--variants", nargs="+", default=["eager", "compiled", "auto"], choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=1, help="runs of each variant, alternating")
    ap.add_argument("--method", default="lopt1")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more `lrpt train` flags for every run, as one string")
    ap.add_argument("--timeout", type=float, help="seconds before a run is killed (reported as timed out)")
    ap.add_argument("--warm-cache", action="store_true", help="share torch.compile caches between runs")
    ap.add_argument("--out", help="directory for epoch.jsonl, each run's log and run directory")
    args = ap.parse_args(argv)
    for what in ("model", "data"):
        if not Path(getattr(args, what)).is_dir():
            ap.error(f"--{what} {getattr(args, what)} is not a directory")
    args.model, args.data = str(Path(args.model).resolve()), str(Path(args.data).resolve())
    logs = Path(args.out).resolve() if args.out else None
    with tempfile.TemporaryDirectory(prefix="lrpt-epoch-") as tmp:
        work = logs / "runs" if logs else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        sink = (logs / "epoch.jsonl").open("a", encoding="utf-8") if logs else None

        def emit(record: dict) -> None:
            line = json.dumps(record)
            print(line, flush=True)
            if sink is not None:
                sink.write(line + "\n")
                sink.flush()

        emit({"model": args.model, "data": args.data, "preset": args.preset, "limit": args.limit,
              "method": args.method, "batch_size": args.batch_size, "epochs": args.epochs, "extra": args.extra,
              "variants": args.variants, "rounds": args.rounds, "warm_cache": args.warm_cache,
              "commit": _commit()})
        results = []
        try:
            for r in range(args.rounds):
                for variant in args.variants:
                    result = run_once(args, variant, r, work, logs)
                    emit(result)
                    results.append(result)
            eager = [x["wall_s"] for x in results if x["variant"] == "eager" and x["exit"] == 0]
            for variant in args.variants:
                ok = [x for x in results if x["variant"] == variant and x["exit"] == 0]
                wall = statistics.median(x["wall_s"] for x in ok) if ok else None
                emit({"summary": variant, "runs": len(ok), "wall_s_median": wall,
                      "vs_eager": round(wall / statistics.median(eager), 3) if wall and eager else None,
                      "accuracy": [x["accuracy"] for x in ok], "choice": ok[0]["choice"] if ok else None})
        finally:
            if sink is not None:
                sink.close()
    return 0 if all(x["exit"] == 0 for x in results) else 1


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
