"""What the benchmark scripts share: the sampler's CPU cost, epoch timing, interleaving, the report."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def sampler_cpu_share(meter: Any, seconds: float = 10.0) -> float:
    """CPU seconds per wall second of a started meter's sampler thread over ``seconds``; closes it."""
    import psutil

    native = meter._thread.native_id

    def cpu() -> float:
        t = next(t for t in psutil.Process().threads() if t.id == native)
        return t.user_time + t.system_time

    c0, w0 = cpu(), time.monotonic()
    time.sleep(seconds)
    c1, w1 = cpu(), time.monotonic()
    meter.close()
    return (c1 - c0) / (w1 - w0)


def epoch_timer(sync: Callable[[], None] = lambda: None) -> Any:
    """A Lightning callback that records each training epoch's wall time (``sync`` at both ends)."""
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            sync()
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            sync()
            self.times.append(time.perf_counter() - self.t)

    return EpochTimer()


def interleaved_ratios(configs: dict[str, Callable[[], list]], epoch_times: Callable[[Callable[[], list]], list[float]],
                       rounds: int, what: str) -> str:
    """Each configuration's median epoch over ``rounds`` interleaved fits, as a ratio to the first,
    with the range of the per-round ratios (how much the machine's noise moves it) and a 90 %
    bootstrap interval of the ratio (rounds resampled with replacement, the pooled medians' ratio
    recomputed; paired: a round's fits of every configuration are drawn together). Each round runs
    the configurations in a new random order (seeded): a fixed order let whatever one configuration
    leaves behind (a sender process finishing its run, a warm cache) fall on the same next one."""
    import random

    order = random.Random(0)
    rounds_of: dict[str, list[list[float]]] = {k: [] for k in configs}
    for _ in range(rounds):  # interleaved: the machine's noise falls on all alike
        for name in order.sample(list(configs), len(configs)):
            rounds_of[name].append(epoch_times(configs[name]))
    first = next(iter(rounds_of.values()))
    resample = random.Random(1)
    draws = [[resample.randrange(rounds) for _ in range(rounds)] for _ in range(1000)]

    def pooled(per_round: list[list[float]], picks: list[int] | range) -> float:
        return statistics.median([t for i in picks for t in per_round[i]])

    base = pooled(first, range(rounds))
    rows = []
    for name, per_round in rounds_of.items():
        median = pooled(per_round, range(rounds))
        ratios = [statistics.median(r) / statistics.median(b) for r, b in zip(per_round, first, strict=True)]
        boot = sorted(pooled(per_round, d) / pooled(first, d) for d in draws)
        rows.append(f"| {name} | {1000 * median:.1f} ms | {median / base:.3f} | {boot[50]:.3f}–{boot[949]:.3f} "
                    f"| {min(ratios):.3f}–{max(ratios):.3f} |")
    return (f"| callbacks | median epoch ({what}) | ratio to without | 90 % interval | range over rounds |\n"
            "| --- | ---: | ---: | ---: | ---: |\n" + "\n".join(rows))


@contextlib.contextmanager
def fresh_project() -> Iterator[Path]:
    """A new user's project folder as the working directory: no MLflow settings, so MLflow's default
    store is created there (``mlflow.db``, MLflow 3), and green-callbacks' default ``output_dir``."""
    import tempfile

    old, saved = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow = sys.modules.get("mlflow")
    with tempfile.TemporaryDirectory(prefix="green-bench-") as folder:
        os.chdir(folder)
        if mlflow is not None:
            mlflow.set_tracking_uri(None)
        try:
            yield Path(folder)
        finally:
            os.chdir(old)
            if saved is not None:
                os.environ["MLFLOW_TRACKING_URI"] = saved


def overhead_configs(monitor: Callable[..., Any], cuda: bool) -> dict[str, Callable[[], list]]:
    """The overhead table's rows: without, an empty Callback, ``monitor(mlflow=False)``, ``monitor()`` at
    its defaults (MLflow on, whatever store the working directory gives), the defaults with both
    stoppers, and the installed peers as their docs show them (Zeus syncing CUDA where ``cuda``)."""
    import lightning.pytorch as pl
    import peers

    from green_callbacks.lightning import EfficiencyEarlyStopping, EnergyBudget

    configs: dict[str, Callable[[], list]] = {
        "without": lambda: [],
        "an empty Callback (Lightning's own cost per callback)": lambda: [pl.Callback()],
        "EnergyMonitor(mlflow=False)": lambda: [monitor(mlflow=False)],
        "EnergyMonitor at its defaults (MLflow on, default local store)": lambda: [monitor()],
        "EnergyMonitor at its defaults + stopping (EfficiencyEarlyStopping, EnergyBudget every 10 steps)": lambda: [
            monitor(),
            EfficiencyEarlyStopping(monitor="val_acc", mode="max", min_gain="0 per doubling", patience=100),
            EnergyBudget(energy="1 MWh", check_every_n_steps=10)],
    }
    configs.update(peers.lightning_callbacks(sync_execution=cuda))
    return configs


def overhead_note(rounds: int, epochs: int, store: str, runs: int, unsent: int) -> str:
    """What the overhead table's rows are, and what the default rows left in their project folder."""
    import peers

    note = (f"Each row: {rounds} fits of {epochs} epochs, interleaved, each round in a new random order (the "
            "first epoch of each fit not counted); the ratio is of medians, the 90 % interval a bootstrap over "
            "the rounds, the range that of each round's ratio. The default rows log to MLflow's default store "
            f"(`mlflow.db` in a new working directory: {store}; {runs} run folders, {unsent} spools left unsent).")
    if not peers.installed():
        note += " Zeus and CodeCarbon are not installed here (`pip install -e \".[bench]\"`); their rows are missing."
    return note


def parse_args(doc: str | None, quick_help: str, sections: list[str] | None = None) -> Any:
    """The benchmarks' shared command line (``--quick``, ``--out``, ``--only`` when a script has
    ``sections``); warnings off for clean tables."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", help="also write the tables (with date and machine) to this Markdown file")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the overhead table (default: the script's)")
    parser.add_argument("--epochs", type=int, help="epochs per fit in the overhead table (default: the script's)")
    if sections:
        parser.add_argument("--only", nargs="+", choices=sections, help="run only these sections")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    return parser.parse_args()


def measured_on(machine: str, script: str, quick: bool) -> str:
    """The header line of a report: today's date, the machine and the command that produced it."""
    import datetime as dt

    return (f"Measured {dt.date.today().isoformat()} on {machine} with `python benchmarks/{script}"
            f"{' --quick' if quick else ''}`.")


def report(title: str, header: str, sections: list[tuple[str, str]], out: str | None) -> None:
    """Print the sections as Markdown under ``header``; also write them to ``out`` when given: into an existing file,
    each section replaces the one of the same heading (or is added at the end), and every other section, written by
    hand or by another script (``stopping.py``'s), is kept."""
    text = header + "\n\n" + "\n\n".join(f"## {name}\n\n{body}" for name, body in sections) + "\n"
    print(text)
    if not out:
        return
    path = Path(out)
    if not path.exists():
        path.write_text(f"# {title}\n\n" + text)
        return
    top, *parts = path.read_text().split("\n## ")
    kept = {part.split("\n", 1)[0].strip(): part for part in parts}
    for name, body in sections:
        kept[name] = f"{name}\n\n{body}\n\n*{header.strip()}*\n"
    path.write_text("\n## ".join([top.rstrip("\n") + "\n", *(p.rstrip("\n") + "\n" for p in kept.values())]))
