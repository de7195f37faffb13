"""Run under torchrun by tests/test_distributed.py: bytes held by live tensors before and after
``--fsdp`` shards a tiny model's blocks, and what they should be (the rest whole, blocks / world)."""

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


rank, size = world(need_group=True)
model, _ = get_backend("torch").load_model(sys.argv[1])
blocks = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
before = live_bytes()
shard_model(model)
after = live_bytes()
if rank == 0:
    print(json.dumps({"before": before, "after": after, "expected": before - blocks + blocks // size}), flush=True)
