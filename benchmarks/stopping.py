"""Benchmark: what each stopping rule saves and loses, over tasks of different curve shapes, at 5 W and 2000 W.

    python benchmarks/stopping.py [--quick] [--out FILE]

Real training (PyTorch Lightning on CPU, the package's callbacks) on data that ships with
scikit-learn, at most 60 epochs, one evaluation per epoch. The energy comes from the simulated
GPU of ``tests/fake_nvml`` on a *work clock*: every training sample advances it by 3/8 s and
every validation sample by 1/8 s, at a constant 5 W or 2000 W, so a run's joules are a function of
the work done, identical from run to run, and exactly 400 times larger at 2000 W.

Rules, side by side, each task and seed trained from the same seed (so every stopped run is a
prefix of the fixed one): fixed epochs; Lightning's ``EarlyStopping`` on ``val_loss`` and on
``val_acc`` (patience 3); ``EfficiencyEarlyStopping(monitor="val_acc")`` and
``EfficiencyEarlyStopping()`` (``val_loss``), every other argument at its default; and the oracle,
the first evaluation within 0.5 points of the fixed run's final accuracy. Energy saved and
accuracy lost are against the fixed run's final evaluation. Rules whose decisions use energy run
at both powers; Lightning's ``EarlyStopping`` runs at 5 W only. Other criteria (thresholds,
estimators, the first version's per-kJ rule, marginal/average efficiency, Prechelt's GL and PQ)
and variants of the default (the window's width, the best value so far, patience in energy, no new best)
are replayed on the fixed runs' evaluations, and the default and patience in energy again as if the runs
had been evaluated every 2nd or 3rd epoch. Printed: means over every run (with the worst task's mean over
its seeds and the worst single run), each task's means over its seeds, and every run.
``--quick``: one seed per task instead of ten.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from common import measured_on, parse_args, report
from run_all import fake_nvml

from green_callbacks.lightning import EfficiencyEarlyStopping, EnergyMonitor
from green_callbacks.policies import EfficiencyPlateau, GainThreshold, theil_sen_slope

MAX_EPOCHS = 60
POWERS_W = (5.0, 2000.0)
TRAIN_S_PER_SAMPLE = 3 / 8  # work-clock seconds: binary fractions, so the joules are exact at both powers
VAL_S_PER_SAMPLE = 1 / 8
ORACLE_TOLERANCE = 0.005
SEEDS = 10  # per task; 3 seeds left the comparisons within their noise (see the paired section)
DEFAULT_GAIN = inspect.signature(EfficiencyPlateau).parameters["min_gain"].default  # the package's default
DEFAULT_PCT = GainThreshold(DEFAULT_GAIN).value  # the same, in % per doubling, for the hand-written variants


@dataclass(frozen=True)
class Task:
    """A data set and a model whose validation accuracy has a known shape over 60 epochs."""

    name: str
    shape: str
    data: Callable[[], tuple[np.ndarray, np.ndarray]]
    val_fraction: float
    hidden: tuple[int, ...]
    optimizer: str
    lr: float
    batch_size: int


TASKS = [
    Task("digits", "smooth saturation", lambda: datasets.load_digits(return_X_y=True), 0.25, (32,), "Adam", 1e-3, 64),
    Task("noisy", "noisy saturation", lambda: datasets.make_classification(
        n_samples=1500, n_features=20, n_informative=5, flip_y=0.15, random_state=1), 0.2, (64,), "Adam", 3e-3, 64),
    Task("wine", "plateaus, then rises again", lambda: datasets.load_wine(return_X_y=True), 0.4, (16,), "SGD",
         0.01, 32),
    Task("cancer", "early saturation", lambda: datasets.load_breast_cancer(return_X_y=True), 0.3, (16,), "Adam",
         1e-2, 64),
    Task("climb", "still climbing at the end", lambda: datasets.make_classification(
        n_samples=2000, n_features=20, n_informative=6, n_redundant=2, n_clusters_per_class=3, class_sep=1.0,
        flip_y=0.02, random_state=0), 0.3, (64, 64), "SGD", 0.02, 128),
]

FIXED = "fixed epochs"
# rule -> (callbacks, whether its decisions use energy: the others are trained at 5 W only, their stops
# are the same at any power by construction)
RULES: dict[str, tuple[Callable[[], list[pl.Callback]], bool]] = {
    FIXED: (list, True),
    "EarlyStopping(val_loss)": (lambda: [EarlyStopping(monitor="val_loss", mode="min", patience=3)], False),
    "EarlyStopping(val_acc)": (lambda: [EarlyStopping(monitor="val_acc", mode="max", patience=3)], False),
    'EfficiencyEarlyStopping("val_acc")': (lambda: [EfficiencyEarlyStopping(monitor="val_acc")], True),
    "EfficiencyEarlyStopping() (val_loss)": (lambda: [EfficiencyEarlyStopping()], True),
}


class Classifier(pl.LightningModule):
    """A small MLP whose steps advance the simulated GPU's work clock by the work they do."""

    def __init__(self, features: int, classes: int, task: Task) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for width in task.hidden:
            layers += [torch.nn.Linear(features, width), torch.nn.ReLU()]
            features = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(features, classes))
        self.task = task
        self.clock = sys.modules["pynvml"]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.clock.advance(len(x) * TRAIN_S_PER_SAMPLE)
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)  # for Prechelt's training progress
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.clock.advance(len(x) * VAL_S_PER_SAMPLE)
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.task.optimizer)(self.parameters(), lr=self.task.lr)


