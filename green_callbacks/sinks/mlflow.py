"""``MlflowSink``: the training's side of the MLflow path. It writes the spool and never waits on MLflow.

Each call appends its record to the spool and returns (tens of microseconds, no network, no MLflow
import); a sender process started here does all MLflow work, from finding or creating the run to
setting its final status. ``close`` waits a short, configurable time for the sender to confirm,
and otherwise leaves it to finish (or ``green-callbacks replay`` later).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import weakref
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from green_callbacks.sinks.launch import (
    IDLE,
    PARKED,
    abandon,
    open_spool,
    recently_unanswered,
    release,
    remember,
    start_sender,
    weakly,
)
from green_callbacks.sinks.link import SenderLink
from green_callbacks.sinks.names import Names
from green_callbacks.sinks.spool import SENDABLE, State, state_path
from green_callbacks.sinks.target import RunRef, RunTarget, new_local_id, spool_header
from green_callbacks.uris import split_credentials

log = logging.getLogger("green_callbacks")

STATUSES = ("FINISHED", "FAILED", "KILLED")


class MlflowSink(SenderLink):
    """Logs to one MLflow run through a spool (write-ahead log) and a sender process.

    Args:
        target: which run (see :class:`RunTarget`).
        output_dir: folder of the spool ``spool-<local_id>.jsonl``; when it cannot be written, the
            spool goes to the temporary directory instead (one warning).
        close_wait_s: how long ``close`` waits for MLflow to confirm everything (default 10 s).
        cadence_s: the sender coalesces records and sends at most once per ``cadence_s``
            (an artifact, the status, ``flush`` and the end are sent at once).
        first_send_s: the sender starts MLflow (seconds of CPU: imports, the store) and finds or
            creates the run this long after the sink opened, or at once when the training ends,
            flushes or dies: a short training never shares its CPU with MLflow's start-up.
        linger_s: how long the sender keeps trying after the training stopped waiting for it
            (``close`` timed out, or the process was killed) before leaving the rest to replay.
        take_parked: where no sender is idle, take the one of another sink of this process parked for a next stage
            (see ``give_up_sender``) rather than start one.
    """

    def __init__(self, target: RunTarget, output_dir: str | Path, *, close_wait_s: float = 10.0,
                 cadence_s: float = 5.0, first_send_s: float = 10.0, linger_s: float = 60.0,
                 take_parked: bool = True) -> None:
        if not isinstance(target, RunTarget):
            raise ValueError(f"target={target!r} must be a green_callbacks.sinks.RunTarget")
        for name, value in (("close_wait_s", close_wait_s), ("cadence_s", cadence_s), ("first_send_s", first_send_s),
                            ("linger_s", linger_s)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 86400:
                raise ValueError(f"{name}={value!r} must be a number of seconds in [0, 86400)")
        self.target = target
        self.take_parked = bool(take_parked)
        self.close_wait_s = float(close_wait_s)
        self.linger_s = float(linger_s)
        self.local_id = new_local_id()
        self._names = Names()
        self._warned: set[str] = set()
        self._state = State()
        self._state_seen: tuple[int, int, int] | None = None  # inode, mtime, size of the state last read
        self._relayed = 0
        self._next_poll = 0.0
        self._sendable: list[int] = []  # seq of every record meant for MLflow
        self._closed: bool | None = None  # close()'s answer once closed
        mlflow = sys.modules.get("mlflow")  # the user's process already has it: its URI costs nothing
        uri = target.tracking_uri or (mlflow.get_tracking_uri() if mlflow is not None else None)
        # a user:password in the URI reaches the sender through MLflow's env variables, never a file
        uri, self._credentials = split_credentials(uri or os.environ.get("MLFLOW_TRACKING_URI"))
        uri = uri if target.tracking_uri or mlflow is not None else None
        self._run_ref = RunRef(target.run_id, uri, target.owned) if target.run_id and uri else None
        self._uri = uri
        self._writer = open_spool(Path(output_dir).absolute() / f"spool-{self.local_id}.jsonl",
                                  weakly(self._write_failed))  # in the output folder: the sender and replay see it
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = os.getpid()  # the process writing its spool (a forked child's copy: see forked_copy)
        if self._writer is None:
            return
        self._writer.append("open", spool_header(RunTarget(**{**asdict(target), "tracking_uri": uri}), self.local_id,
                                                 float(cadence_s), float(first_send_s), self.linger_s))
        self._senders: list[subprocess.Popen[bytes]] = []  # every sender it started or was handed (restarts)
        self._parked = [False]  # kept for a next stage, everything confirmed (see park): shared with the finalizer
        self._proc = self._start_sender()
        weakref.finalize(self, abandon, self._writer, self._senders, self._parked, self._pid)

    # -- setting up ------------------------------------------------------------------------------
    def _start_sender(self) -> subprocess.Popen[bytes] | None:
        assert self._writer is not None
        if self.take_parked and not IDLE.holds():
            # none idle: the sender of another monitor's sink parked for a stage that may never come (this process's
            # own: a forked child's copy of the list names the parent's sinks, whose spools it must not end)
            parked = PARKED.take(self)
            if isinstance(parked, MlflowSink):
                parked.give_up_sender()
        proc = start_sender(self._writer.path, self._credentials)
        if proc is not None:
            self._senders.append(proc)
        return proc

    def park(self) -> None:
        """Kept open, idle, for a next stage, MLflow having confirmed everything so far: dropped without a close
        later (its monitor collected), its sender is kept for this process's next training, as at a close."""
        self._parked[0] = True
        PARKED.add(self)

    gave_up = False  # it gave its sender, or another sink took it to be given (see give_up_sender): that sink ends it

    def give_up_sender(self) -> None:
        """A sink parked (everything confirmed) gives its sender to a new sink of this process, which would start
        one otherwise: a sweep's next trial, with a monitor of its own, while the last trial's monitor kept its sink
        for a ``test()``/``evaluate()`` that never came (each trial paid a sender's start-up, MLflow's import: 3.5 s
        at a short trial's end). Closed as its finalizer would close it; a later stage of its monitor opens a
        new sink."""
        PARKED.discard(self)
        if self._parked[0] and self._closed is None and self._writer is not None:
            abandon(self._writer, self._senders, self._parked, self._pid)
            self._closed, self.gave_up = True, True

    def _write_failed(self, exc: OSError) -> None:
        self._warn_once("write", f"green-callbacks cannot append to its MLflow spool {self.spool_path} ({exc}); "
                                 "records are kept in memory and written when it can be.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # -- what the tracker calls ------------------------------------------------------------------
    @property
    def blocked(self) -> str | None:
        """Why nothing more is being sent (the run deleted, a refusal of the run itself, no sender left), or None."""
        if self._state.blocked:
            return self._state.blocked
        code = self._proc.poll() if self._proc is not None else None
        if self._writer is not None and self._writer.path.exists() and (self._proc is None or code not in (None, 0)):
            return "no sender is running" + (f" (it ended with exit code {code})" if code is not None else "")
        return None

    @property
    def sender_pid(self) -> int | None:
        """The sender process (None when it could not start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def run_ref(self) -> RunRef | None:
        """The run, once known: at once when the target names it, else when the sender has opened it."""
        if self._run_ref is None:
            self._poll()
            s = self._state
            if s.run_id and s.tracking_uri:
                self._run_ref = RunRef(s.run_id, s.tracking_uri, s.owned)
        return self._run_ref

    def continues(self, target: RunTarget) -> bool:
        """Whether this sink, kept open after a stage that MLflow confirmed, takes a later stage's records for
        ``target``: the same run, sending still; its sender is then warm (no start-up, no wait for one)."""
        if self.forked_copy:
            return False
        run = self.run_ref
        if (self._closed is not None or self.blocked or run is None or target.run_id != run.run_id
                or target.owned != run.owned or target.tracking_uri not in (None, run.tracking_uri)
                or self.unconfirmed > 0):
            return False
        # in use again (for a run it does not own, it writes nothing until the stage's end), unless a new sink on
        # another thread took it from the parked ones just now: that sink ends it, giving its sender up
        if not PARKED.discard(self) and self._parked[0]:
            self.gave_up = True
            return False
        self._end_waited_s = 0.0
        if self.target.owned:  # the run goes on: RUNNING again (a kill from here on is marked KILLED), as a new
            self._append("status", {"status": "RUNNING"})  # sender's opening of the run would set it
        return True

    def _append(self, kind: str, data: dict[str, Any], step: int | None = None) -> None:
        if self._writer is None or self._closed is not None or self.forked_copy:
            return
        seq = self._writer.append(kind, data, step)
        if self._parked[0]:  # something new to confirm
            self._parked[0] = False
            PARKED.discard(self)
        if kind in SENDABLE:
            self._sendable.append(seq)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one step's metrics to the spool (on disk before this returns)."""
        self._append("metrics", self._names.metrics(metrics), int(step))

    def hold_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics the training means to log with its next record (a checkpoint's point, before the same step's
        evaluation): on disk now, sent by the sender only if the training ends without a later metrics record
        (killed), which otherwise carries them."""
        self._append("held", self._names.metrics(metrics), int(step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._append("params", self._names.strings(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._append("tags", self._names.strings(tags))

    def log_artifact(self, path: str | Path, artifact_path: str | None = "green_callbacks") -> None:
        self._append("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_status(self, status: str, end_ms: int | None = None) -> None:
        """The run's final status; only for a run this package owns. ``end_ms``: when the training ended (the
        status is written after the end's wait for MLflow; a replay sends it later still)."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r} is not an MLflow final status; choose from {list(STATUSES)}")
        if self.target.owned:
            self._append("status", {"status": status, **({"end_ms": int(end_ms)} if end_ms is not None else {})})

    def interval_end(self) -> None:
        """The interval's records are written: make them durable (off this thread) and hear from the sender."""
        if self._writer is not None and self._closed is None:
            self._writer.sync()
            self._poll()

    def flush(self, timeout_s: float = 10.0, ending: bool = False) -> bool:
        """Wait until MLflow confirmed everything logged so far (``timeout_s`` as in ``close``). ``ending``: the
        first wait of the run's end, whose time ``close`` then deducts from its own (one wait for the whole end)."""
        if self._writer is None or self._closed is not None or self.forked_copy:
            return self._closed is True
        writer = self._writer
        self._append("flush", {})  # the sender sends now instead of at its next cadence
        self._wake()
        self._waited_s = 0.0
        if ending and recently_unanswered(self._uri):
            timeout_s = 0.0
        done = self._wait(timeout_s, lambda: self._state.offset >= writer.offset and not writer.unwritten)
        if ending:
            self._end_waited_s = self._waited_s
            self._remember(done, timeout_s > 0)
        return done

    def _remember(self, answered: bool, waited: bool) -> None:
        # in vain: it waited for MLflow (not for a refusal, nor for a sender that died)
        remember(self._uri, answered, waited and not self._state.blocked and not self._sender_gone())

    def close(self, timeout_s: float | None = None) -> bool:
        """End the spool; wait ``timeout_s`` (default ``close_wait_s``; counted from the sender's first call
        to MLflow, at most ``STARTUP_S`` more for its start-up) for MLflow to have it all.

        Returns True when everything was confirmed (the spool is then removed). Otherwise the
        sender keeps trying for its linger time, the spool keeps what is unsent, and one warning
        gives the command that sends it later.
        """
        if self._closed is not None:
            return self._closed
        if self.forked_copy:  # the parent's (a forked child's monitor opening a sink of its own): left to it
            self._closed = False
            return False
        PARKED.discard(self)
        self._closing = True
        writer = self._writer
        if writer is None:
            self._closed = False
            return False
        wait = max(0.0, self.close_wait_s - self._end_waited_s) if timeout_s is None else float(timeout_s)
        if recently_unanswered(self._uri):
            wait = 0.0
        writer.append("close", {"wait_s": wait})
        writer.sync()
        self._wake()
        interrupted: BaseException | None = None
        try:
            done = self._wait(wait, lambda: self._state.done)
        except (KeyboardInterrupt, SystemExit) as exc:  # a Ctrl-C or SIGTERM ends the wait: the rest, then it
            done, interrupted = False, exc
        self._remember(done, wait > 0)
        if not done:
            writer.append("detach", {})  # the sender is on its own from here: it removes the files when done
            self._poll(force=True)
            # (a sender gone after MLflow confirmed everything, an idle one killed say: nothing is left to send)
            done = self._state.done or not writer.path.exists() or (self._sender_gone() and self.unconfirmed == 0)
        writer.close()
        done = done and not writer.unwritten
        if done:
            for path in (writer.path, state_path(writer.path)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        else:
            uri = self._run_ref.tracking_uri if self._run_ref else self._state.tracking_uri or self._uri or \
                "its tracking URI"
            rescued = writer.rescue() if writer.unwritten else None
            lost = "" if not writer.unwritten else (
                f"; {writer.unwritten} could not be written to it (is the disk full?) and are lost" if rescued is None
                else f"; {writer.unwritten} could not be written to it (is the disk full?): the whole spool, they "
                     f"included, is copied to {rescued}")
            blocked = getattr(self._state, "blocked", None)
            said = blocked and any(blocked in text for text in self._state.notes[:self._relayed])
            trying = ("; its sender stopped: MLflow refused them (the warning above says why)" if said else
                      f"; its sender stopped: {blocked}" if blocked else
                      f"; its sender keeps trying for up to {self.linger_s:g} s" if not self._sender_gone() else "")
            if self.close_wait_s == 0 and not blocked and not writer.unwritten and not self._sender_gone() and \
                    not self._state.notes and not recently_unanswered(self._uri):
                # mlflow_wait_s=0: not waiting was the user's choice, and the sender is at it with no trouble said so
                # far: no alarm at every end (a store that failed to answer, or a sender's warning, still warns)
                log.info("green-callbacks: mlflow_wait_s=0: the end did not wait for MLflow at %s; its sender sends "
                         "the %d records kept in %s in the background (for up to %g s; else: green-callbacks replay "
                         "%s)", uri, self._unsent(), writer.path, self.linger_s, writer.path)
            else:
                log.warning("green-callbacks: %d records are not yet confirmed by MLflow at %s; they are kept in "
                            "%s%s%s. Send them with: green-callbacks replay %s", self._unsent(), uri, writer.path,
                            lost, trying, rescued or writer.path)
        self._closed = done
        # (kept only where the sender said it is done: a spool deleted under it leaves it following that spool)
        release(self._proc, confirmed=done and bool(self._state.done))
        if interrupted is not None:
            raise interrupted
        return done

