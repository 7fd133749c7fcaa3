"""The efficiency criterion alone: pure decisions from (cumulative joules, metric) pairs, no trainer."""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from green_callbacks.policies import (
    WINDOW_MAX_POINTS,
    Decision,
    EfficiencyPlateau,
    GainThreshold,
    MonitorError,
    Progress,
    StopReason,
    Totals,
    theil_sen_slope,
)
from green_callbacks.stopping import EfficiencyStopper


def evaluation(joules: float, step: int = 0, **metrics: float) -> Progress:
    return Progress(so_far=Totals(j=joules), step=step, metrics=metrics, evaluation=True)


def run(stopper: EfficiencyStopper, joules: list[float], values: list[float], monitor: str = "val_acc"
        ) -> tuple[int | None, list[dict[str, float]], list[Decision]]:
    """Feed evaluations until a stop: the stop's index (``None``: never), every statistics() and decision."""
    stats, decisions = [], []
    for i, (j, v) in enumerate(zip(joules, values, strict=True)):
        decisions.append(stopper.check(evaluation(j, i, **{monitor: v})))
        stats.append(stopper.statistics())
        if decisions[-1].should_stop:
            return i, stats, decisions
    return None, stats, decisions


def linear_energy(n: int, per_evaluation_j: float = 100.0) -> list[float]:
    return [per_evaluation_j * (i + 1) for i in range(n)]


# -- the criterion -----------------------------------------------------------------------------------


def test_a_perfectly_flat_metric_stops_right_after_the_warm_up():
    stopper = EfficiencyStopper(monitor="val_acc", mode="max")
    stop, stats, decisions = run(stopper, linear_energy(30), [0.9] * 30)
    # warm-up: evaluation 6 (600 J) is the first whose last doubling (>= 300 J) holds 4 evaluations;
    # patience 3: the third evaluation in a row at a gain of exactly 0 stops, the 8th
    assert [bool(s) for s in stats] == [False] * 5 + [True] * 3
    assert stop == 7
    assert decisions[-1].reason is StopReason.EFFICIENCY_PLATEAU
    assert stats[-1] == {"stopping/val_acc_gain_pct_per_doubling": 0.0}
    assert "val_acc gained 0 % per doubling of energy over the last 5 evaluations" in decisions[-1].message


def test_a_power_law_climb_never_stops_and_its_statistic_is_the_relative_gain_per_doubling():
    joules = linear_energy(60)
    values = [0.5 * (j / 100) ** 0.05 for j in joules]  # +3.5 % per doubling, forever
    stop, stats, _ = run(EfficiencyStopper(monitor="val_acc"), joules, values)
    assert stop is None
    assert stats[-1]["stopping/val_acc_gain_pct_per_doubling"] == pytest.approx(100 * (2 ** 0.05 - 1))


def test_a_saturating_curve_stops_once_a_doubling_buys_less_than_min_gain():
    """At the default min_gain, 1 % per doubling."""
    joules = linear_energy(60)
    values = [0.97 - 0.5 * math.exp(-i / 4) for i in range(60)]
    stop, stats, decisions = run(EfficiencyStopper(monitor="val_acc"), joules, values)
    assert stop is not None and stop < 45
    gains = [s["stopping/val_acc_gain_pct_per_doubling"] for s in stats if s]
    assert gains[-3:] == sorted(gains[-3:], reverse=True) and all(g <= 1.0 for g in gains[-3:])
    assert gains[-4] > 1.0, "it stopped after exactly patience=3 evaluations at or below the threshold"
    assert f"{gains[-1]:.4g} % per doubling" in decisions[-1].message
    assert values[-1] - values[stop] < 0.001, "what the remaining energy would have bought"


