"""What the Ray Train scripts share: a local 2-CPU Ray, a TorchTrainer of 2 CPU workers, the shutdown.

Usage (from a script): ``ray_driver.main(train_func)`` with the script's ``TRACKING_URI OUT_DIR [stop]``
arguments on the command line; ``train_func`` gets ``{"uri", "out", "stop"}``.
"""

import sys

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def main(train_func) -> None:
    uri, out = sys.argv[1], sys.argv[2]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        TorchTrainer(train_func, train_loop_config={"uri": uri, "out": out, "stop": sys.argv[3:] == ["stop"]},
                     scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                     run_config=RunConfig(name="green", storage_path=f"{out}/ray_results")).fit()
    finally:
        ray.shutdown()
