"""Classification scoring and decoding.

Scoring: the score of a label is the log-probability of its label word(s) after the
templated input. Single-token label words (the common case) need one forward and the LM
head at one position per row; multi-token words are scored as input+word sequences, summing
the log-probabilities of the word's tokens. The vocabulary projection never runs anywhere else.

Decoding: for a static prompt (``prompt``, ``lopt1``, ``lopt2``) the prompt's key/value
cache is computed once per prompt (and recomputed only when its parameters change), then
each call gets a batch-expanded copy: rows read ``[prompt][pads][tokens]`` with the pads
masked and token positions starting at n, which is the same function as a full forward.
LoPA prompts and mixed batches are prefilled in full.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...data import target_positions
from ...tokens import encode_texts, label_token_ids
from .._common import prompt_lengths, restore_modes, set_eval
from .model import Batch, embed, forward_hidden, head, logits_at, make_batch, prompt_rows
from .prompts import PromptModule, place


def prepare_scoring(rows: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], n: Sequence[int],
                    pad_id: int = 0, pad_to_multiple: int = 1, device=None) -> dict[str, torch.Tensor]:
    """Host-side layout for :func:`label_scores`, moved to ``device`` (the device part can be compiled).

    Single-token label words need the input batch only; multi-token words add one
    input+word sequence per (row, label) and the positions to read.
    """
    batch = make_batch(rows, n, "right", pad_id, pad_to_multiple).to(device)
    arrays = {f"in_{k}": v for k, v in batch.arrays().items()}
    if all(len(ids) == 1 for ids in label_ids):
        arrays["label_ids"] = torch.tensor([ids[0] for ids in label_ids], device=device)
        return arrays
    k = len(label_ids)
    long_rows = [list(r) + list(ids) for r in rows for ids in label_ids]
    long = make_batch(long_rows, [x for x in n for _ in range(k)], "right", pad_id, pad_to_multiple).to(device)
    arrays.update({f"seq_{key}": v for key, v in long.arrays().items()})
    return {**arrays, **_positions(long_rows, [len(label_ids[j % k]) for j in range(len(long_rows))], device)}


def _positions(seqs, n_targets, device) -> dict[str, torch.Tensor]:
    index, target, weight = target_positions(seqs, n_targets)
    return {"index": torch.from_numpy(index).to(device), "target": torch.from_numpy(target).to(device),
            "weight": torch.from_numpy(weight).to(device)}


def unpack(arrays: dict[str, torch.Tensor], prefix: str) -> Batch:
    return Batch(**{k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})


def target_logprobs(model, prompts: torch.Tensor, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B', K) log-probabilities of the target tokens of the ``seq_`` batch (0 where weight is 0)."""
    seq = unpack(arrays, "seq_")
    hidden = forward_hidden(model, prompts, seq)
    packed = seq.token_pos.gather(1, arrays["index"])
    logp = torch.log_softmax(logits_at(model, hidden, packed), dim=-1)
    return logp.gather(2, arrays["target"][..., None])[..., 0] * arrays["weight"]


def label_scores(model, prompt, arrays: dict[str, torch.Tensor], num_labels: int,
                 which: Sequence[int] | None = None) -> torch.Tensor:
    """(B, K) label log-probabilities from :func:`prepare_scoring`'s arrays (differentiable)."""
    inputs = unpack(arrays, "in_")
    prompts = prompt_rows(model, prompt, inputs, which)
    if "label_ids" in arrays:
        hidden = forward_hidden(model, prompts, inputs)
        logp = torch.log_softmax(logits_at(model, hidden, inputs.last_pos[:, None])[:, 0], dim=-1)
        return logp[:, arrays["label_ids"]]
    picked = target_logprobs(model, prompts.repeat_interleave(num_labels, 0), arrays)
    return picked.sum(1).view(-1, num_labels)


def score_rows(model, prompt, rows: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]],
               which: Sequence[int] | None = None, pad_id: int = 0, pad_to_multiple: int = 1) -> torch.Tensor:
    """(B, K) float32 label log-probabilities for token rows (differentiable w.r.t. the prompt)."""
    n = prompt_lengths(prompt, len(rows), which)
    arrays = prepare_scoring(rows, label_ids, n, pad_id, pad_to_multiple, model.device)
    return label_scores(model, prompt, arrays, len(label_ids), which)


def score_labels(
    model,
    tokenizer,
    prompt: PromptModule | Sequence[PromptModule],
    texts: Sequence[str],
    label_words: Sequence[str],
    which: Sequence[int] | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """(N, K) label log-probabilities for already templated ``texts``."""
    place(prompt, model)
    label_ids = label_token_ids(tokenizer, label_words)
    rows = encode_texts(tokenizer, texts)
    out = []
    was_training = set_eval(prompt)
    with torch.no_grad(), _autocast(model):
        for i in range(0, len(rows), batch_size):
            sub_which = None if which is None else which[i : i + batch_size]
            out.append(
                score_rows(model, prompt, rows[i : i + batch_size], label_ids, sub_which, tokenizer.pad_token_id or 0)
                .float()
                .cpu()
            )
    restore_modes(prompt, was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, len(label_words)), np.float32)


def classify(model, tokenizer, prompt, texts, label_words, which=None, batch_size=32) -> np.ndarray:
    """Predicted label index for each templated text (argmax of :func:`score_labels`)."""
    return score_labels(model, tokenizer, prompt, texts, label_words, which, batch_size).argmax(-1)


# -- decoding ---------------------------------------------------------------------------------


