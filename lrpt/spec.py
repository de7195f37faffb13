"""PromptSpec: what a soft prompt is, independent of any framework and of any base model.

A spec is small, hashable and JSON-serialisable. It does not hold the model width ``dim``
(d): the same spec can be instantiated on models of different widths, and an adapter file
recovers ``dim`` from its tensors. Methods (see ``../shared/DESIGN.md``):

- ``prompt``: X = P, a free n×d matrix (Lester et al. 2021).
- ``lopt1``:  X = U V with U (n, r), V (r, d) (LoPT-1, Guo et al. 2024).
- ``lopt2``:  X = σ(X0 U) V with X0 (n, d) fixed, U (d, r), V (r, d) (LoPT-2).
- ``lopa``:   Z = Z_S ∘ g(u(x) v(x)ᵀ), instance dependent (LoPA, Jain et al. 2024).

Initialisation (done by :func:`lrpt.reference.init_params`, in NumPy, from a seed; σ is the
standard deviation of the model's input-embedding matrix, 0.02 when none is given):

- ``init="normal"`` (default): P and Z_S ~ N(0, σ²); lopt1 U ~ N(0, 1/r), V ~ N(0, σ²), so X
  has the embedding scale; lopt2 X0 ~ N(0, σ²), U ~ N(0, 1/(dσ²)) (unit-variance
  pre-activations), V ~ N(0, σ²/r).
- ``init="vocab"``: rows of the embedding matrix drawn at random (Lester et al.'s
  sampled-vocabulary init). ``init="text"``: the embeddings of ``init_text``'s tokens,
  repeated or cut to n. For ``lopt1`` the target matrix is compressed to rank r by truncated
  SVD (where it has rank < r, e.g. a two-word text, the missing components start with U's column
  ~ N(0, 1/r) and V's row 0, so they train); for ``lopt2`` it becomes X0; for ``lopa`` it becomes Z_S.
- LoPA heads: first layers as PyTorch's ``nn.Linear`` default (U(±1/√h)), second layers
  N(0, 0.02²) with zero bias, so at init u vᵀ ≈ 0 and Z ≈ 0.5·Z_S with the sigmoid gate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .flags import knob

METHODS = ("prompt", "lopt1", "lopt2", "lopa")
ACTIVATIONS = ("elu", "relu", "gelu")
GATES = ("sigmoid", "add", "max")
ENCODERS = ("base", "embed")
POOLINGS = ("mean", "last")
INITS = ("normal", "vocab", "text")
STATIC_METHODS = ("prompt", "lopt1", "lopt2")
# What `lrpt train` uses per method where no flag (or -c config key) says otherwise; ``lr`` is also
# what lrpt.train uses when TrainConfig.lr is unset. LoPA's h′ = 128 and r = 2 keep it under LoRA
# r=8 (q, v)'s parameters (313,000 against 460,800 on SmolLM2). The lrs come from the 4-task ×
# 3-seed grids (benchmarks/accuracy.py; RESULTS.md "Accuracy on four tasks"): lopa at 1e-3 had higher
# means than its earlier 3e-3; lopt1 at 1e-1 had higher means than 3e-2, but under deterministic kernels
# one SST-2 seed fell to chance at it (on an H200 and again on an H100, where lrpt.retry retrained
# it) and its RTE and CB seeds spread over 11-12 points; at 5e-2 no seed of any task is more than 1.2
# points under its mean, RTE and CB means rose (+2.6, +0.6) and SST-2 and TREC fell (-0.4, -0.6) (RESULTS.md "lopt1
# at lr 5e-2"). At 2,000 steps (the floor below) lr 3e-2 beat 5e-2 on SST-2 (+0.7), RTE (+1.7) and TREC (+0.8)
# and was 0.6 under on CB (a third of one of its 56 rows), +0.65 on the four tasks' mean; 2e-2 was lower on TREC
# and level on RTE (RESULTS.md "lopt1 at lr 3e-2"). Vocabulary or text init and lopt1 at 3e-1 did not hold on
# every task. They still do not beat PEFT's best on every task. ``average`` (the tail average of
# lrpt.average, a TrainConfig field like ``lr``): for lopt1, averaging the last half of the steps
# raised CB by 6.0 points (every seed by 5-7) and moved the other three tasks' means by -0.1 to +0.4 in the
# same run (RESULTS.md "tail averaging"); the other methods were not measured with it, so keep 0.
# ``min_steps`` (TrainConfig's floor on an auto-length run, lrpt.trainer.AUTO_MIN_STEPS where unset):
# lopt1 trains at least 2,000 steps. From 1,000 to 2,000 its 3-seed means rose on RTE, CB and TREC in
# both runs that compared them (lr 1e-1: +0.5 / +2.4 / +1.0; lr 5e-2, deterministic: +2.6 / +2.4 / +1.5)
# and moved SST-2 by +0.1 and -0.4 (RESULTS.md "lopt1 at 2,000 steps"); only small data is affected
# (32,000 rows at batch 16 are one pass). The other methods were not run at 2,000 steps: 1,000.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt": {"lr": 3e-2},
    "lopt1": {"rank": 4, "lr": 3e-2, "average": 0.5, "min_steps": 2000},
    "lopt2": {"rank": 4, "lr": 3e-2},
    "lopa": {"rank": 2, "head_hidden": 128, "lr": 1e-3},
}
TRAIN_DEFAULTS = ("lr", "average", "min_steps")  # the keys of METHOD_DEFAULTS that are TrainConfig's, not PromptSpec's


@dataclass(frozen=True)
class PromptSpec:
    """The backend-agnostic description of a soft prompt.

    Fields that do not apply to ``method`` keep their defaults and are ignored.
    """

    method: str = knob("lopt1", "prompt method", choices=METHODS)
    n_tokens: int = knob(20, "prompt length n", flag="--tokens")
    rank: int | None = knob(None, "rank r of lopt1, lopt2 and lopa (required for them)")
    activation: str = knob("elu", "lopt2's activation σ (the LoPT paper found ELU best)", choices=ACTIVATIONS)
    gate: str = knob("sigmoid", "LoPA's gate g combining the shared and instance parts", choices=GATES)
    encoder: str = knob("base", "LoPA's encoder: the frozen model (base) or the token embeddings", choices=ENCODERS)
    pooling: str = knob("mean", "LoPA's pooling of the encoder states over real tokens", choices=POOLINGS)
    head_hidden: int = knob(256, "LoPA's hidden width h′ of the u and v heads")
    dropout: float = knob(0.1, "LoPA's head dropout (training only)")
    init: str = knob("normal", "initialisation: N(0, σ² of the embeddings), vocabulary rows, or text", choices=INITS)
    init_text: str | None = knob(None, "text whose token embeddings start the prompt (with --init text)")

    # -- validation -------------------------------------------------------------------------

    def __post_init__(self) -> None:
        # A spec that exists is a possible one (what the model's width alone decides waits for
        # validate(dim)): an impossible one failed only later, at init_prompt or save.
        self.validate()

    def validate(self, dim: int | None = None) -> PromptSpec:
        """Reject impossible specs with one clear error; returns ``self`` for chaining.

        ``dim`` (the model width d) is optional: without it only the checks that do not
        depend on the model run.
        """
        if self.method not in METHODS:
            raise SpecError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        _check_int("n_tokens", self.n_tokens, low=1)
        if dim is not None:
            _check_int("dim", dim, low=1)
        if self.method != "prompt":
            if self.rank is None:
                raise SpecError(f"method {self.method!r} needs a rank: pass rank=R (R >= 1)")
            _check_int("rank", self.rank, low=1)
            if dim is not None or self.method == "lopt1":  # lopt1's n_tokens bound is known without the model
                if self.method != "lopt1":
                    limit, what = dim, "dim"
                elif dim is None:
                    limit, what = self.n_tokens, "n_tokens"
                else:
                    limit, what = min(self.n_tokens, dim), "min(n_tokens, dim)"
                if self.rank > limit:
                    raise SpecError(
                        f"rank {self.rank} is larger than {what} = {limit} for {self.method}:"
                        f" choose a rank between 1 and {limit}"
                    )
        elif self.rank is not None:  # unused by prompt, but a file's value must still be a rank
            _check_int("rank", self.rank, low=1)
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"unknown activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.gate not in GATES:
            raise SpecError(f"unknown gate {self.gate!r}: use one of {', '.join(GATES)}")
        if self.encoder not in ENCODERS:
            raise SpecError(f"unknown encoder {self.encoder!r}: use one of {', '.join(ENCODERS)}")
        if self.pooling not in POOLINGS:
            raise SpecError(f"unknown pooling {self.pooling!r}: use one of {', '.join(POOLINGS)}")
        _check_int("head_hidden", self.head_hidden, low=1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise SpecError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise SpecError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise SpecError(f"unknown init {self.init!r}: use one of {', '.join(INITS)}")
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise SpecError(f"init_text must be text, got {type(self.init_text).__name__}")
        if self.init == "text" and not self.init_text:
            raise SpecError('init="text" needs init_text: pass the text to start from')
        return self

    # -- shapes -----------------------------------------------------------------------------

    @property
    def is_static(self) -> bool:
        """True when the prompt does not depend on the input (its KV cache can be reused)."""
        return self.method in STATIC_METHODS

    def param_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of the adapter file by canonical name, with its shape."""
        self.validate(dim)
        n, r, d, h2 = self.n_tokens, self.rank, dim, self.head_hidden
        if self.method == "prompt":
            return {"prompt_embeddings": (n, d)}
        if self.method == "lopt1":
            return {"lopt.U": (n, r), "lopt.V": (r, d)}
        if self.method == "lopt2":
            return {"lopt.X0": (n, d), "lopt.U": (d, r), "lopt.V": (r, d)}
        # lopa: the encoder output width h equals the model width d for both encoders.
        shapes: dict[str, tuple[int, ...]] = {"lopa.Z_S": (n, d)}
        for head, k in (("u", n * r), ("v", d * r)):
            shapes[f"lopa.{head}.0.weight"] = (h2, d)
            shapes[f"lopa.{head}.0.bias"] = (h2,)
            shapes[f"lopa.{head}.1.weight"] = (k, h2)
            shapes[f"lopa.{head}.1.bias"] = (k,)
        return shapes

    def trainable_names(self) -> tuple[str, ...]:
        """Names of the trained tensors, in file order (``lopt.X0`` is stored but fixed)."""
        dim = max(self.rank or 1, self.n_tokens)  # any valid width gives the same names
        return tuple(k for k in self.param_shapes(dim) if k != "lopt.X0")

    def param_count(self, dim: int) -> int:
        """Number of trainable parameters, as in DESIGN.md's table."""
        shapes = self.param_shapes(dim)
        return sum(math.prod(shapes[name]) for name in self.trainable_names())

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> PromptSpec:
        """Build and validate a spec from a dict; unknown or mistyped keys are errors."""
        if not isinstance(data, dict):
            raise SpecError(f"spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec field(s) {', '.join(unknown)}: this lrpt knows {', '.join(sorted(known))}")
        if "method" not in data:
            raise SpecError("spec has no 'method': it must name one of " + ", ".join(METHODS))
        for key in ("method", "activation", "gate", "encoder", "pooling", "init"):
            if key in data and not isinstance(data[key], str):
                raise SpecError(f"spec field {key!r} must be a string, got {data[key]!r}")
        if data.get("init_text") is not None and not isinstance(data["init_text"], str):
            raise SpecError(f"spec field 'init_text' must be a string or null, got {data['init_text']!r}")
        spec = cls(**data)
        return spec.validate()

    @classmethod
    def from_json(cls, text: str) -> PromptSpec:
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise SpecError(f"spec is not valid JSON ({str(exc)[:200]})") from None
        return cls.from_dict(data)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SpecError(f"{name} must be >= {low}, got {value}")
