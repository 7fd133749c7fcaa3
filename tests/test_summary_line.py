"""The summary line starts a line of its own, also below a live progress bar."""

from __future__ import annotations

import sys

from green_callbacks.outputs import say


def test_the_summary_clears_a_live_bar_and_starts_its_own_line(capsys):
    from tqdm import tqdm

    bar = tqdm(total=10, file=sys.stderr, ascii=True, bar_format="{n}/{total}")
    bar.update(3)
    capsys.readouterr()
    say("green-callbacks [finished]: 2 epochs")
    out, err = capsys.readouterr()
    bar.close()
    assert out == "\ngreen-callbacks [finished]: 2 epochs\n"
    assert err.startswith("\r"), "the live bar was wiped before the line was written"
    assert "3/10" in err, "and drawn again after it"


def test_without_tqdm_a_newline_still_comes_first(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    say("green-callbacks [killed]: 0 epochs")
    assert capsys.readouterr().out == "\ngreen-callbacks [killed]: 0 epochs\n"


def test_a_small_runs_emissions_and_kwh_are_not_printed_as_zero(tmp_path, fake_nvml, capsys):
    """A short run printed "0.000000 kWh), 0.000 gCO2e" beside "cost 5e-08 EUR": a figure that is not zero is shown
    to three significant digits where the fixed places would round it away."""
    from green_callbacks import EnergyTracker

    fake_nvml.configure([{"profile": [[1.0, 10.0]]}], work_clock=True)
    tracker = EnergyTracker(gpus="all", measure_cpu=False, mlflow=False, output_dir=str(tmp_path), country="FR",
                            price_per_kwh=0.2, currency="EUR")
    with tracker, tracker.epoch(0):
        fake_nvml.advance(0.5)  # 5 J: 1.39e-06 kWh
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("green-callbacks [finished]"))
    assert "5.0 J (1.39e-06 kWh)" in line and "0.000 gCO2e" not in line and "e-05 gCO2e" in line, line  # (FR, 56 g/kWh)
