"""What Lightning's trainer says, read for the monitor: its rank, device and MLflow run, the step axis, the
validation schedule, the run's end and its minimums, and the metrics a validation or a training step logged."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer

from green_callbacks.distributed import RankInfo, node_name
from green_callbacks.records import Kind

TRAINING_NAME = re.compile(r"(^|[^a-z])train", re.IGNORECASE)  # train_loss, loss/train, training_acc


def rank_of(trainer: pl.Trainer) -> RankInfo:
    return RankInfo(trainer.global_rank, trainer.local_rank, trainer.world_size, node_name(trainer.node_rank))


def cuda_indices(trainer: pl.Trainer) -> list[int]:
    device = trainer.strategy.root_device
    return [device.index or 0] if device.type == "cuda" else []


def mlflow_logger_run(trainer: pl.Trainer) -> tuple[str | None, str | None]:
    """The run of the trainer's ``MLFlowLogger`` (rank 0 only), so no second run is opened."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger.run_id, getattr(logger, "_tracking_uri", None)
    return None, None


def sanity_metric_names(trainer: pl.Trainer) -> set[str]:
    """The names the sanity check's validation logged. With several val dataloaders Lightning leaves
    ``callback_metrics`` empty through the sanity check, so the names come from the loop's results too,
    as Lightning will name them (``val_acc/dataloader_idx_0``); ``set()`` where neither says anything.
    Only those Lightning hands callbacks: a training's all, an evaluation's those logged per epoch (a
    validation's ``on_step=True, on_epoch=False`` value, or its ``_step`` fork, reaches no callback)."""
    names = set(trainer.callback_metrics)
    results = getattr(trainer, "_results", None)
    try:
        for metric in results.values():  # type: ignore[union-attr]
            for on_step in (True, False) if results.training else (False,) if metric.meta.on_epoch else ():
                names.update(results._forked_name(metric, on_step))  # type: ignore[union-attr]
    except Exception:  # another Lightning: what callback_metrics holds
        pass
    return names


def step_only_names(trainer: pl.Trainer) -> set[str]:
    """The names an evaluation logged per step (``on_step=True``), which Lightning hands no callback."""
    results = getattr(trainer, "_results", None)
    try:
        if results.training:  # type: ignore[union-attr]
            return set()
        # (the name itself where logged per step only, else its "_step" fork)
        return {results._forked_name(m, True)[1] for m in results.values() if m.meta.on_step}  # type: ignore
    except Exception:  # another Lightning
        return set()


def fresh_metrics(trainer: pl.Trainer, before: dict[str, Any] | None) -> dict[str, float]:
    """This validation's scalar metrics: Lightning keeps a metric's last value in ``callback_metrics`` when a
    validation does not log it (a metric logged every other validation); such a value is the very tensor an
    earlier validation left (``before``), not a new measurement, and is left out."""
    before = before or {}
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if before.get(k) is not v and getattr(v, "numel", lambda: 1)() == 1}


def epoch_training_metrics(trainer: pl.Trainer, wanted: set[str], now: bool) -> tuple[dict[str, float], set[str]]:
    """Training metrics logged per epoch only (``self.log(..., on_step=False, on_epoch=True)`` in
    ``training_step``) among ``wanted``: Lightning reports them at the epoch's end, after the epoch's validation,
    so at a validation ``callback_metrics`` holds the previous epoch's value (an evaluation was paired with the
    metric of the epoch before, and the first had none). Their names, whose value a validation must not read as
    new; and where the validation ends the epoch (``now``: nothing is trained before the epoch's end), this
    epoch's values, computed as Lightning computes them at the epoch's end (its metrics keep the value computed:
    the epoch's end reads it, synchronised across ranks once, where ``sync_dist`` asks). Empty where this
    Lightning keeps its results otherwise."""
    if not wanted:
        return {}, set()
    try:
        results = trainer.fit_loop.epoch_loop._results
        found = [(results._forked_name(m, False)[0], m) for _, m in results.valid_items()
                 if m.meta.on_epoch and not m.meta.on_step]
        found = [(name, m) for name, m in found if name in wanted]
        values = {}
        for name, metric in found if now else ():
            value = results._get_cache(metric, False)
            if value is not None and value.numel() == 1:
                values[name] = float(value)
        return values, {name for name, _ in found}
    except Exception:  # another Lightning
        return {}, set()


