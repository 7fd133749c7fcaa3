"""Intervals, not epochs: energy at every evaluation and every N steps, on the trainer's step axis.

Real Lightning and HF trainers, real MLflow stores; the GPU is simulated (tests/fake_nvml), on a
work clock where a run must be repeatable to the joule.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from test_hf_monitor import digits, tracking  # noqa: F401 - fixtures
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt

from helpers import (
    CUMULATIVE,
    EVAL_CONTRACT,
    digits_loaders,
    digits_tensors,
    hf_accuracy,
    hf_digits_model,
    hf_work_clock,
    history,
    lightning_digits_module,
    ready_store,
    records_of,
    runs,
    steps,
    work_clock,
)


# -- Hugging Face, as LLM fine-tuning runs it ---------------------------------------------------------
def step_trainer(tmp_path, data, callbacks, max_steps, eval_steps=10, report_to="none", **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=max_steps, eval_strategy="steps", eval_steps=eval_steps,
        logging_strategy="steps", logging_steps=eval_steps, save_strategy=kw.pop("save_strategy", "no"),
        per_device_train_batch_size=4, per_device_eval_batch_size=64, report_to=report_to, use_cpu=True,
        disable_tqdm=True, learning_rate=kw.pop("learning_rate", 5e-3), seed=0, **kw)
    return Trainer(model=hf_digits_model(), args=args, train_dataset=data[0], eval_dataset=data[1],
                   compute_metrics=hf_accuracy, callbacks=callbacks)


def test_hf_step_mode_logs_energy_at_every_evaluation_on_the_trainers_axis(tmp_path, digits,  # noqa: F811
                                                                             tracking):  # noqa: F811
    monitor = gt.EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False, log_every_n_steps=5)
    # 128 steps an epoch: the run ends mid-epoch
    t = step_trainer(tmp_path, digits, [monitor], max_steps=60, report_to=["mlflow"])
    t.train()
    client, (run,) = runs(tracking)
    rid = run.info.run_id
    evals = steps(client, rid, "eval_accuracy")
    assert evals == [10, 20, 30, 40, 50, 60]
    for key in EVAL_CONTRACT:
        assert steps(client, rid, key) == evals, key
    # per kJ needs energy: the CPU estimate can read 0 J before its first utilisation sample
    eff = steps(client, rid, "efficiency/eval_accuracy_per_kj")
    assert eff == evals[len(evals) - len(eff):] and len(eff) >= len(evals) - 1
    assert steps(client, rid, "loss") == steps(client, rid, "energy/interval_j"), "energy overlays HF's loss chart"
    cumulative = steps(client, rid, "energy/cumulative_j")
    assert cumulative == list(range(5, 61, 5)), "every 5 steps between evaluations, once per step"
    for key in CUMULATIVE:
        assert steps(client, rid, key) == cumulative, key
    values = [v for _, v in history(client, rid, "energy/cumulative_j")]
    # the CPU estimate counts CPU time in clock ticks (10 ms): the first 5 steps may fall within one
    assert values == sorted(values) and values[-1] > 0
    # the evaluation intervals tile the run up to its last evaluation
    interval = [v for _, v in history(client, rid, "energy/interval_j")]
    assert sum(interval) == pytest.approx(dict(history(client, rid, "energy/cumulative_j"))[60])
    assert [r.start_step for r in monitor.records if r.kind.value == "evaluation"] == [0, 10, 20, 30, 40, 50]


def test_hf_step_mode_stops_at_an_evaluation_once_accuracy_flattens(tmp_path, digits, tracking,  # noqa: F811
                                                                    fake_nvml):
    fake_nvml.configure([{"profile": [[1.0, 300.0]]}], work_clock=True)
    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, output_dir=str(tmp_path / "out"), log_artifacts=False)
    stopper = gt.EfficiencyEarlyStopping(monitor="accuracy", min_gain="5% per doubling")
    t = step_trainer(tmp_path, digits, [monitor, stopper, hf_work_clock(fake_nvml)], max_steps=1200, eval_steps=20,
                     report_to=["mlflow"])
    t.train()
    client, (run,) = runs(tracking)
    rid = run.info.run_id
    assert t.state.global_step < 1200, "stopped before max_steps"
    assert t.state.global_step % 20 == 0, "at an evaluation"
    assert run.data.tags["green.stop_reason"] == "efficiency_plateau"
    stat = [k for k in run.data.metrics if k.startswith("stopping/")]
    assert stat, "the criterion's statistic is in the run"
    evals = steps(client, rid, "eval_accuracy")
    logged = steps(client, rid, stat[0])
    assert logged == evals[len(evals) - len(logged):], "at every evaluation after the warm-up"
    assert logged[-1] == t.state.global_step
    assert history(client, rid, "energy/saved_j_projected")[0][1] > 0


# -- Lightning, as pre-training runs it ----------------------------------------------------------------
class Endless(IterableDataset):
    """An endless stream of digits, as a pre-training corpus is for practical purposes."""

    def __init__(self) -> None:
        (self.x, self.y), _ = digits_tensors()

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randint(len(self.x), (32,), generator=g)
            yield self.x[idx], self.y[idx]


def test_lightning_endless_stream_logs_every_validation_at_lightnings_step(tmp_path):
    uri = ready_store(tmp_path)
    logger = MLFlowLogger(experiment_name="stream", tracking_uri=uri)
    monitor = gl.EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    (_, _), (xv, yv) = digits_tensors()
    trainer = pl.Trainer(max_steps=120, val_check_interval=20, check_val_every_n_epoch=None, logger=logger,
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=10)
    trainer.fit(lightning_digits_module()(), DataLoader(Endless(), batch_size=None),
                DataLoader(TensorDataset(xv, yv), batch_size=512))
    client, (run,) = runs(uri, "stream")
    rid = run.info.run_id
    vals = steps(client, rid, "val_acc")
    assert len(vals) == 6
    for key in [*EVAL_CONTRACT, "efficiency/val_acc_per_kj"]:
        assert steps(client, rid, key) == vals, key
    assert set(vals) <= set(steps(client, rid, "energy/cumulative_j"))
    assert history(client, rid, "energy/total_j")[0][1] == pytest.approx(monitor.cumulative_j)


def test_lightning_an_end_of_epoch_validation_closes_the_epoch_with_one_read_and_epochs_tile(tmp_path, fake_nvml,
                                                                                              monkeypatch):
    from green_callbacks.meter import EnergyMeter

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    reads = []
    read_all = EnergyMeter._read_all
    monkeypatch.setattr(EnergyMeter, "_read_all", lambda self, now, cheap=False, **kw: (
        reads.append(cheap), read_all(self, now, cheap, **kw))[1])

    class ReadsPerEpoch(pl.Callback):  # after the monitor in the list: its hooks have run
        def __init__(self):
            self.at_start = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.at_start.append(len(reads))

    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False)
    counter = ReadsPerEpoch()
    train, val = digits_loaders()
    pl.Trainer(max_epochs=4, callbacks=[monitor, counter, work_clock(fake_nvml, val_s=0.002)], logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               default_root_dir=tmp_path, num_sanity_val_steps=0).fit(lightning_digits_module()(), train, val)
    epochs, evals = records_of(monitor, "epoch"), records_of(monitor, "evaluation")
    assert [r.step for r in epochs] == [r.step for r in evals] == [22, 45, 68, 91]
    for epoch, evaluation in zip(epochs, evals, strict=True):  # closed at the evaluation's instant
        assert epoch.end_rel_s == evaluation.end_rel_s and epoch.eval_j == evaluation.eval_j > 0
    for before, after in itertools.pairwise(epochs):  # the next epoch starts where the point left off
        assert after.start_rel_s == before.end_rel_s
    # in between, two sensor reads an epoch: the validation's start, and its end closing the epoch too
    assert [b - a for a, b in itertools.pairwise(counter.at_start)] == [2, 2, 2]
    # epochs tile the run: their joules are its total (the work clock ran only inside them)
    assert sum(r.energy_j for r in epochs) == pytest.approx(monitor.cumulative_j, abs=0.003)


# -- the energy-aware stop does not depend on the run's watts ------------------------------------------
def run_at(tmp_path, fake, watts: float, every: int | None = None, val_s: float = 0.002, max_epochs: int = 60,
           extra=(), **stopper):
    fake.configure([{"profile": [[1.0, watts]]}], work_clock=True)
    pl.seed_everything(0)
    module = lightning_digits_module(lr=3e-3)()
    (xt, yt), (xv, yv) = digits_tensors()
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               log_every_n_steps=every)
    stop = gl.EfficiencyEarlyStopping(monitor="val_acc", **{"min_gain": "2% per doubling", **stopper})
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[monitor, stop, work_clock(fake, val_s=val_s), *extra],
                         logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(TensorDataset(xt, yt), batch_size=128, shuffle=True,
                                   generator=torch.Generator().manual_seed(0)),
                DataLoader(TensorDataset(xv, yv), batch_size=512))
    return trainer, monitor


def test_the_same_training_at_5_w_and_2000_w_stops_at_the_same_evaluation(tmp_path, fake_nvml):
    low, low_monitor = run_at(tmp_path, fake_nvml, 5.0)
    high, high_monitor = run_at(tmp_path, fake_nvml, 2000.0)
    assert low.current_epoch < 59, "the criterion stops this saturating run"
    assert (low.global_step, low.current_epoch) == (high.global_step, high.current_epoch)
    # NVML counts whole millijoules: at 5 W that rounds a little
    assert high_monitor.cumulative_j == pytest.approx(400 * low_monitor.cumulative_j, rel=1e-4)


class Statistics(pl.Callback):
    """The stopper's statistics after each validation (the monitor, earlier in the list, has decided by then)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        stop = next(c for c in trainer.callbacks if isinstance(c, gl.EfficiencyEarlyStopping))
        self.seen.append(stop.statistics())