def prefix_cache(model, prompt: PromptModule):
    """The prompt's KV cache (batch 1), computed once and reused while the prompt is unchanged."""
    from transformers import DynamicCache

    version = tuple(p._version for p in prompt.parameters())
    key = (id(model), version, str(model.device))
    held = getattr(prompt, "_prefix_cache", None)
    if held is not None and held[0] == key:
        return held[1]
    with torch.no_grad(), _autocast(model):
        x = prompt().unsqueeze(0).to(model.dtype)
        n = x.shape[1]
        cache = DynamicCache(config=model.config)
        model(
            inputs_embeds=x,
            position_ids=torch.arange(n, device=model.device)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    kv = _layer_kv(cache)
    object.__setattr__(prompt, "_prefix_cache", (key, kv))
    return kv


def _layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a DynamicCache (transformers 5 layers, or 4.x lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _expanded_cache(model, kv, batch: int):
    """A fresh cache holding the prompt's keys/values for ``batch`` rows, without copying them:
    the first update of each layer keeps the (expanded) tensors, later ones concatenate."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
    return cache


def generate(
    model,
    tokenizer,
    prompt: PromptModule | Sequence[PromptModule] | None,
    texts: Sequence[str],
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    which: Sequence[int] | None = None,
    use_prefix_cache: bool = True,
) -> list[str]:
    """Continue each (templated) text; greedy when ``temperature == 0``.

    Stops at EOS, at any ``stop`` string (cut from the output) or after ``max_tokens``.
    Batched results equal one-by-one results (left padding, exact positions).
    """
    place(prompt, model)
    rows = encode_texts(tokenizer, texts)
    b, dev = len(rows), model.device
    gen = torch.Generator(device=dev)
    if seed is not None:
        gen.manual_seed(seed)
    was_training = set_eval(prompt) if prompt is not None else None
    with torch.no_grad(), _autocast(model):
        cached = prompt is not None and isinstance(prompt, PromptModule) and prompt.spec.is_static
        # Sliding-window attention measures distance in cache slots, so pads between the cached
        # prompt and the tokens would shift its window: there, only pad-free batches use the cache.
        cached = cached and use_prefix_cache and (not _has_sliding_window(model) or len({len(r) for r in rows}) == 1)
        if cached:
            logits, cache, mask, next_pos = _prefill_cached(model, prompt, rows, tokenizer.pad_token_id or 0)
        else:
            logits, cache, mask, next_pos = _prefill_full(model, prompt, rows, which, tokenizer.pad_token_id or 0)
        eos = _eos_ids(tokenizer, model)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        out_ids: list[list[int]] = [[] for _ in range(b)]
        texts_out = [""] * b
        finished = [False] * b
        for _ in range(max_tokens):
            nxt = _sample(logits, temperature, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id or 0), nxt)
            host = nxt.tolist()
            for i, t in enumerate(host):
                if finished[i]:
                    continue
                if t in eos:
                    finished[i] = True
                    continue
                out_ids[i].append(t)
                texts_out[i] = tokenizer.decode(out_ids[i], skip_special_tokens=True)
                if stop and any(s in texts_out[i] for s in stop):
                    cut = min(texts_out[i].find(s) for s in stop if s in texts_out[i])
                    texts_out[i] = texts_out[i][:cut]
                    finished[i] = True
            if all(finished):
                break
            done = torch.tensor(finished, device=dev)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=dev)], dim=1)
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
    if was_training is not None:
        restore_modes(prompt, was_training)
    return texts_out


def _prefill_cached(model, prompt: PromptModule, rows, pad_id):
    """Prefill behind the cached prompt: layout [prompt][pads][tokens], positions n.. for tokens."""
    dev = model.device
    n = prompt.spec.n_tokens
    cache = _expanded_cache(model, prefix_cache(model, prompt), len(rows))
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n + t), dtype=torch.long)
    mask[:, :n] = 1
    pos = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.tensor(r)
        mask[i, n + t - len(r) :] = 1
        pos[i, t - len(r) :] = n + torch.arange(len(r))
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    next_pos = torch.tensor([n + len(r) for r in rows], device=dev)
    return out.logits[:, -1].float(), cache, mask, next_pos


def _prefill_full(model, prompt, rows, which, pad_id):
    """Prefill prompt and tokens together (LoPA, mixed adapters, or no prompt)."""
    from transformers import DynamicCache

    if prompt is None:
        prompt_list, n = [], [0] * len(rows)
    else:
        n = prompt_lengths(prompt, len(rows), which)
    batch: Batch = make_batch(rows, n, "left", pad_id).to(model.device)
    tok = embed(model, batch.token_ids)
    if prompt is None:
        prompt_list = torch.zeros(len(rows), 0, tok.shape[-1], device=tok.device, dtype=tok.dtype)
    else:
        prompt_list = prompt_rows(model, prompt, batch, which)
    both = torch.cat([prompt_list.to(tok.dtype), tok], dim=1)
    inputs = both.gather(1, batch.src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    cache = DynamicCache(config=model.config)
    out = model(
        inputs_embeds=inputs,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = batch.n_prompt.to(model.device) + batch.lengths.to(model.device)
    return out.logits[:, -1].float(), cache, batch.attention_mask, next_pos


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _has_sliding_window(model) -> bool:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return True
    return bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    return ids


def _autocast(model):
    """Autocast to the model's own half dtype on CUDA (the float32 prompt math joins it there);
    a float32 model computes in float32: loading in fp32 must mean fp32 results."""
    if model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=model.dtype)
    return torch.autocast(model.device.type, enabled=False)


__all__ = ["classify", "generate", "head", "label_token_ids", "prefix_cache", "score_labels", "score_rows"]
