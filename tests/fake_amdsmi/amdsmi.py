"""A fake ``amdsmi`` (the ROCm library's Python binding, 7.0.2 API) whose GPUs' exact energy is known.

Each device follows the same bursty power profile as the fake NVML's (its ``Device`` is reused), on
the real monotonic clock, so ``energy_between`` gives the truth. What differs is what amdsmi shows of
it: an ``energy_accumulator`` in counts of ``counter_resolution`` µJ (the key ``power`` up to ROCm 6.2,
both in 6.3), integer watts in ``current_socket_power`` (MI300-class) or ``average_socket_power``
(MI200 and older), ``"N/A"`` for what a device lacks, ``AmdSmiLibraryException`` with
``get_error_code()``. Devices can have no counter (``counter=False``: NOT_SUPPORTED), a counter that
never moves (``counter="stuck"``, MI100: ROCm/amdsmi#38), a compute partition mode, and faults per call.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import sys
import time
import types
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_fake_gpu_profiles", Path(__file__).parent.parent / "fake_nvml" / "pynvml.py"
)
_profiles = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _profiles  # its dataclasses look their module up there
_spec.loader.exec_module(_profiles)
bursty_profile = _profiles.bursty_profile

amdsmi_wrapper = types.SimpleNamespace(
    AMDSMI_STATUS_SUCCESS=0,
    AMDSMI_STATUS_INVAL=1,
    AMDSMI_STATUS_NOT_SUPPORTED=2,
    AMDSMI_STATUS_IO=12,
    AMDSMI_STATUS_INIT_ERROR=18,
    AMDSMI_STATUS_NOT_INIT=32,
    AMDSMI_STATUS_DRIVER_NOT_LOADED=34,
)


class AmdSmiInitFlags(enum.IntEnum):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1 << 0
    INIT_AMD_GPUS = 1 << 1


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        super().__init__(err_code)
        self.err_code = abs(err_code)

    def __str__(self) -> str:
        return f"Error code:\n\t{self.err_code} | AMDSMI_STATUS {self.err_code}"

    def get_error_code(self) -> int:
        return self.err_code


class Device(_profiles.Device):
    """A fake NVML device's power profile, plus what amdsmi shows of it."""

    def __init__(
        self,
        *,
        counter: bool | str = True,
        power_key: str = "current",
        resolution_uj: float = 15.3,
        version: str = "7.0",
        partition: str | None = None,
        bdf: str = "",
        hip_uuid: str = "",
        start_count: int = 0,
        **kw,
    ) -> None:
        super().__init__(counter=counter, **kw)
        self.power_key = power_key  # "current" (MI300), "average" (MI200, MI100) or "none"
        self.resolution_uj = resolution_uj
        self.version = version
        self.partition = partition  # None: the call is NOT_SUPPORTED (not an MI300)
        self.bdf = bdf or f"0000:{0x10 + self.index:02x}:00.0"
        self.hip_uuid = hip_uuid
        self.start_count = start_count
        self.handle = ctypes.c_void_p(0x1000 + self.index)


_devices: list[Device] = []
initialised = False
init_calls = 0
shut_down_calls = 0
has_enumeration_info = True


def configure(devices: list[dict] | None = None, n: int = 1, enumeration_info: bool = True, **common) -> list[Device]:
    """Set up the simulated GPUs, their clocks starting now; ``enumeration_info=False`` is amdsmi < 6.4."""
    global _devices, initialised, init_calls, shut_down_calls, has_enumeration_info
    specs = devices if devices is not None else [{} for _ in range(n)]
    now = time.monotonic()
    _devices = []
    for i, spec in enumerate(specs):
        spec = {**common, **spec}
        if "profile_seed" in spec:
            spec["profile"] = bursty_profile(spec.pop("profile_seed"))
        spec.setdefault("uuid", f"{i:02x}ff74a1-0000-1000-8010-4bc1a8c27a{i:02x}")
        spec.setdefault("name", "AMD Instinct MI300X")
        spec.setdefault("t0", now)
        _devices.append(Device(index=i, **spec))
    initialised, init_calls, shut_down_calls, has_enumeration_info = False, 0, 0, enumeration_info
    return _devices


def devices() -> list[Device]:
    return _devices


