"""EnergyMonitor in a real Hugging Face Trainer with a tiny model built from a config."""

from __future__ import annotations

import gc
import time

import mlflow
import psutil
import pytest
import torch
from transformers import Trainer, TrainingArguments

from green_callbacks.policies import MonitorError
from green_callbacks.sinks import launch
from green_callbacks.transformers import EfficiencyEarlyStopping, EnergyBudget, EnergyMonitor

from helpers import (
    CUMULATIVE,
    EPOCH_CONTRACT,
    EVAL_CONTRACT,
    DigitsDataset,
    artifacts,
    digits_tensors,
    hf_accuracy,
    hf_digits_model,
    hf_work_clock,
    history,
    ready_store,
    runs,
    steps,
)


@pytest.fixture(scope="module")
def digits():
    (xt, yt), (xv, yv) = digits_tensors()
    return DigitsDataset(xt[:512], yt[:512]), DigitsDataset(xv[:128], yv[:128])


def hf_trainer(tmp_path, digits, callbacks, epochs=3, report_to="none", **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=32, eval_strategy="epoch", logging_strategy="epoch", save_strategy=kw.pop(
            "save_strategy", "no"), report_to=report_to, use_cpu=True, disable_tqdm=True, learning_rate=5e-3, **kw)
    return Trainer(model=hf_digits_model(), args=args, train_dataset=digits[0], eval_dataset=digits[1],
                   compute_metrics=hf_accuracy, callbacks=callbacks)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = ready_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_logs_into_the_mlflow_callbacks_run_per_epoch(tmp_path, digits, tracking, fake_nvml):
    fake_nvml.configure(n=1)
    monitor = EnergyMonitor(gpus="all", output_dir=str(tmp_path / "out"))
    hf_trainer(tmp_path, digits, [monitor], report_to=["mlflow"]).train()
    client, found = runs(tracking)
    assert len(found) == 1, "HF's MLflowCallback run is the only run"
    run = found[0]
    assert history(client, run.info.run_id, "eval_accuracy"), "HF's own metrics are in the same run"
    ends = [16, 32, 48]  # 512 samples in batches of 32: 16 steps an epoch
    assert steps(client, run.info.run_id, "eval_accuracy") == ends
    for key in [*EPOCH_CONTRACT, *EVAL_CONTRACT, *CUMULATIVE, "efficiency/eval_accuracy_per_kj"]:
        assert steps(client, run.info.run_id, key) == ends, key
    epoch = dict(history(client, run.info.run_id, "energy/epoch_j"))
    val = dict(history(client, run.info.run_id, "energy/val_j"))
    acc = dict(history(client, run.info.run_id, "eval_accuracy"))
    cum = dict(history(client, run.info.run_id, "energy/cumulative_j"))
    eff = dict(history(client, run.info.run_id, "efficiency/eval_accuracy_per_kj"))
    assert all(0 < val[s] < epoch[s] for s in ends), "the evaluation after on_epoch_end is inside the epoch"
    assert [eff[s] for s in ends] == pytest.approx([acc[s] / (cum[s] / 1000) for s in ends])
    assert run.data.tags["green.method.gpu"] == "counter"
    assert "green_callbacks/power.png" in artifacts(client, run.info.run_id)


def test_resume_from_checkpoint_continues_the_totals(tmp_path, digits, tracking):
    def monitor():
        return EnergyMonitor(experiment_name="hf-resume", output_dir=str(tmp_path / "out"), log_artifacts=False)

    hf_trainer(tmp_path, digits, [monitor()], epochs=2, save_strategy="epoch").train()
    second = monitor()
    hf_trainer(tmp_path, digits, [second], epochs=4, save_strategy="epoch").train(resume_from_checkpoint=True)
    client, found = runs(tracking, "hf-resume")
    assert len(found) == 1, "the resumed training continues its own run"
    run_id = found[0].info.run_id
    epoch = history(client, run_id, "energy/epoch_j")
    assert [s for s, _ in epoch] == [16, 32, 48, 64]
    assert history(client, run_id, "energy/total_j")[-1][1] == pytest.approx(second.cumulative_j)
    assert second.cumulative_j >= sum(v for _, v in epoch)
    assert [r.epoch for r in second.records if r.kind.value == "epoch"] == [0, 1, 2, 3]


