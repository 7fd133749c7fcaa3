"""Budgets and the efficiency stop at the edges of a training's schedule.

Validations every n-th epoch, ``max_time``, a monitored training metric, a budget smaller than the
first interval, a run's last step, a cost budget, HF's ``greater_is_better``, HF's run when the
monitor fails. Real Lightning and HF trainers and MLflow stores; the GPU is simulated on a work clock
(tests/fake_nvml), so the joules are exact.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from test_hf_monitor import digits, hf_trainer, tracking  # noqa: F401 - fixtures
from test_intervals import Endless
from torch.utils.data import DataLoader, TensorDataset

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt
from green_callbacks.budgets import Budget
from green_callbacks.lightning_trainer import Schedule, step_of
from green_callbacks.policies import MonitorError, Progress, Totals
from green_callbacks.stopping import BudgetStopper

from helpers import (
    DigitsDataset,
    digits_tensors,
    hf_accuracy,
    hf_digits_model,
    hf_work_clock,
    history,
    lightning_digits_module,
    ready_store,
    runs,
    work_clock,
)

TRAINER = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def eight_steps_an_epoch():
    """256 training samples in batches of 32 (8 steps of 1 J an epoch on the work clock), 128 to validate."""
    (xt, yt), (xv, yv) = digits_tensors()
    return (DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=32),
            DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64))


def monitor_at(tmp_path, **kw):
    return gl.EnergyMonitor(gpus="all", measure_cpu=False, log_artifacts=False, output_dir=str(tmp_path / "out"),
                            **{"mlflow": False, **kw})


# -- Lightning: what a stop costs follows Lightning's schedule ------------------------------------------
@pytest.mark.parametrize(("budget", "lowest"), [(110.0, 100.0), (60.0, 30.0)])
def test_lightning_a_budget_with_a_validation_every_third_epoch_pays_only_what_lightning_runs(
        tmp_path, fake_nvml, budget, lowest):
    """``check_val_every_n_epoch=3``, 8 J an epoch, 20 J a validation: a stop decided at an epoch's end was charged
    a validation Lightning does not run (the 110 J budget stopped at 80 J, where one more epoch and its validation
    fit); and before the first validation its step was not known: the schedule says it."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = monitor_at(tmp_path)
    train, val = eight_steps_an_epoch()
    pl.Trainer(max_epochs=30, check_val_every_n_epoch=3, logger=False, num_sanity_val_steps=0,
               callbacks=[work_clock(fake_nvml, val_s=0.1), monitor, gl.EnergyBudget(energy=budget)],
               **TRAINER).fit(lightning_digits_module()(), train, val)
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert lowest <= monitor.cumulative_j <= budget, monitor.stop_decision.message


def test_lightning_a_budget_going_on_past_a_validation_keeps_what_stopping_at_the_next_point_costs(tmp_path, fake_nvml):
    """Points every 5 steps, a validation every 10 (10 J against 1 J a step), uniform costs: a check at a validation
    kept nothing for a stop there (none is due: the loop ends), but the next chance to stop is the point 5 steps on,
    where a stop still costs a step and the validation Lightning runs on stopping. 7 of 26 budgets from 30 J to
    130 J ended over (38 J at 46 J, 98 J at 106 J)."""
    (xt, yt), (xv, yv) = digits_tensors()
    train = DataLoader(TensorDataset(xt[:1024], yt[:1024]), batch_size=32)
    val = DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64)
    ended = {}
    for budget in range(30, 131, 4):
        fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
        monitor = monitor_at(tmp_path, log_every_n_steps=5)
        pl.Trainer(max_steps=300, val_check_interval=10, check_val_every_n_epoch=None, logger=False,
                   callbacks=[work_clock(fake_nvml, val_s=0.05), monitor, gl.EnergyBudget(energy=budget)],
                   **TRAINER).fit(lightning_digits_module()(), train, val)
        assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
        ended[budget] = monitor.cumulative_j
    assert {b: j for b, j in ended.items() if not b - 20 <= j <= b} == {}


