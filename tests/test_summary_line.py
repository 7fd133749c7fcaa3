"""The summary line starts a line of its own, also below a live progress bar."""

from __future__ import annotations

import sys

import pytest

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


def test_an_intensity_series_is_what_the_params_and_the_summary_say(tmp_path, fake_nvml, capsys):
    """With ``carbon_intensity_csv``, the params, summary.json and the printed line said "481 g/kWh, world average":
    the figure used where none is given, not the series the emissions came from."""
    import json
    import time

    from green_callbacks import EnergyTracker

    series = tmp_path / "grid.csv"
    now = time.time()
    series.write_text("timestamp,g_per_kwh\n" + "".join(f"{now + k * 3600:.0f},{g}\n"
                                                        for k, g in ((-2, 200), (-1, 100), (1, 300))))
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    tracker = EnergyTracker(gpus="all", measure_cpu=False, mlflow=False, output_dir=str(tmp_path), pue=1.5,
                            carbon_intensity_csv=str(series))
    params = tracker.accountant.as_params()
    assert params["carbon_intensity_g_per_kwh"] == "time series"
    assert params["carbon_intensity_label"].startswith("time series grid.csv: 100-300 g/kWh from ")
    assert params["carbon_intensity_series"] == str(series.resolve())
    with tracker, tracker.epoch(0):
        fake_nvml.advance(36.0)  # 3600 J: 0.001 kWh, x 1.5 at the meter, at the series' 100 g/kWh now
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("green-callbacks [finished]"))
    assert "100 g/kWh, the mean of grid.csv over the run, PUE 1.5" in line and "481" not in line, line
    (path,) = tmp_path.rglob("summary.json")
    written = json.loads(path.read_text())
    assert written["carbon_intensity_g_per_kwh"] == "100" and written["emissions_g"] == pytest.approx(0.15)
