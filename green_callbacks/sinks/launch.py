"""What ``MlflowSink`` sets up around itself: its spool file (with a fallback folder), its sender process, the
word to a sender whose sink was dropped, and the process's memory of tracking stores that did not answer."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from green_callbacks.sensors.cpu_power import SENDERS
from green_callbacks.sinks.pacing import SENDER_ENV
from green_callbacks.sinks.spool import SpoolWriter

log = logging.getLogger("green_callbacks")

# an end that waited in vain for a store is not waited again for a while in this process: HF's evaluate() in a
# loop, the server down, would otherwise wait mlflow_wait_s at every call (each sender still tries, in the back)
UNANSWERED_S = 60.0
_unanswered: dict[str | None, float] = {}  # tracking URI -> when an end last waited for it in vain


def open_spool(path: Path, write_failed: Callable[[OSError], None]) -> SpoolWriter | None:
    """The spool at ``path``, else under the temporary directory (one warning), else None (one warning)."""
    errors = []
    for folder in (path.parent, Path(tempfile.gettempdir()) / "green_callbacks"):
        try:
            writer = SpoolWriter(folder / path.name, write_failed)
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
            continue
        if errors:
            log.warning("green-callbacks: cannot write to %s (%s); the MLflow spool is %s instead.", path.parent,
                        errors[0], writer.path)
        return writer
    log.warning("green-callbacks: no folder for the MLflow spool can be written (%s); energy is measured "
                "but not logged to MLflow.", "; ".join(errors))
    return None


def start_sender(spool: Path, credentials: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """``python -m green_callbacks.sinks SPOOL`` in its own session; a user:password reaches it through MLflow's
    environment variables (``credentials``), never a file. None, with one warning, where it cannot start."""
    env = {**os.environ, **SENDER_ENV, **credentials}
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds green_callbacks
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "green_callbacks.sinks", str(spool)],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        log.warning("green-callbacks: cannot start its MLflow sender (%s); records are kept in %s. Send them "
                    "with: green-callbacks replay %s", exc, spool, spool)
        return None
    SENDERS.started(proc.pid)  # never charged to a training's CPU estimate (see cpu_power.Senders)
    return proc


def weakly(method: Callable[[OSError], None]) -> Callable[[OSError], None]:
    """A callback for the spool writer that holds its sink weakly: the writer outlives the sink (the sink's
    finalizer holds it), and a reference back would keep the sink from ever being collected."""
    ref = weakref.WeakMethod(method)

    def call(exc: OSError) -> None:
        bound = ref()
        if bound is not None:
            bound(exc)
    return call


def reap_when_done(proc: subprocess.Popen[bytes] | None) -> None:
    """A sender still running as its sink closes (it ends its own work, then exits): waited for in a daemon thread,
    so it is reaped when it exits and Python does not warn "subprocess N is still running" (a ResourceWarning,
    shown by pytest) when the sink is collected; the thread never keeps the training's process alive."""
    if proc is not None and proc.poll() is None:
        threading.Thread(target=_reap, args=(proc,), name="green-callbacks-sender-reaper", daemon=True).start()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the sender's exit, take its CPU seconds out of the training's estimate (read while it is a zombie,
    before the reaping adds them to this process's children's times), then reap it."""
    with contextlib.suppress(OSError, ValueError, AttributeError, IndexError):  # (no waitid or /proc: counted)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its times still readable
        with open(f"/proc/{proc.pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        # utime, stime, cutime, cstime: fields 14-17 of the file, 11-14 after the command's closing parenthesis
        SENDERS.exited(sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK"))
    proc.wait()
    SENDERS.reaped(proc.pid)


def abandon(writer: SpoolWriter) -> None:
    """A sink dropped without ``close``: tell its sender it is on its own, so it ends when done."""
    if not writer.closed:
        with contextlib.suppress(OSError, ValueError):
            writer.append("detach", {})
            writer.close()


def recently_unanswered(uri: str | None) -> bool:
    """An end waited for this store in vain less than ``UNANSWERED_S`` ago: do not wait for it again."""
    return time.monotonic() - _unanswered.get(uri, -UNANSWERED_S) < UNANSWERED_S


def remember(uri: str | None, answered: bool, in_vain: bool) -> None:
    """After an end's wait: a store that answered is forgotten; one waited for ``in_vain`` is remembered."""
    if answered:
        _unanswered.pop(uri, None)
    elif in_vain:
        _unanswered[uri] = time.monotonic()
