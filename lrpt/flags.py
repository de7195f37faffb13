"""Command-line flags derived from dataclasses, and YAML configs that flags override.

Every field of :class:`lrpt.spec.PromptSpec` and :class:`lrpt.trainer.TrainConfig` is a
``lrpt train`` flag: the field's name (``head_hidden`` → ``--head-hidden``), type, default and
help text come from the dataclass, declared with :func:`knob`. A new field is a new flag, with
no list to keep in step. Values resolve in this order: the dataclass default, then
``-c/--config FILE.yaml`` (mlx-lm's convention), then the flags the user typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from .errors import LrptError, first_line


def knob(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that is also a command-line flag (``flag`` renames it, e.g. ``--tokens``)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def _base_type(hint: Any) -> tuple[type, bool]:
    """(type, optional) of an annotation such as ``int | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


def _number(kind: type, optional: bool, auto: bool = False):
    """A flag's parser: where unset means auto, ``auto`` unsets it (and only that word: ``off`` there
    would quietly mean the method's default, e.g. tail averaging on); other optional numbers take
    ``none``."""
    words = ("auto",) if auto else ("none", "null", "off")

    def parse(text: str):
        if optional and text.lower() in words:
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        return value  # ranges and finiteness: the dataclass's validate(), with its own message

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.optional = optional  # a config's null is allowed only where the flag can be unset
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add one flag per :func:`knob` field of ``cls``; return {dest: default} (CLI ``defaults`` win).

    Flags default to ``argparse.SUPPRESS`` so :func:`resolve` can tell what the user typed.
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, optional = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        name = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        auto = optional and (kind is bool or "unset: auto" in f.metadata["help"])
        shown = f"{f.metadata['help']} (default: {'auto' if auto and default is None else default})"
        if kind is bool:
            action = parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS, help=shown)
            action.auto = optional  # ``bool | None``: None means auto, and a config may say "auto"
        elif kind is str:
            parser.add_argument(name, dest=f.name, default=argparse.SUPPRESS, choices=f.metadata["choices"], help=shown)
        else:
            parser.add_argument(name, dest=f.name, type=_number(kind, optional, auto), default=argparse.SUPPRESS,
                                help=shown)
        out[f.name] = default
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of flag names to values; ``-`` and ``_`` are the same in keys."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LrptError(f"cannot read config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise LrptError(f"config {path} is not valid YAML: {first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise LrptError(f"config {path} must be a mapping of flag names to values, e.g. 'lr: 0.03'")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(args: argparse.Namespace, defaults: dict[str, Any], config: dict[str, Any], where: str,
            actions: dict[str, argparse.Action] | None = None) -> None:
    """Fill ``args`` in place: flags typed > ``config`` (from ``where``) > ``defaults``.

    Config values pass the same checks as typed flags (``actions``: the parser's, by dest).
    """
    # a key may be the flag's name where it differs from the field's (tokens: n_tokens)
    aliases = {o.lstrip("-").replace("-", "_"): dest for dest, a in (actions or {}).items() for o in a.option_strings
               if o.startswith("--") and not o.startswith("--no-")}  # --no-X is X: false, not an alias
    config = {aliases.get(k, k) if k not in defaults else k: v for k, v in config.items()}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise LrptError(f"{where}: unknown key {unknown[0]!r}; keys are the flag names of `lrpt train --help`")
    for name, default in defaults.items():
        if not hasattr(args, name):
            value = config.get(name, default)
            if name in config and actions and name in actions:
                value = check_value(actions[name], value, f"{where}: {name}")
            setattr(args, name, value)


def check_value(action: argparse.Action, value: Any, what: str) -> Any:
    """A config value as the flag would have parsed it (types, choices, booleans); null only where
    the flag can be unset (an on/off flag with ``auto``, an optional number, a text flag)."""
    switch = isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction))
    if value is None:
        if (switch and not getattr(action, "auto", False)) or not getattr(action.type, "optional", True):
            raise LrptError(f"{what} has no value: give it one, or drop the key")
        return None
    if switch:
        if value == "auto" and getattr(action, "auto", False):
            return None
        if not isinstance(value, bool):
            choices = "true, false or auto" if getattr(action, "auto", False) else "true or false"
            raise LrptError(f"{what} must be {choices}, not {value!r}")
        return value
    if action.type is not None:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise LrptError(f"{what}: {value!r} is not a number")
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise LrptError(f"{what}: {exc}") from None
    elif not isinstance(value, str):
        raise LrptError(f"{what} must be text, not {value!r}")
    if action.choices is not None and value not in action.choices:
        raise LrptError(f"{what}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def build(cls: type, args: argparse.Namespace, **extra: Any):
    """An instance of ``cls`` from the resolved flags (its :func:`knob` fields), plus ``extra``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**{**values, **extra})
    except TypeError as exc:
        raise LrptError(f"bad configuration: {exc}") from None
