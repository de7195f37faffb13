"""Training on PyTorch: the step, the evaluation and the optimizer state for :mod:`lrpt.trainer`.

The step is plain AdamW (fused on CUDA) on the prompt's float32 parameters, bf16 autocast on
CUDA, gradient accumulation and clipping. Nothing in it reads a value back to the host: the
loss stays on the device until the shared loop asks for it at a log point.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...adapter import Adapter
from ...data import Encoded, classification_metrics, encode_examples
from ...tasks import Task
from ...tokens import label_token_ids, target_tokenize_fn, tokenize_fn
from ...trainer import TrainConfig, TrainResult, run_training
from .generate import _autocast, _positions, label_scores, prepare_scoring, target_logprobs, unpack
from .model import base_model_info, make_batch, prompt_rows
from .prompts import PromptModule, place, prompt_to_adapter


def prepare_completion(rows: list[Encoded], n: int, pad_id: int = 0, pad_to_multiple: int = 1,
                       device=None) -> dict[str, torch.Tensor]:
    """Host-side layout for :func:`completion_nll`: the input alone (for LoPA) and input+target."""
    seqs = [list(r.ids) + list(r.target) for r in rows]
    arrays = {f"in_{k}": v for k, v in make_batch([r.ids for r in rows], n, "right", pad_id).to(device).arrays().items()}
    seq = make_batch(seqs, n, "right", pad_id, pad_to_multiple).to(device)
    arrays.update({f"seq_{k}": v for k, v in seq.arrays().items()})
    return {**arrays, **_positions(seqs, [len(r.target) for r in rows], device)}


def completion_nll(model, prompt: PromptModule, arrays: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the completion tokens and their count (targets only)."""
    prompts = prompt_rows(model, prompt, unpack(arrays, "in_"))
    return -target_logprobs(model, prompts, arrays).sum(), arrays["weight"].sum()


class TorchOps:
    """:class:`lrpt.trainer.TrainOps` for a PyTorch model and prompt."""

    def __init__(
        self,
        model,
        tokenizer,
        prompt: PromptModule,
        task: Task,
        train_data: list[Encoded],
        eval_data: list[Encoded] | None,
        config: TrainConfig,
    ):
        self.model, self.tokenizer, self.prompt, self.task = model, tokenizer, prompt, task
        self.train_data, self.eval_data, self.config = train_data, eval_data or [], config
        self.lengths = [len(e.ids) + (len(e.target) if isinstance(e.target, list) else 0) for e in train_data]
        self.pad_id = tokenizer.pad_token_id or 0
        self.label_ids = label_token_ids(tokenizer, task.label_words) if task.kind == "classification" else None
        self.params = [p for p in prompt.parameters() if p.requires_grad]
        fused = model.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        self.base = base_model_info(model)
        # The device part of the step; with ``compile``, traced once per batch shape (CUDA graphs
        # with compile_mode="reduce-overhead" remove launch overhead on small models).
        self.loss_fn = torch.compile(self._loss, mode=config.compile_mode) if config.compile else self._loss

    # -- the step -------------------------------------------------------------------------------

    def prepare(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        n, ptm, dev = self.prompt.spec.n_tokens, self.config.pad_to_multiple, self.model.device
        if self.task.kind == "classification":
            arrays = prepare_scoring([r.ids for r in rows], self.label_ids, [n] * len(rows), self.pad_id, ptm, dev)
            arrays["labels"] = torch.tensor([r.target for r in rows], device=dev)
            return arrays
        return prepare_completion(rows, n, self.pad_id, ptm, dev)

    def _loss(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task.kind == "classification":
            scores = label_scores(self.model, self.prompt, arrays, len(self.label_ids))
            return torch.nn.functional.cross_entropy(scores, arrays["labels"])
        nll, count = completion_nll(self.model, self.prompt, arrays)
        return nll / count.clamp(min=1)

    def step(self, micro_batches: list[list[int]], lr: float) -> torch.Tensor:
        self.prompt.train()
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.model.device)
        for idx in micro_batches:
            arrays = self.prepare([self.train_data[i] for i in idx])
            with _autocast(self.model):
                loss = self.loss_fn(arrays) / len(micro_batches)
            loss.backward()
            total = total + loss.detach()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def loss_value(self, handles: list[torch.Tensor]) -> float:
        return float(torch.stack(handles).mean().item())

    def finite(self) -> bool:
        return bool(all(torch.isfinite(p).all() for p in self.params))

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if not self.eval_data:
            return {}
        return evaluate(
            self.model, self.tokenizer, self.prompt, self.task, self.eval_data, self.config.eval_batch_size
        )[0]

    # -- state ----------------------------------------------------------------------------------

    def adapter(self) -> Adapter:
        return prompt_to_adapter(self.prompt, self.task, self.base)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        names = {id(p): n for n, p in self.prompt.named_parameters()}
        tensors, steps = {}, {}
        for p in self.params:
            st = self.opt.state.get(p, {})
            name = names[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"{name}.{key}"] = st[key].detach().float().cpu().numpy()
            if "step" in st:
                steps[name] = float(st["step"])
        # Dropout (LoPA) is the only consumer of randomness; data order comes from seeded generators.
        rng = {"torch": _b64(torch.get_rng_state().numpy().tobytes())}
        if torch.cuda.is_available():
            rng["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
        return tensors, {"adam_steps": steps, "rng": rng}

    def load_state(self, adapter: Adapter, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.prompt.load_params(adapter.params)
        names = {n: p for n, p in self.prompt.named_parameters()}
        self.opt.state.clear()
        for name, step in meta["adam_steps"].items():
            p = names[name]
            self.opt.state[p] = {
                "step": torch.tensor(
                    step, dtype=torch.float32, device=p.device if self.opt.defaults.get("fused") else "cpu"
                ),
                "exp_avg": torch.from_numpy(tensors[f"{name}.exp_avg"]).to(p.device),
                "exp_avg_sq": torch.from_numpy(tensors[f"{name}.exp_avg_sq"]).to(p.device),
            }
        rng = meta["rng"]
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(rng["torch"]), np.uint8).copy()))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.from_numpy(np.frombuffer(base64.b64decode(s), np.uint8).copy()) for s in rng["cuda"]]
            )


