"""green-callbacks: the energy and carbon of training, measured, logged to MLflow, acted on.

``import green_callbacks`` stays light (no torch, lightning, transformers or mlflow); the
framework adapters live in ``green_callbacks.lightning`` and ``green_callbacks.transformers``;
``EnergyTracker`` (a plain PyTorch or Accelerate loop, see ``green_callbacks.loop``) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EnergyTracker": "green_callbacks.tracker",
    "EnergyMeter": "green_callbacks.meter",
    "Measurement": "green_callbacks.meter",
    "Method": "green_callbacks.sensors.base",
    "build_sensors": "green_callbacks.sensors",
    "Accountant": "green_callbacks.accounting",
    "CarbonIntensity": "green_callbacks.accounting",
    "resolve_intensity": "green_callbacks.accounting",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'green_callbacks' has no attribute {name!r}")
