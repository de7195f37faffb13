"""The core's op set on MLX (same names as :mod:`lrpt.ops` and ``lrpt/backends/torch/ops.py``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

matmul = mx.matmul
reshape = mx.reshape
sigmoid = mx.sigmoid
tanh = mx.tanh
elu = nn.elu
relu = nn.relu
gelu = nn.gelu
maximum = mx.maximum
where = mx.where


def linear(x, w, b):
    return mx.addmm(b, x, w.T)


def swap_last(x):
    return mx.swapaxes(x, -1, -2)


def log_softmax(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def take_last(x, idx):
    return mx.take_along_axis(x, idx, axis=-1)


def index_last(x, ids):
    return x[..., ids]


def row_at(x, idx):
    return mx.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


def sum(x, axis=None):  # noqa: A001 - the op set's name
    return mx.sum(x) if axis is None else mx.sum(x, axis=axis)


def mean(x):
    return mx.mean(x)


def float32(x):
    return x.astype(mx.float32)


def arange(n, like=None):
    return mx.arange(n)


def dropout(x, p):
    keep = mx.random.bernoulli(1.0 - p, x.shape)
    return mx.where(keep, x / (1.0 - p), mx.zeros_like(x))


def expand_batch(x, b):
    return mx.broadcast_to(x[None], (b, *x.shape))


def pad_axis1(x, n):
    return mx.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0)])


def concat0(xs):
    return mx.concatenate(xs, axis=0)


def take0(x, idx):
    return x[mx.array(idx)]


def asarray(a, device=None):
    import numpy as np

    return mx.array(a.astype(np.int32) if a.dtype == np.int64 else a)


def to_numpy(x):
    import numpy as np

    return np.array(x.astype(mx.float32))


def repeat_rows(x, k):
    return mx.repeat(x, k, axis=0)


def clamp_min(x, v):
    return mx.maximum(x, v)
