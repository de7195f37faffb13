"""The training step's bookkeeping, written once: what a batch is, what the loss is, what state a
checkpoint holds. A backend supplies only its ``Stepper`` (autograd, AdamW, compilation).

Checkpoints hold one schema on every backend, so a run started with ``--backend torch`` resumes
with ``--backend mlx`` and the other way round: the AdamW moments as ``{param}.exp_avg`` and
``{param}.exp_avg_sq`` (canonical parameter names, float32) and ``{"schema": 1, "adam_step": t}``;
the trainer adds the tail average's sums (``{param}.tail_sum``, :mod:`lrpt.average`) beside them.
Data order comes from seeded generators (:func:`lrpt.data.epoch_batches`) and dropout is reseeded
from (seed, step) at every step, so no random-generator state needs saving.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .adapter import Adapter
from .basemodel import loaded_context
from .data import Encoded, chance_warning, check_rows, encode_examples, fit_to_context, majority_baseline
from .errors import SpecError, TrainingError
from .layout import completion_arrays, scoring_arrays, to_arrays
from .prefix import uses_prefix, why_no_prefix
from .probe import MIN_ROWS, probe_lr
from .retry import collapse_reason
from .scoring import classification_metrics, completion_metrics, evaluate, task_loss
from .shapes import Shape, ShapePlan, choose_compile
from .tasks import Task
from .tokens import label_token_ids, target_tokenize_fn, tokenize_fn
from .trainer import TRAIN_CONFIG_FILE, TrainConfig, TrainResult, plan, resumed_floor, run_micro_batches, run_training

CHECKPOINT_SCHEMA = 1


class Training:
    """:class:`lrpt.trainer.TrainOps` for any backend: the core's loss and layouts, the backend's Stepper."""

    def __init__(self, be, model, tokenizer, prompt, task: Task, train_data: list[Encoded],
                 eval_data: list[Encoded] | None, config: TrainConfig):
        config = config.for_method(prompt.spec.method)
        self.be, self.model, self.tokenizer, self.prompt, self.task = be, model, tokenizer, prompt, task
        self.train_data, self.eval_data, self.config = train_data, eval_data or [], config
        self.lengths = [len(e.ids) + (len(e.target) if isinstance(e.target, list) else 0) for e in train_data]
        hf = be.hf_tokenizer(tokenizer)
        self.pad_id = hf.pad_token_id or 0
        self.label_ids = label_token_ids(hf, task.label_words) if task.kind == "classification" else None
        self.asarray = be.asarray_for(model)
        self.base = be.base_model_info(model)
        self.t = 0  # optimizer steps taken
        # Every micro-batch of a compiled run comes in one of a few fixed shapes (lrpt.shapes), each
        # compiled once; whether to compile at all is decided from how many steps each shape gets.
        targets = [len(e.target) for e in train_data] if task.kind == "completion" else None
        self.shapes = ShapePlan(self.lengths, prompt.spec.n_tokens, config.batch_size, config.pad_to_multiple,
                                targets) if train_data else None
        counts = self.shapes.count(run_micro_batches(self.lengths, config)) if self.shapes else Counter()
        spec = prompt.spec
        self.compile_choice = choose_compile(config.compile, config.compile_mode, be.NAME, be.device_kind(model),
                                             config.fsdp, counts, config.compile_scope,
                                             spec.method == "lopa" and spec.encoder == "base",
                                             capturable=not (spec.method == "lopa" and spec.dropout > 0),
                                             processes=int(os.environ.get("WORLD_SIZE", "1")))
        # The shared prefix pays in a step compiled whole (fused kernels, no launch cost); eager, where
        # it pays (lrpt.prefix). Not with compiled blocks (a block behind a cache compiles once per
        # layer), nor recorded as CUDA graphs: on the full SST-2 epoch (H200, SmolLM2-135M) the graphs
        # trained in 36.5 s on the plain path and 60.9 s with the shared prefix (benchmarks/RESULTS.md).
        choice = self.compile_choice
        why = why_no_prefix(be, model, spec, config) if config.shared_prefix else None
        if why:
            raise TrainingError(f"--shared-prefix cannot apply: {why}: drop the flag (auto takes the plain path)")
        self.shared = config.shared_prefix if config.shared_prefix is not None else (
            (choice.scope == "step") if choice.compiled else None)
        scope = choice.scope if choice.compiled and be.NAME == "torch" else config.compile_scope
        step_config = replace(config, compile=choice.compiled, compile_mode=choice.mode, compile_scope=scope)
        self.stepper = be.Stepper(model, prompt, self.loss, step_config, shapes=max(len(counts), 1),
                                  auto=config.compile is None or config.compile_scope is None,
                                  shared=uses_prefix(be, model, spec, self.shared))
        self.world = self.stepper.world  # (rank, size): (0, 1) unless launched data parallel
        if self.shapes is not None:  # each rank pads its share of a batch to the same row count
            self.shapes.rows = -(-config.batch_size // self.world[1])

    def prefix_note(self) -> str:
        """How a static prompt runs in this run's training step (lrpt.prefix), for the start-up line."""
        spec = self.prompt.spec
        if not spec.is_static:
            return "; the prompt made for each input, in its row (plain path)"
        if spec.n_tokens == 0:
            return ""
        on = uses_prefix(self.be, self.model, spec, self.shared)
        if not on:
            return "; static prompt in every row (plain path)"
        return "; static prompt once per batch (shared prefix" + (", packed with the rows)" if self.stepper.packs else ")")

    def loss(self, arrays: dict[str, Any]):
        """The loss of one prepared batch (what the Stepper differentiates, and may compile)."""
        k = len(self.label_ids) if self.label_ids is not None else 0
        return task_loss(self.be, self.model, self.prompt, self.task, arrays, k, self.shared)

    def prepare(self, rows: list[Encoded], shape: Shape | None = None) -> dict[str, Any]:
        """One batch laid out on the host, then moved to the backend once, as a flat pytree.

        With ``shape`` (a compiled step) the batch has exactly that shape: extra rows are copies of
        the first (real data, so every value stays finite) that weigh 0 in the loss, and extra
        positions are padding; the loss and gradients are those of ``rows`` alone."""
        n, ptm = self.prompt.spec.n_tokens, self.config.pad_to_multiple
        real = len(rows)
        tokens = None
        if shape is not None:
            if real > shape.rows:
                raise TrainingError(f"a micro-batch of {real} rows does not fit the step's {shape.rows}")
            rows = rows + [rows[0]] * (shape.rows - real)
            tokens = shape.tokens
        if self.task.kind == "classification":
            host = scoring_arrays([r.ids for r in rows], self.label_ids, [n] * len(rows), self.pad_id, ptm, tokens)
            host["labels"] = np.array([r.target for r in rows], np.int64)
            if shape is not None:  # the mean over the real rows, as a weighted sum
                host["row_weight"] = np.where(np.arange(len(rows)) < real, 1.0 / real, 0.0).astype(np.float32)
        else:
            host = completion_arrays([r.ids for r in rows], [r.target for r in rows], n, self.pad_id, ptm, tokens,
                                     shape.targets if shape is not None else None)
            host["weight"][real:] = 0.0  # copied rows count no target tokens
        return to_arrays(host, self.asarray)

    def _units(self, idx: list[int]) -> int:
        """What a batch's loss averages over: rows (classification) or target tokens (completion)."""
        if self.task.kind == "classification":
            return len(idx)
        return sum(len(self.train_data[i].target) for i in idx)

    def step(self, micro_batches: list[list[int]], lr: float) -> Any:
        """One optimizer step. Data parallel: this rank's contiguous share of every micro-batch,
        its loss weighted by its share of the batch's units, so the summed gradients of all ranks
        equal one process's gradient of the whole global batch."""
        self.prompt.train()
        rank, size = self.world
        batches, weights = [], []
        for idx in micro_batches:
            mine = shard(idx, rank, size)
            if mine or self.stepper.lockstep:  # lockstep (FSDP): a rank with no rows runs one row at weight 0
                rows = mine or idx[:1]
                shape = self.shapes.shape(idx) if self.compile_choice.compiled else None
                batches.append(self.prepare([self.train_data[i] for i in rows], shape))
                weights.append(self._units(mine) / max(self._units(idx), 1) / len(micro_batches))
        handle = self.stepper.step(batches, weights, lr, seed=self.config.seed * 1_000_003 + self.t)
        self.t += 1
        return handle

    def loss_value(self, handles: list[Any]) -> float:
        return self.stepper.loss_value(handles)

    def finite(self) -> bool:
        return self.stepper.finite()

    def close(self) -> None:
        """The run is over: the backend undoes what it changed on the model for it."""
        self.stepper.close()

    def evaluate(self, data: list[Encoded] | None = None) -> dict[str, float]:
        """Metrics on the evaluation rows (or ``data``); data parallel: each rank scores its share, all gather."""
        data = self.eval_data if data is None else data
        if not data:
            return {}
        with self.stepper.kernels():  # the run's kernels, as its steps: a seed fixes what it picks too
            return self._evaluate(data)

    def _evaluate(self, data: list[Encoded]) -> dict[str, float]:
        rank, size = self.world
        if size == 1:
            return evaluate(self.model, self.tokenizer, self.prompt, self.task, data,
                            self.config.eval_batch_size, self.config.shared_prefix)[0]
        mine = shard(data, rank, size)
        run = mine
        if self.stepper.lockstep:  # FSDP: the same number of batches on every rank
            width = len(shard(data, 0, size))
            run = mine + [data[0]] * (width - len(mine))
        _, scores = evaluate(self.model, self.tokenizer, self.prompt, self.task, run,
                             self.config.eval_batch_size, self.config.shared_prefix) if run else ({}, None)
        part = scores[: len(mine)] if scores is not None else None
        if self.task.kind == "classification":
            k = len(self.task.label_words)
            every = self._gather(part if part is not None else np.zeros((0, k), np.float32), len(data))
            return classification_metrics(self.task, [r.target for r in data], every)
        every = self._gather(part if part is not None else np.zeros((0, 2)), len(data))
        return completion_metrics(every)

    def collapsed(self) -> str | None:
        """Why the prompt as it is now answers no better than the majority label on training rows
        (:mod:`lrpt.retry`), or None."""
        return collapse_reason(self, self.config.seed)

    def restart(self, params: dict[str, np.ndarray]) -> None:
        """The prompt back to ``params``, a fresh optimizer, step 0 (the lr probe's candidates and a retry)."""
        self.prompt.load_params(params)
        self.stepper.load_moments({}, 0)
        self.t = 0

    def _gather(self, part: np.ndarray, total: int) -> np.ndarray:
        """Every rank's ``shard`` of ``total`` rows, in order (padded to one size for the collective)."""
        _, size = self.world
        sizes = [len(shard(range(total), r, size)) for r in range(size)]
        width = max(sizes)
        padded = np.zeros((width, *part.shape[1:]), part.dtype)
        padded[: len(part)] = part
        every = self.stepper.all_gather(padded).reshape(size, width, *part.shape[1:])
        return np.concatenate([every[r, : sizes[r]] for r in range(size)])

    def adapter(self) -> Adapter:
        return self.be.prompt_to_adapter(self.prompt, self.task, self.base)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        self.prompt.load_params(params)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        # at step 0 (a retry's first checkpoint) there are no moments, whatever zeros a stepper holds
        return self.stepper.moments() if self.t else {}, {"schema": CHECKPOINT_SCHEMA, "adam_step": self.t}

    def load_state(self, adapter: Adapter, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if meta.get("schema") != CHECKPOINT_SCHEMA:
            raise TrainingError("the checkpoint was written by an older lrpt (another optimizer-state schema):"
                                " start a new run with --init-from RUN/adapter")
        if adapter.spec != self.prompt.spec:
            mine, theirs = self.prompt.spec.to_dict(), adapter.spec.to_dict()
            diff = "; ".join(f"{k} {theirs[k]!r} → {mine[k]!r}" for k in mine if mine[k] != theirs.get(k))
            raise TrainingError(f"--resume with another prompt than the run's ({diff}): drop those flags")
        if adapter.task is not None and (adapter.task.label_words, adapter.task.template) != (
                self.task.label_words, self.task.template):
            raise TrainingError(f"--resume with another task than the run's (label words {adapter.task.label_words},"
                                f" template {adapter.task.template!r}): use the run's --labels and --template")
        names = set(self.prompt.spec.trainable_names())
        want = {f"{n}.{m}" for n in names for m in ("exp_avg", "exp_avg_sq")} if meta["adam_step"] else set()
        if set(tensors) != want:
            raise TrainingError(f"the checkpoint's optimizer state does not match this prompt ({sorted(tensors)[:3]}"
                                "...): resume with the run's own --method, --tokens and --rank")
        self.prompt.load_params(adapter.params)
        self.stepper.load_moments(tensors, int(meta["adam_step"]))
        self.t = int(meta["adam_step"])


def shard(rows: list, rank: int, size: int) -> list:
    """This rank's contiguous share of a batch (the first ranks take one more when it does not divide)."""
    k, extra = divmod(len(rows), size)
    start = rank * k + min(rank, extra)
    return rows[start:start + k + (rank < extra)]


def train(model, tokenizer, prompt, task: Task, train_examples: list[dict], eval_examples: list[dict] | None = None,
          config: TrainConfig | None = None, out_dir: str | Path | None = None, resume: bool = False,
          context: int | None = None, truncate: bool = True,
          log: Callable[[str], None] | None = None, run_files: dict[str, Any] | None = None) -> TrainResult:
    """Train ``prompt`` on ``task`` with a frozen ``model`` on the model's backend; see
    :func:`lrpt.trainer.run_training`. ``prompt`` may be new (``init_prompt``) or any saved adapter
    (``prompt_from_adapter``): training continues from its tensors.

    ``context`` (the model's maximum sequence length, :func:`lrpt.basemodel.context_length`; by
    default the one the loaded model's config states) bounds every sequence: longer inputs are cut
    (counted in ``TrainResult.truncated``), or refused when ``truncate`` is False. ``log`` receives one line saying whether the step runs
    compiled or eager, and why (``TrainResult.compile_choice`` keeps it too). ``run_files``: more JSON
    files a new run stores in ``out_dir`` (:func:`lrpt.trainer.run_training`)."""
    from .backends import backend_for

    be = backend_for(model)
    config = config or TrainConfig()
    if resume and out_dir is not None:  # before for_method: the run's own floor, not today's default
        config = resumed_floor(Path(out_dir) / TRAIN_CONFIG_FILE, config)
    config = config.for_method(prompt.spec.method).validate()
    be.place(prompt, model)
    hf = be.hf_tokenizer(tokenizer)
    tok, tgt = tokenize_fn(hf), target_tokenize_fn(hf)
    # the checks the CLI's loaders make (text fields are text, labels valid: names become indices)
    train_examples = check_rows(task, train_examples, "training rows") if train_examples else train_examples
    eval_examples = check_rows(task, eval_examples, "evaluation rows") if eval_examples else eval_examples
    train_data = encode_examples(task, tok, train_examples, tgt)
    eval_data = encode_examples(task, tok, eval_examples, tgt) if eval_examples else None
    cut = 0
    context = context if context is not None else loaded_context(model)
    if context is not None:
        room = context_room(context, prompt.spec.n_tokens)
        reserve = max(map(len, label_token_ids(hf, task.label_words))) if task.kind == "classification" else 0
        cut = fit_to_context(train_data, room, reserve, truncate)
        fit_to_context(eval_data or [], room, reserve, truncate)
    ops = Training(be, model, tokenizer, prompt, task, train_data, eval_data, config)
    try:  # from here on the run undoes what it switched on (torch's deterministic mode), also on error
        choice = ops.compile_choice.line() + ops.prefix_note() + length_note(config, len(train_data))
        probe, probe_note = None, ""

        def start(config: TrainConfig) -> tuple[TrainConfig, str]:
            """A new run (checked, its directory locked): with --lr-probe, choose the lr first."""
            nonlocal probe, probe_note
            if config.lr_probe:
                probe = probe_lr(ops, config.lr, config.seed)
                if probe is None:
                    probe_note = f"; lr probe skipped (fewer than {MIN_ROWS} training rows)"
                else:
                    config = ops.config = replace(config, lr=probe.lr)
                    probe_note = probe.note()
            return config, probe_note

        result = run_training(ops, config, out_dir, resume, higher_is_better=task.kind == "classification",
                              backend=be.NAME, writer=ops.world[0] == 0,
                              log=log if ops.world[0] == 0 else None, note=choice, start=start,
                              run_files=run_files)
    finally:
        ops.close()
    result.truncated = cut
    result.compile_choice = (choice + probe_note).removeprefix("training step: ")
    if ops.stepper.fell_back:  # lrpt chose CUDA graphs and the step could not be recorded
        result.compile_choice = f"eager after all ({ops.stepper.fell_back}); planned: {result.compile_choice}"
    result.lr_probe = probe
    if task.kind == "classification" and eval_data:
        result.baseline = majority_baseline(task, [e.target for e in eval_data])
        warning = chance_warning(task, result.baseline, result.best_metric)
        if warning and log is not None and ops.world[0] == 0:
            log(warning)
    return result


def length_note(config: TrainConfig, n: int) -> str:
    """What the start-up line says of an auto-length run (``epochs`` unset) that is not one pass."""
    total, _ = plan(config, n)
    one_pass, _ = plan(replace(config, epochs=1.0), n)
    if config.steps or config.epochs is not None or total <= one_pass:
        return ""
    # Longer than one pass, so the run's length is its floor (min_steps): the note names it as such.
    return f"; {total} optimizer steps (auto: {total / one_pass:.1f} passes over {n} rows, at least {total})"


def context_room(context: int, n_tokens: int) -> int:
    """Tokens left for input and target once the prompt takes its ``n_tokens`` positions."""
    if n_tokens >= context:
        raise SpecError(f"a prompt of {n_tokens} tokens does not fit the model's context of {context} tokens:"
                        f" use --tokens below {context}")
    return context - n_tokens
