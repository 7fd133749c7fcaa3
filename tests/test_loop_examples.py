"""The plain-loop and Accelerate examples run, in their short mode (as tests/test_examples.py runs the others)."""

from __future__ import annotations

import pytest
from test_examples import EXAMPLES, run_example

from helpers import free_port, runs


@pytest.mark.slow
def test_plain_loop_example(tmp_path):
    out = run_example(tmp_path, str(EXAMPLES / "plain_loop.py"), "--quick").stdout
    _, (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db", "green-callbacks-plain-loop")
    assert "epoch 1: val_acc" in out and run.info.status == "FINISHED"
    assert "efficiency/val_acc_per_kj" in run.data.metrics and "throughput/samples_per_j" in run.data.metrics


@pytest.mark.slow
def test_accelerate_example_on_two_cpu_processes_logs_one_run(tmp_path):
    out = run_example(tmp_path, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "--main_process_port", str(free_port()), str(EXAMPLES / "accelerate_loop.py"), "--cpu",
                      "--quick").stdout
    _, (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db", "green-callbacks-accelerate")
    assert "2 processes" in out and run.info.status == "FINISHED"
    assert run.data.params["green.world_size"] == "2" and run.data.metrics["energy/total_j"] > 0
