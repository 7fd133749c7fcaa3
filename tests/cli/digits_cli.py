"""A LightningCLI over the digits model, for the config tests: python digits_cli.py fit --config x.yaml."""

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from helpers import digits_loaders, lightning_digits_module

DigitsModule = lightning_digits_module()


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return digits_loaders(self.batch_size)[0]

    def val_dataloader(self):
        return digits_loaders(self.batch_size)[1]


if __name__ == "__main__":
    LightningCLI(DigitsModule, DigitsData, save_config_kwargs={"overwrite": True})
