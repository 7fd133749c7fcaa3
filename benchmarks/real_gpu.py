"""On a real NVIDIA GPU: counter against sampled energy on the same windows, NVML call costs,
the sampler's CPU cost, and the callbacks' overhead on GPU training, as Markdown tables.

    python benchmarks/real_gpu.py [--quick] [--out docs/performance-gpu.md] [--only short ...] [--rounds N --epochs N]

Exits with status 3 (and says why) where there is no GPU that NVML and torch can both see.

- counter vs sampled: four meters run side by side on GPU 0 over the same windows of a bursty
  load (matmul bursts and idle gaps of 20-400 ms): the energy counter (the reference), instant
  power (``NVML_FI_DEV_POWER_INSTANT``) integrated at 50 ms and at 10 ms, and
  ``nvmlDeviceGetPowerUsage`` (the 1-second average) integrated at 50 ms;
- NVML call cost: median microseconds of each call the sensor makes;
- sampler cost: CPU seconds per wall second of the sampler thread at 20 Hz on the real GPU;
- overhead: Lightning epoch time on the GPU with the callbacks over without, interleaved in one
  process (with MLflow logging to a sqlite store when mlflow is importable);
- short: the same on 0.1-s GPU epochs (a step count calibrated on this GPU) with the overhead
  table's rows at the defaults: EnergyMonitor logging to MLflow's default store in a new project
  folder, beside ``mlflow=False``, both stoppers, Zeus and CodeCarbon (when installed).
"""

from __future__ import annotations

import itertools
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    epoch_timer,
    fresh_project,
    interleaved_ratios,
    measured_on,
    overhead_configs,
    overhead_note,
    parse_args,
    report,
    sampler_cpu_share,
)


def gpu_or_exit():
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
    except Exception as exc:
        print(f"no NVIDIA GPU here: {exc}")
        sys.exit(3)
    if not torch.cuda.is_available():
        print("torch sees no CUDA device here")
        sys.exit(3)
    return pynvml, torch


def power_usage_only(nvml):
    """The real pynvml, except that the instant-power field reads as NOT_SUPPORTED (older GPUs)."""
    proxy = types.ModuleType("pynvml_power_usage_only")
    proxy.__dict__.update(nvml.__dict__)

    def no_field(handle, fields):
        raise nvml.NVMLError(nvml.NVML_ERROR_NOT_SUPPORTED)

    proxy.nvmlDeviceGetFieldValues = no_field
    return proxy


def bursty_load(torch, seconds: float, rng: random.Random, x) -> None:
    """Matmul bursts and idle gaps of 20-400 ms each, until ``seconds`` have passed."""
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        burst_end = min(end, now + rng.uniform(0.02, 0.4))
        while time.monotonic() < burst_end:
            for _ in range(4):
                x = torch.tanh(x @ x * (1.0 / x.shape[0]))
            torch.cuda.synchronize()
        gap = min(end - time.monotonic(), rng.uniform(0.02, 0.4))
        if gap > 0:
            time.sleep(gap)


def counter_vs_sampled(nvml, torch, quick: bool) -> str:
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import Method, NvmlSensor

    meters = {
        "counter": EnergyMeter([NvmlSensor([0], nvml=nvml)], period_s=0.05),
        "instant @50 ms": EnergyMeter([NvmlSensor([0], nvml=nvml, use_counter=False)], period_s=0.05),
        "instant @10 ms": EnergyMeter([NvmlSensor([0], nvml=nvml, use_counter=False)], period_s=0.01),
        "power usage (1 s avg) @50 ms": EnergyMeter(
            [NvmlSensor([0], nvml=power_usage_only(nvml), use_counter=False)], period_s=0.05),
    }
    for m in meters.values():
        m.start()
    windows = [0.3, 1.0, 3.0] if quick else [0.3, 1.0, 3.0, 10.0]
    repeats = 3 if quick else 6
    rng = random.Random(7)
    x = torch.randn(4096, 4096, device="cuda")
    diffs: dict[float, dict[str, list[float]]] = {w: {k: [] for k in meters if k != "counter"} for w in windows}
    joules: dict[float, list[float]] = {w: [] for w in windows}
    methods = {}
    try:
        bursty_load(torch, 2.0, rng, x)  # warm up clocks and kernels
        for _ in range(repeats):
            for w in windows:
                for m in meters.values():
                    m.begin("w")
                bursty_load(torch, w, rng, x)
                got = {k: m.end("w") for k, m in meters.items()}
                ref = got["counter"].total_j
                joules[w].append(ref)
                for k, meas in got.items():
                    methods[k] = meas.method("gpu").value
                    if k != "counter":
                        diffs[w][k].append((meas.total_j - ref) / ref)
    finally:
        for m in meters.values():
            m.close()
    assert methods["counter"] == Method.COUNTER.value, methods
    names = [k for k in meters if k != "counter"]
    head = ("| window | counter energy (mean) | " + " | ".join(f"{k}: mean abs diff (mean signed)" for k in names)
            + " |\n| --- | ---: |" + " ---: |" * len(names))
    rows = []
    for w in windows:
        cells = [f"{100 * statistics.mean(abs(d) for d in diffs[w][k]):.2f} % "
                 f"({100 * statistics.mean(diffs[w][k]):+.2f} %)" for k in names]
        rows.append(f"| {w:g} s | {statistics.mean(joules[w]):.1f} J | " + " | ".join(cells) + " |")
    note = (f"\n\nMethods recorded: {methods}. The counter is the reference; {repeats} windows of each length on a "
            "bursty load (matmul bursts and idle gaps of 20-400 ms), all four meters over the same windows.")
    return head + "\n" + "\n".join(rows) + note