class Evaluations(pl.Callback):
    """Each evaluation's metrics and the simulated GPU's exact joules at it; each epoch's training loss."""

    def __init__(self) -> None:
        self.acc: list[float] = []
        self.loss: list[float] = []
        self.true_j: list[float] = []
        self.train_loss: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nvml = sys.modules["pynvml"]
        (device,) = nvml.devices()
        self.acc.append(float(trainer.callback_metrics["val_acc"]))
        self.loss.append(float(trainer.callback_metrics["val_loss"]))
        self.true_j.append(device.energy_between(device.t0, nvml._now()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_loss.append(float(trainer.callback_metrics["train_loss"]))


def loaders(task: Task, seed: int) -> tuple[DataLoader, DataLoader, int, int]:
    x, y = task.data()
    xt, xv, yt, yv = train_test_split(x, y, test_size=task.val_fraction, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(xt)

    def tensors(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(scaler.transform(a), dtype=torch.float32), torch.tensor(b))

    return (DataLoader(tensors(xt, yt), batch_size=task.batch_size, shuffle=True),
            DataLoader(tensors(xv, yv), batch_size=len(xv)), x.shape[1], int(y.max()) + 1)


def fit(task: Task, seed: int, rule: str, watts: float, out: str) -> tuple[Evaluations, float]:
    """One training run under ``rule``: its evaluations and the joules the EnergyMonitor measured."""
    fake_nvml().configure([{"profile": [(1.0, watts)]}], work_clock=True)
    pl.seed_everything(seed, verbose=False)
    train, val, features, classes = loaders(task, seed)
    monitor = EnergyMonitor(gpus="all", measure_cpu=False, mlflow=False, log_artifacts=False, output_dir=out)
    evaluations = Evaluations()
    trainer = pl.Trainer(max_epochs=MAX_EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[monitor, evaluations, *RULES[rule][0]()])
    with contextlib.redirect_stdout(io.StringIO()):  # the monitor's end-of-run summary, 150 times
        trainer.fit(Classifier(features, classes, task), train, val)
    return evaluations, monitor.cumulative_j


# -- criteria replayed on the fixed runs' evaluations (every stopped run is a prefix of the fixed one) --

Replay = Callable[[Evaluations], int]  # the fixed run's evaluations -> the index where the rule stops


def plateau(min_gain: str = DEFAULT_GAIN, patience: int = 3, metric: str = "acc",
            kind: type[EfficiencyPlateau] = EfficiencyPlateau, horizon: bool = True) -> Replay:
    """``EfficiencyPlateau`` replayed; ``horizon``: told the energy at the run's end (the callback projects it from
    the recent cost per step and the steps left; here the fixed run's own total)."""
    def rule(run: Evaluations) -> int:
        policy = kind(metric, "max" if metric == "acc" else "min", min_gain, patience)
        values, final = getattr(run, metric), run.true_j[-1] if horizon else None
        return next((i for i, (v, j) in enumerate(zip(values, run.true_j, strict=True))
                     if policy.update(v, j, final).should_stop), len(values) - 1)
    return rule


def doubling_variant(width: float = 1.0, best: bool = False, span: float | None = None, span_from: str = "streak",
                     no_new_best: int | float | None = None, patience: int = 3) -> Replay:
    """The default criterion (val_acc, ``DEFAULT_GAIN``, min_evaluations 4, the run's end known) with one part
    changed.

    ``width``: the window holds the last ``width`` doublings of energy (default 1). ``best``: the slope
    is fitted to the best value so far (what a checkpoint keeps) instead of the raw values. ``span``:
    patience in energy instead of evaluations: stop once the gain has been at or below the threshold
    at every evaluation of the last ``span`` doublings; ``span_from="streak"`` measures from the first
    evaluation at or below, ``"above"`` from the last evaluation above it (or the warm-up's end).
    ``no_new_best``: also require no new best value for that many evaluations (an int) or doublings
    of energy (a float), Prechelt-style.
    """
    def rule(run: Evaluations) -> int:
        window: list[tuple[float, float]] = []
        wait, streak_j, above_j, best_v, best_i = 0, 0.0, run.true_j[0], -math.inf, 0
        for i, (v, j) in enumerate(zip(run.acc, run.true_j, strict=True)):
            if v > best_v:
                best_v, best_i = v, i
            window = [p for p in window if j <= 2 ** width * p[0]] + [(j, best_v if best else v)]
            if j < 2 * run.true_j[0] or len(window) < 4:
                above_j = j
                continue
            slope = theil_sen_slope([math.log2(p[0]) for p in window], [math.log2(p[1]) for p in window])
            left = min(1.0, math.log2(run.true_j[-1] / j)) if j < run.true_j[-1] else 0.0  # the default's horizon
            if slope is not None and 100 * (2 ** slope - 1) * left <= DEFAULT_PCT:
                wait, streak_j = wait + 1, streak_j if wait else j
            else:
                wait, above_j = 0, j
                continue
            ref = streak_j if span_from == "streak" else above_j
            stop = wait >= patience if span is None else math.log2(j / ref) >= span
            if isinstance(no_new_best, int):
                stop = stop and i - best_i >= no_new_best
            elif no_new_best is not None:
                stop = stop and math.log2(j / run.true_j[best_i]) >= no_new_best
            if stop:
                return i
        return len(run.acc) - 1
    return rule


class LeastSquaresPlateau(EfficiencyPlateau):
    """The same criterion with an ordinary least-squares slope instead of Theil-Sen."""

    @staticmethod
    def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else None


def per_kj(min_gain_per_kj: float, patience: int = 3) -> Replay:
    """The first version's rule: val_acc gained per kJ since the previous evaluation (warm-up 1)."""
    def rule(run: Evaluations) -> int:
        wait = 0
        for i in range(2, len(run.acc)):
            gain = (run.acc[i] - run.acc[i - 1]) / ((run.true_j[i] - run.true_j[i - 1]) / 1000)
            wait = wait + 1 if gain < min_gain_per_kj else 0
            if wait >= patience:
                return i
        return len(run.acc) - 1
    return rule


def elasticity(threshold: float, patience: int = 3) -> Replay:
    """Marginal over average efficiency: (d val_acc / d E) / ((val_acc - val_acc_0) / E), dimensionless."""
    def rule(run: Evaluations) -> int:
        wait = 0
        for i in range(1, len(run.acc)):
            marginal = (run.acc[i] - run.acc[i - 1]) / (run.true_j[i] - run.true_j[i - 1])
            average = (run.acc[i] - run.acc[0]) / run.true_j[i]
            wait = wait + 1 if average <= 0 or marginal / average < threshold else 0
            if wait >= patience:
                return i
        return len(run.acc) - 1
    return rule


def prechelt(alpha: float, strip: int | None = None) -> Replay:
    """Prechelt (1998): GL_alpha (val_loss alpha % above its best so far) or, with a strip length,
    PQ_alpha (that generalisation loss over the training progress of the last strip of epochs)."""
    def rule(run: Evaluations) -> int:
        best = math.inf
        for i, v in enumerate(run.loss):
            best = min(best, v)
            gl = 100 * (v / best - 1)
            if strip is None:
                if gl > alpha:
                    return i
            elif (i + 1) % strip == 0:
                recent = run.train_loss[i + 1 - strip: i + 1]
                progress = 1000 * (sum(recent) / (strip * min(recent)) - 1)
                if progress > 0 and gl / progress > alpha:
                    return i
        return len(run.loss) - 1
    return rule



def no_worse_than_val_loss(loss_gain: str) -> Replay:
    """A combination that keeps what ``EarlyStopping(val_loss)`` keeps: stop where it stops (val_loss no
    better for 3 evaluations), or earlier where the default criterion finds val_acc flat *and* the same
    criterion at ``loss_gain`` finds val_loss flat (both per doubling of energy)."""
    def rule(run: Evaluations) -> int:
        acc = EfficiencyPlateau("acc", "max", DEFAULT_GAIN, 3)
        loss = EfficiencyPlateau("loss", "min", loss_gain, 3)
        best, wait = math.inf, 0
        for i, (a, v, j) in enumerate(zip(run.acc, run.loss, run.true_j, strict=True)):
            flat = acc.update(a, j, run.true_j[-1]).should_stop
            flat = loss.update(v, j, run.true_j[-1]).should_stop and flat
            best, wait = (v, 0) if v < best else (best, wait + 1)
            if flat or wait >= 3:
                return i
        return len(run.acc) - 1
    return rule


def first_at_final(run: Evaluations) -> int:
    """Not a rule (it knows the end): the first evaluation at or above the fixed run's final accuracy."""
    return next(i for i, a in enumerate(run.acc) if a >= run.acc[-1])


REPLAYS: dict[str, Replay] = {
    f"EfficiencyPlateau default: {DEFAULT_GAIN}, patience 3 (val_acc)": plateau(),
    "0.5% per doubling (the default before 2026-12-04)": plateau("0.5% per doubling"),
    "without the run's end (per doubling only, as before 2026-12-04)": plateau(horizon=False),
    "0.25% per doubling": plateau("0.25% per doubling"),
    "0.75% per doubling": plateau("0.75% per doubling"),
    "2% per doubling": plateau("2% per doubling"),
    f"{DEFAULT_GAIN}, patience 2": plateau(patience=2),
    f"{DEFAULT_GAIN}, patience 5": plateau(patience=5),
    "least squares instead of Theil-Sen": plateau(kind=LeastSquaresPlateau),
    "window: the last half doubling": doubling_variant(width=0.5),
    "window: the last 1.5 doublings": doubling_variant(width=1.5),
    "window: the last two doublings": doubling_variant(width=2.0),
    "slope of the best value so far (what a checkpoint keeps)": doubling_variant(best=True),
    "best value so far, window the last half doubling": doubling_variant(width=0.5, best=True),
    "patience in energy: at or below for the last 1/8 doubling": doubling_variant(span=1 / 8),
    "patience in energy: at or below for the last 1/4 doubling": doubling_variant(span=1 / 4),
    "patience in energy: at or below for the last 1/2 doubling": doubling_variant(span=1 / 2),
    "patience in energy: last gain above 1/8 doubling back": doubling_variant(span=1 / 8, span_from="above"),
    "patience in energy: last gain above 1/4 doubling back": doubling_variant(span=1 / 4, span_from="above"),
    "and no new best for 5 evaluations (Prechelt-style)": doubling_variant(no_new_best=5),
    "and no new best for 1/2 doubling of energy": doubling_variant(no_new_best=0.5),
    "best value so far, patience in energy 1/2 doubling": doubling_variant(best=True, span=1 / 2),
    "absolute: 0.005 per doubling (val_acc units)": plateau("0.005 per doubling"),
    f"{DEFAULT_GAIN} on val_loss": plateau(metric="loss"),
    "exchange rate: 0.1 per kWh (Theil-Sen over the last doubling)": plateau("0.1 per kWh"),
    "first version: val_acc gain per kJ < 0 (its default)": per_kj(0.0),
    "first version: val_acc gain per kJ < 0.5 (the README's example)": per_kj(0.5),
    "marginal / average efficiency < 0.1": elasticity(0.1),
    "marginal / average efficiency < 0.25": elasticity(0.25),
    "Prechelt GL5 (val_loss 5 % above its best)": prechelt(5.0),
    "Prechelt PQ0.5 (GL / training progress, strips of 5)": prechelt(0.5, strip=5),
    "EarlyStopping(val_loss)'s stop, or earlier where val_acc is flat (default) and val_loss too (2% per "
    "doubling)": no_worse_than_val_loss("2% per doubling"),
    "the same, val_loss flat at 8% per doubling": no_worse_than_val_loss("8% per doubling"),
    "reference, not a rule (knows the end): the first evaluation at the final accuracy": first_at_final,
}


SPARSE_EVERY = (1, 2, 3)
ORDINAL = {1: "", 2: "2nd ", 3: "3rd "}
SPARSE: dict[str, Replay] = {
    "default: patience 3 evaluations": plateau(),
    "patience in energy: at or below for the last 1/4 doubling": doubling_variant(span=1 / 4),
    "patience in energy: last gain above 1/8 doubling back": doubling_variant(span=1 / 8, span_from="above"),
}


def every(run: Evaluations, k: int) -> Evaluations:
    """The fixed run as if it had been evaluated every k-th epoch (its joules still include every validation)."""
    sparse = Evaluations()
    sparse.acc, sparse.loss, sparse.true_j = run.acc[k - 1::k], run.loss[k - 1::k], run.true_j[k - 1::k]
    return sparse


def sparse_table(fixed_runs: list[Evaluations]) -> str:
    lines = [f"| criterion (val_acc, {DEFAULT_GAIN.replace('%', ' %')}) | " + " | ".join(
        f"every {ORDINAL[k]}epoch: saved / lost (pt)" for k in SPARSE_EVERY)
        + " |", "| --- |" + " ---: |" * len(SPARSE_EVERY)]
    for name, rule in SPARSE.items():
        cells = []
        for k in SPARSE_EVERY:
            saved, lost = [], []
            for run in fixed_runs:
                sparse = every(run, k)
                stop = rule(sparse)
                saved.append(1 - sparse.true_j[stop] / run.true_j[-1])
                lost.append(100 * (run.acc[-1] - sparse.acc[stop]))
            cells.append(f"{100 * statistics.fmean(saved):.1f} % / {statistics.fmean(lost):+.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the report ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    task: str
    saved: float  # fraction of the fixed run's energy, at 5 W
    lost_pt: float  # accuracy points below the fixed run's final evaluation
    same: bool | None  # the same stop (evaluation, energy fraction) at 5 W and 2000 W; None: uses no energy


def task_means(results: list[Outcome]) -> dict[str, tuple[float, float]]:
    """Each task's (energy saved, accuracy points lost), means over its seeds."""
    tasks: dict[str, list[Outcome]] = {}
    for o in results:
        tasks.setdefault(o.task, []).append(o)
    return {t: (statistics.fmean(o.saved for o in rs), statistics.fmean(o.lost_pt for o in rs))
            for t, rs in tasks.items()}


def same_stops(results: list[Outcome]) -> str:
    if any(o.same is None for o in results):
        return "n/a (no energy in the decision)"
    return f"{sum(bool(o.same) for o in results)} of {len(results)}"


def summary(outcomes: dict[str, list[Outcome]], what: str) -> str:
    lines = [f"| {what} | mean energy saved | mean accuracy lost (pt) | worst task: mean loss (pt) | "
             "worst run: loss (pt) | same stop at 5 W and 2000 W |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for rule, results in outcomes.items():
        worst_task, (_, worst_loss) = max(task_means(results).items(), key=lambda kv: kv[1][1])
        lines.append(f"| {rule} | {100 * statistics.fmean(o.saved for o in results):.1f} % | "
                     f"{statistics.fmean(o.lost_pt for o in results):+.2f} | "
                     f"{worst_loss:+.2f} ({worst_task}) | "
                     f"{max(o.lost_pt for o in results):+.2f} | "
                     f"{same_stops(results)} |")
    return "\n".join(lines)


def per_task(outcomes: dict[str, list[Outcome]]) -> str:
    """Energy saved and accuracy lost per task (means over its seeds), and their means over tasks."""
    names = [task.name for task in TASKS]
    lines = ["| rule | " + " | ".join(names) + " | mean of the tasks |", "| --- |" + " ---: |" * (len(names) + 1)]
    for rule, results in outcomes.items():
        means = task_means(results)
        cells = [f"{100 * means[t][0]:.1f} % / {means[t][1]:+.2f}" for t in names]
        cells.append(f"{100 * statistics.fmean(means[t][0] for t in names):.1f} % / "
                     f"{statistics.fmean(means[t][1] for t in names):+.2f}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(real: dict[str, list[Outcome]], rule: str, against: str) -> str:
    """``rule`` minus ``against`` run by run (the same task and seed): energy saved and accuracy lost, mean with
    its standard error over the runs, and over each half of the seeds (how much the seeds move it)."""
    pairs = list(zip(real[rule], real[against], strict=True))
    per_task = len(pairs) // len(TASKS)
    halves = {"all seeds": pairs}
    if per_task > 1:
        halves.update({f"seeds 0-{per_task // 2 - 1}": [p for i, p in enumerate(pairs) if i % per_task < per_task // 2],
                       f"seeds {per_task // 2}-{per_task - 1}": [p for i, p in enumerate(pairs)
                                                               if i % per_task >= per_task // 2]})
    lines = [f"| runs | {rule}: saved, minus {against} (points of energy) | accuracy lost, minus {against}'s (pt) "
             "| runs where it lost more / less |", "| --- | ---: | ---: | ---: |"]
    for what, ps in halves.items():
        cells = []
        for key, scale in (("saved", 100.0), ("lost_pt", 1.0)):
            d = [scale * (getattr(a, key) - getattr(b, key)) for a, b in ps]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
            cells.append(f"{statistics.fmean(d):+.2f} ± {se:.2f}")
        more = sum(a.lost_pt > b.lost_pt + 1e-9 for a, b in ps)
        less = sum(a.lost_pt < b.lost_pt - 1e-9 for a, b in ps)
        lines.append(f"| {what} ({len(ps)}) | " + " | ".join(cells) + f" | {more} / {less} |")
    return "\n".join(lines)


def by_power(replayed: dict[str, list[tuple[Outcome, ...]]]) -> dict[str, list[Outcome]]:
    """One row per criterion whose stops are the same at both powers, else one row per power."""
    rows: dict[str, list[Outcome]] = {}
    for name, pairs in replayed.items():
        if all(o.same for o, _ in pairs):
            rows[name] = [o for o, _ in pairs]
        else:
            for i, w in enumerate(POWERS_W):
                rows[f"{name}, at {w:g} W"] = [pair[i] for pair in pairs]
    return rows


def benchmark(seeds: int) -> list[tuple[str, str]]:
    real: dict[str, list[Outcome]] = {rule: [] for rule in [*RULES, "oracle"]}
    replayed: dict[str, list[tuple[Outcome, ...]]] = {name: [] for name in REPLAYS}
    rows, agree, fixed_runs = [], 0, []
    with tempfile.TemporaryDirectory() as out:
        for task in TASKS:
            for seed in range(seeds):
                runs = {(rule, w): fit(task, seed, rule, w, out) for rule, (_, uses_energy) in RULES.items()
                        for w in POWERS_W if uses_energy or w == POWERS_W[0]}
                fixed = {w: runs[FIXED, w] for w in POWERS_W}
                final = fixed[POWERS_W[0]][0].acc[-1]
                for rule in RULES:
                    lo, lo_j = runs[rule, POWERS_W[0]]
                    saved = 1 - lo_j / fixed[POWERS_W[0]][1]
                    same, stops = None, f"{len(lo.acc)} (its decision uses no energy)"
                    if (rule, POWERS_W[1]) in runs:
                        hi, hi_j = runs[rule, POWERS_W[1]]
                        same = hi.acc == lo.acc and abs(1 - hi_j / fixed[POWERS_W[1]][1] - saved) < 1e-9
                        stops = f"{len(lo.acc)} / {len(hi.acc)}"
                    prefix = lo.acc == fixed[POWERS_W[0]][0].acc[:len(lo.acc)]
                    real[rule].append(Outcome(task.name, saved, 100 * (final - lo.acc[-1]), same))
                    rows.append(f"| {task.name} ({task.shape}) | {seed} | {rule} | {stops} | {100 * saved:.1f} % | "
                                f"{lo.acc[-1]:.4f} | {100 * (final - lo.acc[-1]):+.2f} |"
                                f"{'' if prefix else ' **not a prefix of the fixed run**'}")
                base = fixed[POWERS_W[0]][0]
                fixed_runs.append(base)
                k = next(i for i, a in enumerate(base.acc) if a >= final - ORACLE_TOLERANCE)
                real["oracle"].append(Outcome(task.name, 1 - base.true_j[k] / base.true_j[-1],
                                              100 * (final - base.acc[k]), None))
                rows.append(f"| {task.name} ({task.shape}) | {seed} | oracle | {k + 1} | "
                            f"{100 * real['oracle'][-1].saved:.1f} % | {base.acc[k]:.4f} | "
                            f"{real['oracle'][-1].lost_pt:+.2f} |")
                for name, rule in REPLAYS.items():
                    stops = [rule(fixed[w][0]) for w in POWERS_W]
                    replayed[name].append(tuple(Outcome(task.name, 1 - base.true_j[stop] / base.true_j[-1],
                                                        100 * (final - base.acc[stop]), stops[0] == stops[1])
                                                for stop in stops))
                agree += plateau()(base) + 1 == len(runs['EfficiencyEarlyStopping("val_acc")', POWERS_W[0]][0].acc)
                print(f"{task.name} seed {seed}: fixed run {fixed[POWERS_W[0]][1]:.1f} J at 5 W; 2000 W / 5 W = "
                      f"{fixed[POWERS_W[1]][1] / fixed[POWERS_W[0]][1]:.9f}; measured / simulated = "
                      f"{fixed[POWERS_W[0]][1] / base.true_j[-1]:.9f}", file=sys.stderr)
    n = len(TASKS) * seeds
    head = ("| task (shape) | seed | rule | stop: evaluations at 5 W / 2000 W | energy saved | val_acc at stop "
            "| accuracy lost (pt) |\n| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    note = (f"Replayed on the fixed runs' evaluations, with the joules of each at 5 W and at 2000 W; the "
            f"default's replay stops where the real callback stopped in {agree} of {n} runs. A criterion free of "
            "the energy scale has the same row at both powers.")
    return [(f"Stopping rules in real training ({len(TASKS)} tasks x {seeds} seeds, max {MAX_EPOCHS} epochs)",
             summary(real, "rule")),
            ("Per task: energy saved / accuracy lost (pt), means over the seeds",
             "Each cell is one task's mean over its seeds; \"no task above 2.5 points\" is judged on these.\n\n"
             + per_task(real)),
            ("Against EarlyStopping(val_loss), run by run",
             "The same task and seed under both rules; ± is the standard error of the mean difference. \"More "
             "energy saved than EarlyStopping(val_loss) at no more loss\" holds where the first column is above 0 "
             "and the second at or below 0.\n\n" + paired(real, 'EfficiencyEarlyStopping("val_acc")',
                                                         "EarlyStopping(val_loss)")),
            ("Criteria compared", note + "\n\n" + summary(by_power(replayed), "criterion")),
            ("Evaluating less often",
             "The fixed runs replayed as if evaluated every 2nd or 3rd epoch (their joules still include the "
             "skipped validations, a validation sample costing a third of a training sample): a decision that "
             "does not depend on how often one evaluates keeps its row.\n\n" + sparse_table(fixed_runs)),
            ("Per task and seed", head + "\n" + "\n".join(rows))]


def main() -> int:
    args = parse_args(__doc__, f"one seed per task instead of {SEEDS}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("green_callbacks").setLevel(logging.ERROR)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    torch.set_num_threads(1)  # deterministic kernels, and a fair share of a shared machine
    t0 = time.perf_counter()
    sections = benchmark(1 if args.quick else SEEDS)
    header = measured_on("a CPU with a simulated GPU (work clock, 5 W and 2000 W)", "stopping.py", args.quick)
    report("Stopping", f"{header} Took {time.perf_counter() - t0:.0f} s.", sections, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
