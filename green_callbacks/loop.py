"""The tracker in a loop you write yourself (plain PyTorch, 🤗 Accelerate): context managers instead of hooks.

```python
tracker = EnergyTracker(country="FR", experiment_name="my-run")
tracker.attach(BudgetStopper(energy="2 kWh"))
with tracker:
    for epoch in range(max_epochs):
        with tracker.epoch(epoch):
            for batch in loader:
                ...  # forward, backward, optimizer.step()
                if tracker.step(batch=batch):  # the step axis, logging points, throughput; True once a stopper
                    break  # decided (a budget checked every N steps stops mid-epoch)
            if not tracker.should_stop:
                with tracker.evaluation():
                    acc = evaluate()
                tracker.report({"val_acc": acc})
        if tracker.should_stop:
            break
```

These calls drive the same methods the Lightning and HF adapters drive from their hooks, so the
intervals, the MLflow contract, the stoppers and the ranks' merge are the adapters' own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from green_callbacks.distributed import RankInfo, gather
from green_callbacks.process import never_raises, warn_once

if TYPE_CHECKING:
    from green_callbacks.tracker import EnergyTracker


class LoopHost:
    """The plain-loop half of :class:`~green_callbacks.tracker.EnergyTracker`.

    ``with tracker:`` starts the sensors and opens the MLflow run (or logs into the active one,
    ``mlflow.start_run()``); its end logs the totals, writes the artifacts and the summary, and
    sets the run's status: ``FINISHED``, or ``FAILED`` (``KILLED`` for Ctrl-C or ``SystemExit``)
    when an exception leaves the block, which then propagates unchanged.

    The step axis: call :meth:`step` after every optimizer step (with the step you log your own
    metrics at, or nothing to count from 0) to get logging points every ``log_every_n_steps``
    steps (or ``log_every_s``), budget checks between points and throughput per joule. Without
    :meth:`step` the axis is the epoch number: each epoch's evaluation and end are logged at step
    ``epoch``. Set ``tracker.max_steps`` (the last step on that axis) for budget projections.
    """

    _loop_step: int = -1  # the latest step given to step(); -1: none, the epoch number is the axis
    _loop_pending: bool = False  # an evaluation window closed and not yet reported
    _loop_depth: int = 0  # ``with tracker:`` blocks entered and not left (a nested one is ignored)
    _loop_epoch_pending: bool = False  # an epoch left with its evaluation not yet reported: it ends with the report
    _in_epoch_block: bool = False  # inside a ``with tracker.epoch(...)`` block
    _loop_epoch_raised: bool = False  # an epoch block was left by an exception (its epoch may still be open)

    # -- the run ---------------------------------------------------------------------------------
    def __enter__(self: EnergyTracker) -> EnergyTracker:
        self._loop_depth += 1
        if self._loop_depth > 1:  # its end would have ended the run, and the energy after it gone nowhere
            warn_once(self, "nested", "a `with tracker:` inside another one of the same tracker is ignored: the "
                                      "training under way goes on, and ends with the outer block")
            return self
        session = object()  # a new ``with`` is a new training: a run this tracker opened is not reused
        self._loop_step, self._loop_pending, self._loop_epoch_pending = -1, False, False
        self._in_epoch_block = self._loop_epoch_raised = False
        try:
            self.start(loop_rank(), _cuda_indices(), session=session)
        except BaseException:  # a bad setting found at the start (raised on purpose), Ctrl-C: no block entered
            self._loop_depth -= 1
            raise
        self._loop_session = session
        return self

    def __exit__(self: EnergyTracker, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        self._loop_depth -= 1
        if self._loop_depth > 0:
            return
        if exc_type is None:
            self._flush_evaluation()
            self.end_training(self._loop_point_step())
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt | SystemExit) else "FAILED")

    @property
    def should_stop(self: EnergyTracker) -> bool:
        """An attached stopper decided to stop this training (the same on every rank); it stays set after the
        ``with`` block, until the next one starts."""
        return self._stopping

    # -- windows ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def epoch(self: EnergyTracker, epoch: int) -> Iterator[EnergyTracker]:
        """One training epoch's window; its end is a point (collective under DDP: every rank leaves it).

        An evaluation inside it whose :meth:`report` comes after the block keeps the epoch open until then
        (its point first, then the epoch's, as where the report is inside). An exception leaving the block
        skips the point there: ``with tracker:`` records the partial epoch where the exception ends the run; where
        the loop catches it, the partial epoch (and anything before the next block) is the epoch's point at the
        next ``epoch()``.
        """
        if not self._check_started("epoch()"):
            yield self
            return
        if self._in_epoch_block:  # its end would have ended the outer epoch, whose rest then was in none
            warn_once(self, "nested-epoch", f"epoch({epoch!r}) inside another epoch() block is not an epoch of its "
                                            "own: ignored, the outer epoch goes on")
            yield self
            return
        self._in_epoch_block = True
        try:
            self._flush_evaluation()
            self._end_raised_epoch()
            self.begin_epoch(epoch)
            if self._loop_step < 0:  # no step() so far: the epoch number is the step axis, the tracker's too
                self.on_step(int(epoch))
            yield self
        except BaseException:
            self._loop_epoch_raised = True  # caught by the loop, it ends at the next epoch's start, or the run's
            raise
        finally:
            self._in_epoch_block = False
        if self._loop_pending:  # reported after the block, or at the next call without metrics
            self._loop_epoch_pending = True
            return
        self.end_epoch(self._loop_point_step())

    @contextlib.contextmanager
    def evaluation(self: EnergyTracker) -> Iterator[EnergyTracker]:
        """An evaluation's window; its point is made by :meth:`report` with the metrics it produced (or,
        without a report, at the next step, evaluation or epoch end, with none)."""
        if not self._check_started("evaluation()"):
            yield self
            return
        self._flush_evaluation()
        self.begin_evaluation()
        try:
            yield self
        finally:  # an exception the loop catches ends the evaluation too: what follows is training again
            self._close_evaluation()

    @never_raises
    def _close_evaluation(self: EnergyTracker) -> None:
        if self.evaluation_open and self.meter is not None:
            self._eval_window = self.meter.end("evaluation")
            self._loop_pending = True

    def report(self: EnergyTracker, metrics: Mapping[str, Any], step: int | None = None) -> bool:
        """The evaluation's metrics (``{"val_acc": 0.93}``): an evaluation point for efficiency metrics and stoppers.

        After (or inside) ``with tracker.evaluation():`` it closes that evaluation; alone, it is an
        evaluation point with no evaluation energy. ``step`` overrides the step it is logged at.
        Collective under DDP: every rank reports (each its own value; stoppers decide on each rank
        and the decision is reduced). Returns :attr:`should_stop`.
        """
        if not self._check_started("report()"):
            return False
        self._loop_pending = False
        at, numbers = self._loop_point_step() if step is None else int(step), _numbers(self, metrics)
        if self.sink is not None and getattr(self.sink.target, "owned", False):
            # the tracker's own run, which its sender opens: MLflow's fluent log_metric would start another
            self._log(numbers, at, ours=False)
        self.end_evaluation(at, numbers)
        self._end_pending_epoch()
        return self.should_stop

    def step(self: EnergyTracker, step: int | None = None, batch: Any = None) -> bool:
        """After an optimizer step: ``step`` is its index on your step axis (default: one more than the last).

        ``batch`` (the step's batch) counts samples and tokens for ``throughput/*_per_j``; with
        gradient accumulation count the other micro-batches with :meth:`count_batch`. A logging
        point that falls due is taken here at once (a loop has no "next batch starts" hook), so an
        evaluation at the same step logs its own point after it. Returns :attr:`should_stop`.
        """
        if not self._check_started("step()"):
            return False
        self._flush_evaluation()
        self._loop_step = self._loop_step + 1 if step is None else int(step)
        self.on_step(self._loop_step, batch)
        self.before_step()
        return self.should_stop

    # -- helpers ---------------------------------------------------------------------------------
    def _check_started(self: EnergyTracker, call: str) -> bool:
        """Whether the tracker runs; where not (no ``with tracker:``, or after it), one warning: it measures nothing."""
        if not self.started:
            warn_once(self, "not-started", f"{call} outside `with tracker:`: the tracker is not running, so nothing "
                                           "is measured or logged; put the training loop inside `with tracker:`")
        return self.started

    def _loop_point_step(self: EnergyTracker) -> int:
        return self._loop_step if self._loop_step >= 0 else self.current_epoch

    def _end_raised_epoch(self: EnergyTracker) -> None:
        """An epoch left by an exception the loop caught: its point (the partial epoch) before the next epoch begins,
        which would otherwise be taken into it (a collective point: under DDP every rank's block raised alike)."""
        if self._loop_epoch_raised:
            self._loop_epoch_raised = False
            if self.epoch_open:
                self.end_epoch(self._loop_point_step())

    def _flush_evaluation(self: EnergyTracker) -> None:
        """An evaluation nobody reported: its point, without metrics, before anything else happens."""
        if self._loop_pending:
            self._loop_pending = False
            self.end_evaluation(self._loop_point_step(), {})
        self._end_pending_epoch()

    def _end_pending_epoch(self: EnergyTracker) -> None:
        if self._loop_epoch_pending:
            self._loop_epoch_pending = False
            self.end_epoch(self._loop_point_step())


def _numbers(owner: object, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as floats (a tensor's value is read here, as the caller's ``float`` would); one warning
    per name that is not a number, which is left out rather than breaking the loop."""
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            warn_once(owner, f"report-{name}", f"report(): {name}={value!r} is not a number; left out")
    return out


def loop_rank() -> RankInfo:
    """Rank facts from ``torch.distributed`` (else the launcher's environment); a launcher that sets no
    ``LOCAL_RANK`` (``torch.multiprocessing.spawn``) gets it from the ranks' host names (one collective)."""
    info = RankInfo.from_env()
    if info.world_size > 1 and not {"LOCAL_RANK", "SLURM_LOCALID"} & os.environ.keys():
        hosts = gather(info.node)
        info = dataclasses.replace(info, local_rank=hosts[: info.rank].count(info.node))
    return info


def _cuda_indices() -> list[int] | None:
    """The CUDA device this process trains on, as torch knows it; ``[]`` where torch has no CUDA (CPU training);
    ``None`` (NVML's own ``LOCAL_RANK`` rule) before torch is imported or CUDA is initialised."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.current_device()] if torch.cuda.is_initialized() else None
