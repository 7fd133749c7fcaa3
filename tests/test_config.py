"""Budgets and thresholds from config: LightningCLI YAML, Hydra/OmegaConf, plain YAML and TOML files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt

from helpers import history, ready_store, runs


def test_lightning_cli_yaml_with_budgets(tmp_path):
    uri = ready_store(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          max_epochs: 50
          accelerator: cpu
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: green_callbacks.lightning.EnergyMonitor
              init_args:
                tracking_uri: {uri}
                experiment_name: cli
                country: FR
                pue: 1.2
                log_artifacts: [intervals, summary]
                output_dir: {tmp_path / "out"}
            - class_path: green_callbacks.lightning.EnergyBudget
              init_args:
                energy: 60 J
                emissions: 1.2 kg
            - class_path: green_callbacks.lightning.EfficiencyEarlyStopping
              init_args:
                monitor: val_acc
                mode: max
                min_gain: 1% per doubling
                patience: 2
        model:
          lr: 0.01
    """))
    script = Path(__file__).parent / "cli" / "digits_cli.py"
    env_path = [str(Path(__file__).parent), *sys.path]
    proc = subprocess.run([sys.executable, str(script), "fit", "--config", str(config)], capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": ":".join(env_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, (run,) = runs(uri, "cli")
    assert run.data.params["green.pue"] == "1.2"
    assert run.data.params["green.carbon_intensity_label"] == "France (FRA)"
    epochs = history(client, run.info.run_id, "energy/epoch_j")
    assert 0 < len(epochs) < 50, "a budget or the plateau stopped it"
    assert run.data.tags["green.stop_reason"] in ("energy_budget", "efficiency_plateau")


def test_lightning_cli_rejects_a_bad_unit_before_training(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent("""
        trainer:
          max_epochs: 1
          accelerator: cpu
          logger: false
          callbacks:
            - class_path: green_callbacks.lightning.EnergyBudget
              init_args:
                energy: 2.5 kWatt
    """))
    script = Path(__file__).parent / "cli" / "digits_cli.py"
    proc = subprocess.run([sys.executable, str(script), "fit", "--config", str(config)], capture_output=True,
                          text=True, timeout=300,
                          env={"PYTHONPATH": ":".join([str(Path(__file__).parent), *sys.path]), "PATH": "/usr/bin"})
    assert proc.returncode != 0
    assert "unknown energy unit 'kWatt'; choose one of J, kJ, MJ, Wh, kWh, MWh" in proc.stderr


def test_hydra_instantiate_with_dictconfig_values(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "monitor": {"_target_": "green_callbacks.lightning.EnergyMonitor", "gpus": [0], "country": "SE",
                    "log_artifacts": ["intervals", "plot"], "efficiency_metrics": ["val_acc"]},
        "budget": {"_target_": "green_callbacks.transformers.EnergyBudget", "energy": "${oc.env:BUDGET,2.5 kWh}",
                   "cost": 1.5},
        "efficiency": {"_target_": "green_callbacks.lightning.EfficiencyEarlyStopping", "monitor": "val_acc",
                       "min_gain": "0.1 per kWh"},
    })
    monitor = instantiate(cfg.monitor)
    budget = instantiate(cfg.budget)
    efficiency = instantiate(cfg.efficiency)
    assert monitor.gpus == [0] and monitor.accountant.intensity.label == "Sweden (SWE)"
    assert monitor.artifacts == ["intervals", "plot"] and monitor.efficiency_metrics == ["val_acc"]
    assert budget.budget.energy_j == 2.5 * 3.6e6 and budget.budget.cost == 1.5
    assert efficiency.plateau.min_gain.text == "0.1 per kWh"
    with pytest.raises(Exception, match=r"unknown country 'Narnia'"):
        instantiate(OmegaConf.create({"_target_": "green_callbacks.lightning.EnergyMonitor", "country": "Narnia"}))
    # a misspelt key: Python's "BudgetStopper.__init__() got an unexpected keyword argument", an inherited class's
    # name and no choices
    for target, key, said in (("transformers.EnergyBudget", "enrgy", "EnergyBudget has no argument 'enrgy' (did you "
                                                                     "mean 'energy'?); its arguments are ['energy'"),
                              ("lightning.EnergyMonitor", "contry", "EnergyMonitor has no argument 'contry' (did you "
                                                                    "mean 'country'?); its arguments are ['gpus'"),
                              ("lightning.EfficiencyEarlyStopping", "patiense", "EfficiencyEarlyStopping has no "
                                                                                "argument 'patiense' (did you mean "
                                                                                "'patience'?)")):
        with pytest.raises(Exception, match=re.escape(said)):
            instantiate(OmegaConf.create({"_target_": f"green_callbacks.{target}", key: 1}))
    from green_callbacks import EnergyTracker

    with pytest.raises(TypeError, match=r"EnergyTracker has no argument 'wombat'; its arguments are \['gpus'"):
        EnergyTracker(wombat="green")


