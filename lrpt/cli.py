"""The ``lrpt`` command.

Every subcommand lives in a small function; frameworks are imported only inside the
subcommands that need them, so ``lrpt inspect`` and ``lrpt --help`` start instantly and work
without torch or mlx. Any :class:`~lrpt.errors.LrptError` is printed as one line on stderr
and the command exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .adapter import Adapter
from .errors import LrptError

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


def _print_description(info: dict[str, Any]) -> None:
    spec = info["spec"]
    print(f"adapter        {info['path']}")
    print(f"format         lrpt v{info['format_version']}")
    print(f"method         {info['method']}")
    print(f"n_tokens       {info['n_tokens']}")
    print(f"dim            {info['dim']}")
    print(f"rank           {info['rank'] if info['rank'] is not None else '-'}")
    extras = {
        "lopt2": ("activation",),
        "lopa": ("gate", "encoder", "pooling", "head_hidden", "dropout"),
    }.get(info["method"], ())
    for key in extras:
        print(f"{key:<15}{spec[key]}")
    print(f"init           {spec['init']}" + (f" ({spec['init_text']!r})" if spec["init_text"] else ""))
    print(f"trainable      {info['trainable_params']:,} parameters")
    print("tensors")
    for name, t in info["tensors"].items():
        shape = "×".join(str(s) for s in t["shape"])
        print(f"  {name:<22} {shape:<14} {t['dtype']}")
    base = info["base_model"]
    if base:
        print(
            f"base model     {base.get('name_or_path') or '?'} ({base.get('model_type') or '?'},"
            f" hidden {base.get('hidden_size')}, vocab {base.get('vocab_size')})"
        )
    else:
        print("base model     -")
    task = info["task"]
    if task:
        words = ", ".join(repr(w) for w in task["label_words"])
        print(f"task           {task['name']} ({task['kind']}), template {task['template']!r}")
        if words:
            print(f"label words    {words}")
    else:
        print("task           -")
    made = info["created_by"] or {}
    print(f"created by     {made.get('backend') or '?'} backend, lrpt {made.get('lrpt_version') or '?'}")


def cmd_inspect(args: argparse.Namespace) -> int:
    adapter = Adapter.load(args.adapter)
    info = describe(adapter, args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LrptError as exc:
        print(f"lrpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lrpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