def test_lightning_a_budget_checked_in_an_epoch_without_validation_keeps_the_next_ones_validation(tmp_path, fake_nvml):
    """``check_val_every_n_epoch=2``, 8 steps of 1 J an epoch, a 20 J validation, points every 3 steps: a check in
    an epoch that does not validate judged a stop at the next check by this epoch (no validation on stopping), but
    the next check may fall in the epoch that validates, where a stop runs Lightning's validation."""
    ended = {}
    for budget in range(40, 121, 3):
        fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
        monitor = monitor_at(tmp_path, log_every_n_steps=3)
        pl.Trainer(max_epochs=30, check_val_every_n_epoch=2, logger=False, num_sanity_val_steps=0,
                   callbacks=[work_clock(fake_nvml, val_s=0.1), monitor, gl.EnergyBudget(energy=budget)],
                   **TRAINER).fit(lightning_digits_module()(), *eight_steps_an_epoch())
        assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
        ended[budget] = monitor.cumulative_j
    assert {b: j for b, j in ended.items() if not b - 30 <= j <= b} == {}


@pytest.mark.parametrize("held_by", ["min_epochs", "min_steps"])
def test_lightning_a_stop_held_back_by_min_epochs_or_min_steps_says_so_and_books_the_saving_where_it_stops(
        tmp_path, fake_nvml, green_log, held_by):
    """Lightning trains on until ``min_epochs``/``min_steps`` are met, a stop decided before then included: the run
    said "stopped by the energy budget" and logged 235 J saved at the decision (epoch 2), stopped checking, and
    ended at 3x its budget with a quarter of that saved. Now the stop says it is held back, the stoppers go on
    being asked (the projection logged at every validation), and the saving is what the run's real end left."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = monitor_at(tmp_path, mlflow=True, tracking_uri=uri, experiment_name="held")
    limit = {"min_epochs": 8} if held_by == "min_epochs" else {"min_steps": 64}
    trainer = pl.Trainer(max_epochs=12, logger=False, num_sanity_val_steps=0, **limit,
                         callbacks=[work_clock(fake_nvml, val_s=0.05), monitor, gl.EnergyBudget(energy=60)],
                         **TRAINER)
    trainer.fit(lightning_digits_module()(), *eight_steps_an_epoch())  # an epoch: 8 J, its validation 10 J
    assert trainer.current_epoch == 8 and trainer.global_step == 64  # Lightning's: the stop waits for the minimum
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    held = [r.getMessage() for r in green_log.records if "held back" in r.getMessage()]
    assert len(held) == 1 and f"{held_by}=" in held[0], green_log.text
    assert monitor.cumulative_j == pytest.approx(8 * 18)
    client, (run,) = runs(uri, "held")
    saved = history(client, run.info.run_id, "energy/saved_j_projected")
    assert [s for s, _ in saved] == [63] and saved[0][1] == pytest.approx(4 * 18, rel=0.1)  # 4 epochs not trained
    assert [s for s, _ in history(client, run.info.run_id, "projection/energy_j")] == [8 * e - 1 for e in range(1, 9)]
    assert run.data.tags["green.stop_reason"] == "energy_budget"


@pytest.mark.alone  # work-clock joules, but a check between points adds sampled power x wall time
def test_hf_a_budget_step_check_keeps_the_evaluation_before_the_next_check(tmp_path, fake_nvml):
    """HF, 1 J a step, a 10 J evaluation every 10 steps, points every 5 and budget checks every 3 steps: at the check
    at step 27 the last two checks were 2 steps apart (25, 27), so the evaluation at 30, 3 steps on, was taken for
    one after the next check, which comes at 30 too: the evaluation runs first. 4 of 26 budgets ended over (54 J at
    60 J); the checks' own steps now say which comes first."""
    from transformers import Trainer, TrainingArguments

    (xt, yt), (xv, yv) = digits_tensors()
    ended = {}
    for budget in range(30, 131, 4):
        fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
        monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                                   output_dir=str(tmp_path / "out"), log_every_n_steps=5)
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=300, eval_strategy="steps", eval_steps=10,
                                 save_strategy="no", logging_steps=1000, per_device_train_batch_size=8,
                                 per_device_eval_batch_size=64, report_to="none", use_cpu=True, disable_tqdm=True)
        Trainer(model=hf_digits_model(), args=args, train_dataset=DigitsDataset(xt, yt),
                eval_dataset=DigitsDataset(xv[:64], yv[:64]), compute_metrics=hf_accuracy,
                callbacks=[hf_work_clock(fake_nvml, eval_s=0.1), monitor,
                           gt.EnergyBudget(energy=budget, check_every_n_steps=3)]).train()
        assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
        ended[budget] = monitor.cumulative_j
    assert {b: j for b, j in ended.items() if not b - 20 <= j <= b} == {}


