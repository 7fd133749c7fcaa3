"""The vocabulary of every decision (what a stopper is shown, what it answers) and the efficiency criterion: the
metric gained per doubling of energy. No framework here; the budgets are in :mod:`green_callbacks.budgets`.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from green_callbacks.distributed import ALIKE
from green_callbacks.units import ENERGY_J, brief, is_integer

MODES = ("min", "max")
# the efficiency stop's defaults, in one place (its first version's arguments are compared against them)
DEFAULT_MIN_GAIN = "1% per doubling"
DEFAULT_MIN_EVALUATIONS = 4
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


# metric names whose lower values are better (besides losses and errors): WER/CER, perplexity, squared, absolute and
# log errors, negative log-likelihood, bits per byte/character/dimension, Fréchet Inception Distance, calibration
_LOWER_IS_BETTER = {"wer", "cer", "ppl", "mse", "mae", "rmse", "msle", "rmsle", "mape", "smape", "nll", "bpb", "bpc",
                    "bpd", "fid", "ece", "brier"}


def higher_is_better(metric: str | None) -> bool:
    """A metric's direction from its name: lower for a loss, an error (rate), perplexity, WER/CER, a squared,
    absolute or percentage error, NLL, bits per byte, FID or a calibration error, else higher. The stoppers' guess
    where no ``mode`` is given, and the report's Pareto front where no ``--mode`` is."""
    words = re.split(r"[^a-z]+", (metric or "").lower())
    return not any(w in _LOWER_IS_BETTER or w.startswith(("err", "perplex")) or "loss" in w for w in words)


@dataclass(frozen=True)
class Decision:
    """A policy's verdict: stop or not, why (an enum for machines, a sentence for people)."""

    should_stop: bool
    reason: StopReason | None = None
    message: str = ""


