"""Accuracy on four public tasks: lrpt's methods at their defaults against HF PEFT, 3 seeds each.

One job is (task, run, seed). Every job of a task trains on the same rows, in the same order for
a given seed (lrpt's length-bucketed order, :func:`lrpt.trainer.run_micro_batches`), for the
number of optimizer steps ``--steps`` gives them all (without it, each run's auto length: one pass,
at least 2,000 steps for lrpt's lopt1 and 1,000 for every other run, PEFT's too), at lrpt's
default batch size (16), with the same loss (cross-entropy over the label words'
log-probabilities at the answer position: every label word of these tasks is one SmolLM2 token),
AdamW with 6% warm-up and cosine decay, gradient clipping at 1.0, and is scored on the whole
validation split. Runs:

- ``zero-shot``: the frozen model, no prompt (one job per task);
- ``lrpt:METHOD[:key=value...]``: ``lrpt train`` with no tuning flags, i.e. the method's defaults
  (``lrpt.spec.METHOD_DEFAULTS``), ``--no-compile``; ``key=value`` overrides a PromptSpec field or
  ``lr`` (e.g. ``lrpt:lopa:lr=1e-3``, ``lrpt:lopt1:n_tokens=50``; ``init=text`` starts from ``INIT_TEXT``, as PEFT's TEXT init
  does; ``init=labels`` starts from the task's label words, repeated to n, Lester et al.'s class-label
  init, as text init; ``probe=1`` adds ``--lr-probe``, and the result's ``lr`` is the one it chose;
  ``uscale=C``, for ``lopt1`` only, starts from the same X = U V with U × C and V / C, which under Adam
  moves U's relative step size by 1/C and V's by C: the U/V balance of the start). Any run takes
  ``steps=N``, its own length (``peft-lora:lr=1e-3:steps=500``), ``average=F`` (``--average F``: the
  mean of the trainable parameters over the final F of the steps, :mod:`lrpt.average`; PEFT's runs
  average theirs the same way), ``schedule=NAME`` (``--schedule``) and ``deterministic=0``
  (``--no-deterministic``: on CUDA, the attention backward whose sums land in a varying order;
  PEFT's runs switch the same way). The job is what this command
  trains (with ``--lrpt-step auto``, without ``--no-compile``)::

      lrpt train --backend torch --model HF --data DATA/TASK --task TASK [--train-limit N] \\
          --method METHOD --seed SEED --no-compile --out RUN

- ``peft-prompt:init=text|labels|vocab:lr=X``: PEFT prompt tuning, n=20, PromptTuningInit TEXT (a
  one-line task instruction, ``INIT_TEXT``, or with ``labels`` the label words) or SAMPLE_VOCAB,
  right padding, logits at each row's last real token;
- ``peft-lora:lr=X``: PEFT LoRA r=8, alpha 16, on q_proj and v_proj.

Jobs run in ``--workers`` processes spread over ``--gpus`` (small models leave a GPU mostly idle,
so several jobs share one), seed by seed, longest tasks first; each result is one JSON line, printed and
appended to ``--out DIR/results.jsonl`` as it ends, so a run cut short keeps what it finished.
``--summary FILE...`` prints the mean ± sd table of such files.

    python3 benchmarks/accuracy.py --model HF --data ../shared/data --tasks sst2 rte cb trec \\
        --seeds 0 1 2 --workers 24 --gpus 0 1 --out acc/ --runs zero-shot lrpt:lopt1 peft-lora:lr=3e-4
    python3 benchmarks/accuracy.py --summary acc/results.jsonl
    python3 benchmarks/accuracy.py --smoke          # tiny random model, generated data (CPU test)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Rows each task trains on (None: all); SST-2's 67,349 are cut to a fixed-seed 2,000 (lrpt's
# --train-limit) to keep the grid inside the device time.
TRAIN_LIMIT = {"sst2": 2000, "rte": None, "cb": None, "trec": None}
INIT_TEXT = {  # PEFT's TEXT init: one line saying what the task asks
    "sst2": "Is the sentiment of this movie review negative or positive?",
    "rte": "Does the premise entail the hypothesis? Answer true or false.",
    "cb": "Does the premise entail the hypothesis? Answer true, false or neither.",
    "trec": "What type of answer does this question ask for?",
    "demo": "Is this review negative or positive?",
}
TOKENS = 20  # prompt length n of every prompt-tuning run
LONGEST_FIRST = ["sst2", "trec", "rte", "cb"]  # by steps × tokens at the defaults


def init_text(task, kind: str) -> str:
    """The text a ``text`` init starts from: the task's instruction, or (``labels``) its label words."""
    return "".join(task.label_words) if kind == "labels" else INIT_TEXT[task.name]


