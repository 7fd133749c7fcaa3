"""Hydra: the callbacks and their budgets come from examples/hydra/config.yaml via ``_target_``.

    python examples/hydra_digits.py
    python examples/hydra_digits.py max_epochs=3 callbacks.budget.energy="2 kJ"
    python examples/hydra_digits.py --quick       (what CI runs: 2 epochs)
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import mlflow
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits
from lightning_digits import DigitsClassifier


@hydra.main(config_path="hydra", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    (xt, yt), (xv, yv) = digits()
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    logger = MLFlowLogger(experiment_name="green-callbacks-hydra", tracking_uri=mlflow.get_tracking_uri())
    trainer = pl.Trainer(max_epochs=cfg.max_epochs, accelerator="auto", logger=logger, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(DigitsClassifier(), DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(xv, yv), batch_size=512))


if __name__ == "__main__":
    if "--quick" in sys.argv:  # Hydra takes overrides, not flags: --quick is max_epochs=2
        sys.argv = [a for a in sys.argv if a != "--quick"] + ["max_epochs=2"]
    main()
