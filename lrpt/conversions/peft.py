"""HF PEFT prompt adapters ⇄ lrpt adapters.

Import: a PEFT ``PROMPT_TUNING`` or ``P_TUNING`` directory (both save the prompt matrix as
``prompt_embeddings``; P-tuning saves its encoder's output) becomes an lrpt ``prompt``
adapter; a ``MULTITASK_PROMPT_TUNING`` one (P ∘ (C_k R_k)) becomes the ``prompt`` adapter of
one task k. Export: ``prompt``, ``lopt1`` and ``lopt2`` become a ``PROMPT_TUNING`` directory by
materialising X; ``lopa`` cannot, since its prompt depends on each input.

PEFT's own padding behaviour (PEFT issue #1093): PEFT puts the prompt before the whole padded
row and lets the model number positions from the first column, so with left padding the
prompt sits before the pads and positions count the pads; the same text then gets another
answer in a left-padded batch than alone. With right padding, or one sequence at a time, PEFT
and lrpt compute the same thing (tested); lrpt gives that answer for any padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter, dtype_name, peft_fields
from ..basemodel import BaseModelInfo
from ..errors import AdapterFormatError, ConversionError, LrptError
from ..fileio import atomic_dir, atomic_write, atomic_write_json, encode_safetensors, read_json, read_safetensors
from ..spec import PromptSpec

IMPORTABLE = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
MULTITASK_TENSORS = {"prefix_task_cols", "prefix_task_rows"}


def is_peft_dir(path: str | Path) -> bool:
    """True when ``path`` holds a PEFT adapter config (of any type)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        data = read_json(cfg, "adapter config")
    except (OSError, LrptError):  # not readable as one: the lrpt loader says what is wrong with it
        return False
    return isinstance(data, dict) and "peft_type" in data and data.get("format") != "lrpt"


