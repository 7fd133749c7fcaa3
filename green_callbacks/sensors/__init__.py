"""Where joules come from: NVML, amdsmi, RAPL, or an estimate, behind one interface."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from green_callbacks.sensors.amd import AmdSmiSensor, AmdSmiUnavailable
from green_callbacks.sensors.base import Method, Reading, Sensor, log
from green_callbacks.sensors.estimate import CPU_SCOPES, DEFAULT_CORE_W, CpuEstimateSensor
from green_callbacks.sensors.nvml import GpuSelection, NvmlSensor, NvmlUnavailable, load_nvml
from green_callbacks.sensors.rapl import POWERCAP_ROOT, RaplPermissionError, RaplSensor

__all__ = [
    "CPU_SCOPES", "DEFAULT_CORE_W", "AmdSmiSensor", "AmdSmiUnavailable", "CpuEstimateSensor", "GpuSelection",
    "Method", "NvmlSensor", "NvmlUnavailable", "RaplPermissionError", "RaplSensor", "Reading", "Sensor",
    "build_sensors", "load_nvml",
]


def build_sensors(
    gpus: GpuSelection | None = "auto",
    cuda_indices: Sequence[int] | None = None,
    measure_cpu: bool = True,
    cpu_tdp_w: float | None = None,
    rapl_root: Path | str = POWERCAP_ROOT,
    nvml: Any = None,
    cpu_scope: str = "process",
) -> list[Sensor]:
    """The best sensor for each component this process should measure.

    GPUs through NVML or amdsmi, whichever sees them (``gpus=None`` or an empty ``cuda_indices``
    with ``"auto"`` measures none); CPU and DRAM through RAPL when readable (the whole package),
    else CPU by an estimate of ``cpu_scope`` (``"process"``: this training's process tree; ``"machine"``). Every
    fallback is logged once with its reason; nothing here raises for missing hardware.
    """
    from green_callbacks.validation import check_gpus  # (validation imports this package)

    gpus = check_gpus(gpus)  # EnergyMonitor's rules: gpus=0 or [0.5] is refused by name, [] is no GPU
    sensors: list[Sensor] = []
    wants_gpu = gpus is not None and not (gpus == "auto" and cuda_indices is not None and not cuda_indices)
    if wants_gpu:
        sensor = build_gpu_sensor(gpus, cuda_indices, nvml=nvml)
        if sensor is not None:
            sensors.append(sensor)
    if measure_cpu:
        for component in ("cpu", "dram"):
            try:
                sensors.append(RaplSensor(component, rapl_root))
            except RaplPermissionError as exc:
                if component == "cpu":
                    log.warning("%s; CPU energy falls back to an estimate.", exc)
                    break
                log.warning("%s; CPU energy is measured by RAPL, DRAM's is not counted.", exc)
            except (OSError, ValueError) as exc:
                if not (isinstance(exc, FileNotFoundError) and str(exc).startswith("no RAPL")):  # (none: said nowhere)
                    log.warning("RAPL %s cannot be read (%s); %s", component, exc,
                                "CPU energy falls back to an estimate." if component == "cpu" else
                                "CPU energy is measured by RAPL, DRAM's is not counted.")
                if component == "dram":
                    continue
                break
        if not any(s.component == "cpu" for s in sensors):
            sensors.append(CpuEstimateSensor(cpu_tdp_w, cpu_scope))
    return sensors


def build_gpu_sensor(gpus: Any = "auto", cuda_indices: Any = None, nvml: Any = None) -> Sensor | None:
    """The sensor of the GPUs this process trains on: NVML for NVIDIA, amdsmi for AMD, else ``None``.

    AMD is asked first when torch is a ROCm build (its ``cuda`` devices are HIP devices), NVIDIA first
    otherwise. A library that is missing or sees no device is skipped silently under ``"auto"``; when
    GPUs were asked for by name and none is measurable, one warning gives each library's reason. A library
    that is there but fails listing its devices (a driver fault, no access to the device files) is that
    warning whatever ``gpus`` says, and the run goes on with what else it measures.
    """
    from green_callbacks.validation import check_gpus

    gpus = check_gpus(gpus)
    if gpus is None:
        return None
    torch = sys.modules.get("torch")
    rocm = torch is not None and bool(getattr(getattr(torch, "version", None), "hip", None))

    def nvidia() -> Sensor:
        return NvmlSensor(gpus, cuda_indices, nvml=nvml)

    def amd() -> Sensor:
        return AmdSmiSensor(gpus, cuda_indices)

    makers = [nvidia, amd]
    if rocm and nvml is None:
        makers.reverse()
    reasons, faults = [], []
    for make in makers:
        try:
            sensor = make()
        except (NvmlUnavailable, AmdSmiUnavailable) as exc:
            reasons.append(str(exc))
            continue
        except ValueError:  # a gpus setting this machine cannot meet (an index it does not have): before training
            raise
        except Exception as exc:  # the library is there and failed listing its devices: said whatever ``gpus``
            faults.append(f"{'amdsmi' if make is amd else 'NVML'} failed listing the GPUs ({exc!r})")
            continue
        if sensor.devices:
            return sensor
        sensor.close()
        reasons.append(f"{sensor.library} sees no GPU")
    if gpus != "auto" or faults:
        log.warning("GPU energy is 'unavailable': %s", "; ".join(faults + reasons))
    return None