def test_loss_mode_stops_when_the_loss_flattens_or_rises_and_not_while_it_falls():
    joules = linear_energy(40)
    falling = [2.0 * (j / 100) ** -0.2 for j in joules]
    stop, stats, _ = run(EfficiencyStopper(monitor="val_loss"), joules, falling, "val_loss")
    assert stop is None
    assert stats[-1]["stopping/val_loss_gain_pct_per_doubling"] == pytest.approx(100 * (1 - 2 ** -0.2))
    rising = [0.3 + 0.01 * i for i in range(40)]  # over-fitting: the gain is negative
    stop, stats, _ = run(EfficiencyStopper(monitor="val_loss"), joules, rising, "val_loss")
    assert stop == 7 and stats[-1]["stopping/val_loss_gain_pct_per_doubling"] < 0


def test_one_outlier_does_not_decide():
    """Theil-Sen: a single lucky evaluation on a plateau neither starts nor stops a climb."""
    values = [0.9] * 30
    values[7] = 0.99
    stop, _, _ = run(EfficiencyStopper(monitor="val_acc"), linear_energy(30), values)
    assert stop == 7
    assert theil_sen_slope([1, 2, 3, 4, 5], [0, 1, 2, 30, 4]) == pytest.approx(1.0)
    assert theil_sen_slope([1, 1], [0, 1]) is None


def test_absolute_threshold_per_doubling_is_in_the_metric_units():
    joules = linear_energy(40)
    values = [0.8 + 0.01 * math.log2(j) for j in joules]  # exactly 0.01 per doubling
    stop, stats, _ = run(EfficiencyStopper(monitor="val_acc", min_gain="0.005 per doubling"), joules, values)
    assert stop is None and stats[-1]["stopping/val_acc_gain_per_doubling"] == pytest.approx(0.01)
    stop, _, decisions = run(EfficiencyStopper(monitor="val_acc", min_gain="0.02 per doubling"), joules, values)
    assert stop == 7 and "gained 0.01 per doubling of energy" in decisions[-1].message


def test_exchange_rate_per_kwh_is_the_marginal_gain_and_depends_on_the_power():
    joules = linear_energy(40, per_evaluation_j=36_000.0)  # 0.01 kWh per evaluation
    values = [0.5 + 0.2 * j / 3.6e6 for j in joules]  # 0.2 per kWh
    stopper = EfficiencyStopper(monitor="val_acc", min_gain="0.1 per kWh")
    stop, stats, _ = run(stopper, joules, values)
    assert stop is None and stats[-1]["stopping/val_acc_gain_per_kwh"] == pytest.approx(0.2)
    # the same training at 4x the power buys 4x less per kWh: an exchange rate is not scale-free
    stop, stats, decisions = run(EfficiencyStopper(monitor="val_acc", min_gain="0.1 per kWh"),
                                 [4 * j for j in joules], values)
    assert stop == 7 and stats[-1]["stopping/val_acc_gain_per_kwh"] == pytest.approx(0.05)
    assert "gained 0.05 per kWh over" in decisions[-1].message


curves = st.lists(st.floats(0.05, 1.0), min_size=5, max_size=50)
steps = st.lists(st.floats(0.1, 10.0), min_size=50, max_size=50)


@settings(max_examples=200, deadline=None)
@given(values=curves, increments=steps, scale=st.sampled_from([1e-3, 0.37, 400.0, 2.5e6]),
       min_gain=st.sampled_from(["0.5% per doubling", "0% per doubling", "0.01 per doubling"]),
       patience=st.integers(1, 4))
