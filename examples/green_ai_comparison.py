"""What the Green AI techniques save, measured: baseline, distilled student, pruned, int8-quantised.

    python examples/green_ai_comparison.py            # 15 epochs per model
    python examples/green_ai_comparison.py --quick    # 2 epochs, for CI

Each model is one MLflow run in the experiment ``green-ai-comparison``: its training energy per epoch
and its inference energy per sample (``energy/test_j_per_sample``), so the energy saved and the
accuracy lost are side by side in the MLflow UI and in the table printed at the end
(also: ``green-callbacks report green-ai-comparison --metric test_acc``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits, mlp

from green_callbacks.lightning import EnergyMonitor

EXPERIMENT = "green-ai-comparison"


class Classifier(pl.LightningModule):
    """A classifier around any network; with a ``teacher`` it is trained by distillation."""

    def __init__(self, net: torch.nn.Module, teacher: torch.nn.Module | None = None, temperature: float = 4.0,
                 alpha: float = 0.7, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.teacher = net, teacher
        self.temperature, self.alpha, self.lr = temperature, alpha, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if self.teacher is not None:
            with torch.no_grad():
                soft = torch.softmax(self.teacher(x) / self.temperature, -1)
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits / self.temperature, -1), soft,
                                            reduction="batchmean") * self.temperature**2
            loss = self.alpha * kd + (1 - self.alpha) * loss
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam((p for p in self.net.parameters() if p.requires_grad), lr=self.lr)


def measured(name: str, module: Classifier, loaders, epochs: int, params: dict) -> dict:
    """Train (unless ``epochs`` is 0) and test ``module`` in its own MLflow run; return its numbers."""
    train, val, test = loaders
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=mlflow.get_tracking_uri(), run_name=name)
    logger.log_hyperparams(params)
    monitor = EnergyMonitor(log_artifacts=["intervals", "summary"])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if epochs:
        trainer.fit(module, train, val)
    result = trainer.test(module, test, verbose=False)[0]
    client = mlflow.tracking.MlflowClient(mlflow.get_tracking_uri())
    metrics = client.get_run(logger.run_id).data.metrics
    return {"model": name, **params, "train_j": monitor.cumulative_j, "test_acc": result["test_acc"],
            "test_mj_per_sample": 1000 * metrics["energy/test_j_per_sample"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    pl.seed_everything(0, verbose=False)
    (xt, yt), (xv, yv) = digits()
    repeat = 10 if args.quick else 40  # enough test samples for a steady joules-per-sample
    loaders = (DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True),
               DataLoader(TensorDataset(xv, yv), batch_size=512),
               DataLoader(TensorDataset(xv.repeat(repeat, 1), yv.repeat(repeat)), batch_size=64))

    rows = []
    baseline = Classifier(mlp(512))
    rows.append(measured("baseline", baseline, loaders, epochs, {"hidden": 512, "technique": "none"}))
    teacher = copy.deepcopy(baseline.net).eval()
    rows.append(measured("distilled", Classifier(mlp(32), teacher=teacher), loaders, epochs,
                         {"hidden": 32, "technique": "knowledge distillation from baseline"}))
    pruned = copy.deepcopy(baseline)
    linears = [(m, "weight") for m in pruned.net if isinstance(m, torch.nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=0.8)
    rows.append(measured("pruned", pruned, loaders, max(1, epochs // 3),
                         {"hidden": 512, "technique": "80% global magnitude pruning + fine-tuning"}))
    quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(baseline.net), {torch.nn.Linear},
                                                       dtype=torch.qint8)
    rows.append(measured("quantised", Classifier(quantised), loaders, 0,
                         {"hidden": 512, "technique": "dynamic int8 quantisation (inference only)"}))

    base = rows[0]
    print(f"\n{'model':<10} {'train J':>9} {'test acc':>9} {'mJ/sample':>10} {'inference saved':>16}  technique")
    for r in rows:
        # a test shorter than the CPU estimate's resolution (10 ms of CPU time) can measure 0 J
        saved = (f"{100 * (1 - r['test_mj_per_sample'] / base['test_mj_per_sample']):15.0f}%"
                 if base["test_mj_per_sample"] > 0 else f"{'n/a':>16}")
        print(f"{r['model']:<10} {r['train_j']:9.1f} {r['test_acc']:9.4f} {r['test_mj_per_sample']:10.4f} "
              f"{saved}  {r['technique']}")
    print(f"\nSide by side in MLflow: experiment {EXPERIMENT!r} at {mlflow.get_tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