def evaluate(
    model, tokenizer, prompt: PromptModule, task: Task, data: list[Encoded], batch_size: int = 32
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics on encoded examples, and the (N, K) label scores for classification."""
    place(prompt, model)
    was = prompt.training
    prompt.eval()
    pad = tokenizer.pad_token_id or 0
    try:
        with torch.no_grad(), _autocast(model):
            n, dev = prompt.spec.n_tokens, model.device
            if task.kind == "classification":
                label_ids = label_token_ids(tokenizer, task.label_words)
                parts = []
                for i in range(0, len(data), batch_size):
                    rows = [r.ids for r in data[i : i + batch_size]]
                    arrays = prepare_scoring(rows, label_ids, [n] * len(rows), pad, device=dev)
                    parts.append(label_scores(model, prompt, arrays, len(label_ids)).float().cpu())
                scores = torch.cat(parts).numpy()
                return classification_metrics(task, [r.target for r in data], scores), scores
            nll, count = 0.0, 0.0
            for i in range(0, len(data), batch_size):
                a, b = completion_nll(model, prompt, prepare_completion(data[i : i + batch_size], n, pad, device=dev))
                nll, count = nll + float(a), count + float(b)
            return {"metric": nll / max(count, 1.0), "loss": nll / max(count, 1.0)}, None
    finally:
        prompt.train(was)


def train(
    model,
    tokenizer,
    prompt: PromptModule,
    task: Task,
    train_examples: list[dict],
    eval_examples: list[dict] | None = None,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``prompt`` on ``task`` with a frozen ``model``; see :func:`lrpt.trainer.run_training`.

    ``prompt`` may come from :func:`~.model.init_prompt` or from any saved adapter
    (:func:`~.prompts.prompt_from_adapter`): training continues from its tensors.
    """
    config = config or TrainConfig()
    place(prompt, model)
    torch.manual_seed(config.seed)
    tok, tgt = tokenize_fn(tokenizer), target_tokenize_fn(tokenizer)
    train_data = encode_examples(task, tok, train_examples, tgt)
    eval_data = encode_examples(task, tok, eval_examples, tgt) if eval_examples else None
    ops = TorchOps(model, tokenizer, prompt, task, train_data, eval_data, config)
    return run_training(ops, config, out_dir, resume, higher_is_better=task.kind == "classification", backend="torch")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
