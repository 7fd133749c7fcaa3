"""NVIDIA GPU energy through NVML: the energy counter where it exists, sampled power elsewhere."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from green_callbacks.sensors.gpu import GpuEnergySensor, GpuState
from green_callbacks.sensors.targets import GpuTarget, choose_indices

GpuSelection = str | Sequence[int]


class NvmlUnavailable(RuntimeError):
    """NVML cannot be loaded or initialised on this machine (no driver, no GPU)."""


def load_nvml() -> Any:
    """Import and initialise ``pynvml`` (from nvidia-ml-py); raise ``NvmlUnavailable`` if absent."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a core dependency
        raise NvmlUnavailable(f"pynvml is not importable: {exc}") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        raise NvmlUnavailable(f"NVML could not be initialised ({exc}); no NVIDIA driver here?") from exc
    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _visible_ids(nvml: Any, uuids: list[str]) -> list[str]:
    """The process's CUDA devices, in CUDA order, as NVML UUIDs (or the raw ``MIG-`` entry).

    NVML ignores ``CUDA_VISIBLE_DEVICES``; CUDA does not. When torch has CUDA up we ask it for
    each device's UUID, which is exact. Otherwise we parse the variable as CUDA does: indices,
    or UUID prefixes, stopping at the first entry that names no device. Integer entries are
    taken in NVML (PCI bus) order, which is CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        ids = []
        for i in range(torch.cuda.device_count()):
            uuid = str(getattr(torch.cuda.get_device_properties(i), "uuid", ""))
            ids.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        return ids
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(uuids)
    ids: list[str] = []
    for entry in (e.strip() for e in env.split(",")):
        if entry.isdigit():  # an index, never a UUID's prefix: one past the last GPU ends the list, as in CUDA
            if int(entry) >= len(uuids):
                break
            ids.append(uuids[int(entry)])
        elif entry.startswith("MIG-"):
            ids.append(entry)
        else:
            prefix = entry if entry.startswith("GPU-") else f"GPU-{entry}"
            matches = [u for u in uuids if entry and u.startswith(prefix)]
            if len(matches) != 1:
                break  # CUDA ignores this entry and every one after it
            ids.append(matches[0])
    if len(set(ids)) < len(ids):  # a device named twice ("1,1"): CUDA then shows none (torch: "Repeated ordinal
        return []  # results in empty set")
    return ids


def resolve_gpus(nvml: Any, gpus: GpuSelection = "auto", cuda_indices: Sequence[int] | None = None) -> list[GpuTarget]:
    """Map the CUDA devices chosen by ``gpus`` to NVML handles, by UUID.

    Args:
        gpus: ``"auto"`` — the devices this process trains on (``cuda_indices`` from the
            trainer, else this rank's ``LOCAL_RANK`` device, else device 0); ``"all"`` — every
            GPU visible to the process; or a list of CUDA device indices.
        cuda_indices: the CUDA devices the trainer runs on, as the adapter knows them.
    """
    handles: list[Any] = []
    uuids: list[str] = []
    lost: dict[str, str] = {}  # a device NVML fails on (fallen off the bus): that GPU alone is not measured
    for i in range(nvml.nvmlDeviceGetCount()):
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nvml.nvmlDeviceGetUUID(h))
        except Exception as exc:
            h, uuid = None, f"nvml-device-{i}"  # keeps NVML's order for the devices after it
            lost[uuid] = f"NVML failed on it at start ({exc!r})"
        handles.append(h)
        uuids.append(uuid)
    visible = _visible_ids(nvml, uuids)
    targets = []
    for cuda_index in choose_indices(gpus, cuda_indices, len(visible), os.environ.get("LOCAL_RANK")):
        label = f"gpu{cuda_index}"
        ident = visible[cuda_index] if cuda_index < len(visible) else ""
        h = handles[uuids.index(ident)] if ident in uuids else None
        if ident in lost:
            targets.append(GpuTarget(cuda_index, None, "unknown", "", f"{label}: {lost[ident]}; not measured."))
            continue
        if h is not None:
            try:
                name = _text(nvml.nvmlDeviceGetName(h))
            except Exception as exc:
                targets.append(GpuTarget(cuda_index, None, "unknown", ident,
                                         f"{label}: NVML failed on it at start ({exc!r}); not measured."))
                continue
            if _mig_enabled(nvml, h):
                targets.append(GpuTarget(cuda_index, None, name, ident, _MIG_REASON.format(label=label)))
            else:
                targets.append(GpuTarget(cuda_index, h, name, ident))
        else:
            reason = (
                _MIG_REASON
                if ident.startswith("MIG-")
                else "{label}: CUDA device has no matching NVML device; not measured."
            )
            targets.append(GpuTarget(cuda_index, None, "unknown", ident, reason.format(label=label)))
    return targets


_MIG_REASON = (
    "{label} is a MIG instance: NVML reports power and energy only for the whole physical GPU, "
    "shared by every instance on it, so this instance's energy is not measurable and is recorded "
    "as 'unavailable'. Whole-GPU energy is measurable on a GPU with MIG mode off."
)


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # NOT_SUPPORTED on GPUs without MIG
        return False
    return bool(current)


class NvmlSensor(GpuEnergySensor):
    """GPU energy via NVML, per device, with the best method each device supports.

    The energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and newer) is read
    on sampler ticks, and at window edges where a read is cheap (see :class:`GpuEnergySensor`);
    where it is NOT_SUPPORTED, instant power
    (``NVML_FI_DEV_POWER_INSTANT``) is sampled and integrated, falling back to
    ``nvmlDeviceGetPowerUsage`` (a 1-second average on recent GPUs, hence the worse source).
    Any later NVML fault switches that device's method or marks it unavailable, with one
    warning; the run goes on.

    Args:
        gpus: which GPUs, see :func:`resolve_gpus`.
        cuda_indices: the CUDA devices the trainer runs on (for ``gpus="auto"``).
        nvml: an initialised ``pynvml`` module (tests pass a fake), which the caller shuts down;
            loaded (and shut down on ``close``) when ``None``.
        counter_poll_s: how often the sampler thread reads the energy counter. The read costs
            milliseconds of driver time on some GPUs (2.4 ms median on an H100 and an H200, driver
            580), so it is not read at every tick, nor at window edges on such a GPU:
            in between, the cheap instant power is integrated, which carries the energy over a
            counter failure and answers ``peek``.
        use_counter: read the energy counter where it exists; ``False`` samples power even
            there (to compare the two methods on the same GPU).
    """

    library = "NVML"

    def __init__(
        self,
        gpus: GpuSelection = "auto",
        cuda_indices: Sequence[int] | None = None,
        nvml: Any = None,
        use_counter: bool = True,
        counter_poll_s: float = 1.0,
    ) -> None:
        self._owns_nvml = nvml is None  # shut NVML down on close only if this sensor initialised it
        self._nvml = nvml if nvml is not None else load_nvml()
        self._no_instant: set[str] = set()  # devices whose instant power field is not supported, or kept failing
        self._instant_failing: dict[str, float] = {}  # since when the instant power field fails, per device
        try:
            targets = resolve_gpus(self._nvml, gpus, cuda_indices)
        except BaseException:  # a bad selection or a driver fault listing the GPUs: NVML is not left initialised
            self.close()
            raise
        super().__init__(targets, use_counter, counter_poll_s)

    def _not_supported(self, exc: Exception) -> bool:
        return getattr(exc, "value", None) == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", 3)

    def _absent(self, exc: Exception) -> bool:
        return self._not_supported(exc) or getattr(exc, "value", None) == getattr(
            self._nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13)  # (a driver without the function)

    def _gone(self, exc: Exception) -> bool:
        """Lost, in need of a reset, or errors no retry changes (no permission, no such device, no driver, a
        driver without the function)."""
        nvml = self._nvml
        codes = {getattr(nvml, name, code) for name, code in (
            ("NVML_ERROR_GPU_IS_LOST", 15), ("NVML_ERROR_RESET_REQUIRED", 16), ("NVML_ERROR_NO_PERMISSION", 4),
            ("NVML_ERROR_NOT_FOUND", 6), ("NVML_ERROR_DRIVER_NOT_LOADED", 9), ("NVML_ERROR_FUNCTION_NOT_FOUND", 13))}
        return getattr(exc, "value", None) in codes

    def _counter_j(self, gpu: GpuState) -> float:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.target.handle)) / 1000.0

    def _power_now_w(self, gpu: GpuState) -> float:
        """Instant power, else the averaged reading (which raises if it fails too)."""
        nvml, h, label = self._nvml, gpu.target.handle, gpu.target.label
        if label not in self._no_instant:
            try:
                value = nvml.nvmlDeviceGetFieldValues(h, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
                code = value.nvmlReturn
                if code == nvml.NVML_SUCCESS:
                    self._instant_failing.pop(label, None)
                    return value.value.uiVal / 1000.0
            except Exception as exc:
                code = getattr(exc, "value", None)
            # a passing failure takes the averaged reading this once; absent, or failing lost_after_s, for good
            since = self._instant_failing.setdefault(label, time.monotonic())
            if time.monotonic() - since >= self.lost_after_s or code in (getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
                                                 getattr(nvml, "NVML_ERROR_INVALID_ARGUMENT", 2)):
                self._no_instant.add(label)
                self.warn_once(
                    f"instant-{label}",
                    f"{label}: instant power is not readable; using "
                    "nvmlDeviceGetPowerUsage, a 1-second average on recent GPUs.",
                )
        return nvml.nvmlDeviceGetPowerUsage(h) / 1000.0

    def close(self) -> None:
        super().close()
        if self._owns_nvml and self.reads_ended:  # (never under a read still in NVML: the process's exit ends it)
            self._owns_nvml = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