def test_hydra_built_hf_callbacks_save_their_checkpoints(tmp_path, monkeypatch, fake_nvml):
    """instantiate() without _convert_ hands the monitor ListConfig values; HF writes each callback's arguments into
    trainer_state.json at every checkpoint, whose json.dumps refused them: the training failed at its first save."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from test_hf_monitor import DigitsDataset, digits_tensors, hf_trainer

    fake_nvml.configure(n=1)
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({
        "monitor": {"_target_": "green_callbacks.transformers.EnergyMonitor", "gpus": [0], "mlflow": False,
                    "log_artifacts": ["intervals", "summary"], "efficiency_metrics": ["eval_accuracy"],
                    "output_dir": str(tmp_path / "out")},
        "budget": {"_target_": "green_callbacks.transformers.EnergyBudget", "energy": "2.5 kWh"},
    })
    callbacks = [instantiate(cfg.monitor), instantiate(cfg.budget)]
    (xt, yt), (xv, yv) = digits_tensors()
    data = DigitsDataset(xt[:128], yt[:128]), DigitsDataset(xv[:32], yv[:32])
    hf_trainer(tmp_path, data, callbacks, epochs=2, save_strategy="epoch").train()
    saved = json.loads((tmp_path / "hf" / "checkpoint-8" / "trainer_state.json").read_text())
    args = saved["stateful_callbacks"]["EnergyMonitor"]["args"]
    assert args["gpus"] == [0] and args["log_artifacts"] == ["intervals", "summary"]


def test_yaml_anchors_and_merge_keys_are_read_as_yaml_reads_them(tmp_path):
    """Shared defaults through an anchor and a merge key (``<<: *defaults``), overridden key by key: valid YAML,
    read as ``yaml.safe_load`` reads it (the duplicate-key check had refused the merge key as invalid)."""
    yaml_file = tmp_path / "green.yaml"
    yaml_file.write_text(textwrap.dedent("""
        defaults: &defaults
          energy: 2.5 kWh
          emissions: 100 g
        budget:
          <<: *defaults
          emissions: 300 g
    """))
    budget = gl.EnergyBudget.from_file(yaml_file).budget
    assert (budget.energy_j, budget.emissions_g) == (2.5 * 3.6e6, 300.0)


def test_from_yaml_and_toml_files(tmp_path):
    yaml_file = tmp_path / "green.yaml"
    yaml_file.write_text(textwrap.dedent("""
        green-callbacks:
          budget:
            energy: 2.5 kWh
            emissions: 300 g
            cost: 0.5 EUR
            check_every_n_steps: 100
          efficiency:
            monitor: accuracy
            min_gain: 0.002 per doubling
            patience: 5
    """))
    budget = gl.EnergyBudget.from_file(yaml_file)
    assert (budget.budget.energy_j, budget.budget.emissions_g, budget.budget.cost, budget.budget.currency) == (
        9e6, 300.0, 0.5, "EUR")
    assert budget.check_every_n_steps == 100
    efficiency = gt.EfficiencyEarlyStopping.from_file(yaml_file)
    assert efficiency.plateau.patience == 5

    toml_file = tmp_path / "pyproject.toml"
    toml_file.write_text(textwrap.dedent("""
        [project]
        name = "mine"
        [tool.green-callbacks.budget]
        emissions = "1.2 kg"
        on_exceed = "warn"
    """))
    budget = gt.EnergyBudget.from_file(toml_file)
    assert budget.budget.emissions_g == 1200.0 and budget.budget.on_exceed == "warn"
    both = tmp_path / "both.toml"  # the second table was ignored without a word
    both.write_text('[tool.green-callbacks.budget]\nenergy = "1 kWh"\n[green-callbacks.budget]\nenergy = "2 kWh"\n')
    with pytest.raises(ValueError, match=r"both \[tool.green-callbacks\] and \[green-callbacks\] are there; keep one"):
        gt.EnergyBudget.from_file(both)

    bad = tmp_path / "bad.yaml"
    bad.write_text("green-callbacks:\n  budget:\n    energy: 1 kWh\n    energey: 2 kWh\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['energey'\] in 'budget'; valid keys are \['energy'"):
        gl.EnergyBudget.from_file(bad)
    with pytest.raises(ValueError, match=r"no 'efficiency' table under green-callbacks; found \['budget'\]"):
        gl.EfficiencyEarlyStopping.from_file(bad)
    with pytest.raises(ValueError, match=r"unknown config format '.ini'"):
        gl.EnergyBudget.from_file(tmp_path / "green.ini")
    upper = tmp_path / "green.YAML"  # a suffix in capitals is the same format (it was "unknown config format")
    upper.write_text("budget:\n  energy: 1 kJ\n")
    assert gl.EnergyBudget.from_file(upper).budget.energy_j == 1000.0
    # YAML's two places for a table, both filled: one was read and the other ignored without a word
    two = tmp_path / "two.yaml"
    two.write_text("green-callbacks:\n  budget:\n    energy: 1 kJ\nbudget:\n  energy: 2 kJ\n")
    with pytest.raises(ValueError, match=r"two.yaml: both 'green-callbacks.budget' and a top-level 'budget' are "
                                         r"there; keep one"):
        gl.EnergyBudget.from_file(two)
    two.write_text("green-callbacks:\n  efficiency:\n    patience: 4\nbudget:\n  energy: 2 kJ\n")
    with pytest.raises(ValueError, match=r"two.yaml: no 'budget' table under green-callbacks; found \['efficiency'\]"):
        gl.EnergyBudget.from_file(two)


def test_a_config_file_holds_only_the_stoppers_tables_and_no_yaml_1_1_numbers(tmp_path):
    """A `monitor:` table beside the budget under green-callbacks was read by nothing, without a word; YAML 1.1
    read `1:30` as 90 (base 60) and `010` as 8 (octal): a 90-J budget, a check every 8 steps."""
    green = tmp_path / "green.yaml"
    green.write_text("green-callbacks:\n  budget: {energy: 1 kJ}\n  monitor: {country: FR}\n")
    with pytest.raises(ValueError, match=r"green.yaml: unknown table\(s\) \['monitor'\] under green-callbacks; it "
                                         r"holds \['budget', 'efficiency'\]"):
        gl.EnergyBudget.from_file(green)
    toml = tmp_path / "pyproject.toml"
    toml.write_text('[tool.green-callbacks.budget]\nenergy = "1 kJ"\n[tool.green-callbacks.budgte]\ncost = 1\n')
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['budgte'\] under tool.green-callbacks"):
        gt.EnergyBudget.from_file(toml)
    hydra = tmp_path / "hydra.yaml"  # a top level is anyone's: a Hydra config's own keys stay its own
    hydra.write_text("trainer: {max_epochs: 3}\nbudget: {energy: 1 kJ}\n")
    assert gl.EnergyBudget.from_file(hydra).budget.energy_j == 1000.0
    for text, said in (("budget: {energy: 1:30}\n", r"'1:30' \(line 1\) reads as 90 in YAML 1.1, a number in base 60"),
                       ("budget:\n  energy: 1 kJ\n  check_every_n_steps: 010\n",
                        r"'010' \(line 3\) reads as 8 in YAML 1.1, an octal number; write 10 for the decimal number")):
        green.write_text(text)
        with pytest.raises(ValueError, match=rf"green.yaml: not valid YAML: {said}"):
            gl.EnergyBudget.from_file(green)
    green.write_text("budget:\n  energy: 1 kJ\n  check_every_n_steps: 10\n")
    assert gl.EnergyBudget.from_file(green).check_every_n_steps == 10


def test_a_bad_value_in_a_config_file_names_the_file_and_the_table(tmp_path):
    bad = tmp_path / "green.yaml"
    bad.write_text("green-callbacks:\n  budget:\n    energy: 5 kWhh\n  efficiency:\n    patience: -2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}, 'budget': energy='5 kWhh': unknown energy unit "
                                         r"'kWhh'; choose one of J, kJ"):
        gl.EnergyBudget.from_file(bad)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}, 'efficiency': patience=-2"):
        gt.EfficiencyEarlyStopping.from_file(bad)
    with pytest.raises(ValueError, match=r"^from_file's arguments: energy='3 kk': unknown energy unit 'kk'"):
        gl.EnergyBudget.from_file(bad, energy="3 kk")
