"""The sender: reads a spool in order and sends it to MLflow, in its own process (``sinks/follower.py``), at its pace.

``MlflowSink`` starts ``python -m green_callbacks.sinks SPOOL`` beside the training, at idle
CPU priority and with short MLflow HTTP timeouts in its own environment (``SENDER_ENV``). Its
first contact comes ``first_send_s`` after the training started (at once when the training ends,
flushes or dies); what arrived is then coalesced into ``log_batch`` calls once per cadence (an
artifact, the status and the end are sent at once). Its progress is kept
in the state file, so that nothing is sent twice by it, by a later sender or by
``green-callbacks replay``. MLflow's own refusal of a record's content (a 4xx with
MLflow's error, such as INVALID_PARAMETER_VALUE) costs only the refused metric, param or tag; an
outage (a gateway's 404 or 5xx included), a retry with backoff; a refusal of the credentials
(401/403), the run's sending, kept for a replay. An artifact the artifact store does not take never
holds back the run's metrics or status: refused (a 4xx such as 413), it is set aside; failing (a
5xx, unreachable), it is tried again later and kept for a replay. It ends when the spool is closed
and all is sent; when the training has gone (closed after a timeout, or killed) it keeps trying
for ``linger_s`` and then leaves what is unsent for ``replay``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from green_callbacks.sinks.batches import BATCH_KINDS, BatchSending
from green_callbacks.sinks.pacing import BACKOFF_S, RENOTE_S, Pacing
from green_callbacks.sinks.spool import (
    SENDABLE,
    STARTUP_S,
    Record,
    State,
    Unreadable,
    log_path,
    rejected_path,
    scan,
    set_aside,
    state_path,
)
from green_callbacks.sinks.tracking import Blocked, RunClient, resolve_uri
from green_callbacks.sinks.verdicts import (
    ArtifactFailed,
    access_refused,
    describe,
    permanent,
)
from green_callbacks.uris import temporary_env

URGENT = ("artifact", "status", "flush", "close", "detach")  # the end of a run, or someone waiting: send now


class Sender(BatchSending, Pacing):
    """Sends one spool's records to its run in order; ``send`` stops at the first outage."""

    def __init__(self, spool: Path, tracking_uri: str | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        try:
            self.state = State.load(spool)
            damaged = None
        except ValueError as exc:  # progress unknown: everything again (MLflow keeps one copy of identical values)
            self.state, damaged = State(), str(exc)
        self.state.pid = os.getpid()
        # artifacts deferred lie before the progress: a line beyond it is read in its turn (or is none at all)
        deferred = self.state.deferred if isinstance(self.state.deferred, list) else []
        self.state.deferred = [n for n in deferred if isinstance(n, int) and not isinstance(n, bool)
                               and 0 < n <= self.state.line]
        self._requeued = False  # the artifacts an earlier sender deferred are queued at the first read
        self.deferred_retry_at = 0.0  # when the deferred artifacts are tried again
        self._deferred_failures = 0
        self._unsaved = False  # the state could not be written (said once)
        self.override = tracking_uri
        self.echo = echo
        first = next(scan(spool), None)
        if not isinstance(first, Record) or first.kind != "open":
            raise ValueError(f"{spool} does not start with a green-callbacks spool header")
        self.header: dict[str, Any] = first.data
        self.pending: list[Record | Unreadable] = []
        self.read_to = (self.state.offset, self.state.line)
        self.client: RunClient | None = None
        self.down_since: float | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.closed_until: float | None = None  # when the training's close() stops waiting
        self.detached = False
        self.detached_at: float | None = None  # (time.time) when the training wrote that it stopped waiting
        self.ended = False  # the training recorded its end (a status, its close or its detach)
        self.refused: set[tuple[str, str]] = set()  # (kind, key) MLflow refused once: from then on sent alone
        self.final = False  # the spool is read to its end: its training writes no more
        self._noted: dict[str, float] = {}  # note key -> when it was last given
        self._announced_down = False  # an outage was announced, and no recovery since
        self._asides: list[tuple[int, str, str, Any]] = []  # (line, reason, kind, entity) of the batch being sent
        self._again: list[tuple[int, str, Any]] = []  # (line, kind, entity) of a name refused before, sent alone
        self._damaged = damaged  # said at the first send
        self.timeout_s: int | None = None  # the HTTP timeout after a request timed out; None: the environment's
        self.deadline: float | None = None  # (monotonic) no request starts after it, none waits past it: the linger

    # -- reading -------------------------------------------------------------------------------
    def read(self, final: bool = False) -> None:
        """Take the lines appended since the last read (a torn last line only when ``final``)."""
        self.final = self.final or final
        if not self._requeued:
            self._requeued = True
            self.requeue()
        with contextlib.suppress(FileNotFoundError):  # removed by the training's close() once all was sent
            for item in scan(self.spool, *self.read_to, final=final):
                self._take(item)
                self.read_to = (item.end, item.line)
                if isinstance(item, Record) and item.kind == "detach":
                    self.detached = True  # the training stopped waiting: from now on the sender is alone
                    self.detached_at = item.t_ms / 1000  # (wall clock) read maybe long after: a send held it
                if isinstance(item, Record) and item.kind in ("status", "close", "detach"):
                    # (a run that goes on again, a later stage into it with this sender: not ended any more)
                    self.ended = not (item.kind == "status" and item.data.get("status") == "RUNNING")

    def _take(self, item: Record | Unreadable) -> None:
        """A record read from the spool, queued to be sent."""
        self.pending.append(item)

    def requeue(self) -> None:
        """The artifacts the artifact store failed to take, read again from the spool and queued behind what is
        pending (a line that is no artifact, in a damaged or forged state, is dropped from the list)."""
        lines = set(self.state.deferred) - {i.line for i in self.pending}
        if not lines:
            return
        found: set[int] = set()
        with contextlib.suppress(FileNotFoundError):
            for item in scan(self.spool):
                if item.line in lines and isinstance(item, Record) and item.kind == "artifact":
                    found.add(item.line)
                    self._take(item)
                if item.line >= max(lines):
                    break
        self.state.deferred = [n for n in self.state.deferred if n in found or n not in lines]

    @property
    def unsent(self) -> int:
        """Records not sent yet: pending ones, and the artifacts deferred (not pending again)."""
        pending = [i for i in self.pending if isinstance(i, Record) and i.kind in SENDABLE]
        return len(pending) + len(set(self.state.deferred) - {i.line for i in pending})

    def mark_vanished(self) -> None:
        """Everything is sent, and the training is gone without recording its end (kill -9, the OOM killer): a
        run this package opened is marked ``KILLED`` rather than left ``RUNNING`` for ever."""
        if self.ended or not self.state.owned or self.state.run_id is None:
            return
        try:  # only a run still RUNNING: a training resumed into it since may have ended it already
            self._open()  # (a replay, or a sender started again, with nothing left to send has no client yet)
            if self.client.status() == "RUNNING":
                self.client.set_status("KILLED")
        except Exception as exc:
            self.note("killed", f"green-callbacks: the training is gone; its run could not be marked KILLED "
                                f"({describe(exc)}).")

    @property
    def urgent(self) -> bool:
        return any(isinstance(i, Record) and i.kind in URGENT for i in self.pending)

    @property
    def finished(self) -> bool:
        return self.closed_until is not None and not self.pending and not self.state.deferred

    @property
    def deferred_due(self) -> bool:
        """Deferred artifacts wait to be tried again, and their time has come."""
        return bool(self.state.deferred) and time.monotonic() >= self.deferred_retry_at

    # -- notes ---------------------------------------------------------------------------------
    def note(self, key: str, text: str, again_after_s: float | None = None) -> bool:
        """One warning per ``key`` (or one per ``again_after_s``): kept in the state (the training relays it) and
        echoed when alone. Whether it was given now."""
        last = self._noted.get(key)
        if last is not None and (again_after_s is None or time.monotonic() - last < again_after_s):
            return False
        self._noted[key] = time.monotonic()
        self.state.notes.append(text)
        self.save()
        if self.echo is not None:
            self.echo(text)
        return True

    def save(self) -> None:
        """The state, saved; where it cannot be (a read-only folder, a full disk) sending goes on, with one word."""
        if not self.state.save(self.spool) and not self._unsaved:
            self._unsaved = True
            print(f"green-callbacks: the MLflow sender cannot write {state_path(self.spool)} (a read-only folder, or "
                  "a full disk); it goes on sending, and a replay later may send again what it sent since (MLflow "
                  "keeps one copy of each identical value).", file=sys.stderr, flush=True)

    # -- sending -------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self.override or self.state.tracking_uri or resolve_uri(self.header)

    def send(self) -> bool:
        """Send everything pending; False when MLflow was unreachable (retried after a backoff) or blocked, or an
        artifact waits for the artifact store."""
        if self._damaged:
            self.note("damaged", f"green-callbacks: {self._damaged}; {self.spool} is sent again from its start "
                                 "(MLflow keeps one copy of each identical value).")
            self._damaged = None
        if self.deferred_due and not self.state.blocked and time.monotonic() >= self.retry_at:
            self.requeue()
        if not self.pending or self.state.blocked or time.monotonic() < self.retry_at:
            return not self.pending and not self.state.deferred
        try:
            if self._past_deadline():
                return False
            with temporary_env(self._request_env()):
                self._open()
            while self.pending and not self._past_deadline():
                with temporary_env(self._request_env()):
                    if self._send_next() is False:
                        break
        except Exception as exc:
            # refusals of single records were handled below; a refusal of the credentials is the whole run's
            if isinstance(exc, Blocked) or permanent(exc) or access_refused(exc):
                self.state.blocked = str(exc) if isinstance(exc, Blocked) else f"MLflow at {self.uri}: {describe(exc)}"
                self.note("blocked", f"green-callbacks: nothing more can be sent: {self.state.blocked}; the records "
                                     f"stay in {self.spool}.")
                return False
            self._down(exc)
            return False
        self.failures, self.timeout_s = 0, None
        if not self.pending:  # (a held record may wait for what the training writes next: no outage, not yet back)
            if self.down_since is not None and self._announced_down:
                self._announced_down = False
                self.note("back", f"green-callbacks: MLflow at {self.uri} is back; the spooled records were sent.",
                          again_after_s=RENOTE_S)
            self.down_since = None
        return not self.pending and not self.state.deferred

    def _open(self) -> None:
        if self.client is not None and self.client.run_id is not None:
            return
        if self.state.trying_since is None:  # before the client: opening a local store can itself take long
            self.state.trying_since = time.time()
            self.state.tracking_uri = self.state.tracking_uri or self.uri  # for the training's messages
            self.save()
        self.client = self.client or RunClient(self.uri)
        if self.state.run_id is not None:
            self.client.run_id = self.state.run_id
            if self.override:  # replay --tracking-uri: the store it really sends to
                self.state.tracking_uri = self.client.uri
            return
        self.state.tracking_uri = self.client.uri
        self.state.run_id, self.state.owned = self.client.open(self.header)
        self.save()

    def _send_next(self) -> bool | None:
        """Send the head of the queue; False: it waits for what the training writes next."""
        assert self.client is not None
        item = self.pending[0]
        if isinstance(item, Unreadable):
            self._set_aside(item.line, "unreadable line (torn by a crash mid-write, or damaged)", item.text,
                            f"line {item.line} of {self.spool} cannot be read", refused=False)
            return self._done([item])
        if item.kind == "held":  # a checkpoint's point: the training's next metrics record carries it
            if any(isinstance(i, Record) and i.kind == "metrics" and i.step == item.step
                   and item.data.keys() <= i.data.keys() for i in self.pending[1:]):
                return self._done([item])  # the training logged it (a stop's own metrics do not carry it)
            if not (self.final or self.ended):
                return False
            self.pending[0] = item = replace(item, kind="metrics")  # the training ended without it: sent as is
        if item.kind in BATCH_KINDS:
            return self._send_batch()
        if item.kind == "artifact":
            try:
                self.client.log_artifact(item)
            except ArtifactFailed as exc:
                if not exc.refused:
                    return self._defer(item, exc)
                self._set_aside(item.line, str(exc), item.data, f"the artifact {item.data.get('path')}")
            except Exception as exc:
                if not permanent(exc):
                    raise
                self._set_aside(item.line, describe(exc), item.data, f"the artifact {item.data.get('path')}")
        elif item.kind == "status" and self.state.owned:
            self.client.set_status(str(item.data["status"]), end_time_ms=int(item.data.get("end_ms", item.t_ms)))
        elif item.kind == "close":
            self.closed_until = item.t_ms / 1000 + float(item.data.get("wait_s", 0.0)) + STARTUP_S
        return self._done([item])

    def _defer(self, item: Record, exc: ArtifactFailed) -> None:
        """An artifact the artifact store failed to take: what follows it (the run's status) is sent, and it is
        tried again after a backoff, by this sender until it gives up, then by ``replay``."""
        if item.line not in self.state.deferred:
            self.state.deferred.append(item.line)
        self.deferred_retry_at = time.monotonic() + BACKOFF_S[min(self._deferred_failures, len(BACKOFF_S) - 1)]
        self._deferred_failures += 1
        self.note("artifacts", f"green-callbacks: the artifact store of MLflow at {self.uri} did not take "
                               f"{item.data.get('path')} ({exc}); the run's metrics and status are sent without "
                               f"it, and the files wait in {self.spool}: they are tried again, else sent by "
                               f"green-callbacks replay {self.spool}", again_after_s=RENOTE_S)
        self._done([item], deferred=True)

    def _set_aside(self, line: int, reason: str, content: Any, what: str, refused: bool = True) -> None:
        where = f"set aside in {rejected_path(self.spool)}"
        try:
            set_aside(self.spool, line, reason, content)
        except OSError as exc:  # a folder gone read-only, a full disk: nowhere to keep it once the spool goes
            where = (f"not kept ({rejected_path(self.spool).name} cannot be written: {exc}; it stays at line {line} "
                     f"of {self.spool} only until the rest is sent and the spool removed)")
        self.state.set_aside += 1
        self.note(f"aside:{what}", f"green-callbacks: MLflow at {self.uri} refused {what} ({reason}); it is {where} "
                                   "and everything else is sent."
                  if refused else f"green-callbacks: {what}; it is {where} and everything else is sent.")

    def _done(self, items: list[Record | Unreadable], deferred: bool = False) -> None:
        """Items off the queue (``deferred``: an artifact left for later, not sent), and the progress saved; a
        deferred artifact sent later moves it no more."""
        last = items[-1]
        if last.end > self.state.offset:
            self.state.offset, self.state.line = last.end, last.line
            if isinstance(last, Record):
                self.state.seq = last.seq
        for item in items:
            if isinstance(item, Record):
                self.state.sent += not deferred and item.kind in SENDABLE
            if not deferred and item.line in self.state.deferred:  # a deferred artifact, sent (or set aside) at last
                self.state.deferred.remove(item.line)
        del self.pending[:len(items)]
        self.save()

    def cleanup(self) -> None:
        """Everything is done: the spool, its state and the sender's log go (a ``.rejected`` file stays)."""
        for path in (self.spool, state_path(self.spool), log_path(self.spool)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


