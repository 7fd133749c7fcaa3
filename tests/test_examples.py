"""Every example runs, in its short mode, so none rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["lightning_digits.py", "hf_digits.py"])
def test_example_runs_and_prints_its_table(tmp_path, script):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy per kJ" in proc.stdout and "MLflow run" in proc.stdout
    assert "_per_kj" in proc.stdout
