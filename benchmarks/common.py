"""What the benchmark scripts share: the sampler's CPU cost, epoch timing, interleaving, the report."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
    with the range of the per-round ratios (how much the machine's noise moves it). Each round runs
    the configurations in a new random order (seeded): a fixed order let whatever one configuration
    leaves behind (a sender process finishing its run, a warm cache) fall on the same next one."""
    import random

    order = random.Random(0)
    rounds_of: dict[str, list[list[float]]] = {k: [] for k in configs}
    for _ in range(rounds):  # interleaved: the machine's noise falls on all alike
        for name in order.sample(list(configs), len(configs)):
            rounds_of[name].append(epoch_times(configs[name]))
    first = next(iter(rounds_of.values()))
    base = statistics.median([t for r in first for t in r])
    rows = []
    for name, per_round in rounds_of.items():
        median = statistics.median([t for r in per_round for t in r])
        ratios = [statistics.median(r) / statistics.median(b) for r, b in zip(per_round, first, strict=True)]
        rows.append(f"| {name} | {1000 * median:.1f} ms | {median / base:.3f} | {min(ratios):.3f}–{max(ratios):.3f} |")
    return (f"| callbacks | median epoch ({what}) | ratio to without | range over rounds |\n"
            "| --- | ---: | ---: | ---: |\n" + "\n".join(rows))


def parse_args(doc: str | None, quick_help: str, sections: list[str] | None = None) -> Any:
    """The benchmarks' shared command line (``--quick``, ``--out``, ``--only`` when a script has
    ``sections``); warnings off for clean tables."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", help="also write the tables (with date and machine) to this Markdown file")
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
    """Print the sections as Markdown under ``header``; also write them to ``out`` when given."""
    text = header + "\n\n" + "\n\n".join(f"## {name}\n\n{body}" for name, body in sections) + "\n"
    print(text)
    if out:
        Path(out).write_text(f"# {title}\n\n" + text)