def parse_run(name: str) -> tuple[str, dict]:
    """``kind[:method][:key=value...]`` → (kind, settings); values are numbers where they parse."""
    kind, *parts = name.split(":")
    settings: dict = {}
    if kind == "lrpt":
        settings["method"] = parts.pop(0)
    for part in parts:
        key, _, value = part.partition("=")
        try:
            settings[key] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            settings[key] = value
    if kind not in ("zero-shot", "lrpt", "peft-prompt", "peft-lora"):
        raise SystemExit(f"unknown run {name!r}")
    return kind, settings


# -- one worker process -----------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(model_path: str, devices: list[str], counter) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _STATE.update(path=model_path, device=devices[index % len(devices)], data={})
    import torch

    torch.set_num_threads(1)  # many workers share the host's cores


def _model(fresh: bool = False):
    from lrpt.backends.torch import model as M

    if fresh or "model" not in _STATE:
        loaded = M.load_model(_STATE["path"], device=_STATE["device"], quiet=True)
        if fresh:
            return loaded
        _STATE["model"] = loaded
    return _STATE["model"]


def _data(task_name: str, data_root: str | None, smoke: bool):
    """(task, train rows, encoded validation) of a task, read once per worker."""
    from lrpt.data import encode_examples, load_examples
    from lrpt.tasks import get_task
    from lrpt.tokens import tokenize_fn

    if task_name not in _STATE["data"]:
        task = get_task(task_name)
        if smoke:
            from lrpt.demo_data import demo_rows

            train, val = demo_rows("train", 64), demo_rows("validation", 32)
        else:
            folder = Path(data_root) / task_name
            train = load_examples(task, "train", folder, limit=TRAIN_LIMIT.get(task_name), seed=0)
            val = load_examples(task, "validation", folder)
        _STATE["data"][task_name] = (task, train, encode_examples(task, tokenize_fn(_model()[1]), val))
    return _STATE["data"][task_name]


def run_job(job: dict) -> dict:
    """Train and score one (task, run, seed); the result as a JSON-able dict."""
    import torch

    if _STATE["device"].startswith("cuda"):
        torch.cuda.set_device(_STATE["device"])
    task, train_rows, val = _data(job["task"], job["data"], job["smoke"])
    kind, settings = parse_run(job["run"])
    if "steps" in settings:  # this run's own length (e.g. lrpt:lopt1:steps=500), for every kind
        job = {**job, "steps": int(settings.pop("steps"))}
    job = {**job, "train": {k: settings.pop(k) for k in ("average", "schedule", "deterministic") if k in settings}}
    t0 = time.perf_counter()
    try:
        if kind == "zero-shot":
            out = _score(task, val, None)
        elif kind == "lrpt":
            out = _lrpt(task, train_rows, val, settings, job)
        else:
            out = _peft(task, train_rows, val, kind, settings, job)
    except Exception as exc:  # a diverged or failed job is reported and the grid goes on
        out = {"accuracy": float("nan"), "error": f"{type(exc).__name__}: {exc}"}
    return {**job, **out, "seconds": round(time.perf_counter() - t0, 1), "device": _STATE["device"]}


def _config(job: dict, **extra):
    from lrpt.trainer import TrainConfig

    smoke = dict(batch_size=8, steps=job["steps"] or 6) if job["smoke"] else {"steps": job["steps"]} if job["steps"] else {}
    return TrainConfig(seed=job["seed"], progress=False, log_every=50,
                       **{"compile": False, **smoke, **job.get("train", {}), **extra})


def _score(task, val, prompt) -> dict:
    from lrpt.data import metric
    from lrpt.scoring import evaluate

    model, tok = _model()
    _, scores = evaluate(model, tok, prompt, task, val, batch_size=64)
    return _metrics(task, [e.target for e in val], scores.argmax(-1), metric)


def _metrics(task, labels, preds, metric) -> dict:
    k = len(task.label_words)
    return {"accuracy": metric("accuracy", labels, preds, k), "macro_f1": metric("macro_f1", labels, preds, k)}


