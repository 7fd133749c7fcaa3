"""Careless input: a clear error naming the value before training, or a correct run."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hf_monitor import digits, hf_trainer  # noqa: F401 - digits is a fixture
from test_intervals import CountSteps, lightning_fit
from torch.utils.data import IterableDataset

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt

from helpers import DigitsDataset, digits_tensors, lightning_digits_module


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mlflow": "false"}, r"mlflow='false' must be True or False"),
    ({"measure_cpu": "no"}, r"measure_cpu='no' must be True or False"),
    ({"pue": True}, r"pue=True must be a finite number"),
    ({"pue": 1e308}, r"pue=1e\+308 must be a finite number in \[1, 10\]"),
    ({"gpus": b"all"}, r"gpus=b'all' is not valid; choose \"auto\", \"all\""),
    ({"sampling_period_s": 1e-9}, r"sampling_period_s=1e-09 must be a finite number in \[0.005, 60\]"),
    ({"currency": "euro"}, r"currency='euro' must be an ISO 4217 code"),
    ({"currency": None}, r"currency=None must be an ISO 4217 code"),
    # three letters that are no currency (it was accepted, and the run's cost was labelled "XYZ")
    ({"currency": "XYZ"}, r"currency='XYZ': 'XYZ' is not an ISO 4217 currency code; write one like EUR, USD"),
    ({"currency": "eut"}, r"currency='eut': 'eut' is not an ISO 4217 currency code; did you mean EUR"),
    ({"output_dir": None}, r"output_dir=None must be a non-empty string"),
    ({"experiment_name": "x" * 501}, r"experiment_name of 501 characters: MLflow accepts at most 500"),
    ({"log_every_n_steps": 0}, r"log_every_n_steps=0 must be an integer >= 1"),
    # YAML 1.1 reads an unquoted NO (Norway) as False: the message named False and nothing else
    ({"country": False}, r"country=False must be a non-empty string; a YAML file reads an unquoted NO.*quote it"),
    ({"carbon_intensity_csv": "/nonexistent/series.csv"},
     r"carbon_intensity_csv='/nonexistent/series.csv' cannot be read \(No such file or directory\); give the path"),
])
def test_bad_monitor_arguments_name_the_value_and_the_choices(kwargs, message):
    for module in (gl, gt):
        with pytest.raises(ValueError, match=message):
            module.EnergyMonitor(**kwargs)


def test_a_cost_budget_in_a_currency_that_does_not_exist_is_refused_and_a_bare_one_takes_the_prices():
    with pytest.raises(ValueError, match=r"cost='2 XYZ': 'XYZ' is not an ISO 4217 currency code"):
        gl.EnergyBudget(cost="2 XYZ")
    assert gl.EnergyBudget(cost="2 usd").budget.currency == "USD"
    # a bare amount is in the price's currency: the stop message said "the budget of 2", no currency
    budget = gl.EnergyBudget(cost=2)
    gl.EnergyMonitor(price_per_kwh=0.3, currency="GBP", mlflow=False).attach(budget)
    assert budget.budget.describe(budget.budget._limits()[0][0], 2.0) == "2 GBP"
    # pence, cents, agorot as they are written: read as pounds, rand, shekels, the budget was 100 times larger
    for minor, major in (("GBp", "GBP"), ("ZAc", "")):
        code = f", {major}" if major else ""
        with pytest.raises(ValueError, match=rf"cost='3 {minor}': '{minor}' is how a currency's minor unit is "
                                             rf"written .*main unit with its ISO 4217 code{code} \(EUR"):
            gl.EnergyBudget(cost=f"3 {minor}")
        with pytest.raises(ValueError, match=rf"currency='{minor}': '{minor}' is how"):
            gt.EnergyMonitor(price_per_kwh=30, currency=minor)
    assert gl.EnergyBudget(cost="2 Eur").budget.currency == "EUR"


def test_numpy_numbers_from_a_config_or_an_array_are_numbers():
    """``pue=np.float32(1.2)`` was refused as "must be a finite number", ``patience=np.int64(3)`` as "must be an
    integer": a value read from an array or a NumPy-built config is one."""
    import numpy as np

    for module in (gl, gt):
        monitor = module.EnergyMonitor(pue=np.float32(1.25), log_every_n_steps=np.int64(7), mlflow=False)
        assert monitor.log_every_n_steps == 7 and type(monitor.log_every_n_steps) is int
        stopper = module.EfficiencyEarlyStopping(patience=np.int64(4), min_evaluations=np.int32(3))
        assert (stopper.plateau.patience, stopper.plateau.min_evaluations) == (4, 3)
        budget = module.EnergyBudget(energy=np.float32(1000), check_every_n_steps=np.int64(10))
        assert budget.budget.energy_j == 1000 and budget.check_every_n_steps == 10
        with pytest.raises(ValueError, match=r"patience=.*True.* must be an integer >= 1"):
            module.EfficiencyEarlyStopping(patience=np.bool_(True))
    # HF writes each callback's arguments into trainer_state.json at every checkpoint: json.dumps refused np.float32
    # there, inside HF's save, and the training died
    import json

    for callback in (gt.EnergyMonitor(pue=np.float32(1.25), gpus=[np.int64(0)], mlflow=False),
                     gt.EfficiencyEarlyStopping(patience=np.int64(4)), gt.EnergyBudget(energy=np.float32(1000))):
        assert json.loads(json.dumps(callback.state()))["args"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"energy": "1,5 kWh"}, r"energy='1,5 kWh' is not '<number> <unit>'; the units: J, kJ, MJ, Wh, kWh, MWh; the "
                            r"decimal point is '.'"),
    ({"emissions": "1.5 kg CO2 per run"}, r"emissions='1.5 kg CO2 per run' is not '<number> <unit>'; the units: g, "
                                          r"kg, t"),
    ({"cost": "$3"}, r"cost='\$3' is not '<number> <unit>'; the units: an ISO 4217 currency code after the amount, "
                     r"like '0.5 EUR'"),
    # a string without its unit (an environment variable through Hydra's oc.env, a quoted YAML value) was read as
    # joules (grams): a 2.5-J budget, which the run's first check exceeds
    ({"energy": "2.5"}, r"energy='2.5' is a string without a unit; write the unit, like '2.5 kWh' \(the units: J, "
                        r"kJ, MJ, Wh, kWh, MWh\), or give a number, which is in joules"),
    ({"emissions": "300"}, r"emissions='300' is a string without a unit; write the unit, like '300 kg' \(the units: "
                           r"g, kg, t\), or give a number, which is in grams"),
])
def test_a_malformed_budget_names_the_units_it_takes(kwargs, message):
    for module in (gl, gt):
        with pytest.raises(ValueError, match=message):
            module.EnergyBudget(**kwargs)


