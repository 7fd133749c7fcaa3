"""Benchmark: what each stopping rule costs and keeps, on scikit-learn's digits, side by side in one run.

    python benchmarks/stopping_digits.py [--epochs 40] [--repeats 3]

Trains the same model from the same seed three ways, interleaved: fixed epochs, Lightning's
``EarlyStopping`` on ``val_loss``, and ``EfficiencyEarlyStopping`` on ``val_acc``. Prints a Markdown
table of energy (as this machine can measure it: the method is printed), final accuracy, epochs and
energy saved against the fixed run. Nothing is logged to MLflow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from digits_common import digits
from lightning_digits import DigitsClassifier

from green_callbacks.lightning import EfficiencyEarlyStopping, EnergyMonitor


def run(rule: str, epochs: int, seed: int) -> dict[str, float | str]:
    pl.seed_everything(seed, verbose=False)
    (xt, yt), (xv, yv) = digits(seed=seed)
    monitor = EnergyMonitor(mlflow=False, log_artifacts=False)
    callbacks: list[pl.Callback] = [monitor]
    if rule == "EarlyStopping(val_loss)":
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=3))
    elif rule == "EfficiencyEarlyStopping":
        callbacks.append(EfficiencyEarlyStopping(monitor="val_acc", mode="max", min_gain_per_kj=0.5, patience=3,
                                                 warmup_epochs=2, smoothing=0.5))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsClassifier(lr=1e-3), DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(xv, yv), batch_size=512))
    last = monitor.records[-1]
    return {"energy_j": monitor.cumulative_j, "acc": last.metrics["val_acc"], "epochs": len(monitor.records),
            "method": ", ".join(f"{c} {m}" for c, m in last.methods.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rules = ["fixed epochs", "EarlyStopping(val_loss)", "EfficiencyEarlyStopping"]
    results: dict[str, list[dict]] = {r: [] for r in rules}
    for seed in range(args.repeats):  # interleaved, so machine noise hits every rule alike
        for rule in rules:
            results[rule].append(run(rule, args.epochs, seed))
    base = statistics.mean(r["energy_j"] for r in results["fixed epochs"])
    print(f"\nDigits MLP, max {args.epochs} epochs, mean of {args.repeats} seeds; energy: "
          f"{results[rules[0]][0]['method']}\n")
    print("| rule | epochs | energy (J) | final val_acc | energy saved vs fixed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for rule in rules:
        rs = results[rule]
        energy = statistics.mean(r["energy_j"] for r in rs)
        print(f"| {rule} | {statistics.mean(r['epochs'] for r in rs):.1f} | {energy:.0f} | "
              f"{statistics.mean(r['acc'] for r in rs):.4f} | {100 * (1 - energy / base):.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
