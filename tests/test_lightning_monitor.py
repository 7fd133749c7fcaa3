"""EnergyMonitor in a real Lightning Trainer, logging into a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import MLFlowLogger

from green_callbacks.accounting import J_PER_KWH
from green_callbacks.lightning import EnergyBudget, EnergyMonitor
from green_callbacks.outputs import summary

from helpers import CUMULATIVE, EPOCH_CONTRACT, EVAL_CONTRACT, artifacts, history, ready_store, records_of, runs, steps


class ValModel(BoringModel):
    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val_loss", out["x"])
        self.log("val_score", 1.0 + self.current_epoch)
        return out


def trainer(tmp_path, callbacks, max_epochs=3, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)



def test_a_training_on_the_second_gpu_says_which_card_its_gpu0_metrics_are(tmp_path, fake_nvml):
    _, second = fake_nvml.configure(n=2)
    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(gpus=[1], output_dir=str(tmp_path / "out"))
    trainer(tmp_path, [monitor], max_epochs=1, logger=MLFlowLogger(experiment_name="lit", tracking_uri=uri)).fit(
        ValModel())
    client, (run,) = runs(uri, "lit")
    assert history(client, run.info.run_id, "energy/gpu0_j"), "metrics number GPUs job-wide, from 0"
    assert run.data.tags["green.gpu_names"] == f"gpu0 = cuda:1 Fake H100 ({second.uuid})"


def test_logs_the_metric_contract_per_epoch_and_evaluation_at_the_global_step(tmp_path, fake_nvml):
    (dev,) = fake_nvml.configure([{"profile_seed": 5}])
    uri = ready_store(tmp_path)
    logger = MLFlowLogger(experiment_name="lit", tracking_uri=uri)
    monitor = EnergyMonitor(gpus="all", output_dir=str(tmp_path / "out"), country="DE", price_per_kwh=0.3)
    trainer(tmp_path, [monitor], logger=logger, log_every_n_steps=16).fit(ValModel())

    client, found = runs(uri, "lit")
    assert len(found) == 1, "one training, one run"
    run = found[0]
    rid = run.info.run_id
    assert rid == logger.run_id
    ends = [63, 127, 191]  # BoringModel: 64 batches an epoch, validation at its end; Lightning's step axis
    for key in [*EPOCH_CONTRACT, *EVAL_CONTRACT, "efficiency/val_score_per_kj", "cost/epoch"]:
        assert steps(client, rid, key) == ends, key
    # the trainer's own loss is on the same axis: the charts overlay
    assert steps(client, rid, "val_loss") == ends
    for key in CUMULATIVE:
        logged = steps(client, rid, key)
        assert set(ends) <= set(logged) and len(logged) == len(set(logged)), key
    epoch = dict(history(client, rid, "energy/epoch_j"))
    gpu, gpu0 = dict(history(client, rid, "energy/gpu_j")), dict(history(client, rid, "energy/gpu0_j"))
    cpu, val = dict(history(client, rid, "energy/cpu_j")), dict(history(client, rid, "energy/val_j"))
    evals, interval = dict(history(client, rid, "energy/eval_j")), dict(history(client, rid, "energy/interval_j"))
    cumulative = dict(history(client, rid, "energy/cumulative_j"))
    grams = dict(history(client, rid, "emissions/epoch_g"))
    intensity = float(run.data.params["green.carbon_intensity_g_per_kwh"])
    t0 = monitor.meter.t0_s
    for step, record in zip(ends, records_of(monitor, "epoch"), strict=True):
        truth = dev.energy_between(t0 + record.start_rel_s, t0 + record.end_rel_s)
        assert gpu0[step] == pytest.approx(truth, rel=1e-3, abs=0.05)  # the simulated GPU's exact energy
        assert gpu[step] == pytest.approx(gpu0[step])
        assert epoch[step] == pytest.approx(gpu[step] + cpu[step])
        assert val[step] == pytest.approx(evals[step])
        assert 0 < val[step] < epoch[step]
        assert 0 < evals[step] < interval[step]
        assert grams[step] == pytest.approx(epoch[step] / J_PER_KWH * intensity)
    # the evaluation intervals tile the run to its last evaluation (what follows it, the training's end, is in none:
    # on this wall-clock GPU a loaded CI machine made that tail 2.4 % of the run, where the total was compared); the
    # last cumulative point, the total, and the summary agree
    total = history(client, rid, "energy/total_j")
    assert total[0][1] == pytest.approx(monitor.cumulative_j)
    assert sum(interval.values()) == pytest.approx(cumulative[191], rel=1e-6)
    assert cumulative[191] <= total[0][1]
    eff = dict(history(client, rid, "efficiency/val_score_per_kj"))
    assert eff[191] == pytest.approx(3.0 / (cumulative[191] / 1000), rel=1e-6)
    assert run.data.params["green.carbon_intensity_label"] == "Germany (DEU)"
    assert run.data.params["green.world_size"] == "1"
    assert run.data.tags["green.method.gpu"] == "counter"
    assert run.data.tags["green.method.cpu"] == "estimated"
    assert run.data.tags["green.cpu_attribution"].startswith("process tree of pid")
    assert run.data.tags["green.gpu_names"] == "gpu0 = cuda:0 Fake H100 (GPU-00000000-fake-0000-0000-000000000000)"
    assert run.data.tags["green.gpu_edges"].startswith("window edges read the counter")  # a read costs µs here
    assert artifacts(client, rid) == [
        "green_callbacks/intervals.csv", "green_callbacks/power.png", "green_callbacks/power_trace.csv",
        "green_callbacks/summary.json"]
    local = client.download_artifacts(rid, "green_callbacks/summary.json", str(tmp_path))
    summary = json.loads(Path(local).read_text())
    assert summary["energy_j"] == pytest.approx(total[0][1])
    assert summary["cost"] == pytest.approx(total[0][1] / J_PER_KWH * 0.3)


def test_the_peak_power_of_an_epoch_shorter_than_the_sampling_period_is_not_below_its_mean(tmp_path, fake_nvml):
    # no sample inside the window: power/gpu_peak_w was 0.0 W beside a mean of 250 W
    fake_nvml.configure([{"profile": [(1.0, 250.0)]}])
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, output_dir=str(tmp_path / "out"), log_artifacts=False,
                            sampling_period_s=5.0)
    trainer(tmp_path, [monitor], max_epochs=2, limit_train_batches=4, limit_val_batches=2).fit(ValModel())
    for r in records_of(monitor, "epoch"):
        mean_w = r.components_j["gpu"] / r.duration_s
        assert mean_w == pytest.approx(250.0, rel=0.05) and r.gpu_peak_w >= mean_w


def test_without_a_logger_opens_one_run_and_measures_test_per_sample(tmp_path, capsys):
    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(tracking_uri=uri, experiment_name="own", run_name="digits",
                            output_dir=str(tmp_path / "out"))
    t = trainer(tmp_path, [monitor], max_epochs=2)
    model = ValModel()
    t.fit(model)
    t.test(model)
    t.validate(model)  # a stage of its own, like test
    client, found = runs(uri, "own")
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "digits"
    test_j = history(client, run.info.run_id, "energy/test_j")
    per_sample = history(client, run.info.run_id, "energy/test_j_per_sample")
    samples = history(client, run.info.run_id, "test/samples")
    assert samples == [(0, 64.0)]  # BoringModel's test set: 64 samples
    assert per_sample[0][1] == pytest.approx(test_j[0][1] / 64)
    validate_j = history(client, run.info.run_id, "energy/validate_j")
    assert [s for s, _ in validate_j] == [0] and validate_j[0][1] >= 0
    assert history(client, run.info.run_id, "validate/samples") == [(0, 64.0)]
    assert steps(client, run.info.run_id, "energy/eval_j") == steps(client, run.info.run_id, "energy/epoch_j"), \
        "validate() adds no evaluation point to the training's axis"
    out = capsys.readouterr().out
    assert out.count("green-callbacks [finished]: 2 epochs, 2 evaluations, to step 127") == 1
    assert f"MLflow run {run.info.run_id}" in out


def test_fast_dev_run_logs_and_writes_nothing_as_lightning_does(tmp_path, monkeypatch, capsys):
    """``fast_dev_run`` replaces the loggers by a dummy and saves nothing; the monitor had opened a run of its own
    in MLflow's default store (``./mlflow.db``) and written its files. Now it measures and prints, and that is all."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/logger.db"
    monitor = EnergyMonitor(output_dir=str(tmp_path / "out"))
    trainer(tmp_path, [monitor], fast_dev_run=True, logger=MLFlowLogger(experiment_name="dev", tracking_uri=uri)).fit(
        ValModel())
    assert monitor.records  # measured
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    if (tmp_path / "logger.db").exists():
        assert runs(uri)[1] == []
    assert "a dry run (Lightning's fast_dev_run): nothing logged to MLflow" in capsys.readouterr().out


