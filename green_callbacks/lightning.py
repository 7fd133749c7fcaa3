"""PyTorch Lightning callbacks: ``Trainer(callbacks=[EnergyMonitor()])``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from green_callbacks.core import EnergyTracker, batch_size
from green_callbacks.distributed import RankInfo

__all__ = ["EnergyMonitor"]


def _rank(trainer: pl.Trainer) -> RankInfo:
    import socket

    return RankInfo(trainer.global_rank, trainer.local_rank, trainer.world_size, socket.gethostname())


def _cuda_indices(trainer: pl.Trainer) -> list[int]:
    device = trainer.strategy.root_device
    return [device.index or 0] if device.type == "cuda" else []


def _mlflow_logger_run(trainer: pl.Trainer) -> tuple[str | None, str | None]:
    """The run of the trainer's ``MLFlowLogger`` (rank 0 only), so no second run is opened."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger.run_id, getattr(logger, "_tracking_uri", None)
    return None, None


def scalar_metrics(trainer: pl.Trainer, prefix: str = "val") -> dict[str, float]:
    """The trainer's scalar callback metrics whose names start with ``prefix``."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1:
            out[key] = float(value)
    return out


class EnergyMonitor(EnergyTracker, Callback):
    """Measures every epoch's energy (validation included) and logs it to the MLflow run.

    Arguments are those of :class:`green_callbacks.core.EnergyTracker`, identical in
    ``green_callbacks.transformers.EnergyMonitor``. Logs into the run of a ``MLFlowLogger``
    when the trainer has one, else the active MLflow run, else a run it opens itself. Under
    DDP each rank measures its own GPU, the node's local rank 0 the CPU/DRAM, and rank 0 logs
    the sum. The totals are saved in checkpoints, so a resumed run continues them.
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gpus=self.gpus, experiment=self.experiment_name, run_name=self.run_name)

    def _start(self, trainer: pl.Trainer) -> None:
        run_id, uri = _mlflow_logger_run(trainer) if trainer.global_rank == 0 else (None, None)
        self.start(_rank(trainer), _cuda_indices(trainer), run_id, uri)

    # -- fit -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_epoch()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.epoch_open:
            self.begin_validation()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_validation()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_epoch(trainer.current_epoch, scalar_metrics(trainer))

    # -- test / predict ------------------------------------------------------------------------
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)
        self.begin_stage("test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.add_samples("test", batch_size(batch))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_stage("test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)
        self.begin_stage("predict")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.add_samples("predict", batch_size(batch))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_stage("predict")

    # -- the end -------------------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.finish("FINISHED")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        status = "KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED"
        self.finish(status, epoch=trainer.current_epoch)