@pytest.mark.parametrize(("schedule", "said"), [
    (dict(max_epochs=3, check_val_every_n_epoch=5), "has none"),  # every 5th epoch of 3: never
    (dict(max_steps=60, val_check_interval=100, check_val_every_n_epoch=None), "has none"),
    (dict(max_epochs=4), "this training has 3 before its last step"),  # fewer than min_evaluations=4
    (dict(max_epochs=6), None),
    # 8 batches an epoch accumulated by 4: 2 steps an epoch; a validation every 6 batches comes once an epoch, 3
    # before the 6th step (the schedule was not read under accumulation: nothing was said)
    (dict(max_epochs=3, val_check_interval=6, accumulate_grad_batches=4), "this training has 2 before its last step"),
    (dict(max_epochs=5, val_check_interval=6, accumulate_grad_batches=4), None)])
def test_lightning_a_schedule_with_too_few_validations_for_the_stop_says_so_before_the_first_step(
        tmp_path, fake_nvml, green_log, schedule, said):
    """A validation every 5th epoch of a 3-epoch run, or every 100 batches of a 60-step run: the stopper can never
    decide, and nothing said so (as it does for limit_val_batches=0)."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    stopper = gl.EfficiencyEarlyStopping(monitor="val_acc")
    pl.Trainer(logger=False, num_sanity_val_steps=0, callbacks=[monitor_at(tmp_path), stopper], **schedule,
               **TRAINER).fit(lightning_digits_module()(), *eight_steps_an_epoch())
    told = [r.getMessage() for r in green_log.records if "it will not stop the run" in r.getMessage()]
    assert told == [] if said is None else len(told) == 1 and said in told[0], told


@pytest.mark.parametrize(("steps", "said"), [(dict(max_steps=100, eval_steps=500), "has none before its last step"),
                                             (dict(max_steps=50, eval_steps=10, eval_delay=25), "has 2 before"),
                                             (dict(max_steps=40, eval_steps=0.25), "has 3 before"),
                                             (dict(max_steps=40, eval_steps=5), None)])
def test_hf_a_schedule_with_too_few_evaluations_for_the_stop_says_so_before_the_first_step(tmp_path, fake_nvml,
                                                                                          green_log, steps, said):
    """HF's ``eval_steps=500`` in a 100-step run evaluates once, at its last step, where a stop saves nothing: the
    stopper could never decide."""
    from transformers import Trainer, TrainingArguments

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    (xt, yt), (xv, yv) = digits_tensors()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), eval_strategy="steps", save_strategy="no",
                             per_device_train_batch_size=8, report_to="none", use_cpu=True, disable_tqdm=True, **steps)
    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"))
    Trainer(model=hf_digits_model(), args=args, train_dataset=DigitsDataset(xt, yt),
            eval_dataset=DigitsDataset(xv[:64], yv[:64]), compute_metrics=hf_accuracy,
            callbacks=[monitor, gt.EfficiencyEarlyStopping(monitor="accuracy")]).train()
    told = [r.getMessage() for r in green_log.records if "it will not stop the run" in r.getMessage()]
    assert told == [] if said is None else len(told) == 1 and said in told[0], told


def test_hf_a_streamed_data_set_with_evaluations_every_epoch_trains(tmp_path, fake_nvml, green_log):
    """An iterable data set has no length: HF sets ``num_train_epochs`` to ``sys.maxsize``, and the evaluations
    were counted one epoch at a time, for ever, before the first step."""
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainingArguments

    (xt, yt), (xv, yv) = digits_tensors()

    class Stream(IterableDataset):
        def __iter__(self):
            while True:
                yield from ({"pixels": x, "labels": y} for x, y in zip(xt, yt, strict=True))

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=20, eval_strategy="epoch", save_strategy="no",
                             per_device_train_batch_size=8, report_to="none", use_cpu=True, disable_tqdm=True)
    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"))
    trainer = Trainer(model=hf_digits_model(), args=args, train_dataset=Stream(),
                      eval_dataset=DigitsDataset(xv[:64], yv[:64]), compute_metrics=hf_accuracy,
                      callbacks=[monitor, gt.EfficiencyEarlyStopping(monitor="accuracy")])
    assert trainer.train().global_step == 20
    assert "it will not stop the run" not in green_log.text  # the schedule is not known: nothing said


@pytest.mark.parametrize("case", ["one-batch validation", "num_sanity_val_steps=1"])
def test_lightning_a_one_batch_sanity_check_estimates_the_first_validation(tmp_path, fake_nvml, case):
    """A 30 J validation, 1 J a step, the first validation at step 20, a 70 J budget: a sanity check of one batch
    gave no estimate, so nothing was kept for the first validation (ended at 80 J, and at 91 J with
    ``num_sanity_val_steps=1``)."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    monitor = monitor_at(tmp_path, log_every_n_steps=5)
    (xt, yt), (xv, yv) = digits_tensors()
    one = case == "one-batch validation"
    train = DataLoader(TensorDataset(xt[:1024], yt[:1024]), batch_size=32)
    val = DataLoader(TensorDataset(xv[:192], yv[:192]), batch_size=192 if one else 32)  # 30 J: 1 or 6 batches
    pl.Trainer(max_steps=200, val_check_interval=20, check_val_every_n_epoch=None, logger=False,
               num_sanity_val_steps=2 if one else 1,
               callbacks=[work_clock(fake_nvml, val_s=0.3 if one else 0.05), monitor, gl.EnergyBudget(energy=70)],
               **TRAINER).fit(lightning_digits_module()(), train, val)
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert monitor.cumulative_j <= 70, monitor.stop_decision.message


