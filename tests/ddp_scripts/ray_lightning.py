"""Lightning inside Ray Train's TorchTrainer (2 CPU workers, gloo) with EnergyMonitor; each worker's GPU is simulated.

Usage: python ray_lightning.py TRACKING_URI OUT_DIR [stop]. Each worker writes the exact joules of its own
simulated GPU over each of its epoch windows to OUT_DIR/truth-rank{r}.json, and the epoch it stopped at to
OUT_DIR/stopped-rank{r}.txt. With ``stop``, an EnergyBudget ends training early.
"""


import sys

import lightning.pytorch as pl
import ray_driver
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_ddp import Stopped, Truth
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

from green_callbacks.lightning import EnergyBudget, EnergyMonitor


def train_func(config: dict) -> None:
    uri, out, stop = config["uri"], config["out"], config["stop"]
    monitor = EnergyMonitor(gpus="all", tracking_uri=uri, experiment_name="ray", output_dir=out)
    callbacks = [monitor, Truth(monitor, out), Stopped(out)]
    if stop:
        callbacks.append(EnergyBudget(energy="0.6 kJ"))  # about 10 of the 20 epochs: a stop whatever the speed
    trainer = pl.Trainer(max_epochs=20 if stop else 2, accelerator="cpu", devices="auto",
                         strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=out)
    prepare_trainer(trainer).fit(BoringModel())


if __name__ == "__main__":
    ray_driver.main([(train_func, sys.argv[1], sys.argv[2])], sys.argv[3:] == ["stop"])
