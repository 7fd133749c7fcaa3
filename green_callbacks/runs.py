"""Which MLflow run a training's energy goes to, and when a monitor's second training is a new run.

In order: the trainer's logger's run (Lightning's ``MLFlowLogger``), MLflow's active run (HF's
``MLflowCallback``, the user's ``mlflow.start_run()``) where it is in the monitor's store, the run of a
checkpoint resumed, else a run of the monitor's own at ``tracking_uri``. None of it calls the network:
the sink's sender finds or creates the run, off the training thread.
"""

from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path
from typing import Any

from green_callbacks.distributed import RankInfo, gather
from green_callbacks.sensors.base import log
from green_callbacks.uris import redact, without_credentials


class RunHost:
    """The run-choosing half of :class:`~green_callbacks.tracker.EnergyTracker`."""

    run: Any
    rank: RankInfo
    sink: Any
    tracking_uri: str | None
    experiment_name: str | None
    run_name: str | None
    output_dir: Path
    mlflow_wait_s: float
    local_id: str
    last_logged_step: int
    step_offset: int
    _session: Session
    _params_logged: bool
    _idle_sink: Any
    _resuming = False  # this start continues a checkpoint's totals (set by start)

    def same_session(self, session: object) -> bool:
        """Whether ``session`` (a trainer, or HF's ``TrainerState``) is the one this monitor last started in."""
        return self._session.holds(session)

    def same_training(self, session: object) -> None:
        """``session`` goes on with the running training (HF's retry with a smaller batch makes a new state)."""
        self._session = Session(session)

    def forget_session(self) -> None:
        """What starts next is a training of its own, even with the same trainer (the last one failed)."""
        self._session = Session(None)

    def _reuse(self, run_id: str | None) -> None:
        """A monitor handed to a second training: the run it was given continues (the same logger's or
        active run again): its step axis goes on after the last step logged, never logging a step twice;
        any other case (a run it opened itself, another run, none) is a new run, counted from zero.
        Rank 0 knows the run; every rank follows its choice (one gather), so totals agree across ranks."""
        users = run_id or active_run_id(env=not self.tracking_uri)  # the logger's run, else MLflow's active run
        keep = self.run is not None and not self.run.owned and users == self.run.run_id
        offset = self.last_logged_step + 1
        if self.rank.world_size > 1:
            keep, offset = gather((keep, offset))[0]
        if keep:
            self.step_offset = offset
            self.restart_steps()
        else:
            self.reset_run()
            for stopper in self.stoppers:  # attached for an earlier training: this one starts from zero
                stopper.reset_policy()

    def _open_sink(self, run_id: str | None, tracking_uri: str | None) -> None:
        from green_callbacks.sinks import MlflowSink, RunTarget

        # MLFLOW_RUN_ID names a run in MLflow's current store: not where an explicit tracking_uri sends the energy
        active = active_run_id(env=not self.tracking_uri) if run_id is None else None
        if active is not None and self.tracking_uri and not same_store(self.tracking_uri):
            log.warning("green-callbacks: MLflow's active run %s is in another store (%s) than tracking_uri=%r; the "
                        "energy goes to a run of its own there", active, fluent_uri(), redact(self.tracking_uri))
            active = None
        users = run_id or active  # the trainer's logger's run, else MLflow's active run
        if self._resuming and users is not None and self.run is not None and users != self.run.run_id:
            # resumed from a checkpoint into another run the user has (HF's MLflowCallback, a new MLFlowLogger
            # run in a new process): the energy goes where the trainer's own metrics go, its totals continued
            self.run, self._params_logged = None, False
        if run_id is None and self.run is not None:  # resumed from a checkpoint
            target = RunTarget(self.run.tracking_uri, self.run.run_id, owned=self.run.owned, local_id=self.local_id)
        elif active is not None:  # in MLflow's current store, which the sink reads
            target = RunTarget(None, active, owned=False)
        else:
            target = RunTarget(tracking_uri or self.tracking_uri, run_id, self.experiment_name, self.run_name,
                               owned=run_id is None, local_id=self.local_id)  # a resumed run found by its tag
        idle, self._idle_sink = self._idle_sink, None  # an earlier stage's sink, its records all confirmed
        if idle is not None and idle.continues(target):
            self.sink = idle
        else:
            # a sink whose sender a new sink took (another thread's training) is ended by that sink: a close here as
            # well raced its giving up (the spool closed under close(): a ValueError out of the user's validate())
            taken = idle is not None and idle.gave_up
            if idle is not None and not taken:
                idle.close()
            # (not where this monitor's own was taken: two monitors alternating stages, HF evaluate() on two Trainers
            # in turn, took each other's at every call, where each kept its own before)
            self.sink = MlflowSink(target, self.output_dir, close_wait_s=self.mlflow_wait_s, take_parked=not taken)
        if self.run is None:
            self.run = self.sink.run_ref

    @property
    def run_folder(self) -> Path:
        """This run's own output folder: its MLflow run id, else a local id (never shared by two runs)."""
        run = self.run or (self.sink.run_ref if self.sink is not None else None)
        return self.output_dir / (run.run_id if run is not None else f"local-{self.local_id}")


class Session:
    """The object a training was started with, by weak reference where it allows one (an ``id`` alone can be
    the next object's once the first is freed)."""

    def __init__(self, session: object) -> None:
        self.id = id(session)
        try:
            self.ref: Any = weakref.ref(session)
        except TypeError:
            self.ref = None

    def holds(self, session: object) -> bool:
        return self.ref() is session if self.ref is not None else self.id == id(session)


def fluent_uri() -> str | None:
    mlflow = sys.modules.get("mlflow")
    return without_credentials(mlflow.get_tracking_uri()) if mlflow is not None else None


def same_store(uri: str) -> bool:
    """Whether ``uri`` is MLflow's current tracking URI, the store of its active run, however either is written
    (``sqlite:///mlflow.db`` and MLflow's absolute default, ``./mlruns`` and ``mlruns``, localhost)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is None or _store_key(str(mlflow.get_tracking_uri())) == _store_key(uri)


def _store_key(uri: str) -> str:
    from green_callbacks.sinks.tracking import absolute

    uri = absolute(uri, os.getcwd()).rstrip("/")
    for prefix in ("sqlite:///", "file:"):
        if uri.startswith(prefix) and not uri.startswith("file://"):
            path, _, query = uri[len(prefix):].partition("?")
            return prefix + os.path.normpath(path) + (f"?{query}" if query else "")
    if "://" not in uri:
        return os.path.normpath(uri)
    return uri.replace("://localhost", "://127.0.0.1").lower()


def active_run_id(env: bool = False) -> str | None:
    """MLflow's active fluent run (HF's MLflowCallback, the user's ``mlflow.start_run``), else, with ``env``, the
    run ``MLFLOW_RUN_ID`` names (a scheduler's, ``mlflow run``'s: the one MLflow's ``start_run()`` would resume), in
    MLflow's current store: no network."""
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    if active is not None:
        return active.info.run_id
    return (os.environ.get("MLFLOW_RUN_ID") or None) if env else None
