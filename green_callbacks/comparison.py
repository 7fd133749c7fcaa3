"""The runs of an MLflow experiment compared: one table (console, CSV, Markdown), repeats grouped, a Pareto plot."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from green_callbacks.policies import higher_is_better
from green_callbacks.uris import DB_PASSWORD_ENV, PASSWORD_ENV, split_credentials, temporary_env, with_credentials

if TYPE_CHECKING:
    import pandas as pd

ENERGY_CHOICES = ("training", "test", "predict", "evaluate")
_PREFERRED_METRICS = ("val_acc", "val_accuracy", "eval_accuracy", "accuracy", "test_acc", "test_accuracy")
_STAGE_PREFIX = {"test": "test_", "predict": "predict_", "evaluate": "eval_"}
SHORT_ID = 8  # characters of a run id shown beside its name


def energy_key(energy: str) -> tuple[str, str]:
    """The MLflow metric and the table column for ``energy`` (one of :data:`ENERGY_CHOICES`)."""
    if energy not in ENERGY_CHOICES:
        raise ValueError(f"energy={energy!r} is not valid; choose from {list(ENERGY_CHOICES)}")
    if energy == "training":
        return "energy/cumulative_j", "training_j"
    return f"energy/{energy}_j_per_sample", f"{energy}_j_per_sample"


def money(value: float | None, currency: str = "") -> str:
    """Cost as a person reads it: ``"< 0.0001 EUR"`` rather than ``"0.0000"``, ``""`` when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    unit = f" {currency}" if currency else ""
    if value == 0:
        return f"0{unit}"
    if abs(value) < 0.0001:
        return f"< 0.0001{unit}"
    return f"{value:.4f}{unit}" if abs(value) < 100 else f"{value:,.2f}{unit}"


def _metric_name(metric: str | None, metrics: dict[str, float], stage: str | None) -> str | None:
    """The named metric (of several, comma-separated, the first this run logged: ``val_acc,eval_accuracy`` for
    Lightning's and HF's runs side by side), else the stage's own accuracy (``test_acc`` for test energy), else a
    preferred validation metric, else the first val/eval/test metric."""
    if metric:
        named = [n.strip() for n in metric.split(",") if n.strip()]
        return next((n for n in named if n in metrics), named[0] if named else metric)
    if stage is not None:
        prefix = _STAGE_PREFIX[stage]
        found = next((k for k in (f"{prefix}acc", f"{prefix}accuracy") if k in metrics), None) or next(
            (k for k in sorted(metrics) if k.startswith(prefix) and "/" not in k), None)
        if found:
            return found
    return next((k for k in _PREFERRED_METRICS if k in metrics), None) or next(
        (k for k in sorted(metrics) if k.startswith(("val", "eval_", "test_")) and "/" not in k), None)


_TOTALS = {"energy/cumulative_j": "energy/total_j", "emissions/cumulative_g": "emissions/total_g",
           "cost/cumulative": "cost/total"}


def _final(metrics: dict[str, float], key: str, running: bool) -> float | None:
    """A run's training total: ``energy/total_j`` (and its kin), which the training's end logs, where the run
    has ended; the last cumulative value where it is still going (a total there is an earlier process's, before
    a resume) or has none (a process killed outright). The last cumulative value alone can predate the end: the
    logging point at the last evaluation's step holds the interval the end closes after it."""
    total = _TOTALS.get(key)
    return metrics[total] if total in metrics and not running else metrics.get(key)


def _label(name: str | None, run_id: str) -> str:
    return f"{name or 'unnamed'} ({run_id[:SHORT_ID]})"


def _group_value(run: Any, group_by: str) -> str | None:
    return run.data.params.get(group_by, run.data.tags.get(group_by))