@pytest.mark.parametrize("text", ["1.5 kg", "1.5 kgCO2e", "1.5 kg CO2eq", "1.5kgCO2eq", "1.5 kg CO2-eq", "1.5 kg CO2",
                                  "1.5 kg CO₂e", "1.5 kg CO2 equivalent", "1500 g CO2e", "0.0015 t CO2eq"])
def test_an_emissions_budget_takes_co2_equivalent_as_people_write_it(text):
    for module in (gl, gt):
        assert module.EnergyBudget(emissions=text).budget.emissions_g == pytest.approx(1500.0)


def test_an_intensity_series_saved_by_excel_reads():
    """Excel's "CSV UTF-8" starts with a byte-order mark: it was refused as "Invalid isoformat string"."""
    import tempfile
    from pathlib import Path

    from green_callbacks.accounting import IntensitySeries

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "series.csv"
        path.write_bytes("\ufefftimestamp,g_per_kwh\r\n2026-01-01T00:00,100\r\n2026-01-01T01:00,300\r\n".encode())
        assert IntensitySeries(path).values == [100.0, 300.0]


def test_a_cost_budget_in_energy_units_is_refused():
    with pytest.raises(ValueError, match=r"cost='0.5 kWh': 'kWh' is a unit of energy or mass, not a currency"):
        gl.EnergyBudget(cost="0.5 kWh")
    for cost in ("0.5 CO2", "0.5 kg CO2"):  # a mass of emissions given as money (it was read as 0.5 EUR)
        with pytest.raises(ValueError, match=rf"cost='{cost}': CO2 is a mass of emissions.*emissions='300 g'"):
            gl.EnergyBudget(cost=cost)
    # an int no float holds: named, not an OverflowError, and not written out in its 401 digits
    with pytest.raises(ValueError, match=r"^energy=<an integer of 401 digits> is too large to be an amount"):
        gl.EnergyBudget(energy=10**400)


def test_a_stopper_with_nothing_measured_fails_before_the_first_step(tmp_path):
    counter = CountSteps()
    with pytest.raises(ValueError, match=r"EnergyBudget cannot act: nothing is measured here \(gpus=None, "
                                         r"measure_cpu=False"):
        lightning_fit(tmp_path, lightning_digits_module()(), [
            gl.EnergyMonitor(gpus=None, measure_cpu=False, mlflow=False), gl.EnergyBudget(energy="1 kJ"), counter],
            max_epochs=2)
    assert counter.steps == 0