def test_the_stop_does_not_depend_on_the_logging_cadence_and_the_runs_end_is_no_stop(tmp_path, fake_nvml):
    """Costly validations, logging points every 2 steps or every 1000: the rate that projects the run's end was the
    median of recent intervals, and frequent points left the validations out of it (the gain left to the end
    differed 2x, and one run stopped where the other did not). And a run that reached max_epochs was tagged as
    stopped by the criterion at its last evaluation, where nothing is left to save."""
    seen = {}
    for every in (2, 1000):
        stats = Statistics()
        trainer, monitor = run_at(tmp_path, fake_nvml, 300.0, every=every, val_s=0.05, max_epochs=12,
                                  extra=[stats], min_gain="0.5% per doubling", patience=2)
        assert trainer.current_epoch == 12 and monitor.stop_decision is None, "ran to max_epochs: no stop"
        seen[every] = stats.seen
    to_end = [s for s in seen[2] if any(k.endswith("_to_end") for k in s)]
    assert len(to_end) >= 3
    for a, b in zip(seen[2], seen[1000], strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


# -- metrics as they really arrive ---------------------------------------------------------------------
def val_module(values):
    """A digits module whose validation also logs ``score``: ``values[i]`` at the i-th validation."""
    base = lightning_digits_module()

    class Scored(base):
        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                i = self.trainer.current_epoch
                if i < len(values) and values[i] is not None:
                    self.log("score", float(values[i]))

    return Scored()


def lightning_fit(tmp_path, module, callbacks, max_epochs, **kw):
    (xt, yt), (xv, yv) = digits_tensors()
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)
    trainer.fit(module, DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=64),
                DataLoader(TensorDataset(xv, yv), batch_size=512))
    return trainer


class CountSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_a_typo_in_the_monitored_metric_fails_before_the_first_step(tmp_path):
    counter = CountSteps()
    with pytest.raises(ValueError, match=r"val_accuracy.*val_acc"):
        lightning_fit(tmp_path, lightning_digits_module()(), [gl.EnergyMonitor(mlflow=False, log_artifacts=False),
                      gl.EfficiencyEarlyStopping(monitor="val_accuracy"), counter], max_epochs=3)
    assert counter.steps == 0


@pytest.mark.parametrize(("monitor", "on_epoch"), [("val_acc", False), ("val_acc_step", True)])
def test_a_validation_metric_logged_per_step_fails_before_the_first_step(tmp_path, monitor, on_epoch):
    """``self.log("val_acc", ..., on_step=True, on_epoch=False)`` in validation_step reaches no callback; the
    sanity check took the name, and the run failed after a whole epoch saying it "logged none"."""
    base = lightning_digits_module()

    class PerStep(base):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean(), on_step=True, on_epoch=on_epoch)

    counter = CountSteps()
    with pytest.raises(ValueError, match=rf"monitor='{monitor}'.*'{monitor}' is a per-step value of the validation, "
                                         r"self.log\(..., on_step=True\), which Lightning hands no callback"):
        lightning_fit(tmp_path, PerStep(), [gl.EnergyMonitor(mlflow=False, log_artifacts=False),
                      gl.EfficiencyEarlyStopping(monitor=monitor), counter], max_epochs=3)
    assert counter.steps == 0


def test_hf_a_typo_in_the_monitored_metric_fails_at_the_first_evaluation_and_ends_the_run(tmp_path, digits,  # noqa: F811
                                                                                          tracking):  # noqa: F811
    # HF has no sanity check: the first evaluation finds the typo; HF tells no callback of the error, so the
    # monitor ends its run there (FAILED), not left RUNNING until the process exits
    monitor = gt.EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    t = step_trainer(tmp_path, digits, [monitor, gt.EfficiencyEarlyStopping(monitor="acuracy")], max_steps=40)
    with pytest.raises(ValueError, match=r"eval_acuracy.*eval_accuracy"):
        t.train()
    assert t.state.global_step == 10 and not monitor.started
    _, (run,) = runs(tracking)
    assert run.info.status == "FAILED"


def test_a_metric_appearing_late_waits_with_strict_false(tmp_path, green_log):
    values = [None, None, 0.5, 0.6, 0.7]
    t = lightning_fit(tmp_path, val_module(values), [gl.EnergyMonitor(mlflow=False, log_artifacts=False),
                      gl.EfficiencyEarlyStopping(monitor="score", strict=False)], max_epochs=5,
                      num_sanity_val_steps=0)
    assert t.current_epoch == 5, "trained on"
    assert green_log.text.count("score") >= 1


