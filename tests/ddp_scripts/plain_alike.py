"""Two gloo ranks of a plain loop whose energy warnings come where one rank's own metric would have hidden them.

Usage: python plain_alike.py OUT_DIR PORT. Each rank reports its own ``val_acc`` (``tracker.report``), as
Lightning does without ``sync_dist``: rank 0's is NaN at the first two evaluations, rank 1's finite. The first
evaluation comes before any energy was measured, the third with no energy since the second. Each of the two
energy warnings is about the joules every rank shares: said once for the job, by rank 0, whatever rank 0's
metric was.
"""

import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from green_callbacks import EnergyTracker
from green_callbacks.stopping import EfficiencyStopper


def worker(rank: int, out: str, port: int) -> None:
    import pynvml

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    pynvml.configure([{"profile": [[1.0, 100.0]], "uuid": f"GPU-rank{rank}"}], work_clock=True)
    tracker = EnergyTracker(gpus="all", measure_cpu=False, mlflow=False, output_dir=out, log_artifacts=False)
    tracker.attach(EfficiencyStopper(monitor="val_acc", mode="max"))
    nan = float("nan")
    with tracker, tracker.epoch(0):
        tracker.report({"val_acc": nan if rank == 0 else 0.5})  # no energy measured yet
        pynvml.advance(1.0)
        tracker.report({"val_acc": nan if rank == 0 else 0.6})
        tracker.report({"val_acc": 0.6})  # no energy since the last evaluation
        pynvml.advance(1.0)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
