"""A static prompt shared by every row of a batch runs once: the shared-prefix path, decided here.

For ``prompt``, ``lopt1`` and ``lopt2`` the prompt is the same matrix for every row and sits at
positions 0..n−1, so its hidden states are the same in every layer and every row. The shared
path runs it once (batch 1) and lets every row's tokens attend to its keys and values, expanded
across the batch; gradients flow back through the prefix once. It is exact: the same attention
over the same keys at the same positions as the plain path, which runs ``[prompt][tokens]`` for
every row (DESIGN.md, "Positions and padding"), so results differ by float rounding only. It saves
the prompt's share, n/(n+T), of the per-token work (projections, MLPs); attention still reads
n+T keys per token, and each layer's keys are still written per row where the framework
concatenates the prompt's keys with the tokens'.

Where it applies is decided here, once for both backends: one static prompt for all rows (LoPA's
prompts differ per row; mixed adapters give rows different prompts), a right-padded batch (see
:func:`lrpt.layout.after_prefix`; scoring and training batches are), a backend that runs this
model's blocks behind a prefix exactly (``be.shares_prefix(model)``), and the caller's switch
(``TrainConfig.shared_prefix``, ``shared_prefix=`` of the scoring functions). The backend
supplies only the framework work, ``be.forward_after_prefix``.

Where it pays (the switch's default, None: :func:`prefix_pays`): the shared path runs every block
twice, the prompt at batch 1 and then the rows, so it launches twice the kernels. Measured on an
H200 at the Llama-3.2-1B shape (benchmarks/RESULTS.md): compiled with CUDA graphs, where launches
cost nothing, it is the faster step (in two passes 1.14× the hand-written floor against 0.98× for
the plain path at 32 × 48 tokens, 1.04× against 0.98× at 16 × 256); run eagerly on CUDA, where this model is
launch-bound, the doubled launches made the step 2× slower. So: on for a step compiled whole,
off for eager CUDA (training and scoring), on elsewhere (CPU, MLX), where the arithmetic it saves
is the cost (measured only on small CPU models so far). The training step's own rule
(:class:`lrpt.training.Training`) also leaves it off for compiled blocks and for CUDA graphs, where
the full SST-2 epoch trained in 60.9 s with it against 36.5 s without (SmolLM2-135M, H200).

How the torch backend runs it in a step compiled whole: packed with the rows into one pass
(:mod:`lrpt.backends.torch.packed`), so each block reads its weights once, not once for the
prompt's batch-1 pass and again for the rows: 1.29× the floor at 32 × 48 tokens (13.88 ms against
15.73 ms for the two passes), 1.09× at 16 × 256 (34.59 ms against 36.25 ms), same runs. Everywhere else, and for models packing does not
implement, the two passes of ``be.forward_after_prefix``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .layout import Batch, after_prefix
from .methods import prompt_list


def prefix_pays(be, model) -> bool:
    """Auto (eager): the shared path everywhere but on CUDA, where eager steps are launch-bound."""
    return be.device_kind(model) != "cuda"


def uses_prefix(be, model, spec, enabled: bool | None = None) -> bool:
    """Whether a prompt of ``spec`` takes the shared path on ``model``: a static prompt, the switch
    (``enabled`` None: where it pays, :func:`prefix_pays`), and a backend that runs the model so."""
    if enabled is None:
        enabled = prefix_pays(be, model)
    return bool(enabled) and why_no_prefix(be, model, spec) is None


def why_no_prefix(be, model, spec, config=None) -> str | None:
    """Why a prompt of ``spec`` cannot take the shared path on ``model`` (None: it can), in a run of
    ``config`` where given (a TrainConfig, whose --fsdp / --grad-checkpoint act on the model only once
    its step is built): what :func:`uses_prefix` asks, and what a refused ``--shared-prefix`` says."""
    if not spec.is_static:
        return f"{spec.method}'s prompt depends on each input, so no two rows share it"
    if spec.n_tokens == 0:
        return "the prompt has no tokens"
    for flag in ("fsdp", "grad_checkpoint"):  # their blocks cannot run behind the prompt's cache (shares_prefix)
        if getattr(config, flag, False):
            return f"--{flag.replace('_', '-')} runs every block on the plain path"
    if not be.shares_prefix(model):
        return f"the {be.NAME} backend runs this model on the plain path (its layers are not all attention)"
    return None


def shared_prompt(be, model, prompt: Any, which: Sequence[int] | None, batch: Batch,
                  enabled: bool | None = None) -> Any | None:
    """The one static prompt module every row of ``batch`` carries, when the shared path applies; else None."""
    if prompt is None or batch.left_padded:
        return None
    chosen = {0} if which is None else set(which)
    if len(chosen) != 1:
        return None
    p = prompt_list(prompt)[chosen.pop()]
    return p if uses_prefix(be, model, p.spec, enabled) else None


def prompted_hidden(be, model, prompt: Any, which: Sequence[int] | None, inputs: Batch, batch: Batch,
                    repeat: int = 1, shared: bool | None = None) -> tuple[Any, int]:
    """Last hidden states of ``batch`` behind its prompts, and the shift of packed indices into them.

    ``inputs`` is what LoPA encodes (the input alone); ``batch`` is what runs (its rows are
    ``repeat`` consecutive copies per row of ``inputs``: multi-token label words). Plain path: the
    (B, W, d) states of the packed batch, shift 0. Shared path: the (B, W−n, d) states of the
    tokens only, shift n (packed index i is at i − n).
    """
    static = shared_prompt(be, model, prompt, which, batch, shared)
    if static is not None:
        suffix = after_prefix(batch, static.spec.n_tokens)
        return be.forward_after_prefix(model, be.ops.float32(static()), suffix), suffix.n
    rows = be.prompt_rows(model, prompt, inputs, which)
    if repeat > 1:
        rows = be.ops.repeat_rows(rows, repeat)
    return be.forward_hidden(model, rows, batch), 0
