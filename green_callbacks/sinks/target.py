"""What a spool names: the run its records go to (``RunTarget``, then ``RunRef`` once known) and its header,
all a sender, or a replay days later, needs to find or create that run."""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
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


# the environment variables a spool's header records (as ``env_...``, credentials taken out), by the key it records each
# under: a sender kept for its process's next training takes them from the next spool (sinks.launch, sinks.follower)
ADOPTED = {"MLFLOW_TRACKING_URI": "env_tracking_uri", "MLFLOW_EXPERIMENT_NAME": "env_experiment_name",
           "MLFLOW_EXPERIMENT_ID": "env_experiment_id"}


def spool_header(target: RunTarget, local_id: str, cadence_s: float = 5.0, first_send_s: float = 10.0,
                 linger_s: float = 60.0) -> dict[str, Any]:
    """The spool's first record: all a sender (or a replay, days later) needs to find or create the run."""
    return {"format": FORMAT, "target": asdict(target), "local_id": local_id, "pid": os.getpid(),
            "host": socket.gethostname(), "cwd": os.getcwd(), "t_ms": int(time.time() * 1000),
            "env_tracking_uri": without_credentials(os.environ.get("MLFLOW_TRACKING_URI")),
            "env_experiment_name": os.environ.get("MLFLOW_EXPERIMENT_NAME"),
            "env_experiment_id": os.environ.get("MLFLOW_EXPERIMENT_ID"),
            "cadence_s": cadence_s, "first_send_s": first_send_s, "linger_s": linger_s, "context": run_context()}


# the tags MLflow gives a run it opens (its default and git run contexts), which a run this package opens gets too: the
# MLflow UI's Source and User columns showed "green-callbacks" and nothing, where the user's own runs show the script
CONTEXT_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")


def run_context() -> dict[str, str]:
    """This training's user, script and git commit, as MLflow tags them (read here: the sender is another program).
    Whatever fails (no user name for this uid, a deleted working directory, a link loop) is left out: never an
    error at the sink's opening."""
    out = {"mlflow.source.type": "LOCAL", "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else
           "<console>"}
    with contextlib.suppress(Exception):
        out["mlflow.user"] = getpass.getuser()
    with contextlib.suppress(Exception):
        commit = git_commit(Path(out["mlflow.source.name"]).absolute().parent)
        if commit:
            out["mlflow.source.git.commit"] = commit
    return out


def git_commit(folder: Path) -> str | None:
    """The commit checked out in the git work tree holding ``folder`` (a ``.git`` folder, or a worktree's or
    submodule's ``.git`` file), read from its files: no git program, no gitpython."""
    try:
        for here in (folder, *folder.parents):
            dot = here / ".git"
            if dot.is_file():
                dot = (here / dot.read_text().strip().removeprefix("gitdir:").strip()).resolve()
            if not dot.is_dir():
                continue
            head = (dot / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head if len(head) == 40 else None  # a detached HEAD
            ref = head.removeprefix("ref:").strip()
            common = (dot / (dot / "commondir").read_text().strip()).resolve() if (dot / "commondir").exists() \
                else dot
            for where in (dot, common):
                if (where / ref).is_file():
                    return (where / ref).read_text().strip()
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
            return None
    except (OSError, ValueError):
        return None
    return None


def context_tags(header: Mapping[str, Any]) -> dict[str, str]:
    """A spool header's run context as tags: MLflow's names only, short printable text (a forged spool's header
    sets nothing else through it)."""
    context = header.get("context")
    if not isinstance(context, Mapping):
        return {}
    return {k: v for k, v in context.items() if k in CONTEXT_TAGS and isinstance(v, str) and 0 < len(v) <= 500
            and v.isprintable()}


def new_local_id() -> str:
    """Unique per sink: the time it was opened and 6 random hex digits (``20261123-081502-3fa9c1``)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


__all__ = ["RunRef", "RunTarget", "context_tags", "new_local_id", "run_context", "spool_header"]
