"""Every rank's window under job-wide device labels: the plain data a rank all-gathers (:func:`window_payload`),
their merge (:func:`merge_ranks`: GPUs numbered across ranks, a GPU several ranks of a node measure counted once;
``records.device_tags`` lists the devices for the run's tags by the same rule)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from green_callbacks.meter import Measurement
from green_callbacks.sensors import Method


def window_payload(m: Measurement, rank: int, node: str) -> dict[str, Any]:
    """One rank's window, as plain data for the all-gather."""
    return {"rank": rank, "node": node, "joules": {c: dict(d) for c, d in m.joules.items()},
            "methods": {c: {k: v.value for k, v in d.items()} for c, d in m.methods.items()},
            "peak": dict(m.peak_power_w), "duration_s": m.duration_s, "stale": sorted(m.stale), "ids": dict(m.ids)}


@dataclass(frozen=True)
class Merged:
    """Every rank's window under job-wide device labels."""

    devices: dict[str, dict[str, float]]
    methods: dict[str, str]
    gpu_peak_w: float
    duration_s: float
    unread: frozenset[str] = frozenset()  # device labels not read for some of the window
    # mean power per component: each rank's joules over that rank's own window, summed (the ranks reach a point at
    # slightly different instants, so their windows differ: one rank's duration over every rank's joules was off)
    watts: Mapping[str, float] = field(default_factory=dict)
    # a GPU that more than one rank of a node measured (its id: the ranks that did), counted once, from one that read it
    shared: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    rank_j: Mapping[int, float] = field(default_factory=dict)  # each rank's joules as counted (shared GPUs once)

    @property
    def unread_labels(self) -> tuple[str, ...]:
        """The unread devices, and the components none of whose devices was read, for :class:`IntervalRecord`."""
        whole = {c for c, d in self.devices.items() if d and set(d) <= self.unread}
        return tuple(sorted(self.unread | whole))

    @property
    def components_j(self) -> dict[str, float]:
        return {c: sum(d.values()) for c, d in self.devices.items()}

    def power_w(self, duration_s: float) -> dict[str, float]:
        """Mean power per component: :attr:`watts` where the ranks gave it, else the joules over ``duration_s``."""
        return {c: self.watts[c] if c in self.watts else j / duration_s if duration_s > 0 else 0.0
                for c, j in self.components_j.items()}

    @property
    def total_j(self) -> float:
        return sum(sum(d.values()) for d in self.devices.values())

    @property
    def devices_j(self) -> dict[str, float]:
        return {d: j for ds in self.devices.values() for d, j in ds.items()}


def _shared_gpus(payloads: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[int, str]]:
    """GPUs that more than one rank of a node measured (one physical id, :meth:`Sensor.ids`, in several payloads):
    the (rank, device) whose copy counts, a read one where there is one (a rank whose handle failed, or whose read
    hung, reads 0 J of a GPU another rank read)."""
    copies: dict[tuple[str, str], list[tuple[int, str, bool]]] = {}
    for p in payloads:
        stale, methods = set(p.get("stale", ())), p["methods"].get("gpu", {})
        for device in p["joules"].get("gpu", {}):
            ident = p.get("ids", {}).get(device, "")
            if ident:
                read = methods.get(device) != Method.UNAVAILABLE.value and device not in stale
                copies.setdefault((p["node"], ident), []).append((p["rank"], device, read))
    return {key: next(((r, d) for r, d, read in cs if read), (cs[0][0], cs[0][1]))
            for key, cs in copies.items() if len({r for r, _, _ in cs}) > 1}


def merge_ranks(payloads: Sequence[Mapping[str, Any]]) -> Merged:
    """Per component, every rank's devices under job-wide labels; the method per component; GPU peak.

    GPUs are numbered across ranks in rank order (``gpu0``..``gpuN``). A GPU that several ranks of a node measure
    (its id in more than one rank's payload: ``gpus="all"`` or the same index on every rank) is counted once, under
    the label of its first appearance, from a rank that read it, and named in :attr:`Merged.shared`; so the total
    is the exact sum over devices. Host components keep their label, prefixed by the node when more than one node
    measured them.
    """
    devices: dict[str, dict[str, float]] = {}
    methods: dict[str, list[Method]] = {}
    unread: set[str] = set()
    nodes = {p["node"] for p in payloads if any(c != "gpu" and p["joules"][c] for c in p["joules"])}
    gpu_index, peak = 0, 0.0
    watts: dict[str, float] = {}
    shared = _shared_gpus(payloads)
    by_rank = {p["rank"]: p for p in payloads}
    rank_j: dict[int, float] = {p["rank"]: 0.0 for p in payloads}
    counted_gpu_j: dict[int, float] = {p["rank"]: 0.0 for p in payloads}
    labelled: set[tuple[str, str]] = set()
    for p in payloads:
        for component, per_device in p["joules"].items():
            for device, joules in per_device.items():
                src, src_device = p, device
                if component == "gpu":
                    key = (p["node"], p.get("ids", {}).get(device, ""))
                    if key in shared:
                        if key in labelled:  # counted at its first appearance
                            continue
                        labelled.add(key)
                        rank, src_device = shared[key]
                        src = by_rank[rank]
                        joules = src["joules"]["gpu"][src_device]
                    label = f"gpu{gpu_index}"
                    gpu_index += 1
                    counted_gpu_j[src["rank"]] += joules
                else:
                    label = f"{p['node']}/{device}" if len(nodes) > 1 else device
                devices.setdefault(component, {})[label] = joules
                methods.setdefault(component, []).append(Method(src["methods"][component][src_device]))
                if methods[component][-1] is Method.UNAVAILABLE or src_device in set(src.get("stale", ())):
                    unread.add(label)
                if src["duration_s"] > 0:
                    watts[component] = watts.get(component, 0.0) + joules / src["duration_s"]
                rank_j[src["rank"]] += joules
    for p in payloads:  # each rank's GPU peak, for the part of its GPUs' energy counted (all unless it shared one)
        gpu_j = sum(p["joules"].get("gpu", {}).values())
        peak += p["peak"].get("gpu", 0.0) * (min(1.0, counted_gpu_j[p["rank"]] / gpu_j) if gpu_j > 0 else 1.0)
    return Merged(devices, {c: Method.weakest(ms).value for c, ms in methods.items()}, peak,
                  max((p["duration_s"] for p in payloads), default=0.0), frozenset(unread), watts,
                  {ident: tuple(p["rank"] for p in payloads if ident in p.get("ids", {}).values())
                   for _, ident in shared}, rank_j)