def two_loader_module():
    base = lightning_digits_module()

    class TwoLoaders(base):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

    return TwoLoaders()


@pytest.mark.parametrize("monitor,ok", [("val_acc/dataloader_idx_1", True), ("val_acc", False)])
def test_with_two_val_dataloaders_the_sanity_check_knows_lightnings_names(tmp_path, monitor, ok):
    # Lightning leaves callback_metrics empty through the sanity check when there are several val
    # dataloaders; the right name must pass it and a wrong one still fail before the first step
    (xt, yt), (xv, yv) = digits_tensors()
    counter = CountSteps()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[gl.EnergyMonitor(mlflow=False, log_artifacts=False),
                                    gl.EfficiencyEarlyStopping(monitor=monitor), counter])
    fit = functools.partial(trainer.fit, two_loader_module(), DataLoader(TensorDataset(xt[:256], yt[:256]),
                                                                         batch_size=64),
                            [DataLoader(TensorDataset(xv[:200], yv[:200]), batch_size=100),
                             DataLoader(TensorDataset(xv[200:], yv[200:]), batch_size=100)])
    if ok:
        fit()
        assert trainer.current_epoch == 2 and counter.steps == 8
    else:
        with pytest.raises(ValueError, match=r"val_acc.*val_acc/dataloader_idx_0"):
            fit()
        assert counter.steps == 0


def test_a_metric_not_logged_at_an_evaluation_is_not_read_again_from_an_earlier_one(tmp_path, fake_nvml,
                                                                                   green_log):
    # Lightning keeps a metric's last value in callback_metrics when a validation does not log it; a
    # flat run of such repeats must not look like a plateau, nor be logged as new efficiency points
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    values = [0.5, 0.6, 0.7] + [None] * 9
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                               log_artifacts=False, efficiency_metrics=["score"])
    stopper = gl.EfficiencyEarlyStopping(monitor="score", min_evaluations=2, patience=2)  # strict: no error either
    t = lightning_fit(tmp_path, val_module(values), [monitor, stopper, work_clock(fake_nvml, val_s=0.002)],
                      max_epochs=len(values), num_sanity_val_steps=0)
    assert t.current_epoch == len(values) and monitor.stop_decision is None, "no stop on stale repeats"
    client, (run,) = runs(uri)
    rid = run.info.run_id
    assert steps(client, rid, "efficiency/score_per_kj") == [3, 7, 11], "only where score was logged"
    evaluations = records_of(monitor, "evaluation")
    assert ["score" in r.metrics for r in evaluations] == [v is not None for v in values]
    assert green_log.text.count("score was not logged at this evaluation") == 1
    assert "efficiency_metrics names" not in green_log.text  # it is logged, if not at every evaluation


@pytest.mark.parametrize("mlflow_on", [True, False])
def test_an_efficiency_metric_no_evaluation_logs_is_said_once_with_the_names_logged(tmp_path, fake_nvml, green_log,
                                                                                    mlflow_on):
    """``efficiency_metrics=["val_accuracy"]`` where the evaluations log ``val_acc``: no efficiency metric and no
    word of it; now one warning, naming what was logged and the close name (with ``mlflow=False`` too, where the
    config's typo went unsaid)."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    where = dict(tracking_uri=ready_store(tmp_path)) if mlflow_on else dict(mlflow=False)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, **where,
                               output_dir=str(tmp_path / "out"), log_artifacts=False,
                               efficiency_metrics=["scores", "score"])
    lightning_fit(tmp_path, val_module([0.5, 0.6, 0.7]), [monitor, work_clock(fake_nvml, val_s=0.002)],
                  max_epochs=3, num_sanity_val_steps=0)
    said = [r.getMessage() for r in green_log.records if "efficiency_metrics names" in r.getMessage()]
    assert len(said) == 1 and "'scores'" in said[0] and "did you mean 'score'?" in said[0], said


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])
def test_a_training_metric_logged_per_epoch_is_read_with_its_own_epochs_evaluation(tmp_path, fake_nvml,
                                                                                   val_check_interval):
    """``self.log("train_score", ..., on_step=False, on_epoch=True)`` in ``training_step``: Lightning reports it at
    the epoch's end, after the epoch's validation. Each evaluation was paired with the epoch before's value (the
    first had none, the last epoch's was never read). Now an evaluation that ends the epoch reads this epoch's,
    and one within the epoch reads none (the value there is the last epoch's, no new measurement)."""
    values = [0.2, 0.5, 0.6, 0.9]
    base = lightning_digits_module()

    class TrainScored(base):
        def training_step(self, batch, batch_idx):
            self.log("train_score", values[self.current_epoch], on_step=False, on_epoch=True)
            return super().training_step(batch, batch_idx)

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                               log_artifacts=False, efficiency_metrics=["train_score"])
    stopper = gl.EfficiencyEarlyStopping(monitor="train_score", patience=10)
    lightning_fit(tmp_path, TrainScored(), [monitor, stopper, work_clock(fake_nvml, val_s=0.002)],
                  max_epochs=len(values), num_sanity_val_steps=0, val_check_interval=val_check_interval)
    client, (run,) = runs(uri)
    cumulative = dict(history(client, run.info.run_id, "energy/cumulative_j"))
    per_kj = history(client, run.info.run_id, "efficiency/train_score_per_kj")
    epoch_ends = [4 * (e + 1) - 1 for e in range(len(values))]  # 4 batches an epoch, a step each
    assert [s for s, _ in per_kj] == epoch_ends
    assert [round(v * cumulative[s] / 1000, 6) for s, v in per_kj] == values
    window = [round(v, 6) for _, v in stopper.state_dict()["window"]]  # (the last doubling's evaluations)
    assert window and window == values[-len(window):], window
    validations = [s for s, _ in history(client, run.info.run_id, "energy/eval_j")]
    assert len(validations) == len(values) / val_check_interval


def test_nan_is_skipped_once_and_nan_for_patience_evaluations_is_a_divergence(tmp_path, green_log):
    monitor = gl.EnergyMonitor(mlflow=False, log_artifacts=False)
    t = lightning_fit(tmp_path, val_module([0.5, math.nan, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97]),
                      [monitor, gl.EfficiencyEarlyStopping(monitor="score", patience=3)], max_epochs=8,
                      num_sanity_val_steps=0)
    assert t.current_epoch >= 4, "one NaN does not stop nor disable the stopper"
    assert monitor.stop_decision is None or monitor.stop_decision.reason.value != "diverged"
    monitor = gl.EnergyMonitor(mlflow=False, log_artifacts=False)
    t = lightning_fit(tmp_path, val_module([0.5, 0.6, math.nan, math.inf, math.nan, 0.9, 0.95]),
                      [monitor, gl.EfficiencyEarlyStopping(monitor="score", patience=3)], max_epochs=7,
                      num_sanity_val_steps=0)
    assert monitor.stop_decision.reason.value == "diverged"
    assert t.current_epoch == 5, "stopped at the third non-finite evaluation in a row"


