"""The quality-against-energy plot of an experiment: runs or groups (mean ± sd), the Pareto front, labels
that do not overlap."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from green_callbacks.comparison import pareto_front

if TYPE_CHECKING:
    import pandas as pd

_RADII_PT = (6, 14, 24, 36, 52, 72)  # label distances tried, nearest first
_ANGLES = (45, -45, 135, -135, 0, 180, 90, -90)


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax: Any, xs: list[float], ys: list[float], labels: list[str], fontsize: int = 8) -> list[Any]:
    """Annotate each point with its label at the nearest free spot: every candidate offset (8 directions
    at growing distances) is measured with the renderer and the first that touches no marker, no other
    label and stays inside the figure wins; a far label gets a leader line. Returns the labels' boxes
    (display coordinates)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.transforms import Bbox

    marker_px = 5.0
    taken = [Bbox.from_extents(px - marker_px, py - marker_px, px + marker_px, py + marker_px)
             for px, py in ax.transData.transform(list(zip(xs, ys, strict=True)))]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    inside = fig.bbox
    boxes = []
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    for i in order:
        ann = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(0, 0), textcoords="offset points", fontsize=fontsize)
        best: tuple[float, Any, tuple[float, float, str, str]] | None = None
        for radius in _RADII_PT:
            for angle in _ANGLES:
                dx, dy = radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle))
                ha = "left" if dx > 1e-6 else "right" if dx < -1e-6 else "center"
                va = "bottom" if dy > 1e-6 else "top" if dy < -1e-6 else "center"
                ann.xyann = (dx, dy)
                ann.set_ha(ha)
                ann.set_va(va)
                box = ann.get_window_extent(renderer).expanded(1.04, 1.15)
                outside = 0.0 if (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                                  and box.y1 <= inside.y1) else box.width * box.height
                cost = sum(_overlap(box, t) for t in taken) + outside
                if best is None or cost < best[0]:
                    best = (cost, box, (dx, dy, ha, va))
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        _, box, (dx, dy, ha, va) = best
        ann.remove()  # drawn again with its chosen place, and a leader line when it sits far from its point
        far = math.hypot(dx, dy) > _RADII_PT[0]
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha=ha, va=va, arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5} if far else None)
        taken.append(box)
        boxes.append(box)
    return boxes


def plot_pareto(frame: pd.DataFrame, path: str | Path, grouped: bool = False) -> Path:
    """Save a PNG of the metric against the compared energy: each run labelled ``name (short id)``, or
    each group at its mean with error bars of one sample standard deviation; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    column = frame.attrs["energy_column"]
    x_col, y_col = (f"{column}_mean", "value_mean") if grouped else (column, "value")
    shown = frame[frame[x_col].notna() & frame[y_col].notna()]
    if shown.empty:
        raise ValueError(f"no run has both {column} and a metric value: nothing to plot")
    xs, ys = [float(v) for v in shown[x_col]], [float(v) for v in shown[y_col]]
    fig, ax = plt.subplots(figsize=(8, 5))
    if grouped:
        xerr = [0.0 if v is None or math.isnan(v) else float(v) for v in shown[f"{column}_sd"]]
        yerr = [0.0 if v is None or math.isnan(v) else float(v) for v in shown["value_sd"]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", color="grey", ecolor="grey", capsize=3,
                    label="group mean ± 1 sd")
        labels = [f"{g} (n={n})" for g, n in zip(shown["group"], shown["n"], strict=True)]
    else:
        ax.scatter(xs, ys, color="grey", label="runs")
        labels = [f"{r} ({i})" for r, i in zip(shown["run"], shown["run_id"], strict=True)]
    front = pareto_front(xs, ys, frame.attrs.get("higher_is_better", True))
    # above the runs' grey markers (and error bars), which covered a front of one point
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="green", label="Pareto front", zorder=3)
    pretty = "training energy (J)" if column == "training_j" else column.replace("_j_per_sample", "") + \
        " energy per sample (J)"
    ax.set_xlabel(pretty)
    names = sorted({n for cell in shown["metric"].dropna() for n in str(cell).split(" / ")})
    ax.set_ylabel(" / ".join(names) or "metric")
    ax.set_title("Quality against energy" + (" (mean ± sd of repeats)" if grouped else ""))
    ax.legend(loc="best")
    ax.margins(0.15)
    fig.tight_layout()
    place_labels(ax, xs, ys, labels)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
