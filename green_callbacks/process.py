"""How a process ends: SIGTERM, uncaught exceptions and interpreter exit, and the trackers still running.

The module-level state of the package lives here and nowhere else: the live trackers (how HF's
stopping callbacks, which cannot see each other, find the EnergyMonitor) and the type of an
uncaught exception (so a run killed by Ctrl-C is recorded as KILLED and a crash as FAILED).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from green_callbacks.policies import MonitorError
from green_callbacks.sensors.base import log

if TYPE_CHECKING:
    from green_callbacks.tracker import EnergyTracker

F = TypeVar("F", bound=Callable[..., Any])
_RUNNING: list[tuple[weakref.ref[EnergyTracker], int]] = []  # with the pid that started it (not a forked copy)
_UNCAUGHT: list[type[BaseException]] = []
_SIGNALS: list[int] = []  # SIGTERM / SIGINT received, whoever handled them
_HOOKED = False
_TERM_PENDING = False  # a SIGTERM came while a tracker was ending: the process ends by it once the end is done


class Terminated(SystemExit):
    """A SIGTERM while a tracker waits for MLflow at its end: the wait ends at once (as for Ctrl-C), the run's files
    are written and spooled, its status set, then the process ends by the signal as it would have."""


def term_pending() -> bool:
    return _TERM_PENDING


def end_by_sigterm() -> None:
    """A SIGTERM nobody else handles, now or once the end it came during is done: the trackers still running end
    ``KILLED`` (their partial interval and summary recorded), then the process ends by the signal, as without this
    package."""
    for tracker in live_trackers():
        tracker.finish("KILLED")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def register(tracker: EnergyTracker) -> None:
    """A tracker has started: it ends its run properly however the process ends."""
    _RUNNING.append((weakref.ref(tracker), os.getpid()))
    atexit.register(tracker._atexit)
    _install_hooks()


def unregister(tracker: EnergyTracker) -> None:
    atexit.unregister(tracker._atexit)


def live_trackers() -> list[EnergyTracker]:
    """The trackers this process started that have not finished. A forked child's copies of its parent's (a fork
    ``multiprocessing`` pool's workers, which ``Pool.terminate()`` ends by SIGTERM) are not: ending one there wrote
    its end, ``KILLED``, into the parent's run."""
    pid = os.getpid()
    return [t for t in (ref() for ref, by in _RUNNING if by == pid) if t is not None and t.started]


def uncaught() -> type[BaseException] | None:
    """The type of the exception that is ending the process, if one is."""
    return _UNCAUGHT[-1] if _UNCAUGHT else None


def signalled(since: int = 0) -> bool:
    """Whether a SIGTERM or a Ctrl-C reached this process (also where a handler of the user's, or a caught
    ``KeyboardInterrupt``, let the process go on or end by ``sys.exit``), after the first ``since`` of them
    (:func:`signal_count` at a training's start: that training's own)."""
    return len(_SIGNALS) > since


def signal_count() -> int:
    """How many SIGTERMs and Ctrl-Cs reached this process so far."""
    return len(_SIGNALS)


def sigterm_count() -> int:
    """How many SIGTERMs reached this process so far (whoever handled them)."""
    return _SIGNALS.count(signal.SIGTERM)


def _recording(previous: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
    """``previous`` (a Python signal handler), run after the signal is recorded."""
    def handler(signum: int, frame: Any) -> Any:
        _SIGNALS.append(signum)
        return previous(signum, frame)

    return handler


def _install_hooks() -> None:
    """Chain ``sys.excepthook``, and where nobody handles SIGTERM (HF and plain scripts do not; Lightning does from
    each fit's start, calling this one, which then leaves the end to it) record the partial interval and summary on
    SIGTERM, then let the default action end the process as it would have. Python handlers already there for
    SIGTERM and SIGINT run as before, the signal recorded first (:func:`signalled`)."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.excepthook

    def excepthook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
        _UNCAUGHT.append(etype)
        previous(etype, value, tb)

    sys.excepthook = excepthook
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_sigterm(signum: int, frame: Any) -> None:
            global _TERM_PENDING
            _SIGNALS.append(signum)
            # run by Lightning's handler, installed after this one, which calls the one it found (registered at
            # each fit after the callbacks' setup): Lightning decides how the process ends. Without this package
            # it would have found no handler; ending the process here took Lightning's SIGTERM path from it (its
            # loggers' runs were left RUNNING, OnExceptionCheckpoint saved nothing)
            installed = signal.getsignal(signal.SIGTERM)
            chained = installed is not on_sigterm and type(installed).__module__.startswith(
                ("lightning.", "pytorch_lightning."))  # (another handler that calls this one may count on its end)
            ending = [t for t in live_trackers() if t._finishing_status is not None]
            if ending:  # its end finishes its files first (a wait for MLflow ends at once), then the signal acts
                _TERM_PENDING = _TERM_PENDING or not chained
                if any(t.waiting_for_mlflow for t in ending):
                    raise Terminated(128 + signum)
                return
            if not chained:
                end_by_sigterm()  # the partial interval and summary recorded, then the default action

        signal.signal(signal.SIGTERM, on_sigterm)
    elif callable(signal.getsignal(signal.SIGTERM)):  # the user's own (a preemption handler): recorded, then run
        signal.signal(signal.SIGTERM, _recording(signal.getsignal(signal.SIGTERM)))
    if callable(signal.getsignal(signal.SIGINT)):  # Python's KeyboardInterrupt, or the user's: recorded, then run
        signal.signal(signal.SIGINT, _recording(signal.getsignal(signal.SIGINT)))


def running_tracker() -> EnergyTracker:
    """The most recently started tracker of this process that has not finished."""
    live = live_trackers()
    if not live:
        raise ValueError("EfficiencyEarlyStopping and EnergyBudget need an EnergyMonitor in the same Trainer's "
                         "callbacks: callbacks=[EnergyMonitor(...), EnergyBudget(...)]; it measures, they decide")
    return live[-1]


def never_raises(fn: F) -> F:
    """Telemetry must not break training: a fault becomes one warning per hook and the run goes on.

    Two exceptions pass: a ``ValueError`` from ``start`` (a bad setting that could only be checked
    against the hardware, like a GPU index this machine does not have, stops the run before its
    first step) and a :class:`~green_callbacks.policies.MonitorError` (a stopper's monitored metric
    that the evaluation does not produce, with ``strict=True``).
    """

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except MonitorError:
            raise
        except Exception as exc:
            if isinstance(exc, ValueError) and fn.__name__ == "start":
                raise
            return warn_once(self, f"hook-{fn.__name__}", f"{fn.__name__} failed ({exc!r}); training continues "
                                                           "without it.")

    return wrapper  # type: ignore[return-value]


def warn_once(owner: Any, key: str, message: str) -> None:
    """One warning per ``key`` for the life of ``owner`` (which holds a ``_warned`` set)."""
    warned: set[str] = owner.__dict__.setdefault("_warned", set())
    if key not in warned:
        warned.add(key)
        log.warning("green-callbacks: %s", message)


@contextlib.contextmanager
def said_once(said: set[str]) -> Iterator[None]:
    """Warnings of this package logged inside the block, each said once for the life of ``said``: a monitor builds
    its sensors again at every stage (fit, validate, test), and their start-up warnings (a root-only RAPL file, a
    MIG instance) were said at each."""
    sensors = os.path.dirname(os.path.abspath(sys.modules["green_callbacks.sensors"].__file__ or ""))

    def new(record: logging.LogRecord) -> bool:  # the sensors' own warnings: not another thread's, nor a stage's
        if record.levelno < logging.WARNING or os.path.dirname(record.pathname) != sensors:  # "nothing can be
            return True  # measured", said at each
        text = record.getMessage()
        if text in said:
            return False
        said.add(text)
        return True

    log.addFilter(new)
    try:
        yield
    finally:
        log.removeFilter(new)
