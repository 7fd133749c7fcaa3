"""One node of a 2-node Lightning job under torchrun (1 CPU process per node, gloo); its GPU is simulated.

Usage: torchrun --nnodes 2 --node-rank N --nproc-per-node 1 ... lightning_nodes.py TRACKING_URI OUT_DIR.
Each rank writes the exact joules of its own simulated GPU over each epoch window, and the node
name green-callbacks gave it, to OUT_DIR/truth-rank{r}.json.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from green_callbacks.lightning import EnergyMonitor


class Truth(pl.Callback):
    def __init__(self, monitor, out):
        self.monitor, self.out, self.truth = monitor, out, []

    def on_train_epoch_end(self, trainer, pl_module):
        import pynvml

        (dev,) = pynvml.devices()
        w = self.monitor.last_window
        self.truth.append(dev.energy_between(w.start_s, w.end_s))
        facts = {"gpu_j": self.truth, "node": self.monitor.rank.node, "node_rank": trainer.node_rank}
        Path(self.out, f"truth-rank{trainer.global_rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    uri, out = sys.argv[1], sys.argv[2]
    monitor = EnergyMonitor(gpus="all", tracking_uri=uri, experiment_name="nodes", output_dir=out)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, Truth(monitor, out)],
        default_root_dir=out,
    )
    trainer.fit(BoringModel())