def test_decisions_do_not_depend_on_the_energy_scale(values, increments, scale, min_gain, patience):
    """5 W or 2000 W: every cumulative energy times a constant gives identical decisions."""
    joules = [sum(increments[: i + 1]) for i in range(len(values))]
    a = run(EfficiencyStopper(monitor="val_acc", min_gain=min_gain, patience=patience), joules, values)
    b = run(EfficiencyStopper(monitor="val_acc", min_gain=min_gain, patience=patience),
            [scale * j for j in joules], values)
    assert a[0] == b[0]
    assert [d.reason for d in a[2]] == [d.reason for d in b[2]]
    assert [s.keys() for s in a[1]] == [s.keys() for s in b[1]]
    for sa, sb in zip(a[1], b[1], strict=True):
        for k in sa:
            assert sa[k] == pytest.approx(sb[k], rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(values=curves, increments=steps, unit=st.sampled_from([100.0, 0.01]))
def test_relative_threshold_does_not_depend_on_the_metric_unit(values, increments, unit):
    """Accuracy as a fraction or in percent: the same stop."""
    joules = [sum(increments[: i + 1]) for i in range(len(values))]
    a = run(EfficiencyStopper(monitor="val_acc"), joules, values)
    b = run(EfficiencyStopper(monitor="val_acc"), joules, [unit * v for v in values])
    assert a[0] == b[0]


# -- metrics as they really arrive -------------------------------------------------------------------


def test_checks_without_a_new_evaluation_change_nothing():
    stopper = EfficiencyStopper(monitor="val_acc")
    for i in range(20):  # epoch ends and logging points in between, whatever their metrics say
        p = Progress(Totals(j=100.0 * (i + 1)), step=i, metrics={"val_acc": 0.5}, evaluation=False)
        assert stopper.check(p) == Decision(False)
        assert stopper.statistics() == {}
    assert stopper.policy_state() == EfficiencyStopper(monitor="val_acc").policy_state()


def test_a_non_finite_metric_is_skipped_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    joules = linear_energy(40)
    values = [0.97 - 0.5 * math.exp(-i / 4) for i in range(40)]
    noisy = list(values)
    noisy[3], noisy[5], noisy[6] = math.nan, math.inf, -math.inf  # never 3 in a row
    without = [(j, v) for j, v in zip(joules, noisy, strict=True) if math.isfinite(v)]
    stop, _, _ = run(EfficiencyStopper(monitor="val_acc"), joules, noisy)
    expected, _, _ = run(EfficiencyStopper(monitor="val_acc"), [j for j, _ in without], [v for _, v in without])
    assert [j for j, _ in without][expected] == joules[stop], "the same stop as if they had never come"
    assert stop is not None
    assert len([r for r in caplog.records if "val_acc=nan" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if "inf" in r.getMessage()], "one warning for the whole run"


def test_patience_non_finite_values_in_a_row_are_a_divergence():
    values = [0.5, 0.6, 0.7, math.nan, math.nan, math.nan, 0.8]
    stop, _, decisions = run(EfficiencyStopper(monitor="val_loss", mode="min"), linear_energy(7), values,
                             "val_loss")
    assert stop == 5
    assert decisions[-1].reason is StopReason.DIVERGED
    assert "val_loss was not finite (nan) at 3 evaluations in a row" in decisions[-1].message


def test_a_missing_monitor_is_an_error_naming_it_and_the_metrics_there_are():
    stopper = EfficiencyStopper(monitor="val_acc")
    with pytest.raises(MonitorError, match=r"monitor='val_acc'.*\['val_accuracy', 'val_loss'\].*strict=False"):
        stopper.require_metric(["val_loss", "val_accuracy"])
    assert issubclass(MonitorError, ValueError)
    with pytest.raises(MonitorError, match="monitor='val_acc'"):
        stopper.check(evaluation(100.0, val_loss=0.3))
    stopper.require_metric(["val_acc"])


def test_strict_false_warns_once_and_waits_for_a_metric_that_appears_later(caplog):
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    stopper = EfficiencyStopper(monitor="val_acc", strict=False)
    stopper.require_metric(["val_loss"])
    for i in range(5):
        assert stopper.check(evaluation(100.0 * (i + 1), val_loss=1.0)) == Decision(False)
        assert stopper.statistics() == {}
    assert len([r for r in caplog.records if "monitor='val_acc'" in r.getMessage()]) == 1
    # it first appears at the 6th evaluation: the warm-up starts there
    stop, _, _ = run(stopper, [100.0 * i for i in range(6, 30)], [0.9] * 24)
    assert stop == 8  # 600 J first: the 7th (1200 J) is the first decision


def test_energy_not_measured_yet_is_not_used(caplog):
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    stop, _, _ = run(EfficiencyStopper(monitor="val_acc"), [0.0, 0.0, *linear_energy(20)], [0.9] * 22)
    assert stop == 9  # the warm-up starts at the first evaluation with energy
    assert len([r for r in caplog.records if "no energy measured yet" in r.getMessage()]) == 1


def test_evaluations_with_no_energy_since_the_last_are_not_used_and_said_once(caplog):
    """The only measured device is lost: the cumulative energy stops growing. Its evaluations were fitted at the same
    joules as if the gain had cost nothing (here a flat metric stopped on them); they are skipped with one warning,
    and decisions resume when the energy grows again."""
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    stalled = [100.0, 200.0, 300.0] + [300.0] * 20
    stopper = EfficiencyStopper(monitor="val_acc")
    stop, stats, _ = run(stopper, stalled, [0.9] * len(stalled))
    assert stop is None and not any(stats)
    assert len([r for r in caplog.records if "no energy measured since the last evaluation" in r.getMessage()]) == 1
    stop, _, _ = run(stopper, [400.0 + 100 * i for i in range(10)], [0.9] * 10)
    assert stop == 4, "growing again: 600 J is the first decision (300-600 J in its doubling), patience 3"
    stopper = EfficiencyStopper(monitor="val_acc")
    run(stopper, linear_energy(5), [0.9] * 5)
    stop, _, _ = run(stopper, linear_energy(20), [0.9] * 20)  # a new training, its totals from zero
    assert stop == 7, "the warm-up starts again: as a fresh stopper"


def test_a_relative_threshold_skips_non_positive_values_and_says_why(caplog):
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    stop, _, _ = run(EfficiencyStopper(monitor="val_acc"), linear_energy(20), [0.0, 0.0] + [0.9] * 18)
    assert stop == 7  # 300 J first: 600 J is the first decision
    assert "needs a positive metric" in caplog.text and "0.002 per doubling" in caplog.text
    stop, _, _ = run(EfficiencyStopper(monitor="val_r2", min_gain="0.001 per doubling"), linear_energy(20),
                     [-0.5] * 20, "val_r2")
    assert stop == 7, "an absolute threshold uses negative values"


# -- resume --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [2, 6, 9, 15])
def test_state_round_trips_through_json_and_resumes_the_same_decisions(cut):
    joules = linear_energy(60)
    values = [0.97 - 0.5 * math.exp(-i / 3) + 0.004 * (-1) ** i for i in range(60)]
    values[cut - 1] = math.nan
    whole = run(EfficiencyStopper(monitor="val_acc"), joules, values)
    first = EfficiencyStopper(monitor="val_acc")
    head = run(first, joules[:cut], values[:cut])
    second = EfficiencyStopper(monitor="val_acc")
    second.load_policy_state(json.loads(json.dumps(first.policy_state(), allow_nan=False)))
    tail = run(second, joules[cut:], values[cut:])
    assert head[0] is None and tail[0] is not None
    assert tail[0] + cut == whole[0]
    assert head[1] + tail[1] == whole[1]
    assert tail[2][-1] == whole[2][-1]


def test_the_window_stays_bounded_in_a_long_run():
    plateau = EfficiencyPlateau("val_acc", "max", patience=10_000)
    for i in range(3000):  # evaluations every few steps of a long pre-training run
        plateau.update(0.5 + 0.1 * math.log2(i + 1), 10.0 * (i + 1))
    assert len(plateau.window) <= WINDOW_MAX_POINTS
    assert plateau.window[-1] == (30_000.0, 0.5 + 0.1 * math.log2(3000))
    assert min(j for j, _ in plateau.window) >= 15_000.0, "only the last doubling"
    assert plateau.gain == pytest.approx(100 * 0.1 / (0.5 + 0.1 * math.log2(3000)), rel=0.05)


# -- arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, relative, per, value, name", [
    ("0.5% per doubling", True, "doubling", 0.5, "stopping/m_gain_pct_per_doubling"),
    (" 1e-3  %  per  Doubling ", True, "doubling", 0.001, "stopping/m_gain_pct_per_doubling"),
    ("0.002 per doubling", False, "doubling", 0.002, "stopping/m_gain_per_doubling"),
    ("0.1 per kWh", False, "kWh", 0.1, "stopping/m_gain_per_kwh"),
    ("0.1 per kwh", False, "kWh", 0.1, "stopping/m_gain_per_kwh"),
    ("3 per MJ", False, "MJ", 3.0, "stopping/m_gain_per_mj"),
    ("0 per J", False, "J", 0.0, "stopping/m_gain_per_j"),
])
def test_gain_thresholds_read_as_people_write_them(text, relative, per, value, name):
    t = GainThreshold(text)
    assert (t.relative, t.per, t.value, t.name("m")) == (relative, per, value, name)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_gain": 0.5}, r"min_gain=0.5 is not a gain threshold; write one of \"0.5% per doubling\", "
                        r"\"0.002 per doubling\", \"0.1 per kWh\""),
    ({"min_gain": "0.5"}, r"min_gain='0.5' is not a gain threshold"),
    ({"min_gain": "-1% per doubling"}, r"min_gain='-1% per doubling' is not.*a finite number >= 0"),
    ({"min_gain": "1% per kWh"}, r"min_gain='1% per kWh' is not.*'%' only per doubling"),
    ({"min_gain": "0.1 per mj"}, r"min_gain='0.1 per mj' is not.*energy units J, kJ, MJ, Wh, kWh, MWh"),
    ({"min_gain": "0.1 per furlong"}, r"min_gain='0.1 per furlong'"),
    ({"min_gain": "nan per doubling"}, r"min_gain='nan per doubling'"),
    ({"monitor": ""}, r"monitor='' must name a validation metric"),
    ({"monitor": " "}, r"monitor=' ' must name a validation metric"),
    ({"monitor": 3}, r"monitor=3 must name a validation metric"),
    ({"mode": "maximum"}, r"mode='maximum' is not valid; choose 'max' \(accuracy-like\), 'min'"),
    ({"patience": 0}, r"patience=0 must be an integer >= 1"),
    ({"patience": 2.5}, r"patience=2.5 must be an integer >= 1"),
    ({"patience": True}, r"patience=True must be an integer >= 1"),
    ({"min_evaluations": 1}, r"min_evaluations=1 must be an integer >= 2"),
    ({"strict": "yes"}, r"strict='yes' must be True or False"),
    ({"verbose": 1}, r"verbose=1 must be True or False"),
])
def test_every_argument_is_checked_and_the_error_names_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficiencyStopper(**kwargs)


