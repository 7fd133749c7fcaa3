"""The green-callbacks command: probe, intensity, report; clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_lightning_monitor import ValModel, trainer

from green_callbacks.cli import main as cli
from green_callbacks.lightning import EnergyMonitor

from helpers import ready_store


def test_probe_without_any_measurable_sensor_says_so_and_fails():
    if any(Path("/sys/class/powercap").glob("intel-rapl:*")) or Path("/dev/nvidiactl").exists():
        pytest.skip("this machine can measure something: the 'nothing measurable' path needs one that cannot")
    proc = subprocess.run([sys.executable, "-m", "green_callbacks.cli", "probe", "--seconds", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "cpu" in proc.stdout and "estimated" in proc.stdout
    assert "Nothing here is measured" in proc.stdout
    # no RAPL zone at all (this VM): a chmod of files that do not exist would be no fix
    assert "shows no RAPL zone" in proc.stdout and "sudo chmod" not in proc.stdout


def test_probe_with_a_simulated_gpu_succeeds(fake_nvml, capsys):
    fake_nvml.configure(n=2)
    assert cli(["probe", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("gpu ")]
    assert len(rows) == 2 and all(" counter " in r for r in rows) and "Fake H100" in out
    assert "gpu: window edges read the counter (a counter read costs" in out  # a fast counter: read at edges


def test_probe_shows_no_power_for_a_gpu_it_cannot_measure(fake_nvml, capsys):
    # a MIG slice printed "unavailable 0.0 W", a reading of zero watts
    fake_nvml.configure([{}, {"mig": True}])
    assert cli(["probe", "--seconds", "0.2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("gpu ")]
    assert len(rows) == 2 and rows[0][-3] == "counter" and float(rows[0][-2]) > 0 and rows[0][-1] == "W"
    assert rows[1][-2:] == ["unavailable", "-"]


@pytest.mark.parametrize(("argv", "bad"), [(["probe", "--seconds", "-1"], "'-1'"),
                                           (["replay", "x.jsonl", "--wait", "nan"], "'nan'"),
                                           (["probe", "--seconds", "1e300"], "'1e300'"),
                                           (["replay", "x.jsonl", "--wait", "1e9"], "'1e9'")])
def test_seconds_that_cannot_be_waited_are_an_error_naming_the_option(argv, bad, capsys):
    """``probe --seconds -1`` ended in Python's "sleep length must be non-negative" traceback, ``1e300`` in an
    OverflowError one, and ``1e9`` slept for 31 years."""
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --{argv[-2][2:]}: {bad}: seconds must be a number from 0 to 604800 (a week)" in err


def test_version_says_the_installed_version(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as done:
        cli(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"green-callbacks {version('green-callbacks')}"


def test_intensity(capsys):
    assert cli(["intensity", "SE"]) == 0
    assert "Sweden (SWE)" in capsys.readouterr().out
    assert cli(["intensity", "gcp:us-central1"]) == 0
    assert "cloud.google.com" in capsys.readouterr().out
    assert cli(["intensity", "Swedn"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean:" in err and "Sweden" in err
    assert cli(["intensity", ""]) == 2  # an empty name is a value, not "none given" (the world average)
    assert "unknown country ''" in capsys.readouterr().err
    assert cli(["intensity", "--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 213 + 40
    assert cli(["intensity", "--list", "XX"]) == 2  # the name was ignored without a word
    assert "give 'XX' without --list" in capsys.readouterr().err


@pytest.mark.slow
def test_report_table_csv_markdown_and_pareto_plot(tmp_path, capsys):
    uri = ready_store(tmp_path)
    from lightning.pytorch.loggers import MLFlowLogger

    for name, epochs in (("short", 1), ("long", 3)):
        logger = MLFlowLogger(experiment_name="rep", tracking_uri=uri, run_name=name)
        trainer(tmp_path, [EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)],
                max_epochs=epochs, logger=logger).fit(ValModel())
    csv, md, png = tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "p.png"
    assert cli(["report", "rep", "--tracking-uri", uri, "--metric", "val_score", "--csv", str(csv),
                "--markdown", str(md), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "short" in out and "long" in out and "value_per_kj" in out and "training_j" in out
    import pandas as pd

    frame = pd.read_csv(csv)
    assert sorted(frame["run"]) == ["long", "short"]
    assert list(frame["training_j"]) == sorted(frame["training_j"])  # cheapest first (CPU estimates: either order)
    assert frame["value_per_kj"].iloc[0] == pytest.approx(frame["value"].iloc[0] / (frame["training_j"].iloc[0] / 1000))
    assert md.read_text().startswith("| run | run_id | status | training_j")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli(["report", "rep", "--tracking-uri", uri, "--metric", "val_f1"]) == 2
    err = capsys.readouterr().err  # with what they do log, the energy's own names aside
    assert "metric 'val_f1' is in no run of 'rep'; the runs log [" in err and "'val_loss'" in err
    assert "energy/" not in err.split("the runs log")[1]
    assert cli(["report", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "'rep'" in err


def test_report_a_bare_name_that_is_no_store_is_named(tmp_path, monkeypatch, capsys):
    """A relative path that is not there got MLflow's text about a file store in maintenance mode."""
    monkeypatch.chdir(tmp_path)
    assert cli(["report", "exp", "--tracking-uri", "not a uri"]) == 2
    assert f"no MLflow store at {tmp_path / 'not a uri'} (tracking URI not a uri)" in capsys.readouterr().err


def test_report_bad_tracking_uri_is_a_clear_error(capsys):
    """A scheme MLflow has no store for was MLflow's text about its model registry; now the schemes to choose from,
    before MLflow is asked."""
    assert cli(["report", "x", "--tracking-uri", "htp://nowhere"]) == 2
    err = capsys.readouterr().err
    assert "error: --tracking-uri='htp://nowhere': MLflow has no tracking store for the scheme 'htp'; choose from " \
           "['file', 'http', 'https'" in err and "registry" not in err
