"""The fault matrix: every row ends in a run that finished or stopped cleanly with no finished epoch lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lightning_monitor import ValModel, trainer

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt

from helpers import fake_nvml_env, history, ready_store, records_of, runs

SCRIPTS = Path(__file__).parent / "fault_scripts"
ENERGY = "nvmlDeviceGetTotalEnergyConsumption"
FIELDS = "nvmlDeviceGetFieldValues"
POWER = "nvmlDeviceGetPowerUsage"


class Inject:
    """A Lightning callback that changes the simulated GPU at the end of epoch 0."""

    def __new__(cls, change):
        import lightning.pytorch as pl

        class _Inject(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == 0:
                    change()

        return _Inject()


@pytest.mark.parametrize(("calls", "code", "method_after", "warning"), [
    ([ENERGY], "NVML_ERROR_UNKNOWN", "unavailable", "gpu0: NVML failed"),
    ([ENERGY, FIELDS, POWER], "NVML_ERROR_GPU_IS_LOST", "unavailable", "gpu0: NVML failed"),
    ([ENERGY], "NVML_ERROR_NOT_SUPPORTED", "sampled", "became NOT_SUPPORTED"),
    ([FIELDS], "NVML_ERROR_UNKNOWN", "counter", "instant power is not readable"),
    ([FIELDS, POWER], "NVML_ERROR_UNKNOWN", "counter", "the power trace shows 0 W"),
])
def test_nvml_faults_mid_training(tmp_path, fake_nvml, green_log, monkeypatch, calls, code, method_after, warning):
    """Each fault persists from the end of epoch 0 on (a passing one is retried: test_nvml_sensor); a device
    whose reads keep failing is lost after ``lost_after_s``, 0 here so that it is lost within the short epoch."""
    from green_callbacks.sensors.gpu import GpuEnergySensor

    monkeypatch.setattr(GpuEnergySensor, "lost_after_s", 0.0)
    (dev,) = fake_nvml.configure(n=1)

    def change():
        for call in calls:
            dev.faults[call] = getattr(fake_nvml, code)

    monitor = gl.EnergyMonitor(gpus="all", tracking_uri=ready_store(tmp_path, "m.db"), output_dir=str(tmp_path),
                               log_artifacts=False)
    t = trainer(tmp_path, [monitor, Inject(change)], max_epochs=3)
    t.fit(ValModel())
    assert t.current_epoch == 3, "training ended normally"
    assert [r.epoch for r in records_of(monitor, "epoch")] == [0, 1, 2], "no epoch record lost"
    assert [r.methods["gpu"] for r in records_of(monitor, "epoch")] == ["counter", method_after, method_after]
    assert green_log.text.count(warning) == 1
    client, (run,) = runs(f"sqlite:///{tmp_path}/m.db")
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [63, 127, 191]


def test_counter_reset_to_zero_mid_training(tmp_path, fake_nvml, green_log):
    (dev,) = fake_nvml.configure([{"counter_offset_mj": 50_000_000}])

    def reset():  # the driver restarted: the counter counts from zero again
        dev.counter_offset_mj = 0
        dev.t0 = time.monotonic()

    monitor = gl.EnergyMonitor(gpus="all", mlflow=False, log_artifacts=False)
    t = trainer(tmp_path, [monitor, Inject(reset)], max_epochs=3)
    t.fit(ValModel())
    assert t.current_epoch == 3 and len(records_of(monitor, "epoch")) == 3
    assert all(r.methods["gpu"] == "counter" and r.energy_j > 0 for r in records_of(monitor, "epoch"))
    assert green_log.text.count("went backwards") == 1


def test_nvml_fault_mid_training_hf(tmp_path, fake_nvml, green_log):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from helpers import DigitsDataset, digits_tensors, hf_digits_model

    (dev,) = fake_nvml.configure(n=1)

    class Lose(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            dev.faults[ENERGY] = fake_nvml.NVML_ERROR_GPU_IS_LOST

    (xt, yt), _ = digits_tensors()
    monitor = gt.EnergyMonitor(gpus="all", mlflow=False, log_artifacts=False)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=64,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    Trainer(model=hf_digits_model(), args=args, train_dataset=DigitsDataset(xt[:256], yt[:256]),
            callbacks=[monitor, Lose()]).train()
    assert [r.methods["gpu"] for r in records_of(monitor, "epoch")] == ["counter", "unavailable", "unavailable"]
    assert green_log.text.count("gpu0: NVML failed") == 1


def test_a_training_cut_short_in_an_epochs_first_step_logs_that_step_not_the_last_epochs(tmp_path):
    """An exception in the first batch of epoch 2: the partial epoch (about 0 J) was logged at epoch 1's step, a
    second energy/epoch_j there, which MLflow then showed as the run's latest value."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Failing(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            if self.current_epoch == 2 and batch_idx == 0:
                raise RuntimeError("boom in the first batch of epoch 2")
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.layer(x).argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(64, 4)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)  # 8 steps an epoch
    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(tracking_uri=uri, output_dir=str(tmp_path / "out"), log_artifacts=False)
    with pytest.raises(RuntimeError, match="boom"):
        pl.Trainer(max_epochs=4, logger=False, callbacks=[monitor], enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=tmp_path).fit(Failing(), data, data)
    client, (run,) = runs(uri)
    assert run.info.status == "FAILED"
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [7, 15, 16]
    assert [s for s, _ in history(client, run.info.run_id, "energy/total_j")] == [16]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "hf", "hf-mlflow"])
