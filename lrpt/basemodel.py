"""Identity of a base model, so an adapter refuses to run on a model it was not made for.

The fingerprint must come out the same on every backend and survive dtype changes (a bf16
load, a 4-bit quantisation), yet tell different models apart. It is the mean absolute value
of eight embedding rows at fixed, spread-out token ids: a cheap, stable summary compared
with a relative tolerance rather than by exact hash.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AdapterFormatError, BaseModelMismatchError

FINGERPRINT_SCHEME = "rowmeanabs-v1"
FINGERPRINT_RTOL = 0.05  # quantisation moves a row's mean |x| by well under 5%


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model_dir: str | Path) -> int | None:
    """The longest sequence the model in an HF folder takes (prompt included), from its ``config.json``.

    Read from the folder, not the loaded model, so it is the same on both backends and known
    before the model loads; None when the config does not say (no limit is then enforced).
    """
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return context_from(config)


def loaded_context(model: Any) -> int | None:
    """The context length a loaded model states: its HF ``config`` (torch) or mlx-lm ``args``."""
    for attr in ("config", "args"):
        config = getattr(model, attr, None)
        if config is not None:
            return context_from(config)
    return None


def context_from(config: Any) -> int | None:
    """The context length a model config states: a ``config.json`` dict or a loaded model's config
    object (HF ``model.config``, mlx-lm ``model.args``), its ``text_config`` searched too."""
    def get(c: Any, key: str) -> Any:
        return c.get(key) if isinstance(c, dict) else getattr(c, key, None)

    for cfg in (config, get(config, "text_config")):
        if cfg is not None:
            for key in _CONTEXT_KEYS:
                v = get(cfg, key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def fingerprint_rows(vocab_size: int) -> list[int]:
    """The token ids whose embedding rows make the fingerprint."""
    return sorted({round(i * (vocab_size - 1) / 7) for i in range(8)})


def fingerprint_from_rows(rows: np.ndarray) -> dict[str, Any]:
    """Fingerprint from the embedding rows at :func:`fingerprint_rows` (in that order)."""
    values = np.abs(np.asarray(rows, dtype=np.float64)).mean(axis=1)
    return {"scheme": FINGERPRINT_SCHEME, "values": [float(f"{v:.6g}") for v in values]}


@dataclass
class BaseModelInfo:
    """What an adapter records of its base model (``base_model`` in adapter_config.json)."""

    name_or_path: str | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    embedding_fingerprint: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "base_model") -> BaseModelInfo:
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{where} must be a JSON object or null, got {type(data).__name__}")
        unknown = set(data) - {"name_or_path", "model_type", "hidden_size", "vocab_size", "embedding_fingerprint"}
        if unknown:
            raise AdapterFormatError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
        for key in ("hidden_size", "vocab_size"):
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AdapterFormatError(f"{where}.{key} must be a positive integer, got {v!r}")
        for key in ("name_or_path", "model_type"):
            v = data.get(key)
            if v is not None and not isinstance(v, str):
                raise AdapterFormatError(f"{where}.{key} must be a string, got {v!r}")
        fp = data.get("embedding_fingerprint")
        if fp is not None and not (
            isinstance(fp, dict)
            and isinstance(fp.get("values"), list)
            and isinstance(fp.get("scheme"), str)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in fp["values"])
        ):
            raise AdapterFormatError(f"{where}.embedding_fingerprint is malformed (a scheme and a list of finite numbers)")
        return cls(**data)

    def check_compatible(self, other: BaseModelInfo, force: bool = False) -> None:
        """Raise :class:`BaseModelMismatchError` if ``other`` (the model in hand) does not fit.

        Hidden size and vocabulary size must match; the fingerprint must match unless
        ``force`` (for a fine-tuned or re-quantised copy of the same model).
        """
        name = self.name_or_path or "its base model"
        for key in ("hidden_size", "vocab_size"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is not None and theirs is not None and mine != theirs:
                raise BaseModelMismatchError(
                    f"adapter was made for {name} with {key} {mine}, but this model has {theirs}:"
                    " use the adapter's base model"
                )
        if force or self.embedding_fingerprint is None or other.embedding_fingerprint is None:
            return
        a, b = self.embedding_fingerprint, other.embedding_fingerprint
        same = (
            a.get("scheme") == b.get("scheme")
            and len(a["values"]) == len(b["values"])
            and np.allclose(a["values"], b["values"], rtol=FINGERPRINT_RTOL, atol=1e-6)
        )
        if not same:
            raise BaseModelMismatchError(
                f"adapter was made for {name}, and this model's embeddings differ (fingerprint mismatch):"
                " use the adapter's base model, or --force if it is a variant of it"
            )
