"""The torch backend: framework work only, in files mirrored by the other backend.

``ops`` the core's op set; ``prompts`` the prompt modules; ``model`` loading and running the model on
prompted batches; ``decode`` generation; ``step`` autograd and the optimizer (``Stepper``). Scoring,
evaluation and the training loop are the core's, exported here as they are (they find the backend
from the model).
"""

from ...scoring import classify, evaluate, score_labels
from ...training import train
from . import ops
from .decode import generate, prefix_cache
from .model import (
    asarray_for,
    base_model_info,
    embed,
    forward_hidden,
    forward_logits,
    hf_tokenizer,
    inference,
    init_prompt,
    load_model,
    logits_at,
    make_batch,
    prompt_rows,
)
from .prompts import PromptModule, place, prompt_from_adapter, prompt_to_adapter
from .step import Stepper

NAME = "torch"

__all__ = [
    "NAME", "PromptModule", "Stepper", "asarray_for", "base_model_info", "classify", "embed", "evaluate",
    "forward_hidden", "forward_logits", "generate", "hf_tokenizer", "inference", "init_prompt", "load_model",
    "logits_at", "make_batch", "ops", "place", "prefix_cache", "prompt_from_adapter", "prompt_rows",
    "prompt_to_adapter", "score_labels", "train",
]