def test_hf_stopper_with_nothing_measured_fails_before_the_first_step(tmp_path, digits):  # noqa: F811
    monitor = gt.EnergyMonitor(gpus=None, measure_cpu=False, mlflow=False)
    with pytest.raises(ValueError, match=r"EfficiencyEarlyStopping cannot act: nothing is measured"):
        hf_trainer(tmp_path, digits, [monitor, gt.EfficiencyEarlyStopping(monitor="accuracy")]).train()
    assert not monitor.started, "the run ends with the error (HF tells no callback of it)"


def test_two_monitors_in_one_lightning_trainer_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match=r"two EnergyMonitors in one Trainer: keep one"):
        lightning_fit(tmp_path, lightning_digits_module()(), [gl.EnergyMonitor(mlflow=False),
                                                              gl.EnergyMonitor(gpus="all", mlflow=False)], max_epochs=1)


def test_two_monitors_in_one_hf_trainer_say_what_to_change(tmp_path, digits):  # noqa: F811
    """Both were taken: two summaries of one training, each metric logged twice."""
    trainer = hf_trainer(tmp_path, digits, [gt.EnergyMonitor(mlflow=False), gt.EnergyMonitor(mlflow=False)])
    with pytest.raises(ValueError, match=r"two EnergyMonitors in one Trainer: keep one"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(("uri", "message"), [
    ("htp://localhost:5000", r"tracking_uri='htp://localhost:5000': MLflow has no tracking store for the scheme "
                             r"'htp'; choose from \['file', 'http', 'https'"),
    ("http://", r"tracking_uri='http://' names no host"),
    ("http://localhost:notaport", r"tracking_uri='http://localhost:notaport' is not a URI MLflow can open \(Port"),
    ("https://host:99999", r"is not a URI MLflow can open \(Port out of range"),
    ("sqlite://", r"tracking_uri='sqlite://' names no database file \(an in-memory store"),
    ("sqlite:///:memory:", r"names no database file"),
])
def test_a_tracking_uri_mlflow_could_never_open_is_refused_before_training(uri, message):
    """A misspelt scheme was accepted, the training ran, and its end said MLflow "has not taken the records yet",
    as if the server were only down."""
    for module in (gl, gt):
        with pytest.raises(ValueError, match=message):
            module.EnergyMonitor(tracking_uri=uri)


def test_tracking_uris_mlflow_opens_are_taken_and_a_bad_one_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # file stores: see the test below
    for uri in ("sqlite:///mlflow.db", "sqlite:////tmp/x.db?timeout=30", "http://user:pw@127.0.0.1:5000",
                "https://mlflow.example.com", "file:///tmp/mlruns", "mlruns", "databricks", "databricks://profile",
                "postgresql+psycopg2://u:p@db/mlflow", "mysql://db/mlflow", r"C:\mlruns"):
        gl.EnergyMonitor(tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://bad:5000")
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='htp://bad:5000': MLflow has no tracking store"):
        gl.EnergyMonitor()
    gl.EnergyMonitor(mlflow=False)  # nothing is sent: the variable is not this run's business


@pytest.mark.parametrize("module", [gl, gt])
def test_a_file_store_mlflow_refuses_is_an_error_before_training(monkeypatch, module):
    """MLflow 3.13+ refuses a file store (``./mlruns``, ``file:``, a folder path) unless MLFLOW_ALLOW_FILE_STORE is
    true: it was taken, the training ran, and "nothing more can be sent" came after it, the records left in the
    spool. ``mlflow.db`` without ``sqlite:///`` is such a folder to MLflow."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("file:./mlruns", "./mlruns", "mlflow.db", "/tmp/runs", "file:///tmp/mlruns"):
        with pytest.raises(ValueError, match=rf"tracking_uri='{re.escape(uri)}' names a file store .* refuses unless "
                                             r"MLFLOW_ALLOW_FILE_STORE=true; choose a database store, like "
                                             r"'sqlite:///mlflow.db'"):
            module.EnergyMonitor(tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='./mlruns' names a file store"):
        module.EnergyMonitor()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")
    with pytest.raises(ValueError, match=r"MLFLOW_ALLOW_FILE_STORE='yes' is not a value MLflow reads; choose from "):
        module.EnergyMonitor()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "1")
    module.EnergyMonitor()


def test_paths_may_be_pathlib_paths_and_one_intensity_source_is_taken(tmp_path):
    from pathlib import Path

    assert gl.EnergyMonitor(output_dir=tmp_path / "out", mlflow=False).output_dir == tmp_path / "out"
    series = tmp_path / "series.csv"
    series.write_text("timestamp,g_per_kwh\n2026-01-01T00:00:00,100\n")
    assert gl.EnergyMonitor(carbon_intensity_csv=Path(series), mlflow=False).accountant.series is not None
    for other in ({"country": "FR"}, {"carbon_intensity_g_per_kwh": 300}, {"cloud_region": "aws:eu-west-3"}):
        key = next(iter(other))
        with pytest.raises(ValueError, match=rf"carbon intensity is set more than once \(carbon_intensity_csv="
                                             rf".*series.csv', {key}=.*\); choose one of carbon_intensity_csv"):
            gl.EnergyMonitor(carbon_intensity_csv=str(series), **other)


def test_an_empty_list_of_gpus_is_no_gpu(green_log):
    """``gpus=[]`` was taken as a selection NVML could not meet: a warning that it "sees no GPU"."""
    monitor = gl.EnergyMonitor(gpus=[], mlflow=False, log_artifacts=False)
    assert monitor.gpus is None
    from green_callbacks.sensors import build_sensors

    assert [s.component for s in build_sensors(monitor.gpus, measure_cpu=False)] == []
    assert not [r for r in green_log.records if r.levelno >= 30]


def test_a_budget_that_a_price_or_intensity_of_zero_keeps_at_zero_is_refused():
    with pytest.raises(ValueError, match=r"EnergyBudget\(cost='1e-06 EUR'\) can never be reached: the "
                                         r"EnergyMonitor's price_per_kwh=0"):
        gl.EnergyMonitor(price_per_kwh=0, mlflow=False).attach(gl.EnergyBudget(cost="1e-06 EUR"))
    with pytest.raises(ValueError, match=r"EnergyBudget\(emissions='1 g'\) can never be reached: the "
                                         r"EnergyMonitor's carbon intensity is 0 g/kWh"):
        gl.EnergyMonitor(carbon_intensity_g_per_kwh=0, mlflow=False).attach(gl.EnergyBudget(emissions="1 g"))
    gl.EnergyMonitor(carbon_intensity_g_per_kwh=0, mlflow=False).attach(gl.EnergyBudget(energy="1 kJ"))


def test_a_series_of_zero_intensity_is_refused_with_an_emissions_budget_and_one_past_the_cap_is_refused(tmp_path):
    """A carbon_intensity_csv of zeros let an emissions budget train to its end at 0 g, unsaid (an intensity of 0
    is refused); one of 1e308 g/kWh was read (the summary printed a 300-digit figure), where the setting caps 5000."""
    zeros = tmp_path / "zeros.csv"
    zeros.write_text("timestamp,g_per_kwh\n2026-01-01T00:00:00Z,0\n2026-06-01T00:00:00Z,0\n")
    with pytest.raises(ValueError, match=r"EnergyBudget\(emissions='1 g'\) can never be reached: .*a "
                                         r"carbon_intensity_csv of zeros"):
        gl.EnergyMonitor(carbon_intensity_csv=str(zeros), mlflow=False).attach(gl.EnergyBudget(emissions="1 g"))
    some = tmp_path / "some.csv"
    some.write_text("timestamp,g_per_kwh\n2026-01-01T00:00:00Z,0\n2026-06-01T00:00:00Z,250\n")
    gl.EnergyMonitor(carbon_intensity_csv=str(some), mlflow=False).attach(gl.EnergyBudget(emissions="1 g"))
    huge = tmp_path / "huge.csv"
    huge.write_text("timestamp,g_per_kwh\n2026-01-01T00:00:00Z,300\n2026-06-01T00:00:00Z,1e308\n")
    with pytest.raises(ValueError, match=r"huge.csv:3: .*a finite number of g/kWh in \[0, 5000\]"):
        gl.EnergyMonitor(carbon_intensity_csv=str(huge), mlflow=False)


@pytest.mark.parametrize("name", ["RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID"])
def test_a_launcher_variable_that_is_no_number_is_named(monkeypatch, name):
    from green_callbacks.distributed import RankInfo

    for other in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "abc")
    with pytest.raises(ValueError, match=rf"the environment variable {name}='abc' must be an integer >= 0"):
        RankInfo.from_env()
    monkeypatch.setenv(name, " ")
    assert RankInfo.from_env().rank == 0, "set but empty: as unset"


def test_from_file_names_a_path_that_is_no_file_and_an_argument_that_is_not_one(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ValueError, match=r"dir.yaml: the config file cannot be read \(Is a directory\)"):
        gl.EnergyBudget.from_file(tmp_path / "dir.yaml")
    for path in (None, 5, ""):
        with pytest.raises(ValueError, match=rf"path={path!r} must be the path of a .yaml, .yml or .toml file"):
            gl.EnergyBudget.from_file(path)
    with pytest.raises(FileNotFoundError, match=r"missing.yaml: no such config file"):
        gl.EnergyBudget.from_file(tmp_path / "missing.yaml")
    good = tmp_path / "green.yaml"
    good.write_text("budget:\n  energy: 1 kWh\n")
    with pytest.raises(ValueError, match=r"EnergyBudget.from_file\(..., bogus=\): not an argument of EnergyBudget; "
                                         r"choose from \['energy', 'emissions', 'cost'"):
        gl.EnergyBudget.from_file(good, bogus=1)
    assert gl.EnergyBudget.from_file(good, on_exceed="warn").budget.on_exceed == "warn"


class Stream(IterableDataset):
    def __init__(self, data) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data[i] for i in range(len(self.data)))


def test_hf_evaluate_on_an_iterable_dataset_is_measured(tmp_path, digits):  # noqa: F811
    monitor = gt.EnergyMonitor(mlflow=False, log_artifacts=False)
    trainer = hf_trainer(tmp_path, digits, [monitor], epochs=1)
    (_, _), (xv, yv) = digits_tensors()
    metrics = trainer.evaluate(Stream(DigitsDataset(xv[:96], yv[:96])))
    assert "eval_accuracy" in metrics
    assert monitor.stage_counts == {"evaluate": 1}


# -- files: config and intensity series -------------------------------------------------------------
@pytest.mark.parametrize(("name", "content", "message"), [
    ("dup.yaml", b"green-callbacks:\n  budget:\n    energy: 1 kWh\n    energy: 500 kWh\n",
     r"dup.yaml: not valid YAML: duplicate key 'energy' \(line 3 and line 4\)"),
    ("dup2.yaml", b"budget:\n  energy: 1 kWh\nbudget:\n  energy: 2 kWh\n",
     r"duplicate key 'budget' \(line 1 and line 3\)"),
    ("flow.yaml", b"budget: {energy: 1 kWh, energy: 500 kWh}\n",  # one line, as a flow mapping writes it
     r"flow.yaml: not valid YAML: duplicate key 'energy' \(line 1, columns 10 and 25\)"),
    ("flow2.yaml", b"{budget: {energy: 1 kWh}, budget: {energy: 500 kWh}}\n", r"duplicate key 'budget' \(line 1, col"),
    ("dup.toml", b"[green-callbacks.budget]\nenergy = '1 kWh'\nenergy = '5 kWh'\n",
     r"dup.toml: not valid TOML: Cannot overwrite a value \(at line 3"),
    ("latin1.yaml", "budget:\n  energy: 1 kWh  # Énergie\n".encode("latin-1"),
     r"latin1.yaml: not a UTF-8 text file \(byte 27 is 0xc9\); save it as UTF-8 YAML"),
    ("latin1.toml", "[budget]\nenergy = '1 kWh' # é\n".encode("latin-1"), r"latin1.toml: not a UTF-8 text file"),
    ("tool.toml", b"tool = 5\n", r"tool.toml: 'tool' must be a table of settings, not int 5"),
    ("gc.toml", b"[tool]\ngreen-callbacks = 'yes'\n", r"'tool.green-callbacks' must be a table of settings, not str"),
    ("list.yaml", b"- budget\n", r"list.yaml: the file must hold a table of settings, not list"),
    ("section.toml", b"[green-callbacks]\nbudget = 3\n", r"'budget' must be a table of settings, not 3"),
])
def test_bad_config_files_name_the_file_and_what_is_wrong(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        gl.EnergyBudget.from_file(path)


def test_a_config_section_at_the_top_level_still_reads(tmp_path):
    path = tmp_path / "green.yaml"
    path.write_text("budget:\n  energy: 1 kWh\n")
    assert gt.EnergyBudget.from_file(path).budget.energy_j == 3.6e6


@pytest.mark.parametrize(("rows", "message"), [
    (b"timestamp,g_per_kwh\n2026-01-01T00:00,100\n2026-01-01T01:00,nan\n",
     r"series.csv:3: \['2026-01-01T01:00', 'nan'\]: "
     r"the timestamp must be finite and the carbon intensity a finite number of g/kWh in \[0, 5000\]"),
    (b"0,100\n3600,inf\n", r"series.csv:2: .*finite number"),
    (b"0,100\n3600,-5\n", r"series.csv:2: .*in \[0, 5000\]"),
    (b"nan,100\n", r"series.csv:1: \['nan', '100'\]: the timestamp must be finite"),
    (b"0,100\n3600,200\n0,300\n", r"series.csv: lines 1 and 3 give the same timestamp"),
    (b"2026-01-01T00:00Z,100\n1767225600,5\n", r"series.csv: lines 1 and 2 give the same timestamp"),
    (b"0,100\n\xff\xfe,3\n", r"carbon_intensity_csv='.*series.csv': not a UTF-8 text file \(byte 6\)"),
])
def test_bad_intensity_series_fail_at_construction(tmp_path, rows, message):
    path = tmp_path / "series.csv"
    path.write_bytes(rows)
    for module in (gl, gt):
        with pytest.raises(ValueError, match=message):
            module.EnergyMonitor(carbon_intensity_csv=str(path), mlflow=False)


def test_links_planted_at_output_paths_are_not_followed(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    monitor = gl.EnergyMonitor(mlflow=False, output_dir=str(out), log_artifacts=["summary", "intervals"])
    out.mkdir()
    monitor.run_folder.symlink_to(victim, target_is_directory=True)  # the run's folder, planted before the run
    lightning_fit(tmp_path, lightning_digits_module()(), [monitor], max_epochs=1)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not monitor.run_folder.is_symlink() and (monitor.run_folder / "summary.json").is_file()

    second = gl.EnergyMonitor(mlflow=False, output_dir=str(out), log_artifacts=["summary"])
    second.run_folder.mkdir()
    (second.run_folder / "summary.json").symlink_to(victim / "keep.txt")  # a file link
    lightning_fit(tmp_path, lightning_digits_module()(), [second], max_epochs=1)
    assert (victim / "keep.txt").read_text() == "mine"
    assert not (second.run_folder / "summary.json").is_symlink()


# -- fuzzing the shapes a careless user gives: each refused with its own name, never taken as something else --------
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NUMBERS = ("sampling_period_s", "pue", "price_per_kwh", "cpu_tdp_w", "carbon_intensity_g_per_kwh", "log_every_s")
EXTREME = st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -1e308, 1.7976931348623157e308])
not_a_bool = st.one_of(st.sampled_from(["false", "no", "0", "off", "True", ""]), st.text(max_size=6),
                       st.binary(max_size=6), st.integers(), st.floats(allow_nan=True))
not_a_number = st.one_of(st.booleans(), EXTREME, st.text(max_size=6), st.binary(max_size=6),
                         st.sampled_from(["0.5", "1e-3", "1 kWh"]))


@FUZZ
@given(name=st.sampled_from(("measure_cpu", "mlflow", "cuda_sync")), value=not_a_bool)
def test_fuzz_strings_bytes_and_numbers_for_booleans_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name}=.* must be True or False"):
        gl.EnergyMonitor(**{name: value})


@FUZZ
@given(name=st.sampled_from(NUMBERS), value=not_a_number)
def test_fuzz_bools_strings_and_extreme_floats_for_numbers_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name}=.* must be a finite number"):
        gt.EnergyMonitor(**{name: value})


@FUZZ
@given(value=st.one_of(st.binary(max_size=8), st.lists(st.one_of(
    st.booleans(), st.floats(), st.text(max_size=2), st.integers(max_value=-1)), min_size=1, max_size=3)))
def test_fuzz_bytes_and_odd_lists_for_gpus_are_refused(value):
    with pytest.raises(ValueError, match=r"^gpus=.*choose \"auto\", \"all\""):
        gl.EnergyMonitor(gpus=value)


@FUZZ
@given(key=st.sampled_from(["energy", "emissions", "cost", "on_exceed", "check_every_n_steps"]),
       first=st.sampled_from(["1 kWh", "300 g", "stop", "5"]), second=st.sampled_from(["500 kWh", "1 kg", "warn", "7"]),
       between=st.sampled_from(["", "    emissions: 1 kg\n", "    # a comment\n"]))
def test_fuzz_a_key_given_twice_is_refused(tmp_path_factory, key, first, second, between):
    path = tmp_path_factory.mktemp("cfg") / "green.yaml"
    path.write_text(f"green-callbacks:\n  budget:\n    {key}: {first}\n{between}    {key}: {second}\n")
    with pytest.raises(ValueError, match=rf"green.yaml: not valid YAML: duplicate key '{key}' \(line 3 and line"):
        gl.EnergyBudget.from_file(path)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@FUZZ
@given(data=st.binary(min_size=1, max_size=40).filter(_not_utf8), suffix=st.sampled_from([".yaml", ".toml"]))
def test_fuzz_a_file_that_is_not_utf8_is_refused_by_name(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"green{suffix}"
    path.write_bytes(b"budget:\n  energy: 1 kWh # " + data)
    with pytest.raises(ValueError, match=rf"green{suffix}: not a UTF-8 text file \(byte \d+ is 0x[0-9a-f]{{2}}\)"):
        gt.EnergyBudget.from_file(path)
    csv = path.with_suffix(".csv")
    csv.write_bytes(b"0,100\n" + data)
    with pytest.raises(ValueError, match=r"carbon_intensity_csv=.*not a UTF-8 text file"):
        gl.EnergyMonitor(carbon_intensity_csv=str(csv), mlflow=False)


# -- values no message may repeat, values that passed the checks and failed after them ------------------------------
@pytest.mark.parametrize("name", [*NUMBERS, "mlflow_wait_s"])
def test_an_integer_too_large_for_a_float_is_refused_by_name(name):
    """``pue=10**400`` was a bare OverflowError of ``math.isfinite`` (before the range check), naming nothing."""
    for module in (gl, gt):
        with pytest.raises(ValueError, match=rf"^{name}=<an integer of 401 digits> must be a finite number"):
            module.EnergyMonitor(**{name: 10**400}, mlflow=False)
    with pytest.raises(ValueError, match=r"^min_gain_per_kj=<an integer of 401 digits> must be a number >= 0"):
        gl.EfficiencyEarlyStopping(min_gain_per_kj=10**400)


def test_a_billion_laughs_config_is_refused_in_a_short_message(tmp_path):
    """Nested YAML aliases (nine lists of nine lists...) are a few shared objects to PyYAML, but their repr is 25
    million characters at 7 levels (a MemoryError at 9): the error repeated the value whole."""
    anchors = "x0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 7))
    for key, cls in (("energy", gl.EnergyBudget), ("on_exceed", gl.EnergyBudget),
                     ("min_gain", gt.EfficiencyEarlyStopping)):
        section = "budget" if cls is gl.EnergyBudget else "efficiency"
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"{anchors}{section}:\n  {key}: *a6\n" + ("  energy: 1 kJ\n" if key == "on_exceed" else ""))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}, '{section}': {key}=\[\[\[") as refused:
            cls.from_file(path)
        assert len(str(refused.value)) < 600, len(str(refused.value))


@pytest.mark.parametrize(("uri", "message"), [
    ("http://me:S3cretPw@host:abc", r"tracking_uri='http://host:abc' is not a URI MLflow can open \(Port could not"),
    ("http://me:S3cretPw@:5000", r"tracking_uri='http://\*\*\*@:5000' names no host"),
    ("http://me:S3cr#etPw@host:5000", r"tracking_uri='http://\*\*\*@host:5000' is not a URI MLflow can open \(its "
                                      r"user or password holds a character .*percent-encoded"),
    ("http://me:12#S3cretPw@host:5000", r"tracking_uri='http://\*\*\*@host:5000' is not a URI MLflow can open"),
    ("htp://me:S3cretPw@host", r"tracking_uri='htp://host': MLflow has no tracking store for the scheme 'htp'"),
    ("http://me:S3cretPw@host:0", r"tracking_uri='http://host:0': port 0 is no server's port"),
    ("http://me:S3cretPw@[::1:5000", r"tracking_uri='http://\*\*\*@\[::1:5000' is not a URI MLflow can open"),
])
def test_a_refused_tracking_uri_is_shown_without_its_password(uri, message):
    """The refusal repeated the URI whole, password included, into the console and the job's logs."""
    for module in (gl, gt):
        with pytest.raises(ValueError, match=message) as refused:
            module.EnergyMonitor(tracking_uri=uri)
        assert "S3cr" not in str(refused.value) and "me:" not in str(refused.value)


def test_the_report_refuses_a_tracking_uri_without_a_host_and_hides_its_password(capsys):
    """``report --tracking-uri http://me:pw@:1`` went to MLflow, which tried a host named "api"."""
    from green_callbacks.cli import main as cli

    assert cli(["report", "x", "--tracking-uri", "http://me:S3cretPw@:1"]) == 2
    err = capsys.readouterr().err
    assert "error: --tracking-uri='http://***@:1' names no host" in err and "S3cr" not in err
    assert cli(["report", "x", "--tracking-uri", "http://me:S3cretPw@host:abc"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri='http://host:abc' is not a URI MLflow can open" in err and "S3cr" not in err


def test_a_nul_character_in_a_path_is_refused_at_construction_by_name(tmp_path):
    """``output_dir='a\\x00b'`` was accepted, and the run failed at its end with a bare 'embedded null byte'."""
    for module in (gl, gt):
        for name in ("output_dir", "carbon_intensity_csv"):
            with pytest.raises(ValueError, match=rf"^{name}='a\\x00b' holds a NUL character"):
                module.EnergyMonitor(**{name: "a\x00b"}, mlflow=False)
    for cls in (gl.EnergyBudget, gt.EfficiencyEarlyStopping):
        with pytest.raises(ValueError, match=r"^path='.*a\\x00b.yaml' holds a NUL character"):
            cls.from_file(str(tmp_path / "a\x00b.yaml"))


def test_gpus_given_twice_or_not_as_indices_are_refused_by_the_sensors_too():
    """``gpus=[0, 0]`` listed (and counted) gpu0 twice; ``build_sensors(gpus=0)`` said "NVML failed listing the GPUs
    (TypeError...)" and ``build_sensors(gpus=[0.5])`` measured GPU 0."""
    for module in (gl, gt):
        with pytest.raises(ValueError, match=r"^gpus=\[0, 1, 0\]: device\(s\) \[0\] given more than once"):
            module.EnergyMonitor(gpus=[0, 1, 0], mlflow=False)
    from green_callbacks.sensors import build_sensors
    from green_callbacks.sensors.targets import choose_indices

    for gpus, message in ((0, r"^gpus=0 is not valid; choose \"auto\", \"all\""),
                          ([0.5], r"^gpus=\[0.5\]: CUDA device indices are integers >= 0"),
                          ([1, 1], r"^gpus=\[1, 1\]: device\(s\) \[1\] given more than once")):
        with pytest.raises(ValueError, match=message):
            build_sensors(gpus=gpus, measure_cpu=False)
        with pytest.raises(ValueError, match=message):
            choose_indices(gpus, None, 2, None)


@pytest.mark.parametrize("uri, sent_to", [
    ("http://host:5000/a@b", "http://host:5000/a@b"),  # an "@" in a path, no credentials: kept as it is
    ("https://host/?t=a@b", "https://host/?t=a@b"),
    ("//srv/share@x/mlruns", "//srv/share@x/mlruns"),
    ("http://me:pw@host:5000", "http://host:5000"),
])
def test_the_uri_records_go_to_loses_only_its_credentials(uri, sent_to, monkeypatch):
    """The redaction for messages (which hides everything up to the last "@" where it cannot tell a password
    from a path) also chose where a spool's records went: ``http://host:5000/a@b`` became ``http://***@b``."""
    from green_callbacks.sinks import RunTarget
    from green_callbacks.sinks.target import spool_header
    from green_callbacks.uris import without_credentials

    assert without_credentials(uri) == sent_to
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert spool_header(RunTarget(None), "x")["env_tracking_uri"] == sent_to


@pytest.mark.parametrize(("make", "named"), [
    (lambda: __import__("green_callbacks").EnergyMeter([], period_s="0.05"), "period_s='0.05'"),
    (lambda: __import__("green_callbacks").EnergyMeter([], period_s=None), "period_s=None"),
    (lambda: __import__("green_callbacks").EnergyMeter([], period_s=10**400), "period_s=<an integer of 401 digits>"),
    (lambda: __import__("green_callbacks").EnergyMeter([], trace_capacity="4096"), "trace_capacity='4096'"),
    (lambda: _sensors().build_sensors(gpus=None, cpu_tdp_w="65"), "cpu_tdp_w='65'"),
    (lambda: _sensors().build_sensors(gpus=None, cpu_tdp_w=10**400), "cpu_tdp_w=<an integer of 401 digits>"),
    (lambda: _sensors().CpuEstimateSensor(pid="1"), "pid='1'"),
    (lambda: _sensors().CpuEstimateSensor(pid=math.nan), "pid=nan"),
    (lambda: _sensors().RaplSensor(root=None), "root=None"),
])
def test_the_meter_and_sensors_refuse_a_bad_value_by_name(make, named):
    """The exported meter and sensors (green_callbacks, green_callbacks.sensors) raised TypeError or OverflowError
    from deep inside ('>' not supported between 'str' and 'int'; integer division result too large for a float)."""
    with pytest.raises(ValueError, match=re.escape(named) + " must be"):
        make()


def _sensors():
    import green_callbacks.sensors

    return green_callbacks.sensors


@pytest.mark.parametrize("thing", ["budget", None, 42])
def test_attach_refuses_what_is_not_a_stopper_by_name_and_keeps_working(thing):
    """``tracker.attach(x)`` with x no stopper: a ValueError naming x and what attach takes, and the tracker is
    left as it was, so that attaching a real stopper afterwards works (it once kept x, and every later attach
    failed on it with an AttributeError)."""
    from green_callbacks.stopping import BudgetStopper
    from green_callbacks.tracker import EnergyTracker

    tracker = EnergyTracker(mlflow=False)
    with pytest.raises(ValueError, match=r"attach\(\) takes a stopper.*BudgetStopper.*not " + re.escape(repr(thing))):
        tracker.attach(thing)
    assert tracker.stoppers == []
    budget = BudgetStopper(energy="1 kJ")
    tracker.attach(budget)
    assert tracker.stoppers == [budget]