def test_lightning_max_time_ends_the_projected_run(tmp_path, fake_nvml, green_log):
    """``max_time`` ends the run before ``max_epochs=500``: the whole run was projected to 500 epochs (a budget it
    would never reach was said to be broken, the energy saved by a stop overstated a hundredfold)."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)

    class Slow(pl.Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.02)

    uri = ready_store(tmp_path)
    monitor = monitor_at(tmp_path, mlflow=True)
    train, val = eight_steps_an_epoch()
    pl.Trainer(max_epochs=500, max_time={"seconds": 4}, num_sanity_val_steps=0,
               logger=MLFlowLogger(experiment_name="timed", tracking_uri=uri),
               callbacks=[work_clock(fake_nvml, val_s=0.01), Slow(), monitor, gl.EnergyBudget(energy="3 kJ")],
               **TRAINER).fit(lightning_digits_module()(), train, val)
    assert monitor.stop_decision is None and monitor.current_epoch < 100  # max_time ended it
    assert "would need" not in green_log.text
    client, (run,) = runs(uri, "timed")
    projected = [value for _, value in history(client, run.info.run_id, "projection/energy_j")]
    assert len(projected) >= 3 and projected[-1] < 2 * monitor.cumulative_j, (projected, monitor.cumulative_j)


def test_lightning_the_rate_at_the_first_validation_counts_it_once_a_cycle(tmp_path, fake_nvml):
    """Points every 2 steps, a validation of 10 J every 5 steps of 1 J: 3 J a step. Before a second validation the
    rate was the median of the recent intervals, one of which held the whole validation: 6 J a step."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    monitor = monitor_at(tmp_path, mlflow=True, log_every_n_steps=2)
    _, val = eight_steps_an_epoch()
    pl.Trainer(max_steps=200, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
               logger=MLFlowLogger(experiment_name="rate", tracking_uri=uri),
               callbacks=[work_clock(fake_nvml, val_s=0.05), monitor, gl.EnergyBudget(energy="5 kJ")],
               **TRAINER).fit(lightning_digits_module()(), DataLoader(Endless(), batch_size=None), val)
    client, (run,) = runs(uri, "rate")
    first_step, first = history(client, run.info.run_id, "projection/energy_j")[0]
    assert first_step == 4
    so_far = 5 * 1.0 + 10.0
    assert first == pytest.approx(so_far + 3.0 * (199 - 4), rel=0.05)


