"""HF Trainer inside Ray Train's TorchTrainer (2 CPU workers, gloo) with EnergyMonitor; each worker's GPU is simulated.

Usage: python ray_hf.py TRACKING_URI OUT_DIR [stop]. Each worker writes the exact joules of its own simulated
GPU over each of its epoch windows to OUT_DIR/truth-rank{r}.json, and the epoch it stopped at to
OUT_DIR/stopped-rank{r}.txt. With ``stop``, an EnergyBudget ends training early.
"""

import sys
from pathlib import Path

import ray_driver
from hf_ddp import Truth
from ray.train.huggingface.transformers import prepare_trainer
from transformers import Trainer, TrainingArguments

from green_callbacks.transformers import EnergyBudget, EnergyMonitor

from helpers import DigitsDataset, digits_tensors, hf_accuracy, hf_digits_model


def train_func(config: dict) -> None:
    uri, out, stop = config["uri"], config["out"], config["stop"]
    (xt, yt), (xv, yv) = digits_tensors()
    args = TrainingArguments(output_dir=out, num_train_epochs=20 if stop else 2, per_device_train_batch_size=32,
                             eval_strategy="epoch", save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    monitor = EnergyMonitor(gpus="all", tracking_uri=uri, experiment_name="ray", output_dir=out)
    trainer = Trainer(model=hf_digits_model(), args=args, train_dataset=DigitsDataset(xt[:512], yt[:512]),
                      eval_dataset=DigitsDataset(xv[:128], yv[:128]), compute_metrics=hf_accuracy,
                      callbacks=[monitor, Truth(monitor, out),
                                 *([EnergyBudget(energy="0.5 kJ", check_every_n_steps=2)] if stop else [])])
    prepare_trainer(trainer).train()
    Path(out, f"stopped-rank{args.process_index}.txt").write_text(str(round(trainer.state.epoch)))


if __name__ == "__main__":
    ray_driver.main([(train_func, sys.argv[1], sys.argv[2])], sys.argv[3:] == ["stop"])
