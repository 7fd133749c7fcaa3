"""Lightning DDP (2 CPU processes, gloo) with EnergyMonitor; each rank's GPU is simulated.

Usage: python lightning_ddp.py TRACKING_URI OUT_DIR [stop|warn] (Lightning's ``ddp_spawn`` starts the ranks), or
the same under ``torchrun --nproc_per_node 2`` (``ddp``: each rank runs the script, as a multi-node job's do).
Each rank writes the exact joules of its own simulated GPU over each of its epoch windows to
OUT_DIR/truth-rank{r}.json, the windows' durations to durations-rank{r}.json, and what its GPU spent just after
each window's edges to lag-rank{r}.json (see helpers.lag_slack). With ``stop``, an
EfficiencyEarlyStopping watches a metric that flattens on rank 1 only; each rank writes the epoch it
stopped at to OUT_DIR/stopped-rank{r}.txt. With ``warn``, a 1 J budget only warns (on_exceed="warn"), and an
EfficiencyEarlyStopping sees no validation (limit_val_batches=0): what they say, every rank alike, is said once.
With ``first``, one epoch logged to an MLFlowLogger run, its checkpoint in OUT_DIR/ckpt; with ``resume``, a second
epoch from that checkpoint into a new MLFlowLogger run (as a new process's logger opens one).
"""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from green_callbacks.lightning import EfficiencyEarlyStopping, EnergyBudget, EnergyMonitor

from helpers import lag_slack


class RankDependent(BoringModel):
    """``val_gain`` doubles with every epoch on rank 0 and is flat on rank 1: only rank 1 wants to stop."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        rank = self.trainer.global_rank
        self.log("val_gain", 1.0 if rank == 1 else 1000.0 * (self.current_epoch + 1))
        return out


class Stopped(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        Path(self.out, f"stopped-rank{trainer.global_rank}.txt").write_text(str(trainer.current_epoch))
        (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, EnergyMonitor)]
        decided = monitor.stop_decision
        Path(self.out, f"stop-message-rank{trainer.global_rank}.txt").write_text(decided.message if decided else "")


class Truth(pl.Callback):
    def __init__(self, monitor, out):
        self.monitor, self.out, self.truth, self.durations, self.lags = monitor, out, [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        import pynvml

        (dev,) = pynvml.devices()
        w = self.monitor.last_window
        self.truth.append(dev.energy_between(w.start_s, w.end_s))
        self.durations.append(w.duration_s)
        self.lags.append(lag_slack(dev, w))
        Path(self.out, f"truth-rank{trainer.global_rank}.json").write_text(json.dumps(self.facts(trainer)))
        Path(self.out, f"durations-rank{trainer.global_rank}.json").write_text(json.dumps(self.durations))
        Path(self.out, f"lag-rank{trainer.global_rank}.json").write_text(json.dumps(self.lags))

    def facts(self, trainer):
        """What the test reads back: each epoch's exact GPU joules."""
        return self.truth


if __name__ == "__main__":
    uri, out = sys.argv[1], sys.argv[2]
    stop, warn = sys.argv[3:] == ["stop"], sys.argv[3:] == ["warn"]
    first, resume = sys.argv[3:] == ["first"], sys.argv[3:] == ["resume"]
    monitor = EnergyMonitor(gpus="all", tracking_uri=uri, experiment_name="ddp", output_dir=out)
    callbacks = [monitor, Truth(monitor, out), Stopped(out)]
    if stop:
        callbacks.append(EfficiencyEarlyStopping(monitor="val_gain", mode="max", min_evaluations=2, patience=2))
    if warn:
        callbacks += [EnergyBudget(energy="1 J", on_exceed="warn"), EfficiencyEarlyStopping()]
    logger = False
    if first or resume:
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="ddp", tracking_uri=uri)
        callbacks.append(ModelCheckpoint(dirpath=Path(out, "ckpt"), save_last=True))
    strategy = "ddp" if "LOCAL_RANK" in os.environ else "ddp_spawn"  # (torchrun started the ranks, or Lightning does)
    trainer = pl.Trainer(max_epochs=10 if stop else 1 if first else 2, accelerator="cpu", devices=2,
                         strategy=strategy, logger=logger, enable_checkpointing=first or resume,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=out, limit_val_batches=0 if warn else None)
    trainer.fit(RankDependent() if stop else BoringModel(),
                ckpt_path=Path(out, "ckpt", "last.ckpt") if resume else None)
