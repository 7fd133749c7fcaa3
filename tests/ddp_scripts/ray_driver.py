"""What the Ray Train scripts share: a local 2-CPU Ray, a TorchTrainer of 2 CPU workers per job, the shutdown.

Usage: ``python ray_driver.py [stop] FRAMEWORK TRACKING_URI OUT_DIR [FRAMEWORK TRACKING_URI OUT_DIR ...]``: each
framework's job (``lightning``: ray_lightning.py's ``train_func``, ``hf``: ray_hf.py's) in turn on one Ray, whose
start-up is paid once; ``train_func`` gets ``{"uri", "out", "stop"}``. A script alone: ``ray_driver.main([...])``.
"""

import sys

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def main(jobs: list, stop: bool) -> None:
    """``jobs``: (train_func, tracking URI, output folder) each, run one after another on one local Ray."""
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for train_func, uri, out in jobs:
            TorchTrainer(train_func, train_loop_config={"uri": uri, "out": out, "stop": stop},
                         scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                         run_config=RunConfig(name="green", storage_path=f"{out}/ray_results")).fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    args = sys.argv[1:]
    stop = bool(args) and args[0] == "stop"
    args = args[1:] if stop else args
    funcs = {}
    for framework in args[0::3]:
        funcs[framework] = __import__(f"ray_{framework}").train_func
    main([(funcs[f], uri, out) for f, uri, out in zip(args[0::3], args[1::3], args[2::3], strict=True)], stop)
