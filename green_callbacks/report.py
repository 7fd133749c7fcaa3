"""Pictures and tables of a run: power over time with epoch boundaries, energy per epoch."""

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


def plot_power(trace: pd.DataFrame, records: Sequence[Any], path: str | Path) -> Path:
    """Save a PNG: power per component over time with interval edges, and energy per interval."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = _intervals(records)
    kind = shown[0].kind.value if shown else "epoch"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), gridspec_kw={"height_ratios": [3, 2]})
    for column in trace.columns[1:]:
        top.plot(trace["time_s"], trace[column], label=column.replace("_w", " (W)"), linewidth=1)
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
        bottom.bar(steps, values, bottom=base, label=c, width=width)
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
