"""Tasks: how an example becomes model input and what the model must produce.

A :class:`Task` is stored inside every adapter, so evaluation and generation on the other
backend format inputs exactly as training did. Classification tasks score label words
(a verbalizer); completion tasks train on target tokens only.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import DataError

KINDS = ("classification", "completion")
METRICS = ("accuracy", "f1", "macro_f1")


@dataclass
class Task:
    """Template and target of a task.

    ``template`` is a ``str.format`` string over the example's fields (e.g.
    ``"Review: {sentence}\\nSentiment:"``). For classification, ``label_words[i]`` is the
    text whose log-probability after the templated input scores label ``i``.
    """

    name: str
    kind: str = "classification"
    template: str = "{text}"
    label_words: list[str] = field(default_factory=list)
    label_field: str = "label"
    metric: str = "accuracy"
    data: str | None = None  # HF dataset name or local directory the task reads by default
    completion_field: str = "completion"

    def validate(self) -> Task:
        """Check every field, so a task read from an adapter file cannot crash (or flood) its users later.

        Templates are ``str.format`` strings, which can do far more than substitute a field:
        ``{text:>2000000000}`` allocates gigabytes, ``{text.__class__}`` reads attributes.
        Only plain ``{identifier}`` placeholders are allowed.
        """
        if not isinstance(self.name, str) or not self.name:
            raise DataError("task name must be a non-empty string")
        check_text(self.name, "task name")
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise DataError(f"unknown task kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise DataError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        for key in ("label_field", "completion_field"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise DataError(f"task {key} must be a non-empty string, got {value!r}")
            check_text(value, f"task {key}")
        if self.data is not None and not isinstance(self.data, str):
            raise DataError(f"task data must be a string or null, got {self.data!r}")
        if not isinstance(self.template, str):
            raise DataError("task template must be a string")
        check_text(self.template, "task template")
        fields = self.template_fields()
        if not fields:
            raise DataError(f"task template {self.template[:60]!r} uses no field: write e.g. '{{text}}'")
        if not isinstance(self.label_words, list):
            raise DataError(f"task {self.name!r}: label words must be a list of strings")
        if self.kind == "classification":
            if len(self.label_words) < 2:
                raise DataError(f"task {self.name!r} needs at least two label words")
            for w in self.label_words:
                if not isinstance(w, str) or not w.strip():
                    raise DataError(f"task {self.name!r} has an empty or non-string label word {w!r}")
                check_text(w, "label word")
            seen: dict[str, str] = {}
            for w in self.label_words:
                if w.strip() in seen:
                    raise DataError(f"task {self.name!r} has the label word {w.strip()!r} twice: label words must differ")
                seen[w.strip()] = w
        return self

    def template_fields(self) -> list[str]:
        """The template's field names; anything but plain ``{identifier}`` placeholders is a :class:`DataError`."""
        try:
            parts = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise DataError(f"task template {self.template[:60]!r} is not a valid format string ({exc})") from None
        fields = []
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise DataError(
                    f"task template {self.template[:60]!r}: {{{name[:40]}{'!' + conversion if conversion else ''}"
                    f"{':' + spec[:20] if spec else ''}}} is not allowed; use plain named fields such as {{text}}"
                    " (no positions, attributes, indexes, conversions or format specs)"
                )
            fields.append(name)
        return fields

    def format(self, example: dict[str, Any]) -> str:
        """The model input for one example (its template fields must be text: ``None`` or ``3`` would
        become the words "None" and "3")."""
        for name in self.template_fields():
            value = example.get(name)
            if name in example and not isinstance(value, str):
                raise DataError(f"task {self.name!r}: field {name!r} is {type(value).__name__}, not text")
        try:
            return self.template.format(**example)
        except KeyError as exc:
            raise DataError(
                f"task {self.name!r}: example has no field {exc.args[0]!r} needed by the template"
                f" (fields: {', '.join(sorted(example))})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Task:
        if not isinstance(data, dict):
            raise DataError(f"task must be a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"task has unknown field(s) {', '.join(unknown)}")
        if "name" not in data:
            raise DataError("task has no 'name'")
        return cls(**data).validate()


def check_text(value: str, what: str) -> str:
    """Refuse strings that are not valid text: NUL, or lone surrogates (JSON allows ``"\\ud800"``)."""
    if "\x00" in value:
        raise DataError(f"{what} {value[:40]!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{what} {value[:40]!r} is not valid text (a lone surrogate)") from None
    return value


# -- the registry -------------------------------------------------------------------------------
# Templates follow the usual zero-shot formats for small instruction-tuned models; label words
# start with a space so that each is a word of its own after the template's colon.

REGISTRY: dict[str, Task] = {
    "sst2": Task("sst2", template="Review: {sentence}\nSentiment:", label_words=[" negative", " positive"],
                 data="glue/sst2"),
    "ag_news": Task("ag_news", template="Article: {text}\nTopic:",
                    label_words=[" world", " sports", " business", " science"], data="fancyzhx/ag_news"),
    "boolq": Task("boolq", template="{passage}\nQuestion: {question}?\nAnswer:", label_words=[" no", " yes"],
                  data="super_glue/boolq"),
    "cb": Task("cb", template="{premise}\nQuestion: {hypothesis} True, false or neither?\nAnswer:",
               label_words=[" true", " false", " neither"], metric="macro_f1", data="super_glue/cb"),
    "rte": Task("rte", template="{premise}\nQuestion: {hypothesis} True or false?\nAnswer:",
                label_words=[" true", " false"], data="super_glue/rte"),
    # TREC's 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM), read from a folder (--data DIR) of
    # text/label rows: the hub's copies name the label column differently from version to version.
    "trec": Task("trec", template="Question: {text}\nAnswer type:",
                 label_words=[" abbreviation", " description", " entity", " person", " location", " number"]),
    "demo": Task("demo", template="Review: {sentence}\nSentiment:", label_words=[" negative", " positive"],
                 data="builtin:demo"),
    # `make demo`'s task: no instruction in the template, so zero-shot the model does not know it is
    # asked for a topic; a soft prompt learns to ask (lrpt/demo_data.py writes the sentences).
    "topics": Task("topics", template="{sentence}\n", label_words=[" sports", " food", " weather", " music"],
                   data="builtin:topics"),
}


def get_task(name: str) -> Task:
    """A registered task by name (a copy, so callers may change it)."""
    if name not in REGISTRY:
        raise DataError(f"unknown task {name!r}: use one of {', '.join(sorted(REGISTRY))}, or --data DIR")
    return Task.from_dict(REGISTRY[name].to_dict())
