"""Train a tiny model (built from a config, nothing downloaded) on scikit-learn's digits with HF Trainer.

    python examples/hf_digits.py            # up to 40 epochs, stopping when accuracy per kJ flattens
    python examples/hf_digits.py --quick    # three epochs, for CI

Logs through HF's MLflowCallback into MLflow's default store; green-callbacks adds per-epoch energy
and emissions to that same run, then a per-epoch table is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits, mlp

from green_callbacks.report import interval_table
from green_callbacks.transformers import EfficiencyEarlyStopping, EnergyBudget, EnergyMonitor


class DigitsConfig(PretrainedConfig):
    model_type = "digits-mlp"

    def __init__(self, hidden: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden = hidden


class DigitsMLP(PreTrainedModel):
    config_class = DigitsConfig

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__(config)
        self.net = mlp(config.hidden)
        self.post_init()

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(pixels)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.x[i], "labels": self.y[i]}


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="3 epochs, to check that it runs")
    parser.add_argument("--output-dir", default="hf_digits_output")
    args = parser.parse_args(argv)
    (xt, yt), (xv, yv) = digits()
    training = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=3 if args.quick else args.epochs, learning_rate=1e-3,
        per_device_train_batch_size=32, eval_strategy="epoch", save_strategy="no", logging_strategy="epoch",
        metric_for_best_model="accuracy", lr_scheduler_type="constant", report_to=["mlflow"], seed=0)
    monitor = EnergyMonitor(efficiency_metrics=["eval_accuracy"])
    config = Path(__file__).parent / "green.yaml"
    trainer = Trainer(model=DigitsMLP(DigitsConfig()), args=training, train_dataset=Rows(xt, yt),
                      eval_dataset=Rows(xv, yv), compute_metrics=accuracy,
                      callbacks=[monitor, EfficiencyEarlyStopping.from_file(config, monitor="accuracy"),
                                 EnergyBudget.from_file(config)])
    trainer.train()
    print("\nPer evaluation (energy since the previous one, all components; accuracy per kJ so far):")
    print(interval_table(monitor.frame(), "eval_accuracy"))
    if monitor.stop_decision is not None:
        print(f"\nStopped early: {monitor.stop_decision.message}")
    if monitor.run is not None:
        print(f"\nEnergy is in MLflow run {monitor.run.run_id} at {monitor.run.tracking_uri}.")
        print(f"See it: mlflow ui --backend-store-uri {monitor.run.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
