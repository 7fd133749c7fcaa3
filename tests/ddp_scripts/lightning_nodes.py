"""One node of a 2-node Lightning job under torchrun (1 CPU process per node, gloo); its GPU is simulated.

Usage: torchrun --nnodes 2 --node-rank N --nproc-per-node 1 ... lightning_nodes.py TRACKING_URI OUT_DIR.
Each rank writes the exact joules of its own simulated GPU over each epoch window, and the node
name green-callbacks gave it, to OUT_DIR/truth-rank{r}.json.
"""

import sys

import lightning.pytorch as pl
import lightning_ddp  # the sibling script: its Truth callback
from lightning.pytorch.demos.boring_classes import BoringModel

from green_callbacks.lightning import EnergyMonitor


class Truth(lightning_ddp.Truth):
    def facts(self, trainer):
        """Each epoch's exact GPU joules, and the node name green-callbacks gave this rank."""
        return {"gpu_j": self.truth, "node": self.monitor.rank.node, "node_rank": trainer.node_rank}


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
