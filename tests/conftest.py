import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ARCHS, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny random HF folder per architecture, made once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}