@pytest.mark.parametrize("where", ["step", "epoch_hook"])
@pytest.mark.parametrize("sanity", [0, 2])
def test_lightning_a_monitored_training_metric_is_checked_once_training_logged_it(tmp_path, fake_nvml, where,
                                                                                  sanity):
    """Lightning's ``EarlyStopping(monitor="train_loss")`` runs: the sanity check knows validation metrics only, and
    ours raised there for a metric the training step logs (or, without a sanity check, at the first validation,
    which comes before Lightning reports a metric logged per epoch). A typo of it still fails, once the first
    epoch has logged all it logs (as Lightning's own check); a validation metric's typo at the sanity check."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    base = lightning_digits_module()

    class LogsTrainLoss(base):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if where == "step":
                self.log("train_loss", loss, on_step=False, on_epoch=True)  # reported at the epoch's end only
            return loss

        def on_train_epoch_end(self):
            if where == "epoch_hook":  # as torchmetrics users do: computed and logged at the epoch's end
                self.log("train_loss", 1.0 / (self.current_epoch + 1))

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            steps.append(trainer.global_step)

    def fit(monitor_name: str) -> pl.Trainer:
        steps.clear()
        trainer = pl.Trainer(max_epochs=3, logger=False, num_sanity_val_steps=sanity, callbacks=[
            Steps(), work_clock(fake_nvml), monitor_at(tmp_path), gl.EfficiencyEarlyStopping(monitor=monitor_name)],
            **TRAINER)
        trainer.fit(LogsTrainLoss(), *eight_steps_an_epoch())
        return trainer

    assert fit("train_loss").current_epoch == 3
    with pytest.raises(MonitorError, match="train_losss"):
        fit("train_losss")
    assert len(steps) == 8  # a name training never logged: by the first epoch's end, as Lightning's EarlyStopping
    if sanity:
        with pytest.raises(MonitorError, match="val_accc"):  # a validation metric's typo: at the sanity check
            fit("val_accc")
        assert steps == []



@pytest.mark.parametrize("data", ["endless", "max_steps_in_one_epoch"])
def test_lightning_a_training_metrics_typo_fails_at_the_first_validation_of_a_step_based_run(tmp_path, fake_nvml,
                                                                                           data):
    """A step-based run (an endless stream, or ``max_steps`` within one long epoch) has no second epoch start, where
    a training metric missing after the first batch was checked: the typo warned once and the stop did nothing for
    the whole run. Nothing logged at an epoch's end can arrive before such a run ends: it fails at the first
    validation, as Lightning's ``EarlyStopping`` does; the right name still works."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    base = lightning_digits_module()

    class LogsTrainLoss(base):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            steps.append(trainer.global_step)

    (xt, yt), _ = digits_tensors()
    train = DataLoader(Endless(), batch_size=None) if data == "endless" else DataLoader(
        TensorDataset(xt, yt), batch_size=4)  # over 300 batches: max_steps=60 ends inside the first epoch
    _, val = eight_steps_an_epoch()

    def fit(monitor_name: str) -> pl.Trainer:
        steps.clear()
        trainer = pl.Trainer(max_steps=60, val_check_interval=10, check_val_every_n_epoch=None, logger=False,
                             callbacks=[Steps(), work_clock(fake_nvml), monitor_at(tmp_path),
                                        gl.EfficiencyEarlyStopping(monitor=monitor_name, patience=100)], **TRAINER)
        trainer.fit(LogsTrainLoss(), train, val)
        return trainer

    assert fit("train_loss").global_step == 60
    with pytest.raises(MonitorError, match="train_los"):
        fit("train_los")
    assert len(steps) == 10  # the first validation's



