"""Distributed data parallel on CPU: two processes (gloo), one energy total, logged once by rank 0.

    python examples/ddp_digits.py            # 2 processes, 10 epochs
    python examples/ddp_digits.py --quick    # 2 epochs, for CI

On GPUs use ``accelerator="gpu", devices=N, strategy="ddp"``: each rank then measures only its own
GPU and the node's local rank 0 its CPU/DRAM; rank 0 logs the exact sum.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits
from lightning_digits import DigitsClassifier

from green_callbacks.lightning import EnergyMonitor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    (xt, yt), (xv, yv) = digits()
    logger = MLFlowLogger(experiment_name="green-callbacks-ddp", tracking_uri=mlflow.get_tracking_uri(),
                          run_name="ddp-2-processes")
    trainer = pl.Trainer(max_epochs=2 if args.quick else 10, accelerator="cpu", devices=2, strategy="ddp_spawn",
                         logger=logger, callbacks=[EnergyMonitor()], enable_checkpointing=False,
                         enable_progress_bar=False)
    trainer.fit(DigitsClassifier(), DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(xv, yv), batch_size=256))
    print("Energy of both processes, logged once: MLflow experiment green-callbacks-ddp at",
          mlflow.get_tracking_uri())
    return 0


if __name__ == "__main__":
    sys.exit(main())
