"""When to stop: the metric gained per doubling of energy, and energy/carbon/cost budgets. No framework here."""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from green_callbacks.units import ENERGY_J, parse_energy_j, parse_mass_g, parse_money

MODES = ("min", "max")
ON_EXCEED = ("stop", "warn")
log = logging.getLogger("green_callbacks")


class StopReason(str, enum.Enum):
    EFFICIENCY_PLATEAU = "efficiency_plateau"
    DIVERGED = "diverged"
    ENERGY_BUDGET = "energy_budget"
    EMISSIONS_BUDGET = "emissions_budget"
    COST_BUDGET = "cost_budget"


class MonitorError(ValueError):
    """A stopper's monitored metric is not among the evaluation's metrics (``strict=True``).

    A configuration error, not a telemetry fault: it passes through the adapters into the trainer.
    """


@dataclass(frozen=True)
class Decision:
    """A policy's verdict: stop or not, why (an enum for machines, a sentence for people)."""

    should_stop: bool
    reason: StopReason | None = None
    message: str = ""


CONTINUE = Decision(False)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


WINDOW_MAX_POINTS = 128  # evaluations kept in the window; beyond, every other older one is dropped


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The median of the slopes between every pair of points (Sen 1968): one outlier moves it little."""
    slopes = sorted((ys[b] - ys[a]) / (xs[b] - xs[a]) for a in range(len(xs)) for b in range(a + 1, len(xs))
                    if xs[b] != xs[a])
    if not slopes:
        return None
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


class GainThreshold:
    """The smallest worthwhile gain of a metric, written as a person reads it.

    ``"<number>% per doubling"`` (relative: the metric improves by less than that share of its
    value when the energy spent doubles; needs a positive metric), ``"<number> per doubling"`` (the
    same in the metric's units) or ``"<number> per <energy unit>"`` (an exchange rate: metric units
    per J, kJ, MJ, Wh, kWh or MWh, which depends on the hardware's power).
    """

    FORMS = ('"0.5% per doubling"', '"0.002 per doubling"', '"0.1 per kWh"')
    _TEXT = re.compile(r"^\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*per\s+([A-Za-z]+)\s*$")

    def __init__(self, text: str) -> None:
        match = self._TEXT.match(text) if isinstance(text, str) else None
        unit = match.group(3) if match else ""
        per = "doubling" if unit.lower() == "doubling" else next(
            (u for u in ENERGY_J if unit == u or (unit.lower() == u.lower() and u not in ("MJ", "MWh"))), None)
        if match is None or per is None or (match.group(2) and per != "doubling"):
            raise ValueError(f"min_gain={text!r} is not a gain threshold; write one of {', '.join(self.FORMS)}: a "
                             f"number >= 0, '%' only per doubling, energy units {', '.join(ENERGY_J)}")
        self.text = " ".join(text.split())
        self.value = float(match.group(1))
        self.relative = bool(match.group(2))
        self.per = per
        self.unit_j = ENERGY_J.get(per)

    def name(self, monitor: str) -> str:
        """The statistic's metric name, its unit in the name: ``stopping/val_acc_gain_pct_per_doubling``."""
        return f"stopping/{monitor}_gain_{'pct_' if self.relative else ''}per_{self.per.lower()}"

    def name_to_end(self, monitor: str) -> str:
        """The gain left to the run's end, when less than a doubling of energy is left: ``..._gain_pct_to_end``."""
        return f"stopping/{monitor}_gain_{'pct_' if self.relative else ''}to_end"

    def describe(self, statistic: float) -> str:
        """``"0.21 % per doubling of energy"``, ``"0.3 per kWh"``."""
        return f"{statistic:.4g}{' %' if self.relative else ''} per {self.per}" + (
            " of energy" if self.unit_j is None else "")


class EfficiencyPlateau:
    """Stop when spending more energy no longer buys a worthwhile gain of the monitored metric.

    At each evaluation the pair (cumulative joules, metric) joins a window that holds the
    evaluations of the last doubling of energy (those with at least half of today's joules). The
    gain is the Theil–Sen slope of the metric, in its improving direction, against log2(energy)
    over that window: what the last doubling of energy bought, fitted so that one noisy evaluation
    does not decide. With a relative threshold (``"1% per doubling"``, the default) the slope is
    taken of log2(metric), so the gain is the metric's relative change per doubling, ``2**slope - 1``:
    a dimensionless elasticity, the same whatever the power of the hardware or the metric's unit.
    ``patience`` evaluations in a row at or below the threshold stop the run; a perfectly flat
    metric gains exactly 0 and stops. No decision is made before the energy has doubled since the
    first evaluation and the window holds ``min_evaluations`` evaluations (the warm-up).

    Where the run's end is known (``final_j``: the energy projected at ``max_steps``) and less than a
    doubling of energy is left, a doubling can no longer be bought: what is at stake is the gain
    over the doublings left, ``gain x log2(final_j / cumulative_j)``, and that is held against
    ``min_gain`` instead (per-doubling thresholds; an exchange rate per kWh is left as it is). So a
    run still gaining 2 % per doubling stops once what is left of it would buy at most 1 %: the
    smallest gain worth any energy, as ``min_delta`` is for Lightning's ``EarlyStopping``.

    A non-finite metric is skipped with one warning; ``patience`` of them in a row are a divergence.

    Args:
        monitor: the metric's name (for messages and the statistic's name).
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        min_gain: the smallest worthwhile gain, see :class:`GainThreshold`.
        patience: evaluations in a row at or below ``min_gain`` (or not finite) before stopping.
        min_evaluations: the fewest evaluations in the window for a decision.
    """

    slope = staticmethod(theil_sen_slope)  # the estimator; benchmarks/stopping.py compares least squares

    def __init__(self, monitor: str, mode: str = "max", min_gain: str = "1% per doubling", patience: int = 3,
                 min_evaluations: int = 4) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must name a validation metric, like 'val_acc'")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose 'max' (accuracy-like) or 'min' (loss-like)")
        self.monitor = monitor
        self.mode = mode
        self.min_gain = GainThreshold(min_gain)
        self.patience = _check_int("patience", patience, 1)
        self.min_evaluations = _check_int("min_evaluations", min_evaluations, 2)
        self.window: list[tuple[float, float]] = []  # (cumulative joules, metric) of the last doubling
        self.first_j: float | None = None
        self.wait = 0  # evaluations in a row at or below the threshold
        self.bad = 0  # non-finite metrics in a row
        self.seen = False  # whether any evaluation has reported the metric
        self.gain: float | None = None  # the statistic at the latest evaluation, None until it decides
        self.gain_to_end: float | None = None  # the gain the rest of the run can buy, where under a doubling is left
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def update(self, value: float, cumulative_j: float, final_j: float | None = None) -> Decision:
        """One evaluation's metric, the run's cumulative joules at it and, where known, at the run's end."""
        self.gain = self.gain_to_end = None
        self.seen = True
        value = float(value)
        if not math.isfinite(value):
            self.bad += 1
            self._warn_once("nan", "EfficiencyEarlyStopping: %s=%s at an evaluation; skipped (%d such evaluations in "
                            "a row stop the run as diverged)", self.monitor, value, self.patience)
            if self.bad >= self.patience:
                return Decision(True, StopReason.DIVERGED, f"{self.monitor} was not finite ({value}) at {self.bad} "
                                                           "evaluations in a row: training diverged")
            return CONTINUE
        self.bad = 0
        if not (math.isfinite(cumulative_j) and cumulative_j > 0):
            self._warn_once("energy", "EfficiencyEarlyStopping: no energy measured yet at an evaluation "
                            "(%r J); it is not used", cumulative_j)
            return CONTINUE
        if self.min_gain.relative and value <= 0:
            self._warn_once("sign", "EfficiencyEarlyStopping: %s=%g; min_gain=%r is relative and needs a positive "
                            "metric, so this evaluation is not used (an absolute threshold such as '0.002 per "
                            "doubling' uses every value)", self.monitor, value, self.min_gain.text)
            return CONTINUE
        if self.first_j is None:
            self.first_j = cumulative_j
        self.window = [p for p in self.window if 2 * p[0] >= cumulative_j] + [(cumulative_j, value)]
        if len(self.window) > WINDOW_MAX_POINTS:
            self.window = self.window[::-1][::2][::-1]  # every other one, keeping the latest
        if 2 * self.first_j > cumulative_j or len(self.window) < self.min_evaluations:
            return CONTINUE
        self.gain = self._gain()
        if self.gain is None:
            return CONTINUE
        left = self._doublings_left(cumulative_j, final_j)
        if left is not None:
            self.gain_to_end = self.gain * left
        at_stake = self.gain if self.gain_to_end is None else self.gain_to_end
        self.wait = self.wait + 1 if at_stake <= self.min_gain.value else 0
        if self.wait >= self.patience:
            bought = (f"{self.monitor} gained {self.min_gain.describe(self.gain)} over the last "
                      f"{len(self.window)} evaluations")
            if left is not None and self.gain > self.min_gain.value:
                bought += (f", and the {left:.2f} doublings of energy left to the run's end would buy "
                           f"{self.gain_to_end:.4g}{' %' if self.min_gain.relative else ''}")
            return Decision(True, StopReason.EFFICIENCY_PLATEAU,
                            f"{bought}, at or below min_gain={self.min_gain.text!r} for {self.wait} evaluations "
                            "in a row")
        return CONTINUE

    def _doublings_left(self, cumulative_j: float, final_j: float | None) -> float | None:
        """Doublings of energy left to the run's end, where fewer than one (per-doubling thresholds only)."""
        if final_j is None or self.min_gain.unit_j is not None or not math.isfinite(final_j):
            return None
        left = math.log2(final_j / cumulative_j) if final_j > cumulative_j else 0.0
        return left if left < 1 else None

    def _gain(self) -> float | None:
        joules = [j for j, _ in self.window]
        values = [v for _, v in self.window]
        if self.min_gain.unit_j is not None:  # an exchange rate: metric units per unit of energy
            slope = self.slope([j / self.min_gain.unit_j for j in joules], values)
        elif self.min_gain.relative:
            slope = self.slope([math.log2(j) for j in joules], [math.log2(v) for v in values])
            slope = None if slope is None else 100 * (2 ** slope - 1)
        else:
            slope = self.slope([math.log2(j) for j in joules], values)
        return None if slope is None else slope if self.mode == "max" else -slope

    def state_dict(self) -> dict[str, Any]:
        return {"window": [list(p) for p in self.window], "first_j": self.first_j, "wait": self.wait,
                "bad": self.bad, "gain": self.gain, "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.window = [(float(j), float(v)) for j, v in state["window"]]
        self.first_j = state["first_j"]
        self.wait, self.bad, self.gain = int(state["wait"]), int(state["bad"]), state["gain"]
        self.seen = bool(state.get("seen", self.first_j is not None or self.bad))


@dataclass(frozen=True)
class Progress:
    """What a stopper is shown at one check (an evaluation, an epoch end, a logging point).

    Args:
        so_far: the whole run's energy, emissions and cost up to now (every rank summed).
        step: the trainer's global step (optimizer steps) at this check.
        metrics: this evaluation's metrics; empty when no new evaluation happened.
        evaluation: whether a new evaluation happened since the previous check.
        rate_per_step: a robust recent cost per training step (``None`` until known).
        remaining_steps: training steps left to the run's end (``None`` when unbounded).
        evaluations: evaluations so far in the run, this one included.
        stop_cost: what a stop decided now still costs before training ends (a step that runs before it
            takes effect; a validation where the framework validates on stopping).
        next_evaluation, evaluation_cost, evaluations_so_far: when the next evaluation is expected (the
            period of the last ones), what the last one cost, and what all of them cost so far.
    """

    so_far: Totals
    step: int
    metrics: Mapping[str, float]
    evaluation: bool
    rate_per_step: Totals | None = None
    remaining_steps: float | None = None
    evaluations: int = 0
    stop_cost: Totals | None = None
    next_evaluation: float | None = None  # the step the next evaluation is expected at, from the last ones
    evaluation_cost: Totals | None = None  # the last evaluation's cost
    evaluations_so_far: Totals | None = None  # what the run's evaluations cost in all (in ``so_far``)

    @property
    def projected_end(self) -> Totals | None:
        """The whole run's totals at its end, at the recent cost per step; ``None`` where either is unknown."""
        if self.rate_per_step is None or self.remaining_steps is None:
            return None
        return self.so_far + self.rate_per_step.scaled(self.remaining_steps)


@dataclass(frozen=True)
class Totals:
    """Energy, emissions and cost together (cost ``None`` without a price)."""

    j: float = 0.0
    g: float = 0.0
    cost: float | None = None

    def __add__(self, other: Totals) -> Totals:
        cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        return Totals(self.j + other.j, self.g + other.g, cost)

    def scaled(self, factor: float) -> Totals:
        return Totals(self.j * factor, self.g * factor, None if self.cost is None else self.cost * factor)

    def __sub__(self, other: Totals) -> Totals:
        cost = None if self.cost is None or other.cost is None else self.cost - other.cost
        return Totals(self.j - other.j, self.g - other.g, cost)


class Budget:
    """Stop before an energy, emissions or cost budget would be exceeded.

    At each check (every point of the run, and every N steps where asked) the next interval's training is
    projected as the largest of the last three intervals' (their evaluations left out), plus an evaluation
    as costly as the last one where the next is expected before the following check (evaluations come
    every so many steps: the period of the last two); if the run so far plus that projection plus what a
    stop then still costs (``stop_cost``: the step that runs before the stop takes effect, the validation
    Lightning runs on stopping) would exceed a budget, it stops now. The overshoot is therefore bounded
    by how much one interval (or an evaluation) exceeds its recent predecessors; before the first
    evaluation its cost is unknown.

    Args:
        energy: joules, or a string with a unit ("2.5 kWh", "900 kJ").
        emissions: grams CO2e, or a string ("300 g", "1.2 kg").
        cost: an amount in the price's currency, or a string ("0.5 EUR").
        on_exceed: ``"stop"`` or ``"warn"`` (log the breach and carry on).
    """

    def __init__(self, energy: float | str | None = None, emissions: float | str | None = None,
                 cost: float | str | None = None, on_exceed: str = "stop") -> None:
        if energy is None and emissions is None and cost is None:
            raise ValueError("a budget needs at least one of energy, emissions, cost")
        if on_exceed not in ON_EXCEED:
            raise ValueError(f"on_exceed={on_exceed!r} is not valid; choose one of {list(ON_EXCEED)}")
        self.energy_j = parse_energy_j("energy", energy) if energy is not None else None
        self.emissions_g = parse_mass_g("emissions", emissions) if emissions is not None else None
        self.cost, self.currency = parse_money("cost", cost) if cost is not None else (None, None)
        self.on_exceed = on_exceed
        self.recent: list[Totals] = []
        self.last_check: Totals = Totals()  # the training (evaluations left out) up to the last check
        self.last_step: int | None = None
        self.gap = 1  # steps between the last two checks at different steps

    def _limits(self) -> list[tuple[StopReason, str, float, Any]]:
        out = []
        if self.energy_j is not None:
            out.append((StopReason.ENERGY_BUDGET, "energy", self.energy_j, lambda t: t.j))
        if self.emissions_g is not None:
            out.append((StopReason.EMISSIONS_BUDGET, "emissions", self.emissions_g, lambda t: t.g))
        if self.cost is not None:
            out.append((StopReason.COST_BUDGET, "cost", self.cost, lambda t: t.cost or 0.0))
        return out

    def describe(self, reason: StopReason, value: float) -> str:
        unit = {StopReason.ENERGY_BUDGET: "J", StopReason.EMISSIONS_BUDGET: "gCO2e",
                StopReason.COST_BUDGET: self.currency or ""}[reason]
        return f"{value:.6g} {unit}".strip()

    def check(self, so_far: Totals, stop_cost: Totals | None = None, progress: Progress | None = None) -> Decision:
        """One check with the run's totals so far (and what stopping costs, see the class); the interval since
        the last check feeds the projection. ``progress``: the check's step and the run's evaluations."""
        evaluations = progress.evaluations_so_far if progress is not None else None
        training = so_far - evaluations if evaluations is not None else so_far
        last = self.last_check  # the first check's: nothing, at no cost where the run has a price
        interval = training - (Totals(last.j, last.g, 0.0) if last.cost is None else last)
        self.last_check = training
        step = progress.step if progress is not None else None
        if step is not None and self.last_step is not None and step > self.last_step:
            self.gap = step - self.last_step  # checks at one step (a step check, then its evaluation's) keep it
        gap = self.gap
        self.last_step = step
        if interval.j > 0:
            self.recent = [*self.recent[-2:], interval]
        if not self.recent:
            return CONTINUE
        nxt = Totals(max(t.j for t in self.recent), max(t.g for t in self.recent),
                     None if so_far.cost is None else max(t.cost or 0.0 for t in self.recent))
        due = Totals()  # an evaluation expected before the next check: it runs before that check can stop
        if progress is not None and progress.next_evaluation is not None and progress.evaluation_cost is not None \
                and step is not None and progress.next_evaluation - step <= max(gap, 1):
            due = progress.evaluation_cost
        stop = stop_cost or Totals()
        for reason, name, limit, get in self._limits():
            if get(so_far) > limit:  # spent before this check came (a budget smaller than the first interval)
                return Decision(True, reason, f"{name} so far {self.describe(reason, get(so_far))} already exceeds "
                                              f"the budget of {self.describe(reason, limit)}: it was spent before "
                                              "this check (checks come at each point; check_every_n_steps checks "
                                              "between them)")
            if get(so_far) + get(nxt) + get(due) + get(stop) > limit:
                evaluation = f" + an evaluation ~{self.describe(reason, get(due))}" if get(due) > 0 else ""
                then = f" + stopping then ~{self.describe(reason, get(stop))}" if get(stop) > 0 else ""
                return Decision(True, reason, f"{name} so far {self.describe(reason, get(so_far))} + next interval "
                                              f"~{self.describe(reason, get(nxt))}{evaluation}{then} would exceed "
                                              f"the budget of {self.describe(reason, limit)}")
        return CONTINUE

    def broken_by(self, whole: Totals) -> list[str]:
        """The budgets a projection of the whole run's totals breaks, each as a sentence."""
        return [f"{name} {self.describe(reason, get(whole))} > {self.describe(reason, limit)}"
                for reason, name, limit, get in self._limits() if get(whole) > limit]

    def state_dict(self) -> dict[str, Any]:
        return {"recent": [vars(t) for t in self.recent], "last_check": vars(self.last_check),
                "last_step": self.last_step, "gap": self.gap}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recent = [Totals(**t) for t in state["recent"]]
        self.last_check = Totals(**state["last_check"])
        self.last_step = state.get("last_step")
        self.gap = int(state.get("gap", 1))