def test_lightning_the_projection_holds_with_validations_unevenly_spaced(tmp_path, fake_nvml):
    """9 batches an epoch, ``val_check_interval=4``, ``check_val_every_n_epoch=3``: validations 4 and 23 steps
    apart, 1 J a step, 10 J a validation. The rate was the median of the cycles between validations, one or the
    other (3.5 or 1.4 J a step for a true 1.7): ``projection/energy_j`` swung from -5 % to +92 % of the run's
    real total. Training and validations apart, every projection is within a few per cent of it."""
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    (xt, yt), (xv, yv) = digits_tensors()
    pl.Trainer(max_epochs=20, val_check_interval=4, check_val_every_n_epoch=3, limit_train_batches=9,
               num_sanity_val_steps=0, logger=MLFlowLogger(experiment_name="uneven", tracking_uri=uri),
               callbacks=[work_clock(fake_nvml, val_s=0.05), monitor_at(tmp_path, mlflow=True, log_every_n_steps=1000),
                          gl.EnergyBudget(energy="1 kJ")], **TRAINER).fit(
        lightning_digits_module()(), DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=16),
        DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64))
    client, (run,) = runs(uri, "uneven")
    (_, total), = history(client, run.info.run_id, "energy/total_j")
    assert total == pytest.approx(180 + 10 * 12, abs=0.01)  # 20 epochs of 9 steps; 2 validations every 3rd epoch
    projected = history(client, run.info.run_id, "projection/energy_j")
    assert len(projected) >= 12
    worst = max(abs(value / total - 1) for step, value in projected if step > 25)  # from the second validation on
    assert worst < 0.06, projected


def test_lightning_the_rate_after_a_resume_spreads_a_validation_over_lightnings_period(tmp_path, fake_nvml):
    """Resumed from a checkpoint before the first validation (step 7 of 8 an epoch, 1 J a step, 20 J a
    validation): the first cycle after the resume ran from the checkpoint (1 step), and the validation spread over
    it made the rate 21 J a step instead of 3.5 (a budget stopped early, the projection warned falsely)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    rates = []

    class Rate(pl.Callback):
        def __init__(self, monitor):
            self.monitor = monitor

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and self.monitor.rate_per_step() is not None:
                rates.append(self.monitor.rate_per_step().j)

    def fit(ckpt=None):
        monitor = monitor_at(tmp_path, log_every_n_steps=2)
        pl.Trainer(max_epochs=2, logger=False, num_sanity_val_steps=0, callbacks=[
            work_clock(fake_nvml, val_s=0.1), monitor, Rate(monitor),
            ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=7, save_top_k=-1)],
            **{**TRAINER, "enable_checkpointing": True}).fit(
            lightning_digits_module()(), *eight_steps_an_epoch(), ckpt_path=ckpt)

    fit()
    rates.clear()
    fit(str(next((tmp_path / "ck").glob("*step=7.ckpt"))))
    assert rates and rates[0] == pytest.approx(1.0 + 20.0 / 8, rel=0.05), rates


@pytest.mark.parametrize("schedule", [dict(max_epochs=7, check_val_every_n_epoch=3),
                                      dict(max_epochs=4, val_check_interval=0.5),
                                      dict(max_epochs=4, val_check_interval=3, check_val_every_n_epoch=2),
                                      dict(max_steps=40, val_check_interval=6, check_val_every_n_epoch=None)])
def test_lightning_the_next_validation_is_where_lightning_runs_it(schedule):
    """The step of the next validation, read from Lightning's settings, against the steps its loop validated at."""
    seen: dict[str, object] = {"validations": []}

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["schedule"] = Schedule.of(trainer)

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen["validations"].append(step_of(trainer))

    train, val = eight_steps_an_epoch()
    pl.Trainer(logger=False, callbacks=[Watch()], num_sanity_val_steps=0, **schedule, **TRAINER).fit(
        lightning_digits_module()(), train, val)
    validations, plan = seen["validations"], seen["schedule"]
    assert plan is not None and len(validations) >= 2
    assert [plan.next_validation(step) for step in range(validations[-1] + 1)] == \
        [min(v for v in validations if v >= step) for step in range(validations[-1] + 1)]


