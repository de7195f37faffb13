"""The ``lrpt`` command.

Every subcommand lives in a small function; frameworks are imported only inside the
subcommands that need them, so ``lrpt inspect`` and ``lrpt --help`` start instantly and work
without torch or mlx. Any :class:`~lrpt.errors.LrptError` is printed as one line on stderr
and the command exits with code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__, flags
from .adapter import Adapter
from .data import load_examples
from .errors import DataError, LrptError, first_line
from .fetch import DEFAULT_MODEL
from .fileio import atomic_write
from .spec import METHOD_DEFAULTS, TRAIN_DEFAULTS, PromptSpec
from .tasks import REGISTRY, Task, get_task
from .trainer import TRAIN_CONFIG_FILE, TrainConfig, check_number, stored_config, stored_train_config

EXIT_USAGE = 2


def describe(adapter: Adapter, path: str | Path | None = None) -> dict[str, Any]:
    """Everything ``lrpt inspect`` shows, as plain data."""
    dim = adapter.dim
    return {
        "path": str(path) if path is not None else None,
        "format": "lrpt",
        "format_version": 1,
        "method": adapter.spec.method,
        "n_tokens": adapter.spec.n_tokens,
        "dim": dim,
        "rank": adapter.spec.rank,
        "spec": adapter.spec.to_dict(),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(adapter.params.items())},
        "trainable_params": adapter.spec.param_count(dim),
        "base_model": adapter.base_model.to_dict() if adapter.base_model else None,
        "task": adapter.task.to_dict() if adapter.task else None,
        "created_by": adapter.created_by,
    }


def printable(value: Any) -> str:
    """``value`` as text with control characters escaped: adapter fields must not drive the terminal."""
    text = str(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def _print_description(info: dict[str, Any]) -> None:
    _print_lines(_description_lines(info))


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        print(printable(line))


def _description_lines(info: dict[str, Any]) -> list[str]:
    """The text of ``lrpt inspect``; every line goes through :func:`printable` before it is shown."""
    out: list[str] = []
    add = out.append  # the lines are collected, then escaped as a whole
    spec = info["spec"]
    add(f"adapter        {info['path']}")
    add(f"format         lrpt v{info['format_version']}")
    add(f"method         {info['method']}")
    add(f"n_tokens       {info['n_tokens']}")
    add(f"dim            {info['dim']}")
    add(f"rank           {info['rank'] if info['rank'] is not None else '-'}")
    extras = {
        "lopt2": ("activation",),
        "lopa": ("gate", "encoder", "pooling", "head_hidden", "dropout"),
    }.get(info["method"], ())
    for key in extras:
        add(f"{key:<15}{spec[key]}")
    add(f"init           {spec['init']}" + (f" ({spec['init_text']!r})" if spec["init_text"] else ""))
    add(f"trainable      {info['trainable_params']:,} parameters")
    add("tensors")
    for name, t in info["tensors"].items():
        shape = "×".join(str(s) for s in t["shape"])
        add(f"  {name:<22} {shape:<14} {t['dtype']}")
    base = info["base_model"]
    if base:
        add(
            f"base model     {base.get('name_or_path') or '?'} ({base.get('model_type') or '?'},"
            f" hidden {base.get('hidden_size')}, vocab {base.get('vocab_size')})"
        )
    else:
        add("base model     -")
    task = info["task"]
    if task:
        words = ", ".join(repr(w) for w in task["label_words"])
        add(f"task           {task['name']} ({task['kind']}), template {task['template']!r}")
        if words:
            add(f"label words    {words}")
    else:
        add("task           -")
    made = info["created_by"] or {}
    add(f"created by     {made.get('backend') or '?'} backend, lrpt {made.get('lrpt_version') or '?'}")
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from .conversions.peft import describe_peft, is_peft_dir

    if is_peft_dir(args.adapter):
        info = describe_peft(args.adapter)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            lines = [f"{key:<19}{value}" for key, value in info.items() if key != "tensors"]
            lines.append("tensors")
            lines += [f"  {name:<22} {'×'.join(map(str, t['shape']))}" for name, t in info["tensors"].items()]
            if info["importable"]:
                lines.append(f"convert with: lrpt convert {args.adapter} OUT --to lrpt")
            _print_lines(lines)
        return 0
    adapter = Adapter.load(args.adapter)
    info = describe(adapter, args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0


# -- shared helpers ----------------------------------------------------------------------------


def _backend_and_model(args: argparse.Namespace):
    """Backend, model, tokenizer, backend name; sets ``args.context`` (the model's context length or None)."""
    from .backends import get_backend, resolve
    from .basemodel import context_length
    from .fetch import resolve_model

    backend = get_backend(args.backend)
    path = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    args.context = context_length(path)
    try:
        # quiet: our own progress bars only; fsdp (train): each GPU receives only its share of the blocks
        model, tokenizer = backend.load_model(path, dtype=args.dtype, quiet=True, fsdp=getattr(args, "fsdp", False))
    except LrptError:
        raise
    except Exception as exc:  # transformers/mlx-lm refusing a folder (e.g. a pickle it will not load) is the folder's fault
        first = first_line(exc)[:300]
        raise LrptError(f"cannot load the model in {path} ({type(exc).__name__}: {first})") from None
    return backend, model, tokenizer, resolve(args.backend)


def _check_prompt_fits(args: argparse.Namespace, n_tokens: int) -> int | None:
    """Room left after the prompt in the model's context (None: unknown); a prompt that does not fit is an error."""
    from .training import context_room

    context = getattr(args, "context", None)
    return None if context is None else context_room(context, n_tokens)


def _task_from_args(args: argparse.Namespace, fallback: Task | None = None) -> Task:
    """The task: --task, else the adapter's, else a custom one for --data; flags override its parts."""
    labels = getattr(args, "labels", None)
    template = getattr(args, "template", None)
    text_field = getattr(args, "text_field", None)
    if getattr(args, "task", None):
        task = get_task(args.task)
    elif fallback is not None:  # the adapter's task, with what the flags say changed
        task = Task.from_dict(fallback.to_dict())
    elif labels is not None:
        task = Task("custom", template="{" + (text_field or "text") + "}", label_words=[" x", " y"])
    elif getattr(args, "data", None) or template or text_field:
        task = Task("custom", kind="completion", template="{" + (text_field or "prompt") + "}")
    else:
        raise DataError("say what to train on: --task NAME, or --data DIR (with --labels for classification)")
    if labels is not None:
        words = [w.strip() for w in labels.split(",")]
        if len(words) < 2 or not all(words):
            raise DataError(f"--labels needs at least two non-empty words separated by commas, got {labels!r}")
        task.label_words = [" " + w for w in words]
    if template:
        task.template = template
    elif text_field and task.template_fields() != [text_field]:  # a task's own template, its one field renamed
        fields = task.template_fields()
        if len(fields) != 1:
            raise DataError(f"--text-field names one input field, but the {task.name} template has"
                            f" {len(fields) or 'no'} fields ({task.template!r}): pass --template with yours")
        task.template = task.template.replace("{" + fields[0] + "}", "{" + text_field + "}")
    if getattr(args, "label_field", None):
        task.label_field = args.label_field
    return task.validate()


def _examples(args: argparse.Namespace, task: Task, split: str, limit: int | None) -> list[dict]:
    """Checked rows (labels as indices), the same checks for train and eval (:func:`lrpt.data.check_rows`)."""
    return load_examples(task, split, getattr(args, "data", None), limit, seed=0,
                         log=lambda m: print(m, file=sys.stderr))


def _check_base(adapter: Adapter, backend, model, force: bool) -> None:
    adapter.check_model(backend.base_model_info(model), force=force)


# -- train / eval / generate ----------------------------------------------------------------------


# The data a run trains on, stored beside train_config.json so --resume reads the same rows.
# (--data may be another path on another machine, and --eval-limit only changes the evaluation.)
DATA_ARGS = ("task", "text_field", "label_field", "labels", "template", "train_limit")
# The model it trains, stored in the same file so that --resume needs no flag; a --model typed on
# resume may differ (the same model in another folder), and the checkpoint's fingerprint check decides.
MODEL_ARGS = ("model", "dtype")
DATA_ARGS_FILE = "data_args.json"


def _read_json(path: Path) -> dict[str, Any]:
    return stored_config(path) or {}


def _check_data_args(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The run's data and model flags, for a new run to record (the trainer writes them under its
    lock); a resumed run must use the data it recorded."""
    mine = {k: getattr(args, k) for k in DATA_ARGS + MODEL_ARGS}
    if Path(mine["model"]).exists():  # a folder: found again from any working directory
        mine["model"] = str(Path(mine["model"]).resolve())
    if not args.resume:
        return mine
    stored = _read_json(out / DATA_ARGS_FILE)
    changed = [f"{k} {stored[k]!r} → {mine[k]!r}" for k in DATA_ARGS if k in stored and stored[k] != mine[k]]
    if changed:
        raise LrptError(f"--resume with other data than the run's ({'; '.join(changed)}): drop those flags")
    return mine


# Speed settings only one backend takes; resuming on the other backend drops them (they change no result).
BACKEND_ONLY = {"torch": ("compile_mode", "compile_scope", "fsdp"), "mlx": ("grad_checkpoint",)}


def _run_settings(out: Path, backend: str) -> tuple[dict[str, Any], Adapter | None]:
    """What ``--resume`` starts from: the run's stored TrainConfig and its checkpoint's spec and task,
    so ``lrpt train --resume --out RUN`` needs no other flag (flags typed must agree with them);
    resumed on another ``backend``, without the speed settings only the run's backend takes."""
    from .trainer import RunDir

    stored = stored_train_config(out / TRAIN_CONFIG_FILE) or {}
    was = stored.pop("backend", None)
    if was != backend:
        for key in BACKEND_ONLY.get(was, ()):
            stored.pop(key, None)
    stored.update(_read_json(out / DATA_ARGS_FILE))
    ckpt = RunDir(out).latest_checkpoint()
    adapter = Adapter.load(ckpt / "adapter") if ckpt else None
    if adapter is not None:
        stored.update(adapter.spec.to_dict())
        if stored.get("rank") is None:
            stored.pop("rank")  # the CLI's default rank applies to a prompt-method run's flags
    return stored, adapter


def cmd_train(args: argparse.Namespace) -> int:
    import time

    config = flags.load_config(args.config) if getattr(args, "config", None) else {}
    out = getattr(args, "out", None) or config.get("out")
    if not out:
        raise LrptError("say where the run goes: --out DIR")
    for key in ("resume", "backend"):  # needed before the other keys resolve: a resumed run reads its own
        if not hasattr(args, key) and key in config:
            setattr(args, key, flags.check_value(args.train_actions[key], config[key], f"{args.config}: {key}"))
    if getattr(args, "resume", False):
        from .backends import resolve

        run_settings, resumed = _run_settings(Path(out), resolve(getattr(args, "backend", None) or "auto"))
    else:
        run_settings, resumed = {}, None
    given = {**run_settings, **config}
    # The method's own defaults (rank, LoPA's h′; its lr and average are TrainConfig's auto) under typed
    # flags and config.
    method = getattr(args, "method", None) or given.get("method") or args.train_defaults["method"]
    per_method = {k: v for k, v in METHOD_DEFAULTS.get(method, {}).items() if k not in TRAIN_DEFAULTS}
    flags.resolve(args, {**args.train_defaults, **per_method}, given, args.config or "--resume", args.train_actions)
    out = Path(args.out)
    start_from = Adapter.load(args.init_from) if args.init_from else None
    known = start_from or resumed
    # Every flag is checked before any work (the optimizer, built late, crashes on --lr nan).
    spec = None if start_from else flags.build(PromptSpec, args, rank=None if args.method == "prompt" else args.rank)
    if spec is not None:
        spec.validate()
    # --compile-mode alone asks for compilation; --no-compile wins over a mode (the printed choice says so).
    compile_ = True if args.compile is None and args.compile_mode else args.compile
    train_config = flags.build(TrainConfig, args, compile=compile_).validate()
    if args.eval_limit is not None:
        check_number("eval_limit", args.eval_limit, low=0, integer=True)
    task = _task_from_args(args, known.task if known else None)
    train_rows = _examples(args, task, "train", args.train_limit)
    eval_rows = _examples(args, task, "validation", args.eval_limit) if args.eval_limit != 0 else None
    backend, model, tokenizer, name = _backend_and_model(args)
    _check_prompt_fits(args, (spec or start_from.spec).n_tokens)
    data_args = _check_data_args(args, out)
    if start_from is not None:
        _check_base(start_from, backend, model, args.force)
        prompt = backend.prompt_from_adapter(start_from, model)
    else:
        prompt = backend.init_prompt(spec, model, tokenizer, seed=train_config.seed)
    began = time.perf_counter()
    result = backend.train(model, tokenizer, prompt, task, train_rows, eval_rows, train_config, out,
                           resume=args.resume, context=args.context, truncate=not args.no_truncate,
                           log=lambda m: print(f"lrpt: {m}", file=sys.stderr, flush=True),
                           run_files={DATA_ARGS_FILE: data_args})
    seconds = time.perf_counter() - began
    spec = prompt.spec
    rows = [("backend", name), ("method", spec.method), ("prompt tokens", spec.n_tokens),
            ("rank", spec.rank if spec.rank is not None else "-"),
            ("trainable parameters", f"{spec.param_count(prompt.dim):,}"),
            ("training examples", len(train_rows))]
    if result.truncated:
        rows.append(("truncated inputs", f"{result.truncated} (longer than the model's context)"))
    if result.compile_choice:
        rows.append(("training step", result.compile_choice))
    rows += [("steps", result.step),
            ("final train loss", f"{result.final_loss:.4f}")]
    if result.averaged:
        rows.append(("final prompt", result.averaged))
    if result.retried:
        rows.append(("retried", result.retried))
    if result.best_metric is not None:
        metric = task.metric if task.kind == "classification" else "loss (per target token)"  # completion: NLL
        rows.append((f"best validation {metric}", f"{result.best_metric:.4f} (step {result.best_step})"))
    if result.baseline is not None:
        rows.append(("majority-label baseline", f"{result.baseline[0]:.4f} (always {result.baseline[1]!r})"))
    rows += [("early stop", "yes" if result.stopped_early else "no"), ("time", f"{seconds:.1f} s"),
             ("adapter", result.adapter_dir)]
    plot = _plot(out)
    if plot:
        rows.append(("curves", str(plot)))
    _table(rows)
    return 0


def _table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 40))


