"""PyTorch Lightning callbacks: ``Trainer(callbacks=[EnergyMonitor()])``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Timer

from green_callbacks.lightning_trainer import (
    TRAINING_NAME,
    Schedule,
    cuda_indices,
    ends_epoch,
    epoch_ends_before_run,
    epoch_training_metrics,
    fresh_metrics,
    max_steps,
    mlflow_logger_run,
    rank_of,
    sanity_metric_names,
    step_of,
    step_only_names,
    step_reader,
    steps_in_time,
    unmet_minimum,
)
from green_callbacks.records import Kind
from green_callbacks.stopping import BudgetStopper, EfficiencyStopper, Stopper
from green_callbacks.tracker import EnergyTracker, batch_size
from green_callbacks.validation import TWO_MONITORS

__all__ = ["EfficiencyEarlyStopping", "EnergyBudget", "EnergyMonitor"]


class EnergyMonitor(EnergyTracker, Callback):
    """Measures every interval of training (each epoch, each validation, every N steps) and logs it to MLflow.

    Arguments are those of :class:`green_callbacks.tracker.EnergyTracker`, identical in
    ``green_callbacks.transformers.EnergyMonitor``. Logs into the run of a ``MLFlowLogger``
    when the trainer has one, else the active MLflow run, else a run it opens itself, at the
    trainer's global step. Under DDP each rank measures its own GPU, the node's local rank 0
    the CPU/DRAM, and rank 0 logs the sum. The totals are saved in checkpoints, so a resumed run
    continues them.
    """

    _batch_step: Callable[[], int] | None = None  # this fit's step reader, from on_train_start
    validates_on_stop = True  # Lightning's loop validates when should_stop is set in a batch: see stop_validates
    _validates_this_epoch: Callable[[], bool] | None = None  # the fit loop's own test, from _start
    _schedule: Schedule | None = None  # Lightning's validation schedule, from _start
    _timer: Timer | None = None  # the Timer that max_time adds (or the user's): it can end the run first
    _fit_loop: Any = None  # the trainer's fit loop (min_epochs, min_steps: see stop_held_back), from on_train_start
    _unverified_late: tuple[set[str], list[Stopper]] | None = None  # not logged by the first batch: see above
    _unverified: tuple[set[str], list[Stopper]] | None = None  # training metrics monitored: see on_validation_end
    _evaluation_due = False  # a validation started on a GPU: its window opens at its first batch
    _metrics_before: dict[str, Any] | None = None  # callback_metrics at the previous validation's end
    _max_optimizer_steps: int | None = None  # this fit's max_steps, where it binds (see remaining_steps)
    _optimizer_steps: Callable[[], int]  # the loop's optimizer steps (global_step)

    # Lightning reads state_key at every hook call (profiler names): built once, then a dict lookup
    @functools.cached_property
    def state_key(self) -> str:  # type: ignore[override]
        return self._generate_state_key(gpus=self.gpus, experiment=self.experiment_name, run_name=self.run_name)

    def remaining_steps(self, step: int) -> float | None:
        """The steps left on the logger's axis. Where a batch steps several optimizers (manual optimization),
        ``max_steps`` (counted in optimizer steps) ends the run after fewer batches than it says: it is
        converted at the rate of optimizer steps per batch seen so far."""
        left = steps_in_time(self._timer, step, super().remaining_steps(step))
        if left is None or self._max_optimizer_steps is None:
            return left
        optimizer_steps, batches = self._optimizer_steps(), step + 1  # the batches done, this step's included
        if optimizer_steps <= batches:  # one optimizer step a batch: the axes agree
            return left
        return min(left, max(self._max_optimizer_steps - optimizer_steps, 0) * batches / optimizer_steps)

    def evaluation_period(self) -> float | None:
        return self._schedule.period() if self._schedule is not None else None

    def next_evaluation(self, step: int) -> float | None:
        """The step of the next validation after ``step``: Lightning's own schedule (``val_check_interval``,
        ``check_val_every_n_epoch``, the epoch's batches) where it is one of steps; else from the last ones."""
        if self._schedule is None:
            return super().next_evaluation(step)
        done = bool(self._eval_steps) and self._eval_steps[-1] >= step  # the validation at this step is past
        return self._schedule.next_validation(step + done)

    def stop_held_back(self, kind: Kind | None) -> str | None:
        """Lightning carries out ``should_stop`` only once ``min_epochs`` and ``min_steps`` are met (it sets
        ``min_epochs=1`` itself where only ``min_steps`` is given), training on until then: what is not met for
        a stop decided now, at a point of ``kind``, whose epoch may end with it."""
        return unmet_minimum(self._fit_loop, kind)

    def stop_validates(self, kind: Kind | None, at: int | None = None) -> bool:
        """Lightning validates after a stop set within a training batch only in an epoch that validates
        (``check_val_every_n_epoch``, ``limit_val_batches``): the loop's own test, asked at the decision; for a
        check to come at step ``at``, the schedule's answer for that step's epoch (it may be the next one)."""
        if not super().stop_validates(kind):
            return False
        schedule = self._schedule
        if at is not None and schedule is not None and schedule.n is not None:
            return (schedule.epoch_of(at) + 1) % schedule.n == 0
        validates = self._validates_this_epoch
        return validates is None or bool(validates())

    def _start(self, trainer: pl.Trainer) -> None:
        self.dry_run = bool(trainer.fast_dev_run)  # Lightning logs and saves nothing then: neither do we
        run_id, uri = mlflow_logger_run(trainer) if trainer.global_rank == 0 else (None, None)
        self.start(rank_of(trainer), cuda_indices(trainer), run_id, uri, session=trainer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(isinstance(cb, EnergyMonitor) and cb is not self for cb in trainer.callbacks):
            raise ValueError(TWO_MONITORS)

    # -- fit -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, Stopper):
                self.attach(callback)
        # a monitored training metric: not in a validation's metrics (the sanity check's); checked once training
        # has logged it, and an evaluation before it arrives is no check (Lightning reports a metric logged per
        # epoch at the epoch's end, after that epoch's validation)
        training = [s for s in self.stoppers if isinstance(s, EfficiencyStopper) and TRAINING_NAME.search(s.monitor)]
        for stopper in training:
            stopper.expect_training_metric()
        self._unverified = (set(), training) if training else None
        self._unverified_late = None
        self._start(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.max_steps = max_steps(trainer)
        loop = trainer.fit_loop.epoch_loop
        self._max_optimizer_steps = None  # max_steps counts optimizer steps, the step axis batches that stepped
        if trainer.max_steps > 0 and type(getattr(loop, "_batches_that_stepped", None)) is int:
            self._max_optimizer_steps = trainer.max_steps
            self._optimizer_steps = lambda: loop.global_step
        self._metrics_before = None
        self._batch_step = step_reader(trainer)
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # max_time's
        self._schedule = Schedule.of(trainer)
        self._fit_loop = trainer.fit_loop
        validates = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_should_check_val_epoch", None)
        self._validates_this_epoch = validates if callable(validates) else None
        progress = getattr(trainer.fit_loop.epoch_loop, "batch_progress", None)
        if getattr(getattr(progress, "current", None), "completed", 0) > 0:
            # resumed in the middle of an epoch: Lightning calls no on_train_epoch_start for it, so its window
            # opens here; its record adds what the epoch cost before the checkpoint (saved in it)
            self.begin_epoch(trainer.current_epoch)
        # resumed: a budget the checkpoint's totals leave no room for stops the training before its first step
        # (Lightning ends fit() without a step where should_stop is set now, min_epochs and min_steps permitting)
        if self.check_resumed(trainer.global_step):
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A checkpoint between points (``ModelCheckpoint(every_n_train_steps=...)``): a point first, and the
        state saved after it (Lightning took the callbacks' ``state_dict`` just before this hook)."""
        # not while interrupted (OnExceptionCheckpoint saves on the rank that failed: no collective point then)
        if self.started and trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.interrupted:
            if self.before_checkpoint():
                trainer.should_stop = True
            callbacks = checkpoint.get("callbacks")
            if isinstance(callbacks, dict) and self.state_key in callbacks:
                callbacks[self.state_key] = self.state_dict()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._unverified_late is not None:  # a training metric not logged by the first batch: by now it was
            self._unverified, self._unverified_late = self._unverified_late, None
            self._verify_training_metrics(trainer, last=True)
        self.begin_epoch(trainer.current_epoch, tile=True)  # from where the previous epoch's point left off

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._due is not None:  # a point fell due at the previous step
            reader = self._batch_step
            if self.before_step(reader() if reader is not None else step_of(trainer)):
                trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        reader = self._batch_step
        if self.on_step(reader() if reader is not None else step_of(trainer), batch):
            trainer.should_stop = True
        if self._unverified is not None:
            self._verify_training_metrics(trainer)

    def _verify_training_metrics(self, trainer: pl.Trainer, last: bool = False) -> None:
        """A monitored training metric the sanity check could not know: after the first training batch, among
        what the training step logged (the loop's results name every metric logged, also those Lightning
        reports only at the epoch's end); one logged in ``on_train_epoch_end`` only, at the next epoch's start
        (``last``): missing then, it is missing, as with :meth:`require_metric`."""
        (names, stoppers), self._unverified = self._unverified, None  # type: ignore[misc]
        logged = names | sanity_metric_names(trainer) | set(trainer.callback_metrics)
        missing = [s for s in stoppers if s.monitor not in logged]
        if missing and not last:
            self._unverified_late = (logged, missing)
            return
        for stopper in missing:
            stopper.require_metric(logged)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # trainer.validate(): a stage of its own, as test and predict
            self._start(trainer)
            self.begin_stage("validate")
        elif trainer.sanity_checking and self.started:
            self.begin_trial_evaluation()
        elif self.started:
            if self.meter is not None and self.meter.syncs_cuda:
                self._evaluation_due = True  # opened at the first batch: see on_validation_batch_start
            else:
                self.begin_evaluation()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        """On a GPU the evaluation's window opens here, at its first batch, not at ``on_validation_start``:
        its edge synchronises CUDA (the training work queued before it must land in the training), and
        a sync at ``on_validation_start`` left the GPU idle through Lightning's whole validation set-up
        (3.8 % of a 0.1-s epoch on an H200, docs/performance-gpu.md). Here the set-up has run on the CPU
        while the GPU finished the queued training steps."""
        if self._evaluation_due:
            self._evaluation_due = False
            self.begin_evaluation()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "validate":
            self.add_samples("validate", batch_size(batch))
        elif trainer.sanity_checking:
            self.count_trial_batch()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_due = False  # a validation without batches opened no window
        if trainer.state.fn == "validate":
            self.end_stage("validate")
        elif trainer.sanity_checking:
            self.end_trial_evaluation(float(sum(trainer.num_val_batches)))
            names, step_only = sanity_metric_names(trainer), step_only_names(trainer)
            if names or step_only:  # (a validation that logged nothing tells nothing: its first real run will)
                # a typo in a monitored metric fails here, before the first step; a training metric
                # (``train_loss``) is not in a validation's names: checked once the first batch has logged it
                later = [s for s in (self._unverified or (set(), []))[1] if s.monitor not in names]
                for stopper in self.stoppers:
                    if stopper not in later:
                        stopper.require_metric(names, step_only)
                self._unverified = (names, later) if later else None
        elif self.started:
            if self._unverified_late is not None and not epoch_ends_before_run(trainer):
                # a training metric not logged by the first batch, in a run whose epoch does not end before the
                # run does (an endless stream, max_steps within the epoch): nothing logged later can bring it
                self._unverified, self._unverified_late = self._unverified_late, None
                self._verify_training_metrics(trainer, last=True)
            metrics = fresh_metrics(trainer, self._metrics_before)
            self._metrics_before = dict(trainer.callback_metrics)
            wanted = {s.monitor for s in self.stoppers if getattr(s, "monitor", None)}
            wanted |= set(self.efficiency_metrics or ())
            current, per_epoch = epoch_training_metrics(trainer, wanted, ends_epoch(trainer))
            for name in per_epoch:  # the previous epoch's value: this evaluation's, where it ends the epoch
                metrics.pop(name, None)
            metrics.update(current)
            if self.end_evaluation(step_of(trainer), metrics, ends_epoch(trainer)):
                trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end_epoch(step_of(trainer, counted=True)):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_training(step_of(trainer, counted=True))

    # -- test / predict ------------------------------------------------------------------------
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)
        self.begin_stage("test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.add_samples("test", batch_size(batch))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_stage("test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)
        self.begin_stage("predict")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.add_samples("predict", batch_size(batch))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_stage("predict")

    # -- the end -------------------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.finish("FINISHED", keep_sink=stage != "fit")  # test()/validate()/predict(): the sender kept for the next

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl-C, and SIGTERM (Lightning turns it into SIGTERMException, a SystemExit), kill the run
        self.finish("KILLED" if isinstance(exception, KeyboardInterrupt | SystemExit) else "FAILED")


class _LightningStopper(Callback):
    """What both stoppers are to Lightning: callbacks that need the monitor, with their state in checkpoints."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        who = type(self).__name__
        if not any(isinstance(cb, EnergyMonitor) for cb in trainer.callbacks):
            raise ValueError(f"{who} needs an EnergyMonitor in the same Trainer's callbacks: "
                             f"callbacks=[EnergyMonitor(...), {who}(...)]; it measures, {who} decides")

    def state_dict(self) -> dict[str, Any]:
        return self.policy_state()  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_policy_state(state_dict)  # type: ignore[attr-defined]


class EfficiencyEarlyStopping(EfficiencyStopper, _LightningStopper):
    """Stops training when the monitored metric's gain per kilojoule flattens out.

    Arguments: see :class:`green_callbacks.stopping.EfficiencyStopper` (the same in
    ``green_callbacks.transformers``). Needs an :class:`EnergyMonitor` in the same trainer; the
    decision is reduced across DDP ranks; the reason and the projected energy saved versus
    running to ``max_epochs`` go to the MLflow run.
    """

    @functools.cached_property
    def state_key(self) -> str:  # type: ignore[override]
        return self._generate_state_key(monitor=self._init_args["monitor"], mode=self._init_args["mode"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.resolve("val_loss", "min")
        val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
        source = getattr(val_loop, "_data_source", None)  # the val_dataloaders given, or the module's hook
        if not trainer.is_global_zero:  # said once for the job: every rank has the same schedule
            return
        if source is not None and not source.is_defined():
            self.no_evaluations("no val_dataloader")
        elif trainer.limit_val_batches == 0:
            self.no_evaluations("limit_val_batches=0")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the schedule is known once the loaders are: a validation every 5th epoch of a 3-epoch run never comes
        schedule, last = Schedule.of(trainer), max_steps(trainer)
        if schedule is not None and last is not None and math.isfinite(last) and trainer.is_global_zero:
            # (one at the last step stops nothing)
            self.expect_evaluations(schedule.count(last - 1), f"val_check_interval={trainer.val_check_interval!r}, "
                                    f"check_val_every_n_epoch={trainer.check_val_every_n_epoch!r}, "
                                    f"{int(last) + 1} training steps")


class EnergyBudget(BudgetStopper, _LightningStopper):
    """Stops training before an energy, emissions or cost budget would be exceeded.

    Arguments: see :class:`green_callbacks.stopping.BudgetStopper` (the same in
    ``green_callbacks.transformers``); budgets take units as strings ("2.5 kWh", "300 g",
    "0.5 EUR"), and ``EnergyBudget.from_file("green.yaml")`` reads them from config.
    """

    @functools.cached_property
    def state_key(self) -> str:  # type: ignore[override]
        # which limits it has, not their amounts: a budget raised (or written in other units) for a resumed training
        # takes the checkpoint's state (the intervals it has seen), as the monitor takes its totals
        a = self._init_args
        return self._generate_state_key(limits=[k for k in ("energy", "emissions", "cost") if a[k] is not None],
                                        on_exceed=a["on_exceed"], check_every_n_steps=a["check_every_n_steps"])

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        """The key of checkpoints written before 0.1.0's last change (the amounts as given): still read."""
        a = self._init_args
        return self._generate_state_key(energy=a["energy"], emissions=a["emissions"], cost=a["cost"])
