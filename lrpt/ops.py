"""The op set the core's math is written against, and its NumPy implementation (the reference).

lrpt's algorithm (every method's prompt, LoPA's heads and pooling, label scores, completion
loss) lives once in the core, in functions that take an op set ``xp`` as their first argument.
Each backend supplies the same small set of functions under the same names in its own
``ops.py`` (``lrpt/backends/torch/ops.py``, ``lrpt/backends/mlx/ops.py``); this module is the
NumPy one, so running the core with it *is* the reference. The set (all on the last axes):

``matmul(a, b)``, ``swap_last(x)`` (transpose the last two axes), ``linear(x, w, b)`` (x wᵀ + b,
w stored (out, in)), ``reshape(x, shape)``, ``sigmoid``, ``tanh``, ``elu``, ``relu``, ``gelu``
(exact, erf), ``maximum(a, b)``, ``clamp_min(x, v)``, ``where(c, a, b)``, ``log_softmax(x)``, ``take_last(x, idx)``
(gather along the last axis), ``index_last(x, ids)`` (the same ids for every row),
``row_at(x, idx)`` (row b of x[b] at position idx[b]), ``sum(x, axis)``, ``mean(x)``, ``float32(x)``, ``arange(n, like)`` (on ``like``'s device), ``dropout(x, p)`` (training only);
for batches of prompt rows: ``expand_batch(x, b)``, ``pad_axis1(x, n)``, ``concat0(xs)``, ``take0(x, idx)``, ``repeat_rows(x, k)``; and the host boundary:
``asarray(numpy_array, device)`` and ``to_numpy(x)`` (float32).
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def matmul(a, b):
    return np.matmul(a, b)


def swap_last(x):
    return np.swapaxes(x, -1, -2)


def linear(x, w, b):
    return x @ w.T + b


def reshape(x, shape):
    return np.reshape(x, shape)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def tanh(x):
    return np.tanh(x)


def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def relu(x):
    return np.maximum(x, 0.0)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def maximum(a, b):
    return np.maximum(a, b)


def where(c, a, b):
    return np.where(c, a, b)


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def take_last(x, idx):
    return np.take_along_axis(x, idx, axis=-1)


def index_last(x, ids):
    return x[..., ids]


def row_at(x, idx):
    return x[np.arange(x.shape[0]), idx]


def sum(x, axis=None):  # noqa: A001 - the op set's name
    return np.sum(x, axis=axis)


def mean(x):
    return np.mean(x)


def float32(x):
    return np.asarray(x, dtype=np.float32)


def arange(n, like=None):
    return np.arange(n)


def dropout(x, p):
    raise NotImplementedError("the NumPy reference is the evaluation-mode function: no dropout")


def expand_batch(x, b):
    return np.broadcast_to(x[None], (b, *x.shape))


def pad_axis1(x, n):
    return np.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0)])


def concat0(xs):
    return np.concatenate(xs, axis=0)


def take0(x, idx):
    return x[np.asarray(idx)]


def asarray(a, device=None):
    return np.asarray(a)


def to_numpy(x):
    return np.asarray(x, dtype=np.float32)


def repeat_rows(x, k):
    return np.repeat(x, k, axis=0)


def clamp_min(x, v):
    return np.maximum(x, v)