CONTINUE = Decision(False)


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
        stop_cost_next: what a stop decided at the next check would still cost: a training that goes on past
            this check can stop no sooner (nothing at an evaluation; a step, and Lightning's validation, at a
            logging point or a step check).
        next_evaluation, evaluation_cost, evaluations_so_far: when the next evaluation is expected (the
            period of the last ones), what the last one cost, and what all of them cost so far.
        evaluation_next: the budgets' step checks (``check_every_n_steps``) say the next evaluation comes before
            (or at the step of) the next of them: it runs before that check can stop training.
        setup: what the training cost before its steps (set-up, data loading, the first step's warm-up beyond a
            step at the steps' own rate; evaluations left out), once known: spent, but no interval repeats it
            (``None`` where no budget asked, or not yet known); ``first_step``: that training's first step (a
            training resumed from a checkpoint has a set-up of its own).
    """

    so_far: Totals
    step: int
    metrics: Mapping[str, float]
    evaluation: bool
    rate_per_step: Totals | None = None
    remaining_steps: float | None = None
    evaluations: int = 0
    stop_cost: Totals | None = None
    stop_cost_next: Totals | None = None
    next_evaluation: float | None = None  # the step the next evaluation is expected at, from the last ones
    evaluation_cost: Totals | None = None  # the last evaluation's cost
    evaluations_so_far: Totals | None = None  # what the run's evaluations cost in all (in ``so_far``)
    evaluation_next: bool = False  # the budgets' step checks say the next evaluation runs before the next one
    setup: Totals | None = None  # the training's cost before its steps (see the class)
    first_step: int | None = None  # the training's first step, where ``setup`` is known

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


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name}={brief(value)} must be an integer >= {minimum}")
    return int(value)


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
        if match is None or per is None or (match.group(2) and per != "doubling") or \
                not math.isfinite(float(match.group(1))):
            raise ValueError(f"min_gain={brief(text)} is not a gain threshold; write one of {', '.join(self.FORMS)}: a "
                             f"finite number >= 0, '%' only per doubling, energy units {', '.join(ENERGY_J)}")
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

    def __init__(self, monitor: str, mode: str = "max", min_gain: str = DEFAULT_MIN_GAIN, patience: int = 3,
                 min_evaluations: int = DEFAULT_MIN_EVALUATIONS) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={brief(monitor)} must name a validation metric, like 'val_acc'")
        if mode not in MODES:
            raise ValueError(f"mode={brief(mode)} is not valid; choose 'max' (accuracy-like) or 'min' (loss-like)")
        self.monitor = monitor
        self.mode = mode
        self.min_gain = GainThreshold(min_gain)
        self.patience = _check_int("patience", patience, 1)
        self.min_evaluations = _check_int("min_evaluations", min_evaluations, 2)
        self.window: list[tuple[float, float]] = []  # (cumulative joules, metric) of the last doubling
        self.first_j: float | None = None
        self.wait = 0  # evaluations in a row at or below the threshold
        self.to_end_in_wait = False  # whether the gain left to the run's end decided any of them (for the message)
        self.bad = 0  # non-finite metrics in a row
        self.seen = False  # whether any evaluation has reported the metric
        self.gain: float | None = None  # the statistic at the latest evaluation, None until it decides
        self.gain_to_end: float | None = None  # the gain the rest of the run can buy, where under a doubling is left
        self.last_j: float | None = None  # the cumulative joules at the previous evaluation, whatever its metric
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args: Any, alike: bool = False) -> None:
        """``alike``: drawn from the joules every rank shares, said by rank 0 only (see ``distributed.ALIKE``)."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args, extra=ALIKE if alike else None)

    def note_energy(self, cumulative_j: float) -> None:
        """Every evaluation's cumulative joules, whatever its metric (``update`` calls it; an evaluation without
        the metric is noted alone): what every rank shares, so what it warns of is said for the job by rank 0,
        and not only where one rank's own metric (missing, NaN, not positive) happened to let it through."""
        if not (math.isfinite(cumulative_j) and cumulative_j > 0):
            self._warn_once("energy", "EfficiencyEarlyStopping: no energy measured yet at an evaluation "
                            "(%r J); it is not used", cumulative_j, alike=True)
        elif self.last_j is not None and cumulative_j == self.last_j:
            self._warn_once("stalled", "EfficiencyEarlyStopping: no energy measured since the last evaluation (%.6g "
                            "J): an evaluation sooner than the energy counters move, or the measured device lost; "
                            "such evaluations are not used", cumulative_j, alike=True)
        self.last_j = cumulative_j

    def update(self, value: float, cumulative_j: float, final_j: float | None = None) -> Decision:
        """One evaluation's metric, the run's cumulative joules at it and, where known, at the run's end."""
        self.note_energy(cumulative_j)
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
        if not (math.isfinite(cumulative_j) and cumulative_j > 0):  # (said by note_energy)
            return CONTINUE
        if self.min_gain.relative and value <= 0:
            self._warn_once("sign", "EfficiencyEarlyStopping: %s=%g; min_gain=%r is relative and needs a positive "
                            "metric, so this evaluation is not used (an absolute threshold such as '0.002 per "
                            "doubling' uses every value)", self.monitor, value, self.min_gain.text)
            return CONTINUE
        if self.window and cumulative_j < self.window[-1][0]:  # totals from zero: another training's (a new run)
            self.window, self.first_j, self.wait, self.to_end_in_wait, self.bad = [], None, 0, False, 0
        if self.first_j is None:
            self.first_j = cumulative_j
        if self.window and cumulative_j == self.window[-1][0]:  # no energy since: a gain for nothing (said above)
            return CONTINUE
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
        self.to_end_in_wait = self.wait > 0 and (self.to_end_in_wait or self.gain_to_end is not None)
        if self.wait >= self.patience:
            bought = (f"{self.monitor} gained {self.min_gain.describe(self.gain)} over the last "
                      f"{len(self.window)} evaluations")
            if left is not None:  # (where it was held against min_gain in the streak, its figure: the last one)
                bought += (f", and the {left:.2f} doublings of energy left to the run's end would buy "
                           f"{self.gain_to_end:.4g}{' %' if self.min_gain.relative else ''}")
            return Decision(True, StopReason.EFFICIENCY_PLATEAU,
                            f"{bought}, at or below min_gain={self.min_gain.text!r} for {self.wait} evaluations "
                            "in a row" + (" (where less than a doubling of energy was left, the gain left to the run's "
                                          "end)" if self.to_end_in_wait else ""))
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
                "bad": self.bad, "gain": self.gain, "seen": self.seen, "to_end_in_wait": self.to_end_in_wait,
                "last_j": self.last_j}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.window = [(float(j), float(v)) for j, v in state["window"]]
        self.first_j = state["first_j"]
        self.wait, self.bad, self.gain = int(state["wait"]), int(state["bad"]), state["gain"]
        self.seen = bool(state.get("seen", self.first_j is not None or self.bad))
        self.to_end_in_wait = bool(state.get("to_end_in_wait", False))
        self.last_j = state.get("last_j")
