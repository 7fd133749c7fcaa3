"""Hugging Face ``Trainer`` callbacks: ``Trainer(callbacks=[EnergyMonitor()])``."""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from green_callbacks.process import live_trackers, running_tracker, signal_count, signalled, uncaught
from green_callbacks.records import Kind
from green_callbacks.stopping import BudgetStopper, EfficiencyStopper
from green_callbacks.tracker import EnergyTracker
from green_callbacks.transformers_trainer import (
    calling_trainer,
    cuda_indices,
    end_hf_run,
    ends_on_error,
    eval_name,
    evaluations,
    hf_callbacks,
    hf_mlflow_callback,
    in_training_loop,
    interrupted_status,
    keep_a_place,
    length_of,
    load_saved_state,
    model_metrics,
    rank_of,
    reopen_hf_mlflow_run,
    resume_hf_run,
    resumed,
    set_up_hf_mlflow_first,
)
from green_callbacks.uris import redact
from green_callbacks.validation import TWO_MONITORS

__all__ = ["EfficiencyEarlyStopping", "EnergyBudget", "EnergyMonitor"]

class EnergyMonitor(EnergyTracker, TrainerCallback, ExportableState):
    """Measures every interval of training (each epoch, each evaluation, every N steps) and logs it to MLflow.

    Arguments are those of :class:`green_callbacks.tracker.EnergyTracker`, identical in
    ``green_callbacks.lightning.EnergyMonitor``. Logs into the run of HF's ``MLflowCallback``
    (``report_to="mlflow"``) or any active MLflow run, else a run it opens itself, at the
    trainer's global step. An evaluation's window opens when HF decides to evaluate (after the
    step or epoch that triggers it) and closes at ``on_evaluate``; with ``eval_strategy="epoch"``
    the epoch window closes after its evaluation. ``trainer.evaluate()``/``predict()`` outside
    training are measured from the end of their first batch (HF has no hook before it) and
    reported per sample.
    """

    steps_from_zero = False  # HF's global_step is 1 after the first step: a point at step k covers k steps
    _hf_started_run = False  # HF's MLflowCallback started the training's run (not the user): see finish
    _signals_at_start = 0  # signal_count() at the training's start
    _resumed_hf_run: str | None = None  # HF's training run, active again for an evaluate()/predict(): its status
    _evaluates_now = False  # HF evaluates at the step under way (on_step_end): a stop set there does not skip it

    def state(self) -> dict[str, Any]:
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in self._init_args.items()}
        args["tracking_uri"] = redact(args.get("tracking_uri"))  # trainer_state.json holds no password
        return {"args": args, "attributes": {"green_state": self.state_dict()}}

    def _start(self, args: TrainingArguments, state: TrainerState, open_sink: bool = True) -> None:
        # the session is the TrainerState: each train() makes a new one (two trainers may share one args
        # object), and evaluate()/predict() after train() see the same one, a later stage of that training
        if self.started and not self.same_session(state):  # the previous call ended by an exception
            self._end_interrupted()
        if not self.started:
            self.start(rank_of(args), cuda_indices(args), session=state, open_sink=open_sink)

    def _end_interrupted(self) -> None:
        """The previous train() (or evaluate()) ended by an exception, of which HF tells no callback: end its run
        now (its last interval reaches until now), and let what comes next be a training of its own."""
        self.finish("KILLED" if signalled(self._signals_at_start) else interrupted_status())
        self._training = False
        self.forget_session()

    def finish(self, status: str = "FINISHED", keep_sink: bool = False) -> None:
        """The end; a training that was interrupted (an exception, Ctrl-C, SIGTERM) also ends the run HF started
        with its status: HF ends it only at ``on_train_end``, and MLflow's exit handler marked it FINISHED."""
        started = self.started
        super().finish(status, keep_sink)
        if started and status != "FINISHED":
            end_hf_run(self.run, status, self._hf_started_run)

    def _atexit(self) -> None:
        """At the process's exit: a ``train()`` still under way raised, and the user caught it (HF tells no callback):
        ``FAILED``, or ``KILLED`` where a SIGTERM or Ctrl-C came (a handler of the user's that calls ``sys.exit``,
        a ``KeyboardInterrupt`` caught); an uncaught exception is known as such."""
        if self.started and not self._finished and getattr(self, "_training", False) and uncaught() is None:
            self.finish("KILLED" if signalled(self._signals_at_start) else interrupted_status())
        else:
            super()._atexit()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # (for the exit, where no trainer calls; HF's callback itself is not kept: its __del__ ends the active
        # run, and one collected when the next Trainer's replaced it here ended that Trainer's new run)
        trainer = calling_trainer()
        if any(isinstance(c, EnergyMonitor) and c is not self for c in hf_callbacks(trainer)):
            raise ValueError(TWO_MONITORS)
        hf_started = bool(getattr(hf_mlflow_callback(trainer), "_auto_end_run", False))
        retry = (args.auto_find_batch_size and getattr(self, "_training", False) and self.started
                 and 0 < (state.train_batch_size or 0) < getattr(self, "_batch_size", 0))
        if retry:  # HF's auto_find_batch_size starts the training again, smaller, after an out-of-memory error
            self.same_training(state)
        elif self.started and not self.same_session(state):
            self._end_interrupted()  # (the previous training's run: ended as its own trainer had started it)
        self._hf_started_run = hf_started
        self._signals_at_start = signal_count()  # a Ctrl-C or SIGTERM after it, caught by the user: KILLED
        self._batch_size = state.train_batch_size or 0
        if resumed(state):  # train(resume_from_checkpoint=...): the checkpoint's totals, also for a monitor that
            saved = (load_saved_state(self, state) or {}).get("green_state")  # trained before (its own are newer)
        else:
            saved = getattr(self, "green_state", None) or (load_saved_state(self, state) or {}).get("green_state")
        if saved and saved.get("records") and (not self.records or resumed(state)):
            if self.records:  # this monitor's earlier training: resumed as a new process would resume it
                self.reset_run()
            self.load_state_dict(saved)
            if resumed(state):
                self._end_resumed_elsewhere()
        keep_a_place(state, self)  # after the checkpoint's entry was read: where there is none, this one's own
        self._training = True
        self._epoch_pending = False
        # an eval_dataset dict is evaluated one data set at a time, each with its own on_evaluate at the same step:
        # one evaluation point takes them all, at the last one's (see on_evaluate)
        eval_dataset = getattr(calling_trainer(), "eval_dataset", None)
        self._eval_sets = tuple(eval_dataset) if isinstance(eval_dataset, dict) and eval_dataset else ()
        self._round: dict[str, float] = {}  # the metrics of this evaluation's data sets so far
        self._round_seen: set[str] = set()
        reopen_hf_mlflow_run(args, state, kwargs.get("model"))
        self._start(args, state)
        self.max_steps = float(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        # a stop ends the epoch, and HF evaluates at every epoch's end with eval_strategy="epoch": a stop costs one
        self.validates_on_stop = str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "epoch"
        self._remove_count_hook()  # left by a training that crashed
        model = kwargs.get("model")
        # HF hands callbacks no batch: the model's forward sees every (micro-)batch, on every rank
        self._count_hook = None if model is None else model.register_forward_pre_hook(self._count_forward,
                                                                                       with_kwargs=True)
        if args.eval_on_start:  # HF evaluates right after the callbacks' on_train_begin: the window opens here
            self.begin_evaluation()

    def _end_resumed_elsewhere(self) -> None:
        """Another monitor of this process whose train() raised (HF tells no callback) and whose training this one
        resumes (the checkpoint's ``local_id`` is its): ended now, as FAILED. It lived on, and at the process's
        exit logged its last point, the resumed training's energy included, into the run, and marked it KILLED
        after the resumed training had finished it."""
        for other in live_trackers():
            if other is not self and isinstance(other, EnergyMonitor) and getattr(other, "_training", False) \
                    and other.local_id == self.local_id:
                other._end_interrupted()

    def _remove_count_hook(self) -> None:
        if getattr(self, "_count_hook", None) is not None:
            self._count_hook.remove()
            self._count_hook = None

    def _count_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:  # evaluation batches are not training throughput
            self.count_batch(kwargs or (args[0] if args else None))

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._close_epoch(state, control)
        self.begin_epoch(math.floor(state.epoch or 0))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # resumed: a budget the checkpoint's totals leave no room for stops the training at its first step (HF
        # looks at should_training_stop only after a step: that one step is trained)
        if self.before_step() or (not self._resume_checked and self.check_resumed(state.global_step)):
            control.should_training_stop = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._evaluates_now = bool(control.should_evaluate)
        try:
            if self.on_step(state.global_step):
                control.should_training_stop = True
        finally:
            self._evaluates_now = False
        if control.should_evaluate:  # set by HF's DefaultFlowCallback, which runs before user callbacks
            self.begin_evaluation()
        elif control.should_save and self.before_checkpoint():  # saved next: a point first, so its state holds it
            control.should_training_stop = True

    def stop_validates(self, kind: Kind | None, at: int | None = None) -> bool:
        """HF runs a step's evaluation before it looks at ``should_training_stop``: a stop set at a step check where
        an evaluation is due still costs that evaluation (a 1900 J budget checked every 20 steps ended at 1967 J)."""
        return super().stop_validates(kind) or (self._evaluates_now and kind not in (Kind.EVALUATION, Kind.EPOCH))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if control.should_evaluate and self.epoch_open:
            self._epoch_pending = True  # HF evaluates after on_epoch_end: the epoch waits for it
            self.begin_evaluation()
        else:
            self._close_epoch(state, control)

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        if getattr(self, "_training", False):
            if in_training_loop():
                if not self.evaluation_open:
                    self.begin_evaluation()
                return
            self._end_interrupted()  # an evaluate()/predict() after a train() that raised
        # evaluate() and predict() share this loop; which one it was is known only at its end. So is the run: HF's
        # MLflowCallback opens its run while evaluate() logs, after the batches (an evaluate() before train())
        if not self.started:
            self._resumed_hf_run = resume_hf_run(self.run, state)
        self._start(args, state, open_sink=False)
        if not self.stage_open("inference"):
            set_up_hf_mlflow_first(args, state, kwargs.get("model"))
            self._steps = [0, 0]  # [steps seen, steps measured]
            self._dataset_len = length_of(getattr(kwargs.get("eval_dataloader"), "dataset", None))
            self.begin_stage("inference")
        else:
            self._steps[1] += 1
        self._steps[0] += 1

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not getattr(self, "_training", False):
            self._end_inference("evaluate", args, metrics)
            return
        found = model_metrics(metrics)
        if self._eval_sets:
            self._round.update(found)
            these = {n for n in self._eval_sets if f"eval_{n}_runtime" in (metrics or {})}  # HF: eval_<name>_*
            self._round_seen |= these
            if these and len(self._round_seen) < len(self._eval_sets):
                return  # more of this evaluation's data sets to come
            found, self._round, self._round_seen = self._round, {}, set()
        with ends_on_error(self):  # a monitored metric missing with strict=True fails this train()
            stop = self.end_evaluation(state.global_step, found)
        if stop:
            control.should_training_stop = True
        if self._epoch_pending:
            self._close_epoch(state, control)

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        self._end_inference("predict", args, metrics)

    def _end_inference(self, label: str, args: TrainingArguments, metrics: dict[str, float] | None) -> None:
        """Samples in the measured steps: this rank's share of the data set less its first batch, which precedes
        any HF hook (the share of steps measured overcounted where the last batch is short: 75 for 68 of 100)."""
        metrics = metrics or {}
        seen, measured = getattr(self, "_steps", [0, 0])
        total = getattr(self, "_dataset_len", 0)
        if not total:  # a data set without len(): HF's rounded rate x runtime
            rate = next((v for k, v in metrics.items() if k.endswith("_samples_per_second")), 0.0)
            runtime = next((v for k, v in metrics.items() if k.endswith("_runtime")), 0.0)
            total = round(rate * runtime)
        mine, batch = math.ceil(total / args.world_size), max(int(args.eval_batch_size), 1)
        if args.dataloader_drop_last:
            mine -= mine % batch
        share = max(mine - min(batch, mine), 0) if seen and measured else 0.0
        self.open_sink()
        self.end_stage("inference", samples=round(share), label=label)
        # evaluate()/predict() returns to the user, who expects the numbers in MLflow now and the run ended as
        # before (as Lightning's teardown ends each stage): the sink closes, its sender stops; a later call reopens
        resumed, self._resumed_hf_run = self._resumed_hf_run, None
        self.finish("FINISHED", keep_sink=True)  # its sender kept, warm, for the next call (no start-up again)
        if resumed:  # HF's training run, made active again for this call: ended again, as it had ended
            end_hf_run(self.run, resumed)

    def _close_epoch(self, state: TrainerState, control: TrainerControl) -> None:
        self._epoch_pending = False
        if self.epoch_open and self.end_epoch(state.global_step):
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._epoch_pending = False
        self.end_training(state.global_step)
        self._training = False
        self._remove_count_hook()
        self.finish("FINISHED")


class _HfStopper(ExportableState):
    """What both HF stopping callbacks do: find the monitor, save and restore their state."""

    def state(self) -> dict[str, Any]:
        return {"args": dict(self._init_args), "attributes": {"green_policy": self.policy_state()}}

    def _begin(self, state: TrainerState) -> None:
        """At each train()'s start: a resumed one takes the checkpoint's state (also where this stopper served an
        earlier training), a fresh one after another starts from nothing."""
        if resumed(state):
            saved = (load_saved_state(self, state) or {}).get("green_policy") or getattr(self, "green_policy", None)
            if saved:
                self.load_policy_state(saved)
        elif getattr(self, "_trained", False):
            self.reset_policy()
        keep_a_place(state, self)  # after the checkpoint's entry was read
        self._trained = True
        self._attached = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._begin(state)

    def _attach(self, state: TrainerState) -> None:
        tracker = running_tracker()
        with ends_on_error(tracker):  # a stopper that cannot act (nothing measured) fails this train()
            tracker.attach(self)
        self._attached = True

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # every callback's on_train_begin has run by now, the EnergyMonitor's included
        self._attach(state)

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        # eval_on_start: HF evaluates before the first on_epoch_begin; the monitor decides at its on_evaluate, after
        # every callback's prediction steps (a typo in the monitored name fails there, before the first step)
        if not getattr(self, "_attached", False) and in_training_loop():
            self._attach(state)


class EfficiencyEarlyStopping(_HfStopper, EfficiencyStopper, TrainerCallback):
    """Stops training when the monitored metric's gain per kilojoule flattens out.

    Arguments: see :class:`green_callbacks.stopping.EfficiencyStopper` (the same in
    ``green_callbacks.lightning``). ``monitor`` follows ``metric_for_best_model``: "accuracy"
    and "eval_accuracy" are the same metric; ``None`` takes ``metric_for_best_model`` and
    ``greater_is_better``. The decision sets ``control.should_training_stop`` on every rank.
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._begin(state)
        default = args.metric_for_best_model or "loss"
        greater = args.greater_is_better if args.greater_is_better is not None else "loss" not in default
        self.resolve(eval_name(default), "max" if greater else "min", eval_name)
        strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
        if strategy == "no" and state.is_world_process_zero:  # said once for the job, as below
            self.no_evaluations('eval_strategy="no"')
        elif strategy in ("steps", "epoch"):
            count = evaluations(strategy, args, state)
            if count is not None and state.is_world_process_zero:
                self.expect_evaluations(count, f'eval_strategy="{strategy}"' + (
                    f", eval_steps={state.eval_steps}, max_steps={state.max_steps}" if strategy == "steps" else
                    f", {math.ceil(state.num_train_epochs)} epochs") + (
                    f", eval_delay={args.eval_delay}" if args.eval_delay else ""))


class EnergyBudget(_HfStopper, BudgetStopper, TrainerCallback):
    """Stops training before an energy, emissions or cost budget would be exceeded.

    Arguments: see :class:`green_callbacks.stopping.BudgetStopper` (the same in
    ``green_callbacks.lightning``).
    """
