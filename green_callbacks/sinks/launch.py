"""What ``MlflowSink`` sets up around itself: its spool file (with a fallback folder), its sender process, the
word to a sender whose sink was dropped, and the process's memory of tracking stores that did not answer."""

from __future__ import annotations

import contextlib
import json
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
from green_callbacks.sinks.target import ADOPTED

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
    """The sender of ``spool``: this process's idle one when it has one started with the same environment (see
    :class:`IdleSender`), else ``python -m green_callbacks.sinks --next-from-stdin SPOOL`` in its own session. A
    user:password reaches it through MLflow's environment variables (``credentials``), never a file. None, with
    one warning, where it cannot start."""
    env = {**os.environ, **SENDER_ENV, **credentials}
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds green_callbacks
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    kept = IDLE.take(env)
    if kept is not None and IDLE.hand(kept, spool):
        return kept
    try:
        proc = subprocess.Popen([sys.executable, "-m", "green_callbacks.sinks", NEXT_FROM_STDIN, str(spool)],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        log.warning("green-callbacks: cannot start its MLflow sender (%s); records are kept in %s. Send them "
                    "with: green-callbacks replay %s", exc, spool, spool)
        return None
    SENDERS.started(proc.pid)  # never charged to a training's CPU estimate (see cpu_power.Senders)
    _SENDER_ENV[proc.pid] = _key(env)
    reap_when_done(proc)  # reaped whenever it exits: at its idle end, or earlier
    return proc


NEXT_FROM_STDIN = "--next-from-stdin"  # the sender takes more spools from its stdin (follower.main)
IDLE_S = 30.0  # how long an idle sender waits for the next training of its process before it ends (0: not kept)
# what training frameworks set in their own process's environment as they run (pytest for each test, Lightning's
# seed_everything for each trial, the rank variables of a DDP launch, threads): no sender reads them, and a kept
# sender must not be refused for them. Any other difference (MLflow's settings, credentials, proxies, certificates,
# an artifact store's keys) starts a new sender.
_VOLATILE_PREFIXES = ("PYTEST_", "PL_", "LIGHTNING_", "TORCHELASTIC_", "TORCHINDUCTOR_", "TORCH_", "CUDA_", "NCCL_",
                      "OMP_", "MKL_", "KMP_", "TOKENIZERS_", "ACCELERATE_", "HYDRA_")
_VOLATILE = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
             "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE",
             # where the records go: each spool's header says (MLflow's set_tracking_uri() sets the first in the
             # environment, so a process that trains into one store after another changed it at every training),
             # and a kept sender takes them from the header of the spool it is handed (follower.adopt)
             *ADOPTED}
_SENDER_ENV: dict[int, tuple[tuple[str, str], ...]] = {}  # a sender's pid -> the environment it was started with


def _key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items()
                        if k not in _VOLATILE and not k.startswith(_VOLATILE_PREFIXES)))


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    """Still running (an exited one is left for its reaper to reap: its CPU seconds are counted there)."""
    if proc.returncode is not None:
        return False
    try:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return False
    except ChildProcessError:  # reaped already (its reaper holds the lock that poll() needs: poll() says None)
        return False
    except (OSError, AttributeError):  # no waitid: asked the slow way
        return proc.poll() is None
    try:  # killed, its threads still dying: already a zombie, not yet one waitid reports
        with open(f"/proc/{proc.pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X", b"x")
    except (OSError, IndexError):  # no /proc: waitid's word
        return True


