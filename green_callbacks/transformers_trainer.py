"""What HF's ``Trainer`` keeps from its callbacks, read for the monitor: the trainer and its ``MLflowCallback``
(found from the hook's callers, as HF hands callbacks neither), its run, a checkpoint's saved state, the rank and
device, the evaluation schedule and an evaluation's metrics."""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Iterator
from typing import Any

from transformers import TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from green_callbacks.distributed import RankInfo, node_name
from green_callbacks.sensors.base import log
from green_callbacks.tracker import EnergyTracker
from green_callbacks.uris import temporary_env


@contextlib.contextmanager
def ends_on_error(tracker: EnergyTracker) -> Iterator[None]:
    """A configuration error raised from a hook ends ``train()``, and HF tells no callback of it: end the run here
    (``FAILED``), not at the next ``train()`` or the process's exit."""
    try:
        yield
    except Exception:
        tracker.finish("FAILED")
        end_hf_run(getattr(tracker, "run", None), "FAILED")
        raise


def end_hf_run(run: Any, status: str, hf_started: bool | None = None) -> None:
    """HF's ``MLflowCallback`` ends the run it started at ``on_train_end``, which a ``train()`` that raised never
    reaches, and MLflow's exit handler then marked it FINISHED. The run the energy went to, where HF started it
    (not one this package opened, whose status the sender sets, nor the user's own) and it is still the active
    run, ends here with ``status``; where it is no longer the active run (HF's callback, collected with a Trainer the
    user let go or replaced, ended it FINISHED in its ``__del__``), by its id. One bounded try: the training is over."""
    if run is None or run.owned:
        return
    if hf_started is None:  # (given where no trainer calls: at the exit)
        hf_started = bool(getattr(hf_mlflow_callback(calling_trainer(depth=40)), "_auto_end_run", False))
    if not hf_started:
        return  # not a run HF started (the user's own mlflow.start_run(): the user's to end)
    try:
        import mlflow

        active = mlflow.active_run()
        with temporary_env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}):
            if active is not None and active.info.run_id == run.run_id:
                mlflow.end_run(status)
            else:
                mlflow.MlflowClient(run.tracking_uri).set_terminated(run.run_id, status)
    except Exception as exc:  # the server's fault: the run stays as it is
        log.warning("green-callbacks: could not mark HF's MLflow run %s %s (%s: %s)", run.run_id, status,
                    type(exc).__name__, exc)


def callers() -> Iterator[Any]:
    """The frames calling the hook that calls this, innermost first."""
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


def in_training_loop() -> bool:
    """Whether HF's training loop is on the calling stack (an evaluation within ``train()``)."""
    return any(frame.f_code.co_name == "_inner_training_loop" for frame in callers())


def interrupted_status() -> str:
    """The status of a training whose exception HF reported to no callback: ``KILLED`` for Ctrl-C (as an
    interactive session records it), else ``FAILED``."""
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return "KILLED" if isinstance(last, KeyboardInterrupt) else "FAILED"


def calling_trainer(depth: int = 12) -> Any:
    """The ``transformers.Trainer`` whose callback hook is running (HF hands callbacks no trainer), or ``None``."""
    from transformers import Trainer

    # the hook's callers: CallbackHandler.call_event and on_<event>, then the trainer's loop
    return next((f.f_locals["self"] for f in itertools.islice(callers(), depth)
                 if isinstance(f.f_locals.get("self"), Trainer)), None)


def hf_callbacks(trainer: Any) -> list[Any]:
    """``trainer``'s callbacks (none for ``None``)."""
    return list(getattr(getattr(trainer, "callback_handler", None), "callbacks", ()))


def hf_mlflow_callback(trainer: Any) -> Any:
    """HF's ``MLflowCallback`` among ``trainer``'s callbacks, or ``None``."""
    return next((c for c in hf_callbacks(trainer) if type(c).__name__ == "MLflowCallback"), None)


def reopen_hf_mlflow_run(args: TrainingArguments, state: TrainerState, model: Any) -> None:
    """HF's ``MLflowCallback`` sets up its run once per Trainer (at the first ``train()``) and ends it when that
    training ends; a second ``train()`` sent HF's metrics to a run MLflow starts on the fly at HF's first log,
    without params, after the monitor had chosen a run of its own. Run its set-up again, as the first training
    did, so that HF's metrics and the energy share one run."""
    hf = hf_mlflow_callback(calling_trainer() if state.is_world_process_zero else None)
    if hf is None or not getattr(hf, "_initialized", False):
        return  # none, or its on_train_begin has just set it up
    try:
        if hf._ml_flow.active_run() is None:
            hf.setup(args, state, model)
    except Exception as exc:  # HF's own call: what it raises is HF's MLflow fault, not the training's
        log.warning("green-callbacks: could not set up HF's MLflowCallback run again for this train() (%s: %s); "
                    "the energy goes to a run of its own", type(exc).__name__, exc)


