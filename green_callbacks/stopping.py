"""The stopping callbacks' shared core: policies wired to an EnergyTracker's records, and config files."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from green_callbacks.budgets import Budget
from green_callbacks.distributed import ALIKE
from green_callbacks.policies import (
    CONTINUE,
    DEFAULT_MIN_EVALUATIONS,
    DEFAULT_MIN_GAIN,
    MODES,
    Decision,
    EfficiencyPlateau,
    MonitorError,
    Progress,
    _check_int,
    higher_is_better,
)
from green_callbacks.units import brief, is_finite_number, is_integer, plain
from green_callbacks.validation import named_arguments

log = logging.getLogger("green_callbacks")
S = TypeVar("S", bound="Stopper")


class Stopper:
    """Something an :class:`~green_callbacks.tracker.EnergyTracker` asks, at every check, whether to stop.

    Checks happen at every evaluation (``progress.evaluation`` is true and ``progress.metrics``
    holds that evaluation's metrics), at every epoch end and logging point, and every
    ``check_every_n_steps`` steps where a stopper asks for it. The tracker reduces the decision
    across DDP ranks, so a stopper decides from what it is shown and nothing else.
    """

    section = ""  # the key of this stopper's table in a config file
    check_every_n_steps: int | None = None

    def check(self, progress: Progress) -> Decision:
        """This check's verdict."""
        raise NotImplementedError

    def statistics(self) -> dict[str, float]:
        """Numbers to log as MLflow metrics at this check (``stopping/...``), so a stop message can be found."""
        return {}

    def require_metric(self, available: Collection[str], step_only: Collection[str] = ()) -> None:
        """Called with the metric names an evaluation produced before training (Lightning's sanity check), or,
        for a training metric, with those training logged too; ``step_only``: names the evaluation logged per
        step only, which the framework hands no callback."""

    def policy_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_policy_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def reset_policy(self) -> None:
        """A new training, counted from zero (a stopper handed to a second one): forget what the earlier one
        showed it, whose joules belong to another run."""
        self.load_policy_state(self._fresh_policy)

    @classmethod
    def from_file(cls: type[S], path: str | Path, **overrides: Any) -> S:
        """Build from a YAML file or a TOML file (``pyproject.toml`` included).

        The arguments are read from the ``green-callbacks.<section>`` table (TOML:
        ``[tool.green-callbacks.<section>]`` or ``[green-callbacks.<section>]``; YAML: a
        ``green-callbacks:`` mapping, or ``<section>:`` at the top level). Unknown keys, a key given
        twice and a file that is not UTF-8 are errors naming the file.
        """
        import inspect

        from green_callbacks.config import read_section

        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"{cls.__name__}.from_file(..., {', '.join(f'{k}=' for k in unknown)}): not an argument "
                             f"of {cls.__name__}; choose from {valid}")
        table = read_section(path, cls.section, valid)
        try:
            return cls(**{**table, **overrides})
        except ValueError as exc:  # a bad value: say which file (or argument) it came from
            given = "from_file's arguments" if set(overrides) & {str(exc).split("=", 1)[0]} else \
                f"{path}, '{cls.section}'"
            raise ValueError(f"{given}: {exc}") from None


