"""NVIDIA GPU energy through NVML: the energy counter where it exists, sampled power elsewhere."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from green_callbacks.sensors.base import Method, Reading, Sensor
from green_callbacks.sensors.integrator import PowerIntegrator

GpuSelection = str | Sequence[int]
GPU_CHOICES = ('"auto"', '"all"', "a list of CUDA device indices")


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


@dataclass(frozen=True)
class GpuTarget:
    """One CUDA device of this process and the NVML handle that measures it."""

    cuda_index: int
    nvml_index: int | None  # None: not measurable (a MIG instance, an unknown id)
    handle: Any
    name: str
    uuid: str
    reason: str = ""

    @property
    def label(self) -> str:
        return f"gpu{self.cuda_index}"


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
        if entry.isdigit() and int(entry) < len(uuids):
            ids.append(uuids[int(entry)])
        elif entry.startswith("MIG-"):
            ids.append(entry)
        else:
            prefix = entry if entry.startswith("GPU-") else f"GPU-{entry}"
            matches = [u for u in uuids if entry and u.startswith(prefix)]
            if len(matches) != 1:
                break  # CUDA ignores this entry and every one after it
            ids.append(matches[0])
    return ids


def resolve_gpus(
    nvml: Any, gpus: GpuSelection = "auto", cuda_indices: Sequence[int] | None = None
) -> list[GpuTarget]:
    """Map the CUDA devices chosen by ``gpus`` to NVML handles, by UUID.

    Args:
        gpus: ``"auto"`` — the devices this process trains on (``cuda_indices`` from the
            trainer, else this rank's ``LOCAL_RANK`` device, else device 0); ``"all"`` — every
            GPU visible to the process; or a list of CUDA device indices.
        cuda_indices: the CUDA devices the trainer runs on, as the adapter knows them.
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    visible = _visible_ids(nvml, uuids)
    if gpus == "all":
        chosen = list(range(len(visible)))
    elif gpus == "auto":
        if cuda_indices is not None:
            chosen = list(cuda_indices)
        elif "LOCAL_RANK" in os.environ and visible:
            chosen = [int(os.environ["LOCAL_RANK"]) % len(visible)]
        else:
            chosen = [0] if visible else []
    elif isinstance(gpus, str):
        raise ValueError(f"gpus={gpus!r} is not valid; choose {', '.join(GPU_CHOICES)}")
    else:
        chosen = [int(i) for i in gpus]
        bad = [i for i in chosen if not 0 <= i < len(visible)]
        if bad:
            raise ValueError(
                f"gpus={list(gpus)!r}: CUDA device(s) {bad} do not exist; this process sees "
                f"{len(visible)} GPU(s), valid indices are {list(range(len(visible)))}"
            )
    targets = []
    for cuda_index in chosen:
        ident = visible[cuda_index] if cuda_index < len(visible) else ""
        if ident in uuids:
            i = uuids.index(ident)
            h = handles[i]
            if _mig_enabled(nvml, h):
                targets.append(GpuTarget(cuda_index, None, h, _text(nvml.nvmlDeviceGetName(h)), ident,
                                         _MIG_REASON.format(label=f"gpu{cuda_index}")))
            else:
                targets.append(GpuTarget(cuda_index, i, h, _text(nvml.nvmlDeviceGetName(h)), ident))
        else:
            reason = (_MIG_REASON if ident.startswith("MIG-") else
                      "{label}: CUDA device has no matching NVML device; not measured.")
            targets.append(GpuTarget(cuda_index, None, None, "unknown", ident,
                                     reason.format(label=f"gpu{cuda_index}")))
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


class _Gpu:
    """Per-device state: which method, the counter's last raw value, the integrator."""

    def __init__(self, target: GpuTarget) -> None:
        self.target = target
        self.method = Method.UNAVAILABLE
        self.counter_last_mj: int | None = None
        self.counter_j = 0.0  # joules accumulated from counter deltas
        self.frozen_j = 0.0  # joules measured before a switch of method
        self.integrator = PowerIntegrator()
        self.since_poll = PowerIntegrator()  # counter devices: power integrated since the last counter read
        self.polled_s = float("-inf")
        self.use_instant_field = True
        self.power_w = 0.0


class NvmlSensor(Sensor):
    """GPU energy via NVML, per device, with the best method each device supports.

    The energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and newer) is read
    at window edges and on sampler ticks; where it is NOT_SUPPORTED, instant power
    (``NVML_FI_DEV_POWER_INSTANT``) is sampled and integrated, falling back to
    ``nvmlDeviceGetPowerUsage`` (a 1-second average on recent GPUs, hence the worse source).
    Any later NVML fault switches that device's method or marks it unavailable, with one
    warning; the run goes on.

    Args:
        gpus: which GPUs, see :func:`resolve_gpus`.
        cuda_indices: the CUDA devices the trainer runs on (for ``gpus="auto"``).
        nvml: an initialised ``pynvml`` module (tests pass a fake), which the caller shuts down;
            loaded (and shut down on ``close``) when ``None``.
        counter_poll_s: how often the sampler thread reads the energy counter between window
            edges (it is always read at window edges). The read costs milliseconds of driver time
            on some GPUs (2.4 ms median on an H100, driver 580), so it is not read at every tick:
            in between, the cheap instant power is integrated, which carries the energy over a
            counter failure and answers ``peek``.
        use_counter: read the energy counter where it exists; ``False`` samples power even
            there (to compare the two methods on the same GPU).
    """

    component = "gpu"

    def __init__(
        self, gpus: GpuSelection = "auto", cuda_indices: Sequence[int] | None = None, nvml: Any = None,
        use_counter: bool = True, counter_poll_s: float = 1.0,
    ) -> None:
        super().__init__()
        if not counter_poll_s >= 0:
            raise ValueError(f"counter_poll_s={counter_poll_s!r} must be a number of seconds >= 0")
        self.use_counter = use_counter
        self.counter_poll_s = float(counter_poll_s)
        self._owns_nvml = nvml is None  # shut NVML down on close only if this sensor initialised it
        self._nvml = nvml if nvml is not None else load_nvml()
        self._lock = threading.Lock()
        self._gpus = [_Gpu(t) for t in resolve_gpus(self._nvml, gpus, cuda_indices)]
        for gpu in self._gpus:
            if gpu.target.nvml_index is None:
                self.warn_once(f"unmeasurable-{gpu.target.label}", gpu.target.reason)

    @property
    def devices(self) -> list[str]:
        return [g.target.label for g in self._gpus]

    def describe(self) -> dict[str, str]:
        return {g.target.label: f"{g.target.name} ({g.target.uuid})" for g in self._gpus}

    def _err_code(self, exc: Exception) -> int | None:
        return getattr(exc, "value", None)

    def start(self, now_s: float) -> None:
        for gpu in self._gpus:
            if gpu.target.nvml_index is None:
                continue
            if not self.use_counter:
                self._start_sampling(gpu, now_s)
                continue
            try:
                gpu.counter_last_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.target.handle))
                gpu.method = Method.COUNTER
                gpu.polled_s = now_s
            except Exception:
                self._start_sampling(gpu, now_s)

    def _start_sampling(self, gpu: _Gpu, now_s: float) -> None:
        if gpu.method is Method.COUNTER:  # what the counter has not yet shown, from the power since its last read
            gpu.frozen_j += gpu.counter_j + gpu.since_poll.joules_at(now_s)
        gpu.counter_j = 0.0
        gpu.integrator = PowerIntegrator()
        gpu.method = Method.SAMPLED
        power = self._power_w(gpu)
        if power is None:
            gpu.method = Method.UNAVAILABLE
        else:
            gpu.integrator.add(now_s, power)

    def _power_w(self, gpu: _Gpu) -> float | None:
        """Instant power, else the averaged reading, else ``None``.

        Where power is the energy source (sampling) a failure makes the device unavailable; on
        a counter device power only feeds the trace and peak, so the counter carries on.
        """
        nvml, h = self._nvml, gpu.target.handle
        if gpu.use_instant_field:
            try:
                value = nvml.nvmlDeviceGetFieldValues(h, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
                if value.nvmlReturn == nvml.NVML_SUCCESS:
                    return value.value.uiVal / 1000.0
            except Exception:
                pass
            gpu.use_instant_field = False
            self.warn_once(f"instant-{gpu.target.label}",
                           f"{gpu.target.label}: instant power is not readable; using "
                           "nvmlDeviceGetPowerUsage, a 1-second average on recent GPUs.")
        try:
            return nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception as exc:
            if gpu.method is Method.COUNTER:
                self.warn_once(f"power-{gpu.target.label}", f"{gpu.target.label}: power is not readable ({exc}); "
                               "energy still comes from the counter, the power trace shows 0 W.")
            else:
                self._lose(gpu, exc)
            return None

    def _lose(self, gpu: _Gpu, exc: Exception) -> None:
        self.warn_once(f"lost-{gpu.target.label}",
                       f"{gpu.target.label}: NVML failed ({exc}); its energy is 'unavailable' "
                       "from now on, the joules measured before are kept.")
        if gpu.method is Method.COUNTER:
            gpu.frozen_j += gpu.counter_j + gpu.since_poll.integrated_j
        elif gpu.method is Method.SAMPLED:
            gpu.frozen_j += gpu.integrator.integrated_j
        gpu.counter_j = 0.0
        gpu.integrator = PowerIntegrator()
        gpu.method = Method.UNAVAILABLE

    def _poll_counter(self, gpu: _Gpu, now_s: float) -> None:
        try:
            mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.target.handle))
        except Exception as exc:
            if self._err_code(exc) == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                self.warn_once(f"counter-{gpu.target.label}",
                               f"{gpu.target.label}: the energy counter became NOT_SUPPORTED; "
                               "switching to sampled power.")
                self._start_sampling(gpu, now_s)
            else:
                self._lose(gpu, exc)
            return
        last = gpu.counter_last_mj if gpu.counter_last_mj is not None else mj
        if mj < last:
            # The counter restarted (driver reload, reset): what it shows now was spent since.
            self.warn_once(f"reset-{gpu.target.label}",
                           f"{gpu.target.label}: the energy counter went backwards "
                           f"({last} -> {mj} mJ); treating it as a reset and counting on.")
            gpu.counter_j += mj / 1000.0
        else:
            gpu.counter_j += (mj - last) / 1000.0
        gpu.counter_last_mj = mj
        gpu.polled_s = now_s
        gpu.since_poll = PowerIntegrator()
        gpu.since_poll.add(now_s, gpu.power_w)

    def sample(self, now_s: float) -> dict[str, float]:
        with self._lock:
            for gpu in self._gpus:
                if gpu.method is Method.COUNTER and now_s - gpu.polled_s >= self.counter_poll_s:
                    self._poll_counter(gpu, now_s)
                if gpu.method in (Method.COUNTER, Method.SAMPLED):
                    power = self._power_w(gpu)
                    gpu.power_w = power or 0.0
                    if power is not None:
                        (gpu.integrator if gpu.method is Method.SAMPLED else gpu.since_poll).add(now_s, power)
                else:
                    gpu.power_w = 0.0
            return {g.target.label: g.power_w for g in self._gpus}

    def read(self, now_s: float) -> Reading:
        return self._reading(now_s, fresh=True)

    def peek(self, now_s: float) -> Reading:
        """Counter devices: the last counter read plus the power integrated since (no NVML call)."""
        return self._reading(now_s, fresh=False)

    def _reading(self, now_s: float, fresh: bool) -> Reading:
        joules, methods, power = {}, {}, {}
        with self._lock:
            for gpu in self._gpus:
                if gpu.method is Method.COUNTER and fresh:
                    self._poll_counter(gpu, now_s)
                if gpu.method is Method.COUNTER:
                    live = gpu.counter_j + (0.0 if fresh else gpu.since_poll.joules_at(now_s))
                else:
                    live = gpu.integrator.joules_at(now_s) if gpu.method is Method.SAMPLED else 0.0
                label = gpu.target.label
                joules[label] = gpu.frozen_j + live
                methods[label] = gpu.method
                power[label] = gpu.power_w
        return Reading(joules, methods, power)

    def close(self) -> None:
        if self._owns_nvml:
            self._owns_nvml = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
