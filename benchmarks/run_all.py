"""Every benchmark, side by side in one run, printed as Markdown tables.

    python benchmarks/run_all.py [--quick] [--out docs/performance.md] [--only overhead ...]

- accuracy: per-window GPU energy error against a simulated NVML whose exact energy is known
  (a GPU with an energy counter, a GPU with power readings only, and the floor: an ideal sampler
  reading every sensor refresh), windows 0.3 s to 30 s, on a bursty power profile;
- overhead: Lightning epoch time with the callbacks over without, interleaved in one process, with
  EnergyMonitor at its defaults (MLflow on, logging to MLflow's default local store) beside
  ``mlflow=False``, Zeus and CodeCarbon;
- sampler cost: CPU seconds per wall second of the sampler thread at 20 Hz;
- memory: RSS growth over a simulated 24 hours of 20 Hz sampling with a window every minute;
- sweep: short fits in one process with the MLflow sender kept idle for the next fit, beside a
  new sender for every fit (wall per fit, senders started, their CPU);
- import time of green_callbacks and of each adapter.
- peers: Zeus and CodeCarbon on the same simulated GPU and windows, when installed (the
  ``bench`` extra), and their overhead on the same training.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import (  # noqa: E402
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


def fake_nvml():
    """The simulated NVML as ``pynvml``: one module for the whole run, so that a peer which imported it
    earlier (Zeus keeps its own reference) sees the GPUs configured later."""
    loaded = sys.modules.get("pynvml")
    if loaded is not None and hasattr(loaded, "configure"):
        return loaded
    spec = importlib.util.spec_from_file_location("pynvml", ROOT / "tests" / "fake_nvml" / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pynvml"] = module
    spec.loader.exec_module(module)
    return module


def accuracy(quick: bool) -> str:
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import NvmlSensor

    nvml = fake_nvml()
    refresh = 0.02  # the simulated sensor refreshes its instant power every 20 ms
    devs = nvml.configure([{"profile_seed": 21, "refresh_s": refresh},
                           {"profile_seed": 21, "refresh_s": refresh, "counter": False}])
    windows = [0.3, 1.0, 3.0] if quick else [0.3, 1.0, 3.0, 10.0, 30.0]
    repeats = 3 if quick else 5
    rows = []
    for period in (0.05, 0.01):
        meter = EnergyMeter([NvmlSensor("all", nvml=nvml)], period_s=period).start()
        errors: dict[float, dict[str, list[float]]] = {w: {"counter": [], "sampled": [], "ideal": []} for w in windows}
        try:
            for _ in range(repeats):
                for w in windows:
                    meter.begin("w")
                    time.sleep(w)
                    m = meter.end("w")
                    truth = devs[0].energy_between(m.start_s, m.end_s)
                    errors[w]["counter"].append(abs(m.joules["gpu"]["gpu0"] - truth) / truth)
                    truth1 = devs[1].energy_between(m.start_s, m.end_s)
                    errors[w]["sampled"].append(abs(m.joules["gpu"]["gpu1"] - truth1) / truth1)
                    # the floor: a sampler reading every refresh of the instant power, exactly on time
                    k0 = int((m.start_s - devs[1].t0) / refresh) + 1
                    k1 = int((m.end_s - devs[1].t0) / refresh)
                    ideal = sum(devs[1].power_at(devs[1].t0 + k * refresh) * refresh for k in range(k0, k1))
                    ideal += devs[1].power_at(m.start_s) * (devs[1].t0 + k0 * refresh - m.start_s)
                    ideal += devs[1].power_at(m.end_s) * (m.end_s - devs[1].t0 - k1 * refresh)
                    errors[w]["ideal"].append(abs(ideal - truth1) / truth1)
        finally:
            meter.close()
        for w in windows:
            e = errors[w]
            rows.append(f"| {period * 1000:.0f} ms | {w:g} s | {100 * statistics.mean(e['counter']):.4f} % | "
                        f"{100 * statistics.mean(e['sampled']):.3f} % (max {100 * max(e['sampled']):.3f} %) | "
                        f"{100 * statistics.mean(e['ideal']):.3f} % |")
    head = ("| sampling period | window | counter GPU: mean error | power-only GPU (sampled): mean error | "
            "ideal sampler (every 20 ms refresh) |\n| --- | --- | ---: | ---: | ---: |")
    return head + "\n" + "\n".join(rows)


def peer_accuracy(quick: bool) -> str:
    """Zeus and CodeCarbon beside green-callbacks (default 50 ms) over the same windows."""
    import peers

    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import NvmlSensor

    names = peers.installed()
    if not names:
        return "Zeus and CodeCarbon are not installed here (`pip install -e \".[bench]\"`); not run."
    nvml = fake_nvml()
    specs = [{"profile_seed": 21, "refresh_s": 0.02}, {"profile_seed": 21, "refresh_s": 0.02, "counter": False}]
    devs = nvml.configure(specs)
    peers.expose_to_subprocesses(specs, devs)
    running = peers.start(names)
    meter = EnergyMeter([NvmlSensor("all", nvml=nvml)]).start()
    windows = [0.3, 1.0, 3.0] if quick else [0.3, 1.0, 3.0, 10.0, 30.0]
    repeats = 3 if quick else 5
    who = ["green-callbacks"] + [p.name for p in running]
    errors = {(w, n, g): [] for w in windows for n in who for g in (0, 1)}
    try:
        time.sleep(3)  # the peers' own start-up (Zeus infers its power monitor's period)
        for _ in range(repeats):
            for w in windows:
                edges = {}
                for p in running:
                    _, edges[p.name] = peers.timed(p.begin)
                meter.begin("w")
                time.sleep(w)
                m = meter.end("w")
                got = {"green-callbacks": ({0: m.joules["gpu"]["gpu0"], 1: m.joules["gpu"]["gpu1"]},
                                           m.start_s, m.end_s)}
                for p in reversed(running):
                    joules, t_end = peers.timed(p.end)
                    got[p.name] = (joules, edges[p.name], t_end)
                for n, (joules, t0, t1) in got.items():
                    for g in (0, 1):
                        exact = devs[g].energy_between(t0, t1)
                        errors[(w, n, g)].append(abs(joules.get(g, 0.0) - exact) / exact)
    finally:
        meter.close()
        for p in running:
            p.close()
    cols = [f"{n}: {regime}" for regime in ("counter GPU", "power-only GPU") for n in who]
    head = "| window | " + " | ".join(cols) + " |\n| --- |" + " ---: |" * len(cols)
    rows = []
    for w in windows:
        cells = [f"{100 * statistics.mean(errors[(w, n, g)]):.3f} %" for g in (0, 1) for n in who]
        rows.append(f"| {w:g} s | " + " | ".join(cells) + " |")
    settings = "; ".join(p.settings for p in running)
    return (head + "\n" + "\n".join(rows) + f"\n\nMean error over {repeats} windows of each length, all "
            f"measuring at once. green-callbacks at its defaults (50 ms sampling); {settings}. Each peer is "
            "judged on the interval between the midpoints of its own begin and end calls.")


def digits_fit(callbacks: list, epochs: int = 5) -> None:
    """The overhead workload: the digits MLP on the CPU, 45 steps + validation per epoch, one
    simulated GPU (with an energy counter) for every configuration to measure."""
    import lightning.pytorch as pl
    import torch
    from digits_common import digits
    from lightning_digits import DigitsClassifier
    from torch.utils.data import DataLoader, TensorDataset

    fake_nvml().configure(n=1)
    os.environ.pop("FAKE_NVML_CONFIG", None)  # set by the peer accuracy run for spawned monitors
    # one intra-op thread: on a shared 2-CPU VM two made epochs 5-10x slower and their times noise
    torch.set_num_threads(1)
    (xt, yt), (xv, yv) = digits()
    train = DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
               ).fit(DigitsClassifier(), train, DataLoader(TensorDataset(xv, yv), batch_size=512))


def overhead(quick: bool, rounds: int | None = None, epochs: int | None = None) -> str:
    from green_callbacks.lightning import EnergyMonitor

    rounds = rounds or (3 if quick else 8)
    epochs = epochs or 5

    def epoch_times(extra) -> list[float]:
        timer = epoch_timer()
        digits_fit([timer, *extra()], epochs=epochs)
        return timer.times[1:]  # the first epoch warms caches

    # EnergyMonitor as the README's main job runs it: MLflow on, MLflow's default store, default output_dir
    configs = overhead_configs(lambda **kw: EnergyMonitor(gpus="all", **kw), cuda=False)
    with fresh_project() as folder:
        table = interleaved_ratios(configs, epoch_times, rounds, "45 steps + validation")
        runs = len(list((folder / "green_callbacks_output").glob("*")))
        left = list((folder / "green_callbacks_output").glob("spool-*"))
        store = "created" if (folder / "mlflow.db").exists() else "missing"
    return table + "\n\n" + overhead_note(rounds, epochs, store, runs, len(left))


def sweep(quick: bool) -> str:
    """Short fits in one process, as a sweep runs its trials: the MLflow sender kept idle for the next fit (the
    default) against a new sender for every fit (``IDLE_S = 0``, as before), in alternating blocks of fits."""
    import psutil

    from green_callbacks.lightning import EnergyMonitor
    from green_callbacks.sensors.cpu_power import SENDERS
    from green_callbacks.sinks import launch
    from green_callbacks.sinks import mlflow as sink_module

    pids: list[int] = []

    def start_sender(*args, **kwargs):  # the sinks' senders, counted (a kept one is handed the spool)
        proc = launch.start_sender(*args, **kwargs)
        pids.append(proc.pid if proc is not None else -1)
        return proc

    sink_module.start_sender = start_sender
    fits, blocks = (3, 1) if quick else (4, 2)
    modes = {"a new sender for every fit": 0.0, "the sender kept idle for the next fit (default)": launch.IDLE_S}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, float] = dict.fromkeys(modes, 0.0)
    started: dict[str, set[int]] = {m: set() for m in modes}
    with fresh_project():
        for _ in range(blocks):
            for mode, idle_s in modes.items():
                launch.IDLE_S = idle_s
                before = SENDERS.seconds
                for _ in range(fits):
                    t0 = time.perf_counter()
                    digits_fit([EnergyMonitor(gpus="all")], epochs=2)
                    walls[mode].append(time.perf_counter() - t0)
                    started[mode].add(pids[-1])
                launch.IDLE.close()  # the block's last sender ends: its CPU is counted once it is reaped
                end = time.monotonic() + 60
                while SENDERS.pids and time.monotonic() < end:
                    time.sleep(0.1)
                cpu[mode] += SENDERS.seconds - before
        launch.IDLE_S = modes["the sender kept idle for the next fit (default)"]
        sink_module.start_sender = launch.start_sender
        rss = psutil.Process().memory_info().rss
    n = fits * blocks
    rows = [f"| {mode} | {statistics.median(walls[mode]):.2f} s | {max(walls[mode]):.2f} s | {len(started[mode])} | "
            f"{cpu[mode] / n:.2f} s |" for mode in modes]
    return ("| 2-epoch digits fits at the defaults, one process | median wall per fit | slowest fit | senders "
            f"started for {n} fits | senders' CPU per fit |\n| --- | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) +
            f"\n\n{blocks} blocks of {fits} fits per row, alternating; MLflow's default store in a fresh folder; "
            f"this process's RSS at the end {rss / 2**20:.0f} MiB. A fit's wall includes the end's wait for MLflow "
            "to confirm (a new sender imports MLflow in it: the fit is shorter than `first_send_s`).")


def own_cost(quick: bool) -> str:
    """What the monitor itself costs at its defaults, counted rather than inferred from epoch times
    (which this VM's neighbours move by tens of per cent): the time inside every one of its hooks on
    the training thread (of which the MLflow sink's calls), the sampler thread's CPU and the MLflow
    sender process's CPU while the epochs ran, each per epoch and as a share of the median epoch."""
    import functools

    import lightning.pytorch as pl
    import psutil

    from green_callbacks.lightning import EnergyMonitor
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sinks.mlflow import MlflowSink

    spent = {"hooks": 0.0, "sink": 0.0, "sampler": 0.0}

    def counted(fn, key):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.thread_time()  # CPU time: a neighbour's preemption of this thread is not counted
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.thread_time() - t
        return wrapper

    class Costs(pl.Callback):
        """CPU of the sampler thread and of the sender from the first to the last epoch's end."""

        def __init__(self, monitor):
            self.monitor, self.sampler_s, self.sender_s, self.gap_s = monitor, 0.0, 0.0, 0.0

        def _now(self):
            sender = psutil.Process(self.monitor.sink.sender_pid).cpu_times()
            return spent["sampler"], sender.user + sender.system, spent["hooks"], spent["sink"]

        def on_train_epoch_end(self, trainer, pl_module):  # after the monitor's own: its cost is counted
            if trainer.current_epoch == 0:
                self.first = self._now()
            else:
                self.diff = [b - a for a, b in zip(self.first, self._now(), strict=True)]

        def on_train_end(self, trainer, pl_module):
            trace = self.monitor.meter.trace_frame()
            if self.monitor.meter.trace.stride == 1:
                self.gap_s = float(trace["time_s"].diff().max())

    hooks = [name for name in vars(EnergyMonitor) if name.startswith("on_") and name != "on_train_end"]
    hooks += [name for name in dir(EnergyMonitor) if name.startswith("on_") and name not in hooks
              and getattr(EnergyMonitor, name) is not getattr(pl.Callback, name, None) and name != "on_train_end"]
    calls = ("log_metrics", "log_params", "set_tags", "interval_end")
    originals = {name: getattr(MlflowSink, name) for name in calls}
    tick = EnergyMeter.tick
    rows = []
    try:
        for name in calls:
            setattr(MlflowSink, name, counted(originals[name], "sink"))
        # the sampler's CPU timed inside its own thread (/proc's per-thread times overstated it ~15x here:
        # a thread woken by a timer is often the one running when the accounting tick lands)
        EnergyMeter.tick = counted(tick, "sampler")
        with fresh_project():
            for epochs, what in ((6, "as in the fits above"),
                                 (160 if quick else 150, "the sender starts MLflow at 10 s, then sends every 5 s")):
                spent.update(hooks=0.0, sink=0.0, sampler=0.0)
                timer, monitor = epoch_timer(), EnergyMonitor(gpus="all")
                for name in hooks:
                    setattr(monitor, name, counted(getattr(monitor, name), "hooks"))
                costs = Costs(monitor)
                digits_fit([timer, monitor, costs], epochs)
                median = statistics.median(timer.times[1:])
                sampler_s, sender_s, hooks_s, sink_s = (d / (epochs - 1) for d in costs.diff)  # epochs 2..N
                per = {"hooks": hooks_s, "sink": sink_s, "sampler": sampler_s, "sender": sender_s}
                cells = " | ".join(f"{1e6 * v:.0f} µs ({100 * v / median:.2f} %)" for v in per.values())
                total = (per["hooks"] + per["sampler"]) / median
                rows.append(f"| {epochs} epochs: {what} | {1000 * median:.1f} ms | {1000 * costs.first[2]:.1f} ms | "
                            f"{cells} | {100 * total:.2f} % | {1000 * costs.gap_s:.0f} ms |")
    finally:
        for name, fn in originals.items():
            setattr(MlflowSink, name, fn)
        EnergyMeter.tick = tick
    return ("| EnergyMonitor at its defaults | median epoch | its hooks until the first epoch's end (start-up) | "
            "CPU in its hooks on the training thread, per epoch | "
            "of which MLflow sink calls | sampler thread CPU | sender process CPU (idle priority) | "
            "hooks + sampler, share of an epoch | largest gap between sampler readings (period 50 ms) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            + "\n".join(rows) + "\n\nPer epoch: the CPU time of every hook of the monitor (`time.thread_time`, "
            "so a neighbour's preemption is not counted) and of its threads from the first epoch's end to the "
            "last's, over the epochs in between; the start-up (sensors, spool, sender launch) once per fit. The "
            "sender runs at idle CPU priority in its own process: Python's start-up in the short fit, MLflow's "
            "import and store start-up plus a `log_batch` every 5 s in the long one; on a machine with a "
            "free core it takes nothing from training.")


def sampler_cost() -> str:

    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import CpuEstimateSensor, NvmlSensor

    nvml = fake_nvml()
    nvml.configure(n=1)
    share = sampler_cpu_share(EnergyMeter([NvmlSensor("all", nvml=nvml), CpuEstimateSensor()], period_s=0.05).start())
    return (f"Sampler thread at 20 Hz (one simulated GPU + CPU estimate): {share:.4f} CPU s per wall s "
            f"({100 * share:.2f} % of one core).")


def memory(quick: bool) -> str:
    import gc

    import psutil

    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import Reading, Sensor
    from green_callbacks.sensors.base import Method

    class Steady(Sensor):
        component = "gpu"

        @property
        def devices(self):
            return ["gpu0"]

        def read(self, now_s):
            return Reading({"gpu0": now_s * 300.0}, {"gpu0": Method.COUNTER}, {"gpu0": 300.0})

    hours = 2 if quick else 24
    ticks = hours * 3600 * 20
    meter = EnergyMeter([Steady()], period_s=0.05, clock=lambda: 0.0)
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    for i in range(ticks):
        now = i * 0.05
        meter.tick(now)
        if i % 1200 == 0:  # a window a minute: ~1,440 windows a day
            if meter.is_open("epoch"):
                meter.end("epoch")
            meter.begin("epoch")
    gc.collect()
    rss1 = proc.memory_info().rss
    took = time.perf_counter() - t0
    return (f"Simulated {hours} h at 20 Hz ({ticks:,} samples, {ticks // 1200:,} windows, {took:.0f} s "
            f"to simulate): RSS growth {(rss1 - rss0) / 2**20:.2f} MiB; trace holds {len(meter.trace)} points "
            f"(stride {meter.trace.stride}).")


def import_times() -> str:
    rows = []
    for module in ("green_callbacks", "green_callbacks.lightning", "green_callbacks.transformers"):
        runs = []
        for _ in range(5):
            code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
            runs.append(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout))
        rows.append(f"| `import {module}` | {1000 * statistics.median(runs):.1f} ms |")
    return "| import | median of 5 fresh processes |\n| --- | ---: |\n" + "\n".join(rows)


SECTIONS = {
    "accuracy": ("Accuracy against a simulated GPU with known exact energy", accuracy),
    "peers": ("Peers on the same simulated GPU and windows", peer_accuracy),
    "overhead": ("Overhead on Lightning training at the defaults (digits MLP on the CPU, a simulated GPU measured, "
                 "MLflow's default store)", overhead),
    "owncost": ("What the monitor itself costs at its defaults, counted", own_cost),
    "sweep": ("Short fits in one process: the MLflow sender kept idle for the next fit", sweep),
    "sampler": ("Sampler cost", lambda quick: sampler_cost()),
    "memory": ("Memory over a long run", memory),
    "imports": ("Import time", lambda quick: import_times()),
}


def main() -> int:
    args = parse_args(__doc__, "shorter windows and fewer repeats", list(SECTIONS))
    sized = {"overhead": {"rounds": args.rounds, "epochs": args.epochs}}
    sections = []
    for name in args.only or SECTIONS:
        sections.append((SECTIONS[name][0], SECTIONS[name][1](args.quick, **sized.get(name, {}))))
        print(f"## {sections[-1][0]}\n\n{sections[-1][1]}\n", flush=True)  # each section as soon as it is done
    cpu = platform.processor() or platform.machine()
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()})"
    report("Performance", measured_on(machine, "run_all.py", args.quick), sections, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
