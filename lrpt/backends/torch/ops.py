"""The core's op set on PyTorch (same names as :mod:`lrpt.ops` and ``lrpt/backends/mlx/ops.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

matmul = torch.matmul
linear = F.linear
reshape = torch.reshape
sigmoid = torch.sigmoid
tanh = torch.tanh
elu = F.elu
relu = F.relu
gelu = F.gelu
maximum = torch.maximum
where = torch.where


def swap_last(x):
    return x.transpose(-1, -2)


def log_softmax(x):
    return torch.log_softmax(x, dim=-1)


def take_last(x, idx):
    return x.gather(-1, idx)


def index_last(x, ids):
    return x[..., ids]


def row_at(x, idx):
    return x[torch.arange(x.shape[0], device=x.device), idx]


def sum(x, axis=None):  # noqa: A001 - the op set's name
    return x.sum() if axis is None else x.sum(axis)


def mean(x):
    return x.mean()


def float32(x):
    return x.float()


def arange(n, like=None):
    return torch.arange(n, device=None if like is None else like.device)


def dropout(x, p):
    return F.dropout(x, p, training=True)


def expand_batch(x, b):
    return x.unsqueeze(0).expand(b, *x.shape)


def pad_axis1(x, n):
    return F.pad(x, (0, 0, 0, n - x.shape[1]))


def concat0(xs):
    return torch.cat(xs, 0)


def take0(x, idx):
    return x[torch.as_tensor(idx, device=x.device)]


def asarray(a, device=None):
    t = torch.from_numpy(a)
    return t.to(device, non_blocking=True) if device is not None else t


def to_numpy(x):
    return x.detach().float().cpu().numpy()


def repeat_rows(x, k):
    return x.repeat_interleave(k, 0)


def clamp_min(x, v):
    return x.clamp(min=v)