def test_epochs_without_a_validation_are_not_checks(tmp_path, fake_nvml):
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                               log_artifacts=False)
    stopper = gl.EfficiencyEarlyStopping(monitor="val_acc", min_evaluations=2)
    lightning_fit(tmp_path, lightning_digits_module()(), [monitor, stopper, work_clock(fake_nvml, val_s=0.002)],
                  max_epochs=12, check_val_every_n_epoch=3)
    client, (run,) = runs(uri)
    rid = run.info.run_id
    vals = steps(client, rid, "energy/interval_j")
    assert vals == [11, 23, 35, 47], "an evaluation every third epoch (4 steps an epoch)"
    assert steps(client, rid, "energy/epoch_j") == list(range(3, 48, 4))
    stat = steps(client, rid, "stopping/val_acc_gain_pct_per_doubling")
    assert stat and set(stat) <= set(vals), "the criterion is computed at evaluations only"
    evaluations_j = [r.cumulative_j for r in monitor.records if r.kind.value == "evaluation"]
    assert all(any(j == pytest.approx(e) for e in evaluations_j) for j, _ in stopper.plateau.window)


# -- resume in the middle of a step-based run ----------------------------------------------------------
class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_hf_resume_mid_run_continues_the_step_axis_and_the_totals(tmp_path, digits, tracking):  # noqa: F811
    def monitor():
        return gt.EnergyMonitor(experiment_name="resume-steps", output_dir=str(tmp_path / "out"),
                                log_artifacts=False, log_every_n_steps=5)

    first = monitor()
    step_trainer(tmp_path, digits, [first, StopAt(30)], max_steps=60, save_strategy="steps", save_steps=30).train()
    second = monitor()
    step_trainer(tmp_path, digits, [second], max_steps=60, save_strategy="steps",
                 save_steps=30).train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-30"))
    client, found = runs(tracking, "resume-steps")
    assert len(found) == 1, "the resumed training continues its own run"
    rid = found[0].info.run_id
    assert steps(client, rid, "energy/interval_j") == [10, 20, 30, 40, 50, 60]
    cumulative = history(client, rid, "energy/cumulative_j")
    assert [s for s, _ in cumulative] == list(range(5, 61, 5))
    values = [v for _, v in cumulative]
    assert values == sorted(values), "the totals go on from the checkpoint's"
    assert second.cumulative_j > first.cumulative_j
    assert history(client, rid, "energy/total_j")[-1][1] == pytest.approx(second.cumulative_j)


def test_hf_the_same_trainer_resumed_continues_its_run_and_its_stoppers(tmp_path, digits, tracking):  # noqa: F811
    """The notebook's way: train() stops (or crashes), then the same Trainer, monitor and stoppers resume a
    checkpoint. The monitor kept its own state instead of the checkpoint's and opened a new run from zero, and the
    stopper's window mixed both runs' joules."""
    monitor = gt.EnergyMonitor(experiment_name="same-trainer", output_dir=str(tmp_path / "out"),
                               log_artifacts=False, log_every_n_steps=5)
    stopper = gt.EfficiencyEarlyStopping(monitor="accuracy", patience=100)
    t = step_trainer(tmp_path, digits, [monitor, stopper, StopAt(30)], max_steps=60, save_strategy="steps",
                     save_steps=30)
    t.train()
    at_checkpoint = monitor.cumulative_j
    t.train(resume_from_checkpoint=True)
    client, found = runs(tracking, "same-trainer")
    assert len(found) == 1, "the resumed training continues its own run"
    rid = found[0].info.run_id
    assert steps(client, rid, "energy/interval_j") == [10, 20, 30, 40, 50, 60]
    values = [v for _, v in history(client, rid, "energy/cumulative_j")]
    assert values == sorted(values) and monitor.cumulative_j > at_checkpoint, "the totals go on from the checkpoint's"
    joules = [j for j, _ in stopper.plateau.window]
    assert joules == sorted(joules) and at_checkpoint < joules[-1] <= monitor.cumulative_j, "one run's joules"


class Crash(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("crash")


def test_hf_a_crashed_training_resumed_in_a_new_trainer_ends_the_old_monitor(tmp_path, digits, tracking):  # noqa: F811
    """A notebook: train() raises at step 27, a new Trainer and monitor resume checkpoint-20. HF tells no callback
    of the exception: the old monitor lived on, and at the interpreter's exit logged a last point (with the resumed
    training's energy in it) into the run the new one had finished, and marked that run KILLED."""
    def monitor():
        return gt.EnergyMonitor(experiment_name="crashed", output_dir=str(tmp_path / "out"), log_artifacts=False,
                                log_every_n_steps=5)

    old, new = monitor(), monitor()
    with contextlib.suppress(RuntimeError):
        step_trainer(tmp_path, digits, [old, Crash(27)], max_steps=40, save_strategy="steps", save_steps=20).train()
    assert old.started, "HF said nothing of the crash"
    step_trainer(tmp_path, digits, [new], max_steps=40, save_strategy="steps",
                 save_steps=20).train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-20"))
    assert not old.started, "the crashed training's monitor was ended when its training was resumed"
    old._atexit()  # the interpreter's exit: nothing more from it
    client, (run,) = runs(tracking, "crashed")
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "energy/total_j")[-1] == (40, pytest.approx(new.cumulative_j))


def test_stoppers_handed_to_a_second_training_start_from_nothing(tmp_path, digits, tracking):  # noqa: F811
    """A second train() from scratch (no checkpoint) is a new run counted from zero: the stoppers kept the first
    run's evaluations and joules, so the criterion compared two runs' energies."""
    monitor = gt.EnergyMonitor(experiment_name="twice", output_dir=str(tmp_path / "out"), log_artifacts=False,
                               log_every_n_steps=5)
    stopper = gt.EfficiencyEarlyStopping(monitor="accuracy", patience=100)
    budget = gt.EnergyBudget(energy="1 kWh")
    t = step_trainer(tmp_path, digits, [monitor, stopper, budget], max_steps=30)
    t.train()
    first = list(stopper.plateau.window)
    t.train()
    _, found = runs(tracking, "twice")
    assert len(found) == 2
    joules = [j for j, _ in stopper.plateau.window]
    assert first and 0 < len(joules) <= monitor.evaluations == 3 and joules == sorted(joules)
    assert joules[-1] <= monitor.cumulative_j, "the second run's joules only"
    assert budget.budget.state_dict()["last_check"]["j"] <= monitor.cumulative_j + 1e-9