def step_of(trainer: pl.Trainer, counted: bool = False) -> int:
    """The step Lightning's loggers log at, so energy points overlay the loss and accuracy charts of the
    same run: ``fit_loop.epoch_loop._batches_that_stepped``, the batches that stepped the optimizers (once
    a batch whatever the number of optimizers; a micro-batch of an accumulation goes with the step it
    leads to). A batch's training metrics, and a validation run after it, are logged before the batch is
    counted; ``counted``: after it was (an epoch's or the run's end), at one less, as Lightning logs the
    epoch's metrics. Where a Lightning lacks the counter: the latest optimizer step, ``global_step - 1``."""
    stepped = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
    if type(stepped) is not int:
        return max(trainer.global_step - 1, 0)
    return max(stepped - 1, 0) if counted else stepped


def step_reader(trainer: pl.Trainer) -> Callable[[], int]:
    """:func:`step_of` for every training batch, without a function call: the loop's counter itself (updated
    in place, also by a checkpoint's restore), where this Lightning has it."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    if type(getattr(loop, "_batches_that_stepped", None)) is int:
        return lambda: loop._batches_that_stepped
    return lambda: step_of(trainer)


def ends_epoch(trainer: pl.Trainer) -> bool:
    """Whether this validation ran after the training epoch's last batch, so that the epoch ends with it
    (Lightning runs it before ``on_train_epoch_end``, with nothing trained in between)."""
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False)) and trainer.state.fn == "fit"


def epoch_ends_before_run(trainer: pl.Trainer) -> bool:
    """Whether the training epoch under way ends before the run does: not with an endless stream (an epoch of
    unknown length) nor where ``max_steps`` comes first, as in a step-based run of one long epoch, so that what
    is logged at an epoch's end never arrives while training goes on."""
    try:
        batches = float(trainer.num_training_batches)
        if batches == float("inf"):
            return False
        if trainer.max_steps < 0:
            return True
        progress = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        left = math.ceil(max(batches - progress, 0) / max(int(trainer.accumulate_grad_batches), 1))
        return trainer.global_step + left < trainer.max_steps
    except Exception:  # another Lightning: as if it did, the lenient side
        return True


