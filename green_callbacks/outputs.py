"""What a run leaves behind: its own folder (CSV, power trace, plot, summary), the artifacts, one printed line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from green_callbacks.accounting import J_PER_KWH
from green_callbacks.process import warn_once
from green_callbacks.records import Kind, run_methods

if TYPE_CHECKING:
    import pandas as pd

    from green_callbacks.tracker import EnergyTracker

ARTIFACT_DIR = "green_callbacks"


def summary(t: EnergyTracker) -> dict[str, Any]:
    """The run in one dict: totals, methods, counts, carbon settings and where the MLflow run is."""
    epochs = [r for r in t.records if r.kind is Kind.EPOCH]
    last = t.records[-1] if t.records else None
    out: dict[str, Any] = {
        "energy_j": t.cumulative_j, "energy_kwh": t.cumulative_j / J_PER_KWH, "emissions_g": t.cumulative_g,
        "cost": t.cumulative_cost, "currency": t.accountant.currency if t.cumulative_cost is not None else None,
        "duration_s": t.run_time_s() if last is not None else 0.0, "epochs": len(epochs),
        "evaluations": t.evaluations, "last_step": last.step if last is not None else 0,
        "methods": run_methods(t.records), "world_size": t.rank.world_size,
        **t.accountant.as_params()}
    if t.accountant.series is not None and t.cumulative_j > 0:  # the series' mean over the run, as the windows used it
        out["carbon_intensity_g_per_kwh"] = f"{t.cumulative_g / (t.cumulative_j / J_PER_KWH * t.accountant.pue):.4g}"
        out["carbon_intensity_label"] += "; the run's mean as its windows took it"
    if not t.measured_in_run:  # nothing measured on any rank in this training: no 0 J as a measurement
        out.update(energy_j=None, energy_kwh=None, emissions_g=None, cost=None, currency=None)
    run = t.run or (t.sink.run_ref if t.sink is not None else None)
    blocked = t.sink.blocked if t.sink is not None else None
    if blocked:  # the sender stopped for good: the records wait for a person
        out["mlflow_blocked"] = blocked
        out["mlflow_spool"] = str(t.sink.spool_path)
    if run is not None:
        out["mlflow_run_id"] = run.run_id
        out["mlflow_tracking_uri"] = run.tracking_uri
    elif t.sink is not None:
        out["mlflow_spool"] = str(t.sink.spool_path)
    return out


def write(t: EnergyTracker, trace: pd.DataFrame | None) -> None:
    """Rank 0 at the end: the files in the run's own folder, logged as artifacts.

    A folder that cannot be written costs one warning and the files, never the run's status.
    """
    if not t.records:
        return
    written: list[Path] = []
    if t.artifacts:
        try:
            folder = t.run_folder
            if getattr(t, "_outputs_folder", None) != folder:  # another training's files there are kept aside
                written = _keep_earlier(folder)
                t._outputs_folder = folder
            written += _write_files(t, trace, folder)
        except OSError as exc:
            still = "the metrics go to MLflow as usual" if t.use_mlflow else "with mlflow=False, nothing is kept"
            warn_once(t, "outputs", f"cannot write the run's outputs under {t.output_dir} ({exc}); these files are "
                                    f"not written ({still})")
    if t.sink is not None:
        for path in written:
            t.sink.log_artifact(path, ARTIFACT_DIR)


OUTPUT_FILES = ("intervals.csv", "power_trace.csv", "summary.json", "power.png")


def _keep_earlier(folder: Path) -> list[Path]:
    """The files another training wrote into this run's folder (the process a resume picks up from, a second
    monitor logging into the same run), renamed ``intervals.before-1.csv``... so that this one's do not overwrite
    them: a crashed process's records (the work the crash threw away) stay, in the folder and as artifacts."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    present = [folder / n for n in OUTPUT_FILES if (folder / n).is_file() and not (folder / n).is_symlink()]
    if not present:
        return []
    n = 1
    while any((folder / f"{p.stem}.before-{n}{p.suffix}").exists() for p in (folder / f for f in OUTPUT_FILES)):
        n += 1
    kept = [p.rename(folder / f"{p.stem}.before-{n}{p.suffix}") for p in present]
    return [Path(p) for p in kept]


