"""The spool: a write-ahead log of everything meant for MLflow, one JSON record per line.

The training process is its only writer (``SpoolWriter``): each record is appended with one
``write`` before the call that produced it returns, so a kill -9 at any later moment loses
nothing (the kernel keeps the page); ``sync`` asks a small thread to ``fdatasync`` it, so an
interval also survives a power cut. Whoever sends (the sender process, or ``green-callbacks
replay``) keeps its progress beside it, in ``<spool>.state.json``: how many bytes are done, the
run they went to, the warnings it gave. A record MLflow refuses for good, or a line that cannot
be read (torn by a crash mid-write), goes to ``<spool>.rejected.jsonl`` with its line number and
the reason, and the rest flows on.

Line framing means a torn line costs only itself: a writer that finds the file not ending with a
newline (its own failed write, or a crashed predecessor's) starts its next line with one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from green_callbacks.sinks.files import last_byte, open_own, write_own

FORMAT = 1
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps builds one per call
SENDABLE = ("metrics", "params", "tags", "artifact", "status")  # kinds that carry something for MLflow
# the training wakes its sender from its pause between reads when someone waits (a flush, the end); a signal whose
# default is to be ignored, so one that comes before the sender is listening (its imports) does no harm
WAKE = getattr(signal, "SIGWINCH", None)
STARTUP_S = 30.0  # the most a wait grants the sender's start-up (MLflow's imports, the store) on top of its own


SYNC_PERIOD_S = 0.05  # the spool is fdatasync-ed at most this long after an interval end asked for it

@dataclass(frozen=True)
class Record:
    """One line of a spool: ``kind`` is open (the header), metrics, params, tags, artifact, status,
    close or detach; ``line`` is its 1-based line number and ``end`` the byte offset after it."""

    seq: int
    kind: str
    data: dict[str, Any]
    step: int | None
    t_ms: int
    line: int
    end: int


@dataclass(frozen=True)
class Unreadable:
    """A line that is not a record (torn by a crash mid-write, or damaged)."""

    line: int
    end: int
    text: str


@dataclass
class SpoolContents:
    """What ``read_spool`` finds: the header, every readable record, the numbers of unreadable lines."""

    header: dict[str, Any] | None
    records: list[Record]
    unreadable: list[int]


def state_path(spool: Path) -> Path:
    return spool.with_name(spool.name + ".state.json")


def rejected_path(spool: Path) -> Path:
    return spool.with_name(spool.name.removesuffix(".jsonl") + ".rejected.jsonl")


def log_path(spool: Path) -> Path:
    """Where the sender writes its messages once the training has exited."""
    return spool.with_name(spool.name + ".log")


def parse(raw: bytes, line: int, end: int) -> Record | Unreadable:
    try:
        d = json.loads(raw)
        return Record(int(d["seq"]), str(d["kind"]), dict(d.get("data") or {}), d.get("step"), int(d["t"]), line, end)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # (RecursionError: [[[[... nested deeper than
        text = raw.decode("utf-8", "replace")  # the parser goes, which failed the whole replay)
        return Unreadable(line, end, f"{text} ({type(exc).__name__})")  # whole: set aside, it is all there is of it


def scan(path: Path, offset: int = 0, line: int = 0, final: bool = False) -> Iterator[Record | Unreadable]:
    """The complete lines of ``path`` after byte ``offset`` (which ends line number ``line``).

    A last line without its newline may still be being written; it is returned (as unreadable
    unless it parses) only when ``final``: nobody writes to the file any more.
    """
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    start = 0
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            break
        line += 1
        if nl > start:  # an empty line is the newline that closed a torn one
            yield parse(data[start:nl], line, offset + nl + 1)
        start = nl + 1
    if final and start < len(data):
        yield parse(data[start:], line + 1, offset + len(data))


def read_spool(path: str | Path) -> SpoolContents:
    """Every readable record of a spool file and the numbers of its unreadable lines (nothing is sent)."""
    items = list(scan(Path(path), final=True))
    records = [r for r in items if isinstance(r, Record)]
    header = records[0].data if records and records[0].kind == "open" else None
    return SpoolContents(header, records, [u.line for u in items if isinstance(u, Unreadable)])


@dataclass
class State:
    """The sender's progress on one spool, saved beside it (``<spool>.state.json``)."""

    offset: int = 0  # bytes done: sent, set aside, or nothing to send
    line: int = 0  # the line number that ends at ``offset``
    seq: int = 0  # the last record done
    run_id: str | None = None
    tracking_uri: str | None = None
    owned: bool = False
    sent: int = 0  # records sent
    set_aside: int = 0  # records (or parts of them) set aside in the .rejected file
    done: bool = False  # everything up to and including the close record is done
    blocked: str | None = None  # why nothing more can be sent to this run (it was deleted, say)
    notes: list[str] = field(default_factory=list)  # the warnings given, oldest first
    pid: int | None = None
    trying_since: float | None = None  # when the sender first called MLflow (time.time()); None: starting up
    deferred: list[int] = field(default_factory=list)  # artifact lines the artifact store failed to take (retried)

    @classmethod
    def load(cls, spool: Path) -> State:
        """The saved state (a fresh one where none was saved); ``ValueError`` naming the file when it cannot be
        read (emptied by a power cut between its write and its rename, say)."""
        path = state_path(spool)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"the sender's state file {path} cannot be read ({exc})") from exc

    def save(self, spool: Path) -> bool:
        """Write the state; False when it cannot be written (a folder made read-only or a full disk)."""
        try:
            write_own(state_path(spool), json.dumps(self.__dict__).encode("utf-8"))
        except OSError:
            return False
        return True