class IdleSender:
    """This process's sender that finished its spool, kept ``IDLE_S`` for the process's next training.

    A sender costs seconds of CPU before it sends anything (MLflow's import, 80 % of it); a process that trains
    again (a sweep's next trial, a notebook's next ``fit``, a test suite) hands the next spool to the sender it
    has instead. Only one whose spool MLflow confirmed is kept (one still at an outage's spool stays at it, and
    ends when done), only for a sink with the same environment (MLflow's settings, credentials), and only in the
    process that started it. Once its spool is done it waits on its stdin, which this process alone writes: a
    spool's path hands it the next spool; an empty line or an end of file (not kept, kept long enough, or this
    process exited) ends it. It never ends by itself with code 0 otherwise, so a spool handed to it is never
    lost; one that crashed (any other code) is started again by the sink, as any sender that dies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0  # the pid of the process that kept it (a forked child has a copy, not the sender)
        self._timer: threading.Timer | None = None
        os.register_at_fork(after_in_child=self._forked)  # a lock held by another thread (the timer's) at a fork
        # stays held in the child, whose next training would wait on it for ever

    def _forked(self) -> None:
        self._lock = threading.Lock()

    def keep(self, proc: subprocess.Popen[bytes]) -> None:
        """``proc`` finished its spool (MLflow confirmed it): kept for ``IDLE_S``, then ended (at once where
        ``IDLE_S`` is 0: a sender for every training)."""
        if proc.stdin is None or not _alive(proc):
            return
        if IDLE_S <= 0:
            end_sender(proc)
            return
        timer = threading.Timer(IDLE_S, self._expire, args=(proc,))
        timer.daemon = True
        with self._lock:
            old, owner, self._proc, self._owner = self._proc, self._owner, proc, os.getpid()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = timer
        timer.start()
        if old is not None and old is not proc and owner == os.getpid():  # (a forked child's copy: not its own)
            end_sender(old)

    def holds(self) -> bool:
        """Whether this process has an idle sender kept."""
        with self._lock:
            return self._proc is not None and self._owner == os.getpid()

    def take(self, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """The idle sender, when it was started with ``env`` and still runs; else None (one that does not fit
        is ended)."""
        with self._lock:
            proc, owner, self._proc = self._proc, self._owner, None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if proc is None or owner != os.getpid():
            return None
        if _SENDER_ENV.get(proc.pid) != _key(env) or not _alive(proc):
            end_sender(proc)
            return None
        return proc

    @staticmethod
    def hand(proc: subprocess.Popen[bytes], spool: Path) -> bool:
        """Give ``spool`` to an idle sender; False (and it is ended) where it cannot take it."""
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(str(spool)).encode() + b"\n")
            proc.stdin.flush()
        except (OSError, ValueError):  # it died meanwhile (a broken pipe), or its stdin is closed
            end_sender(proc)
            return False
        return True

    def close(self) -> None:
        """End the idle sender now, if there is one (it exits once its stdin is closed)."""
        with self._lock:
            proc, owner, self._proc = self._proc, self._owner, None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if proc is not None and owner == os.getpid():
            end_sender(proc)

    def _expire(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if self._proc is not proc:
                return  # taken meanwhile
            self._proc, self._timer = None, None
        end_sender(proc)


IDLE = IdleSender()


class ParkedSinks:
    """This process's sinks parked for a next stage, everything confirmed (``MlflowSink.park``), whose sender a
    new sink of this process may take rather than start one (``MlflowSink.give_up_sender``).

    Thread-safe: a sweep's trials may train on threads of one process (Optuna's ``n_jobs``), one parking its
    sink as another's starts. A forked child's copy names its parent's sinks, and never hands them out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: weakref.WeakKeyDictionary[object, tuple[float, int]] = weakref.WeakKeyDictionary()
        os.register_at_fork(after_in_child=self._forked)  # (as IdleSender's)

    def _forked(self) -> None:
        self._lock = threading.Lock()

    def add(self, sink: object) -> None:
        with self._lock:
            self._sinks[sink] = (time.monotonic(), os.getpid())

    def discard(self, sink: object) -> bool:
        """No longer parked; whether it still was (not taken meanwhile)."""
        with self._lock:
            return self._sinks.pop(sink, None) is not None

    def take(self, other_than: object) -> object | None:
        """The sink of this process parked last (not ``other_than``), no longer parked; None if there is none."""
        pid = os.getpid()
        with self._lock:
            mine = [(at, sink) for sink, (at, by) in self._sinks.items() if by == pid and sink is not other_than]
            if not mine:
                return None
            sink = max(mine, key=lambda entry: entry[0])[1]
            del self._sinks[sink]
        return sink


PARKED = ParkedSinks()


def end_sender(proc: subprocess.Popen[bytes] | None) -> None:
    """Tell a sender to end once its spool is done: an empty line, then its stdin closed (its reaper reaps it when
    it exits). The line, not only the end of file: a child this process forked since (a DataLoader's workers, a
    multiprocessing pool) holds a copy of the pipe, and the end of file comes only once every copy is closed."""
    if proc is not None and proc.stdin is not None:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()


def release(proc: subprocess.Popen[bytes] | None, confirmed: bool) -> None:
    """A sink closed: its sender is kept idle for the next one when MLflow ``confirmed`` the spool, else told to
    end once done (it keeps at what is unsent, alone, for its linger)."""
    if proc is None:
        return
    if confirmed:
        IDLE.keep(proc)
    else:
        end_sender(proc)


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
    """A sender, from its start: waited for in a daemon thread, so it is reaped when it exits and Python does not
    warn "subprocess N is still running" (a ResourceWarning, shown by pytest) when its sink is collected; the
    thread never keeps the training's process alive."""
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
    _SENDER_ENV.pop(proc.pid, None)
    if proc.stdin is not None:  # its stdin's pipe, this side
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()


def abandon(writer: SpoolWriter, senders: list[subprocess.Popen[bytes]], parked: list[bool], pid: int) -> None:
    """A sink dropped without ``close``: tell its ``senders`` they are on their own, so they end when done; where
    it was ``parked`` (everything confirmed, kept for a next stage), its sender is kept for the next training. Only
    in the process ``pid`` that wrote it: a forked child's copy dropped there is its parent's, spool and senders."""
    if writer.closed or pid != os.getpid():
        return
    with contextlib.suppress(OSError, ValueError):
        writer.append("detach", {})
        writer.close()
    for proc in senders[:-1]:
        end_sender(proc)
    if senders:
        try:
            release(senders[-1], confirmed=parked[0])
        except RuntimeError:  # the interpreter's end: no thread for the idle timer
            end_sender(senders[-1])


def recently_unanswered(uri: str | None) -> bool:
    """An end waited for this store in vain less than ``UNANSWERED_S`` ago: do not wait for it again."""
    return time.monotonic() - _unanswered.get(uri, -UNANSWERED_S) < UNANSWERED_S


def remember(uri: str | None, answered: bool, in_vain: bool) -> None:
    """After an end's wait: a store that answered is forgotten; one waited for ``in_vain`` is remembered."""
    if answered:
        _unanswered.pop(uri, None)
    elif in_vain:
        _unanswered[uri] = time.monotonic()
