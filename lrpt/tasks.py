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
        if not isinstance(self.name, str) or not self.name:
            raise DataError("task name must be a non-empty string")
        if self.kind not in KINDS:
            raise DataError(f"unknown task kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise DataError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if not isinstance(self.template, str):
            raise DataError("task template must be a string")
        try:
            fields = self.template_fields()
        except ValueError as exc:
            raise DataError(f"task template {self.template!r} is not a valid format string ({exc})") from None
        if not fields:
            raise DataError(f"task template {self.template!r} uses no field: write e.g. '{{text}}'")
        if self.kind == "classification":
            if not isinstance(self.label_words, list) or len(self.label_words) < 2:
                raise DataError(f"task {self.name!r} needs at least two label words")
            if not all(isinstance(w, str) and w for w in self.label_words):
                raise DataError(f"task {self.name!r} has an empty or non-string label word")
        return self

    def template_fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def format(self, example: dict[str, Any]) -> str:
        """The model input for one example."""
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
        return cls(**data).validate()


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
    "demo": Task("demo", template="Review: {sentence}\nSentiment:", label_words=[" negative", " positive"],
                 data="builtin:demo"),
}


def get_task(name: str) -> Task:
    """A registered task by name (a copy, so callers may change it)."""
    if name not in REGISTRY:
        raise DataError(f"unknown task {name!r}: use one of {', '.join(sorted(REGISTRY))}, or --data DIR")
    return Task.from_dict(REGISTRY[name].to_dict())
