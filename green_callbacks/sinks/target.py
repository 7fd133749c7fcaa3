"""What a spool names: the run its records go to (``RunTarget``, then ``RunRef`` once known) and its header,
all a sender, or a replay days later, needs to find or create that run."""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from green_callbacks.sinks.spool import FORMAT
from green_callbacks.uris import without_credentials


@dataclass(frozen=True)
class RunTarget:
    """Where the records should go; resolved by the sender, off the training thread.

    Args:
        tracking_uri: MLflow tracking URI; ``None`` for MLflow's default as the training sees it.
        run_id: an existing run (a trainer's ``MLFlowLogger``, the active run, a resumed run).
        experiment_name: the experiment of a run this package opens (MLflow's default when ``None``).
        run_name: the name of a run this package opens.
        owned: this package opened (or opens) the run, so it sets the run's final status.
        local_id: names a run this package opens (its tag ``green.local_id``; the sink's own
            ``local_id`` when ``None``), so that a training resumed before the run existed in MLflow
            (its sender had not reached the server yet) continues that run instead of opening another.
    """

    tracking_uri: str | None = None
    run_id: str | None = None
    experiment_name: str | None = None
    run_name: str | None = None
    owned: bool = True
    local_id: str | None = None


@dataclass(frozen=True)
class RunRef:
    """The MLflow run records go to, and whether this package opened it (and so must close it)."""

    run_id: str
    tracking_uri: str
    owned: bool = False


def spool_header(target: RunTarget, local_id: str, cadence_s: float = 5.0, first_send_s: float = 10.0,
                 linger_s: float = 60.0) -> dict[str, Any]:
    """The spool's first record: all a sender (or a replay, days later) needs to find or create the run."""
    return {"format": FORMAT, "target": asdict(target), "local_id": local_id, "pid": os.getpid(),
            "host": socket.gethostname(), "cwd": os.getcwd(), "t_ms": int(time.time() * 1000),
            "env_tracking_uri": without_credentials(os.environ.get("MLFLOW_TRACKING_URI")),
            "env_experiment_name": os.environ.get("MLFLOW_EXPERIMENT_NAME"),
            "env_experiment_id": os.environ.get("MLFLOW_EXPERIMENT_ID"),
            "cadence_s": cadence_s, "first_send_s": first_send_s, "linger_s": linger_s}


def new_local_id() -> str:
    """Unique per sink: the time it was opened and 6 random hex digits (``20261123-081502-3fa9c1``)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


__all__ = ["RunRef", "RunTarget", "new_local_id", "spool_header"]
