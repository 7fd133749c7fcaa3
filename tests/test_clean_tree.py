"""The suite writes nothing into the working tree: stores, artifact roots and outputs live in temp folders.

``conftest.py`` lists the checkout's files when the session starts; the last test file of the suite
(``test_zz_clean_tree.py``) lists them again after every other test, the heaviest writers included (real
Lightning and HF runs with artifacts, runs opened without a logger, the report's CSV, Markdown and plot).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).parents[1]
SKIPPED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def tree_files(root: Path = ROOT) -> set[str]:
    """Every file under ``root`` except the virtual environment, git's own and caches."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED]
        found.update(os.path.relpath(os.path.join(folder, f), root) for f in files if not f.endswith(".pyc"))
    return found
