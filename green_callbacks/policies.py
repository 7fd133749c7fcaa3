"""When to stop: the accuracy-per-joule plateau and energy/carbon/cost budgets. No framework here."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from green_callbacks.units import parse_energy_j, parse_mass_g, parse_money

MODES = ("min", "max")
ON_EXCEED = ("stop", "warn")


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


class EfficiencyPlateau:
    """Stop when the monitored metric's gain per kilojoule stays below a threshold.

    After each validation: ``gain = (metric change in its improving direction) / (kJ spent since
    the previous check)``. After ``warmup_epochs`` checks are ignored, ``patience`` consecutive
    checks with ``gain < min_gain_per_kj`` stop the run. ``smoothing`` in ``[0, 1)`` is the weight
    of the past in an exponential moving average of the metric, for noisy metrics.
    """

    def __init__(self, monitor: str, mode: str = "max", min_gain_per_kj: float = 0.0, patience: int = 3,
                 warmup_epochs: int = 1, smoothing: float = 0.0) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must name a validation metric, like 'val_acc'")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose 'max' (accuracy-like) or 'min' (loss-like)")
        if not isinstance(min_gain_per_kj, int | float) or isinstance(min_gain_per_kj, bool) \
                or not math.isfinite(min_gain_per_kj) or min_gain_per_kj < 0:
            raise ValueError(f"min_gain_per_kj={min_gain_per_kj!r} must be a finite number >= 0 "
                             "(metric units per kilojoule)")
        if not isinstance(smoothing, int | float) or not 0 <= smoothing < 1:
            raise ValueError(f"smoothing={smoothing!r} must be in [0, 1) (0: no smoothing)")
        self.monitor = monitor
        self.mode = mode
        self.min_gain_per_kj = float(min_gain_per_kj)
        self.patience = _check_int("patience", patience, 1)
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        self.smoothing = float(smoothing)
        self.checks = 0
        self.wait = 0
        self.smoothed: float | None = None
        self.last_value: float | None = None
        self.last_j: float | None = None
        self.last_gain: float | None = None

    def update(self, value: float, cumulative_j: float) -> Decision:
        """One validation's metric and the run's cumulative joules so far."""
        self.checks += 1
        value = float(value)
        self.smoothed = value if self.smoothed is None else (
            self.smoothing * self.smoothed + (1 - self.smoothing) * value)
        previous, previous_j = self.last_value, self.last_j
        self.last_value, self.last_j = self.smoothed, cumulative_j
        if previous is None or previous_j is None or self.checks <= self.warmup_epochs:
            return CONTINUE
        spent_kj = (cumulative_j - previous_j) / 1000.0
        change = (self.smoothed - previous) * (1 if self.mode == "max" else -1)
        self.last_gain = change / spent_kj if spent_kj > 0 else math.inf
        self.wait = self.wait + 1 if self.last_gain < self.min_gain_per_kj else 0
        if self.wait >= self.patience:
            return Decision(True, StopReason.EFFICIENCY_PLATEAU,
                            f"{self.monitor} gained less than {self.min_gain_per_kj:g} per kJ for {self.wait} "
                            f"checks in a row (last: {self.last_gain:.4g} per kJ)")
        return CONTINUE

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("checks", "wait", "smoothed", "last_value", "last_j", "last_gain")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


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
    """

    so_far: Totals
    step: int
    metrics: Mapping[str, float]
    evaluation: bool
    rate_per_step: Totals | None = None
    remaining_steps: float | None = None
    evaluations: int = 0


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

    At each check (every point of the run, and every N steps where asked) the next interval's cost is
    projected as the largest of the last three intervals; if the run so far plus that
    projection would exceed a budget, it stops now. The overshoot is therefore bounded by how
    much one interval exceeds the largest of its recent predecessors.

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
        self.last_check: Totals = Totals()

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

    def check(self, so_far: Totals) -> Decision:
        """One check with the run's totals so far; the interval since the last check feeds the projection."""
        interval = so_far - self.last_check
        self.last_check = so_far
        if interval.j > 0:
            self.recent = [*self.recent[-2:], interval]
        if not self.recent:
            return CONTINUE
        nxt = Totals(max(t.j for t in self.recent), max(t.g for t in self.recent),
                     None if so_far.cost is None else max(t.cost or 0.0 for t in self.recent))
        for reason, name, limit, get in self._limits():
            if get(so_far) + get(nxt) > limit:
                return Decision(True, reason, f"{name} so far {self.describe(reason, get(so_far))} + next interval "
                                              f"~{self.describe(reason, get(nxt))} would exceed the budget of "
                                              f"{self.describe(reason, limit)}")
        return CONTINUE

    def projection(self, so_far: Totals, rate_per_step: Totals, remaining_steps: float) -> tuple[Totals, list[str]]:
        """The whole run's totals projected from the recent cost per step, and the budgets it breaks."""
        whole = so_far + rate_per_step.scaled(remaining_steps)
        broken = [f"{name} {self.describe(reason, get(whole))} > {self.describe(reason, limit)}"
                  for reason, name, limit, get in self._limits() if get(whole) > limit]
        return whole, broken

    def state_dict(self) -> dict[str, Any]:
        return {"recent": [vars(t) for t in self.recent], "last_check": vars(self.last_check)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recent = [Totals(**t) for t in state["recent"]]
        self.last_check = Totals(**state["last_check"])