def _plot(out: Path) -> Path | None:
    """Loss and validation curves as a PNG, when matplotlib (the ``plot`` extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_metric"]) for r in records if "eval_metric" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="validation")
        ax2.set_ylabel("validation metric")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = out / "curves.png"
    atomic_write(path, buffer.getvalue())
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import check_split, encode_examples, fit_to_context, majority_baseline, metric
    from .tokens import label_token_ids, target_tokenize_fn, tokenize_fn

    check_split(args.split)
    if args.limit is not None:
        check_number("limit", args.limit, low=1, integer=True, error=DataError)
    check_number("batch_size", args.batch_size, low=1, integer=True, error=DataError)
    adapter = Adapter.load(args.adapter)
    task = _task_from_args(args, adapter.task)
    if args.predictions and task.kind == "completion":
        raise DataError("--predictions writes label predictions, and this is a completion task (its eval reports"
                        " the completions' NLL and perplexity): drop --predictions")
    rows = _examples(args, task, args.split, args.limit)
    backend, model, tokenizer, _ = _backend_and_model(args)
    _check_base(adapter, backend, model, args.force)
    room = _check_prompt_fits(args, adapter.spec.n_tokens)
    prompt = backend.prompt_from_adapter(adapter, model)
    hf = backend.hf_tokenizer(tokenizer)
    data = encode_examples(task, tokenize_fn(hf), rows, target_tokenize_fn(hf))
    reserve = max(map(len, label_token_ids(hf, task.label_words))) if task.kind == "classification" else 0
    cut = fit_to_context(data, room, reserve, truncate=not args.no_truncate)
    if task.kind == "completion":
        return _eval_completion(args, backend, model, tokenizer, prompt, task, rows, data, cut)
    scores = _score_with_progress(backend, model, tokenizer, prompt, task, data, args.batch_size)
    preds = scores.argmax(-1).tolist()
    labels = [r[task.label_field] for r in rows]
    k = len(task.label_words)
    result = {"task": task.name, "split": args.split, "examples": len(rows),
              "accuracy": metric("accuracy", labels, preds, k)}
    if cut:
        result["truncated"] = cut
    if task.metric != "accuracy":
        result[task.metric] = metric(task.metric, labels, preds, k)
    # what always answering the most frequent label scores on these rows: the floor a useful prompt beats
    result["majority_baseline"], result["majority_label"] = majority_baseline(task, labels)
    if args.predictions:
        lines = [json.dumps({"idx": r.get("idx", i), "label": labels[i], "pred": preds[i],
                             "scores": [round(float(x), 6) for x in scores[i]]}) for i, r in enumerate(rows)]
        atomic_write(args.predictions, ("\n".join(lines) + "\n").encode())
        result["predictions"] = str(args.predictions)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()])
    return 0


def _eval_completion(args, backend, model, tokenizer, prompt, task: Task, rows: list[dict], data, cut: int) -> int:
    """Mean negative log-likelihood of the completion tokens, and its perplexity."""
    import math

    metrics, _ = backend.evaluate(model, tokenizer, prompt, task, data, args.batch_size)
    result = {"task": task.name, "split": args.split, "examples": len(rows), "loss": metrics["loss"],
              "perplexity": math.exp(min(metrics["loss"], 50.0))}
    if cut:
        result["truncated"] = cut
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()])
    return 0


def _score_with_progress(backend, model, tokenizer, prompt, task: Task, data, batch_size):
    """Label scores of encoded (length-checked) examples, in chunks behind a progress bar."""
    import numpy as np

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety
        def tqdm(x, **_):
            return x
    chunk = batch_size * 8
    parts = [backend.evaluate(model, tokenizer, prompt, task, data[i : i + chunk], batch_size)[1]
             for i in tqdm(range(0, len(data), chunk), desc="eval", unit="chunk", file=sys.stderr)]
    return np.concatenate(parts) if parts else np.zeros((0, len(task.label_words)))


def cmd_generate(args: argparse.Namespace) -> int:
    check_number("temperature", args.temperature, low=0, high=100, error=DataError)
    check_number("top_p", args.top_p, low=0, high=1, low_open=True, error=DataError)
    check_number("max_tokens", args.max_tokens, low=1, integer=True, error=DataError)
    if args.seed is not None:
        check_number("seed", args.seed, low=0, high=2**32 - 1, integer=True, error=DataError)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise DataError("no input: pass TEXT arguments or lines on stdin")
    adapter = Adapter.load(args.adapter) if args.adapter else None
    backend, model, tokenizer, _ = _backend_and_model(args)
    room = _check_prompt_fits(args, adapter.spec.n_tokens if adapter else 0)
    if room is not None and args.max_tokens >= room:
        raise DataError(f"--max-tokens {args.max_tokens} does not fit the model's context ({room} tokens after the"
                        " prompt): lower it")
    prompt = None
    if adapter is not None:
        _check_base(adapter, backend, model, args.force)
        prompt = backend.prompt_from_adapter(adapter, model)
        task = adapter.task
        if task is not None and not args.raw:
            fields = task.template_fields()
            if len(fields) == 1:
                texts = [task.template.format(**{fields[0]: t}) for t in texts]
            elif fields:  # one text cannot fill two fields: say so, rather than drop the template unseen
                print(f"lrpt: the adapter's template has {len(fields)} fields ({', '.join(fields)}): each text goes"
                      " in as it is, as with --raw (write the template's text yourself)", file=sys.stderr)
    if room is not None:  # an input past the context would index past the position table (a crash on CUDA)
        from .tokens import encode_texts

        for i, ids in enumerate(encode_texts(backend.hf_tokenizer(tokenizer), texts)):
            if len(ids) + args.max_tokens > room:
                raise DataError(f"input {i + 1} has {len(ids)} tokens: with --max-tokens {args.max_tokens} it does not"
                                f" fit the model's context ({room} tokens after the prompt): shorten it or lower"
                                " --max-tokens")
    outs = backend.generate(model, tokenizer, prompt, texts, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            stop=args.stop or None, compile=args.compile)
    if args.json:
        print(json.dumps([{"input": t, "output": o} for t, o in zip(texts, outs)], indent=2))
    else:
        for out in outs:
            print(out)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .conversions.lowrank import compress, to_prompt
    from .conversions.peft import from_peft, is_peft_dir, to_peft

    src = Path(args.src)
    adapter = from_peft(src, args.task_index) if is_peft_dir(src) else Adapter.load(src)
    notes = []
    if args.method == "lopt1":
        rank = "auto" if args.rank == "auto" else _int(args.rank, "--rank")
        result = compress(adapter, rank, args.tol)
        adapter = result.adapter
        notes.append(f"rank {result.rank}: relative error {result.relative_error:.4g},"
                     f" {result.param_ratio:.3f}× the parameters")
    elif args.method == "prompt":
        adapter = to_prompt(adapter)
    if args.to == "peft":
        to_peft(adapter, args.dst, args.dtype)
    else:
        adapter.save(args.dst, dtype=args.dtype)
    print(f"wrote {args.to} adapter {args.dst} ({adapter.spec.method}, {adapter.param_count:,} parameters)"
          + ("; " + "; ".join(notes) if notes else ""))
    return 0


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{flag} must be an integer or 'auto', got {value!r}") from None


def cmd_convert_model(args: argparse.Namespace) -> int:
    from .conversions.gguf import gguf_to_hf

    out = gguf_to_hf(args.gguf, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (loads with transformers and mlx-lm)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(m) is None]
    if missing:
        raise LrptError(f"lrpt serve needs {', '.join(missing)}, which is not installed: pip install 'lrpt[serve]'")
    from .serve.server import run

    return run(args)


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"], help="framework (default: auto)")
    if model:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF folder or hub name (default: {DEFAULT_MODEL})")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="model dtype (default: torch bf16 on CUDA, float32 elsewhere; mlx the checkpoint's own)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="registered task: " + ", ".join(sorted(REGISTRY)))
    p.add_argument("--data", help="directory of train.jsonl / validation.jsonl")
    p.add_argument("--text-field", help="field holding the input text (custom data)")
    p.add_argument("--label-field", help="field holding the label (default: label)")
    p.add_argument("--labels", help="comma-separated label words in label order, e.g. 'negative,positive'")
    p.add_argument("--template", help="input template over the fields, e.g. 'Q: {text}\\nA:'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrpt", description="Low-rank soft prompts for frozen language models (PyTorch and MLX)."
    )
    parser.add_argument("--version", action="version", version=f"lrpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show what an adapter directory holds")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    per_method = "; ".join(f"{m}: " + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in d.items())
                           for m, d in METHOD_DEFAULTS.items())
    p = sub.add_parser("train", help="train a soft prompt on a frozen model",
                       epilog=f"Defaults per method, where no flag or config key sets them: {per_method}.")
    _common(p)
    _data_args(p)
    p.add_argument("-c", "--config", help="YAML file of flag values (keys are flag names); typed flags override it")
    p.add_argument("--init-from", help="continue training this saved adapter")
    p.add_argument("--train-limit", type=int, help="use N training rows (fixed-seed subset)")
    p.add_argument("--eval-limit", type=int, help="use N validation rows (0: no evaluation)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="with --init-from: accept a fingerprint mismatch (a variant of the adapter's model)")
    p.add_argument("--no-truncate", action="store_true", help="refuse inputs longer than the model's context")
    p.add_argument("--out", help="run directory (required)")
    # Every PromptSpec and TrainConfig field is a flag, derived from the dataclasses.
    spec_group = p.add_argument_group("prompt (PromptSpec)")
    train_group = p.add_argument_group("training (TrainConfig)")
    defaults = {**flags.add_flags(spec_group, PromptSpec, {"rank": "per method"}),
                **flags.add_flags(train_group, TrainConfig)}
    # Every train flag defaults to "absent", so a -c config can fill what was not typed (argparse
    # offers no other way to tell a typed flag from its default than these actions).
    for action in p._actions:
        if action.dest not in ("help", "config") and action.default is not argparse.SUPPRESS:
            defaults[action.dest] = action.default
            action.default = argparse.SUPPRESS
    p.set_defaults(func=cmd_train, train_defaults=defaults, train_actions={a.dest: a for a in p._actions})

    p = sub.add_parser("eval", help="score an adapter on a classification task")
    _common(p)
    _data_args(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--split", default="validation", help="split name: reads SPLIT.jsonl from --data")
    p.add_argument("--limit", type=int, help="evaluate N rows (fixed-seed subset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--predictions", help="write one JSON line per example: idx, label, pred, scores")
    p.add_argument("--json", action="store_true")
    p.add_argument("--force", action="store_true", help="accept an embedding-fingerprint mismatch")
    p.add_argument("--no-truncate", action="store_true", help="refuse inputs longer than the model's context")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text with an adapter")
    _common(p)
    p.add_argument("text", nargs="*", help="inputs (default: lines of stdin)")
    p.add_argument("--adapter", help="adapter directory (none: the plain model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the adapter's task template")
    p.add_argument("--compile", action="store_true",
                   help="torch: decode with a static cache under torch.compile (pays for long outputs on CUDA)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {input, output}")
    p.add_argument("--force", action="store_true", help="accept an embedding-fingerprint mismatch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the adapters of a directory behind an OpenAI-compatible API")
    _common(p)
    p.add_argument("--adapters", help="directory whose subfolders are adapters, served under their folder names")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default 32)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on SIGTERM before they are cancelled")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert adapters: lrpt <-> HF PEFT, prompt <-> lopt1, smaller dtypes")
    p.add_argument("src", help="lrpt or HF PEFT adapter directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", default="lrpt", choices=["lrpt", "peft"])
    p.add_argument("--method", choices=["prompt", "lopt1"], help="lopt1: compress by SVD; prompt: materialize")
    p.add_argument("--rank", default="auto", help="rank for --method lopt1, or 'auto' (smallest within --tol)")
    p.add_argument("--tol", type=float, default=0.01, help="relative Frobenius error allowed with --rank auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bf16", "bfloat16", "fp16", "float16"])
    p.add_argument("--task-index", type=int, default=0, help="task k of a PEFT multitask prompt")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("convert-model", help="convert a GGUF base model into an HF folder for both backends")
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LrptError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:  # unreadable or unwritable paths: the user's to fix, no traceback needed
        _error(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lrpt: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> None:
    """One line on stderr, escaped, and on a line of its own even when a progress bar was drawing."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()  # ends the bar's line
        except Exception:  # a broken bar must not hide the error
            pass
    sys.stderr.flush()
    print(f"lrpt: error: {printable(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
