"""The library's exception types.

Every error lrpt raises on purpose is an :class:`LrptError`, so callers (and the CLI) can
catch one type. Messages are one line: what is wrong, then what to do about it.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of another library's error, for one of ours: where it only names the field
    (``Validation error for field 'x':``), the line that says what is wrong comes with it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


class LrptError(Exception):
    """Base class of every error lrpt raises deliberately."""


class SpecError(LrptError, ValueError):
    """A prompt specification is impossible or unknown (bad method, rank, activation...)."""


class AdapterFormatError(LrptError):
    """An adapter directory or file is missing, corrupt, or not format v1."""


class BaseModelMismatchError(LrptError):
    """An adapter was made for a different base model than the one it is used with."""


class BackendUnavailableError(LrptError, ImportError):
    """A backend's framework is not installed (the message names the extra to install)."""


class DataError(LrptError):
    """A data set, data file or task definition cannot be used."""


class TrainingError(LrptError):
    """Training cannot go on (non-finite loss, unusable checkpoint...)."""


class ConversionError(LrptError):
    """An adapter or base model cannot be converted as asked."""


class ServeError(LrptError):
    """A request to ``lrpt serve`` cannot be served; carries the HTTP status and OpenAI error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
