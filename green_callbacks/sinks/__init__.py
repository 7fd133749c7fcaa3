"""Where records go: an MLflow run, through a spool that loses nothing and a sender that never blocks training.

- ``MlflowSink`` (training side): appends each record to the spool and returns; no network, no MLflow import.
- ``target``: the run a spool's records go to (``RunTarget``, ``RunRef``) and the spool's header.
- the sender (``python -m green_callbacks.sinks``): finds or creates the run and sends, in its own process.
- ``replay_spool`` / ``green-callbacks replay``: sends what a spool still holds, later, exactly once.
- ``names``: the naming rule (Lightning's ``MLFlowLogger``'s) every metric, param and tag name follows.

The names below load on first use, so the sender process imports only what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from green_callbacks.sinks.mlflow import MlflowSink  # noqa: F401
    from green_callbacks.sinks.replay import ReplayResult, SpoolBusy, replay_spool  # noqa: F401
    from green_callbacks.sinks.spool import Record, SpoolContents, read_spool  # noqa: F401
    from green_callbacks.sinks.target import RunRef, RunTarget  # noqa: F401

_LAZY = {
    "MlflowSink": "green_callbacks.sinks.mlflow",
    "RunRef": "green_callbacks.sinks.target",
    "RunTarget": "green_callbacks.sinks.target",
    "ReplayResult": "green_callbacks.sinks.replay",
    "SpoolBusy": "green_callbacks.sinks.replay",
    "replay_spool": "green_callbacks.sinks.replay",
    "Record": "green_callbacks.sinks.spool",
    "SpoolContents": "green_callbacks.sinks.spool",
    "read_spool": "green_callbacks.sinks.spool",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'green_callbacks.sinks' has no attribute {name!r}")
