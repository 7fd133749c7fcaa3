"""How a run ends: the training's end (the epoch cut short, the tail), then the stage's finish (the meter
closed, what an interrupted run measured kept, outputs, the wait for MLflow, the status), and the end at
interpreter exit for a run nobody finished. ``EnergyTracker`` takes it in as a mixin."""

from __future__ import annotations

import time

from green_callbacks import outputs, process
from green_callbacks.process import never_raises
from green_callbacks.records import Kind, total_metrics

# the most an end brought about by a SIGTERM waits for MLflow: the signal's sender (``docker stop``, Kubernetes,
# Slurm) kills the process after its grace period (10 s for docker), and a wait of the whole ``mlflow_wait_s`` for a
# store that does not answer took all of it: killed in the wait, the run's files were never written
TERM_WAIT_S = 2.0


class EndHost:
    """The end of a tracker's stage (mixed into :class:`~green_callbacks.tracker.EnergyTracker`)."""

    _sigterms_at_start = 0  # process.sigterm_count() at the stage's start

    @never_raises
    def end_training(self, step: int) -> None:
        """Training is over (collective, every rank): the epoch cut short by ``max_steps`` and the tail."""
        if self.meter is None or self._finishing_status is not None:
            return
        # never before the last point: a training resumed and stopped before its first step can report a step
        # short of its checkpoint's (Lightning's batches that stepped, mid-epoch), and the end ran backwards
        step = max(step, self._last_point_step)
        self.meter.settle()
        if self.epoch_open:
            self._point(Kind.EPOCH, step)
        self.end_held_stop(step)
        self._point(Kind.END, step)
        self._log(total_metrics(self.cumulative_j, self.cumulative_g, self.cumulative_cost,
                                self.run_time_s()), step)

    @never_raises
    def finish(self, status: str = "FINISHED", keep_sink: bool = False) -> None:
        """Close the meter; keep what an interrupted run measured; write outputs, the summary and the status (see
        :meth:`_finish`). A SIGTERM that came while this end was under way acts once it is done, whatever
        happened in it (the process ends by the signal, as it would have)."""
        try:
            self._finish(status, keep_sink)
        finally:
            if process.term_pending() and not any(t._finishing_status is not None for t in process.live_trackers()):
                process.end_by_sigterm()

    def _finish(self, status: str, keep_sink: bool) -> None:
        """Close the meter; keep what an interrupted run measured; write outputs, the summary and the status.

        ``keep_sink``: a stage outside training (HF ``evaluate()``, Lightning ``test()``) whose records and status
        MLflow confirmed keeps its sender for the monitor's next stage (see :meth:`_park_sink`)."""
        if not self.started or self._finished:
            return
        ended_ms = int(time.time() * 1000)  # the run's end time in MLflow (its status is written after the wait)
        cut_short = status != "FINISHED"  # this stage's own end (the run's status may say more, below)
        if keep_sink and not cut_short and self.ended_status in ("FAILED", "KILLED"):
            status = self.ended_status  # test()/evaluate() after a training that failed: the run stays failed
        self.ended_status = status
        if not keep_sink:  # a training's end: its time is the run's (a test()/evaluate() stage's is not)
            self.time_before_s = self.run_time_s()
        self._finished = True
        self._finishing_status = status
        trace = None
        report = self.rank.is_zero and len(self.records) > self._reported  # a later stage re-reports only news
        confirmed = True
        # Ctrl-C or SIGTERM in the wait for MLflow (Lightning's SIGTERMException, or this package's Terminated): the
        # outputs first, then it
        interrupted: KeyboardInterrupt | SystemExit | None = None
        self._end_s = time.monotonic()  # the run's time ends here, not after the wait
        try:
            if self.meter is not None:
                if cut_short or self.epoch_open:  # interrupted: this rank's part, without collectives
                    self.meter.settle()
                    step = self._last_step_seen_or_point()
                    last_epoch = next((r.step for r in reversed(self.records) if r.kind is Kind.EPOCH), None)
                    if self.epoch_open and last_epoch == step:  # cut short in its first step: that step's, not the
                        step += 1  # last epoch's step (its energy/epoch_j was logged twice there, the later ~0 J)
                    if self.epoch_open:
                        self._point(Kind.EPOCH, step, collective=False)
                    self._point(Kind.END, step, collective=False)
                    self._log(total_metrics(self.cumulative_j, self.cumulative_g, self.cumulative_cost,
                                            self.run_time_s()), step)
                    report = self.rank.is_zero
                trace = self.meter.trace_frame()
                self.meter.close()
            self._log_held()
            if report:
                if self.sink is not None:  # MLflow has the run, so its id names the outputs (one wait, shared)
                    confirmed = False  # a wait cut short (Ctrl-C) is not waited again by close()
                    try:
                        self.waiting_for_mlflow = True
                        if cut_short and process.sigterm_count() > self._sigterms_at_start:
                            # the flush's and the close's waits together, the sender's start-up included
                            self.sink.deadline = time.monotonic() + TERM_WAIT_S
                        confirmed = self.sink.flush(self.sink.close_wait_s, ending=True)
                    except (KeyboardInterrupt, SystemExit) as exc:  # the files are quick, and spooled for the sender
                        interrupted = exc
                    finally:
                        self.waiting_for_mlflow = False
                    self.run = self.run or self.sink.run_ref
                if not self.dry_run:
                    outputs.write(self, trace)
        finally:
            if self.sink is not None:
                self.sink.set_status(status, end_ms=ended_ms)
                try:
                    self.waiting_for_mlflow = True
                    parked = keep_sink and confirmed and status == "FINISHED" and self._park_sink()
                except (KeyboardInterrupt, SystemExit) as exc:  # the end goes on (closed without waiting), then it
                    parked, confirmed, interrupted = False, False, exc
                finally:
                    self.waiting_for_mlflow = False
                if not parked:
                    try:  # close's wait (the files and status just spooled): a SIGTERM or Ctrl-C ends it too
                        self.waiting_for_mlflow = True
                        self.sink.close(None if confirmed else 0.0)
                    except (KeyboardInterrupt, SystemExit) as exc:  # (close did the rest without waiting)
                        interrupted = interrupted or exc
                    finally:
                        self.waiting_for_mlflow = False
                self.run = self.run or self.sink.run_ref
            if report:
                self._reported = len(self.records)
                outputs.print_summary(self, status)
            self.sink = None
            self.started = False
            self._finishing_status = None
            process.unregister(self)
            self._end_s = None
            if interrupted is not None and not isinstance(interrupted, process.Terminated):
                raise interrupted  # whatever came after it, the Ctrl-C (or Lightning's SIGTERM) goes on

    def _park_sink(self) -> bool:
        """Wait for MLflow to confirm the stage's end, and keep the sink open, idle, for the next stage into the same
        run (:meth:`~green_callbacks.runs.RunHost._open_sink`): HF's ``evaluate()`` in a loop started a sender per
        call, MLflow's import and store (2 s a call for a 0.01-s evaluation). Unconfirmed: closed as at any end."""
        if self.sink.blocked or not self.sink.flush(self.sink.close_wait_s, ending=True) or self.sink.unconfirmed:
            return False  # (an artifact the store failed to take waits: the sender keeps at it, alone)
        self._idle_sink = self.sink
        self.sink.park()
        return True

    def _atexit(self) -> None:
        if self.started and not self._finished and self in process.live_trackers():  # (not a forked copy's exit)
            exc = process.uncaught()
            self.finish("FINISHED" if exc is None and not self.epoch_open else
                        "KILLED" if exc is None or issubclass(exc, KeyboardInterrupt) else "FAILED")