def experiment_frame(experiment: str, tracking_uri: str | None = None, metric: str | None = None,
                     energy: str = "training", group_by: str | None = None, mode: str | None = None) -> pd.DataFrame:
    """One row per run of ``experiment`` that green-callbacks measured, training or inference only.

    ``energy`` picks what is compared: ``"training"`` (the run's total joules, see :func:`_final`) or a stage's
    joules per sample (``"test"``, ``"predict"``, ``"evaluate"``). A run without that energy keeps its
    row with an empty energy cell, so nothing is dropped silently. ``group_by`` names a param or tag
    whose value groups repeats (see :func:`group_frame`). ``mode``: ``"max"`` or ``"min"``, whether a higher or a
    lower metric is better (the Pareto front's direction, in ``frame.attrs["higher_is_better"]``); by default lower
    for a loss or an error rate (:func:`higher_is_better`), else higher.

    Raises:
        ValueError: the tracking URI cannot be reached, the experiment does not exist (the message
            lists those that do), no run has energy metrics, or ``metric`` is in no run.
    """
    import pandas as pd
    from mlflow.tracking import MlflowClient

    key, column = energy_key(energy)
    if mode not in (None, "max", "min"):
        raise ValueError(f"mode={mode!r} is not valid; choose from ['max', 'min']")
    import mlflow

    if tracking_uri is not None:  # readable, with a host if a server's: said without its user and password
        from green_callbacks.validation import check_server_uri

        check_server_uri("tracking_uri", tracking_uri)
    # a user:password in the URI reaches MLflow in its own variables, and no message shows it (MLflow's neither)
    uri, secrets = split_credentials(tracking_uri or mlflow.get_tracking_uri())
    _require_store(uri)
    try:
        with temporary_env(secrets):
            client = MlflowClient(with_credentials(uri))
            exp = client.get_experiment_by_name(experiment)
            names = [] if exp is not None else sorted(e.name for e in client.search_experiments())
            runs = client.search_runs([exp.experiment_id], max_results=5000) if exp is not None else []
    except Exception as exc:
        said = str(exc)
        for name in (PASSWORD_ENV, DB_PASSWORD_ENV):
            said = said.replace(secrets[name], "***") if secrets.get(name) else said
        raise ValueError(f"cannot read MLflow at {uri}: {said}") from exc
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {uri}; experiments there: {names}")
    rows: list[dict[str, Any]] = []
    elsewhere: set[str] = set()  # the energies the runs without this one have
    for run in runs:
        m, tags = run.data.metrics, run.data.tags
        if not any(k.startswith("energy/") for k in m) and not any(k.startswith("green.method.") for k in tags):
            continue
        stage = energy if energy != "training" else None
        name = _metric_name(metric, m, stage)
        running = run.info.status == "RUNNING"
        # (a stage without tags: the run's; an inference-only run in the training view: its stages', named)
        method = _methods(tags, stage) or (_methods(tags, None) if stage else _stage_methods(tags))
        value, joules = m.get(name) if name else None, _final(m, key, running)
        # no joules and every sensor unavailable: nothing was measured (the 0 J such a run logged before 2026-12-05
        # is no measurement); joules with such tags are kept (a DDP rank's unreadable GPU marks the run's tags)
        scoped = _method_tags(tags, stage) or (_method_tags(tags, None) if stage else _stage_method_tags(tags))
        measured = bool(joules) or not scoped or any(v != "unavailable" for v in scoped.values())
        joules = joules if measured else None
        grams = None if not measured else _final(m, "emissions/cumulative_g", running) if stage is None else (
            m[f"emissions/{stage}_g"] / m[f"{stage}/samples"]
            if m.get(f"{stage}/samples") and f"emissions/{stage}_g" in m else None)
        price = run.data.params.get("green.price_per_kwh", "")
        end = run.info.end_time or (time.time() * 1000 if running else run.info.start_time)  # so far, if going
        rows.append({
            "run": run.info.run_name or "unnamed", "run_id": run.info.run_id[:SHORT_ID],
            **({"group": _group_value(run, group_by)} if group_by else {}),
            "status": run.info.status, column: joules,
            column.replace("_j", "_g", 1): grams,
            # the training's cost, or the stage's, all its samples (per sample it would read "< 0.0001")
            "cost" if stage is None else f"{stage}_cost":
                (_final(m, "cost/cumulative", running) if stage is None else m.get(f"cost/{stage}"))
                if measured else None,
            "currency": price.split()[-1] if price else "",
            "duration_s": (end - run.info.start_time) / 1000.0,
            "metric": name, "value": value,
            "value_per_kj": value / (joules / 1000) if value is not None and joules else None,
            "method": method if measured else "nothing measured",
            "inference_only": "energy/cumulative_j" not in m and measured})
        if joules is None and measured:  # the energies it has, for the report's hint
            elsewhere.update(c for c in ENERGY_CHOICES if c != energy and energy_key(c)[0] in m)
    if not rows:
        raise ValueError(f"experiment {experiment!r} has no run with green-callbacks energy metrics")
    if metric and all(r["value"] is None for r in rows):
        ours = ("energy/", "power/", "emissions/", "time/", "cost/", "efficiency/", "stopping/", "projection/",
                "throughput/", "system/")
        logged = sorted({k for run in runs for k in run.data.metrics if not k.startswith(ours)})
        raise ValueError(f"metric {metric!r} is in no run of {experiment!r}; the runs log "
                         f"{logged[:30] if logged else 'no metric of their own'}")
    names = sorted({r["metric"] for r in rows if r["value"] is not None})
    if len(names) > 1 and mode is None and len({higher_is_better(n) for n in names}) > 1:
        raise ValueError(f"the runs of {experiment!r} report metrics of opposite directions ({', '.join(names)}): no "
                         "front can rank them together; name one, or one per framework, with --metric (like "
                         "--metric val_acc,eval_accuracy)")
    if all(r[column] is None for r in rows):
        have = sorted(c for c in ENERGY_CHOICES if c != energy
                      and any(energy_key(c)[0] in run.data.metrics for run in runs))
        hint = f"try one of {have}" if have else "no run has the energy of another stage either"
        raise ValueError(f"no run of {experiment!r} has {key} (energy={energy!r}); {hint}")
    frame = pd.DataFrame(rows)
    if group_by and frame["group"].isna().all():
        named = sorted({k for run in runs for k in (*run.data.params, *run.data.tags) if not k.startswith("mlflow.")})
        raise ValueError(f"group_by={group_by!r} is neither a param nor a tag of any run of {experiment!r}; they have "
                         f"{named[:40] if named else 'no params or tags'}{' ...' if len(named) > 40 else ''}")
    frame.attrs["energy_column"] = column
    frame.attrs["energies_elsewhere"] = sorted(elsewhere)
    frame.attrs["metrics"] = names  # more than one: runs of different frameworks, compared as one (said by the CLI)
    frame.attrs["higher_is_better"] = higher_is_better(names[0]) if mode is None and names else mode != "min"
    return frame.sort_values(column, na_position="last").reset_index(drop=True)