@pytest.mark.parametrize(("fault", "status"), [("sigterm", "KILLED"), ("keyboard", "KILLED"),
                                               ("exception", "FAILED")])
def test_interrupted_mid_epoch_keeps_the_partial_epoch_and_summary(tmp_path, framework, fault, status):
    """hf-mlflow: the run HF's ``MLflowCallback`` opened, which a train() that raised never ends: MLflow's exit
    handler marked it FINISHED while the monitor said killed or failed."""
    uri = ready_store(tmp_path, "m.db")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "interrupted.py"), framework, fault, uri, str(tmp_path)],
                          env=fake_nvml_env("{}"), capture_output=True, text=True, timeout=300)
    if (framework, fault) == ("lightning", "sigterm"):  # Lightning's own SIGTERM path: on_exception, then its
        # SIGTERMException, a SystemExit(0), ends the process (with 0, as without the package)
        assert proc.returncode == 0 and "on_exception: SIGTERMException" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0, "the interruption still ends the process"
    client, (run,) = runs(uri)
    assert run.info.status == status, proc.stderr[-2000:]
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == \
        ([63, 69 if fault == "sigterm" else 68] if framework == "lightning" else [10, 14]), \
        "epoch 0, and the partial epoch 1 to its last step (Lightning ends the step a SIGTERM came in, then stops)"
    # the totals of what it spent, also when interrupted (they were logged only by a run that ended normally): the
    # run's whole energy (energy/cumulative_j is logged once per step, and a logging point at the step the fault came
    # at holds what came before the fault's partial interval)
    (total,) = history(client, run.info.run_id, "energy/total_j")
    (found,) = tmp_path.glob("*/summary.json")  # the run's own folder
    summary = json.loads(found.read_text())
    assert total[1] == pytest.approx(summary["energy_j"])
    assert total[1] >= history(client, run.info.run_id, "energy/cumulative_j")[-1][1]
    assert summary["epochs"] == 2
    assert f"green-callbacks [{status.lower()}]" in proc.stdout


@pytest.mark.slow
def test_a_sigterm_ends_a_lightning_fit_by_lightnings_path_and_its_loggers_run_ends_failed(tmp_path):
    """Lightning handles SIGTERM from each fit's start (callbacks' on_exception, OnExceptionCheckpoint, loggers
    finalized "failed"), calling the handler it found: the package's, which ended the process at once, so the
    user's MLFlowLogger run stayed RUNNING and no on_exception ran."""
    uri = ready_store(tmp_path, "m.db")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "interrupted.py"), "lightning-logger", "sigterm", uri,
                           str(tmp_path)], env=fake_nvml_env("{}"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # Lightning's SIGTERMException is a SystemExit(0)
    assert "on_exception: SIGTERMException" in proc.stdout and "green-callbacks [killed]" in proc.stdout
    client, (run,) = runs(uri)
    assert run.info.status == "FAILED", "the logger's run, ended by Lightning"
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [63, 69], "to the step it ended"


def test_a_handler_of_the_users_that_chains_the_packages_still_ends_the_process(tmp_path):
    """A plain loop whose own SIGTERM handler, installed after the tracker started, calls the one it found (the
    package's) and counts on it to end the process, as the default action would have: the package leaves the end
    only to Lightning's handler, so this one still ends the run KILLED and the process by the signal."""
    script = tmp_path / "chained.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from green_callbacks import EnergyTracker\n"
        f"tracker = EnergyTracker(tracking_uri={ready_store(tmp_path, 'm.db')!r}, output_dir={str(tmp_path)!r})\n"
        "with tracker:\n"
        "    found = signal.getsignal(signal.SIGTERM)\n"
        "    def mine(signum, frame):\n"
        "        print('the user saves its work', flush=True)\n"
        "        found(signum, frame)\n"
        "    signal.signal(signal.SIGTERM, mine)\n"
        "    for step in range(50):\n"
        "        tracker.step(step)\n"
        "        if step == 20:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.01)\n"
        "print('trained on after the SIGTERM', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], env=fake_nvml_env("{}"), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == -15, (proc.returncode, proc.stderr[-2000:])
    assert "the user saves its work" in proc.stdout and "trained on" not in proc.stdout
    assert "green-callbacks [killed]" in proc.stdout
    _, (run,) = runs(ready_store(tmp_path, "m.db"))
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("then", ["caught", "caught-evaluate", "caught-dropped", "caught-ctrlc"])
def test_hf_train_that_raised_and_was_caught_ends_failed(tmp_path, then):
    """HF tells no callback of an exception: one the user catches was ended KILLED at the exit (as if killed), an
    evaluate() after it made HF's training run active again and ended it FINISHED, and a Trainer let go (``del``,
    or replaced by a new one) ended it FINISHED from ``MLflowCallback.__del__``. A Ctrl-C the user caught, then an
    evaluate(): KILLED (it was FAILED: only an interactive session's last exception was read)."""
    uri = ready_store(tmp_path, "m.db")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "interrupted.py"), "hf-mlflow", then, uri, str(tmp_path)],
                          env=fake_nvml_env("{}"), capture_output=True, text=True, timeout=300)
    status = "KILLED" if then == "caught-ctrlc" else "FAILED"
    assert proc.returncode == 0 and "caught: " in proc.stdout, proc.stderr[-2000:]
    client, (run,) = runs(uri)
    assert run.info.status == status, proc.stderr[-2000:]
    assert f"green-callbacks [{status.lower()}]" in proc.stdout
    if then in ("caught-evaluate", "caught-ctrlc"):  # HF's metrics and the evaluation's energy in the training's run
        assert history(client, run.info.run_id, "eval_loss") and history(client, run.info.run_id, "energy/evaluate_j")