def _device(handle: ctypes.c_void_p, call: str) -> Device:
    if not initialised:
        raise AmdSmiLibraryException(amdsmi_wrapper.AMDSMI_STATUS_NOT_INIT)
    if not isinstance(handle, ctypes.c_void_p):
        raise AmdSmiException(f"{handle!r} is not an amdsmi_processor_handle")
    for dev in _devices:
        if dev.handle.value == handle.value:  # handles are new c_void_p objects: compare .value
            dev.calls[call] = dev.calls.get(call, 0) + 1
            if call in dev.faults:
                raise AmdSmiLibraryException(dev.faults[call])
            return dev
    raise AmdSmiLibraryException(amdsmi_wrapper.AMDSMI_STATUS_INVAL)


def amdsmi_init(flag: AmdSmiInitFlags = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
    global initialised, init_calls
    init_calls += 1
    if not _devices:
        raise AmdSmiLibraryException(amdsmi_wrapper.AMDSMI_STATUS_DRIVER_NOT_LOADED)
    initialised = True


def amdsmi_shut_down() -> None:
    """Not reference-counted, as in amdsmi: one call ends it for everyone in the process."""
    global initialised, shut_down_calls
    shut_down_calls += 1
    initialised = False


def amdsmi_get_processor_handles() -> list[ctypes.c_void_p]:
    if not initialised:
        raise AmdSmiLibraryException(amdsmi_wrapper.AMDSMI_STATUS_NOT_INIT)
    return [ctypes.c_void_p(d.handle.value) for d in _devices]


def amdsmi_get_gpu_device_uuid(h: ctypes.c_void_p) -> str:
    return _device(h, "amdsmi_get_gpu_device_uuid").uuid


def amdsmi_get_gpu_device_bdf(h: ctypes.c_void_p) -> str:
    return _device(h, "amdsmi_get_gpu_device_bdf").bdf


def amdsmi_get_gpu_asic_info(h: ctypes.c_void_p) -> dict:
    dev = _device(h, "amdsmi_get_gpu_asic_info")
    return {"market_name": dev.name, "vendor_id": "0x1002", "device_id": "0x74a1", "target_graphics_version": "gfx942"}


def _enumeration_info(h: ctypes.c_void_p) -> dict:
    dev = _device(h, "amdsmi_get_gpu_enumeration_info")
    return {
        "drm_render": 128 + dev.index,
        "drm_card": dev.index,
        "hsa_id": 2 + dev.index,
        "hip_id": dev.index,
        "hip_uuid": dev.hip_uuid or f"GPU-{dev.uuid.replace('-', '')[:16]}",
    }


def __getattr__(name: str):
    if name == "amdsmi_get_gpu_enumeration_info" and has_enumeration_info:  # from amdsmi 6.4 only
        return _enumeration_info
    raise AttributeError(name)


def amdsmi_get_gpu_compute_partition(h: ctypes.c_void_p) -> str:
    dev = _device(h, "amdsmi_get_gpu_compute_partition")
    if dev.partition is None:
        raise AmdSmiLibraryException(amdsmi_wrapper.AMDSMI_STATUS_NOT_SUPPORTED)
    return dev.partition


def amdsmi_get_energy_count(h: ctypes.c_void_p) -> dict:
    dev = _device(h, "amdsmi_get_energy_count")
    if dev.counter is False:
        raise AmdSmiLibraryException(amdsmi_wrapper.AMDSMI_STATUS_NOT_SUPPORTED)
    joules = 0.0 if dev.counter == "stuck" else dev.energy_between(dev.t0, time.monotonic())
    count = dev.start_count + int(joules * 1e6 / dev.resolution_uj)  # whole counts, as the hardware holds them
    keys = {"6.2": ["power"], "6.3": ["power", "energy_accumulator"]}.get(dev.version, ["energy_accumulator"])
    return {**dict.fromkeys(keys, count), "counter_resolution": dev.resolution_uj, "timestamp": time.monotonic_ns()}


def amdsmi_get_power_info(h: ctypes.c_void_p) -> dict:
    """Integer watts; the instant reading on MI300-class, the mean of the last 0.1 s (one SMU update) before."""
    dev = _device(h, "amdsmi_get_power_info")
    t = time.monotonic()
    info = {
        "socket_power": "N/A",
        "current_socket_power": "N/A",
        "average_socket_power": "N/A",
        "gfx_voltage": 800,
        "soc_voltage": 900,
        "mem_voltage": 1100,
        "power_limit": 750_000_000,
    }
    if dev.power_key == "current":
        info["current_socket_power"] = info["socket_power"] = round(dev.power_at(t))
    elif dev.power_key == "average":
        info["average_socket_power"] = info["socket_power"] = round(dev.energy_between(t - 0.1, t) / 0.1)
    return info
