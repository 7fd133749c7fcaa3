"""The ``green-callbacks`` command: probe this machine, look up intensities, replay a spool, report runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _probe(args: argparse.Namespace) -> int:
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import build_sensors

    sensors = build_sensors("all" if args.gpus == "all" else "auto", measure_cpu=True)
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
            rows.append((component, f"{device}: {described[component].get(device, '')}",
                         m.methods[component][device].value, f"{joules / m.duration_s:.1f} W"))
    width = max(len(r[1]) for r in rows)
    print(f"{'component':<10} {'device':<{width}} {'method':<12} mean power over {args.seconds:g} s")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:<{width}} {r[2]:<12} {r[3]}")
    measured = [r for r in rows if r[2] in ("counter", "sampled")]
    if not measured:
        print("\nNothing here is measured: energy will be estimated (CPU: TDP x utilisation). "
              "See `green-callbacks probe` notes in the README for NVML and RAPL permissions.")
        return 1
    return 0


def _intensity(args: argparse.Namespace) -> int:
    from green_callbacks.accounting import country_table, region_table, resolve_intensity

    if args.list:
        for row in sorted({r["iso3"]: r for r in country_table().values()}.values(), key=lambda r: r["country"]):
            value = float(row["g_co2e_per_kwh"])
            print(f"{row['iso3']}  {row['iso2']}  {row['country']:<40} {value:8.1f}  {row['year']}")
        for key, row in sorted(region_table().items()):
            print(f"{key:<32} {float(row['g_co2e_per_kwh']):8.1f}  {row['location']}")
        return 0
    try:
        ci = resolve_intensity(country=args.name if args.name and ":" not in args.name else None,
                               region=args.name if args.name and ":" in args.name else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{ci.label}: {ci.g_per_kwh:g} gCO2e/kWh ({ci.year}); source: {ci.source}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from green_callbacks.sinks import replay_spool

    try:
        n = replay_spool(args.spool, args.tracking_uri)
    except FileNotFoundError:
        print(f"error: no spool file at {args.spool}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: replay failed, the spool is kept: {exc!r}", file=sys.stderr)
        return 1
    print(f"sent {n} records from {args.spool}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="green-callbacks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="what can be measured on this machine, and how")
    p.add_argument("--gpus", choices=["auto", "all"], default="all")
    p.add_argument("--seconds", type=float, default=1.0, help="how long to measure (default 1 s)")
    p.set_defaults(func=_probe)
    p = sub.add_parser("intensity", help="carbon intensity of a country or cloud region, with its source")
    p.add_argument("name", nargs="?", help="ISO code or name of a country, or provider:region")
    p.add_argument("--list", action="store_true", help="list every country and region")
    p.set_defaults(func=_intensity)
    p = sub.add_parser("replay", help="send a spool file's records to MLflow (after an outage)")
    p.add_argument("spool", help="the spool-<run_id>.jsonl file")
    p.add_argument("--tracking-uri", help="send to this tracking URI instead of the one recorded")
    p.set_defaults(func=_replay)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