def test_logs_into_the_users_active_run(tmp_path):
    uri = ready_store(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            trainer(tmp_path, [EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)],
                    max_epochs=1).fit(ValModel())
        client, found = runs(uri)
        assert [r.info.run_id for r in found] == [active.info.run_id]
        assert history(client, active.info.run_id, "energy/epoch_j")
    finally:
        mlflow.set_tracking_uri(None)


def test_fit_again_on_the_same_trainer_times_the_run_not_the_last_fit(tmp_path):
    """fit(), then max_epochs raised and fit() again (training continued, the logger's run goes on): the second
    fit's first evaluation interval was timed from the first fit's meter's origin (0 s, or a fraction of its
    epoch), and time/total_s was the second fit's alone (0.23 s after 1.5 s)."""
    import time

    class Slow(pl.Callback):
        sleep_s = 0.03

        def on_train_batch_end(self, *args):
            time.sleep(self.sleep_s)

    uri = ready_store(tmp_path)
    slow = Slow()
    t = trainer(tmp_path, [EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False), slow],
                max_epochs=1, logger=MLFlowLogger(experiment_name="again", tracking_uri=uri))
    model = ValModel()
    t.fit(model)
    slow.sleep_s = 0.0
    t.fit_loop.max_epochs = 2
    t.fit(model)
    client, (run,) = runs(uri, "again")
    rid = run.info.run_id
    interval, epoch = dict(history(client, rid, "time/interval_s")), dict(history(client, rid, "time/epoch_s"))
    assert sorted(interval) == sorted(epoch) == [63, 127]
    assert interval[127] == pytest.approx(epoch[127], rel=0.2), "one validation an epoch: the interval is the epoch"
    first, second = (v for _, v in history(client, rid, "time/total_s"))
    assert first >= 64 * 0.03 and second > first, "the run's time so far, as its energy"


