"""The one interface every energy source implements: cumulative joules per device, and how."""

from __future__ import annotations

import abc
import enum
import logging
from dataclasses import dataclass, field

log = logging.getLogger("green_callbacks")


class Method(str, enum.Enum):
    """How a number of joules was obtained, from most to least trustworthy."""

    COUNTER = "counter"  # a hardware energy counter (edges between its reads: instant power, see GpuEnergySensor)
    SAMPLED = "sampled"  # power readings integrated over their real timestamps
    ESTIMATED = "estimated"  # a model (TDP x utilisation), never a measurement
    UNAVAILABLE = "unavailable"  # nothing could be read

    @property
    def rank(self) -> int:
        return _RANK[self]

    @staticmethod
    def weakest(methods: list[Method]) -> Method:
        """The least trustworthy of ``methods``: a sum is only as good as its worst part."""
        return max(methods, key=_RANK.__getitem__) if methods else Method.UNAVAILABLE


_RANK = {m: i for i, m in enumerate(Method)}  # read at every window's merge: a lookup, not a list scan


@dataclass(frozen=True)
class Reading:
    """Cumulative joules per device since the sensor started, and the method per device."""

    joules: dict[str, float]
    methods: dict[str, Method]
    power_w: dict[str, float] = field(default_factory=dict)
    # devices whose reads are failing now (retried, not yet lost): their joules stop at the first failure until a
    # read succeeds, which then counts the gap; a window ending now is short of theirs
    stale: frozenset[str] = frozenset()
    # of those, the ones whose joules stop before now (the power carried between reads fails too): a read that
    # resumes brings the gap's joules into the window then open, which a window starting now would hold
    short: frozenset[str] = frozenset()


class Sensor(abc.ABC):
    """A source of joules for one component (``gpu``, ``cpu`` or ``dram``).

    ``read`` is called from the trainer's thread at window edges and must not block on I/O
    slower than a register or sysfs read. ``sample`` is called from the meter's one background
    thread every ``period_s``; sensors that integrate power do their work there, counter
    sensors use it to notice wraparound and to feed the power trace.
    """

    component: str = "gpu"

    def __init__(self) -> None:
        self._warned: set[str] = set()

    @property
    @abc.abstractmethod
    def devices(self) -> list[str]:
        """Device labels, stable for the sensor's life (``gpu0``, ``package-0``...)."""

    @property
    def measurable(self) -> bool:
        """Whether any of its devices can be read at all (a MIG slice, a GPU lost before the start cannot)."""
        return bool(self.devices)

    @abc.abstractmethod
    def read(self, now_s: float) -> Reading:
        """Cumulative joules per device from ``start`` up to ``now_s`` (monotonic seconds)."""

    def peek(self, now_s: float) -> Reading:
        """A cheap reading between window edges (per-step budget checks); ``read`` unless overridden."""
        return self.read(now_s)

    def start(self, now_s: float) -> None:  # noqa: B027 - optional hook
        """Take the baseline; called once before the first ``read``/``sample``."""

    def sample(self, now_s: float) -> dict[str, float]:
        """One tick of the background sampler; returns the current power per device (W)."""
        return self.read(now_s).power_w

    def settle(self, now_s: float) -> None:  # noqa: B027 - optional hook
        """Measuring is about to end (before the last reading): a fault still under way is decided now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles."""

    def describe(self) -> dict[str, str]:
        """Facts worth recording once per run (device names, method)."""
        return {}

    def ids(self) -> dict[str, str]:
        """What physical device each label reads, where it can be shared (a GPU's UUID): two ranks that measure the
        same GPU (``gpus="all"`` on a node under DDP) count it once. Empty: no device here is shared."""
        return {}

    def warn_once(self, key: str, message: str) -> None:
        """One warning per fault kind per sensor: telemetry must not flood a training log."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
