"""Where records go: an MLflow run, through a spool that loses nothing and a sender that never blocks training.

- ``MlflowSink`` (training side): appends each record to the spool and returns; no network, no MLflow import.
- the sender (``python -m green_callbacks.sinks``): finds or creates the run and sends, in its own process.
- ``replay_spool`` / ``green-callbacks replay``: sends what a spool still holds, later, exactly once.
- ``names``: the naming rule (Lightning's ``MLFlowLogger``'s) every metric, param and tag name follows.
"""

from __future__ import annotations

from green_callbacks.sinks.mlflow import MlflowSink, RunRef, RunTarget
from green_callbacks.sinks.replay import ReplayResult, SpoolBusy, replay_spool
from green_callbacks.sinks.spool import Record, SpoolContents, read_spool

__all__ = ["MlflowSink", "Record", "ReplayResult", "RunRef", "RunTarget", "SpoolBusy", "SpoolContents",
           "read_spool", "replay_spool"]