# -- the budget's arithmetic -------------------------------------------------------------------------
def test_a_budget_spent_before_its_first_check_says_it_is_exceeded():
    """The first check came after the budget was spent (5 J, an epoch of 8.8 J): the message said "would exceed"."""
    decision = Budget(energy=5.0).check(Totals(8.8, 0.001, None), Totals(0.5, 0.0, None))
    assert decision.should_stop and "energy so far 8.8 J already exceeds the budget of 5 J" in decision.message


def test_a_cost_budget_projects_the_first_interval_at_its_cost():
    """The first interval's cost read as 0 (the check before it had none): an energy budget and the same budget as
    money stopped at different checks, the cost one after it was exceeded."""
    so_far = Totals(120.0, 0.016, 1.0e-5)
    assert Budget(energy=180.0).check(so_far).should_stop
    decision = Budget(cost=1.5e-5).check(so_far)
    assert decision.should_stop and "next interval ~1e-05" in decision.message


@pytest.mark.parametrize("on_exceed", ["stop", "warn"])
def test_a_budget_at_the_runs_last_step_does_not_stop_it_and_says_when_it_went_over(on_exceed, green_log):
    """At the run's last step a stop saves nothing: the run was tagged as stopped by the budget all the same. A
    budget the last interval went over is said (in warn mode that was all it did, and it was lost too)."""
    stopper = BudgetStopper(energy="100 J", on_exceed=on_exceed)
    stopper.check(Progress(Totals(60.0, 0.0, None), 10, {}, False, Totals(6.0, 0.0, None), 10.0))
    last = stopper.check(Progress(Totals(95.0, 0.0, None), 20, {}, False, Totals(6.0, 0.0, None), 0.0))
    assert not last.should_stop and "over its budget" not in green_log.text
    assert not stopper.check(Progress(Totals(105.0, 0.0, None), 21, {}, False, Totals(6.0, 0.0, None), 0.0)).should_stop
    assert "the run ends over its budget: energy 105 J > 100 J" in green_log.text
    expected = on_exceed == "stop"
    assert stopper.check(Progress(Totals(95.0, 0.0, None), 20, {}, False, Totals(6.0, 0.0, None), 4.0)).should_stop \
        is expected


# -- Hugging Face -------------------------------------------------------------------------------------
def test_hf_a_monitor_named_as_metric_for_best_model_takes_greater_is_better(tmp_path, digits, fake_nvml):  # noqa: F811
    """``metric_for_best_model="perplexity"``, ``greater_is_better=False``: ``monitor="perplexity"`` guessed "max"
    from the name, and a falling perplexity read as getting worse."""
    fake_nvml.configure(n=1)
    stoppers = {name: gt.EfficiencyEarlyStopping(monitor=name) for name in ("perplexity", "eval_perplexity")}
    stoppers["other"] = gt.EfficiencyEarlyStopping(monitor="eval_accuracy")
    trainer = hf_trainer(tmp_path, digits, [gt.EnergyMonitor(gpus="all", mlflow=False, log_artifacts=False),
                                            *stoppers.values()], epochs=1, metric_for_best_model="perplexity",
                         greater_is_better=False)
    trainer.compute_metrics = lambda pred: {"perplexity": 2.0 + torch.rand(1).item(), "accuracy": 0.5}
    trainer.train()
    assert {name: s.plateau.mode for name, s in stoppers.items()} == {
        "perplexity": "min", "eval_perplexity": "min", "other": "max"}
    assert all(s.monitor == "eval_perplexity" for name, s in stoppers.items() if name != "other")


