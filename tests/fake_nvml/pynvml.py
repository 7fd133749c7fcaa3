"""A fake ``pynvml`` for tests: simulated GPUs whose exact energy over any interval is known.

Each device follows a periodic, piecewise-constant ("bursty") power profile on the real
monotonic clock. ``energy_between`` integrates it exactly, so a test can compare the meter's
joules with the truth. Faults are injected per call name. Configure in-process with
``configure(...)``, or for subprocesses (DDP) through the ``FAKE_NVML_CONFIG`` environment
variable holding the same keyword arguments as JSON.

``configure(..., work_clock=True)`` runs the devices on a simulated clock instead, which only
``advance(seconds)`` moves: the training code says how much work it did, and the energy is a
function of that work, not of the machine's speed or load (identical runs, identical joules).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_MEMORY = 20
NVML_ERROR_UNKNOWN = 999
NVML_FI_DEV_POWER_AVERAGE = 185
NVML_FI_DEV_POWER_INSTANT = 186
NVML_POWER_SCOPE_GPU = 0
NVML_POWER_SCOPE_MODULE = 1
NVML_POWER_SCOPE_MEMORY = 2
NVML_DEVICE_ARCH_PASCAL = 4
NVML_DEVICE_ARCH_VOLTA = 5
NVML_DEVICE_ARCH_HOPPER = 9
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


def bursty_profile(seed: int = 0, period_s: float = 8.0, low_w: float = 60.0,
                   high_w: float = 400.0) -> list[tuple[float, float]]:
    """Segments of 20-400 ms at random levels: the shape of a training step's power."""
    rng = random.Random(seed)
    segments, total = [], 0.0
    while total < period_s:
        d = rng.uniform(0.02, 0.4)
        segments.append((d, rng.uniform(low_w, high_w)))
        total += d
    return segments


@dataclass
class Device:
    index: int
    uuid: str
    name: str = "Fake H100"
    profile: list[tuple[float, float]] = field(default_factory=bursty_profile)
    counter: bool = True
    instant: bool = True
    refresh_s: float = 0.0  # how often the instant power reading refreshes (0: continuously)
    mig: bool = False
    t0: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)  # call name -> error code
    calls: dict[str, int] = field(default_factory=dict)  # call name -> how many times it was made
    counter_offset_mj: int = 0
    counter_read_s: float = 0.0  # what one counter read takes (an H100's: 2.4 ms of driver time, GIL released)

    def __post_init__(self) -> None:
        self._edges = [0.0]
        self._cum = [0.0]
        for d, w in self.profile:
            self._edges.append(self._edges[-1] + d)
            self._cum.append(self._cum[-1] + d * w)
        self.period = self._edges[-1]

    def power_at(self, t: float) -> float:
        x = (t - self.t0) % self.period
        i = bisect.bisect_right(self._edges, x) - 1
        return self.profile[min(i, len(self.profile) - 1)][1]

    def _energy_to(self, t: float) -> float:
        x = t - self.t0
        n = math.floor(x / self.period)
        r = x - n * self.period
        i = bisect.bisect_right(self._edges, r) - 1
        i = min(i, len(self.profile) - 1)
        return n * self._cum[-1] + self._cum[i] + (r - self._edges[i]) * self.profile[i][1]

    def energy_between(self, t1: float, t2: float) -> float:
        return self._energy_to(t2) - self._energy_to(t1)


_devices: list[Device] = []
_initialised = False
_work_s: float | None = None  # the simulated work clock; None: the devices run on time.monotonic()


def _now() -> float:
    return time.monotonic() if _work_s is None else _work_s


def advance(seconds: float) -> None:
    """Move the work clock on by ``seconds`` of simulated work (needs ``configure(work_clock=True)``)."""
    global _work_s
    if _work_s is None:
        raise RuntimeError("advance() needs configure(..., work_clock=True)")
    if not seconds >= 0:
        raise ValueError(f"seconds={seconds!r} must be >= 0")
    _work_s += seconds


def configure(devices: list[dict] | None = None, n: int = 1, work_clock: bool = False, **common) -> list[Device]:
    """Set up the simulated GPUs, their clocks starting now (at 0 on a work clock)."""
    global _devices, _work_s
    specs = devices if devices is not None else [{} for _ in range(n)]
    _work_s = 0.0 if work_clock else None
    now = _now()
    _devices = []
    for i, spec in enumerate(specs):
        spec = {**common, **spec}
        if "profile_seed" in spec:
            spec["profile"] = bursty_profile(spec.pop("profile_seed"))
        if isinstance(spec.get("profile"), list):
            spec["profile"] = [tuple(p) for p in spec["profile"]]
        spec.setdefault("uuid", f"GPU-{i:08d}-fake-0000-0000-{i:012d}")
        spec.setdefault("t0", now)  # FAKE_NVML_CONFIG may pin it: CLOCK_MONOTONIC is shared by processes
        _devices.append(Device(index=i, **spec))
    return _devices


def devices() -> list[Device]:
    return _devices


def _rank() -> int:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