def test_resume_continues_the_totals_in_the_same_run(tmp_path):
    uri = ready_store(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)

    def monitor(**kw):
        return EnergyMonitor(tracking_uri=uri, experiment_name="resume", output_dir=str(tmp_path / "out"),
                             log_artifacts=False, **kw)

    trainer(tmp_path, [monitor(), ckpt], max_epochs=2, enable_checkpointing=True).fit(ValModel())
    first = monitor(country="FR")  # a changed setting: MLflow keeps the first param value, logging goes on
    trainer(tmp_path, [first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=4,
            enable_checkpointing=True).fit(ValModel(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    client, found = runs(uri, "resume")
    assert len(found) == 1, "the resumed training continues its own run"
    run_id = found[0].info.run_id
    epoch = history(client, run_id, "energy/epoch_j")
    assert [s for s, _ in epoch] == [63, 127, 191, 255], "the resumed run continues the global step axis"
    assert len(steps(client, run_id, "energy/cumulative_j")) == len(set(steps(client, run_id, "energy/cumulative_j")))
    total = history(client, run_id, "energy/total_j")
    assert total[-1][1] == pytest.approx(first.cumulative_j)
    assert first.cumulative_j > sum(v for _, v in epoch) * 0.9, "the first run's totals are carried on"
    assert [r.epoch for r in records_of(first, "epoch")] == [0, 1, 2, 3]
    assert found[0].data.params["green.carbon_intensity_label"] == "world average"


def test_exception_in_training_step_keeps_the_partial_epoch_and_marks_the_run_failed(tmp_path):
    class Boom(ValModel):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 3:
                raise RuntimeError("user bug")
            return super().training_step(batch, batch_idx)

    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(tracking_uri=uri, output_dir=str(tmp_path / "out"))
    t = trainer(tmp_path, [monitor], max_epochs=3)
    with pytest.raises(RuntimeError, match="user bug"):
        t.fit(Boom())
    client, (run,) = runs(uri)
    assert run.info.status == "FAILED"
    assert steps(client, run.info.run_id, "energy/epoch_j") == [63, 66], "the partial epoch ends at its last step"
    assert records_of(monitor, "epoch")[-1].partial and records_of(monitor, "epoch")[-1].epoch == 1
    totals = {k: history(client, run.info.run_id, k) for k in ("energy/total_j", "energy/cumulative_j")}
    ends = len(records_of(monitor, "end"))
    # the user caught it and tests what there is: the test stage joins the run, which stays FAILED (it read FINISHED)
    t.test(Boom(), verbose=False)
    client, (run,) = runs(uri)
    assert run.info.status == "FAILED" and steps(client, run.info.run_id, "energy/test_j") == [0]
    # ... and the test's joules are the test's: not booked a second time as the training's end (they were)
    assert {k: history(client, run.info.run_id, k) for k in totals} == totals
    assert len(records_of(monitor, "end")) == ends
    assert "green_callbacks/summary.json" in artifacts(client, run.info.run_id)


def test_the_same_monitor_resumed_after_a_crash_keeps_the_crashed_fits_files(tmp_path):
    """A fit that raised, then the same monitor in a fit resumed from the last checkpoint, in the same process and
    run: the resumed records are the checkpoint's, so the files the crashed fit wrote (its partial epoch) are kept
    as intervals.before-1.csv, not overwritten."""
    import pandas as pd

    class Boom(ValModel):
        fail = True

        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 3 and Boom.fail:
                raise RuntimeError("user bug")
            return super().training_step(batch, batch_idx)

    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(tracking_uri=uri, output_dir=str(tmp_path / "out"))

    def fit(**kw):
        trainer(tmp_path, [monitor, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=2,
                enable_checkpointing=True).fit(Boom(), **kw)

    with pytest.raises(RuntimeError, match="user bug"):
        fit()
    Boom.fail = False
    fit(ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    (folder,) = (tmp_path / "out").iterdir()
    crashed, resumed = pd.read_csv(folder / "intervals.before-1.csv"), pd.read_csv(folder / "intervals.csv")
    assert crashed["partial"].any() and not resumed["partial"].any()  # the crashed fit's partial epoch, kept


def test_gpu_lost_mid_training_warns_once_and_training_finishes(tmp_path, fake_nvml, green_log):
    """GPU 1 of 2 falls off the bus after epoch 0: one warning, training finishes, and from then on no number
    of its own is logged for it (a 0 J would read as a measurement); GPU 0 stays measured. Where every GPU is
    lost, the component's own names go too."""
    devs = fake_nvml.configure(n=2)
    lost = [devs[1]]

    class Lose(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            for dev in lost if trainer.current_epoch == 0 else devs if trainer.current_epoch == 1 else []:
                for call in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues",
                             "nvmlDeviceGetPowerUsage"):
                    dev.faults[call] = fake_nvml.NVML_ERROR_GPU_IS_LOST

    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(gpus="all", tracking_uri=uri, output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = trainer(tmp_path, [monitor, Lose()], max_epochs=3)
    t.fit(ValModel())
    assert t.current_epoch == 3
    assert [r.methods["gpu"] for r in records_of(monitor, "epoch")] == ["counter", "unavailable", "unavailable"]
    assert green_log.text.count("gpu1: NVML failed") == 1 and green_log.text.count("gpu0: NVML failed") == 1
    client, (run,) = runs(uri)
    steps = {k: [s for s, _ in history(client, run.info.run_id, k)]
             for k in ("energy/epoch_j", "energy/gpu0_j", "energy/gpu1_j", "energy/gpu_j", "power/gpu_mean_w",
                       "power/gpu_peak_w")}
    assert steps["energy/epoch_j"] == [63, 127, 191]
    assert steps["energy/gpu0_j"] == [63, 127], "gpu0 read throughout epochs 0 and 1"
    assert steps["energy/gpu1_j"] == [63], "gpu1 lost after epoch 0: no 0 J logged for it"
    assert steps["energy/gpu_j"] == steps["power/gpu_mean_w"] == steps["power/gpu_peak_w"] == [63, 127]
    # the run's method tags, and its summary, are its weakest: they were the first epoch's ("counter")
    assert run.data.tags["green.method.gpu"] == "unavailable"
    assert summary(monitor)["methods"]["gpu"] == "unavailable"
    gpu0 = dict(history(client, run.info.run_id, "energy/gpu0_j"))
    # the component's sum holds what was read: gpu0's epoch, and gpu1's joules up to its loss early in epoch 1 (the
    # last watts read, carried to its first failed read: a few ms, more on a loaded machine)
    assert dict(history(client, run.info.run_id, "energy/gpu_j"))[127] >= gpu0[127]


def test_the_only_gpu_lost_leaves_no_joules_logged_as_measured(tmp_path, fake_nvml, green_log):
    """GPU-only measurement (measure_cpu=False), the one GPU lost after epoch 0: the later epochs and evaluations
    logged energy/epoch_j, energy/interval_j and emissions as 0, as if measured; now only their times."""
    (dev,) = fake_nvml.configure(n=1)

    class Lose(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            for call in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"):
                dev.faults[call] = fake_nvml.NVML_ERROR_GPU_IS_LOST

    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                            log_artifacts=False)
    trainer(tmp_path, [monitor, Lose()], max_epochs=3).fit(ValModel())
    client, (run,) = runs(uri)
    for name in ("energy/epoch_j", "emissions/epoch_g", "energy/interval_j", "energy/eval_j", "emissions/interval_g"):
        assert steps(client, run.info.run_id, name) == [63], name
    assert steps(client, run.info.run_id, "time/epoch_s") == steps(client, run.info.run_id, "time/interval_s") == \
        [63, 127, 191]
    assert [s for s, _ in history(client, run.info.run_id, "energy/cumulative_j")][:1] == [63]
    assert max(steps(client, run.info.run_id, "power/mean_w")) <= 63, "no power measured after the loss"


def test_a_gpu_unreadable_from_the_start_counts_as_nothing_measured(tmp_path, fake_nvml, green_log):
    """A GPU with a handle whose every read fails (a passing error that never passes) is lost at the start; with
    nothing else measured the run is one that measures nothing: no 0 J logged (it had counted as measurable, so 0 J
    went to MLflow as measurements). A sensor's fault is not a setting: the training goes on, and the warning says
    that a stopper cannot act."""
    (dev,) = fake_nvml.configure(n=1)
    for call in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"):
        dev.faults[call] = fake_nvml.NVML_ERROR_UNKNOWN
    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                            log_artifacts=False)
    trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    assert "nothing can be measured here" in green_log.text
    _, (run,) = runs(uri)
    assert not [k for k in run.data.metrics if k.startswith(("energy/", "emissions/", "power/"))]
    assert run.data.tags["green.method.gpu"] == "unavailable"
    t = trainer(tmp_path, [EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False), EnergyBudget(energy="1 J")],
                max_epochs=2)
    t.fit(ValModel())
    assert t.current_epoch == 2 and "; EnergyBudget cannot act. Measure something" in green_log.text


def test_a_gpu_gone_between_fit_and_test_is_a_warning_and_the_test_runs(tmp_path, fake_nvml, green_log):
    """The only GPU falls off the bus after fit(); the same trainer's test() with a budget attached raised "cannot
    act" at the stage's start, as for a setting that measures nothing. A GPU measured before and gone now is a
    sensor's fault: one warning, the stage runs, no 0 J logged for it, and the run's summary keeps the fit's joules."""
    fake_nvml.configure(n=1)
    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                            log_artifacts=False)
    t = trainer(tmp_path, [monitor, EnergyBudget(energy="1 MJ")], max_epochs=2)
    t.fit(ValModel())
    fit_j = monitor.cumulative_j
    assert fit_j > 0 and "nothing can be measured" not in green_log.text
    fake_nvml.configure(devices=[])  # gone: NVML finds no device any more
    assert len(t.test(ValModel())) == 1  # the test stage ran to its end
    assert "the devices measured before are gone" in green_log.text and "EnergyBudget cannot act" in green_log.text
    assert monitor.cumulative_j == fit_j and monitor.summary()["energy_j"] == fit_j, "the fit's joules still told"
    _, (run,) = runs(uri)
    assert run.info.status == "FINISHED" and "time/test_s" in run.data.metrics
    assert "energy/test_j" not in run.data.metrics and "emissions/test_g" not in run.data.metrics, "no 0 J as measured"
    with pytest.raises(ValueError, match="EnergyBudget cannot act: nothing is measured here"):
        # another training with the same monitor on this machine: a setting that measures nothing, as ever
        trainer(tmp_path, [monitor, EnergyBudget(energy="1 MJ")], max_epochs=1).fit(ValModel())


def test_a_start_up_warning_is_said_once_across_fit_validate_and_test(tmp_path, fake_nvml, green_log):
    """The sensors are built again at every stage: a MIG instance's explanation was said at fit, validate and test."""
    fake_nvml.configure([{"mig": True}, {}])
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, output_dir=str(tmp_path / "out"),
                            log_artifacts=False)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    model = ValModel()
    t.fit(model)
    t.validate(model)
    t.test(model)
    assert green_log.text.count("MIG instance") == 1, green_log.text


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"unknown country 'Atlantis'"):
        EnergyMonitor(country="Atlantis")
    with pytest.raises(ValueError, match=r"log_artifacts=\['intervals', 'video'\]: unknown \['video'\]"):
        EnergyMonitor(log_artifacts=["intervals", "video"])
    with pytest.raises(ValueError, match=r"sampling_period_s=0"):
        EnergyMonitor(sampling_period_s=0)
    with pytest.raises(ValueError, match=r"gpus='first'"):
        EnergyMonitor(gpus="first")


def test_state_keys_allow_several_instances():
    a, b = EnergyMonitor(run_name="a"), EnergyMonitor(run_name="b")
    assert a.state_key != b.state_key


def test_a_gpu_index_the_machine_lacks_stops_before_the_first_step(tmp_path, fake_nvml):
    fake_nvml.configure(n=2)
    with pytest.raises(ValueError, match=r"gpus=\[3\]: device\(s\) \[3\] do not exist.*\[0, 1\]"):
        trainer(tmp_path, [EnergyMonitor(gpus=[3], mlflow=False)], max_epochs=1).fit(ValModel())


def test_an_active_run_in_another_store_than_tracking_uri_is_left_alone(tmp_path, green_log):
    """An explicit tracking_uri wins over an active run of another store: the energy reaches a run there
    (it was sent to the active run's id at the wrong store, and reached neither)."""
    import mlflow

    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    mlflow.set_tracking_uri(a)
    try:
        with mlflow.start_run() as active:
            monitor = EnergyMonitor(tracking_uri=b, experiment_name="mine", output_dir=str(tmp_path / "out"),
                                    log_artifacts=False)
            trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    finally:
        mlflow.set_tracking_uri(None)
    client, (run,) = runs(b, "mine")
    assert steps(client, run.info.run_id, "energy/epoch_j") and run.info.status == "FINISHED"
    assert run.info.run_id != active.info.run_id
    assert "active run" in green_log.text and "another store" in green_log.text


def test_the_same_store_written_another_way_is_the_same_store(tmp_path, monkeypatch):
    # MLflow's own default URI is absolute; a user writes it relative (the README's sqlite:///mlflow.db), or
    # localhost for 127.0.0.1: still the active run's store, whose run the energy goes to
    import mlflow

    from green_callbacks.runs import same_store

    monkeypatch.chdir(tmp_path)
    try:
        mlflow.set_tracking_uri(ready_store(tmp_path))
        assert same_store("sqlite:///mlflow.db") and same_store(f"sqlite:///{tmp_path}/./mlflow.db")
        assert not same_store("sqlite:///other.db")
        mlflow.set_tracking_uri("http://localhost:5000/")
        assert same_store("http://127.0.0.1:5000") and not same_store("http://127.0.0.1:5001")
        mlflow.set_tracking_uri(str(tmp_path / "mlruns"))
        assert same_store("./mlruns") and same_store("mlruns")
    finally:
        mlflow.set_tracking_uri(None)


def test_a_training_after_a_stage_uses_its_kept_sender_and_runs_the_run_again(tmp_path):
    """``validate()`` keeps its sender for the next stage; a ``fit()`` into the same run takes it. The stage had set
    the run FINISHED, and the fit left it so while it trained (a kill then would not have been marked KILLED):
    the run is RUNNING again while the fit trains, FINISHED at its end."""
    from mlflow.tracking import MlflowClient

    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(tracking_uri=uri, experiment_name="again", output_dir=str(tmp_path / "out"),
                            log_artifacts=False)
    seen = []

    class Look(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            assert monitor.sink.flush(60)
            seen.append((MlflowClient(uri).get_run(monitor.run.run_id).info.status, monitor.sink.sender_pid))

    t = trainer(tmp_path, [monitor, Look()], max_epochs=2)
    model = ValModel()
    t.validate(model)
    kept = monitor._idle_sink.sender_pid
    assert MlflowClient(uri).get_run(monitor.run.run_id).info.status == "FINISHED"
    t.fit(model)
    assert seen == [("RUNNING", kept), ("RUNNING", kept)]
    assert MlflowClient(uri).get_run(monitor.run.run_id).info.status == "FINISHED"
