"""Careless input: a clear error naming the value before training, or a correct run."""

from __future__ import annotations

import pytest
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
    ({"output_dir": None}, r"output_dir=None must be a non-empty string"),
    ({"experiment_name": "x" * 501}, r"experiment_name of 501 characters: MLflow accepts at most 500"),
    ({"log_every_n_steps": 0}, r"log_every_n_steps=0 must be an integer >= 1"),
])
def test_bad_monitor_arguments_name_the_value_and_the_choices(kwargs, message):
    for module in (gl, gt):
        with pytest.raises(ValueError, match=message):
            module.EnergyMonitor(**kwargs)


def test_a_cost_budget_in_energy_units_is_refused():
    with pytest.raises(ValueError, match=r"cost='0.5 kWh': 'kWh' is a unit of energy or mass, not a currency"):
        gl.EnergyBudget(cost="0.5 kWh")


def test_a_stopper_with_nothing_measured_fails_before_the_first_step(tmp_path):
    counter = CountSteps()
    with pytest.raises(ValueError, match=r"EnergyBudget cannot act: nothing is measured here \(gpus=None, "
                                         r"measure_cpu=False"):
        lightning_fit(tmp_path, lightning_digits_module()(), [
            gl.EnergyMonitor(gpus=None, measure_cpu=False, mlflow=False), gl.EnergyBudget(energy="1 kJ"), counter],
            max_epochs=2)
    assert counter.steps == 0


def test_hf_stopper_with_nothing_measured_fails_before_the_first_step(tmp_path, digits):  # noqa: F811
    with pytest.raises(ValueError, match=r"EfficiencyEarlyStopping cannot act: nothing is measured"):
        hf_trainer(tmp_path, digits, [gt.EnergyMonitor(gpus=None, measure_cpu=False, mlflow=False),
                                      gt.EfficiencyEarlyStopping(monitor="accuracy")]).train()


def test_two_monitors_in_one_lightning_trainer_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match=r"two EnergyMonitors in one Trainer: keep one"):
        lightning_fit(tmp_path, lightning_digits_module()(), [gl.EnergyMonitor(mlflow=False),
                                                              gl.EnergyMonitor(gpus="all", mlflow=False)], max_epochs=1)


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
