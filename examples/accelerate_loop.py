"""A 🤗 Accelerate training loop, measured on every process and logged once: EnergyTracker in any loop.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --cpu           # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --cpu --quick   # 2 epochs, for CI
    python examples/accelerate_loop.py --quick                                                  # one process

``accelerate launch --cpu`` starts one process unless MPI is set up; ``--multi_gpu`` starts them
through torchrun, and ``Accelerator(cpu=True)`` makes them a gloo group on the CPU (so does
``torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu``). On GPUs drop ``--cpu``: each
process then measures its own GPU, each node's first process the CPU/DRAM, and the main process
logs the sum into one MLflow run (``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits, mlp

from green_callbacks import EnergyTracker
from green_callbacks.stopping import EfficiencyStopper


def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> float:
    """Accuracy over the whole validation set, every process's share gathered (the same value on each)."""
    model.eval()
    correct, seen = 0, 0
    with torch.no_grad():
        for x, y in loader:
            hits = accelerator.gather_for_metrics(model(x).argmax(-1) == y)
            correct, seen = correct + int(hits.sum()), seen + len(hits)
    model.train()
    return correct / seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU, processes joined by gloo")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(0)
    (xt, yt), (xv, yv) = digits()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    model, optimizer, train, val = accelerator.prepare(model, optimizer, train, val)
    max_epochs = 2 if args.quick else 15

    # built after Accelerator(): the process group is up, so the tracker reads every rank's place from it
    tracker = EnergyTracker(experiment_name="green-callbacks-accelerate", run_name="accelerate-loop",
                            log_every_n_steps=10)
    tracker.attach(EfficiencyStopper(monitor="val_acc", mode="max"))
    with tracker:
        for epoch in range(max_epochs):
            with tracker.epoch(epoch):
                for x, y in train:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    accelerator.backward(loss)
                    optimizer.step()
                    if tracker.step(batch=(x, y)):  # this process's samples; the point sums every process's
                        break  # a stopper decided (the same on every process)
                if not tracker.should_stop:
                    with tracker.evaluation():
                        acc = evaluate(accelerator, model, val)
                    tracker.report({"val_acc": acc})  # every process reports: the decision is reduced
                    accelerator.print(f"epoch {epoch}: val_acc {acc:.3f}")
            if tracker.should_stop:  # identical on every process
                accelerator.print("stopped:", tracker.stop_decision.message)
                break
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} processes, {tracker.cumulative_j:.1f} J in all: MLflow run",
              tracker.run.run_id if tracker.run else "(none)")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
