"""The run's ledger: totals, interval records, the recent cost per step, and what a checkpoint saves."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from green_callbacks.accounting import Accountant
from green_callbacks.meter import Measurement
from green_callbacks.policies import Decision, Progress, Totals
from green_callbacks.ranks import Merged
from green_callbacks.records import IntervalRecord, Kind, run_methods
from green_callbacks.stretches import RATE_WINDOW, Recent, Since, combined


class RunLedger:
    """What one MLflow run has spent so far, interval by interval; survives a checkpoint resume.

    ``EnergyTracker`` is a ledger with sensors, windows and a sink around it.
    """

    accountant: Accountant
    sink: Any
    max_steps: float | None = None  # the run's total training steps, set by the adapter when known
    validates_on_stop = False  # the framework runs a validation when told to stop (Lightning's loop)
    steps_from_zero = True  # the step axis counts from 0 (Lightning's, a plain loop's): the first point covers step 0
    dry_run = False  # measured and summarised only: no MLflow run, no files (Lightning's fast_dev_run)

    def reset_run(self) -> None:
        """Forget the run: a fresh MLflow run and totals from zero."""
        self.run: Any = None  # green_callbacks.sinks.RunRef once known
        self.ended_status: str | None = None  # the status the run's last end gave it (see EnergyTracker.finish)
        self.time_before_s = 0.0  # the run's time in earlier fits (and before the checkpoint it resumed from)
        self.local_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.records: list[IntervalRecord] = []
        self._outputs_folder: Any = None  # the run folder this tracker's records were last written to
        self.cumulative_j = 0.0
        self.cumulative_g = 0.0
        self.cumulative_cost: float | None = None if self.accountant.price_per_kwh is None else 0.0
        self.stage_counts: dict[str, int] = {}
        self.evaluations = 0
        self.points = 0
        self.current_epoch = 0  # the epoch window's number (``epoch`` is the plain-loop window method)
        self.step_offset = 0
        self.last_logged_step = -1
        self.stop_decision: Decision | None = None
        self._since_eval = Since()
        self._recent = Recent()  # (steps, joules) of recent intervals
        self._cycle_steps = 0  # the steps since the last evaluation (or the start) so far
        self._last_cycle_steps: int | None = None  # those from the start or an evaluation to the last evaluation
        self._evaluations_j = 0.0  # what the run's evaluations cost in all
        self._trial_j = 0.0  # an evaluation before training in the open interval (Lightning's sanity check)
        self._eval_steps: list[int] = []  # the last two evaluations' steps (this fit's axis)
        self._last_eval_j = 0.0
        self._eval_costs: list[float] = []  # the recent evaluations' joules
        self._last_point_step = 0
        self._previous_point_step = 0
        self._last_point_j = 0.0
        self._params_logged = False
        self._tagged_methods: dict[str, str] = {}  # the green.method.* tags as set: the run's weakest so far
        self._device_tags: dict[str, str] = {}  # what the devices are, as tagged (re-tagged at the end if changed)
        self._reported = 0  # records already written out and summarised
        self._epoch_eval = (0.0, 0.0)
        self._epoch_start_step = 0
        self._at_start = self.steps_from_zero  # no point yet: on a 0-based axis the first covers step 0 too
        self._setup: Totals | None = None  # what the training cost before its steps (Progress.setup), once known
        self._setup_booked = False  # whether it was left out of an interval of the recent rate
        self._first_step = -1  # the training's first step, where its steps' own joules were first read
        self._resumed_cycle = False  # resumed: the first cycle since starts at the checkpoint, not an evaluation
        self._epoch_part: dict[str, Any] | None = None  # the open epoch so far, at a checkpoint's point (saved)
        self._restored_epoch: dict[str, Any] | None = None  # that, from the checkpoint this run resumed from
        self._epoch_prefix: tuple[Merged, float] | None = None  # the resumed epoch before the checkpoint: (it, start)

    def restart_steps(self) -> None:
        """A new trainer counts its steps from 0 again (``step_offset`` has moved past what the run logged):
        the steps the next interval, evaluation and epoch start from go back to 0 with it, and the stretch
        since the last evaluation starts anew (the previous fit's end closed it)."""
        self._last_point_step = self._previous_point_step = self._epoch_start_step = 0
        self._at_start = self.steps_from_zero
        self._since_eval = Since()
        self._cycle_steps = 0
        self._eval_steps = []

    def close_interval(self, kind: Kind, step: int, merged: Merged, interval: Measurement, t0: float,
                       epoch: Merged | None, epoch_m: Measurement | None, evaluation: tuple[float, float],
                       metrics: Mapping[str, float], partial: bool = False) -> list[IntervalRecord]:
        """Book one point: the interval since the previous point into the totals, and the records it leaves:
        the stretch since the last evaluation at an evaluation, the epoch where the point closes one (both
        when an evaluation ends the epoch), else the interval."""
        eval_j, eval_s = evaluation
        self._add(merged, interval, step, eval_j)
        self._evaluations_j += eval_j
        self._epoch_eval = (self._epoch_eval[0] + eval_j, self._epoch_eval[1] + eval_s)
        end_rel = interval.end_s - t0
        records = []
        if kind is Kind.EVALUATION:
            self._eval_steps = [*self._eval_steps[-RATE_WINDOW:], step]
            self._last_eval_j = eval_j
            self._eval_costs = [*self._eval_costs[-(RATE_WINDOW - 1):], eval_j]
            if self._cycle_steps > 0:  # a cycle's steps: the period after the first evaluation (_period_seen)
                self._last_cycle_steps, self._cycle_steps = self._cycle_steps, 0
            since, self._since_eval = self._since_eval, Since(step)
            self.evaluations += 1
            # its time is its intervals' (where it began on another fit's meter, or before a resume, their sum)
            records.append(self._make(kind, self.evaluations - 1, since.start_step, step, since.merged(),
                                      since.start_unix or interval.start_unix, end_rel - since.duration_s, end_rel,
                                      metrics, eval_j, eval_s, partial=partial))
        elif epoch is None or epoch_m is None:
            self.points += 1
            records.append(self._make(kind, self.points - 1, self._previous_point_step, step, merged,
                                      interval.start_unix, interval.start_s - t0, end_rel, {}, partial=partial))
        if epoch is not None and epoch_m is not None:
            start_unix, start_rel = epoch_m.start_unix, epoch_m.start_s - t0
            if self._epoch_prefix is not None:  # resumed mid-epoch: the part before the checkpoint is the epoch's too
                (before, start_unix), self._epoch_prefix = self._epoch_prefix, None
                epoch, start_rel = combined(before, epoch), start_rel - before.duration_s
            records.append(self._make(Kind.EPOCH, self.current_epoch, self._epoch_start_step, step, epoch,
                                      start_unix, start_rel, epoch_m.end_s - t0, {}, *self._epoch_eval,
                                      partial=partial))
            self._epoch_eval = (0.0, 0.0)
            self._epoch_part = None
        self.records.extend(records)
        return records

    def hold_epoch_part(self, part: Merged, start_unix: float) -> None:
        """At a checkpoint's point inside an epoch: what the epoch cost so far (every rank), saved with the
        checkpoint, so that a run resumed from it books the whole epoch, not only the part after the resume."""
        if self._epoch_prefix is not None:  # resumed into this epoch before: its part before that is in it too
            part, start_unix = combined(self._epoch_prefix[0], part), self._epoch_prefix[1]
        self._epoch_part = {"epoch": self.current_epoch, "start_step": self._epoch_start_step,
                            "start_unix": start_unix, "devices": part.devices, "methods": part.methods,
                            "peak_w": part.gpu_peak_w, "duration_s": part.duration_s, "eval": list(self._epoch_eval),
                            "unread": sorted(part.unread), "watts": dict(part.watts)}

    def resume_epoch(self, epoch: int) -> IntervalRecord | None:
        """Epoch ``epoch`` opens: where the checkpoint this run resumed from was taken inside it, it starts where
        that epoch started, with what it cost before the checkpoint. Where it was taken at an earlier epoch's last
        step (the trainer resumes at the next epoch, that epoch's end and evaluation never to come), that epoch's
        record is booked now, of what it cost before the checkpoint, and returned to be logged."""
        part, self._restored_epoch = self._restored_epoch, None
        if part is None or int(part["epoch"]) > epoch:
            return None
        before = Merged({c: dict(d) for c, d in part["devices"].items()}, dict(part["methods"]),
                        float(part["peak_w"]), float(part["duration_s"]), frozenset(part.get("unread", ())),
                        {c: float(w) for c, w in part.get("watts", {}).items()})
        if int(part["epoch"]) < epoch:
            opening, self.current_epoch = self.current_epoch, int(part["epoch"])
            record = self._make(Kind.EPOCH, int(part["epoch"]), int(part["start_step"]), self._last_point_step,
                                before, float(part["start_unix"]), -before.duration_s, 0.0, {},
                                float(part["eval"][0]), float(part["eval"][1]))
            self.current_epoch = opening
            self.records.append(record)
            return record
        self._epoch_start_step = int(part["start_step"])
        self._epoch_eval = (float(part["eval"][0]), float(part["eval"][1]))
        self._epoch_prefix = (before, float(part["start_unix"]))
        return None

    def _add(self, merged: Merged, interval: Measurement, step: int, eval_j: float = 0.0) -> None:
        fp = self.accountant.footprint(merged.total_j, interval.start_unix, interval.start_unix + interval.duration_s)
        self.cumulative_j += merged.total_j
        self.cumulative_g += fp.g_co2e
        if self.cumulative_cost is not None and fp.cost is not None:
            self.cumulative_cost += fp.cost
        self._since_eval.add(merged, interval)
        self._previous_point_step = self._last_point_step
        training_j, self._trial_j = max(merged.total_j - self._trial_j, 0.0), 0.0
        if self._setup is not None and not self._setup_booked:  # the set-up is no step's: out of the recent rate
            training_j, self._setup_booked = max(training_j - self._setup.j, 0.0), True
        # the steps since the last point; the fit's first point also covers step 0 itself (a 0-based axis)
        steps, self._at_start = max(step - self._last_point_step, 0) + self._at_start, False
        if steps > 0:  # training alone: an evaluation is added per cycle in rate_per_step
            self._recent.add(steps, max(training_j - eval_j, 0.0))
        self._cycle_steps += steps
        self._last_point_step = step
        self._last_point_j = sum(merged.power_w(interval.duration_s).values())  # the mean power since the last point

    def _make(self, kind: Kind, index: int, start_step: int, step: int, merged: Merged, start_unix: float,
              start_rel_s: float, end_rel_s: float, metrics: Mapping[str, float], eval_j: float = 0.0,
              eval_s: float = 0.0, partial: bool = False) -> IntervalRecord:
        duration = max(end_rel_s - start_rel_s, 0.0)
        fp = self.accountant.footprint(merged.total_j, start_unix, start_unix + duration)
        watts = merged.power_w(duration)
        # the peak of the sampled power is at least the mean: a window shorter than the sampling period holds no sample
        gpu_mean_w = watts.get("gpu", 0.0)
        return IntervalRecord(
            kind=kind, index=index, epoch=self.current_epoch, start_step=start_step + self.step_offset,
            step=step + self.step_offset, duration_s=duration, energy_j=merged.total_j,
            components_j=merged.components_j, devices_j=merged.devices_j, methods=merged.methods, footprint=fp,
            cumulative_j=self.cumulative_j, cumulative_g=self.cumulative_g, cumulative_cost=self.cumulative_cost,
            start_rel_s=start_rel_s, end_rel_s=end_rel_s, eval_j=eval_j, eval_s=eval_s,
            gpu_peak_w=max(merged.gpu_peak_w, gpu_mean_w), metrics={k: float(v) for k, v in metrics.items()},
            partial=partial, unread=merged.unread_labels, components_w=watts)

    def totals(self) -> Totals:
        return Totals(self.cumulative_j, self.cumulative_g, self.cumulative_cost)

    def rate_per_step(self) -> Totals | None:
        """What a training step costs, its share of the evaluations included: the median training cost per step
        of the recent intervals (the first, with its warm-up and data loading, only while it is the only one),
        plus the median of the recent evaluations' costs (before the first, its estimate) spread over the steps
        from one evaluation to the next (the framework's schedule where it says, else the recent evaluations'
        spacing). Training and evaluations apart, the rate is the same whatever the logging cadence (points every
        few steps leave the evaluations out of most intervals) and whatever the evaluations' spacing: with
        validations 4 and 23 steps apart, a median of the cycles between them took one or the other (3.5 J or
        1.4 J a step for a true 1.7)."""
        intervals = self._recent.settled() or self._recent.items
        if not intervals:
            return None
        j = statistics.median(joules / steps for steps, joules in intervals)
        eval_j = statistics.median(self._eval_costs) if self._eval_costs else self._last_eval_j
        if eval_j > 0:
            period = self.evaluation_period() or self._period_seen()
            if period:
                j += eval_j / period
        g_per_j = self.cumulative_g / self.cumulative_j if self.cumulative_j > 0 else 0.0
        cost = None if self.cumulative_cost is None else (
            j * self.cumulative_cost / self.cumulative_j if self.cumulative_j > 0 else 0.0)
        return Totals(j, j * g_per_j, cost)

    def stop_validates(self, kind: Kind | None, at: int | None = None) -> bool:
        """Whether a stop decided at a point of ``kind`` (``None``: a check between points) makes the framework
        run one more evaluation before training ends. A stop decided at an evaluation or at an epoch's end
        never does: the loop ends there (an evaluation due at that epoch's end is counted as due, not here)."""
        return self.validates_on_stop and kind not in (Kind.EVALUATION, Kind.EPOCH)

    def stop_cost(self, kind: Kind | None = None, at: int | None = None) -> Totals:
        """What a stop decided now still costs: the step that runs before it takes effect (a point due at a
        step is taken as the next one starts; between points, a loop may finish its step), none at an evaluation
        or an epoch's end (the loop ends there), and, where the framework validates on stopping (Lightning's loop
        does, within a training epoch that validates), a validation as costly as the last one."""
        nothing = Totals(0.0, 0.0, None if self.cumulative_cost is None else 0.0)
        cost = nothing if kind in (Kind.EVALUATION, Kind.EPOCH) else self.rate_per_step() or nothing
        return cost + self._as_totals(self._last_eval_j) if self.stop_validates(kind, at) else cost

    def _as_totals(self, joules: float) -> Totals:
        """Joules with the run's own emissions and cost per joule."""
        share = joules / self.cumulative_j if self.cumulative_j > 0 else 0.0
        return Totals(joules, self.cumulative_g * share,
                      None if self.cumulative_cost is None else self.cumulative_cost * share)

    def _period_seen(self) -> float | None:
        """The recent evaluations' mean spacing in steps, else, after the first, the first cycle's steps (a cycle
        after a resume starts at the checkpoint, not at an evaluation: too short to tell)."""
        steps = self._eval_steps
        if len(steps) > 1 and steps[-1] > steps[0]:
            return (steps[-1] - steps[0]) / (len(steps) - 1)
        return float(self._last_cycle_steps) if self._last_cycle_steps and not self._resumed_cycle else None

    def next_check_step(self, step: int) -> int | None:
        """The step of the next logging point or budget step check after ``step``; no cadence here: ``None``."""
        return None

    def next_step_check(self, step: int) -> int | None:
        """The step of the next budget step check after ``step``; none here: ``None``."""
        return None

    def evaluation_period(self) -> float | None:
        """The steps from one evaluation to the next, where the framework's schedule says (Lightning)."""
        return None

    def next_evaluation(self, step: int) -> float | None:
        """The step the next evaluation after ``step`` is expected at: evaluations come every so many steps (the
        last two's period; after the first, its step: a step early on a 0-based axis, which errs on the safe
        side). A framework that knows its schedule says so instead (Lightning)."""
        steps = self._eval_steps
        if not steps:
            return None
        return steps[-1] + max(steps[-1] - steps[-2] if len(steps) > 1 else steps[-1], 1)

    def remaining_steps(self, step: int) -> float | None:
        if self.max_steps is None or self.max_steps == float("inf"):
            return None
        return max(self.max_steps - step, 0.0)

    def progress(self, step: int, metrics: Mapping[str, float] | None = None,
                 so_far: Totals | None = None, kind: Kind | None = None) -> Progress:
        """What a stopper is shown at a point of ``kind`` (``None``: a check between points) at ``step``."""
        # before the first evaluation, where its cost is estimated (Lightning's sanity check) and its step is not
        # known, one is reserved at every check until then: a budget stops before an evaluation it could not pay for
        estimated = not self._eval_steps and self._last_eval_j > 0
        nxt = self.next_evaluation(step)
        # the next check: a logging point or step check (a stop there still costs a step, and Lightning's
        # validation), or the next evaluation where it comes first (at one step, the evaluation runs first)
        at = self.next_check_step(step)
        between = at is not None and (nxt is None or at < nxt)
        return Progress(so_far or self.totals(), step, dict(metrics or {}), metrics is not None,
                        self.rate_per_step(), self.remaining_steps(step), self.evaluations, self.stop_cost(kind),
                        self.stop_cost(None, at) if between else self.stop_cost(Kind.EVALUATION),
                        step if estimated and nxt is None else nxt,
                        self._as_totals(self._last_eval_j) if self._eval_steps or estimated else None,
                        self._as_totals(self._evaluations_j),
                        evaluation_next=nxt is not None and (q := self.next_step_check(step)) is not None and nxt <= q,
                        setup=self._setup, first_step=self._first_step if self._setup is not None else None)

    def frame(self):  # -> pandas.DataFrame
        import pandas as pd

        return pd.DataFrame([r.row() for r in self.records])

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable totals and counters, so a resumed run continues instead of restarting at zero."""
        run = self.run or (self.sink.run_ref if self.sink is not None else None)
        return {"cumulative_j": self.cumulative_j, "cumulative_g": self.cumulative_g,
                "cumulative_cost": self.cumulative_cost, "stage_counts": dict(self.stage_counts),
                "evaluations": self.evaluations, "points": self.points, "epoch": self.current_epoch,
                "step_offset": self.step_offset, "last_logged_step": self.last_logged_step,
                "records": [r.to_json() for r in self.records], "run": asdict(run) if run is not None else None,
                "local_id": self.local_id, "since_eval": self._since_eval.state_dict(),
                "evaluations_j": self._evaluations_j, "last_eval_j": self._last_eval_j, "epoch_part": self._epoch_part,
                "time_s": self.run_time_s()}

    def run_time_s(self) -> float:
        """The run's time so far: its fits', each from its start to its end (the time between them not counted)."""
        started = getattr(self, "_t_start", None) if getattr(self, "started", False) else None
        ended = getattr(self, "_end_s", None)  # the end under way: its wait for MLflow is not the run's time
        return (ended if ended is not None else time.monotonic()) - started if started is not None else \
            self.time_before_s

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from green_callbacks.sinks import RunRef

        self.cumulative_j = float(state["cumulative_j"])
        self.cumulative_g = float(state["cumulative_g"])
        self.cumulative_cost = state.get("cumulative_cost")
        self.stage_counts = dict(state.get("stage_counts", {}))
        for key in ("evaluations", "points", "step_offset", "last_logged_step"):
            setattr(self, key, int(state.get(key, getattr(self, key))))
        self.current_epoch = int(state.get("epoch", self.current_epoch))
        self.time_before_s = float(state.get("time_s", 0.0))
        if getattr(self, "started", False) and getattr(self, "_fit_start", None) is not None:
            self._t_start = self._fit_start - self.time_before_s  # restored once this fit had begun
        self.records = [IntervalRecord.from_json(r) for r in state.get("records", [])]
        self._tagged_methods = run_methods(self.records)  # the tags the run was given: its weakest
        self._outputs_folder = None  # the records written before are not these: those files are kept aside
        self.local_id = state.get("local_id", self.local_id)
        evaluations = [r for r in self.records if r.kind is Kind.EVALUATION]  # (an epoch's record repeats its eval_j)
        self._evaluations_j = float(state.get("evaluations_j", sum(r.eval_j for r in evaluations)))
        self._last_eval_j = float(state.get("last_eval_j", evaluations[-1].eval_j if evaluations else 0.0))
        self._eval_steps = [r.step - self.step_offset for r in evaluations][-(RATE_WINDOW + 1):]
        self._eval_costs = [r.eval_j for r in evaluations][-RATE_WINDOW:]
        if self.records:
            self._at_start = False
            self._last_point_step = self.records[-1].step - self.step_offset
            self._since_eval = Since.from_state(state.get("since_eval"), self._last_point_step)
        if state.get("run") and self.run is None:
            self.run = RunRef(**state["run"])
        self._params_logged = self.run is not None
        self._restored_epoch = state.get("epoch_part")
        self._resumed_cycle = True
        self._restored = True
