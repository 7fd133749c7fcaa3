"""``green-callbacks replay``: send what a spool still holds, exactly once, and remove it when all went."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from green_callbacks.sinks.files import lock
from green_callbacks.sinks.spool import Record, State, Unreadable, all_sent, scan
from green_callbacks.sinks.vetting import ReplaySender
from green_callbacks.uris import split_credentials, temporary_env


@dataclass
class ReplayResult:
    """What ``replay_spool`` did: records sent now, set aside now, unreadable lines, the run, all done."""

    sent: int
    set_aside: int
    unreadable: list[int]
    run_id: str | None
    tracking_uri: str | None
    complete: bool
    notes: list[str]


def _holder(spool: Path) -> int | str:
    """The pid of the process holding the spool, as its state says ("unknown" where it cannot be read)."""
    try:
        return State.load(spool).pid or "unknown"
    except ValueError:
        return "unknown"


class SpoolBusy(RuntimeError):
    """Another process is still writing or sending the spool."""


def replay_spool(path: str | Path, tracking_uri: str | None = None, wait_s: float = 60.0,
                 waiting: Callable[[str], None] | None = None,
                 plan: Callable[[str], None] | None = None) -> ReplayResult:
    """Send what a spool still holds to its run (creating the run if it never was), then remove it.

    Idempotent: what an earlier sender or replay sent (the state file says so) is not sent again.
    Unreadable lines are reported by number and set aside in ``<spool>.rejected.jsonl``; a spool is
    removed only when nothing in it is left unsent. ``wait_s`` bounds the wait for a sender that
    still holds it (one keeps trying for a while after its training ended); ``waiting`` hears once
    that it waits, ``plan`` what will be sent where before anything is.

    Nothing in the spool (or its state file) is trusted: see :class:`~green_callbacks.sinks.vetting.ReplaySender`.
    A user and password in ``tracking_uri`` reach MLflow through its environment variables only.
    """
    spool = Path(path)
    uri, credentials = split_credentials(tracking_uri)
    if not spool.is_file():
        raise FileNotFoundError(f"no spool file at {spool}")
    first = next(scan(spool), None)  # a training still writing it: its own sender sends it, say so now
    if isinstance(first, Record) and first.kind == "open" and isinstance(first.data, dict) and not _closed(spool):
        try:
            _check_writer_gone(first.data, spool)
        except SpoolBusy:
            done = all_sent(spool)  # (a finished stage's sender, kept by a training process that lives on)
            if done is None or done.blocked is not None:
                raise
            return ReplayResult(0, 0, [], done.run_id, done.tracking_uri, True, [
                f"{spool}: everything in it is in MLflow; the process that wrote it is still running and keeps "
                "its sender, which removes it when that process ends"])
    end = time.monotonic() + wait_s
    while (held := _lock_if_there(spool)) is None:
        if not spool.is_file():  # the sender (or a replay) that held it sent everything and removed it
            return ReplayResult(0, 0, [], None, None, True, [f"{spool} was sent in full by the process that held "
                                                            "it; nothing is left to send"])
        if waiting is not None:
            waiting(f"a green-callbacks sender (pid {_holder(spool)}) is still sending {spool}; waiting up to "
                    f"{wait_s:g} s for it")
            waiting = None
        if time.monotonic() > end:
            raise SpoolBusy(f"a green-callbacks sender (pid {_holder(spool)}) is still sending {spool}; it "
                            "stops by itself once done or after its linger time; run replay again then")
        time.sleep(0.5)
    try:
        sender = ReplaySender(spool, uri)
        sender.save()  # this process's pid, for another replay's message while it waits
        if not _closed(spool):
            _check_writer_gone(sender.header, spool)
        before_sent, before_aside = sender.state.sent, sender.state.set_aside
        notes = len(sender.state.notes)
        sender.state.blocked = None  # try again: the run may have been restored
        sender.read(final=True)
        unreadable = [i.line for i in sender.pending if isinstance(i, Unreadable)]
        if plan is not None:
            plan(sender.plan(from_user=tracking_uri is not None))
        with temporary_env(credentials):
            complete = sender.send()
            if complete:  # the writer is gone (checked above): a run it opened and never ended was killed
                sender.mark_vanished()
        state = sender.state
        if complete:
            sender.cleanup()
        return ReplayResult(state.sent - before_sent, state.set_aside - before_aside, unreadable, state.run_id,
                            state.tracking_uri, complete, state.notes[notes:])
    finally:
        held.close()


def _lock_if_there(spool: Path) -> Any:
    """:func:`lock`, or None also when the spool was removed meanwhile (the caller tells which)."""
    try:
        return lock(spool)
    except FileNotFoundError:
        return None


def _closed(spool: Path) -> bool:
    """Whether the training closed the spool (its last ``open`` is followed by a ``close`` or ``detach``): it writes
    nothing more, so with no sender holding it (the lock is ours) it can be replayed while that process lives on
    (a notebook, a sweep) after its sender gave up or stopped."""
    closed = False
    for item in scan(spool, final=True):
        if isinstance(item, Record):
            closed = item.kind in ("close", "detach") or (closed and item.kind != "open")
    return closed


def _check_writer_gone(header: dict[str, Any], spool: Path) -> None:
    """Refuse to replay a spool whose training is still running (its own sender sends it)."""
    import socket

    import psutil

    pid = header.get("pid")
    if header.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid() \
            or not psutil.pid_exists(pid):
        return
    with contextlib.suppress(psutil.Error):  # a process started after the spool only reuses the pid
        if psutil.Process(pid).create_time() <= header["t_ms"] / 1000 + 2.0:
            raise SpoolBusy(f"the training that writes {spool} (pid {pid}) is still running; its sender sends it")