def set_up_hf_mlflow_first(args: TrainingArguments, state: TrainerState, model: Any) -> None:
    """An ``evaluate()`` before any ``train()``: HF's ``MLflowCallback`` sets up (imports MLflow,
    opens the store, starts its run, logs every argument) at the call's first log, after the batches and before
    ``on_evaluate``: seconds the evaluation's energy counted (21.4 J and 3.9 s for a 0.01-s evaluation on MLflow's
    default store). Set it up now, before the evaluation's window opens, as its ``on_train_begin`` would have.
    Not for ``predict()``, which logs nothing, so HF never sets up (nor starts a run) there."""
    from transformers import Trainer

    trainer = next((f.f_locals["self"] for f in itertools.islice(callers(), 16)
                    if f.f_code.co_name == "evaluate" and isinstance(f.f_locals.get("self"), Trainer)), None)
    hf = hf_mlflow_callback(trainer)
    if hf is None or getattr(hf, "_initialized", True):
        return
    try:
        hf.setup(args, state, model)
    except Exception as exc:  # HF's own call: it tries again at its first log and raises there as it would have
        log.debug("green-callbacks: HF's MLflowCallback set-up before the evaluation failed: %s: %s",
                  type(exc).__name__, exc)


def resume_hf_run(run: Any, state: TrainerState) -> str | None:
    """An ``evaluate()`` or ``predict()`` after ``train()``: HF's ``MLflowCallback`` ended its run with the training
    and, still set up, logs the evaluation's metrics with MLflow's fluent API, which starts a run on the fly (no
    params, left RUNNING) while the energy went to the training's run. Where HF started that run, make it the
    active run again for the call, so that both go to it (ended again by :func:`end_hf_run`, with the status it
    has now: a training that failed stays FAILED). Two requests, each bounded (no retries, 5 s); the status to end
    with, ``None`` where the run was not made active."""
    if run is None or run.owned or not state.is_world_process_zero:
        return None
    hf = hf_mlflow_callback(calling_trainer())
    if hf is None or not getattr(hf, "_initialized", False) or not getattr(hf, "_auto_end_run", False):
        return None
    try:
        if hf._ml_flow.active_run() is not None:
            return None
        with temporary_env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}):
            status = hf._ml_flow.get_run(run.run_id).info.status
            hf._ml_flow.start_run(run_id=run.run_id)
        return status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
    except Exception as exc:  # the server's fault: HF's metrics go where HF sends them
        log.warning("green-callbacks: could not make the training's MLflow run %s active again for this evaluation "
                    "(%s: %s); HF logs its metrics to a run of their own", run.run_id, type(exc).__name__, exc)
        return None


def load_saved_state(callback: Any, state: TrainerState) -> dict[str, Any] | None:
    """This callback's attributes from ``state.stateful_callbacks`` (a resumed checkpoint's).

    HF re-creates stateful callbacks only with ``restore_callback_states_from_checkpoint=True``;
    reading the attributes here restores the totals either way.
    """
    saved = (state.stateful_callbacks or {}).get(type(callback).__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return (saved or {}).get("attributes")


# eval metrics about the evaluation itself, not the model
_NOT_MODEL_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "epoch",
                      "_jit_compilation_time")


def rank_of(args: TrainingArguments) -> RankInfo:
    return RankInfo(args.process_index, args.local_process_index, args.world_size, node_name())


def cuda_indices(args: TrainingArguments) -> list[int]:
    return [args.device.index or 0] if args.device.type == "cuda" else []


def model_metrics(metrics: dict[str, Any] | None, prefix: str = "eval_") -> dict[str, float]:
    """Evaluation metrics of the model (``eval_accuracy``...), without runtime/throughput entries."""
    return {k: float(v) for k, v in (metrics or {}).items()
            if k.startswith(prefix) and not k.endswith(_NOT_MODEL_METRICS) and isinstance(v, int | float)}


def eval_name(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def evaluations(strategy: str, args: TrainingArguments, state: TrainerState) -> int | None:
    """The evaluations HF's schedule makes before the training's last step (one there stops nothing): every
    ``eval_steps`` steps, or at every epoch's end, from ``eval_delay`` on; None where it is not known (an
    iterable data set's "epochs", which HF sets to ``sys.maxsize``)."""
    delay = args.eval_delay or 0
    if strategy == "steps":
        every, steps = state.eval_steps, state.max_steps
        if not every or not steps or every <= 0 or steps <= 0:
            return None
        every = math.ceil(every * steps) if every < 1 else int(every)
        first = max(every, math.ceil(delay / every) * every)  # the first multiple of every at or after the delay
        return (int(steps) - 1 - first) // every + 1 if first < steps else 0
    epochs = math.ceil(state.num_train_epochs or 0)
    if not 0 < epochs < 1_000_000:
        return None
    return max(0, epochs - 1 - max(math.ceil(delay), 1) + 1)


def resumed(state: TrainerState) -> bool:
    """Whether this train() resumes a checkpoint: HF has loaded its state, steps done included, before
    ``on_train_begin`` (a fresh training starts at step 0)."""
    return (state.global_step or 0) > 0


def keep_a_place(state: TrainerState, callback: ExportableState) -> None:
    """HF saves a stateful callback's state into the entry its ``TrainerState`` made for it when the Trainer was
    built; resuming a checkpoint written without this callback replaces those entries with the checkpoint's, and
    the next save raised ``KeyError`` (HF's own ``EarlyStoppingCallback`` alike): the entry is made here."""
    if isinstance(state.stateful_callbacks, dict) and type(callback).__name__ not in state.stateful_callbacks:
        state.stateful_callbacks[type(callback).__name__] = callback.state()


def length_of(dataset: Any) -> int:
    """``len(dataset)``, or 0 for a data set without one (an ``IterableDataset``)."""
    try:
        return len(dataset) if dataset is not None else 0
    except TypeError:
        return 0