def _lrpt(task, train_rows, val, settings: dict, job: dict) -> dict:
    from lrpt.backends.torch import model as M
    from lrpt.spec import METHOD_DEFAULTS, TRAIN_DEFAULTS, PromptSpec
    from lrpt.training import train

    model, tok = _model()
    method = settings.pop("method")
    lr = settings.pop("lr", None)
    probe = bool(settings.pop("probe", 0))  # lrpt train --lr-probe
    uscale = float(settings.pop("uscale", 1.0))
    if uscale != 1.0 and method != "lopt1":
        raise ValueError("uscale applies to lopt1 only")
    fields = {k: v for k, v in METHOD_DEFAULTS[method].items() if k not in TRAIN_DEFAULTS}
    if settings.get("init") in ("text", "labels"):  # the same texts PEFT's TEXT init gets
        settings["init"], settings["init_text"] = "text", init_text(task, settings["init"])
    spec = PromptSpec(method, **{"n_tokens": 4 if job["smoke"] else TOKENS, **fields, **settings})
    prompt = M.init_prompt(spec, model, tok, seed=job["seed"])
    if uscale != 1.0:  # the same prompt matrix, its factors rebalanced
        params = prompt.to_params()
        prompt.load_params({**params, "lopt.U": params["lopt.U"] * uscale, "lopt.V": params["lopt.V"] / uscale})
    # --lrpt-step auto: the step lrpt train takes with no flag (CUDA graphs on a GPU); else eager
    config = _config(job, lr=lr, lr_probe=probe, compile=None if job.get("lrpt_step") == "auto" else False)
    res = train(model, tok, prompt, task, train_rows, None, config)
    chosen = res.lr_probe.lr if res.lr_probe else config.for_method(method).lr
    out = {**_score(task, val, prompt), "params": spec.param_count(prompt.dim), "lr": chosen, "uscale": uscale,
           "average": config.for_method(method).average,
           "step_path": res.compile_choice.split(":")[0], "retried": res.retried,
           # the logged training loss (mean since the previous record, every --log-every steps): what a
           # run that ends at chance looked like while training
           "losses": [round(r["loss"], 4) for r in res.history if "loss" in r]}
    if res.lr_probe:  # every candidate's held-out loss, to study what the probe's choice tracks
        out["probe_losses"] = {f"{lr:.4g}": loss for lr, loss in res.lr_probe.losses.items()}
    return out