def test_monitor_and_stoppers_added_when_resuming_a_checkpoint_written_without_them(tmp_path, digits, tracking):
    # energy tracking added to a fine-tune under way: the next checkpoint save raised KeyError in HF's
    # _save_checkpoint (the resumed TrainerState had no entry for the new stateful callbacks)
    # (the monitor trained before, elsewhere: its own earlier state is not the checkpoint's, and its run not this one)
    hf_trainer(tmp_path / "plain", digits, [], epochs=1, save_strategy="epoch").train()
    monitor = EnergyMonitor(experiment_name="hf-added", output_dir=str(tmp_path / "out"), log_artifacts=False)
    hf_trainer(tmp_path / "before", digits, [monitor], epochs=1).train()
    trainer = hf_trainer(tmp_path / "plain", digits, [monitor, EfficiencyEarlyStopping(monitor="accuracy"),
                                                      EnergyBudget(energy="1 MJ")], epochs=3, save_strategy="epoch")
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 48
    saved = trainer.state.stateful_callbacks
    assert {"EnergyMonitor", "EfficiencyEarlyStopping", "EnergyBudget"} <= set(saved)
    assert saved["EnergyMonitor"]["attributes"]["green_state"]["records"], "the last checkpoint holds the totals"
    client, found = runs(tracking, "hf-added")
    assert len(found) == 2, "the earlier training's run, and the resumed training's own"
    resumed = next(r for r in found if r.info.run_id == monitor.run.run_id)
    epochs = history(client, resumed.info.run_id, "energy/epoch_j")
    assert [s for s, _ in epochs] == [32, 48]
    assert min(r.step for r in monitor.records) > 16, "counted from the resume: the earlier training left out"


