"""The ``green-callbacks`` command: probe this machine, look up intensities, replay a spool, report runs."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

DESCRIPTION = "Probe this machine, look up carbon intensities, replay a spool, report an experiment's runs."


def _probe(args: argparse.Namespace) -> int:
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import Method, build_sensors

    sensors = build_sensors("all" if args.gpus == "all" else "auto", measure_cpu=True, cpu_scope="machine")
    rows = []
    with EnergyMeter(sensors, period_s=0.05) as meter:
        meter.begin("probe")
        import time

        time.sleep(args.seconds)
        m = meter.end("probe")
        described = meter.describe()
    for component in ("gpu", "cpu", "dram"):
        if component not in m.joules:
            rows.append((component, "-", "unavailable", "-"))
            continue
        for device, joules in m.joules[component].items():
            method = m.methods[component][device]
            rows.append((component, f"{device}: {described[component].get(device, '')}", method.value,
                         "-" if method is Method.UNAVAILABLE else f"{joules / m.duration_s:.1f} W"))
    width = max(len(r[1]) for r in rows)
    print(f"{'component':<10} {'device':<{width}} {'method':<12} mean power over {args.seconds:g} s")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:<{width}} {r[2]:<12} {r[3]}")
    if "edges" in described.get("gpu", {}):
        print(f"gpu: {described['gpu']['edges']}")
    measured = [r for r in rows if r[2] in ("counter", "sampled")]
    if not measured:
        from green_callbacks.sensors.rapl import POWERCAP_ROOT, RAPL_FIX, find_zones

        # the chmod fix only where there are RAPL counters to open up (a VM or a container often has none)
        rapl = RAPL_FIX if any(find_zones(POWERCAP_ROOT).values()) else \
            f"This machine has none ({POWERCAP_ROOT} shows no RAPL zone: common in VMs and containers)."
        print("\nNothing here is measured: energy will be estimated (CPU: CPU time of the training x watts "
              "per busy CPU).\n"
              "NVIDIA GPUs are measured through NVML, which needs the NVIDIA driver (libnvidia-ml.so);\n"
              "AMD GPUs through amdsmi, which needs ROCm (libamd_smi.so) and `pip install green-callbacks[amd]`.\n"
              f"CPU/DRAM are measured through RAPL where /sys/class/powercap exists. {rapl}")
        return 1
    return 0


def _intensity(args: argparse.Namespace) -> int:
    from green_callbacks.accounting import country_table, region_table, resolve_intensity

    if args.list and args.name is not None:
        print(f"error: intensity --list lists every country and region; give {args.name!r} without --list for its "
              "figure alone", file=sys.stderr)
        return 2
    if args.list:
        for row in sorted({r["iso3"]: r for r in country_table().values()}.values(), key=lambda r: r["country"]):
            value = float(row["g_co2e_per_kwh"])
            print(f"{row['iso3']}  {row['iso2']}  {row['country']:<40} {value:8.1f}  {row['year']}")
        for key, row in sorted(region_table().items()):
            print(f"{key:<32} {float(row['g_co2e_per_kwh']):8.1f}  {row['location']}")
        return 0
    name = args.name  # None: not given, the world average; "" is a value, and an unknown one
    ci = resolve_intensity(country=name if name is not None and ":" not in name else None,
                           region=name if name is not None and ":" in name else None)
    print(f"{ci.label}: {ci.g_per_kwh:g} gCO2e/kWh ({ci.year}); source: {ci.source}")
    return 0


@contextlib.contextmanager
def _quick_mlflow() -> Iterator[None]:
    """The CLI's own MLflow calls: a dead server answers in seconds, not after MLflow's minutes of retries
    (a value the user set wins; the environment is restored after, for callers of ``main``)."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    added = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _replay(args: argparse.Namespace) -> int:
    with _quick_mlflow():
        return _replay_spools(args)


