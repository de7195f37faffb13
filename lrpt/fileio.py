"""Atomic file writes and a strict safetensors reader/writer.

Why our own safetensors code: the format is tiny (8-byte little-endian header length, a
JSON header, raw little-endian data), and reading it ourselves lets every defect get its
own clear message (truncation, overlapping offsets, a pickle renamed ``.safetensors``...)
and lets us read bf16 into NumPy, which has no bf16 type. Files written here are read by
the reference ``safetensors`` package and the other way round (tested).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AdapterFormatError

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The bytes go to a temporary file in the same directory (so the rename stays on one
    file system), are fsynced, then renamed over the target; the directory is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a directory aside and rename it to ``path`` only once the block succeeds.

    A failure removes the partial directory, so ``path`` is either absent, the old one, or
    complete. With ``replace`` an existing ``path`` is removed just before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists() and replace:
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_safetensors(
    tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None, dtype: str = "float32"
) -> bytes:
    """Serialise float tensors in ``dtype`` (float32, float16 or bfloat16)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    code = _DTYPE_NAMES[dtype]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], dtype=np.float32)
        if code == "BF16":
            raw = to_bf16_bits(arr).tobytes()
        else:
            raw = np.ascontiguousarray(arr, dtype=_DTYPES[code]).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align data to 8 bytes, as the reference writer does
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Read a safetensors file strictly.

    Returns (tensors as float32, metadata, stored dtype of each tensor). Never unpickles;
    every defect raises :class:`AdapterFormatError` naming the file.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise AdapterFormatError(f"{name} is missing: an adapter needs its tensors file")
    data = path.read_bytes()
    if len(data) == 0:
        raise AdapterFormatError(f"{name} is empty (0 bytes): the adapter was not saved completely")
    if len(data) < 8:
        raise AdapterFormatError(f"{name} is truncated ({len(data)} bytes): save the adapter again")
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise AdapterFormatError(
            f"{name} is a pickle/zip (torch.save) file, not safetensors: lrpt never unpickles;"
            " re-save it with safetensors"
        )
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER or n < 2:
        raise AdapterFormatError(f"{name} is not a safetensors file (header length {n} is implausible)")
    if 8 + n > len(data):
        raise AdapterFormatError(f"{name} is truncated (header runs past the end of the file): save it again")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFormatError(f"{name} has a corrupt header (not JSON): the file is damaged") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name} has a corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{name} has corrupt metadata (must map strings to strings)")
    body = memoryview(data)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    spans = []
    for key, info in header.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and isinstance(info.get("dtype"), str)
            and all(isinstance(s, int) and s >= 0 for s in info["shape"] + info["data_offsets"])
        ):
            raise AdapterFormatError(f"{name}: corrupt entry for tensor {key!r} in the header")
        code = info["dtype"]
        if code not in _DTYPES:
            raise AdapterFormatError(
                f"{name}: tensor {key!r} has dtype {code}; lrpt adapters hold F32 (or F16/BF16 exports)"
            )
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if end < start or end - start != count * _DTYPES[code].itemsize:
            raise AdapterFormatError(f"{name}: tensor {key!r} has offsets that do not match its shape")
        if end > len(body):
            raise AdapterFormatError(f"{name} is truncated (tensor {key!r} runs past the end): save it again")
        spans.append((start, end))
        raw = np.frombuffer(body[start:end], dtype=_DTYPES[code]).reshape(info["shape"])
        arr = from_bf16_bits(raw) if code == "BF16" else raw.astype(np.float32)
        tensors[key] = np.array(arr, dtype=np.float32)  # own, writable copy
        dtypes[key] = code
    spans.sort()
    for (_, a_end), (b_start, _) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise AdapterFormatError(f"{name} is corrupt: tensors overlap")
    return tensors, metadata, dtypes
