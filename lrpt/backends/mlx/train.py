"""Training on MLX: the step, the evaluation and the optimizer state for :mod:`lrpt.trainer`.

Mirrors ``lrpt/backends/torch/train.py``. Batches are laid out on the host
(:func:`~.generate.prepare_scoring`) and the device part, loss and gradients, is one
function of arrays, so ``mx.compile`` can trace it once per shape (``TrainConfig.compile``).
``grad_checkpoint`` recomputes each layer's activations in the backward pass (mlx-lm's
``grad_checkpoint``), trading compute for memory on long inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ...adapter import Adapter
from ...data import Encoded, classification_metrics, encode_examples, target_positions
from ...tasks import Task
from ...tokens import label_token_ids, target_tokenize_fn, tokenize_fn
from ...trainer import TrainConfig, TrainResult, run_training
from .generate import label_scores, prepare_scoring, target_logprobs, unpack
from .model import base_model_info, hf_tokenizer, make_batch, prompt_rows
from .prompts import PromptModule, place, prompt_to_adapter


def prepare_completion(rows: list[Encoded], n: int, pad_id: int = 0, pad_to_multiple: int = 1) -> dict[str, mx.array]:
    """Host-side layout for :func:`completion_nll`: the input alone (for LoPA) and input+target."""
    seqs = [list(r.ids) + list(r.target) for r in rows]
    arrays = {f"in_{k}": v for k, v in make_batch([r.ids for r in rows], n, "right", pad_id).arrays().items()}
    arrays.update({f"seq_{k}": v for k, v in make_batch(seqs, n, "right", pad_id, pad_to_multiple).arrays().items()})
    index, target, weight = target_positions(seqs, [len(r.target) for r in rows])
    arrays.update(index=mx.array(index.astype(np.int32)), target=mx.array(target.astype(np.int32)),
                  weight=mx.array(weight))
    return arrays


def completion_nll(model, prompt: PromptModule, arrays: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Summed negative log-likelihood of the completion tokens and their count (targets only)."""
    prompts = prompt_rows(model, prompt, unpack(arrays, "in_"))
    return -target_logprobs(model, prompts, arrays).sum(), arrays["weight"].sum()