def nvml_call_cost(nvml) -> str:
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    calls = {
        "nvmlDeviceGetTotalEnergyConsumption": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h),
        "nvmlDeviceGetFieldValues(POWER_INSTANT)": lambda: nvml.nvmlDeviceGetFieldValues(
            h, [nvml.NVML_FI_DEV_POWER_INSTANT]),
        "nvmlDeviceGetPowerUsage": lambda: nvml.nvmlDeviceGetPowerUsage(h),
    }
    rows = []
    for name, call in calls.items():
        times = []
        for _ in range(500):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        rows.append(f"| `{name}` | {1e6 * statistics.median(times):.1f} µs | {1e6 * max(times):.1f} µs |")
    return "| call | median | max (500 calls) |\n| --- | ---: | ---: |\n" + "\n".join(rows)


def refresh_periods(nvml, torch) -> str:
    """How often each NVML reading changes under a steady load: the finest window it can resolve."""
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    calls = {
        "energy counter": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h),
        "instant power field": lambda: nvml.nvmlDeviceGetFieldValues(
            h, [nvml.NVML_FI_DEV_POWER_INSTANT])[0].value.uiVal,
        "power usage": lambda: nvml.nvmlDeviceGetPowerUsage(h),
    }
    x = torch.randn(8192, 8192, device="cuda")
    rows = []
    for name, call in calls.items():
        for _ in range(120):  # about 3 s of queued work: the GPU stays busy while the CPU polls
            x = torch.tanh(x @ x * (1.0 / 8192))
        changes, last, end = [], call(), time.monotonic() + 2.0
        while time.monotonic() < end:
            value = call()
            if value != last:
                changes.append(time.monotonic())
                last = value
        torch.cuda.synchronize()
        gaps = [b - a for a, b in itertools.pairwise(changes)]
        median = f"{1000 * statistics.median(gaps):.1f} ms" if gaps else "-"
        rows.append(f"| {name} | {len(changes)} | {median} |")
    return ("| reading | changes in 2 s under load | median time between changes |\n| --- | ---: | ---: |\n"
            + "\n".join(rows))


def sampler_cost(nvml) -> str:
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import NvmlSensor

    out = []
    for label, kw in (("energy counter at every tick (0.1.0)", {"counter_poll_s": 0.0}),
                      ("energy counter each second, instant power at every tick", {}),
                      ("instant power only (no counter)", {"use_counter": False})):
        share = sampler_cpu_share(EnergyMeter([NvmlSensor([0], nvml=nvml, **kw)], period_s=0.05).start())
        out.append(f"| {label} | {share:.4f} | {100 * share:.2f} % |")
    return ("| sampler at 20 Hz on the real GPU, reading | CPU s per wall s | of one core |\n| --- | ---: | ---: |\n"
            + "\n".join(out))


