"""Train a small MLP on scikit-learn's digits with Lightning, measuring energy at every evaluation into MLflow.

    python examples/lightning_digits.py            # the README's main job
    python examples/lightning_digits.py --quick    # three epochs, for CI

Logs into MLflow's default store (``mlflow.db`` here, unless MLFLOW_TRACKING_URI says otherwise),
in the run of Lightning's MLFlowLogger, then prints a per-evaluation table and where to look. Training
stops early when doubling the energy spent no longer buys a worthwhile gain in validation accuracy
(EfficiencyEarlyStopping), and
before the budgets in examples/green.yaml would be exceeded (EnergyBudget).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits, mlp

from green_callbacks.lightning import EfficiencyEarlyStopping, EnergyBudget, EnergyMonitor
from green_callbacks.report import interval_table


class DigitsClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="3 epochs, to check that it runs")
    parser.add_argument("--experiment", default="green-callbacks-digits")
    parser.add_argument("--country", default=None,
                        help="grid of this country (ISO code or name); world average if unset")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs

    pl.seed_everything(0, verbose=False)
    (xt, yt), (xv, yv) = digits()
    train = DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)

    uri = mlflow.get_tracking_uri()
    logger = MLFlowLogger(experiment_name=args.experiment, tracking_uri=uri, run_name="lightning-digits")
    monitor = EnergyMonitor(country=args.country, efficiency_metrics=["val_acc"])
    config = Path(__file__).parent / "green.yaml"
    callbacks = [monitor, EfficiencyEarlyStopping.from_file(config), EnergyBudget.from_file(config)]
    trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=logger, callbacks=callbacks,
                         enable_checkpointing=False, log_every_n_steps=10)
    trainer.fit(DigitsClassifier(), train, val)

    print("\nPer evaluation (energy since the previous one, all components; accuracy per kJ so far):")
    print(interval_table(monitor.frame(), "val_acc"))
    if monitor.stop_decision is not None:
        print(f"\nStopped early: {monitor.stop_decision.message}")
    print(f"\nEnergy is in MLflow run {logger.run_id} of experiment {args.experiment!r} at {uri}.")
    print(f"See it: mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
