"""Decisions at the run's points: every attached stopper asked, one reduction across ranks, the reason recorded."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from green_callbacks.distributed import RankInfo, gather
from green_callbacks.meter import EnergyMeter
from green_callbacks.policies import Decision, Progress, StopReason, Totals
from green_callbacks.process import never_raises
from green_callbacks.ranks import merge_ranks, window_payload
from green_callbacks.records import IntervalRecord, Kind
from green_callbacks.sensors.base import log
from green_callbacks.stopping import BudgetStopper, Stopper

FIRST_STEPS = "first-steps"  # a window from the first training step seen to the first point (see ``on_step``)


class StopperHost:
    """The stopping half of :class:`~green_callbacks.tracker.EnergyTracker`.

    A stopper decides from what it is shown (:class:`~green_callbacks.policies.Progress`); the
    decision is reduced across DDP ranks here, in one place, so every rank stops at the same step.
    """

    stoppers: list[Stopper]
    step_periods: tuple[int, ...] = ()  # the stoppers' check_every_n_steps: what on_step tests at every step
    stop_decision: Decision | None  # the last stop decided (kept for the user after the training)
    _fits: int  # trainings (and stages) started: a stop belongs to the one it was decided in
    _stop_fit: int | None = None
    rank: RankInfo
    meter: EnergyMeter | None
    sink: Any
    _finishing_status: str | None
    _projected_step: int
    gpus: Any
    measure_cpu: bool
    _eval_steps: list[int]
    _last_eval_j: float
    _evaluations_j: float
    _trial_j: float
    _first_step: int  # the first training step seen, where the first-steps window opened (PointHost.on_step)
    _setup: Totals | None  # what the training cost before its steps, once known (Progress.setup)
    _booked_at_first: Totals  # the training (evaluations left out) booked in points when its first step ended

    _held_by: str | None = None  # what holds back the stop decided in this fit (Lightning's min_epochs), while it does
    _resume_checked = False  # this training, resumed, was checked before its first step (check_resumed)

    @property
    def _stopping(self) -> bool:
        """A stop was decided in this fit: it is being carried out (a later fit, into the same run too, is asked
        again: a budget already spent stops it at its first check). A stop the trainer holds back is not yet:
        the stoppers go on being asked (their statistics logged) until it takes effect."""
        return self.stop_decision is not None and self._stop_fit == self._fits and self._held_by is None

    def stop_held_back(self, kind: Kind | None) -> str | None:
        """What keeps the framework from carrying out a stop decided now, at a point of ``kind``, at its next
        chance (Lightning's ``min_epochs``/``min_steps`` not met: it trains on until they are), or None."""
        return None

    def attach(self, stopper: Stopper) -> None:
        """Ask ``stopper`` at every point (evaluation, epoch end, every N steps) whether to stop."""
        if not isinstance(stopper, Stopper):  # refused before it is kept: a later attach must not trip over it
            raise ValueError(f"attach() takes a stopper: an EfficiencyStopper or a BudgetStopper (or a Lightning/HF "
                             f"EfficiencyEarlyStopping or EnergyBudget), not {stopper!r}")
        if stopper not in self.stoppers:
            if isinstance(stopper, BudgetStopper):
                series = self.accountant.series  # (a series of zeros keeps every emission at 0 as a 0 does)
                fixed = self.accountant.intensity.g_per_kwh if series is None else 0.0 if not any(series.values) \
                    else None
                stopper.validate_against(self.accountant.price_per_kwh, self.accountant.currency, fixed)
            self.stoppers.append(stopper)
            self.step_periods = tuple(s.check_every_n_steps for s in self.stoppers if s.check_every_n_steps)
            self.check_measurable()

    _warned_unmeasured: bool
    _measured_before = False  # something was measured in an earlier stage of this training (fit before test())

    @property
    def measured_in_run(self) -> bool:
        """Whether the run's totals hold measurements: this stage's, or an earlier stage's of the same training."""
        return getattr(self, "job_measurable", True) or self._measured_before

    def settle_measurable(self, configured: bool, measured: bool) -> None:
        """Whether the job measures anything (collective: one all-gather under DDP; a job of MIG slices, none
        measured, logs no 0 J). A setting that offers nothing to measure fails before training; a sensor that
        offered something and failed at its start is a warning."""
        flags = [(configured, measured)] if self.rank.world_size == 1 else gather((configured, measured))
        # a device an earlier stage of this training measured, gone now (off the bus before test()): a fault
        earlier = self._measured_before
        self.job_configured = any(c for c, _ in flags) or earlier
        self.job_measurable = any(m for _, m in flags)
        self._measured_before = earlier or self.job_measurable
        self.check_measurable()
        cannot_act = f"; {', '.join(type(s).__name__ for s in self.stoppers)} cannot act" if self.stoppers else ""
        if not self.job_measurable and earlier and self.rank.is_zero:  # a fault, said at each stage it hits
            log.warning("green-callbacks: nothing can be measured for this stage: the devices measured before are "
                        "gone (gpus=%r, measure_cpu=%r, no GPU readable); its energy is not logged, the run's totals "
                        "stay those measured before%s.", self.gpus, self.measure_cpu, cannot_act)
        elif not self.job_measurable and self.rank.is_zero and not self._warned_unmeasured:
            self._warned_unmeasured = True
            log.warning("green-callbacks: nothing can be measured here (gpus=%r, measure_cpu=%r, no GPU readable): "
                        "no energy, emissions or cost is logged, and the run's green.method.* tags say "
                        "'unavailable'%s. Measure something (gpus='auto' or 'all', measure_cpu=True).", self.gpus,
                        self.measure_cpu, cannot_act)

    def check_measurable(self) -> None:
        """A stopper with nothing measured would never act: say so before the first training step."""
        if self.stoppers and not getattr(self, "job_configured", True):  # (a sensor's fault is a warning)
            raise ValueError(f"{', '.join(type(s).__name__ for s in self.stoppers)} cannot act: nothing is measured "
                             f"here (gpus={self.gpus!r}, measure_cpu={self.measure_cpu!r}, no GPU readable); measure "
                             "something (gpus='auto' or 'all', measure_cpu=True) or remove the stopper")

    def _decide(self, record: IntervalRecord, collective: bool) -> Decision | None:
        """Every stopper's verdict at this point, made identical on all ranks by one reduction."""
        if not self.stoppers or self._finishing_status is not None or self._stopping:
            return None  # nothing to decide, or already stopping
        evaluation = record.kind is Kind.EVALUATION
        progress = self.progress(record.step - self.step_offset, record.metrics if evaluation else None,
                                 kind=record.kind)
        local, stats = None, {}
        for stopper in self.stoppers:
            decision = stopper.check(progress)
            stats.update(stopper.statistics() if evaluation else {})
            local = local or (decision if decision.should_stop else None)
        whole = progress.projected_end
        if record.kind in (Kind.EVALUATION, Kind.EPOCH) and progress.step > self._projected_step \
                and whole is not None and any(isinstance(s, BudgetStopper) for s in self.stoppers):
            self._projected_step = progress.step  # once per step: an evaluation and an epoch end may share one
            stats.update({"projection/energy_j": whole.j, "projection/emissions_g": whole.g,
                          **({"projection/cost": whole.cost} if whole.cost is not None else {})})
        self._log(stats, progress.step)
        return self._agree(local, progress, collective, record.kind)

    _trial_batches = 0  # batches of the evaluation before training (Lightning's sanity check) on this rank

    @never_raises
    def begin_trial_evaluation(self) -> None:
        """An evaluation before training (Lightning's sanity check): measured, to know before the first real one
        what an evaluation costs (a budget stop before it still pays one, where the framework evaluates on
        stopping)."""
        if self.meter is not None and not self.meter.is_open("trial"):
            self.meter.begin("trial")
            self._trial_batches = 0

    def count_trial_batch(self) -> None:
        """A trial batch ended; after the first (its warm-up, cuDNN autotuning or compiling, would make every later
        estimate too high) the batches the estimate is made from begin."""
        if self._trial_batches == 0 and self.meter is not None and self.meter.is_open("trial"):
            self.meter.begin("trial-steady")
        self._trial_batches += 1

    @never_raises
    def end_trial_evaluation(self, batches: float) -> None:
        """The trial evaluation's end (collective): an evaluation of ``batches`` batches a rank is estimated at the
        trial's joules per batch, until a real one is measured."""
        if self.meter is None or not self.meter.is_open("trial"):
            return
        names = ["trial", *(["trial-steady"] if self.meter.is_open("trial-steady") else [])]
        trial, *steady = self.meter.end_many(names)
        node = (self.rank.rank, self.rank.node)
        payloads = gather((window_payload(trial, *node), window_payload(steady[0], *node) if steady else None,
                           self._trial_batches))
        merged = merge_ranks([p[0] for p in payloads])
        if all(p[2] >= 1 for p in payloads) and math.isfinite(batches) and batches > 0 and not self._eval_steps:
            # every rank's steady batches (after the first's warm-up) at their joules per batch; where a trial had
            # one batch (a validation of one batch, num_sanity_val_steps=1), that batch, warm-up and all, stands for
            # the validation: exact for a one-batch validation; for a longer one neither bound (on a GPU the first
            # batch's warm-up can outweigh many later batches; scaled by their number it stopped a run at once)
            if all(p[2] > 1 and p[1] is not None for p in payloads):
                steady = merge_ranks([p[1] for p in payloads]).rank_j  # (a GPU two ranks measure: counted once)
                self._last_eval_j = sum(steady[p[1]["rank"]] / (p[2] - 1) for p in payloads) * batches
            else:
                self._last_eval_j = merged.total_j
        # spent, and in the totals; an evaluation's, not training's: out of the rate and the budget's intervals
        self._evaluations_j += merged.total_j
        self._trial_j += merged.total_j

    def _check_between_points(self, step: int, periods: tuple[int, ...]) -> Decision | None:
        """A budget check between points, for the stoppers whose ``check_every_n_steps`` is in ``periods`` (a
        multiple of it reached at this step): what the open interval cost so far. None once a stop is decided
        (the same on every rank): it was decided once, and is logged once."""
        assert self.meter is not None
        if self._stopping or self._finishing_status is not None:
            return None
        node = (self.rank.rank, self.rank.node)
        peek = self.meter.peek("interval")
        steps = self.meter.peek(FIRST_STEPS) if self.meter.is_open(FIRST_STEPS) else None
        payloads = gather((window_payload(peek, *node), window_payload(steps, *node) if steps is not None else None))
        merged = merge_ranks([p[0] for p in payloads])
        fp = self.accountant.footprint(merged.total_j, peek.start_unix, peek.start_unix + peek.duration_s)
        progress = self.progress(step, None, self.totals() + Totals(merged.total_j, fp.g_co2e, fp.cost))
        if self._setup is None and all(p[1] is not None for p in payloads):
            self.learn_setup(merge_ranks([p[1] for p in payloads]).total_j, step,
                             progress.so_far - (progress.evaluations_so_far or Totals()))
            progress = replace(progress, setup=self._setup,
                               first_step=self._first_step if self._setup is not None else None)
        due = [s for s in self.stoppers if s.check_every_n_steps in periods]
        local = next((d for d in (s.check(progress) for s in due) if d.should_stop), None)
        if progress.rate_per_step is None and all(p[1] is not None for p in payloads) and merged.total_j > 0 \
                and step > self._first_step:
            # no point yet, so no rate: a stop's saving is booked at the training steps' own rate since the first
            # step (not the interval's, whose setup and sanity check spread over a few steps claimed 2876 J saved
            # for about 1300 J), at the interval's emissions and cost per joule
            rate_j = merge_ranks([p[1] for p in payloads]).total_j / (step - self._first_step)
            per_j = Totals(1.0, fp.g_co2e / merged.total_j, None if fp.cost is None else fp.cost / merged.total_j)
            progress = replace(progress, rate_per_step=per_j.scaled(rate_j))
        return self._agree(local, progress, True, None)

    @property
    def wants_first_steps(self) -> bool:
        """Whether a budget is attached: its first interval leaves out the set-up, and a stop before the first point
        books its saving at the steps' own rate; both come from the first-steps window (``PointHost.on_step``)."""
        return any(isinstance(s, BudgetStopper) for s in self.stoppers)

    def learn_setup(self, steps_j: float, step: int, training: Totals) -> None:
        """What the training cost before its steps (``Progress.setup``), from the first-steps window's ``steps_j``
        (every rank) at ``step``: the run's training so far (``training``), less what points had booked when its
        first step ended (a resumed run's training before it), those joules, and one step more at their rate (the
        first step's own, its warm-up beyond that in the set-up). Learnt once a training."""
        training = training - self._booked_at_first  # this training's: a resumed run's totals before it left out
        if self._setup is not None or step <= self._first_step or steps_j <= 0 or training.j <= 0:
            return
        setup_j = max(training.j - steps_j * (1 + 1 / (step - self._first_step)), 0.0)
        self._setup = training.scaled(setup_j / training.j)

    @never_raises
    def check_resumed(self, step: int) -> Decision | None:
        """A training resumed from a checkpoint, before its first step (every rank): do its budgets allow the next
        interval? The checkpoint's state has seen the recent intervals, so a resume after a budget stop, or at the
        edge of its budget, stops here; without this it trained a whole interval past the budget before its first
        check (a 450-J budget resumed at 450 J ended at 562 J). Once per training; a fresh one has shown its
        budgets nothing yet."""
        if self._resume_checked or not getattr(self, "_resuming", False):
            return None
        self._resume_checked = True  # (HF asks at every step's start: after the first, one attribute read)
        budgets = [s for s in self.stoppers if isinstance(s, BudgetStopper)]
        if not budgets or self.meter is None or self._stopping or self._finishing_status is not None:
            return None
        # at the checkpoint's last point, where its last check was (Lightning's step after a resume is one past it):
        # the same state at the same step decides as it did there
        progress = self.progress(self._last_point_step if self.records else step, None)
        local = None
        for stopper in budgets:
            if not stopper.budget.seen_any:  # no state from the checkpoint (added, or its key changed): the run so
                stopper.budget.adopt(progress)  # far is where it starts counting, not one interval it saw
                continue
            saved = stopper.budget.state_dict()
            decision = stopper.check(progress)
            stopper.budget.load_state_dict(saved)  # a look before the first step, not a check: its state stays
            local = local or (decision if decision.should_stop else None)
        return self._agree(local, progress, self.rank.world_size > 1, None)

    def _agree(self, local: Decision | None, progress: Progress, collective: bool,
               kind: Kind | None) -> Decision | None:
        """The decision every rank shares (one all-gather where ``collective``): the lowest deciding rank's, with its
        reason and message on every rank, so rank 0's run says why whichever rank decided."""
        mine = None if local is None else (local.reason.value if local.reason else None, local.message)
        decided = [(rank, d) for rank, d in enumerate(gather(mine) if collective else [mine]) if d is not None]
        if self.stop_decision is not None and self._stop_fit == self._fits:  # held back: the first decision stands
            self._held_by = self.stop_held_back(kind)
            if self._held_by is None:  # the trainer's minimum is met: the stop takes effect at this point
                self._book_stop(progress, progress.stop_cost)
            return self.stop_decision
        if not decided:
            return None
        rank, (reason, message) = decided[0]
        if rank != 0 and collective:  # the same message on every rank (rank 0's needs no saying)
            message = f"{message} (decided on rank {rank})"
        decision = Decision(True, StopReason(reason) if reason else None, message)
        self.stop_decision, self._stop_fit, self._held_by = decision, self._fits, self.stop_held_back(kind)
        if self.rank.is_zero:  # once for the job, as Lightning's own callbacks say it (every rank decided the same)
            log.warning("green-callbacks: stopping: %s%s", decision.message, "" if self._held_by is None else
                        f"; held back by {self._held_by}: the trainer trains on until it is met (a budget can be "
                        "exceeded by then), and the stop takes effect there")
        if self._held_by is None:
            self._book_stop(progress, progress.stop_cost)
        return decision

    def _book_stop(self, progress: Progress, cost: Totals | None) -> None:
        """The stop in the run: its reason and message as tags, and what the rest of the run would have cost at the
        recent rate, less what the stop itself still costs."""
        decision = self.stop_decision
        assert decision is not None
        if self.rank.is_zero and self.sink is not None:
            self.sink.set_tags({"green.stop_reason": decision.reason.value if decision.reason else "other_rank",
                                "green.stop_message": decision.message})
        if progress.rate_per_step is not None and progress.remaining_steps:
            saved = progress.rate_per_step.scaled(progress.remaining_steps) - (cost or Totals())
            if saved.j > 0:  # (a stop a step before the end that brings a validation saves nothing)
                self._log({"energy/saved_j_projected": saved.j, "emissions/saved_g_projected": saved.g}, progress.step)

    def end_held_stop(self, step: int) -> None:
        """The training's end (every rank) with a stop still held back: it took effect here, where the trainer's
        minimum was met between checks (its tags, and the saving this end leaves), or never did (the minimum was
        the run's end)."""
        if self.stop_decision is None or self._stop_fit != self._fits or self._held_by is None:
            return
        held, self._held_by = self._held_by, None
        progress = self.progress(step)  # (the trainer's step: the offset of a run continued is added in logging)
        if progress.remaining_steps:
            self._book_stop(progress, None)
        elif self.rank.is_zero:
            log.warning("green-callbacks: the stop decided (%s) never took effect: %s held the training to its end.",
                        self.stop_decision.message, held)