def _replay_spools(args: argparse.Namespace) -> int:
    from green_callbacks.sinks import SpoolBusy, replay_spool

    if args.tracking_uri is not None:
        from green_callbacks.validation import check_server_uri

        check_server_uri("--tracking-uri", args.tracking_uri)
    spools: list[Path] = []
    listed: set[Path] = set()  # found in a folder: gone by the time it is reached, another process sent it
    for name in args.spool:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.glob("spool-*.jsonl") if not p.name.endswith(".rejected.jsonl"))
            spools += found
            listed.update(found)
        else:
            spools.append(path)
    if not spools:
        print(f"no spool files in {', '.join(args.spool)}: nothing to send", file=sys.stderr)
        return 0
    code = 0
    for spool in spools:
        try:
            result = replay_spool(spool, args.tracking_uri, args.wait, lambda text: print(text, file=sys.stderr),
                                  plan=print)
        except FileNotFoundError:
            if spool in listed and not spool.exists():  # another replay (or its sender) sent it all, and removed it
                print(f"{spool}: sent meanwhile by another process, which removed it; nothing is left to send",
                      file=sys.stderr)
                continue
            print(f"error: no spool file at {spool} (a sender removes its spool once everything is sent)",
                  file=sys.stderr)
            code = max(code, 2)
            continue
        except (SpoolBusy, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = max(code, 1)
            continue
        except Exception as exc:
            print(f"error: replay of {spool} failed, the spool is kept: {exc!r}", file=sys.stderr)
            code = max(code, 1)
            continue
        for note in result.notes:
            print(note.removeprefix("green-callbacks: "), file=sys.stderr)
        where = f" to run {result.run_id} at {result.tracking_uri}" if result.run_id else ""
        aside = f"; {result.set_aside} set aside (see the warnings above)" if result.set_aside else ""
        if result.complete:
            print(f"sent {result.sent} records from {spool}{where}{aside}")
        else:
            print(f"error: sent {result.sent} records from {spool}{where}{aside}; the rest stays in the spool: "
                  "run replay again once MLflow can take it", file=sys.stderr)
            code = max(code, 1)
    return code


def _report(args: argparse.Namespace) -> int:
    with _quick_mlflow():
        return _report_experiment(args)


def _report_experiment(args: argparse.Namespace) -> int:
    from green_callbacks.comparison import experiment_frame, group_frame, markdown_table, text_table
    from green_callbacks.pareto_plot import plot_pareto

    if args.tracking_uri is not None:  # (http://me:pw@:1 went to MLflow, which asked a host named "api")
        from green_callbacks.validation import check_server_uri

        check_server_uri("--tracking-uri", args.tracking_uri)
    frame = experiment_frame(args.experiment, args.tracking_uri, args.metric, args.energy, args.group_by, args.mode)
    missing = frame[frame[frame.attrs["energy_column"]].isna()]
    unmeasured = missing[missing["method"] == "nothing measured"]
    missing = missing[missing["method"] != "nothing measured"]
    table = group_frame(frame) if args.group_by else frame
    print(text_table(table))
    if len(unmeasured):
        print(f"\n{len(unmeasured)} run(s) measured nothing (every sensor unavailable): "
              f"{', '.join(unmeasured['run'] + ' (' + unmeasured['run_id'] + ')')}; they have no energy to compare")
    if len(missing):
        others = frame.attrs.get("energies_elsewhere", [])
        print(f"\n{len(missing)} run(s) have no {frame.attrs['energy_column']}: "
              f"{', '.join(missing['run'] + ' (' + missing['run_id'] + ')')}; "
              + (f"they have {', '.join(others)} energy: compare with --energy {' or --energy '.join(others)}"
                 if others else "they have no other energy to compare either"))
    for path, write in ((args.csv, lambda p: table.to_csv(p, index=False)),
                        (args.markdown, lambda p: Path(p).write_text(markdown_table(table)))):
        if path:
            try:
                write(path)
            except OSError as exc:
                print(f"error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
                return 2
    names = frame.attrs.get("metrics", [])
    if len(names) > 1:
        print(f"\nthe runs report different metrics ({', '.join(names)}): each run's own is compared, as one; "
              f"to choose, name them with --metric (each run's first it logged: --metric {','.join(names)})")
    if args.plot:
        try:
            plot_pareto(table, args.plot, grouped=bool(args.group_by))
        except OSError as exc:
            print(f"error: cannot write {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"plot: {args.plot}")
    return 0


def _seconds(text: str) -> float:
    """A number of seconds, finite and not negative: argparse's own error names the option and the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a number from 0 to {MAX_SECONDS:g} (a week)")
    return value


MAX_SECONDS = 7 * 86_400.0


def main(argv: Sequence[str] | None = None) -> int:
    from green_callbacks import __version__
    from green_callbacks.comparison import ENERGY_CHOICES

    parser = argparse.ArgumentParser(prog="green-callbacks", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="what can be measured on this machine, and how")
    p.add_argument("--gpus", choices=["auto", "all"], default="all")
    p.add_argument("--seconds", type=_seconds, default=1.0, help="how long to measure (default 1 s)")
    p.set_defaults(func=_probe)
    p = sub.add_parser("intensity", help="carbon intensity of a country or cloud region, with its source")
    p.add_argument("name", nargs="?", help="ISO code or name of a country, or provider:region")
    p.add_argument("--list", action="store_true", help="list every country and region")
    p.set_defaults(func=_intensity)
    p = sub.add_parser("replay", help="send what spool files still hold to MLflow (after an outage), exactly once")
    p.add_argument("spool", nargs="+", help="spool-<local_id>.jsonl files, or folders holding them")
    p.add_argument("--tracking-uri", help="reach the run at this URI instead of the recorded one (the same server "
                                          "under another address: progress is kept, nothing is sent twice); a "
                                          "user:password in it goes to MLflow through its environment variables")
    p.add_argument("--wait", type=_seconds, default=60.0,
                   help="seconds to wait for a sender still busy with a spool (default 60)")
    p.set_defaults(func=_replay)
    p = sub.add_parser("report", help="the runs of an MLflow experiment: energy, emissions, cost, metric per kJ",
                       description="The runs of an MLflow experiment (training and inference-only) in one table: "
                                   "the compared energy, emissions, cost, the metric and metric per kJ. The same "
                                   "columns go to the console, --csv and --markdown.")
    p.add_argument("experiment", help="experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's default)")
    p.add_argument("--metric", help="the quality metric, or several comma-separated, each run's first it logged "
                                    "(val_acc,eval_accuracy); default: val_acc, eval_accuracy, test_acc or the first "
                                    "val/eval/test metric")
    p.add_argument("--mode", choices=("max", "min"),
                   help="whether a higher (max) or lower (min) metric is better, for the Pareto front (default: "
                        "min for a loss or an error rate, such as eval_loss, val_err, wer; else max)")
    p.add_argument("--energy", choices=ENERGY_CHOICES, default="training",
                   help="what to compare: training (cumulative joules of the run) or joules per sample of a "
                        "test, predict or evaluate stage (default: training)")
    p.add_argument("--group-by", metavar="NAME",
                   help="a param or tag whose value groups repeats: one row per group with mean and sd, "
                        "error bars on the plot")
    p.add_argument("--csv", help="also save the table as CSV")
    p.add_argument("--markdown", help="also save the table as Markdown")
    p.add_argument("--plot", help="save a PNG of the metric against energy with the Pareto front")
    p.set_defaults(func=_report)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:  # the package's own errors name the bad value and the choices
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # piped into head: the reader has gone, which is no error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush does not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
