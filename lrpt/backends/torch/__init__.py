"""PyTorch backend (HF transformers). Same file and function names as ``lrpt.backends.mlx``."""

from .generate import classify, generate, score_labels
from .model import Batch, base_model_info, forward_logits, init_prompt, load_model, make_batch
from .prompts import PromptModule, prompt_from_adapter, prompt_to_adapter
from .train import TrainConfig, evaluate, train

NAME = "torch"

__all__ = [
    "NAME",
    "Batch",
    "PromptModule",
    "TrainConfig",
    "base_model_info",
    "classify",
    "evaluate",
    "forward_logits",
    "generate",
    "init_prompt",
    "load_model",
    "make_batch",
    "prompt_from_adapter",
    "prompt_to_adapter",
    "score_labels",
    "train",
]