def read_peft(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config and float32 tensors of a PEFT adapter directory (safetensors only)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory")
    if not (path / CONFIG_NAME).exists():
        raise ConversionError(f"{path} has no {CONFIG_NAME}: not a PEFT adapter directory")
    config = read_json(path / CONFIG_NAME, "adapter config", ConversionError)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ConversionError(f"{path / CONFIG_NAME} has no peft_type: not a PEFT adapter")
    weights = path / WEIGHTS_NAME
    if not weights.exists() and (path / "adapter_model.bin").exists():
        raise ConversionError(f"{path} holds adapter_model.bin (a pickle): lrpt never unpickles; re-save it with"
                              " safe_serialization=True")
    try:
        tensors, _, _ = read_safetensors(weights)
    except AdapterFormatError as exc:
        raise ConversionError(str(exc)) from None
    return config, tensors


def describe_peft(path: str | Path) -> dict[str, Any]:
    """What ``lrpt inspect`` shows for a PEFT directory."""
    config, tensors = read_peft(path)
    return {
        "path": str(path),
        "format": "peft",
        "peft_type": config["peft_type"],
        "task_type": config.get("task_type"),
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "token_dim": config.get("token_dim"),
        "base_model": config.get("base_model_name_or_path"),
        "tensors": {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in sorted(tensors.items())},
        "importable": config["peft_type"] in IMPORTABLE,
    }


def from_peft(path: str | Path, task_index: int = 0) -> Adapter:
    """Import a PEFT prompt adapter as an lrpt ``prompt`` adapter (see the module docstring)."""
    config, tensors = read_peft(path)
    kind = config["peft_type"]
    if kind not in IMPORTABLE:
        raise ConversionError(f"PEFT type {kind} cannot become a soft prompt: lrpt imports {', '.join(IMPORTABLE)}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):  # e.g. SEQ_CLS: a trained head lrpt would drop
        raise ConversionError(f"{path} is a PEFT {config['task_type']} adapter: lrpt imports CAUSAL_LM prompts,"
                              " whose answers come from the model's own head")
    if "prompt_embeddings" not in tensors:
        raise ConversionError(f"{path} has no 'prompt_embeddings' tensor (found {', '.join(sorted(tensors))})")
    expected = {"prompt_embeddings"} | (MULTITASK_TENSORS if kind == "MULTITASK_PROMPT_TUNING" else set())
    if set(tensors) - expected:
        raise ConversionError(f"{path} holds tensors a prompt does not use ({', '.join(sorted(set(tensors) - expected))}):"
                              " lrpt imports the prompt alone and would drop them")
    prompt = tensors["prompt_embeddings"]
    if prompt.ndim != 2:
        raise ConversionError(f"'prompt_embeddings' has shape {prompt.shape}, expected (n, d)")
    if config.get("num_virtual_tokens") not in (None, prompt.shape[0]):
        raise ConversionError(f"{path}: num_virtual_tokens {config['num_virtual_tokens']} disagrees with the"
                              f" {prompt.shape[0]} rows of 'prompt_embeddings'")
    if kind == "MULTITASK_PROMPT_TUNING":
        cols, rows = tensors.get("prefix_task_cols"), tensors.get("prefix_task_rows")
        if cols is None or rows is None:
            raise ConversionError(f"{path}: a multitask adapter needs prefix_task_cols and prefix_task_rows")
        if cols.ndim != 3 or rows.ndim != 3:
            raise ConversionError(f"{path}: prefix_task_cols {cols.shape} and prefix_task_rows {rows.shape} must be"
                                  " 3-D (tasks, n, r) and (tasks, r, d)")
        if not 0 <= task_index < cols.shape[0]:
            raise ConversionError(f"task {task_index} does not exist: this adapter has {cols.shape[0]} tasks")
        if cols.shape[1] != prompt.shape[0] or rows.shape[2] != prompt.shape[1] or cols.shape[2] != rows.shape[1]:
            raise ConversionError(f"{path}: incompatible shapes {prompt.shape}, {cols.shape}, {rows.shape}")
        prompt = prompt * (cols[task_index].astype(np.float64) @ rows[task_index]).astype(np.float32)
    n_sub = config.get("num_transformer_submodules") or 1
    if n_sub != 1:
        raise ConversionError(f"{path} is an encoder-decoder prompt ({n_sub} submodules): lrpt serves causal LMs")
    n, d = prompt.shape
    if config.get("token_dim") not in (None, d):
        raise ConversionError(f"{path}: token_dim {config['token_dim']} disagrees with the tensor width {d}")
    base = BaseModelInfo(name_or_path=config.get("base_model_name_or_path"), hidden_size=d)
    adapter = Adapter(PromptSpec("prompt", n_tokens=n), {"prompt_embeddings": prompt.astype(np.float32)},
                      None, base, {"backend": f"peft:{kind}", "lrpt_version": _version()})
    return adapter.validate()


def to_peft(adapter: Adapter, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write ``adapter`` as a PEFT ``PROMPT_TUNING`` directory (X materialised)."""
    if not adapter.spec.is_static:
        raise ConversionError("lopa cannot be exported to PEFT: its prompt depends on each input, and PEFT prompt"
                              " tuning holds one fixed matrix")
    x = adapter.materialize()
    spec = PromptSpec("prompt", n_tokens=adapter.spec.n_tokens)
    config = peft_fields(spec, adapter.dim, adapter.base_model)
    dtype = dtype_name(dtype, ConversionError)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory: choose another output directory")
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty: choose another output directory")
    weights = encode_safetensors({"prompt_embeddings": x}, {"format": "pt"}, dtype)
    with atomic_dir(out, replace=True) as tmp:  # both files or neither (replace: an empty directory only)
        atomic_write(tmp / WEIGHTS_NAME, weights)
        atomic_write_json(tmp / CONFIG_NAME, config)
    return out


def _version() -> str:
    from .. import __version__

    return __version__