def all_sent(spool: Path) -> State | None:
    """The spool's state where its sender has sent every line written so far (its offset at the spool's end),
    else None (also where the spool or its state cannot be read)."""
    try:
        state = State.load(spool)
        return state if state.offset >= spool.stat().st_size else None
    except (OSError, ValueError):
        return None


def set_aside(spool: Path, line: int, reason: str, content: Any) -> None:
    """Keep something that will never be sent, with why, for a person to look at."""
    entry = {"line": line, "reason": reason, "content": content, "t": int(time.time() * 1000)}
    with os.fdopen(open_own(rejected_path(spool), os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


class SpoolWriter:
    """Appends records to a spool file: each in one ``write`` before ``append`` returns.

    A write that fails (disk full) keeps the record in memory and retries it at the next append;
    ``on_error`` hears about it once. ``sync`` returns at once: a thread runs ``fdatasync``.
    """

    def __init__(self, path: Path, on_error: Callable[[OSError], None]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        self._torn = size > 0 and last_byte(path) != b"\n"
        self.offset = size  # the end of the last complete record this writer wrote
        self.seq = 0
        self._unwritten: list[bytes] = []
        self._writing = False
        self._fd_open = True
        self._on_error = on_error
        self._sync = threading.Event()  # set when the file closes: the sync thread ends
        self._sync_wanted = -1
        self._syncer: threading.Thread | None = None
        self._fd_lock = threading.Lock()  # the sync thread never touches a closed (or reused) descriptor
        self.closed = False

    def append(self, kind: str, data: dict[str, Any], step: int | None = None) -> int:
        if self.closed:
            raise ValueError(f"the spool {self.path} is closed; nothing more can be appended")
        self.seq += 1
        line = _encode({"seq": self.seq, "kind": kind, "t": int(time.time() * 1000), "step": step,
                        "data": data}).encode() + b"\n"
        self._unwritten.append(line)
        self._write_pending()
        return self.seq

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    def _write_pending(self) -> None:
        if self._writing:  # re-entered from a signal handler mid-write: the outer loop writes it next
            return
        self._writing = True
        try:
            self._write_loop()
        finally:
            self._writing = False
            if self.closed:  # closed by a signal handler that interrupted this write
                self._close_fd()

    def _write_loop(self) -> None:
        while self._unwritten:
            buf = (b"\n" if self._torn else b"") + self._unwritten[0]
            written = 0
            try:
                while written < len(buf):
                    written += os.write(self._fd, buf[written:])
            except OSError as exc:
                if written and not self._torn:  # the record's part that was written taken back (needs no space):
                    try:  # left, it was a line the replay "cannot read" and "sets aside" (the record itself is kept)
                        os.ftruncate(self._fd, self.offset)
                    except OSError:
                        self._torn = True
                elif written:
                    self._torn = True
                self._on_error(exc)
                return
            self._torn = False
            self.offset += len(buf)
            self._unwritten.pop(0)

    def sync(self) -> None:
        """Make what was appended durable, off this thread, within ``SYNC_PERIOD_S``.

        Costs an attribute write: a thread that wakes every ``SYNC_PERIOD_S`` runs ``fdatasync``
        when something new was asked for. Signalling it at once (an ``Event``) cost the training
        thread a wake-up of another thread, 50-300 µs on a busy 2-CPU VM, at every interval end.
        """
        self._sync_wanted = self.offset
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="green-callbacks-spool-sync", daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        synced = -1
        while not self._sync.wait(SYNC_PERIOD_S):
            wanted = self._sync_wanted
            if wanted == synced:
                continue
            with self._fd_lock:
                if not self._fd_open:
                    return
                with contextlib.suppress(OSError):
                    sync(self._fd)
            synced = wanted

    def rescue(self, folder: Path | None = None) -> Path | None:
        """Records that could not be written (the disk full): the whole spool, what the file holds and them, copied
        to ``folder`` (another disk; by default ``<tmp>/green_callbacks``), with the sender's progress beside it, so
        a replay of the copy sends the rest into the same run. The copy's path, or None where it cannot be written
        either (nor a temporary directory found)."""
        if not self._unwritten:
            return None
        try:
            folder = folder or Path(tempfile.gettempdir()) / "green_callbacks"  # it probes: can fail on a full disk
        except OSError:
            return None
        target = folder / self.path.name
        if target == self.path:
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("rb") as src, os.fdopen(open_own(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                                        "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.write((b"\n" if self._torn else b"") + b"".join(self._unwritten))
                dst.flush()
                os.fsync(dst.fileno())
            progress = state_path(self.path)
            if progress.exists():
                write_own(state_path(target), progress.read_bytes())
        except OSError:
            with contextlib.suppress(OSError):
                target.unlink()
            return None
        return target

    def close(self) -> None:
        """Sync now and close the file (after the write a signal handler interrupted, if it did)."""
        self.closed = True
        if not self._writing:
            self._close_fd()

    def _close_fd(self) -> None:
        with self._fd_lock:
            if self._fd_open:
                self._fd_open = False
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
        self._sync.set()  # the sync thread wakes and ends (the close synced it all)