def test_hf_train_ended_by_the_users_sigterm_handler_ends_killed(tmp_path):
    """A preemption handler of the user's (``sys.exit`` on SIGTERM): the package's own SIGTERM hook is not installed
    where one is, and ``SystemExit`` reaches no excepthook: the run ended FAILED, as a caught exception does."""
    uri = ready_store(tmp_path, "m.db")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "interrupted.py"), "hf-mlflow", "preempted", uri,
                           str(tmp_path)], env=fake_nvml_env("{}"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    _, (run,) = runs(uri)
    assert run.info.status == "KILLED", proc.stderr[-2000:]
    assert "green-callbacks [killed]" in proc.stdout


# -- property-based fuzzing: accepted, or rejected with the package's own clear error -------------
anything = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=10), st.lists(st.integers(-2, 3), max_size=3),
                     st.sampled_from(["2.5 kWh", "300 g", "0.5 EUR", "auto", "all", "FR", "gcp:europe-west1",
                                      "max", "min", "stop", "warn", "-1 J", "1e3 kJ", "epochs"]))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def accepted_or_clear(make) -> None:
    try:
        make()
    except ValueError as exc:
        assert str(exc), "an error says what is wrong"


@FUZZ
@given(gpus=anything, period=anything, country=anything, pue=anything, price=anything, artifacts=anything,
       tdp=anything)
def test_fuzz_energy_monitor(gpus, period, country, pue, price, artifacts, tdp):
    kwargs = {"gpus": gpus, "sampling_period_s": period, "country": country, "pue": pue, "price_per_kwh": price,
              "log_artifacts": artifacts, "cpu_tdp_w": tdp}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("country", "price_per_kwh", "cpu_tdp_w")}
    accepted_or_clear(lambda: gl.EnergyMonitor(**kwargs))


@FUZZ
@given(energy=anything, emissions=anything, cost=anything, on_exceed=anything, steps=anything)
def test_fuzz_energy_budget(energy, emissions, cost, on_exceed, steps):
    accepted_or_clear(lambda: gt.EnergyBudget(energy=energy, emissions=emissions, cost=cost,
                                              on_exceed=on_exceed if on_exceed is not None else "stop",
                                              check_every_n_steps=steps))


@FUZZ
@given(monitor=anything, mode=anything, gain=st.one_of(anything, st.sampled_from(
    ["0.5% per doubling", "0.002 per doubling", "0.1 per kWh", "1 per J", "-1 per doubling", "5%", "per kWh"])),
    patience=anything, evaluations=anything, strict=anything)
def test_fuzz_efficiency_early_stopping(monitor, mode, gain, patience, evaluations, strict):
    kwargs = {"monitor": monitor, "mode": mode, "min_gain": gain, "patience": patience,
              "min_evaluations": evaluations, "strict": strict}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("monitor", "mode")}
    accepted_or_clear(lambda: gl.EfficiencyEarlyStopping(**kwargs))


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.builds(
    lambda k, v: f"green-callbacks:\n  budget:\n    {k}: {v}\n",
    st.sampled_from(["energy", "emissions", "cost", "on_exceed", "check_every_n_steps", "bogus", "energy:"]),
    st.one_of(st.text(max_size=12), st.sampled_from(["2.5 kWh", "[1, 2]", "{a: 1}", "-3", "null", "1e400 J"])))))
def test_fuzz_config_loader(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "green.yaml"
    path.write_text(text)
    accepted_or_clear(lambda: gl.EnergyBudget.from_file(path))
