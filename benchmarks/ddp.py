"""Data-parallel training throughput: ``torchrun --nproc-per-node N`` vs one process, same per-GPU batch.

Each process runs lrpt's real training step (:class:`lrpt.training.Training`) on a random-weight
model of a named shape (speed does not depend on weight values): the global batch is
``per_gpu × N`` rows of L tokens, each rank takes its share and the prompt's gradients are
all-reduced, as ``lrpt train`` does under torchrun. Rank 0 prints one JSON line: input tokens per
second over all GPUs (median of rounds; each round the mean of ``--steps`` steps after warm-up) and
the peak memory of the whole run (building the model included).

The model is built on the meta device and materialised on the GPU afterwards (``--fsdp``: sharded
first, as ``lrpt train --fsdp`` loads it), so a shape larger than one GPU can be measured; a run
that does not fit prints ``"oom": true``.

    python benchmarks/ddp.py --shape llama-3.2-1b                                  # one GPU
    torchrun --nproc-per-node 2 benchmarks/ddp.py --shape llama-3.2-1b           # two GPUs
    torchrun --nproc-per-node 2 benchmarks/ddp.py --shape llama-3.1-70b --per-gpu 4 --fsdp
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import SHAPES, LabelTokenizer  # noqa: E402

from lrpt import PromptSpec, Task  # noqa: E402
from lrpt.backends import get_backend  # noqa: E402
from lrpt.backends.torch.model import default_device  # noqa: E402
from lrpt.backends.torch.prompts import PromptModule  # noqa: E402
from lrpt.backends.torch.step import shard_model, world  # noqa: E402
from lrpt.data import Encoded  # noqa: E402
from lrpt.reference import init_params  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402
from lrpt.training import Training  # noqa: E402

# Shapes of bases that need several GPUs (Llama-3.1 8B and 70B), beside speed.py's.
LARGE = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, fsdp: bool):
    """A random-weight Llama of ``shape`` on ``device``: built on the meta device, sharded first with
    ``fsdp``, then materialised (speed and memory do not depend on the values)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**SHAPES, **LARGE}[shape], max_position_embeddings=4096, rope_theta=10000.0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    if fsdp:
        shard_model(model)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            getattr(p, "_local_tensor", p).normal_(0.0, 0.02)
    rotary = model.model.rotary_emb  # its buffers were never computed on the meta device
    model.model.rotary_emb = type(rotary)(config=cfg).to(device)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--per-gpu", type=int, default=16, help="rows per GPU per step")
    ap.add_argument("--length", type=int, default=256, help="input tokens per row")
    ap.add_argument("--tokens", type=int, default=20, help="prompt length n")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead")
    ap.add_argument("--fsdp", action="store_true", help="shard the blocks with FSDP2 (lrpt train --fsdp)")
    args = ap.parse_args(argv)

    rank, size = world(need_group=args.fsdp)
    device = default_device()
    try:
        code = run(args, rank, size, device)
        if size > 1 or args.fsdp:
            # FSDP's collective handles may sit in reference cycles: free them while the group lives (a
            # gloo group destroyed under a live handle aborts the process, "terminate called without an
            # active exception", seen once on CI after the barrier below).
            gc.collect()
            # Every rank leaves together (on success only: a failed peer would never arrive): a rank
            # that tears gloo's sockets down while a peer still reads from them makes the peer abort.
            torch.distributed.barrier()
        return code
    except torch.OutOfMemoryError:
        if rank == 0:
            print(json.dumps({"shape": args.shape, "gpus": size, "fsdp": args.fsdp, "per_gpu": args.per_gpu,
                              "length": args.length, "oom": True,
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
        return 0
    finally:
        if size > 1 or args.fsdp:
            torch.distributed.destroy_process_group()


def run(args, rank: int, size: int, device: torch.device) -> int:
    model = build(args.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.fsdp)
    spec = PromptSpec("lopt1", n_tokens=args.tokens, rank=4)
    prompt = PromptModule(spec, init_params(spec, model.config.hidden_size, 0)).to(device)
    rng = np.random.default_rng(0)
    rows = args.per_gpu * size
    data = [Encoded(rng.integers(100, min(1000, model.config.vocab_size), args.length).tolist(), int(rng.integers(0, 2))) for _ in range(rows)]
    task = Task("bench", template="{text}", label_words=[" 0", " 1"])
    # torch's default kernels, as the anchors run (epoch.py times --deterministic's mode on whole runs).
    cfg = TrainConfig(compile=args.compile_mode is not None, compile_mode=args.compile_mode, pad_to_multiple=1,
                      fsdp=args.fsdp, deterministic=False)
    ops = Training(get_backend("torch"), model, LabelTokenizer(), prompt, task, data, None, cfg)
    batch = [list(range(rows))]
    for _ in range(3):
        ops.step(batch, 1e-3)
    torch.cuda.synchronize() if device.type == "cuda" else None
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            ops.step(batch, 1e-3)
        ops.loss_value([ops.step(batch, 1e-3)])  # a read-back: every rank's queued work is done
        times.append((time.perf_counter() - t) / (args.steps + 1))
    if rank == 0:
        step = statistics.median(times)
        print(json.dumps({"shape": args.shape, "gpus": size, "fsdp": args.fsdp, "per_gpu": args.per_gpu, "length": args.length,
                          "step_ms": round(step * 1000, 2), "spread_ms": round((max(times) - min(times)) * 1000, 2),
                          "tok_s": round(rows * args.length / step, 1),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda"
                          else None, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
