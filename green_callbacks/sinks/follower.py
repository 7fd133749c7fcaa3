"""The sender process: ``python -m green_callbacks.sinks [--next-from-stdin] SPOOL`` tails a spool beside the training.

It takes the spool's lock, sends at the header's cadence through a :class:`~green_callbacks.sinks.sender.Sender`,
waits for the training's ``close()`` at its end, and lingers ``linger_s`` after a training that is gone. With
``--next-from-stdin`` (how ``MlflowSink`` starts it), a spool done is followed by the next one its training process
hands it on its stdin (``sinks.launch.IdleSender``), MLflow still imported; it ends at the stdin's end of file.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from green_callbacks.sinks.files import lock, open_own
from green_callbacks.sinks.sender import Sender
from green_callbacks.sinks.spool import WAKE, log_path
from green_callbacks.sinks.target import ADOPTED
from green_callbacks.uris import without_credentials

POLL_S = 0.2


def _lower_priority() -> None:
    """Telemetry takes the CPU time training leaves free."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(AttributeError, OSError):
        os.nice(19)


def _write_to_log_once_orphaned(parent: int, spool: Path, cleaning: threading.Lock,
                                cleaned: threading.Event) -> None:
    """The sender inherits the training's stderr, often a pipe (``| tee``, a CI job, ``subprocess.run(...,
    capture_output=True)``) that ends only when every process holding it has closed it: while this one lingered
    (up to ``linger_s``), the user's command did not return. Once the training has gone, a thread moves this
    process's stdout and stderr to ``<spool>.log``, whatever the main loop is waiting on (a request). Not once the
    sender has cleaned up (``cleaned``, set under ``cleaning``): the log would stay behind, empty."""
    def watch() -> None:
        while os.getppid() == parent and not cleaned.is_set():
            time.sleep(0.1)
        with cleaning:
            if cleaned.is_set():
                return
            try:
                fd = open_own(log_path(spool), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            except OSError:
                fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)

    threading.Thread(target=watch, name="green-callbacks-orphaned", daemon=True).start()


def _pauser() -> Callable[[float], object]:
    """The pause between reads: ``POLL_S``, ended at once by the training's ``WAKE`` signal (someone waits for
    MLflow: a flush, the end) where the system can wait for a signal (Linux); a plain sleep elsewhere."""
    if WAKE is None or not hasattr(signal, "sigtimedwait"):
        return time.sleep
    signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE})  # held for sigtimedwait (threads started later inherit it)
    return lambda seconds: signal.sigtimedwait([WAKE], seconds)


def follow(spool: Path) -> int:
    """The sender process: tail ``spool`` until it is closed and sent, or given up on. 0: done (or another sender
    has it); 1: records are left unsent."""
    pause = _pauser()
    held = lock(spool)
    if held is None:
        return 0  # another sender (or a replay) has it
    try:
        return _follow(spool, pause)
    finally:
        held.close()  # the lock, for a replay (this process may follow another spool now)


def adopt(header: dict[str, object]) -> None:
    """MLflow's environment variables that say where records go, as the spool's training had them: a sender kept
    for its process's next training (``--next-from-stdin``) was started with the environment of an earlier one,
    which may have set another tracking URI (``mlflow.set_tracking_uri`` sets ``MLFLOW_TRACKING_URI``). The first
    spool's are the sender's own already (its user and password, if the URI held them, stay)."""
    for name, key in ADOPTED.items():
        value = header.get(key)
        if without_credentials(os.environ.get(name)) == value:
            continue
        if isinstance(value, str) and value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)