def _first_version_arguments(min_gain: str, min_evaluations: int, min_gain_per_kj: Any,
                             warmup_epochs: Any) -> tuple[str, int]:
    """The first version's ``min_gain_per_kj`` and ``warmup_epochs``, read as today's arguments, with one warning
    each (an exchange rate per kJ depends on the hardware's power; the default per doubling does not). Given beside
    the argument it stands for (set to other than its default), it contradicts it: refused, naming both."""
    for old, old_value, new, new_value, default in (("min_gain_per_kj", min_gain_per_kj, "min_gain", min_gain,
                                                     DEFAULT_MIN_GAIN),
                                                    ("warmup_epochs", warmup_epochs, "min_evaluations",
                                                     min_evaluations, DEFAULT_MIN_EVALUATIONS)):
        if old_value is not None and new_value != default:
            raise ValueError(f"{old}={brief(old_value)} and {new}={brief(new_value)} say the same thing twice, "
                             f"differently: give {new} alone ({old} is the first version's name for it)")
    if min_gain_per_kj is not None:
        if not is_finite_number(min_gain_per_kj) or min_gain_per_kj < 0:  # (10**400: no float, not finite)
            raise ValueError(f"min_gain_per_kj={brief(min_gain_per_kj)} must be a number >= 0 (metric units per kJ); "
                             "today's argument is min_gain, e.g. '0.5 per kJ' or the default '1% per doubling'")
        min_gain = f"{float(min_gain_per_kj):g} per kJ"
        log.warning("green-callbacks: min_gain_per_kj=%g is the first version's argument, read as min_gain=%r: an "
                    "exchange rate that stops at different points on different hardware; the default min_gain='1%% "
                    "per doubling' does not (docs/stopping.md)", min_gain_per_kj, min_gain)
    if warmup_epochs is not None:
        min_evaluations = max(2, _check_int("warmup_epochs", warmup_epochs, 0))
        log.warning("green-callbacks: warmup_epochs=%d is the first version's argument, read as min_evaluations=%d "
                    "(no decision before the window holds that many evaluations)", warmup_epochs, min_evaluations)
    return min_gain, min_evaluations


