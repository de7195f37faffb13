"""Tiny random HF model folders for tests: five architectures, one byte-level BPE tokenizer.

Everything is built here from configs (no hub, no network), saved as an HF folder that both
transformers and mlx-lm load. Models are float32 and a few thousand parameters wide.
"""

from __future__ import annotations

import contextlib
import json
import random
from functools import lru_cache
from pathlib import Path

ARCHS = ("llama", "qwen2", "gemma3", "gpt2", "phi3")
VOCAB = 320
WORDS = (
    "the a movie film was is great good bad awful fine dull plot actor review sentiment positive negative "
    "yes no question answer story fun boring loved hated it this very not really"
).split()


def sentences(n: int, seed: int = 0, length: tuple[int, int] = (3, 12)) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(*length))) for _ in range(n)]


@lru_cache(maxsize=1)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences(400, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def config(arch: str, **overrides):
    """A tiny config of ``arch``; ``overrides`` change the common sizes (e.g. num_hidden_layers)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            head_dim=8,
            sliding_window=6,
            tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention"],
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, n_ctx=256, bos_token_id=1, eos_token_id=2
        )
    if arch == "phi3":
        return tf.Phi3Config(**common, tie_word_embeddings=False)
    if arch == "granite":  # scales embeddings in the model body, outside HF's embedding module (not in ARCHS)
        return tf.GraniteConfig(**common, embedding_multiplier=12.0, logits_scaling=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.2, tie_word_embeddings=False)
    if arch == "lfm2":  # a hybrid: convolution layers beside attention (not in ARCHS)
        return tf.Lfm2Config(**{**common, "num_hidden_layers": 4}, tie_word_embeddings=True,
                             layer_types=["conv", "full_attention", "conv", "full_attention"], block_auto_adjust_ff_dim=False)
    raise ValueError(arch)


def save_tiny(arch: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random ``arch`` model and the tokenizer to ``path``; returns the path."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; make activations non-trivial
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    if arch == "gpt2":
        # Write the checkpoint as the hub's gpt2 is stored (no "transformer." prefix), which is
        # what mlx-lm's gpt2 expects; transformers reads both.
        sd = {
            k.removeprefix("transformer."): v.contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith("lm_head") and not k.endswith(".attn.bias")
        }
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    tokenizer().save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    # Hub configs (and mlx-lm) use flat rope keys; transformers 5 writes nested rope_parameters.
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    elif "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if arch == "gemma3":
        cfg["sliding_window_pattern"] = 2
    if arch == "lfm2":  # keys mlx-lm's lfm2 requires that transformers does not write
        cfg["block_dim"], cfg["conv_L_cache"] = cfg["hidden_size"], cfg.get("conv_L_cache", 3)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def write_tiny_gguf(path: str | Path, hf_dir: str | Path) -> Path:
    """Write the tiny llama of ``hf_dir`` as a float32 llama GGUF, as llama.cpp's converter would
    (q/k rows permuted for its rotary layout, byte-level BPE tokenizer with merges)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    tok = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    weights = load_file(str(Path(hf_dir) / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, s) for s, i in vocab]
    tokens += [f"<unused{i}>" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in weights.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if key in names:
            w.add_tensor(names[key], value)
            continue
        layer, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
        if rest == "self_attn.q_proj":
            value = permute(value, heads)
        elif rest == "self_attn.k_proj":
            value = permute(value, kv_heads)
        w.add_tensor(f"blk.{layer}.{parts[rest]}.weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# -- shared test vocabulary ---------------------------------------------------------------------

METHODS = ("prompt", "lopt1", "lopt2", "lopa")
TEXTS = ["the movie was great fun", "bad", "a very long review of the plot and actor is not"]


def spec_for(method: str, n: int = 4, **kw):
    """A small spec of ``method`` (rank 2, head width 8) for tiny models."""
    from lrpt import PromptSpec

    return PromptSpec(method, n_tokens=n, rank=None if method == "prompt" else 2, head_hidden=8, **kw)


def toy_task():
    from lrpt import Task

    return Task("toy", template="Review: {text}\nSentiment:", label_words=[" bad", " good"])


def toy_data(n: int = 96, seed: int = 5) -> list[dict]:
    """Generated reviews labelled 1 when they hold a positive keyword."""
    return [{"text": s, "label": int(any(w in s.split() for w in ("good", "great", "fun", "loved")))}
            for s in sentences(n, seed=seed)]


def packed_vs_two_passes(be, model, tok, kind: str, n: int = 5):
    """The torch backend's shared prefix run in two passes, then packed with the rows
    (lrpt.backends.torch.packed), eagerly on ``model``'s device: [(loss, {name: grad})] per path
    and the (batch, width) the first block saw on each call (rows of different lengths, right padded)."""
    import numpy as np

    from lrpt import Task
    from lrpt.backends.torch.model import transformer_blocks
    from lrpt.backends.torch.packed import packed_attention
    from lrpt.layout import completion_arrays, scoring_arrays, to_arrays
    from lrpt.scoring import task_loss
    from lrpt.tokens import label_token_ids

    prompt = be.init_prompt(spec_for("lopt1", n=n), model, tok, seed=1)
    hf = be.hf_tokenizer(tok)
    rows = [hf(t)["input_ids"] for t in TEXTS + ["fun film"]]
    task = toy_task()
    if kind == "completion":
        host = completion_arrays(rows, [r[:3] for r in reversed(rows)], n, pad_to_multiple=8)
        task = Task("echo", kind="completion", template="{prompt}")
    else:
        host = scoring_arrays(rows, label_token_ids(hf, [" good", " bad"]), [n] * len(rows), pad_to_multiple=8)
        host["labels"] = np.array([0, 1, 1, 0])
    arrays = to_arrays(host, be.asarray_for(model))
    widths = []
    hook = transformer_blocks(model)[0].register_forward_pre_hook(
        lambda m, args, kw: widths.append(tuple((args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    out = []
    try:
        for packing in (False, True):
            prompt.zero_grad(set_to_none=True)
            with packed_attention(model, packing):
                loss = task_loss(be, model, prompt, task, arrays, 2, True)
            loss.backward()
            out.append((loss.item(), {k: p.grad.clone() for k, p in prompt.named_parameters()}))
    finally:
        hook.remove()
    return out, widths


class Crash(Exception):
    """What :func:`crash_after_checkpoint` raises: a run killed right after a checkpoint."""


@contextlib.contextmanager
def crash_after_checkpoint(step: int):
    """Inside the block, a training run raises :class:`Crash` once its step-``step`` checkpoint is
    written (the run directory then holds what a killed run leaves), to test ``--resume``."""
    import lrpt.trainer as T

    save = T.RunDir.save_checkpoint

    def save_then_crash(self, at, *a, **k):
        done = save(self, at, *a, **k)
        if at == step:
            raise Crash
        return done

    T.RunDir.save_checkpoint = save_then_crash
    try:
        yield
    finally:
        T.RunDir.save_checkpoint = save