def _require_store(uri: str) -> None:
    """A local store that is not there is a typo: said, rather than a new empty store made (MLflow creates one).
    Servers and other schemes (``http``, ``databricks``) are left to MLflow."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]  # (a query: sqlite:///mlflow.db?timeout=30)
    elif uri.startswith("file:"):
        path = urlparse(uri).path if uri.startswith("file://") else uri[len("file:"):]
    elif ":" not in uri and uri not in ("databricks", "databricks-uc", "uc"):  # a bare path (a file store)
        path = os.path.expanduser(uri)
    else:
        return
    if path and path != ":memory:" and not Path(path).exists():
        raise ValueError(f"no MLflow store at {Path(path).absolute()} (tracking URI {uri}): give the store the "
                         "runs were logged to with --tracking-uri, or run the report where its mlflow.db is")


def group_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Repeats folded into one row per group: n, mean and sample standard deviation (``sd``) of the
    energy, the metric and metric per kJ, how the energy was measured, and the runs' short ids. Only runs that
    ``FINISHED`` are folded in (a crashed repeat would pull the means down); the others are counted in
    ``left_out``."""
    import pandas as pd

    column = frame.attrs["energy_column"]
    rows = []
    for group, every in frame.groupby(frame["group"].fillna("(none)"), sort=False):
        runs = every[every["status"] == "FINISHED"]
        row: dict[str, Any] = {"group": group, "n": len(runs), "left_out": len(every) - len(runs)}
        for name in (column, "value", "value_per_kj"):
            values = pd.to_numeric(runs[name], errors="coerce").dropna()
            row[f"{name}_mean"] = values.mean() if len(values) else None
            row[f"{name}_sd"] = values.std(ddof=1) if len(values) > 1 else None
        row["metric"] = " / ".join(sorted(set(runs["metric"].dropna()))) or None
        # how the energy was measured, beside the means it makes: the repeats' methods, all of them where they differ
        row["method"] = " / ".join(dict.fromkeys(runs["method"].dropna())) or None
        row["runs"] = " ".join(runs["run_id"])
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(frame.attrs)
    return out.sort_values(f"{column}_mean", na_position="last").reset_index(drop=True)


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    """Every cell as text, the same in the console and Markdown: numbers to 4 significant digits,
    money with :func:`money`, missing values empty."""
    out = []
    for _, row in frame.iterrows():
        cells = []
        for col, v in row.items():
            if col == "cost" or col.endswith("_cost"):
                cells.append(money(v))
            elif v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        out.append(cells)
    return out


