"""Points: where a run is cut into intervals, and what is logged and decided there.

A point closes the meter's ``interval`` window (and the epoch's and the evaluation's where they end
there) with one sensor read, gathers the ranks' windows in one all-gather, adds the merged interval
to the ledger, logs the point's metrics at the trainer's global step (rank 0) and asks the stoppers.
Between evaluations a point falls due every N training steps: the cadence lives here too, at the
cost of a few comparisons and integer divisions per step.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from green_callbacks import __version__
from green_callbacks.accounting import Accountant
from green_callbacks.decisions import FIRST_STEPS
from green_callbacks.distributed import RankInfo, gather
from green_callbacks.meter import EnergyMeter, Measurement
from green_callbacks.policies import Decision, Totals
from green_callbacks.process import never_raises, warn_once
from green_callbacks.ranks import Merged, merge_ranks, window_payload
from green_callbacks.records import MEASURED_PREFIXES, IntervalRecord, Kind, device_tags, point_metrics, run_facts
from green_callbacks.sensors.base import Method, log

CALIBRATION_STEPS = 10  # steps timed at the start to turn log_every_s into a step count


class PointHost:
    """The points half of :class:`~green_callbacks.tracker.EnergyTracker`: the step cadence, the point
    itself (windows closed, ranks gathered, the ledger), the metric contract's logging, the decision."""

    meter: EnergyMeter | None
    rank: RankInfo
    sink: Any
    accountant: Accountant
    started: bool
    efficiency_metrics: Sequence[str] | None
    log_every_s: float
    last_window: Measurement | None
    _every: int | None
    step_periods: tuple[int, ...]
    steps_from_zero: bool
    _calibration: tuple[int, float, int] | None  # the first step's, its time, the steps seen since
    _last_step_seen: int
    _first_step: int = -1  # the first training step seen, where a budget is attached (see ``on_step``)
    wants_first_steps: bool
    _due: int | None = None  # a logging point due at this step, not yet taken (set per run by start)
    _eval_window: Measurement | None
    _epoch_closed_at: int
    _finishing_status: str | None
    _held: tuple[int, dict[str, float]] | None = None  # a checkpoint point's metrics, logged with the next point
    _cumulative_kind: Kind | None = None  # the kind of point the cumulative series was last logged at

    @never_raises
    def on_step(self, step: int, batch: Any = None) -> Decision | None:
        """After every optimizer step (or micro-batch, ``batch`` counted for throughput): a logging point every
        N steps, and budget checks where asked.

        A step where nothing is due costs a few comparisons and integer divisions. A logging point that falls
        due is taken at the start of the next step (:meth:`before_step`), unless an evaluation or an
        epoch end at this same step takes it first: one point, and one cumulative value, per step.
        """
        if self.meter is None:
            return None
        if batch is not None:
            self.count_batch(batch)  # its own guard: a batch it cannot count costs the count, not the step's checks
        previous = self._last_step_seen
        if step == previous:  # another micro-batch of the same optimizer step
            return None
        self._last_step_seen = step
        if previous < 0 and self.wants_first_steps and not self.meter.is_open(FIRST_STEPS):
            # a budget's first interval is the steps', not the set-up's, and its checks between points before the
            # first point know no rate per step: the steps' own joules from here (after the first step, its warm-up
            # and the set-up before it left out) give both
            self.meter.begin(FIRST_STEPS)
            self._first_step = step
            # what points booked of training by now (a resumed run's before this one; a sanity check is no point's)
            self._booked_at_first = self.totals() - self._as_totals(self._evaluations_j - self._trial_j)
        # every N steps counted: after step N-1, 2N-1... on a 0-based axis (Lightning logs there), N, 2N... on HF's;
        # on an axis that moves by more than 1 (a plain loop's samples or tokens), at the first step past a multiple
        counted = step + self.steps_from_zero
        since = counted - 1 if not 0 <= previous < step else previous + self.steps_from_zero  # the first: itself
        if self._every is None:
            self._calibrate(step)
        elif counted // self._every > since // self._every:
            self._due = step
        if self.step_periods and (due := tuple(n for n in self.step_periods if counted // n > since // n)):
            return self._check_between_points(step, due)
        return None

    @never_raises
    def before_checkpoint(self) -> Decision | None:
        """A checkpoint is about to be saved (collective: every rank saves): the logging point at the last
        step seen, unless a point was taken there, so the totals it saves hold everything until it and a run
        resumed from it neither loses the stretch since the previous point nor labels it wrongly.

        Its metrics are held back until the next point (or the end): Lightning saves a step's checkpoint
        before that step's validation, whose point then logs the step's cumulative series with the
        validation in it (``energy/cumulative_j`` is logged once per step)."""
        if self.meter is None or not self.started:
            return None
        step = self._last_step_seen_or_point()
        if step <= self._last_point_step and self.records:
            if self.meter.is_open("epoch"):  # a point at this step already: the epoch so far, for a resume
                self._hold_epoch_part(gather(self._epoch_so_far(self.meter.end_many(["epoch"], keep=("epoch",))[0])))
            return None
        return self._point(Kind.POINT, step, hold=True)

    def _epoch_so_far(self, so_far: Measurement) -> dict[str, Any]:
        """The open epoch so far, read exactly (a peek's estimate made a resumed epoch 0.3 J of 65 too costly)."""
        return {"epoch_so_far": window_payload(so_far, self.rank.rank, self.rank.node),
                "epoch_start_unix": so_far.start_unix}

    def _hold_epoch_part(self, payloads: Sequence[Mapping[str, Any]]) -> None:
        """Every rank's open epoch so far (gathered at a checkpoint), kept for the checkpoint's state."""
        self.hold_epoch_part(merge_ranks([p["epoch_so_far"] for p in payloads]), payloads[0]["epoch_start_unix"])

    @never_raises
    def before_step(self, step: int | None = None) -> Decision | None:
        """Before a (micro-)batch: the logging point that fell due at the previous step, if nothing took it.

        ``step``: the step this batch goes with, where a step can span several micro-batches (Lightning's
        ``accumulate_grad_batches``: the logger's step is that of the optimizer step a micro-batch leads
        to); the point waits until a batch of a later step starts, so it never cuts an accumulation."""
        if self._due is None or self.meter is None or (step is not None and step <= self._due):
            return None
        return self._point(Kind.POINT, self._due)

    def next_check_step(self, step: int) -> int | None:
        """The step of the next logging point or budget step check after ``step`` (``None``: neither comes). While
        ``log_every_s`` is being turned into steps (the first ten of a fit) no point is assumed: taking one at every
        step reserved a step at each check, an epoch's where the step axis is the epoch (a plain loop without
        ``step()``), which stopped a 30 J budget at 13 J of 26."""
        return self._next_multiple(step, [*self.step_periods, *([self._every] if self._every else [])])

    def next_step_check(self, step: int) -> int | None:
        """The step of the next budget step check (``check_every_n_steps``) after ``step``, ``None`` without any."""
        return self._next_multiple(step, self.step_periods)

    def _next_multiple(self, step: int, periods: Sequence[int]) -> int | None:
        counted = step + self.steps_from_zero
        return min((counted // n + 1) * n for n in periods) - self.steps_from_zero if periods else None

    def _calibrate(self, step: int) -> None:
        """Turn ``log_every_s`` into a step count every rank agrees on (the slowest rank's step time)."""
        if self._calibration is None:
            self._calibration = (step, time.monotonic(), 0)
            return
        start, t0, seen = self._calibration
        self._calibration = (start, t0, seen + 1)
        # ten steps seen (on an axis that moves by more than 1: per unit of it); an axis that starts again (a loop's
        # batch index, each epoch from 0) is timed once a step lies past the first one
        if seen + 1 >= CALIBRATION_STEPS and step > start:
            step_s = max(gather((time.monotonic() - t0) / (step - start)))
            self._every = max(1, round(self.log_every_s / step_s)) if step_s > 0 else CALIBRATION_STEPS

    def _point(self, kind: Kind, step: int, metrics: dict[str, float] | None = None,
               collective: bool = True, epoch_ends: bool = False, hold: bool = False) -> Decision | None:
        """Close the interval since the previous point (and the epoch, at an epoch end or at an evaluation
        that ``epoch_ends`` it); log; decide."""
        assert self.meter is not None
        self._due = None
        node = (self.rank.rank, self.rank.node)
        # the windows this point closes, at one instant with one sensor read
        epoch_ends = kind is Kind.EPOCH or (epoch_ends and self.meter.is_open("epoch"))
        # a checkpoint's point inside an epoch: the epoch's part so far, read with the interval, stays open
        held_epoch = hold and not epoch_ends and self.meter.is_open("epoch")
        names = ["interval", *(["epoch"] if epoch_ends or held_epoch else []),
                 *(["evaluation"] if kind is Kind.EVALUATION and self.meter.is_open("evaluation") else []),
                 *([FIRST_STEPS] if self.meter.is_open(FIRST_STEPS) else [])]  # (its rate is no longer needed)
        closed = dict(zip(names, self.meter.end_many(names, reopen=("interval",), keep=("epoch",) if held_epoch
                                                     else ()), strict=True))
        interval, epoch_m = closed["interval"], closed.get("epoch") if epoch_ends else None
        self.last_window = epoch_m or self.last_window
        eval_m = closed.get("evaluation", self._eval_window) if kind is Kind.EVALUATION else None
        self._eval_window = None
        payload: dict[str, Any] = {
            "interval": window_payload(interval, *node),
            "epoch": window_payload(epoch_m, *node) if epoch_m is not None else None,
            "eval": window_payload(eval_m, *node) if eval_m is not None else None,
            # what the devices are: for the run's tags at its first point and its end (on rank 0; the other ranks
            # cannot know when rank 0 starts a run anew, a resume into another run)
            "names": {**self.meter.describe(), "gpu_ids": dict(self.meter.ids), "where": {"node": self.rank.node}}
            if not (self._params_logged and self.rank.is_zero) or kind is Kind.END else None,
            "work": self.take_work()}
        if held_epoch:
            payload.update(self._epoch_so_far(closed["epoch"]))
        if FIRST_STEPS in closed:
            payload["first_steps"] = window_payload(closed[FIRST_STEPS], *node)
        payloads = gather(payload) if collective else [payload]
        trial_j = self._trial_j  # an evaluation before training (the sanity check) in this interval: not training
        merged = merge_ranks([p["interval"] for p in payloads])
        epoch_merged = merge_ranks([p["epoch"] for p in payloads]) if epoch_m is not None else None
        evals = [p["eval"] for p in payloads if p["eval"] is not None]
        eval_j, eval_s = (merge_ranks(evals).total_j, max(e["duration_s"] for e in evals)) if evals else (0.0, 0.0)
        if self._setup is None and all(p.get("first_steps") is not None for p in payloads):  # (before the interval
            # is booked: its training is the steps', the set-up left out of the recent rate)
            training_j = self.cumulative_j + merged.total_j - self._evaluations_j - eval_j
            fp = self.accountant.footprint(merged.total_j, interval.start_unix,
                                           interval.start_unix + interval.duration_s)
            share = 1.0 / merged.total_j if merged.total_j > 0 else 0.0
            self.learn_setup(merge_ranks([p["first_steps"] for p in payloads]).total_j, step, Totals(
                training_j, training_j * fp.g_co2e * share, None if fp.cost is None else training_j * fp.cost * share))
        self._say_shared(merged)
        records = self.close_interval(kind, step, merged, interval, self.meter.t0_s, epoch_merged, epoch_m,
                                      (eval_j, eval_s), metrics or {}, partial=self._finishing_status is not None
                                      and self._finishing_status != "FINISHED")
        self._epoch_part = None  # of an earlier checkpoint: never saved with this point's totals
        if held_epoch:
            self._hold_epoch_part(payloads)
        if epoch_m is not None:
            self._epoch_closed_at = len(self.records)  # the next epoch starts here unless another point comes
        self._log_point(records, [p["names"] for p in payloads if p["names"] is not None],
                        self.throughput_of([p["work"] for p in payloads], merged.total_j - eval_j - trial_j), hold)
        if self.sink is not None:
            self.sink.interval_end()
        return self._decide(records[0], collective)

    def _say_shared(self, merged: Merged) -> None:
        """A GPU measured by several ranks (counted once): said once, on rank 0."""
        if merged.shared and self.rank.is_zero:
            ident, ranks = next(iter(merged.shared.items()))
            warn_once(self, "shared-gpu", f"{len(merged.shared)} GPU(s) are measured by more than one "
                      f"rank ({ident} by ranks {', '.join(map(str, ranks))}); each is counted once, from a rank that "
                      "read it. Under DDP each rank measures its own GPU with gpus=\"auto\"; "
                      "gpus=\"all\" or a list names the same GPUs on every rank of a node.")

    _unseen_efficiency: set[str] | None = None  # efficiency_metrics no evaluation logged yet (None: not asked)

    def _check_efficiency_names(self, records: Sequence[IntervalRecord]) -> None:
        """A name in ``efficiency_metrics`` that the evaluations do not log gave no metric and no word: said once,
        at the first evaluation that logged metrics without it, with the names it logged."""
        if self.efficiency_metrics is None:
            return
        if self._unseen_efficiency is None:
            self._unseen_efficiency = set(self.efficiency_metrics)
        for record in records:
            if record.kind is Kind.EVALUATION and record.metrics and self._unseen_efficiency:
                missing = sorted(self._unseen_efficiency - set(record.metrics))
                self._unseen_efficiency = set()
                for name in missing:
                    close = difflib.get_close_matches(name, list(record.metrics), n=1)
                    log.warning("green-callbacks: efficiency_metrics names %r, which the evaluation did not log (it "
                                "logged %s)%s: no efficiency/%s_per_kj until it does.", name, sorted(record.metrics),
                                f"; did you mean {close[0]!r}?" if close else "", name)

    def _log_point(self, records: Sequence[IntervalRecord], names: Sequence[Mapping[str, Mapping[str, str]]],
                   throughput: Mapping[str, float], hold: bool = False) -> None:
        """The metric contract at one point (see ``records``): its records' metrics (an evaluation's and the
        epoch's where an evaluation ends the epoch) and throughput, in one record at one step; rank 0 only.
        ``hold``: keep them for the next point, which logs them with its own at the same step (see
        :meth:`before_checkpoint`), or first, at their own step, where it comes later."""
        if not self.rank.is_zero:
            return
        self._check_efficiency_names(records)  # (with MLflow off too: a typo in a config is one all the same)
        if self.sink is None:
            return
        first = records[0]
        if not self._params_logged:
            self._params_logged = True
            params, tags = run_facts(self.accountant.as_params(), self.rank.world_size, __version__, first, names)
            self.sink.log_params(params)
            self.sink.set_tags(tags)
            self._tagged_methods = {k.removeprefix("green.method."): v for k, v in tags.items()
                                    if k.startswith("green.method.")}
            self._tag_weaker_methods(self.records)  # a run resumed into a new run: the checkpoint's records too
            self._device_tags = device_tags(names)
        elif first.kind is Kind.END and len(names) == self.rank.world_size:  # every rank's: not an end cut short
            tags = device_tags(names)
            changed = {k: v for k, v in tags.items() if self._device_tags.get(k) != v}
            if changed:
                self.sink.set_tags(changed)
            self._device_tags = tags
        self._tag_weaker_methods(records)
        held, self._held = self._held, None
        if held is not None and held[0] != first.step:
            self.sink.log_metrics(held[1], step=held[0])
            self.last_logged_step = max(self.last_logged_step, held[0])
            held = None
        out = dict(held[1]) if held is not None else {}  # the held point's, at this step: this one's supersede
        # the cumulative series once per step, at its first point; where that was a logging point taken at once (a
        # plain loop's step(), which has no next-batch hook to wait for) and an evaluation or an epoch's end follows
        # at the same step, again with what they spent: the series ended an evaluation short of the total
        after_point = first.step == self.last_logged_step and self._cumulative_kind is Kind.POINT and \
            first.kind in (Kind.EVALUATION, Kind.EPOCH)
        out.update(point_metrics(first, first.step > self.last_logged_step or after_point, self._last_point_j,
                                 self.efficiency_metrics))
        if "energy/cumulative_j" in out:
            self._cumulative_kind = first.kind
        for record in records[1:]:
            out.update(point_metrics(record, False, self._last_point_j, self.efficiency_metrics))
        if (first.step > self.last_logged_step or held is not None) and not first.unread:  # once per step, as
            out.update(throughput)  # the cumulative series; not per joule where some device's joules went unread
        out = self.measured_only(out)
        if hold:
            self._held = (first.step, out)
            if out:  # on disk before the hook returns: a kill before the next point loses nothing
                self.sink.hold_metrics(out, step=first.step)
        elif out:
            self.sink.log_metrics(out, step=first.step)
            self.last_logged_step = max(self.last_logged_step, first.step)

    def _tag_weaker_methods(self, records: Sequence[IntervalRecord]) -> None:
        """Keep the ``green.method.*`` tags the run's weakest so far: a GPU lost, or switched from its counter to
        sampling, after the first point makes its component's tag say so (the tags were the first point's)."""
        weaker = {}
        for record in records:
            for component, method in record.methods.items():
                tagged = self._tagged_methods.setdefault(component, method)  # resumed: as the checkpoint's run
                if Method(method).rank > Method(tagged).rank:
                    self._tagged_methods[component] = weaker[f"green.method.{component}"] = method
        if weaker:
            self.sink.set_tags(weaker)

    def _log_held(self) -> None:
        """Log a held point's metrics now (the run ends without another point)."""
        held, self._held = self._held, None
        if held is not None and self.sink is not None and held[1]:
            self.sink.log_metrics(held[1], step=held[0])
            self.last_logged_step = max(self.last_logged_step, held[0])

    def _log(self, metrics: Mapping[str, float], step: int, ours: bool = True) -> None:
        metrics = self.measured_only(metrics) if ours else metrics  # (the user's own names are the user's)
        if self.rank.is_zero and self.sink is not None and metrics:
            self.sink.log_metrics(metrics, step=step + self.step_offset)

    def measured_only(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` without the energy and what follows from it (emissions, cost, power, efficiency, throughput,
        the projection) where nothing is measured (one process, no sensor readable): a 0 J logged as measured put
        the run first in every comparison. A DDP rank 0 without a sensor logs its peers' joules: all kept; where no
        rank measures anything, none."""
        if getattr(self, "job_measurable", True):
            return dict(metrics)
        return {k: v for k, v in metrics.items() if not k.startswith(MEASURED_PREFIXES)}


    def _last_step_seen_or_point(self) -> int:
        return max(self._last_step_seen, self._last_point_step)