def test_hf_a_monitor_error_leaves_the_users_own_run_to_the_user(tmp_path, digits, tracking, fake_nvml):  # noqa: F811
    """``with mlflow.start_run(): trainer.train()``: HF logs into the user's run and does not end it; a monitor error
    must not end it either (the user's block may log more after catching it)."""
    fake_nvml.configure(n=1)
    monitor = gt.EnergyMonitor(gpus="all", output_dir=str(tmp_path / "out"), log_artifacts=False)
    trainer = hf_trainer(tmp_path, digits, [monitor, gt.EfficiencyEarlyStopping(monitor="accuracyy")], epochs=2,
                         report_to=["mlflow"])
    with mlflow.start_run() as mine:
        with pytest.raises(MonitorError):
            trainer.train()
        assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == mine.info.run_id
    _, (run,) = runs(tracking)
    assert run.info.run_id == mine.info.run_id and run.info.status == "FINISHED"  # ended by the user's block


def test_hf_a_monitor_error_with_report_to_mlflow_fails_hfs_run(tmp_path, digits, tracking, fake_nvml):  # noqa: F811
    """A monitored metric missing (strict) ends ``train()``: the monitor's own run ended FAILED, HF's (where the
    energy goes with ``report_to=["mlflow"]``) stayed RUNNING and MLflow's exit handler then marked it FINISHED."""
    fake_nvml.configure(n=1)
    monitor = gt.EnergyMonitor(gpus="all", output_dir=str(tmp_path / "out"), log_artifacts=False)
    trainer = hf_trainer(tmp_path, digits, [monitor, gt.EfficiencyEarlyStopping(monitor="accuracyy")], epochs=2,
                         report_to=["mlflow"])
    with pytest.raises(MonitorError):
        trainer.train()
    assert mlflow.active_run() is None
    client, (run,) = runs(tracking)
    assert run.info.status == "FAILED"
    assert history(client, run.info.run_id, "energy/cumulative_j")  # the energy went there


@pytest.mark.alone  # work-clock joules, but a check between points adds sampled power x wall time
@pytest.mark.parametrize("budget", [120.0, 150.0, 200.0])
def test_hf_a_budget_checked_at_an_evaluations_step_pays_for_that_evaluation(tmp_path, digits, fake_nvml,  # noqa: F811
                                                                             budget):
    """``eval_steps=8``, ``check_every_n_steps=8``: HF runs the evaluation of the step under way before it looks at
    ``should_training_stop``, so a stop set at that step's check still pays for it, and the evaluation's check at
    the same step came 0 steps after the step check, so it reserved no evaluation before the next check either (a
    1900 J budget ended at 1967 J). 1 J a step, 10 J an evaluation, on a work clock: every budget holds."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)

    class Work(TrainerCallback):  # before the monitor: a step's work is done when its hooks run
        def on_step_end(self, args, state, control, **kwargs):
            fake_nvml.advance(0.01)

        def on_prediction_step(self, args, state, control, **kwargs):
            fake_nvml.advance(0.025)  # 4 batches of 32: 10 J an evaluation

    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False,
                               output_dir=str(tmp_path / "out"))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=160, per_device_train_batch_size=32,
                             per_device_eval_batch_size=32, eval_strategy="steps", eval_steps=8, logging_steps=8,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    Trainer(model=hf_digits_model(), args=args, train_dataset=digits[0], eval_dataset=digits[1],
            compute_metrics=hf_accuracy,
            callbacks=[Work(), monitor, gt.EnergyBudget(energy=budget, check_every_n_steps=8)]).train()
    assert monitor.stop_decision is not None and monitor.stop_decision.reason.value == "energy_budget"
    assert budget - 20.0 <= monitor.cumulative_j <= budget, monitor.stop_decision.message