def test_hf_resumed_with_report_to_mlflow_follows_the_new_run_hf_opens(tmp_path, digits, tracking):  # noqa: F811
    # a new process resuming a checkpoint: HF's MLflowCallback opens a new run for the trainer's metrics; the energy
    # goes there too (so the charts overlay), its totals continued from the checkpoint's
    first = gt.EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False, log_every_n_steps=5)
    step_trainer(tmp_path, digits, [first, StopAt(30)], max_steps=60, save_strategy="steps", save_steps=30,
                 report_to=["mlflow"]).train()
    second = gt.EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False, log_every_n_steps=5)
    step_trainer(tmp_path, digits, [second], max_steps=60, save_strategy="steps", save_steps=30,
                 report_to=["mlflow"]).train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-30"))
    client, found = runs(tracking)
    assert len(found) == 2
    old, new = sorted(found, key=lambda r: r.info.start_time)
    assert steps(client, new.info.run_id, "eval_accuracy") == [40, 50, 60]
    assert steps(client, new.info.run_id, "energy/interval_j") == [40, 50, 60], "energy beside HF's own metrics"
    assert steps(client, old.info.run_id, "energy/interval_j") == [10, 20, 30], "nothing of the resumed part"
    cumulative = history(client, new.info.run_id, "energy/cumulative_j")
    assert cumulative[0][1] > history(client, old.info.run_id, "energy/cumulative_j")[-1][1] * 0.99, "continued"
    assert "green.pue" in client.get_run(new.info.run_id).data.params, "the new run gets the params too"


def test_hf_an_eval_dataset_dict_is_one_evaluation_per_round(tmp_path, digits, tracking):  # noqa: F811
    # HF evaluates a dict of data sets one by one, one on_evaluate each at the same step: one evaluation point
    # holds them all, and a stopper may watch any of them
    from helpers import DigitsDataset

    val = digits[1]
    sets = {"a": DigitsDataset(val.x[:64], val.y[:64]), "b": DigitsDataset(val.x[64:], val.y[64:])}
    monitor = gt.EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False, log_every_n_steps=100)
    stopper = gt.EfficiencyEarlyStopping(monitor="a_accuracy", min_gain="0 per doubling", patience=100)
    step_trainer(tmp_path, (digits[0], sets), [monitor, stopper], max_steps=40, report_to=["mlflow"]).train()
    client, (run,) = runs(tracking)
    rid = run.info.run_id
    assert steps(client, rid, "eval_a_accuracy") == steps(client, rid, "eval_b_accuracy") == [10, 20, 30, 40]
    for key in ("energy/eval_j", "energy/interval_j", "time/eval_s"):
        assert steps(client, rid, key) == [10, 20, 30, 40], key
    assert monitor.evaluations == 4
    evaluations = records_of(monitor, "evaluation")
    assert all({"eval_a_accuracy", "eval_b_accuracy"} <= set(r.metrics) for r in evaluations)
    assert len(stopper.plateau.window) >= 2, "the stopper saw a_accuracy"


def test_lightning_on_a_gpu_the_evaluation_window_opens_at_its_first_batch(tmp_path, fake_nvml, monkeypatch):
    """Where window edges synchronise CUDA, the evaluation's window opens at the first validation batch, after
    Lightning's validation set-up, with the sync there (at ``on_validation_start`` the GPU sat idle through the
    set-up); elsewhere at ``on_validation_start``. The CUDA runtime is the faked boundary: this torch has none."""
    from green_callbacks.meter import EnergyMeter

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))

    class Seen(pl.Callback):  # after the monitor in the list: its hooks have run
        def __init__(self, monitor):
            self.monitor, self.seen = monitor, []

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.seen.append(("start", self.monitor.evaluation_open, len(syncs)))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                self.seen.append((batch_idx, self.monitor.evaluation_open, len(syncs)))

    def fit(gpu: bool, empty_validation=False):
        monkeypatch.setattr(EnergyMeter, "syncs_cuda", property(lambda self: gpu))
        syncs.clear()
        monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False)
        seen = Seen(monitor)
        train, val = digits_loaders()
        if empty_validation:  # an iterable with no batch: Lightning runs the validation and finds none
            val = DataLoader(Nothing(), batch_size=None)
        pl.Trainer(max_epochs=2, callbacks=[monitor, seen, work_clock(fake_nvml, val_s=0.002)], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0).fit(lightning_digits_module()(), train, val)
        return monitor, seen.seen

    monitor, seen = fit(gpu=True)
    first = [s for s in seen if s[0] in ("start", 0)]
    # closed at the validation's start, open at its first batch, with one sync more in between (its edge's)
    assert [(where, is_open) for where, is_open, _ in first] == [("start", False), (0, True)] * 2
    assert all(b[2] == a[2] + 1 for a, b in itertools.pairwise(first) if a[0] == "start")
    assert all(r.eval_j > 0 for r in records_of(monitor, "evaluation"))
    assert sum(r.energy_j for r in records_of(monitor, "epoch")) == pytest.approx(monitor.cumulative_j, abs=0.003)

    _, seen = fit(gpu=False)  # on the CPU: open from the validation's start, nothing synchronised
    assert [(where, is_open) for where, is_open, _ in seen if where in ("start", 0)] == [("start", True), (0, True)] * 2
    assert syncs == []

    class Nothing(IterableDataset):
        def __iter__(self):
            return iter(())

    monitor, seen = fit(gpu=True, empty_validation=True)  # no batch: no window, and none left pending
    assert [where for where, _, _ in seen] == ["start", "start"]
    assert not monitor.evaluation_open and monitor._evaluation_due is False
    assert [r.eval_j for r in records_of(monitor, "evaluation")] == [0.0, 0.0]


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, two optimizers stepped at every batch (a GAN's shape): ``global_step`` counts both."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt, net in zip(self.optimizers(), (self.a, self.b), strict=True):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.log("train_loss", loss)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.a(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), 0.1), torch.optim.SGD(self.b.parameters(), 0.1)]


@pytest.mark.parametrize("shape", ["a validation inside an accumulation", "two optimizers, manual optimization"])
def test_lightning_energy_is_logged_at_the_loggers_step_however_the_optimizers_step(tmp_path, fake_nvml, shape):
    """Lightning's loggers log at the batches that stepped (once a batch, whatever the number of optimizers),
    not at ``global_step``: a validation in the middle of an accumulation, or two optimizers stepping per
    batch, put ``global_step - 1`` elsewhere. Energy points land at the logger's step, and the cadence
    between evaluations (every 4 steps here) counts those steps."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    logger = MLFlowLogger(experiment_name="axis", tracking_uri=uri)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, log_artifacts=False, output_dir=str(tmp_path / "out"),
                               log_every_n_steps=4)
    (xt, yt), (xv, yv) = digits_tensors()
    two = shape.startswith("two")
    pl.Trainer(max_epochs=2, accumulate_grad_batches=1 if two else 3, val_check_interval=1.0 if two else 0.5,
               callbacks=[work_clock(fake_nvml), monitor], logger=logger, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
               num_sanity_val_steps=0, log_every_n_steps=1).fit(
        TwoOptimizers() if two else lightning_digits_module()(),
        DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=32),  # 8 batches an epoch
        DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64))
    client, (run,) = runs(uri, "axis")
    rid = run.info.run_id
    vals = steps(client, rid, "val_acc")
    assert vals == ([7, 15] if two else [1, 2, 4, 5])
    for key in [*EVAL_CONTRACT, "efficiency/val_acc_per_kj"]:
        assert steps(client, rid, key) == vals, key
    if two:  # a point every 4 of the logger's steps, after the 4th, 8th... (as Lightning logs): with the epochs
        assert steps(client, rid, "energy/cumulative_j") == [3, 7, 11, 15]


def test_lightning_points_between_evaluations_never_cut_an_accumulation(tmp_path, fake_nvml):
    """``accumulate_grad_batches=4``: the logger's step of a micro-batch is that of the optimizer step it leads
    to, so a point every step (``log_every_n_steps=1``) must wait for the step's last micro-batch. It was taken
    after the first, and the step's validation made a second point at the same step: ``throughput`` logged
    twice there, ``cumulative_j`` logged without the step's other micro-batches and the validation."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, log_artifacts=False, output_dir=str(tmp_path / "out"),
                               log_every_n_steps=1)
    (xt, yt), (xv, yv) = digits_tensors()
    pl.Trainer(max_epochs=2, accumulate_grad_batches=4, val_check_interval=8,
               callbacks=[work_clock(fake_nvml, val_s=0.05), monitor],
               logger=MLFlowLogger(experiment_name="accumulate", tracking_uri=uri),
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               num_sanity_val_steps=0, log_every_n_steps=1).fit(
        lightning_digits_module()(), DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=16),  # 16 batches
        DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64))
    client, (run,) = runs(uri, "accumulate")
    rid = run.info.run_id
    evaluations = steps(client, rid, "val_acc")
    assert evaluations == [1, 3, 5, 7]  # 4 optimizer steps an epoch, a validation every 2nd
    for key in [*CUMULATIVE, "throughput/samples_per_j"]:
        logged = steps(client, rid, key)
        assert logged == sorted(set(logged)), key  # once per step
    assert not {r.step for r in records_of(monitor, "point")} & set(evaluations)
    assert all(r.energy_j == pytest.approx(4 * 0.010 * 100.0) for r in records_of(monitor, "point"))  # whole steps
    cumulative = dict(history(client, rid, "energy/cumulative_j"))
    for record in records_of(monitor, "evaluation"):
        assert cumulative[record.step] == pytest.approx(record.cumulative_j)


