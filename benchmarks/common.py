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
    """A Lightning callback that records each training epoch's wall time and its process CPU time (every
    thread of the training process: the training loop's and each monitor's own threads), ``sync`` at both ends."""
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            sync()
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, pl_module):
            sync()
            self.times.append(time.perf_counter() - self.t)
            self.cpu.append(time.process_time() - self.c)

    return EpochTimer()


def interleaved_ratios(configs: dict[str, Callable[[], list]],
                       epoch_times: Callable[[Callable[[], list]], tuple[list[float], list[float]]],
                       rounds: int, what: str) -> str:
    """Each configuration's median epoch over ``rounds`` interleaved fits, as a ratio to the first, in wall
    time and in the training process's CPU time, with the range of the per-round ratios (how much the
    machine's noise moves them). ``epoch_times`` returns one fit's (wall, CPU) seconds per epoch.

    The CPU time counts every thread of the process (the monitor's sampler too, at full price even where it
    would run on an idle core) and nothing of other processes, so a neighbour's preemption, which moves wall
    times by tens of per cent on a shared VM, does not move it."""
    rounds_of: dict[str, list[tuple[list[float], list[float]]]] = {k: [] for k in configs}
    for _ in range(rounds):  # interleaved: the machine's noise falls on all alike
        for name, make in configs.items():
            rounds_of[name].append(epoch_times(make))
    first = next(iter(rounds_of.values()))
    rows = []
    for name, per_round in rounds_of.items():
        cells = []
        for k in (0, 1):  # wall, CPU
            base = statistics.median([t for r in first for t in r[k]])
            median = statistics.median([t for r in per_round for t in r[k]])
            ratios = [statistics.median(r[k]) / statistics.median(b[k]) for r, b in zip(per_round, first, strict=True)]
            cells.append(f"{1000 * median:.1f} ms | {median / base:.3f} | {min(ratios):.3f}–{max(ratios):.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return (f"| callbacks | median epoch ({what}), wall | ratio to without | range over rounds | "
            "median epoch, CPU time of the training process | ratio to without | range over rounds |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows))


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