def _peft(task, train_rows, val, kind: str, settings: dict, job: dict) -> dict:
    """PEFT on the same micro-batches, steps, schedule and loss as lrpt's runs, right padding."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    from lrpt.average import TailAverage
    from lrpt.backends.torch import model as M
    from lrpt.backends.torch.step import deterministic_kernels
    from lrpt.data import encode_examples, lr_factor, metric
    from lrpt.tokens import label_token_ids, tokenize_fn
    from lrpt.trainer import plan, run_micro_batches

    model, tok = _model(fresh=True)  # PEFT changes the model it wraps
    lr, n = settings["lr"], (4 if job["smoke"] else TOKENS)
    if kind == "peft-prompt":
        vocab = settings["init"] == "vocab"
        init = PromptTuningInit.SAMPLE_VOCAB if vocab else PromptTuningInit.TEXT
        extra = {} if vocab else dict(prompt_tuning_init_text=init_text(task, settings["init"]),
                                      tokenizer_name_or_path=_STATE["path"])
        pcfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init=init, **extra)
    else:
        pcfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"])
        n = 0
    torch.manual_seed(job["seed"])
    pm = get_peft_model(model, pcfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # the adapter trains in float32, as lrpt's does
    config = _config(job, lr=lr)
    dev = model.device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=dev.type == "cuda")
    enc = encode_examples(task, tokenize_fn(tok), train_rows)
    words = label_token_ids(tok, task.label_words)
    if any(len(w) != 1 for w in words) and not job["smoke"]:  # the tiny test tokenizer splits words
        raise ValueError("the PEFT rows score one token per label word; a label word here has several")
    label_ids = torch.tensor([w[0] for w in words], device=dev)
    if config.grad_accum != 1:  # one micro-batch per step below
        raise ValueError("the PEFT rows take one micro-batch per optimizer step (grad_accum 1)")
    total, warmup = plan(config, len(enc))
    batches = list(run_micro_batches([len(e.ids) for e in enc], config))

    def scores(rows):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        with M.autocast(model):
            logits = pm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        last = torch.tensor([len(r) - 1 + n for r in rows], device=dev)
        return torch.log_softmax(logits[torch.arange(len(rows), device=dev), last].float(), -1)[:, label_ids]

    average = TailAverage(config.average, total) if config.average else None
    pm.train()
    with deterministic_kernels(dev, config.deterministic):  # as in lrpt's runs: a seed fixes the result
        for step in range(total):
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, total, warmup, config.schedule)
            idx = batches[step]
            y = torch.tensor([enc[i].target for i in idx], device=dev)
            torch.nn.functional.cross_entropy(scores([enc[i].ids for i in idx]), y).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if average is not None and average.due(step + 1):  # as lrpt's loop: steps counted from 1
                average.add({str(i): p.detach().cpu().numpy() for i, p in enumerate(params)}, step + 1)
    if average is not None:
        mean = average.mean()  # every tensor PEFT trains
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(torch.from_numpy(mean[str(i)]))
    pm.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(val), 64):
            preds += scores([e.ids for e in val[i: i + 64]]).argmax(-1).tolist()
    return {**_metrics(task, [e.target for e in val], preds, metric), "params": sum(p.numel() for p in params),
            "lr": lr}


# -- the driver -------------------------------------------------------------------------------------


def jobs_for(args) -> list[dict]:
    """Every (task, run, seed), seed by seed (a run cut short keeps fewer seeds of every task), the
    longest tasks first within a seed (zero-shot: once per task, with the first seed)."""
    order = sorted(args.tasks, key=lambda t: LONGEST_FIRST.index(t) if t in LONGEST_FIRST else len(LONGEST_FIRST))
    jobs = []
    for seed in args.seeds:
        for task in order:
            for run in [r for r in args.runs if seed == args.seeds[0] or r != "zero-shot"]:
                jobs.append({"task": task, "run": run, "seed": seed, "data": args.data, "smoke": args.smoke,
                             "steps": args.steps, "lrpt_step": args.lrpt_step})
    return jobs


def summary(rows: list[dict]) -> str:
    """Mean ± sd over seeds per task and run; the best lr of each PEFT kind (and init) marked *."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["run"])].append(r)
    def mean(rs: list[dict]) -> float:  # over the jobs that finished; none: never the best
        done = [r["accuracy"] for r in rs if "error" not in r]
        return statistics.fmean(done) if done else float("-inf")

    best: dict[tuple[str, str], str] = {}
    for (task, run), rs in groups.items():
        family = (task, run.split(":lr=")[0])
        if run.startswith("peft") and (family not in best or mean(rs) > mean(groups[(task, best[family])])):
            best[family] = run
    lines = [f"{'task':<6}{'run':<34}{'seeds':>6}{'accuracy % (mean ± sd)':>24}{'macro F1 %':>12}{'min':>7}"
             f"{'params':>10}"]
    for (task, run), rs in sorted(groups.items()):
        failed = [r for r in rs if "error" in r]
        rs = [r for r in rs if "error" not in r]
        if failed:
            lines.append(f"{task:<6}{run:<34} {len(failed)} failed: {failed[0]['error'][:120]}")
        if not rs:
            continue
        acc = [100 * r["accuracy"] for r in rs]
        f1 = [100 * r.get("macro_f1", float("nan")) for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        mark = "*" if best.get((task, run.split(":lr=")[0])) == run else " "
        params = rs[0].get("params")
        lines.append(f"{task:<6}{run + mark:<34}{len(rs):>6}{statistics.fmean(acc):>17.1f} ± {sd:>4.1f}"
                     f"{statistics.fmean(f1):>12.1f}{min(acc):>7.1f}{params if params is not None else '-':>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder of the base model (lrpt convert-model makes one from the GGUF)")
    ap.add_argument("--data", help="folder holding one sub-folder per task (train.jsonl, validation.jsonl)")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte", "cb", "trec"])
    ap.add_argument("--runs", nargs="+", default=["zero-shot", "lrpt:prompt", "lrpt:lopt1", "lrpt:lopt2", "lrpt:lopa"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--gpus", nargs="*", default=None, help="CUDA device indices (default: cuda:0, or the CPU)")
    ap.add_argument("--out", help="folder for results.jsonl")
    ap.add_argument("--summary", nargs="*", help="print the table of these results.jsonl files and stop")
    ap.add_argument("--smoke", action="store_true", help="tiny random model and generated data (CPU test)")
    ap.add_argument("--steps", type=int, help="train every job this many steps (a run's own steps=N wins)")
    ap.add_argument("--lrpt-step", choices=["eager", "auto"], default="eager",
                    help="lrpt jobs' training step: eager (as the tables so far) or auto, what `lrpt train` takes"
                         " with no flag (CUDA graphs on a GPU); PEFT jobs run eagerly either way")
    args = ap.parse_args(argv)
    if args.summary is not None:
        rows = [json.loads(line) for f in args.summary for line in Path(f).read_text().splitlines() if line.strip()]
        print(summary(rows))
        return 0
    for run in args.runs:
        parse_run(run)  # refuse a bad run name before any work
    if args.smoke:
        import tempfile

        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny

        args.model = str(save_tiny("llama", Path(tempfile.mkdtemp()) / "m"))
        args.tasks = ["demo"]
    import torch

    devices = [f"cuda:{g}" for g in args.gpus] if args.gpus else (["cuda:0"] if torch.cuda.is_available() else ["cpu"])
    jobs = jobs_for(args)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"jobs": len(jobs), "workers": args.workers, "devices": devices,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}), flush=True)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    rows = []
    with ctx.Pool(args.workers, _init_worker, (args.model, devices, counter), maxtasksperchild=None) as pool:
        for row in pool.imap_unordered(run_job, jobs):
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                with open(out / "results.jsonl", "a") as f:
                    f.write(line + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
