"""A plain PyTorch DDP loop (2 CPU processes from torch.multiprocessing.spawn, gloo) with EnergyTracker.

Usage: python plain_ddp.py TRACKING_URI OUT_DIR PORT [blind]; blind: no rank measures anything (``gpus=None,
measure_cpu=False``, as a job of MIG slices). No launcher sets LOCAL_RANK here: the tracker finds
each rank's place from torch.distributed and the ranks' host names. Each rank writes the exact
joules of its own simulated GPU over each epoch window to OUT_DIR/truth-rank{r}.json, the windows'
durations to durations-rank{r}.json, its GPU's joules just after the windows' edges to lag-rank{r}.json
(helpers.lag_slack), and its local rank to OUT_DIR/local-rank{r}.txt.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from green_callbacks import EnergyTracker

from helpers import lag_slack


def worker(rank: int, uri: str, out: str, port: int, blind: bool) -> None:
    import pynvml

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sensors = {"gpus": None, "measure_cpu": False} if blind else {"gpus": "all"}
    tracker = EnergyTracker(tracking_uri=uri, experiment_name="ddp", output_dir=out, log_artifacts=False,
                            log_every_n_steps=5, **sensors)
    truth, durations, lags = [], [], []
    with tracker:
        for epoch in range(2):
            with tracker.epoch(epoch):
                for _ in range(10):
                    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    tracker.step(batch=(x, y))
                with tracker.evaluation(), torch.no_grad():
                    val_loss = float(torch.nn.functional.cross_entropy(model(x), y))
                tracker.report({"val_loss": val_loss})
            if not blind:
                (dev,) = pynvml.devices()
                window = tracker.last_window
                truth.append(dev.energy_between(window.start_s, window.end_s))
                durations.append(window.duration_s)
                lags.append(lag_slack(dev, window))
                Path(out, f"truth-rank{rank}.json").write_text(json.dumps(truth))
                Path(out, f"durations-rank{rank}.json").write_text(json.dumps(durations))
                Path(out, f"lag-rank{rank}.json").write_text(json.dumps(lags))
    Path(out, f"local-rank{rank}.txt").write_text(str(tracker.rank.local_rank))
    dist.destroy_process_group()


if __name__ == "__main__":
    uri, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mp.spawn(worker, args=(uri, out, port, sys.argv[4:] == ["blind"]), nprocs=2)
