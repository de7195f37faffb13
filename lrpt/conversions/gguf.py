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


# What a converted (or hub) HF model folder may hold; --overwrite replaces nothing else.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".jinja", ".txt", ".tiktoken")


def check_replaceable(out_dir: Path, input_path: Path) -> None:
    """Refuse to replace ``out_dir`` unless it is plainly an HF model folder and nothing else.

    ``--overwrite`` must never delete what lrpt did not make: not the current directory or one
    of its parents, not a folder holding the input, not a folder with any other file in it.
    """
    out, cwd, src = out_dir.resolve(), Path.cwd().resolve(), input_path.resolve()
    if out == cwd or out in cwd.parents:
        raise ConversionError(f"--overwrite will not replace {out_dir}: it is the current directory or holds it")
    if out in src.parents:
        raise ConversionError(f"--overwrite will not replace {out_dir}: it holds the input {input_path}")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ConversionError(f"--overwrite will not replace {out_dir}: it is not a model folder")
    entries = list(out_dir.iterdir())
    strays = [e.name for e in entries if not (e.is_file() and not e.is_symlink() and e.suffix in _MODEL_FILE_SUFFIXES)]
    if not (out_dir / "config.json").is_file() or strays:
        why = f"it holds {', '.join(sorted(strays)[:3])}" if strays else "it has no config.json"
        raise ConversionError(f"--overwrite will not replace {out_dir}: not an HF model folder ({why}); choose another output")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert ``gguf_path`` into an HF folder at ``out_dir``; returns ``out_dir``.

    Reading the GGUF needs transformers, so it goes through the torch backend
    (:func:`lrpt.backends.torch.model.read_gguf`); writing needs only safetensors.
    """
    import importlib.util

    from safetensors.numpy import save_file

    from ..backends import get_backend

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists():
        if not overwrite:
            raise ConversionError(f"{out_dir} already exists: remove it or choose another output folder")
        check_replaceable(out_dir, gguf_path)
    if importlib.util.find_spec("gguf") is None:
        raise ConversionError("converting a GGUF model needs the gguf package: pip install 'lrpt[torch]'")
    read = get_backend("torch").model.read_gguf(gguf_path)
    config = flat_rope(read.config)
    config["torch_dtype"] = "float32"
    config.pop("_name_or_path", None)
    with atomic_dir(out_dir, replace=overwrite) as tmp:
        save_file(read.state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        read.tokenizer.save_pretrained(str(tmp))
        if read.generation_config is not None:
            read.generation_config.save_pretrained(str(tmp))
    return out_dir
