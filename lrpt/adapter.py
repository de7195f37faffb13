"""Adapter: a spec, its named float32 tensors, its task and base model; format v1 on disk.

An adapter directory holds two files:

- ``adapter_config.json``: ``{"format": "lrpt", "format_version": 1, "spec": {...},
  "dtype": "float32", "task": {...} | null, "base_model": {...} | null,
  "created_by": {"backend", "lrpt_version"}, "weights_sha256": <hex>}``; for method ``prompt`` also the fields of
  an HF PEFT ``PROMPT_TUNING`` config, so stock PEFT loads the directory as is.
- ``adapter_model.safetensors``: the tensors by canonical name (float32 unless exported
  smaller with ``dtype``), with ``__metadata__ = {"format": "lrpt", "format_version": "1",
  "spec": <json>}`` so the file alone says what it is.

Loading checks everything and raises one :class:`~lrpt.errors.LrptError` per defect.
Saving is atomic: a fresh directory is built aside and renamed into place; an existing one
has each file replaced atomically, weights first (a crash in between is caught on load: the
config names the SHA-256 of the weights file it was saved with; files without it, from before
that key, are checked by the spec in both files only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .basemodel import BaseModelInfo
from .errors import AdapterFormatError, BaseModelMismatchError, LrptError, SpecError
from .fileio import atomic_dir, atomic_write, atomic_write_json, encode_safetensors, read_json, read_safetensors
from .reference import init_params, materialize
from .spec import PromptSpec
from .tasks import Task

FORMAT = "lrpt"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
DTYPE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


def dtype_name(name: str, error: type[Exception] = AdapterFormatError) -> str:
    """The canonical name (float32, float16, bfloat16) of a dtype name or alias; ``error`` otherwise,
    so a typo is one line naming the choices, whichever layer (save, export, a backend's load) read it."""
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise error(f"unsupported dtype {name!r}: use float32, float16 or bfloat16 (or fp32, fp16, bf16)")
    return canonical

# The dimension-carrying tensor of each method: its second axis is the model width d.
_DIM_TENSOR = {"prompt": "prompt_embeddings", "lopt1": "lopt.V", "lopt2": "lopt.V", "lopa": "lopa.Z_S"}


@dataclass
class Adapter:
    """A soft prompt ready to save, load, inspect or hand to a backend."""

    spec: PromptSpec
    params: dict[str, np.ndarray]
    task: Task | None = None
    base_model: BaseModelInfo | None = None
    created_by: dict[str, Any] = field(default_factory=lambda: {"backend": None, "lrpt_version": __version__})

    @classmethod
    def create(
        cls,
        spec: PromptSpec,
        dim: int,
        seed: int = 0,
        embedding_matrix: np.ndarray | None = None,
        init_token_ids: list[int] | None = None,
        task: Task | None = None,
        base_model: BaseModelInfo | None = None,
    ) -> Adapter:
        """A freshly initialised adapter (the same seed gives the same tensors everywhere)."""
        params = init_params(spec, dim, seed, embedding_matrix, init_token_ids)
        adapter = cls(spec, params, task, base_model)
        adapter.validate()
        return adapter

    # -- properties -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """The model width d, read off the tensors."""
        t = self.params.get(_DIM_TENSOR[self.spec.method])
        if t is None or np.ndim(t) != 2:
            raise AdapterFormatError(f"adapter has no 2-D tensor {_DIM_TENSOR[self.spec.method]!r}")
        return int(np.shape(t)[1])

    @property
    def param_count(self) -> int:
        return self.spec.param_count(self.dim)

    def check_model(self, info: BaseModelInfo, force: bool = False) -> None:
        """Refuse (:class:`BaseModelMismatchError`) a model, described by ``info``, this adapter cannot
        run on: the width of its rows always (a file may name no base model), and where it names one,
        that model's sizes and fingerprint (:meth:`BaseModelInfo.check_compatible`; ``force`` skips
        the fingerprint)."""
        if self.base_model is not None:
            self.base_model.check_compatible(info, force=force)
        if info.hidden_size is not None and self.dim != info.hidden_size:
            raise BaseModelMismatchError(f"the adapter's prompt rows are {self.dim} wide, but this model's width is"
                                         f" {info.hidden_size}: use an adapter made for this model")

    def materialize(self, encoding: np.ndarray | None = None) -> np.ndarray:
        """The prompt matrix by the NumPy reference (see :func:`lrpt.reference.materialize`)."""
        return materialize(self.spec, self.params, encoding)

    # -- validation -------------------------------------------------------------------------

    def validate(self, where: str = "adapter") -> Adapter:
        """Check tensor names, shapes and values against the spec; returns ``self``."""
        self.spec.validate()
        dim = self.base_model.hidden_size if self.base_model and self.base_model.hidden_size else None
        if dim is None:
            dim = self.dim if _DIM_TENSOR[self.spec.method] in self.params else None
        if dim is None:
            raise AdapterFormatError(f"{where}: missing tensor {_DIM_TENSOR[self.spec.method]!r}")
        try:
            expected = self.spec.param_shapes(dim)
        except SpecError as exc:
            raise AdapterFormatError(f"{where}: spec does not fit width {dim}: {exc}") from None
        missing = [k for k in expected if k not in self.params]
        extra = sorted(set(self.params) - set(expected))
        if missing:
            raise AdapterFormatError(f"{where}: missing tensor(s) {', '.join(missing)} for method {self.spec.method}")
        if extra:
            raise AdapterFormatError(f"{where}: unexpected tensor(s) {', '.join(extra)} for method {self.spec.method}")
        for name, shape in expected.items():
            arr = self.params[name]
            if tuple(np.shape(arr)) != shape:
                raise AdapterFormatError(
                    f"{where}: tensor {name!r} has shape {tuple(np.shape(arr))}, expected {shape}"
                    f" (n_tokens={self.spec.n_tokens}, rank={self.spec.rank}, dim={dim})"
                )
            if not np.all(np.isfinite(arr)):
                raise AdapterFormatError(f"{where}: tensor {name!r} contains NaN or Inf: the adapter is unusable")
        return self

    # -- saving -----------------------------------------------------------------------------

    def config_dict(self, dtype: str = "float32") -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "dtype": dtype,
            "task": self.task.to_dict() if self.task else None,
            "base_model": self.base_model.to_dict() if self.base_model else None,
            "created_by": self.created_by,
        }
        if self.spec.method == "prompt":
            cfg.update(peft_fields(self.spec, self.dim, self.base_model))
        return cfg

    def save(self, path: str | Path, dtype: str = "float32") -> Path:
        """Write format v1 to directory ``path`` atomically; returns the path.

        ``dtype`` (float32, float16 or bfloat16) shrinks the file on request; loading
        always gives float32 back.
        """
        dtype = dtype_name(dtype)
        self.validate()
        path = Path(path)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": self.spec.to_json()}
        weights = encode_safetensors(self.params, meta, dtype)
        # the weights' digest ties the two files together: a save into an existing directory replaces
        # them one at a time, and a crash between the renames must not load as one adapter
        config = {**self.config_dict(dtype), "weights_sha256": hashlib.sha256(weights).hexdigest()}
        if path.exists() and not path.is_dir():
            raise AdapterFormatError(f"{path} exists and is not a directory: choose another output path")
        if path.is_dir():
            atomic_write(path / WEIGHTS_NAME, weights)
            atomic_write_json(path / CONFIG_NAME, config)
            return path
        with atomic_dir(path) as tmp:
            atomic_write(tmp / WEIGHTS_NAME, weights)
            atomic_write_json(tmp / CONFIG_NAME, config)
        return path

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Load and fully validate an adapter directory (tensors come back float32).

        Every defect is an :class:`~lrpt.errors.LrptError`. The checks below name each defect;
        the net around them turns whatever a hostile file still finds (a type the checks did
        not foresee) into one too, so no caller ever sees a traceback from a file's content.
        """
        try:
            return cls._load(Path(path))
        except LrptError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
            raise AdapterFormatError(f"{path} is not a valid adapter ({type(exc).__name__}: {str(exc)[:200]})") from None

    @classmethod
    def _load(cls, path: Path) -> Adapter:
        if not path.exists():
            raise AdapterFormatError(f"adapter directory {path} does not exist")
        if not path.is_dir():
            raise AdapterFormatError(f"{path} is not a directory: pass the adapter directory")
        config = read_config(path)
        spec = _spec_from_config(config, path)
        dtype = config.get("dtype", "float32")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise AdapterFormatError(f"{path / CONFIG_NAME}: unknown dtype {dtype!r}")
        task = _parse_optional(config, "task", Task.from_dict, path)
        base = _parse_optional(config, "base_model", BaseModelInfo.from_dict, path)
        created_by = config.get("created_by") or {}
        if not isinstance(created_by, dict):
            raise AdapterFormatError(f"{path / CONFIG_NAME}: 'created_by' must be an object")

        weights_path = path / WEIGHTS_NAME
        tensors, meta, stored = read_safetensors(weights_path)
        if meta.get("format") != FORMAT or "spec" not in meta:
            raise AdapterFormatError(f"{weights_path} has no lrpt metadata: it was not written by lrpt")
        if meta.get("format_version") != str(config["format_version"]):
            raise AdapterFormatError(
                f"{weights_path} says format_version {meta.get('format_version')} but the config says"
                f" {config['format_version']}: the directory mixes two saves"
            )
        try:
            meta_spec = PromptSpec.from_json(meta["spec"])
        except LrptError as exc:
            raise AdapterFormatError(f"{weights_path}: metadata spec is invalid ({exc})") from None
        if meta_spec != spec:
            raise AdapterFormatError(
                f"{path}: the spec in {CONFIG_NAME} disagrees with the one in {WEIGHTS_NAME}:"
                " the directory mixes two saves; save the adapter again"
            )
        bad = sorted(k for k, code in stored.items() if code != DTYPES[dtype])
        if bad:
            raise AdapterFormatError(
                f"{weights_path}: tensor {bad[0]!r} is {stored[bad[0]]}, but the config says {dtype}"
            )
        adapter = cls(spec, tensors, task, base, created_by).validate(where=str(path))
        # last, so a damaged file is named by its own defect; this catches a valid mix of two saves
        digest = config.get("weights_sha256")  # absent in older files: nothing to compare
        if digest is not None and digest != _sha256(weights_path):
            raise AdapterFormatError(
                f"{weights_path} is not the file {CONFIG_NAME} was saved with (weights_sha256 differs):"
                " the directory mixes two saves; save the adapter again"
            )
        return adapter


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def peft_fields(spec: PromptSpec, dim: int, base: BaseModelInfo | None) -> dict[str, Any]:
    """The HF PEFT ``PromptTuningConfig`` fields, so PEFT loads a ``prompt`` adapter as is.

    PEFT refuses a TEXT init without a tokenizer path, so a text-initialised prompt says TEXT only
    where the base model's name is known; RANDOM otherwise (PEFT loads the saved rows either way)."""
    text = spec.init == "text" and base is not None and bool(base.name_or_path)
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": spec.n_tokens,
        "token_dim": dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        "prompt_tuning_init": "TEXT" if text else "RANDOM",
        "prompt_tuning_init_text": spec.init_text if text else None,
        "tokenizer_name_or_path": base.name_or_path if text else None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": base.name_or_path if base else None,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def read_config(path: Path) -> dict[str, Any]:
    """Read and check the top level of ``adapter_config.json`` of an lrpt adapter."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise AdapterFormatError(f"{cfg_path} is missing: {path} is not an adapter directory")
    config = read_json(cfg_path, "adapter config")
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        if "peft_type" in config:
            raise AdapterFormatError(
                f"{path} is an HF PEFT {config['peft_type']} adapter, not an lrpt one:"
                f" convert it with `lrpt convert {path} OUT --to lrpt`"
            )
        raise AdapterFormatError(f"{cfg_path}: 'format' must be \"lrpt\", got {config.get('format')!r}")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterFormatError(f"{cfg_path}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{path} uses adapter format v{version}, newer than this lrpt ({__version__}) reads"
            f" (v{FORMAT_VERSION}): upgrade lrpt"
        )
    if version < 1:
        raise AdapterFormatError(f"{cfg_path}: invalid format_version {version}")
    return config


def _spec_from_config(config: dict[str, Any], path: Path) -> PromptSpec:
    if "spec" not in config:
        raise AdapterFormatError(f"{path / CONFIG_NAME} has no 'spec'")
    try:
        return PromptSpec.from_dict(config["spec"])
    except TypeError as exc:
        raise AdapterFormatError(f"{path / CONFIG_NAME}: bad spec ({exc})") from None


def _parse_optional(config: dict[str, Any], key: str, parse: Any, path: Path) -> Any:
    value = config.get(key)
    if value is None:
        return None
    try:
        return parse(value)
    except LrptError as exc:
        raise AdapterFormatError(f"{path / CONFIG_NAME}: bad '{key}' ({exc})") from None
