"""Metric, param and tag names as MLflow accepts them: Lightning's ``MLFlowLogger`` rule.

Lightning's logger keeps ``[a-zA-Z0-9_/. -]`` and deletes every other character of a metric name
(``val_acc@1`` becomes ``val_acc1``). This package applies the same rule to every name it logs
(metrics, params and tags), so a quality metric keeps the same name in the trainer's logger and in
``efficiency/<metric>_per_kj``. A name that still breaks one of MLflow's other rules (longer than
250 characters, or one that resolves to another path such as ``a//b``) is set aside by the sender
with a warning; everything else is sent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("green_callbacks")

_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_/. -]+")  # lightning.pytorch.loggers.mlflow, log_metrics

# MLflow's per-request limits of log_batch, and of one key
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
MAX_KEY_LENGTH = 250


class Names:
    """Sanitises names, remembering each one: after its first use a name costs one dict lookup."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}
        self._raw: dict[str, str] = {}  # clean name -> the first name that became it

    def __call__(self, name: str) -> str:
        clean = self._known.get(name)
        if clean is None:
            clean = self._known[name] = sanitise(name)
            first = self._raw.setdefault(clean, name)
            if first != name:  # two names, one MLflow name: one series would silently overwrite the other
                log.warning("green-callbacks: %r and %r are both logged as %r once sanitised; at a step where "
                            "both are logged, MLflow keeps one of them. Rename one of the metrics.", first, name,
                            clean)
        return clean

    def metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        known = self._known
        try:  # every name seen before: the common case, one lookup each
            return {known[k]: float(v) for k, v in metrics.items()}
        except KeyError:
            return {self(k): float(v) for k, v in metrics.items()}

    def strings(self, values: Mapping[str, Any]) -> dict[str, str]:
        return {self(k): str(v) for k, v in values.items()}


def sanitise(name: str) -> str:
    """``name`` with the characters MLflow's Lightning logger deletes deleted (one warning per name)."""
    if not isinstance(name, str):
        raise ValueError(f"MLflow names are strings; got {name!r} ({type(name).__name__})")
    clean = _NOT_ALLOWED.sub("", name)
    if clean != name:
        log.warning("green-callbacks: MLflow allows only letters, digits and '_', '/', '.', '-', ' ' in names; "
                    "%r is logged as %r (the rule of Lightning's MLFlowLogger).", name, clean)
    return clean
