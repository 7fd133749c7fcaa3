"""A plain PyTorch training loop, measured: EnergyTracker's context managers, a budget, efficiency per kJ.

    python examples/plain_loop.py            # 20 epochs, or fewer if the budget stops it
    python examples/plain_loop.py --quick    # 2 epochs, for CI

Logs into MLflow (``MLFLOW_TRACKING_URI``, else MLflow's default store, ``./mlflow.db``): the energy of every
epoch and every evaluation, ``efficiency/val_acc_per_kj``, and samples per joule every few steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits, mlp

from green_callbacks import EnergyTracker
from green_callbacks.stopping import BudgetStopper


def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
    model.train()
    return correct / len(loader.dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", default="20 kJ", help='energy budget, e.g. "20 kJ" or "0.01 kWh"')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    (xt, yt), (xv, yv) = digits()
    train = DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    max_epochs = 2 if args.quick else 20

    tracker = EnergyTracker(country="FR", experiment_name="green-callbacks-plain-loop", log_every_n_steps=20)
    tracker.attach(BudgetStopper(energy=args.budget))
    tracker.max_steps = max_epochs * len(train) - 1  # the last step, for the budget's projection
    with tracker:
        for epoch in range(max_epochs):
            with tracker.epoch(epoch):
                for x, y in train:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if tracker.step(batch=(x, y)):  # the step axis, logging points, samples per joule; True once
                        break  # a stopper decided
                if not tracker.should_stop:
                    with tracker.evaluation():
                        acc = evaluate(model, val)
                    tracker.report({"val_acc": acc})
                    print(f"epoch {epoch}: val_acc {acc:.3f}, {tracker.cumulative_j:.1f} J so far")
            if tracker.should_stop:
                print("stopped by the budget:", tracker.stop_decision.message)
                break
    print("MLflow run", tracker.run.run_id if tracker.run else "(none)", "- experiment green-callbacks-plain-loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