class MLXOps:
    """:class:`lrpt.trainer.TrainOps` for an mlx-lm model and prompt."""

    def __init__(self, model, tokenizer, prompt: PromptModule, task: Task, train_data: list[Encoded],
                 eval_data: list[Encoded] | None, config: TrainConfig):
        self.model, self.tokenizer, self.prompt, self.task = model, tokenizer, prompt, task
        self.train_data, self.eval_data, self.config = train_data, eval_data or [], config
        self.lengths = [len(e.ids) + (len(e.target) if isinstance(e.target, list) else 0) for e in train_data]
        hf = hf_tokenizer(tokenizer)
        self.pad_id = hf.pad_token_id or 0
        self.label_ids = label_token_ids(hf, task.label_words) if task.kind == "classification" else None
        # Same update rule as torch.optim.AdamW (bias-corrected moments, decoupled weight decay).
        self.opt = optim.AdamW(learning_rate=config.lr, betas=[0.9, 0.999], eps=1e-8,
                               weight_decay=config.weight_decay, bias_correction=True)
        self.opt.init(prompt.trainable_parameters())
        self.t = 0  # optimizer steps taken
        self.base = base_model_info(model)
        if config.grad_checkpoint:
            _checkpoint_layers(model)
        self.grad_fn = nn.value_and_grad(prompt, self._loss)
        if config.compile:
            state = [prompt.state, mx.random.state]
            self.grad_fn = mx.compile(self.grad_fn, inputs=state, outputs=state)

    # -- the step -------------------------------------------------------------------------------

    def prepare(self, rows: list[Encoded]) -> dict[str, mx.array]:
        n, ptm = self.prompt.spec.n_tokens, self.config.pad_to_multiple
        if self.task.kind == "classification":
            arrays = prepare_scoring([r.ids for r in rows], self.label_ids, [n] * len(rows), self.pad_id, ptm)
            arrays["labels"] = mx.array([r.target for r in rows], dtype=mx.int32)
            return arrays
        return prepare_completion(rows, n, self.pad_id, ptm)

    def _loss(self, arrays: dict[str, mx.array]) -> mx.array:
        if self.task.kind == "classification":
            scores = label_scores(self.model, self.prompt, arrays, len(self.label_ids))
            return nn.losses.cross_entropy(scores, arrays["labels"], reduction="mean")
        nll, count = completion_nll(self.model, self.prompt, arrays)
        return nll / mx.maximum(count, 1.0)

    def step(self, micro_batches: list[list[int]], lr: float) -> mx.array:
        # Dropout's randomness is a function of (seed, step): nothing to save for an exact resume.
        mx.random.seed(self.config.seed * 1_000_003 + self.t)
        self.t += 1
        self.prompt.train()
        self.opt.learning_rate = mx.array(lr, dtype=mx.float32)
        total, grads = mx.array(0.0), None
        scale = 1.0 / len(micro_batches)
        for idx in micro_batches:
            loss, g = self.grad_fn(self.prepare([self.train_data[i] for i in idx]))
            g = tree_map(lambda x: x * scale, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + loss * scale
        if self.config.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        self.opt.update(self.prompt, grads)
        mx.eval(self.prompt.parameters(), self.opt.state, total)  # bound the lazy graph; no read-back
        return total

    def loss_value(self, handles: list[mx.array]) -> float:
        return float(mx.stack(handles).mean().item())

    def finite(self) -> bool:
        return all(bool(mx.isfinite(v).all().item()) for _, v in tree_flatten(self.prompt.trainable_parameters()))

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if not self.eval_data:
            return {}
        return evaluate(self.model, self.tokenizer, self.prompt, self.task, self.eval_data,
                        self.config.eval_batch_size)[0]

    # -- state ----------------------------------------------------------------------------------

    def adapter(self) -> Adapter:
        return prompt_to_adapter(self.prompt, self.task, self.base)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        flat = dict(tree_flatten(self.opt.state))
        tensors = {k: np.array(v.astype(mx.float32)) for k, v in flat.items() if k not in ("step", "learning_rate")}
        return tensors, {"adam_step": self.t}

    def load_state(self, adapter: Adapter, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.prompt.load_params(adapter.params)
        state = tree_unflatten([(k, mx.array(v)) for k, v in tensors.items()])
        state["step"] = mx.array(meta["adam_step"], dtype=mx.uint64)
        state["learning_rate"] = mx.array(self.config.lr, dtype=mx.float32)
        self.opt.state = state
        self.t = meta["adam_step"]


def evaluate(model, tokenizer, prompt: PromptModule, task: Task, data: list[Encoded],
             batch_size: int = 32) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics on encoded examples, and the (N, K) label scores for classification."""
    place(prompt, model)
    was = prompt.training
    prompt.eval()
    hf = hf_tokenizer(tokenizer)
    pad, n = hf.pad_token_id or 0, prompt.spec.n_tokens
    try:
        if task.kind == "classification":
            label_ids = label_token_ids(hf, task.label_words)
            parts = []
            for i in range(0, len(data), batch_size):
                rows = [r.ids for r in data[i : i + batch_size]]
                arrays = prepare_scoring(rows, label_ids, [n] * len(rows), pad)
                parts.append(np.array(label_scores(model, prompt, arrays, len(label_ids)).astype(mx.float32)))
            scores = np.concatenate(parts)
            return classification_metrics(task, [r.target for r in data], scores), scores
        nll, count = 0.0, 0.0
        for i in range(0, len(data), batch_size):
            a, b = completion_nll(model, prompt, prepare_completion(data[i : i + batch_size], n, pad))
            nll, count = nll + float(a.item()), count + float(b.item())
        return {"metric": nll / max(count, 1.0), "loss": nll / max(count, 1.0)}, None
    finally:
        prompt.train(was)


def train(model, tokenizer, prompt: PromptModule, task: Task, train_examples: list[dict],
          eval_examples: list[dict] | None = None, config: TrainConfig | None = None,
          out_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train ``prompt`` on ``task`` with a frozen ``model``; see :func:`lrpt.trainer.run_training`."""
    config = config or TrainConfig()
    place(prompt, model)
    mx.random.seed(config.seed)
    hf = hf_tokenizer(tokenizer)
    tok, tgt = tokenize_fn(hf), target_tokenize_fn(hf)
    train_data = encode_examples(task, tok, train_examples, tgt)
    eval_data = encode_examples(task, tok, eval_examples, tgt) if eval_examples else None
    ops = MLXOps(model, tokenizer, prompt, task, train_data, eval_data, config)
    return run_training(ops, config, out_dir, resume, higher_is_better=task.kind == "classification", backend="mlx")


def _checkpoint_layers(model) -> None:
    """Recompute each transformer layer in the backward pass (once per model)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    if not model.__dict__.get("_lrpt_checkpointed"):
        grad_checkpoint(model.layers[0])
        model.__dict__["_lrpt_checkpointed"] = True
