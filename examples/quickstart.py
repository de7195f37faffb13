"""Train a soft prompt and generate with it, on either backend, in a few lines of the Python API.

    python examples/quickstart.py --backend torch      # PyTorch (CUDA when present, else CPU)
    python examples/quickstart.py --backend mlx        # MLX (Metal on a Mac, CPU elsewhere: slow)
    python examples/quickstart.py --model PATH         # any HF causal-LM folder

The two runs use the same API: only the backend name changes.
"""

import argparse

from lrpt import PromptSpec
from lrpt.backends import get_backend
from lrpt.demo_data import demo_rows
from lrpt.fetch import DEFAULT_MODEL, resolve_model
from lrpt.tasks import get_task
from lrpt.trainer import TrainConfig

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
ap.add_argument("--model", default=DEFAULT_MODEL)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--out", default="demo_out/quickstart")
args = ap.parse_args()

backend = get_backend(args.backend)
model, tokenizer = backend.load_model(resolve_model(args.model))
task = get_task("demo")  # built-in movie reviews: template, label words and data

# A LoPT-1 prompt: X = U V with n=20 rows of rank 4, initialised by the core from a seed.
prompt = backend.init_prompt(PromptSpec("lopt1", n_tokens=20, rank=4), model, tokenizer, seed=0)
result = backend.train(model, tokenizer, prompt, task, demo_rows("train", 16 * args.steps), demo_rows("validation", 32),
                       TrainConfig(steps=args.steps, lr=3e-2, batch_size=16), out_dir=args.out)
print(f"validation accuracy {result.best_metric:.3f}; adapter in {result.adapter_dir}")

reviews = ["The plot was clever, but the acting felt lazy.", "Honestly, the soundtrack is beautiful."]
texts = [task.template.format(sentence=r) for r in reviews]
print("labels:", [task.label_words[i].strip() for i in backend.classify(model, tokenizer, prompt, texts, task.label_words)])
print("generated:", backend.generate(model, tokenizer, prompt, texts, max_tokens=8))
