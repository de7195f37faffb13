"""The adapters a server holds: every subfolder of one directory that holds an lrpt adapter.

A folder is served under its name. An adapter made for another base model (or unreadable) is
refused with one line and the others are served. :meth:`Registry.reload` rescans: new folders
are loaded, changed ones (a newer file) reloaded, vanished ones dropped; a changed one that no
longer loads is refused and its earlier version stays served. Requests already
running keep the prompt they started with, so a reload never disturbs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter
from ..errors import LrptError


@dataclass
class Served:
    """One served adapter: its name, the adapter (task included) and the backend's prompt module."""

    name: str
    adapter: Adapter
    prompt: object
    stamp: tuple


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "kept": self.kept, "removed": self.removed, "refused": self.refused}


class Registry:
    """Adapters of ``directory`` for ``model`` on ``backend`` (a backend module)."""

    def __init__(self, backend, model, directory: str | Path | None, base_name: str):
        self.backend, self.model, self.base_name = backend, model, base_name
        self.directory = Path(directory) if directory is not None else None
        self.adapters: dict[str, Served] = {}
        self._info = None

    def get(self, name: str) -> Served | None:
        return self.adapters.get(name)

    def reload(self) -> ReloadReport:
        """Rescan the directory (framework work: call it on the thread that owns the model).

        The new set of adapters replaces the old one in one assignment, so readers on other
        threads see either the old set or the new one.
        """
        report = ReloadReport()
        found = {} if self.directory is None else {
            p.name: p for p in sorted(self.directory.iterdir()) if p.is_dir() and (p / "adapter_config.json").is_file()
        }
        adapters = {}
        report.removed = sorted(set(self.adapters) - set(found))
        for name, path in found.items():
            held = self.adapters.get(name)
            try:
                stamp = _stamp(path)
                if held is not None and held.stamp == stamp:
                    adapters[name] = held
                    report.kept.append(name)
                    continue
                adapters[name] = self._load(name, path, stamp)
                report.loaded.append(name)
            except (LrptError, OSError) as exc:  # a half-written save, a file gone mid-scan, a bad adapter
                report.refused[name] = str(exc) + ("; the version loaded before is still served" if held else "")
                if held is not None:
                    adapters[name] = held
        self.adapters = adapters
        return report

    def _load(self, name: str, path: Path, stamp: tuple) -> Served:
        if name == self.base_name:
            raise LrptError(f"its name is the base model's name {self.base_name!r}: rename the folder")
        adapter = Adapter.load(path)
        if self._info is None:
            self._info = self.backend.base_model_info(self.model)
        adapter.check_model(self._info)
        prompt = self.backend.prompt_from_adapter(adapter, self.model)
        prompt.eval()  # no dropout when serving (LoPA heads)
        return Served(name, adapter, prompt, stamp)


def _stamp(path: Path) -> tuple:
    """What says an adapter folder changed: its two files' times and sizes (not the temp files a
    save in progress leaves beside them, which may vanish between listing and reading)."""
    return tuple((st.st_mtime_ns, st.st_size) for st in ((path / name).stat() for name in (CONFIG_NAME, WEIGHTS_NAME)))
