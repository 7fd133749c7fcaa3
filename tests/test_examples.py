"""Every example runs, in its short mode, so none rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import runs

EXAMPLES = Path(__file__).parents[1] / "examples"


def run_example(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("script", ["lightning_digits.py", "hf_digits.py"])
def test_digits_examples_print_their_table(tmp_path, script):
    out = run_example(tmp_path, str(EXAMPLES / script), "--quick").stdout
    assert "accuracy per kJ" in out and "MLflow run" in out and "_per_kj" in out


@pytest.mark.slow
def test_ddp_example_logs_one_run(tmp_path):
    run_example(tmp_path, str(EXAMPLES / "ddp_digits.py"), "--quick")
    _, (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db", "green-callbacks-ddp")
    assert run.data.params["green.world_size"] == "2"


@pytest.mark.slow
def test_lightning_cli_example(tmp_path):
    config = (EXAMPLES / "lightning_cli.yaml").read_text().replace("sqlite:///mlflow.db",
                                                                   f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "cli.yaml").write_text(config)
    run_example(tmp_path, str(EXAMPLES / "lightning_cli.py"), "fit", "--config", str(tmp_path / "cli.yaml"), "--quick")
    client, (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db", "green-callbacks-cli")
    assert len(client.get_metric_history(run.info.run_id, "energy/epoch_j")) <= 2  # --quick: 2 epochs
    assert run.data.params["green.price_per_kwh"] == "0.25 EUR"
    assert run.data.metrics["cost/cumulative"] > 0


@pytest.mark.slow
def test_hydra_example(tmp_path):
    run_example(tmp_path, str(EXAMPLES / "hydra_digits.py"), "--quick", "callbacks.budget.energy=2 kJ",
                f"hydra.run.dir={tmp_path}/hydra")
    client, (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db", "green-callbacks-hydra")
    assert len(client.get_metric_history(run.info.run_id, "energy/epoch_j")) <= 2  # --quick: 2 epochs
    assert run.data.params["green.carbon_intensity_label"] == "Germany (DEU)"


@pytest.mark.slow
def test_green_ai_comparison_is_one_run_per_model(tmp_path):
    out = run_example(tmp_path, str(EXAMPLES / "green_ai_comparison.py"), "--quick").stdout
    _, found = runs(f"sqlite:///{tmp_path}/mlflow.db", "green-ai-comparison")
    techniques = ["baseline", "bf16", "distilled", "pruned", "quantised"]
    # --quick: k=2 repeats, one run per model per repeat, tagged so the report can group them
    assert sorted(r.info.run_name for r in found) == sorted(techniques * 2)
    assert sorted((r.data.tags["technique"], r.data.tags["repeat"]) for r in found) == sorted(
        (t, str(k)) for t in techniques for k in range(2))
    assert all(r.info.run_name == r.data.tags["technique"] for r in found)
    assert all("energy/test_j_per_sample" in r.data.metrics for r in found)
    # the pruned model really is smaller: channels removed, not zeroed
    assert {r.data.params["hidden"] for r in found if r.info.run_name == "pruned"} == {"128"}
    assert "mean ± sd" in out and "inference mJ/sample" in out and "torch threads: 1" in out
    for t in techniques:
        assert any(line.startswith(t) and "±" in line for line in out.splitlines())
    # every technique's change from the baseline, and whether k=2 repeats resolve it
    for t in set(techniques) - {"baseline"}:
        (line,) = [line for line in out.splitlines() if line.startswith(t)]
        assert line.count(" %") >= 1 and ("resolved" in line or "within noise" in line or "no spread" in line)