def _follow(spool: Path, pause: Callable[[float], object]) -> int:
    sender = Sender(spool)
    cwd = sender.header.get("cwd")
    if isinstance(cwd, str) and os.path.isdir(cwd):  # as its training (a sender kept idle followed another's)
        with contextlib.suppress(OSError):
            os.chdir(cwd)
    adopt(sender.header)
    # the training that wrote the header started this sender: if it died before this line ran, the parent is
    # already another process (init), and the training must count as gone from the start
    parent = sender.header.get("pid") if isinstance(sender.header.get("pid"), int) else os.getppid()
    cleaning, cleaned = threading.Lock(), threading.Event()

    def clean_up() -> int:
        """All done: the files go (not while the orphan thread moves the output to the log, which would stay)."""
        with cleaning:
            cleaned.set()
            sender.cleanup()
        return 0

    _write_to_log_once_orphaned(parent, spool, cleaning, cleaned)
    sender.save()  # with this process's pid, for replay's message
    cadence = float(sender.header.get("cadence_s", 5.0))
    linger = float(sender.header.get("linger_s", 60.0))
    first_send_at = sender.header["t_ms"] / 1000 + float(sender.header.get("first_send_s", 10.0))
    alone_since: float | None = None  # the training has closed after its wait, or is gone
    last_send = 0.0
    while True:
        gone = os.getppid() != parent
        sender.read(final=gone)
        if alone_since is None and (gone or sender.detached):
            # the linger runs from the training's close where it wrote one, not from when this loop saw it (after
            # a send in flight then, which the training's exit does not shorten)
            closed_ago = 0.0 if sender.detached_at is None else max(0.0, time.time() - sender.detached_at)
            alone_since = time.monotonic() - closed_ago
            sender.deadline = alone_since + linger
            sender.echo = lambda text: print(text, file=sys.stderr, flush=True)
        now = time.monotonic()
        # MLflow's start-up (seconds of CPU) waits until the training is under way, or over
        due = gone or sender.urgent or (time.time() >= first_send_at and now - last_send >= cadence)
        if (sender.pending or sender.deferred_due) and due:
            sender.send()
            last_send = now
        if (gone or sender.detached) and not sender.pending:  # on its own, and all sent: done (not lingering)
            sender.closed_until = sender.closed_until or time.time()
        if sender.finished and sender.state.blocked is None:
            if gone:
                sender.mark_vanished()
            sender.state.done = True
            sender.save()
            # the training's close() is waiting: it relays the last warnings and removes the files
            while spool.exists() and not (gone or sender.detached) and time.time() < sender.closed_until + 2.0:
                time.sleep(0.05)
                sender.read()
                gone = os.getppid() != parent
            return clean_up()
        if not sender.pending and not spool.exists():  # deleted under it (its folder removed): nothing to send
            return clean_up()
        if sender.state.blocked or (alone_since is not None and now - alone_since > linger):
            if alone_since is not None:  # while the training runs, its own close() says what is left, and how many
                print(f"green-callbacks: {sender.unsent} records could not be sent to MLflow at {sender.uri}; they are "
                      f"kept in {spool}. Send them with: green-callbacks replay {spool}", file=sys.stderr, flush=True)
            return 1
        pause(POLL_S)


_unread = bytearray()  # what was read from stdin past the last line taken


def next_spool(parent: int, stdin: int = 0) -> Path | None:
    """The next spool its training hands this idle sender (a JSON string on a line of ``stdin``); None at an empty
    line or the end of file (the training ended it: not to be kept, kept long enough, or the training exited), at
    anything else, or once the training has gone."""
    while b"\n" not in _unread:
        if os.getppid() != parent:
            return None
        if not select.select([stdin], [], [], 0.5)[0]:
            continue
        chunk = os.read(stdin, 4096)
        if not chunk:
            return None
        _unread.extend(chunk)
    line, _, rest = bytes(_unread).partition(b"\n")
    _unread[:] = rest
    try:
        path = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return Path(path) if isinstance(path, str) and path else None


def forget_stores() -> None:
    """MLflow keeps one SQLAlchemy engine per database URI for the life of its process, and its pooled connections
    keep writing to the store's file as it was opened: a store deleted since (a notebook's ``rm mlflow.db`` between
    two trainings) answered "attempt to write a readonly database", and a sweep with a store per trial in a
    temporary folder held every deleted file open (2 fds and 9 MiB a store). A sender kept for the next spool
    opens its store afresh."""
    registry = sys.modules.get("mlflow.tracking._tracking_service.registry")  # the store objects, by URI
    stores = getattr(getattr(registry, "TrackingStoreRegistry", None), "_get_store_with_resolved_uri", None)
    with contextlib.suppress(Exception):
        stores.cache_clear()  # type: ignore[union-attr]
    module = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")  # their engines, by database URI
    engines = getattr(getattr(module, "SqlAlchemyStore", None), "_engine_map", None)
    if isinstance(engines, dict):
        for engine in list(engines.values()):
            with contextlib.suppress(Exception):
                engine.dispose()
        engines.clear()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    more = bool(args) and args[0] == "--next-from-stdin"
    args = args[1:] if more else args
    if len(args) != 1:
        print("usage: python -m green_callbacks.sinks [--next-from-stdin] SPOOL", file=sys.stderr)
        return 2
    _lower_priority()
    parent = os.getppid()
    spool: Path | None = Path(args[0])
    while spool is not None:
        code = follow(spool)  # (a spool done: 0, and this process waits for the next one or its end of file)
        if code != 0:
            return code
        spool = next_spool(parent) if more else None
        if spool is not None:
            forget_stores()
            with contextlib.suppress(OSError):
                os.chdir(spool.parent)  # not the last training's folder, which may be gone by now
    return 0
