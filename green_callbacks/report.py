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


_PREFERRED_METRICS = ("val_acc", "val_accuracy", "eval_accuracy", "accuracy")


def experiment_frame(experiment: str, tracking_uri: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """One row per run of ``experiment``: energy, emissions, cost, duration, the metric, metric per kJ.

    Raises:
        ValueError: the tracking URI cannot be reached, or the experiment does not exist (the
            message lists the experiments that do).
    """
    import pandas as pd
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        names = [] if exp is not None else sorted(e.name for e in client.search_experiments())
    except Exception as exc:
        raise ValueError(f"cannot read MLflow at {tracking_uri or 'the default tracking URI'}: {exc}") from exc
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {client.tracking_uri}; experiments there: {names}")
    rows = []
    for run in client.search_runs([exp.experiment_id]):
        m = run.data.metrics
        if "energy/cumulative_j" not in m:
            continue
        name = metric or next((k for k in _PREFERRED_METRICS if k in m), None) or next(
            (k for k in sorted(m) if k.startswith(("val", "eval_")) and "/" not in k), None)
        value = m.get(name) if name else None
        end = run.info.end_time or run.info.start_time
        rows.append({"run": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
                     "energy_j": m["energy/cumulative_j"], "emissions_g": m.get("emissions/cumulative_g"),
                     "cost": m.get("cost/cumulative"), "duration_s": (end - run.info.start_time) / 1000.0,
                     "metric": name, "value": value,
                     "value_per_kj": value / (m["energy/cumulative_j"] / 1000) if value is not None else None,
                     "method_gpu": run.data.tags.get("green.method.gpu"),
                     "method_cpu": run.data.tags.get("green.method.cpu")})
    if not rows:
        raise ValueError(f"experiment {experiment!r} has no run with green-callbacks energy metrics")
    if metric and all(r["value"] is None for r in rows):
        raise ValueError(f"metric {metric!r} is in no run of {experiment!r}")
    return pd.DataFrame(rows).sort_values("energy_j").reset_index(drop=True)


def pareto_front(frame: pd.DataFrame) -> list[int]:
    """Rows no other row beats on both less energy and a higher metric (index labels, by energy)."""
    front, best = [], float("-inf")
    for i, row in frame.sort_values("energy_j").iterrows():
        if row["value"] is not None and row["value"] > best:
            front.append(i)
            best = row["value"]
    return front


def markdown_table(frame: pd.DataFrame) -> str:
    cols = [c for c in frame.columns if c != "run_id"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for _, row in frame.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row[cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(frame: pd.DataFrame, path: str | Path) -> Path:
    """Save a PNG of the metric against energy, the Pareto front joined and labelled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    frame = frame[frame["value"].notna()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(frame["energy_j"], frame["value"], color="grey", label="runs")
    front = frame.loc[pareto_front(frame)]
    ax.plot(front["energy_j"], front["value"], "o-", color="green", label="Pareto front")
    for _, row in frame.iterrows():
        ax.annotate(str(row["run"]), (row["energy_j"], row["value"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("energy (J)")
    ax.set_ylabel(str(frame["metric"].iloc[0]))
    ax.set_title("Quality against energy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
