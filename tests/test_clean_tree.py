"""The suite writes nothing into the working tree: stores, artifact roots and outputs live in temp folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# The heaviest writers: artifacts of a real Lightning and HF run, a run opened without a logger,
# the report with its CSV, Markdown and plot.
HEAVY = ["tests/test_lightning_monitor.py::test_logs_the_metric_contract_per_epoch_and_evaluation_at_the_global_step",
         "tests/test_lightning_monitor.py::test_without_a_logger_opens_one_run_and_measures_test_per_sample",
         "tests/test_hf_monitor.py::test_logs_into_the_mlflow_callbacks_run_per_epoch",
         "tests/test_report.py"]
CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".pyc")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not any(c in str(p) for c in CACHES)}


@pytest.mark.slow
def test_the_heaviest_tests_leave_the_working_tree_as_it_was(tmp_path):
    """The heavy tests run in a copy of the checkout (its sources first on the path), so files that
    other work writes into this checkout meanwhile cannot confuse the comparison."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    tree = tmp_path / "checkout"
    for name in listed:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    before = _files(tree)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *HEAVY],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "green_callbacks/__init__.py" in before
    created = sorted(_files(tree) - before)
    assert not created, f"tests wrote into the working tree: {created[:20]}"