def text_table(frame: pd.DataFrame) -> str:
    cols, rows = list(frame.columns), _cells(frame)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _methods(tags: dict[str, str], stage: str | None) -> str:
    """How each component was measured, from the run's ``green.method.<component>`` tags (a stage's own for a
    test/predict/evaluate column): "gpu counter, cpu estimated"."""
    found = _method_tags(tags, stage)
    order = {"gpu": 0, "cpu": 1, "dram": 2}
    return ", ".join(f"{c} {found[c]}" for c in sorted(found, key=lambda c: (order.get(c, 9), c)))


def _method_tags(tags: dict[str, str], stage: str | None) -> dict[str, str]:
    """``{component: method}`` from the run's ``green.method.<component>`` tags, or a stage's own."""
    prefix = f"green.method.{stage}." if stage else "green.method."
    return {k[len(prefix):]: v for k, v in tags.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


def _stage_method_tags(tags: dict[str, str]) -> dict[str, str]:
    """Every stage's ``green.method.<stage>.<component>`` tags."""
    return {k: v for k, v in tags.items() if k.startswith("green.method.") and k.count(".") == 3}


def _stage_methods(tags: dict[str, str]) -> str:
    """An inference-only run's methods in the training view (it has no training's): "test: cpu estimated"."""
    stages = sorted({k.split(".")[2] for k in _stage_method_tags(tags)})
    return "; ".join(f"{s}: {_methods(tags, s)}" for s in stages)


def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(frame)]
    return "\n".join(lines) + "\n"


def pareto_front(x: list[float], y: list[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other beats on both less ``x`` (energy) and a better ``y`` (the metric: higher,
    or lower for a loss or an error rate)."""
    sign = 1.0 if higher_is_better else -1.0
    front, best = [], -math.inf
    for i in sorted(range(len(x)), key=lambda i: (x[i], -sign * y[i])):
        if sign * y[i] > best:
            front.append(i)
            best = sign * y[i]
    return front


__all__ = [
    "ENERGY_CHOICES",
    "energy_key",
    "experiment_frame",
    "group_frame",
    "higher_is_better",
    "markdown_table",
    "money",
    "pareto_front",
    "text_table",
]
