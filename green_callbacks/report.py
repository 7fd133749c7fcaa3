"""Pictures and tables of one run: power over time with epoch boundaries, energy per epoch.

The comparison of an experiment's runs is in :mod:`green_callbacks.comparison`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def _intervals(records: Sequence[Any]) -> list[Any]:
    """The intervals a person reads: the epochs of an epoch-based run, else its evaluations, else every point."""
    for kind in ("epoch", "evaluation"):
        chosen = [r for r in records if r.kind.value == kind]
        if chosen:
            return chosen
    return list(records)


def component_label(component: str, unit: str, methods: dict[str, str]) -> str:
    """A component in a legend, with how it was obtained where it was not measured (``cpu (W, estimated)``): an
    estimate is never shown as a measurement."""
    method = methods.get(component, "measured")
    return f"{component} ({unit}{', ' + method if method in ('estimated', 'unavailable') else ''})"


def plot_power(trace: pd.DataFrame, records: Sequence[Any], path: str | Path) -> Path:
    """Save a PNG: power per component over time with interval edges, and energy per interval."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = _intervals(records)
    kind = shown[0].kind.value if shown else "epoch"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), gridspec_kw={"height_ratios": [3, 2]})
    from green_callbacks.records import run_methods

    methods = run_methods(records)
    for column in trace.columns[1:]:
        label = component_label(column.removesuffix("_w"), "W", methods)
        top.plot(trace["time_s"], trace[column], label=label, linewidth=1)
    for r in shown:
        top.axvline(r.start_rel_s, color="grey", linewidth=0.6, linestyle="--")
    top.set_xlabel("time since start (s)")
    top.set_ylabel("power (W)")
    top.set_title(f"Power over time (dashed: {kind} starts; this rank's devices)")
    top.legend(loc="upper right")
    steps = [r.step for r in shown]
    width = max(1.0, 0.8 * min((b - a for a, b in itertools.pairwise(steps)), default=1.0))
    base = [0.0] * len(shown)
    for c in sorted({c for r in shown for c in r.components_j}):
        values = [r.components_j.get(c, 0.0) for r in shown]
        bottom.bar(steps, values, bottom=base, label=component_label(c, "J", methods), width=width)
        base = [a + b for a, b in zip(base, values, strict=True)]
    bottom.set_xlabel(f"training step at the {kind}'s end")
    bottom.set_ylabel(f"energy per {kind} (J, all ranks)")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def interval_table(frame: pd.DataFrame, metric: str | None = None) -> str:
    """A plain-text table of the run's evaluations (else its epochs): step, energy, emissions, the metric
    and the metric per kJ of cumulative energy."""
    if frame.empty:
        return "(nothing measured)"
    kinds = set(frame["kind"])
    out = frame[frame["kind"] == ("evaluation" if "evaluation" in kinds else "epoch")]
    out = out[["epoch", "step", "energy_j", "cumulative_j", "g_co2e", "duration_s"]
              + ([metric] if metric and metric in frame else [])].copy()
    if metric and metric in out:
        out[f"{metric}_per_kj"] = out[metric] / (out["cumulative_j"] / 1000.0)
    return out.to_string(index=False, float_format=lambda v: f"{v:.4g}")