def test_lightning_max_steps_with_two_optimizers_a_batch_projects_the_end_on_the_loggers_axis(tmp_path, fake_nvml):
    """Manual optimization stepping two optimizers a batch: ``max_steps=40`` (optimizer steps) ends the run after
    20 batches, while the step axis counts batches. The projection to the end was made for 40 (twice the energy)."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, log_artifacts=False, output_dir=str(tmp_path / "out"))
    (xt, yt), (xv, yv) = digits_tensors()
    pl.Trainer(max_steps=40, max_epochs=10, callbacks=[work_clock(fake_nvml), monitor, gl.EnergyBudget(energy="1 kJ")],
               logger=MLFlowLogger(experiment_name="two", tracking_uri=uri), enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0).fit(
        TwoOptimizers(), DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=32),  # 8 batches an epoch
        DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64))
    client, (run,) = runs(uri, "two")
    total = monitor.cumulative_j
    assert total == pytest.approx(20 * 0.010 * 100.0)  # 20 batches of 1 J
    projected = history(client, run.info.run_id, "projection/energy_j")
    assert [s for s, _ in projected][:2] == [7, 15]
    # the first projection rates the first interval alone (its 8 batches are 7 steps on the 0-based axis)
    assert projected[0][1] == pytest.approx(total, rel=0.1) and projected[0][1] < 1.1 * total, projected
    assert all(value == pytest.approx(total, rel=1e-6) for _, value in projected[1:]), projected


def test_lightning_a_budget_stop_keeps_the_step_and_the_validation_that_follow_it_in_the_budget(tmp_path, fake_nvml):
    """A point due at a step is taken as the next one starts, and Lightning validates when told to stop: a stop
    decided there costs one more step and a validation. On this work clock (1 J a step, 5 J a validation, a
    point every 5 steps, a validation every 20) the budget of 42 J used to end at 46 J."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"), log_every_n_steps=5)
    (_, _), (xv, yv) = digits_tensors()
    pl.Trainer(max_steps=200, val_check_interval=20, check_val_every_n_epoch=None, logger=False,
               callbacks=[work_clock(fake_nvml, val_s=0.05), monitor, gl.EnergyBudget(energy="42 J")],
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               num_sanity_val_steps=0).fit(lightning_digits_module()(), DataLoader(Endless(), batch_size=None),
                                           DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=128))
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert 30 <= monitor.cumulative_j <= 42
    assert "stopping then" in monitor.stop_decision.message


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_lightning_a_budget_reserves_the_next_validation_with_accumulated_gradients(tmp_path, fake_nvml, accumulate):
    """``accumulate_grad_batches``: validations are counted in batches, the step axis in optimizer steps. The
    next validation was guessed from the last two's spacing where it was not read from Lightning's schedule: with
    validations 4 and 8 steps apart (23 batches an epoch, one every 8 batches, accumulated by 2) a 500 J budget
    ended at 546 J, by 4 at 735 J for 700. 3 J a batch, 60 J a validation."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"))
    budget = {1: 500.0, 2: 500.0, 4: 700.0}[accumulate]
    (xt, yt), (xv, yv) = digits_tensors()
    pl.Trainer(max_epochs=20, val_check_interval=8, accumulate_grad_batches=accumulate, logger=False,
               callbacks=[work_clock(fake_nvml, train_s=0.03, val_s=0.6), monitor,
                          gl.EnergyBudget(energy=f"{budget} J")],
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               num_sanity_val_steps=0).fit(
        lightning_digits_module()(), DataLoader(TensorDataset(xt[:184], yt[:184]), batch_size=8),  # 23 batches
        DataLoader(TensorDataset(xv[:64], yv[:64]), batch_size=64))  # one validation batch: 60 J
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert budget - 100 <= monitor.cumulative_j <= budget, monitor.stop_decision.message
    assert "+ an evaluation ~60 J" in monitor.stop_decision.message


def test_hf_a_budget_stop_keeps_the_step_that_follows_it_in_the_budget(tmp_path, digits, fake_nvml):  # noqa: F811
    """HF: a point due at step 10 is taken as step 11 begins, and step 11 runs before the stop takes effect. On this
    work clock (1 J a step, a point every 5) the budget of 15.5 J used to end at 16 J."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"), log_every_n_steps=5)
    step_trainer(tmp_path, digits, [hf_work_clock(fake_nvml), monitor, gt.EnergyBudget(energy="15.5 J")],
                 max_steps=60, eval_steps=20).train()
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert 10 <= monitor.cumulative_j <= 15.5