def mlp(torch, width: int):
    from torch import nn

    return nn.Sequential(nn.Linear(1024, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def mlp_parts(torch, width: int, xt, yt):
    """The overhead runs' LightningModule (a 1024-width-width-10 MLP, AdamW) and the iterable of batches of
    1024 rows cut from ``xt``/``yt`` (already on the device: no loading in the timed epochs)."""
    import lightning.pytorch as pl
    from torch import nn

    class Mlp(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(torch, width)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Batches(torch.utils.data.IterableDataset):
        def __init__(self, n: int):
            self.n = n

        def __iter__(self):
            for i in range(self.n):
                yield xt[i * 1024:(i + 1) * 1024], yt[i * 1024:(i + 1) * 1024]

        def __len__(self):
            return self.n

    return Mlp, Batches


def overhead(torch, quick: bool) -> str:
    import importlib.util

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from green_callbacks.lightning import EfficiencyEarlyStopping, EnergyBudget, EnergyMonitor

    # GPU-bound on purpose (fp32 matmuls, data already on the GPU): the GPU time a callback could steal
    g = torch.Generator(device="cuda").manual_seed(0)
    xt = torch.randn(100 * 1024, 1024, device="cuda", generator=g)
    yt = torch.randint(0, 10, (100 * 1024,), device="cuda", generator=g)

    Mlp, Batches = mlp_parts(torch, 8192, xt, yt)

    train = DataLoader(Batches(100), batch_size=None)
    val = DataLoader(Batches(4), batch_size=None)

    tmp = tempfile.mkdtemp()
    has_mlflow = importlib.util.find_spec("mlflow") is not None
    monitors: list[EnergyMonitor] = []

    def monitor(**kw):
        m = EnergyMonitor(output_dir=tmp, log_artifacts=False, **kw)
        monitors.append(m)
        return m

    import functools

    import green_callbacks.sensors as sensors_module

    class EveryTick(pl.Callback):
        """Makes the sensors built during this fit read the energy counter at every tick (0.1.0)."""

        def setup(self, trainer, pl_module, stage):
            self.real = sensors_module.NvmlSensor
            sensors_module.NvmlSensor = functools.partial(self.real, counter_poll_s=0.0)

        def on_fit_start(self, trainer, pl_module):
            sensors_module.NvmlSensor = self.real

    def every_tick(**kw):
        return [monitor(**kw), EveryTick()]  # after the monitor: it builds its sensors in on_fit_start

    class EdgeReads(pl.Callback):
        """Makes this fit's GPU sensor read the counter at every window edge, whatever a read costs (as before)."""

        def __init__(self, m):
            self.m = m

        def on_fit_start(self, trainer, pl_module):  # after the monitor's: its sensors exist
            for sensor in self.m.meter.sensors:
                sensor.edge_read_max_s = float("inf")

    def edge_reads(**kw):
        m = monitor(**kw)
        return [m, EdgeReads(m)]

    configs = {
        "without": lambda: [],
        "an empty Callback": lambda: [pl.Callback()],
        "EnergyMonitor (no MLflow), counter read at every tick (0.1.0)": lambda: every_tick(mlflow=False),
        "EnergyMonitor (no MLflow), counter read at every window edge (the previous default)":
            lambda: edge_reads(mlflow=False),
        "EnergyMonitor (no MLflow)": lambda: [monitor(mlflow=False)],
        "EnergyMonitor + stopping (no MLflow)": lambda: [
            monitor(mlflow=False),
            EfficiencyEarlyStopping(monitor="val_acc", mode="max", min_gain="0 per doubling", patience=100),
            EnergyBudget(energy="1 MWh", check_every_n_steps=10)],
    }
    if has_mlflow:
        configs["EnergyMonitor logging to MLflow (sqlite)"] = lambda: [
            monitor(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment_name="overhead")]

    def epoch_times(extra) -> list[float]:
        timer = epoch_timer(torch.cuda.synchronize)
        trainer = pl.Trainer(max_epochs=5, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, *extra()])
        trainer.fit(Mlp(), train, val)
        return timer.times[1:]

    table = interleaved_ratios(configs, epoch_times, 2 if quick else 4,
                               "100 fp32 steps of a 1024-8192-8192-10 MLP, batch 1024")
    rec = next(r for r in reversed(monitors[-1].records) if r.kind.value == "epoch")  # not the end point
    parts = {k: round(v, 1) for k, v in rec.components_j.items()}
    sample = (f"\n\nOne epoch as the last run recorded it: {rec.energy_j:.1f} J in {rec.duration_s:.2f} s, "
              f"by component {parts} J, methods {rec.methods}, GPU peak {rec.gpu_peak_w:.0f} W.")
    return table + sample


def short_epochs(torch, quick: bool, rounds: int | None = None, epochs: int | None = None,
                 device: str = "cuda", parts: bool = False) -> str:
    """Overhead at the defaults on 0.1-s GPU epochs: as many steps of a 1024-4096-4096-10 MLP (batch
    1024, data on the GPU) as this GPU runs in about 90 ms, plus a 4-batch validation. (``device="cpu"``
    runs the same code on the CPU, for trying the script where there is no GPU.) ``parts``: instead of
    the defaults and the peers, the monitor without MLflow with one of its parts changed at a time
    (no CUDA sync at window edges, no CPU measurement, a slower sampler), to see what its cost is made of."""
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader

    from green_callbacks.lightning import EnergyMonitor

    rounds, epochs = rounds or (3 if quick else 6), epochs or (8 if quick else 15)

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    xt = torch.randn(64 * 1024, 1024, device=device, generator=g)
    yt = torch.randint(0, 10, (64 * 1024,), device=device, generator=g)
    probe = mlp(torch, 4096).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    for i in range(30):  # 10 to warm up, 20 timed
        if i == 10:
            sync()
            t = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(probe(xt[:1024]), yt[:1024]).backward()
        opt.step()
    sync()
    steps = max(8, min(64, round(0.09 / ((time.perf_counter() - t) / 20))))

    Mlp, Batches = mlp_parts(torch, 4096, xt, yt)

    def epoch_times(extra) -> list[float]:
        timer = epoch_timer(sync)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[timer, *extra()])
        trainer.fit(Mlp(), DataLoader(Batches(steps), batch_size=None), DataLoader(Batches(4), batch_size=None))
        return timer.times[1:]

    configs = overhead_configs(lambda **kw: EnergyMonitor(**kw), cuda=cuda)
    if parts:
        configs = {k: configs[k] for k in list(configs)[:3]}
        configs.update({
            "EnergyMonitor(mlflow=False, cuda_sync=False)": lambda: [EnergyMonitor(mlflow=False, cuda_sync=False)],
            "EnergyMonitor(cuda_sync=False), MLflow on": lambda: [EnergyMonitor(cuda_sync=False)],
            "EnergyMonitor(mlflow=False, measure_cpu=False)": lambda: [EnergyMonitor(mlflow=False, measure_cpu=False)],
            "EnergyMonitor(mlflow=False, sampling_period_s=1.0)": lambda: [
                EnergyMonitor(mlflow=False, sampling_period_s=1.0)],
        })
    with fresh_project() as folder:
        table = interleaved_ratios(configs, epoch_times, rounds,
                                   f"{steps} fp32 steps of a 1024-4096-4096-10 MLP, batch 1024, + 4 validation batches")
        runs = len(list((folder / "green_callbacks_output").glob("*")))
        left = list((folder / "green_callbacks_output").glob("spool-*"))
        store = "created" if (folder / "mlflow.db").exists() else "missing"
    return table + "\n\n" + overhead_note(rounds, epochs, store, runs, len(left))


SECTIONS = {
    "windows": ("Counter against sampled energy on the same windows", lambda nvml, torch, a: counter_vs_sampled(
        nvml, torch, a.quick)),
    "calls": ("NVML call cost", lambda nvml, torch, a: nvml_call_cost(nvml)),
    "refresh": ("How often each reading refreshes", lambda nvml, torch, a: refresh_periods(nvml, torch)),
    "sampler": ("Sampler cost", lambda nvml, torch, a: sampler_cost(nvml)),
    "overhead": ("Overhead on GPU training (Lightning)", lambda nvml, torch, a: overhead(torch, a.quick)),
    "short": ("Overhead on 0.1-s GPU epochs at the defaults (Lightning, MLflow's default store)",
              lambda nvml, torch, a: short_epochs(torch, a.quick, a.rounds, a.epochs)),
    "parts": ("What the monitor's cost on 0.1-s GPU epochs is made of",
              lambda nvml, torch, a: short_epochs(torch, a.quick, a.rounds, a.epochs, parts=True)),
}


def main() -> int:
    args = parse_args(__doc__, "fewer windows and epochs", list(SECTIONS))
    nvml, torch = gpu_or_exit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    name = nvml.nvmlDeviceGetName(h)
    name = name.decode() if isinstance(name, bytes) else name
    driver = nvml.nvmlSystemGetDriverVersion()
    driver = driver.decode() if isinstance(driver, bytes) else driver
    sections = []
    for key in args.only or SECTIONS:
        title, run = SECTIONS[key]
        sections.append((title, run(nvml, torch, args)))
        print(f"## {title}\n\n{sections[-1][1]}\n", flush=True)  # each section as soon as it is done
    machine = (f"{name} (driver {driver}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"Python {platform.python_version()},")
    report("Performance on a real GPU", measured_on(machine, "real_gpu.py", args.quick), sections, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
