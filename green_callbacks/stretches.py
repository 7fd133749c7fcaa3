"""Stretches of a run added up: since the last evaluation, an epoch across a resume, the recent cost per step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from green_callbacks.meter import Measurement
from green_callbacks.ranks import Merged
from green_callbacks.sensors import Method

RATE_WINDOW = 5  # recent intervals whose median cost per step projects the rest of the run


def combined(a: Merged, b: Merged) -> Merged:
    """Two stretches of one window (an epoch before and after a resume): joules per device summed, the weaker
    method, the higher peak, the durations added."""
    devices = {c: dict(d) for c, d in a.devices.items()}
    for component, per_device in b.devices.items():
        mine = devices.setdefault(component, {})
        for device, joules in per_device.items():
            mine[device] = mine.get(device, 0.0) + joules
    methods = {c: Method.weakest([Method(m) for m in (a.methods.get(c), b.methods.get(c)) if m]).value
               for c in devices}
    duration = a.duration_s + b.duration_s
    pa, pb = a.power_w(a.duration_s), b.power_w(b.duration_s)
    watts = {c: (pa.get(c, 0.0) * a.duration_s + pb.get(c, 0.0) * b.duration_s) / duration
             for c in devices} if duration > 0 else {}
    return Merged(devices, methods, max(a.gpu_peak_w, b.gpu_peak_w), duration, a.unread | b.unread, watts)


class Recent:
    """The last ``RATE_WINDOW`` (steps, joules) entries of a kind; the run's (or this process's) first, with its
    warm-up and data loading, is left out while it is still among them (:meth:`settled`)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, float]] = []
        self.first_in = True

    def add(self, steps: int, joules: float) -> None:
        self.first_in = self.first_in and len(self.items) < RATE_WINDOW
        self.items = [*self.items[-(RATE_WINDOW - 1):], (steps, joules)]

    def settled(self) -> list[tuple[int, float]]:
        return self.items[1:] if self.first_in else self.items


class Since:
    """What the intervals since the last evaluation add up to: the next evaluation interval."""

    def __init__(self, start_step: int = 0) -> None:
        self.start_step = start_step
        self.start_unix: float | None = None
        self.devices: dict[str, dict[str, float]] = {}
        self.methods: dict[str, list[str]] = {}
        self.peak_w = 0.0
        self.unread: set[str] = set()
        self.duration_s = 0.0  # the intervals' durations added: a stretch across fits (two meters) or a resume
        self.watt_s: dict[str, float] | None = {}  # each interval's mean power per component times its duration, added

    def add(self, merged: Merged, interval: Measurement) -> None:
        if self.start_unix is None:
            self.start_unix = interval.start_unix
        for component, per_device in merged.devices.items():
            mine = self.devices.setdefault(component, {})
            for device, joules in per_device.items():
                mine[device] = mine.get(device, 0.0) + joules
        for component, method in merged.methods.items():
            self.methods.setdefault(component, []).append(method)
        self.peak_w = max(self.peak_w, merged.gpu_peak_w)
        self.unread |= merged.unread
        self.duration_s += interval.duration_s
        if self.watt_s is not None:
            for component, watts in merged.power_w(interval.duration_s).items():
                self.watt_s[component] = self.watt_s.get(component, 0.0) + watts * interval.duration_s

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it: a run resumed from a checkpoint between two evaluations (one taken
        at a logging point) books the next evaluation's whole stretch, not only the part after the resume."""
        return {"start_step": self.start_step, "start_unix": self.start_unix, "devices": self.devices,
                "methods": self.methods, "peak_w": self.peak_w, "unread": sorted(self.unread),
                "duration_s": self.duration_s, "watt_s": self.watt_s}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, last_point_step: int) -> Since:
        """Restored from :meth:`state_dict` (its times relative to the new process's start: 0); a checkpoint
        without it (older) starts at the last point, as before."""
        if not state:
            return cls(last_point_step)
        since = cls(int(state["start_step"]))
        since.start_unix = state.get("start_unix")
        since.devices = {c: dict(d) for c, d in state.get("devices", {}).items()}
        since.methods = {c: list(m) for c, m in state.get("methods", {}).items()}
        since.peak_w = float(state.get("peak_w", 0.0))
        since.unread = set(state.get("unread", ()))
        since.duration_s = float(state.get("duration_s", 0.0))
        # (an older checkpoint's stretch has no watt-seconds: its power is then the joules over the duration)
        watt_s = state.get("watt_s")
        since.watt_s = {c: float(ws) for c, ws in watt_s.items()} if watt_s is not None else None
        return since

    def merged(self) -> Merged:
        methods = {c: Method.weakest([Method(m) for m in ms]).value for c, ms in self.methods.items()}
        watts = {c: ws / self.duration_s for c, ws in self.watt_s.items()} \
            if self.watt_s is not None and self.duration_s > 0 else {}
        return Merged(self.devices, methods, self.peak_w, 0.0, frozenset(self.unread), watts)