def test_statistics_name_follows_the_resolved_monitor():
    stopper = EfficiencyStopper()
    stopper.resolve("eval_loss", "min")
    assert (stopper.monitor, stopper.plateau.mode) == ("eval_loss", "min")
    stop, stats, _ = run(stopper, linear_energy(20), [0.3] * 20, "eval_loss")
    assert stop == 7 and list(stats[-1]) == ["stopping/eval_loss_gain_pct_per_doubling"]


def climbing_2pct_per_doubling(j: float) -> float:
    return 0.5 * 1.02 ** math.log2(j)  # gains exactly 2 % per doubling of energy, for ever


@pytest.mark.parametrize("scale", [1e-3, 1.0, 2.5e6])
def test_with_less_than_a_doubling_left_the_gain_left_is_held_against_min_gain(scale):
    joules = [scale * 100.0 * i for i in range(1, 151)]
    values = [climbing_2pct_per_doubling(j / scale) for j in joules]
    # unbounded (no max_steps): 2 % per doubling is worth it (the default min_gain is 1 %), the run goes on
    assert run(EfficiencyStopper(monitor="val_acc"), joules, values)[0] is None
    # ending at 150 units: from j >= 150/sqrt(2) (unit 107) the half doubling left buys <= 1 %
    stopper = EfficiencyStopper(monitor="val_acc")
    for i, (j, v) in enumerate(zip(joules, values, strict=True)):
        progress = Progress(so_far=Totals(j=j), step=i, metrics={"val_acc": v}, evaluation=True,
                            rate_per_step=Totals(j=scale * 100.0), remaining_steps=float(149 - i))
        decision = stopper.check(progress)
        if decision.should_stop:
            break
    assert i + 1 == 109  # units 107, 108 and 109: patience 3
    stats = stopper.statistics()
    assert stats["stopping/val_acc_gain_pct_per_doubling"] == pytest.approx(2.0, rel=1e-6)
    assert stats["stopping/val_acc_gain_pct_to_end"] == pytest.approx(2 * math.log2(150 / 109), rel=1e-6)
    assert "doublings of energy left to the run's end would buy" in decision.message
    assert decision.message.endswith("in a row (where less than a doubling of energy was left, the gain left to the "
                                     "run's end)"), "what the patience counted, said"


