"""Atomic file writes, a safetensors writer, and a strict reader over the ``safetensors`` package.

Reading goes through the reference ``safetensors`` package (memory-mapped, with its strict
checks: gaps, overlaps, trailing bytes, offsets that overflow), and its errors become
:class:`~lrpt.errors.AdapterFormatError`. lrpt adds what the package does not check or say
clearly: a pickle renamed ``.safetensors``, an empty or truncated file, a non-regular file
(a symlink to ``/dev/zero``), and duplicate tensor names (the package keeps the last one).
The writer stays our own because it must emit bf16 from NumPy, which has no bf16 type;
files it writes are read by the package and the other way round (tested).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AdapterFormatError, LrptError

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temp file or dir the mode a plain ``open``/``mkdir`` would (``mkstemp`` makes 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def regular_file(path: Path, what: str, error: type[LrptError] = AdapterFormatError) -> os.stat_result:
    """``stat`` of ``path``, refusing anything but a regular file (a FIFO or ``/dev/zero`` never ends)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise error(f"{what} {path} is {kind}: pass a regular file")
    return st


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The bytes go to a temporary file in the same directory (so the rename stays on one
    file system), are fsynced, then renamed over the target; the directory is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # a file replaced keeps its mode (a 0600 secret stays 0600); a new one gets open()'s
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: a failing chmod below cannot leak it
            if mode is None:
                _normal_mode(tmp)
            else:
                os.chmod(tmp, mode)
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
        _normal_mode(tmp, directory=True)
        yield tmp
        if path.exists() and replace:
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


MAX_JSON = 16 * 2**20  # a config is a few kB; more is not one (and is not read into memory)


def read_json(path: Path, what: str, error: type[LrptError] = AdapterFormatError) -> Any:
    """The JSON value of a small regular file; a missing, special, huge, undecodable or too deeply
    nested file is one ``error`` naming ``what`` (json's own errors include ValueError for integers
    of more than 4,300 digits and RecursionError for deep nesting)."""
    if regular_file(path, what, error).st_size > MAX_JSON:
        raise error(f"{path} is larger than {MAX_JSON // 2**20} MiB: not an {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path} is not valid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be an {what}") from None


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
        src = np.asarray(tensors[name])
        with np.errstate(over="ignore"):  # a value the dtype cannot hold is refused below, not warned about
            arr = src.astype(np.float32)
            stored = to_bf16_bits(arr) if code == "BF16" else np.ascontiguousarray(arr, dtype=_DTYPES[code])
        if np.all(np.isfinite(src)) and not np.all(np.isfinite(from_bf16_bits(stored) if code == "BF16" else stored)):
            raise AdapterFormatError(f"tensor {name!r} holds values too large for {dtype} (beyond its largest"
                                     " finite number): save it as float32")
        raw = stored.tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align data to 8 bytes, as the reference writer does
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _DuplicateKey(dup)
    return dict(pairs)


class _DuplicateKey(Exception):
    pass


def _pickled(first: bytes) -> bool:
    """Whether a file's first bytes are a pickle's (protocol 2-5: PROTO opcode) or a zip's (torch.save)."""
    return (first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or first[:4] == b"PK\x03\x04"


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Read a safetensors file strictly, memory-mapped: only the tensors are copied, never the file.

    Returns (tensors as float32, metadata, stored dtype of each tensor). Never unpickles;
    every defect raises :class:`AdapterFormatError` naming the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    name = str(path)
    size = regular_file(path, "tensors file").st_size
    if size == 0:
        raise AdapterFormatError(f"{name} is empty (0 bytes): the adapter was not saved completely")
    if size < 8:
        raise AdapterFormatError(f"{name} is truncated ({size} bytes): save the adapter again")
    with path.open("rb") as f:
        first = f.read(9)
        n = int.from_bytes(first[:8], "little")
        # A safetensors header is JSON right after its length; only a file that is not one is looked at
        # for pickle/zip magic (a real header's length can start with b"\x80\x02" or b"PK": 640, 19280 bytes)
        if not (2 <= n <= MAX_HEADER and 8 + n <= size and first[8:9] == b"{") and _pickled(first):
            raise AdapterFormatError(
                f"{name} is a pickle/zip (torch.save) file, not safetensors: lrpt never unpickles;"
                " re-save it with safetensors"
            )
        if n > MAX_HEADER or n < 2:
            raise AdapterFormatError(f"{name} is not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise AdapterFormatError(f"{name} is truncated (header runs past the end of the file): save it again")
        f.seek(8)
        head = f.read(n)
    try:  # the package takes the last of duplicate names; lrpt refuses the file
        header = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise AdapterFormatError(f"{name} is corrupt: tensor {exc.args[0]!r} appears twice in the header") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterFormatError(f"{name} has a corrupt header (not JSON): the file is damaged") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name} has a corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{name} has corrupt metadata (must map strings to strings)")
    for key, info in header.items():
        code = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(code, str) and code not in _DTYPES:
            raise AdapterFormatError(
                f"{name}: tensor {key!r} has dtype {code}; lrpt adapters hold F32 (or F16/BF16 exports)"
            )
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int) and offsets[1] > size - 8 - n:
            raise AdapterFormatError(f"{name} is truncated (tensor {key!r} runs past the end): save it again")
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(name, framework="numpy") as st:
            for key in st.keys():
                code = header[key]["dtype"]
                start, end = header[key]["data_offsets"]
                if code == "BF16" and end == start:
                    arr = np.zeros(header[key]["shape"], np.float32)
                elif code == "BF16":  # NumPy has no bf16: map the raw 16-bit patterns (offsets checked by the package)
                    raw = np.memmap(path, dtype="<u2", mode="r", offset=8 + n + start, shape=((end - start) // 2,))
                    arr = from_bf16_bits(np.asarray(raw)).reshape(header[key]["shape"])
                    del raw
                else:
                    arr = st.get_tensor(key)
                tensors[key] = np.array(arr, dtype=np.float32)  # own, writable copy
                dtypes[key] = code
    except SafetensorError as exc:
        detail = str(exc).removeprefix("Error while deserializing header: ")
        raise AdapterFormatError(f"{name} is corrupt ({detail}): the file is damaged; save it again") from None
    return tensors, metadata, dtypes