@pytest.mark.alone  # work-clock joules, but a check between points adds sampled power x wall time
def test_lightning_a_budget_stop_before_the_first_validation_keeps_that_validation_in_the_budget(tmp_path,
                                                                                              fake_nvml):
    """A stop before the first validation still pays one (Lightning validates on stopping), and nothing measured
    said what one costs: a 100 J budget ended at 126 J. Lightning's sanity check is an evaluation before training:
    its joules per batch estimate a full validation until one is measured (and stay out of the training rate)."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"), log_every_n_steps=5)
    (xt, yt), (xv, yv) = digits_tensors()
    pl.Trainer(max_epochs=3, logger=False, num_sanity_val_steps=2,  # 2 of the 2 validation batches
               callbacks=[work_clock(fake_nvml, val_s=0.15), monitor,
                          gl.EnergyBudget(energy="99.5 J", check_every_n_steps=1)],
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(
        lightning_digits_module()(), DataLoader(TensorDataset(xt, yt), batch_size=32),  # 45 steps of 1 J
        DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64))  # 30 J a validation, the sanity check's too
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert monitor.evaluations == 1 and 90 <= monitor.cumulative_j <= 99.5


@pytest.mark.parametrize("strategy", ["epoch", "steps"])
def test_hf_a_budget_keeps_the_coming_evaluation_in_the_budget(tmp_path, digits, fake_nvml, strategy):  # noqa: F811
    """Costly evaluations (30 J against 1 J a step), budget checks every 2 steps: a check just before a scheduled
    evaluation projected only training, and with ``eval_strategy="epoch"`` a stop ends the epoch, which HF then
    evaluates. A 200 J budget ended at 207-230 J. (The whole run, 5 epochs of 32 steps and 4 evaluations, costs
    exactly 200 J: a 180 J budget must stop it.)"""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)

    class Work(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fake_nvml.advance(0.01)

        def on_prediction_step(self, args, state, control, **kwargs):
            fake_nvml.advance(0.3 / 6)  # 6 batches of 64: 30 J an evaluation

    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"), log_every_n_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=5, eval_strategy=strategy,
                             eval_steps=40, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    Trainer(model=hf_digits_model(), args=args, train_dataset=digits[0], eval_dataset=digits[1],
            compute_metrics=hf_accuracy, callbacks=[Work(), monitor, gt.EnergyBudget(energy="180 J")]).train()
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert monitor.evaluations >= 2 and 140 <= monitor.cumulative_j <= 180


def test_hf_a_budget_reserves_the_next_evaluation_from_the_first_one_on(tmp_path, digits, fake_nvml):  # noqa: F811
    """Checks only at the evaluations (no points between): at the first one, how far the next check is was not
    known, and its evaluation (10 J) was not reserved: an 80 J budget ran a second epoch to 84 J."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)

    class Work(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fake_nvml.advance(0.01)  # 1 J a step, 32 steps an epoch

        def on_prediction_step(self, args, state, control, **kwargs):
            fake_nvml.advance(0.3 / 6)  # 5 J a batch of 64: 10 J an evaluation

    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"), log_every_n_steps=10_000)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=5, eval_strategy="epoch",
                             per_device_train_batch_size=16, per_device_eval_batch_size=64, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    Trainer(model=hf_digits_model(), args=args, train_dataset=digits[0], eval_dataset=digits[1],
            compute_metrics=hf_accuracy, callbacks=[Work(), monitor, gt.EnergyBudget(energy="80 J")]).train()
    # after the first epoch: 42 J spent, the next epoch's 32 J training and 10 J evaluation would make 84 J
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert monitor.evaluations == 1 and monitor.cumulative_j == pytest.approx(42.0)
    assert "+ an evaluation ~10 J" in monitor.stop_decision.message


def test_lightning_a_finite_iterable_without_len_leaves_the_runs_end_unknown(tmp_path, fake_nvml):
    """Lightning cannot count a finite iterable without ``len()`` (``estimated_stepping_batches`` returns
    ``max_steps``, -1): the run's end is unknown, so the stop decides per doubling only and nothing is
    projected from it; it read as a run with no step left, which stopped a run still climbing."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    (xt, yt), (xv, yv) = digits_tensors()

    class Finite(IterableDataset):
        def __iter__(self):
            return ((xt[i * 32:(i + 1) * 32], yt[i * 32:(i + 1) * 32]) for i in range(8))

    pl.seed_everything(0)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, log_artifacts=False, mlflow=False)
    trainer = pl.Trainer(max_epochs=12, callbacks=[work_clock(fake_nvml, val_s=0.002), monitor,
                                                   gl.EfficiencyEarlyStopping(monitor="val_acc")],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(lightning_digits_module(lr=1e-3)(), DataLoader(Finite(), batch_size=None),
                DataLoader(TensorDataset(xv, yv), batch_size=512))
    assert monitor.max_steps is None
    assert monitor.stop_decision is None and trainer.current_epoch == 12  # still climbing: val_acc 0.14 -> 0.55


def test_hf_resume_from_a_checkpoint_between_points_loses_nothing(tmp_path, digits, fake_nvml):  # noqa: F811
    """A checkpoint between two logging points (saved at step 25; points every 5, evaluations every 10): a point
    is taken as it is saved, so a run stopped at 27 and resumed from it books the same joules as the run that
    never stopped, and the evaluation after the resume covers its whole stretch (20 -> 30)."""
    def train(name, stop_at=None, resume=None):
        fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
        monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                                   log_every_n_steps=5)
        extra = [StopAt(stop_at)] if stop_at else []
        step_trainer(tmp_path / name, digits, [hf_work_clock(fake_nvml), monitor, *extra], max_steps=60,
                     save_strategy="steps", save_steps=25).train(resume_from_checkpoint=resume)
        return monitor

    whole = train("whole")
    train("parts", stop_at=27)
    resumed = train("parts", resume=str(tmp_path / "parts" / "hf" / "checkpoint-25"))
    assert resumed.cumulative_j == pytest.approx(whole.cumulative_j, abs=1e-6)
    after = [(r.start_step, r.step, round(r.energy_j, 6)) for r in records_of(resumed, "evaluation")]
    assert after == [(r.start_step, r.step, round(r.energy_j, 6)) for r in records_of(whole, "evaluation")]
    # the run's one epoch (max_steps < an epoch) is the whole run's, not only what came after the checkpoint
    (epoch,), (whole_epoch,) = records_of(resumed, "epoch"), records_of(whole, "epoch")
    assert (epoch.start_step, epoch.step) == (whole_epoch.start_step, whole_epoch.step)
    assert epoch.energy_j == pytest.approx(whole_epoch.energy_j, rel=1e-3)


class CrashAt13(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 13:
            raise RuntimeError("crash")


def checkpointed_fit(tmp_path, fake_nvml, folder, every_n_train_steps, crash=False, ckpt=None, **monitor_args):
    """A Lightning fit of 4 epochs of 8 batches on the work clock, a step checkpoint every ``every_n_train_steps``
    in ``tmp_path / folder``; ``crash``: raise at step 13; ``ckpt``: resume from it. Returns the monitor."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    (xt, yt), (xv, yv) = digits_tensors()
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, log_artifacts=False, **monitor_args)
    callbacks = [work_clock(fake_nvml, val_s=0.002), monitor,
                 ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=every_n_train_steps, save_top_k=-1),
                 *([CrashAt13()] if crash else [])]
    trainer = pl.Trainer(max_epochs=4, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    with contextlib.suppress(RuntimeError):
        trainer.fit(lightning_digits_module()(), DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=32),
                    DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64), ckpt_path=ckpt)
    return monitor


