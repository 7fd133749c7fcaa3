"""Zeus and CodeCarbon read the same simulated GPU as green-callbacks, over the same windows.

Used by ``run_all.py`` when the peers are installed (``pip install -e ".[bench]"``). The simulated
GPU is the fake ``pynvml`` in ``tests/fake_nvml``: both peers import ``pynvml`` and find it, Zeus's
power monitor (a spawned process) too, through ``sys.path`` and ``FAKE_NVML_CONFIG`` with the same
clock origin. The one patch besides it is at the hardware boundary: CodeCarbon looks for the
``nvidia-smi`` binary before it uses NVML, so it is told an NVIDIA driver is there.

Each peer's window edges are taken as the midpoints of its own begin/end calls, so the truth it is
compared with is the simulated energy over the interval it could have measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
PEERS = ("zeus", "codecarbon")


def installed() -> list[str]:
    return [p for p in PEERS if importlib.util.find_spec(p)]


def version(name: str) -> str:
    from importlib.metadata import version as v

    return v(name)


class Peer:
    """One peer measuring GPU 0 (energy counter) and GPU 1 (power readings only)."""

    name = ""
    settings = ""

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> dict[int, float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Zeus(Peer):
    name = "Zeus"

    def __init__(self) -> None:
        from zeus.monitor import ZeusMonitor

        self.settings = f"zeus {version('zeus')}, ZeusMonitor(approx_instant_energy=True)"
        self.monitor = ZeusMonitor(gpu_indices=[0, 1], cpu_indices=[], approx_instant_energy=True)

    def begin(self) -> None:
        self.monitor.begin_window("w", sync_execution=False)

    def end(self) -> dict[int, float]:
        m = self.monitor.end_window("w", sync_execution=False)
        return {i: float(j) for i, j in m.gpu_energy.items()}

    def close(self) -> None:
        power = getattr(self.monitor, "power_monitor", None)
        if power is not None:
            power.stop()


class CodeCarbon(Peer):
    name = "CodeCarbon"

    def __init__(self) -> None:
        import logging

        import codecarbon.core.gpu as cc_gpu
        from codecarbon import OfflineEmissionsTracker

        cc_gpu.is_nvidia_system = lambda: True  # it looks for the nvidia-smi binary first
        cc_gpu.is_rocm_system = lambda: False
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self.settings = f"codecarbon {version('codecarbon')}, OfflineEmissionsTracker(measure_power_secs=1), tasks"
        # one tracker per GPU: a task's result sums its GPUs
        self.trackers = [OfflineEmissionsTracker(country_iso_code="FRA", gpu_ids=[i], measure_power_secs=1,
                                                 save_to_file=False, log_level="error", allow_multiple_runs=True)
                         for i in (0, 1)]
        for t in self.trackers:
            t.start()

    def begin(self) -> None:
        for t in self.trackers:
            t.start_task("w")

    def end(self) -> dict[int, float]:
        return {i: t.stop_task().gpu_energy * 3.6e6 for i, t in enumerate(self.trackers)}  # kWh -> J

    def close(self) -> None:
        for t in self.trackers:
            t.stop()


def expose_to_subprocesses(specs: list[dict[str, Any]], devs: list[Any]) -> None:
    """Spawned peer processes (Zeus's power monitor) see the same simulated GPUs on the same clock."""
    import sys

    fake_dir = str(ROOT / "tests" / "fake_nvml")
    if fake_dir not in sys.path:
        sys.path.insert(0, fake_dir)
    os.environ["FAKE_NVML_CONFIG"] = json.dumps({"devices": [{**s, "t0": d.t0} for s, d in zip(specs, devs,
                                                                                              strict=True)]})


def start(names: list[str]) -> list[Peer]:
    return [{"zeus": Zeus, "codecarbon": CodeCarbon}[n]() for n in names]


def timed(call) -> tuple[Any, float]:
    """Call and return its result with the midpoint of the call on the monotonic clock."""
    t0 = time.monotonic()
    out = call()
    return out, (t0 + time.monotonic()) / 2


def lightning_callbacks(sync_execution: bool) -> dict[str, Any]:
    """The installed peers as Lightning callbacks, as their docs show them, for the overhead tables:
    Zeus with a ``ZeusMonitor`` window around each epoch (``sync_execution``: CUDA synchronised at its
    edges, its default; off on the CPU), CodeCarbon with a tracker started before training and stopped after."""
    import lightning.pytorch as pl

    class ZeusEpochs(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            import zeus.device.gpu
            from zeus.monitor import ZeusMonitor

            zeus.device.gpu._gpus = None  # Zeus caches the GPUs it found; an earlier section may have had two
            self.monitor = ZeusMonitor(gpu_indices=[0], approx_instant_energy=True)

        def on_train_epoch_start(self, trainer, pl_module):
            self.monitor.begin_window("epoch", sync_execution=sync_execution)

        def on_train_epoch_end(self, trainer, pl_module):
            self.monitor.end_window("epoch", sync_execution=sync_execution)

        def on_fit_end(self, trainer, pl_module):
            if getattr(self.monitor, "power_monitor", None) is not None:
                self.monitor.power_monitor.stop()

    class CodeCarbonFit(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            from codecarbon import OfflineEmissionsTracker

            self.tracker = OfflineEmissionsTracker(country_iso_code="FRA", save_to_file=False, log_level="error",
                                                   allow_multiple_runs=True)
            self.tracker.start()

        def on_fit_end(self, trainer, pl_module):
            self.tracker.stop()

    found = installed()
    return {**({"Zeus (peer): ZeusMonitor window per epoch": lambda: [ZeusEpochs()]} if "zeus" in found else {}),
            **({"CodeCarbon (peer): tracker around fit": lambda: [CodeCarbonFit()]} if "codecarbon" in found else {})}