def _write_files(t: EnergyTracker, trace: pd.DataFrame | None, folder: Path) -> list[Path]:
    if folder.is_symlink():  # a link planted at the run's own folder: the folder is made here, never followed
        folder.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []

    def target(name: str) -> Path:
        path = folder / name
        if path.is_symlink():  # never write through a link planted at an output path
            path.unlink()
        out.append(path)
        return path

    if "intervals" in t.artifacts:
        t.frame().to_csv(target("intervals.csv"), index=False)
    if "trace" in t.artifacts and trace is not None:
        trace.to_csv(target("power_trace.csv"), index=False)
    if "summary" in t.artifacts:
        target("summary.json").write_text(json.dumps(summary(t), indent=2, default=str), encoding="utf-8")
    if "plot" in t.artifacts and trace is not None and t.measured_in_run:
        from green_callbacks.report import plot_power

        plot_power(trace, t.records, target("power.png"))
    return out


def print_summary(t: EnergyTracker, status: str) -> None:
    s = summary(t)
    cost = f", cost {s['cost']:.4g} {s['currency']}" if s["cost"] is not None else ""
    methods = ", ".join(f"{c} {m}" for c, m in s["methods"].items()) or "nothing measured"
    where = ("\n  a dry run (Lightning's fast_dev_run): nothing logged to MLflow, no files written" if t.dry_run else
             f"\n  MLflow stopped taking the records ({_first_sentence(s['mlflow_blocked'])}); they are kept in "
             f"{s['mlflow_spool']}: "
             f"green-callbacks replay {s['mlflow_spool']} once that is fixed" if "mlflow_blocked" in s else
             f"\n  MLflow run {s['mlflow_run_id']}" if "mlflow_run_id" in s else
             f"\n  MLflow has not taken the records yet: they are kept in {s['mlflow_spool']} and sent when it answers "
             f"(or: green-callbacks replay {s['mlflow_spool']})" if "mlflow_spool" in s else "")
    intensity = (f"{s['carbon_intensity_g_per_kwh']} g/kWh" if t.accountant.series is None else
                 f"{s['carbon_intensity_g_per_kwh']} g/kWh, the mean of {t.accountant.series.path.name} over the run"
                 if t.cumulative_j > 0 else f"the intensity of {t.accountant.series.path.name}")
    energy = (f"{s['energy_j']:.1f} J ({_small(s['energy_kwh'], 6)} kWh), {_small(s['emissions_g'], 3)} gCO2e{cost}"
              if t.measured_in_run else "no energy measured")
    say(f"green-callbacks [{status.lower()}]: {_count(s['epochs'], 'epoch')}, "
        f"{_count(s['evaluations'], 'evaluation')}, to step {s['last_step']}, {energy} over "
        f"{s['duration_s']:.1f} s ({methods}; {intensity}, PUE {s['pue']}){where}")


def _small(value: float, decimals: int) -> str:
    """``value`` to ``decimals`` places, or to 3 significant digits where the places would show fewer (0.000 gCO2e
    beside a cost of 5e-08 EUR)."""
    return f"{value:.3g}" if value and abs(value) < 10.0 ** (2 - decimals) else f"{value:.{decimals}f}"


def _first_sentence(text: str) -> str:
    """A refusal's first sentence: its whole text (the way out, often at its end) was in the warning before."""
    cut = text.find(". ")
    return text if cut < 0 else text[:cut + 1]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def say(text: str) -> None:
    """Print a line of our own on a line of its own: through ``tqdm.write`` when tqdm is loaded (HF's and
    Lightning's progress bars), which clears a live bar, prints, and draws the bar again below; after a
    newline in any case, since a bar that stopped leaves the cursor mid-line."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and hasattr(tqdm, "tqdm"):
        tqdm.tqdm.write("\n" + text, file=sys.stdout)
        sys.stdout.flush()
    else:
        print("\n" + text, flush=True)