def test_a_stop_that_says_the_gain_left_to_the_end_counted_gives_its_figure():
    # a streak begun by the gain to the end and ended below min_gain per doubling said "(where less than a doubling
    # of energy was left, the gain left to the run's end)" with no figure for it anywhere in the message
    joules = [100.0 * i for i in range(1, 151)]
    stopper = EfficiencyStopper(monitor="val_acc", patience=20)
    for i, j in enumerate(joules):
        v = climbing_2pct_per_doubling(j) if i < 90 else climbing_2pct_per_doubling(joules[90])  # then flat
        progress = Progress(so_far=Totals(j=j), step=i, metrics={"val_acc": v}, evaluation=True,
                            rate_per_step=Totals(j=100.0), remaining_steps=float(149 - i))
        decision = stopper.check(progress)
        if decision.should_stop:
            break
    assert stopper.plateau.gain <= 1.0 and stopper.plateau.to_end_in_wait
    left = math.log2(150 / (i + 1))
    assert f"and the {left:.2f} doublings of energy left to the run's end would buy " \
           f"{stopper.plateau.gain_to_end:.4g} %" in decision.message


def test_verbose_shows_the_gain_left_to_the_end_where_that_is_what_is_held_against_min_gain(caplog):
    # 2 % per doubling, above min_gain; with less than a doubling left, the gain to the end decides: the verbose
    # line said "gained 2 % per doubling, 1/3 at or below min_gain='1% per doubling'", a contradiction
    stopper = EfficiencyStopper(monitor="val_acc", verbose=True)
    with caplog.at_level(logging.WARNING, logger="green_callbacks"):
        for i in range(1, 120):
            j = 100.0 * i
            stopper.check(Progress(so_far=Totals(j=j), step=i, metrics={"val_acc": climbing_2pct_per_doubling(j)},
                                   evaluation=True, rate_per_step=Totals(j=100.0), remaining_steps=float(150 - i)))
    lines = [r.getMessage() for r in caplog.records if "1/3 at or below" in r.getMessage()]
    assert lines and all("% in the energy left to the run's end" in line for line in lines), lines[:1]


def test_an_exchange_rate_ignores_the_runs_end():
    policy = EfficiencyPlateau("val_acc", "max", "1e-9 per kWh", patience=1)
    decisions = [policy.update(climbing_2pct_per_doubling(j), j, 150.0) for j in range(1, 150)]
    assert not any(d.should_stop for d in decisions) and policy.gain_to_end is None