def test_eval_on_start_is_measured_whole_and_checked_before_the_first_step(tmp_path, digits, tracking, fake_nvml):
    # HF's evaluation before training (eval_on_start) came before the stoppers attached (at on_epoch_begin): a typo
    # in the monitored name failed only at the next evaluation, after training; and its first batch was not measured
    fake_nvml.configure([{"profile": [(1.0, 250.0)]}], work_clock=True)  # 1 J an evaluation batch
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, output_dir=str(tmp_path / "out"), log_artifacts=False)
    hf_trainer(tmp_path, digits, [hf_work_clock(fake_nvml, eval_s=0.004), monitor, EnergyBudget(energy="1 MJ")],
               epochs=1, eval_on_start=True).train()
    client, (run,) = runs(tracking)
    assert history(client, run.info.run_id, "energy/eval_j")[0] == (0, pytest.approx(4.0))  # 128 samples, 32 a batch
    typo = EfficiencyEarlyStopping(monitor="acuracy")
    trainer = hf_trainer(tmp_path, digits, [EnergyMonitor(gpus="all", measure_cpu=False, output_dir=str(
        tmp_path / "out"), log_artifacts=False), typo], epochs=1, eval_on_start=True)
    with pytest.raises(MonitorError, match="acuracy"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_an_evaluate_before_train_goes_into_hfs_run(tmp_path, digits, tracking):
    # a baseline evaluate() before fine-tuning: HF's MLflowCallback opens its run while evaluate() logs, after the
    # batches; the energy goes there, beside HF's own eval_* at step 0, and the training's after it
    monitor = EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = hf_trainer(tmp_path, digits, [monitor], epochs=1, report_to=["mlflow"])
    t.evaluate()
    t.train()
    client, found = runs(tracking)
    assert len(found) == 1, [r.info.run_id for r in found]
    run_id = found[0].info.run_id
    assert history(client, run_id, "eval_accuracy")[0][0] == 0
    assert len(history(client, run_id, "energy/evaluate_j")) == 1
    assert history(client, run_id, "energy/epoch_j")


def test_an_evaluate_before_train_does_not_count_hfs_mlflow_set_up(tmp_path, digits, tracking):
    """HF's ``MLflowCallback`` sets up (imports MLflow, opens the store, starts its run, logs every argument) at an
    evaluate()'s first log, after the batches and before ``on_evaluate``: inside the evaluation's window (21.4 J and
    3.9 s for a 0.01-s evaluation, the next call 0.12 J). It is set up before the window opens."""
    from green_callbacks.transformers_trainer import calling_trainer, hf_mlflow_callback

    ready = []

    class Spy(EnergyMonitor):
        def begin_stage(self, name):
            ready.append(getattr(hf_mlflow_callback(calling_trainer()), "_initialized", None))
            super().begin_stage(name)

    monitor = Spy(output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = hf_trainer(tmp_path, digits, [monitor], epochs=1, report_to=["mlflow"])
    t.evaluate()
    assert ready == [True]  # HF's MLflow set up when the evaluation's window opened
    client, (run,) = runs(tracking)
    assert run.data.params.get("learning_rate")  # HF's set-up, its params in the run
    assert history(client, run.info.run_id, "energy/evaluate_j") and history(client, run.info.run_id, "eval_accuracy")


def test_a_predict_before_train_leaves_no_mlflow_run_active(tmp_path, digits, tracking):
    """HF's ``predict()`` logs nothing, so HF's ``MLflowCallback`` never sets up there: setting it up ahead (as for
    an ``evaluate()``) started a run that stayed active, and a later ``mlflow.start_run()`` raised."""
    monitor = EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    hf_trainer(tmp_path, digits, [monitor], epochs=1, report_to=["mlflow"]).predict(digits[1])
    assert mlflow.active_run() is None
    client, (run,) = runs(tracking)
    assert history(client, run.info.run_id, "energy/predict_j") and not run.data.params.get("learning_rate")


def test_a_second_train_logs_energy_beside_hfs_metrics(tmp_path, digits, tracking):
    """HF's ``MLflowCallback`` opens its run at the first ``train()`` only and ends it at the end: a second
    ``train()`` of the same Trainer sent HF's metrics to a run MLflow started on the fly, after the monitor had
    opened a run of its own: two runs, the energy in neither of HF's. Each training is one run, both series in it."""
    monitor = EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = hf_trainer(tmp_path, digits, [monitor], epochs=1, report_to=["mlflow"])
    t.train()
    t.train()
    client, found = runs(tracking)
    assert len(found) == 2, [r.info.run_id for r in found]
    for run in found:
        rid = run.info.run_id
        assert history(client, rid, "eval_accuracy") and history(client, rid, "energy/epoch_j"), rid
        assert run.data.params.get("learning_rate") and run.info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_evaluate_and_predict_report_joules_per_sample(tmp_path, digits, tracking):
    monitor = EnergyMonitor(experiment_name="hf-infer", output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = hf_trainer(tmp_path, digits, [monitor], epochs=1)
    t.train()
    t.evaluate()
    sender = monitor._idle_sink.sender_pid
    t.predict(torch.utils.data.Subset(digits[1], range(100)))  # batches of 32, 32, 32 and 4
    client, found = runs(tracking, "hf-infer")
    assert len(found) == 1
    run_id = found[0].info.run_id
    # the samples after the first batch, which precedes any HF hook: 128 - 32, and 100 - 32 (not 100 x 3/4 = 75)
    for stage, measured in (("evaluate", 96), ("predict", 68)):
        (_, joules), = history(client, run_id, f"energy/{stage}_j")
        (_, samples), = history(client, run_id, f"{stage}/samples")
        (_, per_sample), = history(client, run_id, f"energy/{stage}_j_per_sample")
        assert samples == measured
        assert per_sample == pytest.approx(joules / samples)
    # each call ends as train() did: the run FINISHED again (not left RUNNING), all of it confirmed by MLflow; its
    # sender is kept for the next call (a sender started per call, MLflow's imports and store: 2 s a call)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not monitor.started and monitor._idle_sink.sender_pid == sender
    (spool,) = (tmp_path / "out").glob("spool-*.jsonl")
    process = psutil.Process(sender)
    del t, monitor
    gc.collect()  # the monitor gone: its sender, told so, removes the spool and is kept for the next training
    deadline = time.monotonic() + 30
    while list((tmp_path / "out").glob("spool-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((tmp_path / "out").glob("spool-*")) == [], spool
    assert launch.IDLE._proc is not None and launch.IDLE._proc.pid == sender
    launch.IDLE.close()  # (or after IDLE_S, or at the process's end)
    process.wait(30)


def test_an_evaluate_after_train_goes_into_the_trainings_run(tmp_path, digits, tracking):
    """HF's ``MLflowCallback`` ends its run with the training and then logs an ``evaluate()``'s metrics with MLflow's
    fluent API, which started a run on the fly (no params, left RUNNING) while the energy went to the training's
    run. Both go to the training's run, FINISHED again afterwards; a ``predict()`` too."""
    monitor = EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = hf_trainer(tmp_path, digits, [monitor], epochs=1, report_to=["mlflow"])
    t.train()
    t.evaluate()
    t.predict(digits[1])
    client, found = runs(tracking)
    assert len(found) == 1, [(r.info.run_id, r.info.status, sorted(r.data.metrics)) for r in found]
    (run,) = found
    rid = run.info.run_id
    assert [s for s, _ in history(client, rid, "eval_accuracy")] == [16, 16]  # the training's and the evaluate()'s
    assert history(client, rid, "energy/evaluate_j") and history(client, rid, "energy/predict_j")
    assert run.info.status == "FINISHED" and mlflow.active_run() is None


def test_hf_timings_are_no_model_metrics():
    """HF adds ``eval_model_preparation_time`` to every evaluation after an ``evaluate()`` before ``train()`` (a
    common baseline): it was logged as an efficiency, ``efficiency/eval_model_preparation_time_per_kj``."""
    from green_callbacks.transformers_trainer import model_metrics

    metrics = {"eval_loss": 0.5, "eval_accuracy": 0.9, "eval_runtime": 1.2, "eval_samples_per_second": 100.0,
               "eval_steps_per_second": 3.0, "eval_model_preparation_time": 0.002, "eval_jit_compilation_time": 0.1,
               "epoch": 1.0}
    assert model_metrics(metrics) == {"eval_loss": 0.5, "eval_accuracy": 0.9}
