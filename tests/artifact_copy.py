"""copy_of: a private copy of a session-cached artifact (conftest.built_artifact) for a test that damages or
rebuilds it. A module of its own: `from conftest import ...` would pick whichever conftest.py was imported first."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst
