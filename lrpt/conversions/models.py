"""Base-model conversions: a GGUF file → an HF safetensors folder both backends load.

transformers reads GGUF (dequantising to float32) but refuses to ``save_pretrained`` such a
model, and mlx-lm reads HF folders. So we write the folder ourselves: ``config.json`` (with
flat ``rope_theta``, as hub configs and mlx-lm expect), the tokenizer files, and the weights
as one float32 ``model.safetensors`` (tied output embeddings stored once). The folder is
built aside and renamed into place, so an interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConversionError
from ..fileio import atomic_dir


def flat_rope(config: dict) -> dict:
    """Copy ``rope_parameters`` (transformers ≥ 5) to the flat keys mlx-lm and older tools read."""
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type") not in (None, "default") and "rope_scaling" not in config:
        config["rope_scaling"] = dict(rope)
    return config


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert ``gguf_path`` into an HF folder at ``out_dir``; returns ``out_dir``."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConversionError("converting a GGUF model needs torch and transformers: pip install 'lrpt[torch]'") from None
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConversionError("converting a GGUF model needs the gguf package: pip install 'lrpt[torch]'") from None
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} already exists: remove it or choose another output folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(f"cannot read {gguf_path} as a GGUF model ({first})") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    config = flat_rope(model.config.to_dict())
    config["torch_dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    config.pop("_name_or_path", None)
    with atomic_dir(out_dir, replace=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
    return out_dir
