"""MLflow away: nothing is lost. A real ``mlflow server`` on 127.0.0.1, stopped and restarted."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from test_hf_monitor import digits, hf_trainer  # noqa: F401 - digits is a fixture
from test_lightning_monitor import ValModel, trainer
from transformers import TrainerCallback

from green_callbacks.cli import main as cli
from green_callbacks.lightning import EnergyMonitor
from green_callbacks.sinks import MlflowSink, find_or_start_run, read_spool
from green_callbacks.transformers import EnergyMonitor as HfEnergyMonitor

from helpers import MlflowServer, history, runs


@pytest.fixture
def server(tmp_path, monkeypatch):
    # fail fast against a dead server instead of MLflow's minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    s = MlflowServer(tmp_path)
    s.start()
    yield s
    s.stop()


@pytest.mark.slow
def test_server_killed_mid_training_and_restarted_loses_no_epoch(tmp_path, server, green_log):
    class Outage(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                server.stop()
            if trainer.current_epoch == 2:
                server.start()

    monitor = EnergyMonitor(tracking_uri=server.uri, experiment_name="outage", output_dir=str(tmp_path / "out"))
    trainer(tmp_path, [monitor, Outage()], max_epochs=5).fit(ValModel())
    client, (run,) = runs(server.uri, "outage")
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [0, 1, 2, 3, 4]
    assert "green_callbacks/summary.json" in [a.path for a in client.list_artifacts(run.info.run_id, "green_callbacks")]
    assert green_log.text.count("is unavailable") == 1
    assert not list((tmp_path / "out").glob("spool-*.jsonl")), "the spool is emptied once all was sent"


@pytest.mark.slow
def test_hf_server_killed_mid_training_and_restarted_loses_no_epoch(tmp_path, server, green_log, digits):  # noqa: F811
    class Outage(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if round(state.epoch) == 1:
                server.stop()
            if round(state.epoch) == 3:
                server.start()

    monitor = HfEnergyMonitor(tracking_uri=server.uri, experiment_name="outage-hf", output_dir=str(tmp_path / "out"))
    hf_trainer(tmp_path, digits, [monitor, Outage()], epochs=5).train()
    client, (run,) = runs(server.uri, "outage-hf")
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [0, 1, 2, 3, 4]
    assert "green_callbacks/summary.json" in [a.path for a in client.list_artifacts(run.info.run_id, "green_callbacks")]
    assert green_log.text.count("is unavailable") == 1
    assert not list((tmp_path / "out").glob("spool-*.jsonl")), "the spool is emptied once all was sent"


@pytest.mark.slow
def test_server_that_never_returns_leaves_a_complete_spool_to_replay(tmp_path, server, green_log, capsys):
    run = find_or_start_run(tracking_uri=server.uri, experiment_name="gone")
    spool = tmp_path / "spool.jsonl"
    sink = MlflowSink(run, spool, retry_s=0.2)
    sink.log_metrics({"energy/epoch_j": 1.0}, step=0)
    assert sink.flush(timeout_s=30)
    server.stop()
    for step in (1, 2, 3):
        sink.log_metrics({"energy/epoch_j": float(step + 1)}, step=step)
    sink.set_tags({"green.method.gpu": "counter"})
    assert sink.close(timeout_s=5) is False
    records = read_spool(spool)
    assert [r.step for _, _, r in records if r.kind == "metrics"] == [1, 2, 3]
    assert "green-callbacks replay" in green_log.text
    # the documented command sends it once the server is back
    server.start()
    assert cli(["replay", str(spool)]) == 0
    assert "sent 4 records" in capsys.readouterr().out
    client, _ = runs(server.uri)
    assert history(client, run.run_id, "energy/epoch_j") == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    assert client.get_run(run.run_id).data.tags["green.method.gpu"] == "counter"
    assert not spool.exists()


def test_unwritable_spool_warns_once_and_logging_goes_on(tmp_path, green_log):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = find_or_start_run(tracking_uri=uri)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = MlflowSink(run, blocker / "spool.jsonl")  # its parent is a file: every write fails
    for step in range(3):
        sink.log_metrics({"energy/epoch_j": float(step)}, step=step)
    assert sink.close(timeout_s=30)
    client, _ = runs(uri)
    assert [s for s, _ in history(client, run.run_id, "energy/epoch_j")] == [0, 1, 2]
    assert green_log.text.count("cannot write its spool") == 1
