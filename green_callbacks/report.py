"""Pictures and tables of a run: power over time with epoch boundaries, energy per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def plot_power(trace: pd.DataFrame, records: Sequence[Any], path: str | Path) -> Path:
    """Save a PNG: power per component over time with epoch edges, and energy per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), gridspec_kw={"height_ratios": [3, 2]})
    for column in trace.columns[1:]:
        top.plot(trace["time_s"], trace[column], label=column.replace("_w", " (W)"), linewidth=1)
    for r in records:
        top.axvline(r.start_rel_s, color="grey", linewidth=0.6, linestyle="--")
    top.set_xlabel("time since start (s)")
    top.set_ylabel("power (W)")
    top.set_title("Power over time (dashed: epoch starts; this rank's devices)")
    top.legend(loc="upper right")
    epochs = [r.epoch for r in records]
    bottom_base = [0.0] * len(records)
    components = sorted({c for r in records for c in r.components_j})
    for c in components:
        values = [r.components_j.get(c, 0.0) for r in records]
        bottom.bar(epochs, values, bottom=bottom_base, label=c)
        bottom_base = [a + b for a, b in zip(bottom_base, values, strict=True)]
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("energy (J, all ranks)")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def epoch_table(frame: pd.DataFrame, metric: str | None = None) -> str:
    """A plain-text per-epoch table: energy, emissions, the metric and metric per kJ."""
    cols = ["epoch", "energy_j", "g_co2e", "duration_s"]
    out = frame[cols].copy()
    if metric and metric in frame:
        out[metric] = frame[metric]
        out[f"{metric}_per_kj"] = frame[metric] / (frame["cumulative_j"] / 1000.0)
    return out.to_string(index=False, float_format=lambda v: f"{v:.4g}")
