"""What ``MlflowSink`` hears from its sender: the spool's state file read when it changed (progress, what MLflow
refused, the sender's warnings), a sender that died started again, a sender woken for a wait, and the waits."""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from green_callbacks.sinks.spool import STARTUP_S, WAKE, SpoolWriter, State, state_path

log = logging.getLogger("green_callbacks")

MAX_RESTARTS = 3  # a sender that dies while training goes on is started again this many times at most


class SenderLink:
    """The sink's side of its sender: a base of :class:`~green_callbacks.sinks.mlflow.MlflowSink`, which writes
    the spool, starts the sender (``_start_sender``), and says its warnings once (``_warn_once``)."""

    _writer: SpoolWriter | None
    _proc: subprocess.Popen[bytes] | None
    _state: State
    _state_seen: tuple[int, int, int] | None
    _relayed: int
    _next_poll: float
    _sendable: list[int]
    _pid: int  # the process that writes the spool

    @property
    def forked_copy(self) -> bool:
        """Whether this is a forked child's copy of its parent's sink (a monitor used again in a fork-started
        pool): the spool, its sender and the sender's pipe are the parent's, written and ended by the parent only."""
        return os.getpid() != self._pid

    @property
    def spool_path(self) -> Path:
        return self._writer.path if self._writer is not None else Path()

    def _poll(self, force: bool = False) -> None:
        """Read the sender's state when it changed (at most every 0.5 s unless ``force``); relay its warnings."""
        now = time.monotonic()
        if self._writer is None or (not force and now < self._next_poll):
            return
        self._next_poll = now + 0.5
        self._restart_if_killed()
        try:
            st = os.stat(state_path(self._writer.path))
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)  # each save is a new file: a new inode
            if seen != self._state_seen:
                self._state = State.load(self._writer.path)
                self._state_seen = seen
        except (OSError, ValueError, TypeError):
            return  # not written yet, or replaced at this instant: the next poll reads it
        for text in self._state.notes[self._relayed:]:
            log.warning(text)
        self._relayed = len(self._state.notes)

    _restarts = 0
    _closing = False

    def _restart_if_killed(self) -> None:
        """A sender killed (or crashed) while training goes on is started again, at most ``MAX_RESTARTS`` times:
        the new one goes on from what the spool's state says was sent, so nothing is sent twice."""
        proc = self._proc
        if proc is None or self._closing or self._restarts >= MAX_RESTARTS or self.forked_copy \
                or proc.poll() in (None, 0):
            return
        if self._writer is None or not self._writer.path.exists():
            return
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._state = State.load(self._writer.path)  # its last word: blocked (the run deleted) is no crash
        if self._state.blocked:
            return
        self._restarts += 1
        log.warning("green-callbacks: its MLflow sender ended early (exit code %s) while training goes on; started "
                    "a new one (%d of at most %d), which goes on from what was sent", proc.returncode, self._restarts,
                    MAX_RESTARTS)
        self._proc = self._start_sender()

    def _wake(self) -> None:
        """Someone waits: the sender reads the spool now rather than after its pause (``WAKE``). A sender not
        reaped yet (``poll()`` is None) still holds its pid, so the signal cannot reach another process."""
        if WAKE is not None and self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self._proc.pid, WAKE)

    def _sender_gone(self) -> bool:
        if self._proc is None:
            return True
        code = self._proc.poll()
        if code is not None and code != 0 and not getattr(self._state, "blocked", None):  # (a block: said once)
            self._warn_once("sender", f"green-callbacks: its MLflow sender ended early (exit code {code}); "
                                      f"records are kept in {self.spool_path}.")
        return code is not None

    @property
    def unconfirmed(self) -> int:
        """Records MLflow has not confirmed yet (deferred artifacts included), as the sender last said."""
        self._poll(force=True)
        return self._unsent()

    def _unsent(self) -> int:
        """Records not yet confirmed: those after the sender's progress, and the artifacts it deferred."""
        deferred = self._state.deferred if isinstance(self._state.deferred, list) else []
        return len(self._sendable) - bisect.bisect_right(self._sendable, self._state.seq) + len(deferred)

    def _wait(self, timeout_s: float, done: Callable[[], bool]) -> bool:
        """Poll the sender until ``done()``. ``timeout_s`` counts from its first call to MLflow, so that
        its own start-up (imports, seconds on a busy machine) is not the server's time; the whole wait
        is capped at ``timeout_s + STARTUP_S``."""
        start = time.monotonic()
        pause = 0.005  # a warm sender answers in milliseconds (a local store): polled often at first, then less
        while True:
            self._poll(force=True)
            if done() or not self.spool_path.exists():  # only a sender that sent everything removes it
                return True
            if self._state.blocked or self._sender_gone():
                return False
            writer = self._writer
            if writer is not None and writer.unwritten and self._state.offset >= writer.offset:
                return False  # the spool's disk is full: what it could not write never reaches the sender (rescued)
            elapsed = time.monotonic() - start
            trying = self._state.trying_since
            waited = 0.0 if trying is None else min(elapsed, time.time() - trying)
            self._waited_s = waited
            if waited >= timeout_s or elapsed >= timeout_s + STARTUP_S or \
                    (self.deadline is not None and time.monotonic() >= self.deadline):
                return False
            time.sleep(pause)
            pause = min(0.05, pause * 1.5)

    _waited_s = 0.0  # the latest wait's time on MLflow (see _wait)
    _end_waited_s = 0.0  # what the end's flush waited, taken from close's default wait
    deadline: float | None = None  # (time.monotonic()) no wait goes past it, start-up or not: a SIGTERM's end
