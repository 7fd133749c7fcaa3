"""LightningCLI with budgets in YAML:  python examples/lightning_cli.py fit --config examples/lightning_cli.yaml

``--quick`` (what CI runs): the same with that config and 2 epochs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits
from lightning_digits import DigitsClassifier


class DigitsData(pl.LightningDataModule):
    """scikit-learn's bundled digits, split 80/20."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        (self.xt, self.yt), (self.xv, self.yv) = digits()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.xt, self.yt), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.xv, self.yv), batch_size=512)


def quick_argv(argv: list[str]) -> list[str]:
    """``--quick``: fit with this folder's lightning_cli.yaml (unless a subcommand is given) for 2 epochs."""
    if "--quick" not in argv:
        return argv
    argv = [a for a in argv if a != "--quick"]
    if not any(a in ("fit", "validate", "test", "predict") for a in argv[1:]):
        argv[1:1] = ["fit", "--config", str(Path(__file__).with_name("lightning_cli.yaml"))]
    return [*argv, "--trainer.max_epochs=2"]


if __name__ == "__main__":
    sys.argv = quick_argv(sys.argv)
    # MLflow keeps the config as run params; no config file to save next to a local log dir
    LightningCLI(DigitsClassifier, DigitsData, save_config_callback=None)