_per_rank: list[dict] | None = None
if os.environ.get("FAKE_NVML_CONFIG"):
    _config = json.loads(os.environ["FAKE_NVML_CONFIG"])
    # {"per_rank": [spec0, spec1]}: each DDP rank is a node that sees only its own GPU
    _per_rank = _config.pop("per_rank", None)
    if _per_rank is None:
        configure(**_config)


def _check(dev: Device, call: str) -> None:
    dev.calls[call] = dev.calls.get(call, 0) + 1
    code = dev.faults.get(call)
    if code is not None:
        raise NVMLError(code)


def nvmlInit() -> None:
    global _initialised
    if _per_rank is not None and not _devices:
        rank = _rank()
        configure([{"uuid": f"GPU-rank{rank}-fake", **_per_rank[rank]}])
    if not _devices:
        raise NVMLError(NVML_ERROR_UNKNOWN)
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _initialised = False


def nvmlDeviceGetCount() -> int:
    return len(_devices)


def nvmlDeviceGetHandleByIndex(i: int) -> Device:
    return _devices[i]


def nvmlDeviceGetUUID(h: Device) -> str:
    return h.uuid


def nvmlDeviceGetName(h: Device) -> str:
    return h.name


def nvmlDeviceGetMigMode(h: Device) -> tuple[int, int]:
    if not h.mig:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return (1, 1)


def nvmlDeviceGetTotalEnergyConsumption(h: Device) -> int:
    _check(h, "nvmlDeviceGetTotalEnergyConsumption")
    if not h.counter:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if h.counter_read_s:
        time.sleep(h.counter_read_s)
    # mJ since the "driver loaded": an arbitrary offset plus the exact integral, floored
    return h.counter_offset_mj + int(h.energy_between(h.t0, _now()) * 1000)


class _Value:
    def __init__(self, ui: int) -> None:
        self.uiVal = ui


class _Field:
    def __init__(self, ret: int, ui: int) -> None:
        self.nvmlReturn = ret
        self.value = _Value(ui)


def _instant_w(h: Device, t: float) -> float:
    if h.refresh_s > 0:
        t = h.t0 + math.floor((t - h.t0) / h.refresh_s) * h.refresh_s
    return h.power_at(t)


def nvmlDeviceGetFieldValues(h: Device, field_ids: list[int]) -> list[_Field]:
    _check(h, "nvmlDeviceGetFieldValues")
    out = []
    for fid in field_ids:
        fid = fid[0] if isinstance(fid, tuple) else fid  # (field, scope), as Zeus asks
        if fid == NVML_FI_DEV_POWER_INSTANT and h.instant:
            out.append(_Field(NVML_SUCCESS, int(_instant_w(h, _now()) * 1000)))
        elif fid == NVML_FI_DEV_POWER_AVERAGE:
            out.append(_Field(NVML_SUCCESS, nvmlDeviceGetPowerUsage(h)))
        else:
            out.append(_Field(NVML_ERROR_NOT_SUPPORTED, 0))
    return out


def nvmlDeviceGetPowerUsage(h: Device) -> int:
    """Mean power over the last second, in mW, as recent GPUs report it."""
    _check(h, "nvmlDeviceGetPowerUsage")
    t = _now()
    return int(h.energy_between(t - 1.0, t) * 1000)


# -- what the peers' bindings (Zeus, CodeCarbon) also call, so they can read the same simulated GPU --


def _nvmlGetFunctionPointer(name: str) -> None:
    raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)


def nvmlDeviceGetArchitecture(h: Device) -> int:
    """A GPU with an energy counter is Volta or newer; one without is older (Pascal)."""
    return NVML_DEVICE_ARCH_HOPPER if h.counter else NVML_DEVICE_ARCH_PASCAL


def nvmlDeviceGetC2cModeInfoV(h: Device) -> None:
    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # not a Grace Hopper module


def nvmlSystemGetDriverVersion() -> str:
    return "580.0-fake"


def nvmlDeviceGetTemperature(h: Device, sensor: int) -> int:
    return 50


nvmlDeviceGetTemperatureV = nvmlDeviceGetTemperature


def nvmlDeviceGetEnforcedPowerLimit(h: Device) -> int:
    return 700_000


nvmlDeviceGetPowerManagementDefaultLimit = nvmlDeviceGetEnforcedPowerLimit


class c_nvmlMemory_t:
    def __init__(self, total: int, free: int, used: int) -> None:
        self.total, self.free, self.used = total, free, used


def nvmlDeviceGetMemoryInfo(h: Device) -> c_nvmlMemory_t:
    return c_nvmlMemory_t(80 * 2**30, 70 * 2**30, 10 * 2**30)


class _Utilization:
    gpu = 90
    memory = 40


def nvmlDeviceGetUtilizationRates(h: Device) -> _Utilization:
    return _Utilization()


def nvmlDeviceGetComputeMode(h: Device) -> int:
    return 0


def nvmlDeviceGetComputeRunningProcesses(h: Device) -> list:
    return []


nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses
