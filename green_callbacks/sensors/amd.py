"""AMD GPU energy through amdsmi (ROCm): the energy counter where it works, sampled socket power elsewhere."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from green_callbacks.sensors.gpu import GpuEnergySensor, GpuState
from green_callbacks.sensors.targets import GpuTarget, choose_indices

NOT_SUPPORTED = 2  # AMDSMI_STATUS_NOT_SUPPORTED in amdsmi.amdsmi_wrapper
NOT_INIT = 32  # AMDSMI_STATUS_NOT_INIT
WHOLE_GPU_PARTITIONS = ("", "SPX", "N/A")  # compute partition modes in which one handle is one whole GPU


class AmdSmiUnavailable(RuntimeError):
    """amdsmi cannot be imported or initialised here (no ROCm library, no AMD GPU)."""


class _NoReading(RuntimeError):
    """amdsmi answered, but with no value ("N/A", a zero resolution): the feature is absent."""


_state = threading.Lock()
# amdsmi_shut_down is not reference-counted: one call ends amdsmi for the whole process. So it is called
# only for a module this package initialised, once, at exit (a later run in the process still finds it up).
_started_by_us: list[Any] = []


def import_amdsmi() -> Any:
    """Import ``amdsmi`` without a sound: where its native library is missing it prints to stdout and
    raises ``KeyError`` (it is installed as a dependency of other tools, so this happens on every machine
    without ROCm); any failure becomes :class:`AmdSmiUnavailable`, and what it printed goes into the reason."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import amdsmi
    except (Exception, SystemExit) as exc:
        said = " ".join(printed.getvalue().split())
        raise AmdSmiUnavailable(
            f"amdsmi is not importable ({type(exc).__name__}: {exc}){f'; it said: {said}' if said else ''}"
        ) from exc
    return amdsmi


def load_amdsmi() -> Any:
    """The ``amdsmi`` module, initialised for AMD GPUs. If another part of the process already initialised
    it, it is used as it is; otherwise this package initialises it and shuts it down once, at exit."""
    amdsmi = import_amdsmi()
    with _state:
        try:
            amdsmi.amdsmi_get_processor_handles()  # answers only while amdsmi is initialised (by us or another)
            return amdsmi
        except Exception as exc:
            if _error_code(exc) not in (None, NOT_INIT):  # initialised, and failing: a fault for the caller to say
                raise
        # not initialised, or shut down since by another part of the process (one call ends it for everyone)
        try:
            amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
        except Exception as exc:
            raise AmdSmiUnavailable(f"amdsmi could not be initialised ({exc}); no AMD GPU driver here?") from exc
        if not _started_by_us:
            atexit.register(shut_down_amdsmi)
        if not any(m is amdsmi for m in _started_by_us):
            _started_by_us.append(amdsmi)
    return amdsmi


def shut_down_amdsmi() -> None:
    """Shut down what :func:`load_amdsmi` initialised, once (registered to run at exit)."""
    with _state:
        while _started_by_us:
            amdsmi = _started_by_us.pop()
            with contextlib.suppress(Exception):
                amdsmi.amdsmi_shut_down()


def _error_code(exc: Exception) -> int | None:
    get = getattr(exc, "get_error_code", None)
    try:
        return int(get()) if callable(get) else None
    except Exception:
        return None


def _ask(fn: Any, *args: Any, default: Any = None) -> Any:
    """An optional fact: ``default`` where this amdsmi lacks the call or the device lacks the feature."""
    try:
        return fn(*args) if fn is not None else default
    except Exception:
        return default


@dataclass(frozen=True)
class _AmdDevice:
    handle: Any
    uuid: str
    bdf: str
    name: str
    hip_id: int | None
    hip_uuid: str


def _key(uuid: str) -> str:
    """UUIDs compared the way HIP, ROCr and amdsmi spell them differently: no ``GPU-``, no dashes, lower case."""
    text = uuid.strip().lower()
    return (text[4:] if text.startswith("gpu-") else text).replace("-", "")


def _same_device(ident: str, dev: _AmdDevice) -> bool:
    want = _key(ident)
    # HIP's 16-digit UUID is the tail of amdsmi's; a shorter piece (a stray '1') names no device for sure
    return len(want) >= 8 and any(
        k and (k == want or (len(k) >= 8 and (k.endswith(want) or want.endswith(k))))
        for k in (_key(dev.hip_uuid), _key(dev.uuid))
    )


def _enumerate(amdsmi: Any) -> list[_AmdDevice]:
    """Every AMD GPU amdsmi sees, in HIP's physical order (``hip_id`` from amdsmi 6.4, else PCI order)."""
    enum_info = getattr(amdsmi, "amdsmi_get_gpu_enumeration_info", None)
    found = []
    for h in amdsmi.amdsmi_get_processor_handles():
        info = _ask(enum_info, h, default={}) or {}
        asic = _ask(amdsmi.amdsmi_get_gpu_asic_info, h, default={}) or {}
        hip_id = info.get("hip_id")
        found.append(
            _AmdDevice(
                h,
                str(_ask(amdsmi.amdsmi_get_gpu_device_uuid, h, default="")),
                str(_ask(amdsmi.amdsmi_get_gpu_device_bdf, h, default="")),
                str(asic.get("market_name", "AMD GPU")),
                hip_id if isinstance(hip_id, int) else None,
                str(info.get("hip_uuid") or ""),
            )
        )
    if found and all(d.hip_id is not None for d in found):
        return sorted(found, key=lambda d: d.hip_id)
    return sorted(found, key=lambda d: d.bdf)


def _env_filter(devices: list[_AmdDevice], value: str | None) -> list[_AmdDevice]:
    """Apply one ``*_VISIBLE_DEVICES`` list (indices or UUIDs) to ``devices``, stopping at the first
    entry that names none, as the runtime does."""
    if value is None:
        return devices
    kept: list[_AmdDevice] = []
    for entry in (e.strip() for e in value.split(",")):
        if re.fullmatch(r"[+-]?\d+", entry):  # an index; one out of range, -1 the usual, hides it and the rest
            if 0 <= int(entry) < len(devices):
                kept.append(devices[int(entry)])
                continue
            break
        matches = [d for d in devices if _same_device(entry, d)]
        if len(matches) != 1:
            break
        kept.append(matches[0])
    return kept


def visible_devices(amdsmi: Any) -> list[_AmdDevice]:
    """The process's HIP devices, in HIP order.

    With torch on ROCm already holding the GPUs, each device's UUID from torch, matched to amdsmi's
    (exact). Otherwise as the runtime filters: ``ROCR_VISIBLE_DEVICES`` first, then
    ``HIP_VISIBLE_DEVICES`` (or, where unset, ``CUDA_VISIBLE_DEVICES``, which HIP also honours)
    indexing what ROCr left.
    """
    devices = _enumerate(amdsmi)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "hip", None) and torch.cuda.is_initialized():
        ids = [str(getattr(torch.cuda.get_device_properties(i), "uuid", "")) for i in range(torch.cuda.device_count())]
        mapped = [[d for d in devices if _same_device(i, d)] for i in ids]
        if all(len(m) == 1 for m in mapped):
            return [m[0] for m in mapped]
    devices = _env_filter(devices, os.environ.get("ROCR_VISIBLE_DEVICES"))
    hip = os.environ.get("HIP_VISIBLE_DEVICES")
    return _env_filter(devices, hip if hip is not None else os.environ.get("CUDA_VISIBLE_DEVICES"))


_PARTITION_REASON = (
    "{label} is a partition of an AMD GPU in {mode} compute-partition mode: amdsmi reports power and energy "
    "only for the whole GPU, shared by every partition on it, so this partition's energy is not measurable "
    "per partition and is recorded as 'unavailable'. Whole-GPU energy is measurable in SPX mode."
)


def resolve_amd_gpus(amdsmi: Any, gpus: Any = "auto", cuda_indices: Sequence[int] | None = None) -> list[GpuTarget]:
    """Map the HIP devices chosen by ``gpus`` (the same choices as for NVIDIA) to amdsmi handles."""
    visible = visible_devices(amdsmi)
    targets = []
    for index in choose_indices(gpus, cuda_indices, len(visible), os.environ.get("LOCAL_RANK")):
        label = f"gpu{index}"
        if index >= len(visible):
            targets.append(
                GpuTarget(index, None, "unknown", "", f"{label}: HIP device has no amdsmi device; not measured.")
            )
            continue
        dev = visible[index]
        mode = str(_ask(getattr(amdsmi, "amdsmi_get_gpu_compute_partition", None), dev.handle, default="")).strip()
        uuid = dev.uuid or dev.hip_uuid
        if mode.upper() not in WHOLE_GPU_PARTITIONS:
            targets.append(GpuTarget(index, None, dev.name, uuid, _PARTITION_REASON.format(label=label, mode=mode)))
        else:
            targets.append(GpuTarget(index, dev.handle, dev.name, uuid, bus=dev.bdf))
    return targets


class AmdSmiSensor(GpuEnergySensor):
    """AMD GPU energy via amdsmi, per device, with the best method each device supports.

    The energy counter (``amdsmi_get_energy_count``: ``energy_accumulator`` × ``counter_resolution`` µJ;
    the key was ``power`` up to ROCm 6.2) is read every ``counter_poll_s``, and at window edges where a read
    is cheap. Where it is NOT_SUPPORTED, or never moves while the GPU draws power (MI100,
    ROCm/amdsmi#38), socket power is sampled and integrated: ``current_socket_power`` (instantaneous, MI300-class), else
    ``average_socket_power`` (MI200 and older), integer watts. Any later fault switches that device's
    method or marks it unavailable, with one warning; the run goes on.

    Args:
        gpus: ``"auto"``, ``"all"`` or a list of HIP device indices, as for :class:`NvmlSensor`.
        cuda_indices: the devices the trainer runs on (torch calls HIP devices ``cuda``).
        amdsmi: an initialised ``amdsmi`` module; loaded when ``None`` (see :func:`load_amdsmi`: this
            package shuts amdsmi down once at exit, and only if it initialised it).
        use_counter: read the energy counter where it exists; ``False`` samples power even there.
        counter_poll_s: how often the sampler reads the counter between window edges.
    """

    library = "amdsmi"
    stuck_after_s = 1.0  # a working counter moves every millisecond or so; 1 s still leaves no doubt

    def __init__(
        self,
        gpus: Any = "auto",
        cuda_indices: Sequence[int] | None = None,
        amdsmi: Any = None,
        use_counter: bool = True,
        counter_poll_s: float = 1.0,
    ) -> None:
        self._amdsmi = amdsmi if amdsmi is not None else load_amdsmi()
        super().__init__(resolve_amd_gpus(self._amdsmi, gpus, cuda_indices), use_counter, counter_poll_s)

    def _not_supported(self, exc: Exception) -> bool:
        return isinstance(exc, _NoReading) or _error_code(exc) == NOT_SUPPORTED

    def _counter_j(self, gpu: GpuState) -> float:
        info = self._amdsmi.amdsmi_get_energy_count(gpu.target.handle)
        count = info.get("energy_accumulator", info.get("power"))
        resolution_uj = info.get("counter_resolution")
        if not isinstance(count, int | float) or not isinstance(resolution_uj, int | float) or resolution_uj <= 0:
            raise _NoReading(f"energy count {count!r} at resolution {resolution_uj!r} µJ")
        return count * resolution_uj / 1e6

    def _power_now_w(self, gpu: GpuState) -> float:
        info = self._amdsmi.amdsmi_get_power_info(gpu.target.handle)
        for key in ("current_socket_power", "average_socket_power", "socket_power"):
            value = info.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        raise _NoReading("socket power is 'N/A'")