class EfficiencyStopper(Stopper):
    """Stop when another doubling of the energy spent no longer buys a worthwhile gain of a metric.

    Decided at every evaluation from that evaluation's metric (see :class:`EfficiencyPlateau`);
    a check without a new evaluation changes nothing. The criterion's statistic is logged at every
    evaluation where it is defined, as ``stopping/<monitor>_gain_pct_per_doubling`` (the name
    follows ``min_gain``'s unit), and the stop message quotes it. The default threshold is free
    of the hardware's power and of the metric's unit: the same training stops at the same
    evaluation on a laptop and on an 8-GPU node. See ``docs/stopping.md``.

    Args:
        monitor: the validation metric to watch (``val_acc``; for HF ``eval_accuracy`` or
            ``accuracy``, following ``metric_for_best_model``). ``None``: ``val_loss`` in
            Lightning and in a plain loop (:class:`~green_callbacks.EnergyTracker`),
            ``metric_for_best_model`` (else ``eval_loss``) in HF.
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better; ``None`` guesses from the
            name (:func:`~green_callbacks.policies.higher_is_better`): ``"min"`` for a loss, an error, perplexity,
            WER/CER, MSE/MAE/RMSE, NLL..., ``"max"`` otherwise.
        min_gain: the smallest worthwhile gain. ``"1% per doubling"`` (the default): stop once doubling
            the energy spent improves the metric by less than 1 % of its value (needs a positive
            metric), or, with less than a doubling of energy left to ``max_steps``/``max_epochs``,
            once what is left would improve it by less than that; ``"0.002 per doubling"``: the
            same in the metric's units; ``"0.1 per kWh"`` (J, kJ, MJ, Wh, kWh, MWh): an exchange
            rate, which depends on the hardware's power.
        patience: evaluations in a row at or below ``min_gain`` before stopping; as many
            non-finite values of ``monitor`` in a row stop the run as diverged.
        min_evaluations: the warm-up: no decision before the energy has doubled since the first
            evaluation and the last doubling of energy holds this many evaluations (at least 2).
        strict: a ``monitor`` missing from an evaluation's metrics (or from Lightning's sanity
            check) raises :class:`~green_callbacks.policies.MonitorError`; ``False`` warns once
            and waits for it, for a metric first logged at a later evaluation. Once logged, a
            metric missing from a later evaluation (logged every other one) is not an error either
            way: that evaluation is no check, and an earlier value is never used again.
        verbose: log the statistic at every evaluation.
    """

    section = "efficiency"

    @named_arguments
    def __init__(self, monitor: str | None = None, mode: str | None = None, min_gain: str = DEFAULT_MIN_GAIN,
                 patience: int = 3, min_evaluations: int = DEFAULT_MIN_EVALUATIONS, strict: bool = True,
                 verbose: bool = False, *,
                 min_gain_per_kj: float | None = None, warmup_epochs: int | None = None) -> None:
        # every argument is validated now; a monitor left to the framework's default is filled in at fit start
        min_gain, min_evaluations = _first_version_arguments(min_gain, min_evaluations, min_gain_per_kj,
                                                             warmup_epochs)
        if monitor is not None and (not isinstance(monitor, str) or not monitor.strip()):  # (" ": no metric's name)
            raise ValueError(f"monitor={brief(monitor)} must name a validation metric, like 'val_acc', or be None "
                             "(the framework's loss)")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={brief(mode)} is not valid; choose 'max' (accuracy-like), 'min' (loss-like) or "
                             "None (guessed from the name)")
        for name, value in (("strict", strict), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={brief(value)} must be True or False")
        # None: val_loss, as in Lightning and a plain loop; the HF adapter's resolve() puts its own default in
        guess = "max" if higher_is_better(monitor or "val_loss") else "min"
        self.plateau = EfficiencyPlateau(monitor or "val_loss", mode or guess, min_gain, patience, min_evaluations)
        self.strict = strict
        self.verbose = verbose
        self._statistics: dict[str, float] = {}
        self._warned_missing = False
        self._from_training = False  # the monitor is a training metric (found after the first training step)
        self._init_args = plain({"monitor": monitor, "mode": mode, "min_gain": min_gain, "patience": patience,
                                 "min_evaluations": min_evaluations, "strict": strict, "verbose": verbose})
        self._fresh_policy = self.policy_state()

    @property
    def monitor(self) -> str:
        return self.plateau.monitor

    def resolve(self, default_monitor: str, default_mode: str, normalise: Any = None) -> None:
        """Fill in the framework's default monitor/mode, and its naming convention, at fit start."""
        args = self._init_args
        monitor = args["monitor"] or default_monitor
        self.plateau.monitor = normalise(monitor) if normalise else monitor
        # a monitor that is the framework's default metric by another name (HF: "perplexity" and
        # metric_for_best_model="eval_perplexity") takes the direction given for it (greater_is_better)
        default = args["monitor"] is None or self.plateau.monitor == (normalise(default_monitor) if normalise
                                                                      else default_monitor)
        guess = "max" if higher_is_better(monitor) else "min"
        self.plateau.mode = args["mode"] or (default_mode if default else guess)

    def no_evaluations(self, why: str, when: str = "") -> None:
        """The training will never evaluate (``why``; ``when``: " before its last step", where one there stops
        nothing): this stopper decides at evaluations, so say once, before the first step, that it cannot stop
        this run."""
        log.warning("green-callbacks: %s(monitor=%r) decides at evaluations, and this training has none%s (%s): "
                    "it will not stop the run. Give the trainer a validation, or leave the stopper out.",
                    type(self).__name__, self.monitor, when, why)

    def expect_evaluations(self, count: int, why: str) -> None:
        """The training's schedule allows ``count`` evaluations before its last step (``why``: the settings that say
        so): with none, or fewer than the window's ``min_evaluations``, this stopper cannot find a plateau; said
        once, before the first step."""
        if count == 0:
            self.no_evaluations(why, " before its last step")
        elif count < self.plateau.min_evaluations:
            log.warning("green-callbacks: %s(monitor=%r) decides from at least min_evaluations=%d evaluations, and "
                        "this training has %d before its last step (%s): it will not stop the run on a plateau. "
                        "Evaluate more often, or lower min_evaluations.", type(self).__name__, self.monitor,
                        self.plateau.min_evaluations, count, why)

    def _missing(self, available: Collection[str], step_only: Collection[str] = ()) -> None:
        message = (f"{type(self).__name__}(monitor={self.monitor!r}): no such metric; the evaluation's metrics "
                   f"are {sorted(available)}")
        if self.monitor in step_only:  # Lightning keeps an evaluation's per-step values for its logger only
            message += (f" ({self.monitor!r} is a per-step value of the validation, self.log(..., on_step=True), "
                        "which Lightning hands no callback: log it with on_epoch=True, validation_step's default, "
                        "and monitor its name without '_step')")
        elif not available:  # nothing at all: the metrics came after the point that booked the evaluation
            message += (" (it logged none: Lightning takes those self.log'ged in validation_step or "
                        "on_validation_epoch_end, HF those compute_metrics returns, a plain loop those given to "
                        "tracker.report(...))")
        if self.strict:
            raise MonitorError(f"{message}. Log it under that name, or pass strict=False to wait for it.")
        if not self._warned_missing:
            self._warned_missing = True
            log.warning("%s; waiting for it (strict=False).", message)

    def require_metric(self, available: Collection[str], step_only: Collection[str] = ()) -> None:
        if self.monitor not in available:
            self._missing(available, step_only)

    def expect_training_metric(self) -> None:
        """The monitor is a metric training logs (checked by the adapter once training has logged it): an
        evaluation without it is no check, and no error (Lightning reports a metric logged per epoch at the
        epoch's end, after that epoch's validation)."""
        self._from_training = True

    def check(self, progress: Progress) -> Decision:
        self._statistics = {}
        if not progress.evaluation:
            return CONTINUE
        if self.monitor not in progress.metrics:
            self.plateau.note_energy(progress.so_far.j)
            if self.plateau.seen or self._from_training:  # logged before, not now: nothing new to decide on
                self.plateau._warn_once("absent", "EfficiencyEarlyStopping: %s was not logged at this evaluation "
                                        "(step %d), as at earlier ones (or, a training metric, not yet); "
                                        "it decides only where it is logged, never on an earlier value",
                                        self.monitor, progress.step)
            else:
                self._missing(progress.metrics)
            return CONTINUE
        end = progress.projected_end
        decision = self.plateau.update(progress.metrics[self.monitor], progress.so_far.j,
                                       None if end is None else end.j)
        gain = self.plateau.gain
        if gain is not None:
            self._statistics = {self.plateau.min_gain.name(self.monitor): gain}
        if self.plateau.gain_to_end is not None:
            self._statistics[self.plateau.min_gain.name_to_end(self.monitor)] = self.plateau.gain_to_end
        if decision.should_stop and progress.remaining_steps is not None and progress.remaining_steps <= 0:
            decision = CONTINUE  # the run ends here anyway: a stop would save nothing, and say it stopped early
        if self.verbose:  # what was held against min_gain: the gain left to the run's end, where it was reckoned
            to_end = self.plateau.gain_to_end
            held = "" if to_end is None else (f", {to_end:.4g}{' %' if self.plateau.min_gain.relative else ''} "
                                             "in the energy left to the run's end")
            log.warning("%s: %s=%.4g, gained %s%s, %d/%d at or below min_gain=%r", type(self).__name__, self.monitor,
                        progress.metrics[self.monitor], "n/a (warm-up)" if gain is None else
                        self.plateau.min_gain.describe(gain), held, self.plateau.wait, self.plateau.patience,
                        self.plateau.min_gain.text)
        return decision

    def statistics(self) -> dict[str, float]:
        return dict(self._statistics)

    def policy_state(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_policy_state(self, state: Mapping[str, Any]) -> None:
        self.plateau.load_state_dict(state)


class BudgetStopper(Stopper):
    """Stop before an energy, emissions or cost budget would be exceeded (see :class:`Budget`).

    Checked at every point of the run (each evaluation, epoch end and logging point), and every
    ``check_every_n_steps`` training steps where given. Once the run's recent cost per step is
    known, the whole run (to ``max_steps`` / ``max_epochs``) is projected at each evaluation and
    epoch end (``projection/energy_j``...), with one warning when it would break a budget.

    Args:
        energy: joules, or a string with a unit: "2.5 kWh", "900 kJ".
        emissions: grams CO2e, or a string: "300 g", "1.2 kg".
        cost: money in the EnergyMonitor's ``currency`` (needs its ``price_per_kwh``), or "0.5 EUR".
        on_exceed: ``"stop"`` (stop before the budget is exceeded) or ``"warn"``.
        check_every_n_steps: also check every N training steps, between points.
    """

    section = "budget"

    @named_arguments
    def __init__(self, energy: float | str | None = None, emissions: float | str | None = None,
                 cost: float | str | None = None, on_exceed: str = "stop",
                 check_every_n_steps: int | None = None) -> None:
        self.budget = Budget(energy, emissions, cost, on_exceed)
        if check_every_n_steps is not None and (not is_integer(check_every_n_steps) or check_every_n_steps < 1):
            raise ValueError(f"check_every_n_steps={brief(check_every_n_steps)} must be an integer >= 1 or None")
        self.check_every_n_steps = None if check_every_n_steps is None else int(check_every_n_steps)
        self.projection_warned = False
        self._warned_reasons: set[Any] = set()  # limits passed in warn mode: said once each
        self._init_args = plain({"energy": energy, "emissions": emissions, "cost": cost, "on_exceed": on_exceed,
                                 "check_every_n_steps": check_every_n_steps})
        self._fresh_policy = self.policy_state()

    def validate_against(self, price_per_kwh: float | None, currency: str, g_per_kwh: float | None = None) -> None:
        """A cost budget needs the monitor's price, in the same currency; a limit that a price or a carbon
        intensity of 0 (``g_per_kwh``: the constant one, None for a series) keeps at 0 can never act. Said
        before training."""
        if self.budget.emissions_g is not None and g_per_kwh == 0:
            raise ValueError(f"EnergyBudget(emissions={brief(self._init_args['emissions'])}) can never be reached: the "
                             "EnergyMonitor's carbon intensity is 0 g/kWh (carbon_intensity_g_per_kwh=0, or a "
                             "carbon_intensity_csv of zeros), so every emission counts 0; set the intensity (or a "
                             "country, a cloud region) or drop the limit")
        if self.budget.cost is None:
            return
        if price_per_kwh is None:
            raise ValueError(f"EnergyBudget(cost={brief(self._init_args['cost'])}) needs a price: set price_per_kwh "
                             "on the EnergyMonitor")
        if price_per_kwh == 0:
            raise ValueError(f"EnergyBudget(cost={brief(self._init_args['cost'])}) can never be reached: the "
                             "EnergyMonitor's price_per_kwh=0 makes every cost 0; set the price or drop the limit")
        if self.budget.currency and self.budget.currency != currency.upper():
            raise ValueError(f"EnergyBudget cost is in {self.budget.currency} but the EnergyMonitor's price is in "
                             f"{currency.upper()}; use the same currency")
        self.budget.price_currency = currency.upper()  # a bare number is in the price's: its messages say which

    def _act(self, decision: Decision) -> Decision:
        if decision.should_stop and self.budget.on_exceed == "warn":
            if decision.reason not in self._warned_reasons:  # once per limit: it stays passed at every later check
                self._warned_reasons.add(decision.reason)
                log.warning("EnergyBudget: %s (on_exceed='warn': training continues; said once).", decision.message,
                            extra=ALIKE)
            return Decision(False)
        return decision

    def check(self, progress: Progress) -> Decision:
        whole = progress.projected_end if progress.remaining_steps else None
        if not self.projection_warned and whole is not None:
            broken = self.budget.broken_by(whole)
            if broken:
                self.projection_warned = True
                log.warning("EnergyBudget: at this rate the whole run would need %s; it stops before that%s.",
                            "; ".join(broken), "" if self.budget.on_exceed == "stop" else
                            " only if on_exceed='stop'", extra=ALIKE)
        decision = self.budget.check(progress.so_far, progress.stop_cost, progress)
        if decision.should_stop and progress.remaining_steps is not None and progress.remaining_steps <= 0:
            # the run ends here anyway: nothing is left to save, and it did not stop early; a budget it went over
            # is still said (once)
            over = self.budget.broken_by(progress.so_far)
            if over and ("over", decision.reason) not in self._warned_reasons:
                self._warned_reasons.add(("over", decision.reason))
                log.warning("EnergyBudget: the run ends over its budget: %s.", "; ".join(over), extra=ALIKE)
            return CONTINUE
        return self._act(decision)

    def policy_state(self) -> dict[str, Any]:
        return {**self.budget.state_dict(), "projection_warned": self.projection_warned}

    def load_policy_state(self, state: Mapping[str, Any]) -> None:
        self.budget.load_state_dict(state)
        self.projection_warned = bool(state.get("projection_warned", False))
