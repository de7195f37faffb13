"""Run under torchrun by tests/test_distributed.py and tests/test_gpu.py: what ``--fsdp`` leaves on
each rank, and what it should be (the non-block weights whole, the blocks / world).

Each MODE named on the command line (``fsdp_probe.py MODEL MODE...``) prints one JSON line on rank 0,
in order; one launch serves several checks (a torchrun start costs seconds).

``shard``: bytes held by live tensors before and after :func:`shard_model` shards a loaded model.
``load``: ``load_model(fsdp=True)``, the path ``lrpt train --fsdp`` takes: this rank's bytes of
weights, and on CUDA the peak memory of loading (one whole block at most beyond the share); then
after a forward, how many block weights are gathered still (none should be)."""

import gc
import json
import sys

import torch

from lrpt.backends import get_backend
from lrpt.backends.torch.step import shard_model, world


def live_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for t in gc.get_objects():
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_report(path: str, size: int) -> dict:
    model, _ = get_backend("torch").load_model(path)
    blocks = sum(nbytes(p) for p in model.model.layers.parameters())
    before = live_bytes()
    shard_model(model)
    after = live_bytes()
    return {"before": before, "after": after, "expected": before - blocks + blocks // size}


def load_report(path: str, size: int) -> dict:
    model, _ = get_backend("torch").load_model(path, fsdp=True)
    whole = sum(nbytes(p) for p in model.parameters())  # a sharded DTensor counts its global size
    blocks = sum(nbytes(p) for p in model.model.layers.parameters())
    local = sum(nbytes(getattr(p, "_local_tensor", p)) for p in model.parameters())
    report = {"whole": whole, "local": local, "expected": whole - blocks + blocks // size,
              "one_block": blocks // len(model.model.layers), "device": str(next(model.parameters()).device),
              "peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    with torch.no_grad():
        model(torch.arange(1, 9, device=report["device"])[None])
    report["gathered_after_forward"] = sum(not hasattr(p, "_local_tensor") for p in model.model.layers.parameters())
    return report


rank, size = world(need_group=True)
for mode in sys.argv[2:]:
    report = {"shard": shard_report, "load": load_report}[mode](sys.argv[1], size)  # the model is freed on return
    gc.collect()
    if rank == 0:
        print(json.dumps(report), flush=True)