def test_lightning_resume_in_the_middle_of_an_epoch(tmp_path, fake_nvml):
    """A step checkpoint in the middle of an epoch (``every_n_train_steps=10``, 8 batches an epoch), a crash at
    step 13, a resume: the totals are the uninterrupted run's, and the resumed epoch has a record (Lightning
    calls no ``on_train_epoch_start`` for it) of the whole epoch, as the uninterrupted run's: it covered only the
    steps since the checkpoint (6.4 J of the epoch's 8.4 J; a step-based run of one epoch lost to its
    ``energy/epoch_j`` all it had spent before the checkpoint)."""
    fit = functools.partial(checkpointed_fit, tmp_path, fake_nvml, every_n_train_steps=10, mlflow=False)
    whole = fit("whole")
    fit("parts", crash=True)
    resumed = fit("parts2", ckpt=str(tmp_path / "parts" / "epoch=1-step=10.ckpt"))
    assert resumed.cumulative_j == pytest.approx(whole.cumulative_j, abs=1e-6)
    epochs = records_of(resumed, "epoch")
    assert [r.step for r in epochs] == [r.step for r in records_of(whole, "epoch")] == [7, 15, 23, 31]
    before = records_of(whole, "epoch")[1]
    assert (epochs[1].start_step, epochs[1].step) == (before.start_step, before.step) == (7, 15)
    # 8 steps and a validation on this work clock, exactly: the epoch's part before the checkpoint is read with the
    # checkpoint's point (a peek's estimate made it 0.3 J of 65 too costly, varying from run to run)
    assert epochs[1].energy_j == pytest.approx(before.energy_j, abs=1e-9) and before.energy_j == pytest.approx(8.4)
    assert epochs[1].eval_j == pytest.approx(before.eval_j)
    assert sum(r.energy_j for r in epochs) == pytest.approx(resumed.cumulative_j, abs=1e-9)  # they tile the run


def test_lightning_resume_from_a_checkpoint_at_an_epochs_last_step_books_that_epoch(tmp_path, fake_nvml):
    """A step checkpoint at an epoch's last batch (``every_n_train_steps=8``, 8 batches an epoch): Lightning resumes
    at the next epoch, and that epoch's end never comes again. Its record was dropped (the checkpoint's part of it
    held for an epoch that never opened): 3 epoch records for a 4-epoch training, no ``energy/epoch_j`` at step 7."""
    from mlflow.tracking import MlflowClient

    uri = ready_store(tmp_path)
    fit = functools.partial(checkpointed_fit, tmp_path, fake_nvml, every_n_train_steps=8, tracking_uri=uri,
                            experiment_name="resume", output_dir=str(tmp_path / "out"))
    whole = fit("whole")
    fit("parts", crash=True)
    resumed = fit("resumed", ckpt=str(tmp_path / "parts" / "epoch=0-step=8.ckpt"))
    epochs = records_of(resumed, "epoch")
    assert [(r.epoch, r.start_step, r.step) for r in epochs] == [
        (r.epoch, r.start_step, r.step) for r in records_of(whole, "epoch")] and [r.step for r in epochs] == [
        7, 15, 23, 31]
    # epoch 0's 8 steps before the checkpoint (its validation came after it, in the crashed process)
    assert epochs[0].energy_j == pytest.approx(8.0) and epochs[0].eval_j == 0.0
    # into the crashed run: its epoch 0 (at 7, the validation after the checkpoint in it) and its end (12) stay, as
    # docs/metrics.md says of the steps between a checkpoint and a crash; the resumed process logs 7 itself too
    history = MlflowClient(uri).get_metric_history(resumed.run.run_id, "energy/epoch_j")
    assert sorted(m.step for m in history) == [7, 7, 12, 15, 23, 31]


def test_lightning_a_step_checkpoint_before_a_validation_leaves_the_validation_in_the_steps_cumulative(
        tmp_path, fake_nvml):
    """``ModelCheckpoint(every_n_train_steps=10)`` with ``val_check_interval=10``: at every 10th step Lightning
    saves before it validates. The checkpoint's point comes first; the step's ``energy/cumulative_j`` (logged once
    per step) must still hold the validation, so the last one is the run's total."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, output_dir=str(tmp_path / "out"), log_artifacts=False)
    (_, _), (xv, yv) = digits_tensors()
    trainer = pl.Trainer(max_steps=30, val_check_interval=10, check_val_every_n_epoch=None,
                         logger=MLFlowLogger(experiment_name="ckpt", tracking_uri=uri),
                         callbacks=[work_clock(fake_nvml, val_s=0.05), monitor,
                                    ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(lightning_digits_module()(), DataLoader(Endless(), batch_size=None),
                DataLoader(TensorDataset(xv, yv), batch_size=512))
    client, (run,) = runs(uri, "ckpt")
    cumulative = history(client, run.info.run_id, "energy/cumulative_j")
    assert [s for s, _ in cumulative] == steps(client, run.info.run_id, "val_acc") == [9, 19, 29]  # once per step
    evaluations = records_of(monitor, "evaluation")
    assert [r.step for r in evaluations] == [9, 19, 29]  # the logger's axis
    for (_, value), record in zip(cumulative, evaluations, strict=True):
        assert value == pytest.approx(record.cumulative_j)  # the validation at the step included
    assert cumulative[-1][1] == pytest.approx(monitor.cumulative_j)
    assert history(client, run.info.run_id, "energy/total_j")[0][1] == pytest.approx(monitor.cumulative_j)


@pytest.mark.parametrize("framework", ["lightning", "hf"])
def test_an_efficiency_stop_in_a_training_that_never_evaluates_says_so_before_the_first_step(
        tmp_path, digits, framework, green_log):  # noqa: F811
    """No validation (Lightning without a val loader, HF ``eval_strategy="no"``): the stopper decides at evaluations,
    so it says once, at the start, that it cannot stop this run (it had run to the end without a word)."""
    seen = []

    class FirstStep(pl.Callback if framework == "lightning" else TrainerCallback):
        def on_train_batch_start(self, *args, **kwargs):
            seen.append(green_log.text.count("decides at evaluations, and this training has none"))

        def on_step_begin(self, *args, **kwargs):
            self.on_train_batch_start()

    monitor_kw = {"measure_cpu": True, "mlflow": False, "log_artifacts": False, "output_dir": str(tmp_path / "out")}
    if framework == "lightning":
        pl.Trainer(max_epochs=1, limit_train_batches=3, callbacks=[gl.EnergyMonitor(**monitor_kw),
                                                                   gl.EfficiencyEarlyStopping(monitor="val_acc"),
                                                                   FirstStep()],
                   logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path).fit(lightning_digits_module()(), digits_loaders()[0])
    else:
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, eval_strategy="no", report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True)
        Trainer(model=hf_digits_model(), args=args, train_dataset=digits[0],
                callbacks=[gt.EnergyMonitor(**monitor_kw), gt.EfficiencyEarlyStopping(monitor="accuracy"),
                           FirstStep()]).train()
    assert seen[0] == 1 and green_log.text.count("decides at evaluations, and this training has none") == 1
