"""CPU training-step time: MLX eager vs ``mx.compile``d, and MLX vs PyTorch, on one small model.

A random Llama-shaped model is written once as an HF folder and loaded by both backends; each
variant runs lrpt's real training step (``lrpt.training.Training.step`` on each backend, lopt1, a 2-label
classifier) on the same fixed batch. Variants alternate in rounds after warm-up; figures are
medians of per-round means (wall clock).

    python benchmarks/cpu.py                 # the figures in RESULTS.md
    python benchmarks/cpu.py --smoke         # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpt import PromptSpec, Task  # noqa: E402
from lrpt.data import Encoded  # noqa: E402
from lrpt.reference import init_params  # noqa: E402
from lrpt.trainer import TrainConfig  # noqa: E402


def write_model(path: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["rope_theta"] = (conf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    (path / "config.json").write_text(json.dumps(conf))
    return path


class LabelTokenizer:
    pad_token_id = 0
    eos_token_id = None

    def __call__(self, word, add_special_tokens=False):
        return {"input_ids": [[11], [13]][int(word.strip()[-1])]}


def steps(args, path: Path) -> dict:
    import mlx.core as mx
    import torch
    from mlx_lm.utils import load_model

    from lrpt.backends import get_backend
    from lrpt.backends.mlx.prompts import PromptModule as MLXPrompt
    from lrpt.backends.mlx.splice import attach
    from lrpt.backends.torch.prompts import PromptModule as TorchPrompt
    from lrpt.training import Training

    rng = np.random.default_rng(0)
    rows = [rng.integers(100, args.vocab, args.seq).tolist() for _ in range(args.batch)]
    data = [Encoded(r, int(y)) for r, y in zip(rows, rng.integers(0, 2, args.batch))]
    task = Task("bench", template="{text}", label_words=[" 0", " 1"])
    spec = PromptSpec("lopt1", n_tokens=args.tokens, rank=4)
    params = init_params(spec, args.hidden, 0)
    torch.set_num_threads(args.threads)
    tmodel = __import__("transformers").AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    mmodel, _ = load_model(path)
    mmodel.freeze()
    attach(mmodel)

    class Wrap:  # the MLX backend reads the HF tokenizer through mlx-lm's wrapper
        _tokenizer = LabelTokenizer()

    variants = {}
    for compile_ in (False, True):
        ops = Training(get_backend("mlx"), mmodel, Wrap(), MLXPrompt(spec, params), task, data, None,
                       TrainConfig(compile=compile_, pad_to_multiple=1))
        variants["mlx compiled" if compile_ else "mlx eager"] = (lambda o=ops: mx.eval(o.step([list(range(len(data)))], 1e-3)))
    tops = Training(get_backend("torch"), tmodel, LabelTokenizer(), TorchPrompt(spec, params), task, data, None,
                    TrainConfig(pad_to_multiple=1))
    variants["torch eager"] = lambda: tops.step([list(range(len(data)))], 1e-3)
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[k].append((time.perf_counter() - t) * 1000 / args.steps)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.batch, args.seq, args.tokens = 64, 2, 512, 2, 16, 4
        args.warmup, args.steps, args.rounds = 1, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "m", args.hidden, args.layers, args.vocab)
        result = steps(args, path)
    shape = f"llama {args.hidden} wide, {args.layers} layers, vocab {args.vocab}; batch {args.batch} × {args.seq} + {args.tokens}"
    print(json.dumps({"shape": shape, "step_ms": result}))
    base = result["mlx eager"]
    for k, v in result.items():
        print(f"{k:<14}{v:>10.2f} ms/step   ({base / v:.2f}× mlx eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