def max_steps(trainer: pl.Trainer) -> float | None:
    """The last step of the run on :func:`step_of`'s axis (``max_steps``, or ``max_epochs`` x batches, less one);
    inf when unbounded."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # a loader without len() and no max_steps: Lightning cannot tell
        return None
    # a finite iterable without len() and no max_steps: Lightning returns max_steps itself, -1
    return total - 1 if total > 0 else None


@dataclass(frozen=True)
class Schedule:
    """Lightning's validation schedule on the step axis, where it is one of steps: a validation every ``every``
    batches, in every ``n``-th epoch (``None``: counted over the whole run) of ``batches`` training batches (inf:
    an endless stream, where ``n`` is None), with gradients accumulated over ``accumulate`` batches. Validations
    are counted in batches, the axis in optimizer steps: a step a batch, or one every ``accumulate`` batches and
    at each epoch's last."""

    every: int
    n: int | None
    batches: float
    accumulate: int = 1

    @classmethod
    def of(cls, trainer: pl.Trainer) -> Schedule | None:
        """The trainer's, or ``None`` where it is not one of steps: validation off, by time, an epoch of unknown
        length validated by epochs, an accumulation that changes during the run."""
        try:
            from lightning.pytorch.callbacks import GradientAccumulationScheduler

            every, n, batches = trainer.val_check_batch, trainer.check_val_every_n_epoch, trainer.num_training_batches
            k = trainer.accumulate_grad_batches
            if not trainer.enable_validation or type(k) is not int or k < 1 or type(every) is not int \
                    or every < 1 or not (n is None or (type(n) is int and n >= 1)) \
                    or any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
                return None
            batches = float(batches) if batches == float("inf") else int(batches)
            if (batches < 1 and (n is not None or k > 1)) or (n is not None and batches == float("inf")):
                return None
            return cls(every, n, batches, k)
        except Exception:  # another Lightning
            return None

    @property
    def steps_per_epoch(self) -> float:
        return self.batches if self.accumulate == 1 else math.ceil(self.batches / self.accumulate) \
            if math.isfinite(self.batches) else math.inf

    def epoch_of(self, step: int) -> int:
        """The epoch of a step (where epochs have a length)."""
        return int(step // self.steps_per_epoch)

    def _step(self, batch: int) -> int:
        """The step a validation after (global) batch ``batch`` is logged at: the steps before the batch's own."""
        k, b = self.accumulate, self.batches
        if k == 1:
            return batch
        if not math.isfinite(b):
            return batch // k
        epoch, within = divmod(batch, int(b))
        return int(epoch * self.steps_per_epoch + within // k)

    def _batch(self, step: int) -> int:
        """The first batch whose validation is logged at ``step`` or later."""
        k, b = self.accumulate, self.batches
        if k == 1:
            return step
        if not math.isfinite(b):
            return step * k
        epoch, j = divmod(step, int(self.steps_per_epoch))
        return int(epoch * b + j * k)

    def _next_batch(self, batch: int) -> int:
        """The first batch at or after ``batch`` that a validation follows."""
        every, n = self.every, self.n
        if n is None:  # every ``every`` batches of the whole run: after batch t where (t + 1) % every == 0
            return math.ceil((batch + 1) / every) * every - 1
        batches = int(self.batches)
        epoch, within_epoch = divmod(batch, batches)
        within = math.ceil((within_epoch + 1) / every) * every - 1  # the epoch's batches: after (b + 1) % every == 0
        if (epoch + 1) % n == 0 and within < batches:  # this epoch validates, and has a check still to come
            return epoch * batches + within
        epoch = ((epoch + 1) // n + 1) * n - 1  # the next epoch that validates, at its first check
        return epoch * batches + every - 1

    def next_validation(self, step: int) -> int:
        """The step of the first validation at or after ``step``."""
        return self._step(self._next_batch(self._batch(step)))

    def count(self, last: float, most: int = 1000) -> int:
        """The validations at steps up to ``last`` (the run's last step), counted up to ``most``."""
        n, at = 0, self._next_batch(0)
        while self._step(at) <= last and n < most:
            n, at = n + 1, self._next_batch(at + 1)
        return n

    def period(self) -> float:
        """Steps per validation (an epoch's validations spread over ``n`` epochs)."""
        if self.n is None:
            per_batch = 1 / self.accumulate if not math.isfinite(self.batches) else self.steps_per_epoch / self.batches
            return self.every * per_batch
        return self.n * self.steps_per_epoch / max(int(self.batches) // self.every, 1)


def steps_in_time(timer: Timer | None, step: int, left: float | None) -> float | None:
    """``max_time`` (Lightning's ``Timer``) ends the run when its time is up, if before ``max_steps`` /
    ``max_epochs`` (``left`` steps): the steps its time left allows, at the training's average time per step."""
    if timer is None:
        return left
    remaining_s, elapsed_s = timer.time_remaining("train"), timer.time_elapsed("train")
    if remaining_s is None or elapsed_s <= 0:
        return left
    in_time = max(remaining_s, 0.0) * (step + 1) / elapsed_s
    return in_time if left is None else min(left, in_time)


def unmet_minimum(loop: Any, kind: Kind | None) -> str | None:
    """Lightning carries out ``should_stop`` only once ``min_epochs`` and ``min_steps`` are met, training on until
    then: which of them the fit ``loop`` has not met for a stop decided now, at a point of ``kind``."""
    try:
        epochs = loop.epoch_progress.current.processed  # counted before on_train_epoch_end (a Kind.EPOCH point)
        if kind is not Kind.EPOCH and loop.epoch_loop.batch_progress.is_last_batch:
            epochs += 1  # the epoch ends with this batch: Lightning asks after counting it
        unmet = [f"min_epochs={loop.min_epochs}" if loop.min_epochs and epochs < loop.min_epochs else "",
                 f"min_steps={loop.min_steps}" if loop.min_steps and loop.epoch_loop.global_step < loop.min_steps
                 else ""]
    except AttributeError:  # another Lightning
        return None
    unmet = [u for u in unmet if u]
    return f"Trainer({', '.join(unmet)})" if unmet else None
