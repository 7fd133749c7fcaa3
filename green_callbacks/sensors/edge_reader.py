"""The counter reads of a GPU sensor's window edges, on a thread of their own (:class:`EdgeReader`): a driver call
that hangs at an edge holds up no training."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable


class Hung(TimeoutError):
    """A library call that had not returned in the time allowed."""


@contextlib.contextmanager
def released(lock: threading.Lock):  # type: ignore[no-untyped-def]
    """Release ``lock``, acquired by the caller, on leaving."""
    try:
        yield
    finally:
        lock.release()


class EdgeReader:
    """The counter reads of window edges, made on a thread of their own, so a driver call that hangs holds up no
    training.

    Each read takes its device's ``io`` lock there, at once or not at all (the sampler in a call on the device: the
    edge shows its last reads), unless the caller already holds it and hands it over (the end of measuring's reads);
    it is released when the read returns. The caller waits for the reads at most as long as it chooses; one that takes
    longer goes on here, holding only its own device's ``io``. Reads handed over while the thread is still in such a
    call run on a thread of their own, so no edge queues behind a hang. One thread for all of a sensor's devices: an
    edge costs one thread switch (about 0.1 ms), not one per GPU.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # type: ignore[type-arg]
        self._thread: threading.Thread | None = None
        self._current: Reads | None = None  # the last job handed to the thread
        self._closed = False

    def submit(self, reads: list[tuple[str, Callable[[float], bool], threading.Lock, bool]],
               at: float | Callable[[], float], wait_s: float) -> Reads:
        """Start the ``(label, read, io, held)`` reads, each called with the edge's instant: ``at``, or where ``at``
        is a clock, its reading right before the reads. :meth:`Reads.wait` for which of them were taken in. Once
        closed, or where no thread can be started (the interpreter is shutting down), they are made in the caller's
        thread. Reads not begun ``wait_s`` after the first began are not made (their edge shows the last reads).
        """
        job = Reads(reads, at, wait_s)
        current = self._current
        try:
            if self._closed:
                job.run()
            elif current is not None and not current.done.is_set():  # the thread is in a call that hangs
                threading.Thread(target=job.run, name=f"{self._name}-aside", daemon=True).start()
            else:
                if self._thread is None:
                    self.start()
                self._current = job
                self._jobs.put(job)
        except RuntimeError:  # no thread can be started
            if not job.done.is_set():
                job.run()
        return job

    def start(self) -> None:
        """Its thread started (at the sensor's start, so no edge waits for a thread to start)."""
        if self._thread is None and not self._closed:
            thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            thread.start()
            self._thread = thread

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def close(self, wait_s: float) -> bool:
        """It ends (a read that hangs first returns); whether it had ended, and no read of a job handed to it was
        under way, within ``wait_s``."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return self._current is None or self._current.done.is_set()
        self._jobs.put(None)
        thread.join(wait_s)
        return not thread.is_alive()


class Reads:
    def __init__(self, reads: list[tuple[str, Callable[[float], bool], threading.Lock, bool]],
                 at: float | Callable[[], float], wait_s: float) -> None:
        self.reads, self.taken, self.done = reads, [], threading.Event()  # type: ignore[var-annotated]
        self.wait_s = wait_s
        self._at = at
        self.at: float | None = None if callable(at) else at  # the instant the reads are taken in at, once known
        self._ran = False

    def wait(self, timeout_s: float) -> set[str]:
        """The labels whose read returned, and was taken in, within ``timeout_s`` (the rest go on, on the reader)."""
        self.done.wait(timeout_s)
        return set(list(self.taken))

    def run(self) -> None:
        if self._ran:
            return
        self._ran = True
        try:
            at = self.at = self._at() if callable(self._at) else self._at
        except Exception:  # a clock that fails: no read, and the caller's own call to it says why
            at = None
        began = time.monotonic()
        for label, read, io, held in self.reads:
            if not held and not io.acquire(blocking=False):
                continue  # the sampler is in a call on the device: the edge shows its last reads
            try:  # (after a read that hung, the edge has shown the others' last reads: none is read late)
                if at is not None and time.monotonic() - began <= self.wait_s and read(at):
                    self.taken.append(label)
            except Exception:  # a read's own faults are taken into the device's state by the read
                pass
            finally:
                io.release()
        self.done.set()
