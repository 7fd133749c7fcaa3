"""Where records go: the MLflow run (in the background, batched), through a spool that loses nothing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("green_callbacks")

# MLflow's log_batch limits per request
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100


@dataclass
class Record:
    """One thing to send: ``kind`` is metrics, params, tags, artifact or status."""

    kind: str
    data: dict[str, Any]
    step: int | None = None
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def to_json(self, run_id: str, tracking_uri: str) -> str:
        return json.dumps({"run_id": run_id, "tracking_uri": tracking_uri, "kind": self.kind,
                           "data": self.data, "step": self.step, "timestamp_ms": self.timestamp_ms})


@dataclass(frozen=True)
class RunTarget:
    """Where the tracker wants its records (see the sinks package's contract)."""

    tracking_uri: str | None = None
    run_id: str | None = None
    experiment_name: str | None = None
    run_name: str | None = None
    owned: bool = True


@dataclass(frozen=True)
class RunRef:
    """The MLflow run to log into, and whether this package opened it (and so must close it)."""

    run_id: str
    tracking_uri: str
    owned: bool = False


def find_or_start_run(
    run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    run_name: str | None = None,
    previous: RunRef | None = None,
) -> RunRef:
    """The run the training already logs to, else a new one.

    Order: an explicit ``run_id`` (a trainer's MLflow logger); MLflow's active fluent run (HF's
    ``MLflowCallback``, ``mlflow.start_run`` by the user); the ``previous`` run of this training
    (an earlier stage, or the run restored from a checkpoint); else a new run in
    ``experiment_name`` (MLflow's default experiment when ``None``) at ``tracking_uri``
    (MLflow's own default when ``None``: ``mlflow.db`` in the working directory for MLflow 3).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    if run_id:
        return RunRef(run_id, uri, owned=False)
    active = mlflow.active_run()
    if active is not None:
        return RunRef(active.info.run_id, tracking_uri or mlflow.get_tracking_uri(), owned=False)
    if previous is not None:
        return previous
    client = MlflowClient(uri)
    if experiment_name:
        exp = client.get_experiment_by_name(experiment_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment_name)
    else:
        exp_id = "0"
    run = client.create_run(exp_id, run_name=run_name, tags={"mlflow.source.name": "green-callbacks"})
    return RunRef(run.info.run_id, uri, owned=True)


def send(client: Any, run_id: str, records: list[Record]) -> None:
    """Send records in order, batching consecutive metrics/params/tags into ``log_batch`` calls."""
    from mlflow.entities import Metric, Param, RunTag

    metrics: list[Any] = []
    params: list[Any] = []
    tags: list[Any] = []

    def drop_existing_params() -> None:
        """MLflow refuses to change a param: a resumed run keeps the first value, and says so once."""
        if not params:
            return
        existing = client.get_run(run_id).data.params
        changed = [f"{p.key}: {existing[p.key]!r} -> {p.value!r}" for p in params
                   if p.key in existing and existing[p.key] != p.value]
        if changed:
            log.warning("green-callbacks: MLflow params cannot change within a run; kept the first values (%s).",
                        "; ".join(changed))
        params[:] = [p for p in params if p.key not in existing]

    def flush() -> None:
        drop_existing_params()
        while metrics or params or tags:
            client.log_batch(run_id, metrics=metrics[:_MAX_METRICS], params=params[:_MAX_PARAMS],
                             tags=tags[:_MAX_TAGS], synchronous=True)
            del metrics[:_MAX_METRICS], params[:_MAX_PARAMS], tags[:_MAX_TAGS]

    for r in records:
        if r.kind == "metrics":
            metrics.extend(Metric(k, float(v), r.timestamp_ms, r.step or 0) for k, v in r.data.items())
        elif r.kind == "params":
            params.extend(Param(k, str(v)) for k, v in r.data.items())
        elif r.kind == "tags":
            tags.extend(RunTag(k, str(v)) for k, v in r.data.items())
        elif r.kind == "artifact":
            flush()
            client.log_artifact(run_id, r.data["path"], r.data.get("artifact_path"))
        elif r.kind == "status":
            flush()
            client.set_terminated(run_id, r.data["status"])
    flush()


def read_spool(path: str | Path) -> list[tuple[str, str, Record]]:
    """The records of a spool file as ``(tracking_uri, run_id, record)``; torn last lines skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write
        out.append((d["tracking_uri"], d["run_id"], Record(d["kind"], d["data"], d["step"], d["timestamp_ms"])))
    return out


def replay_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Send every record of a spool file to its run; delete the file when all went. Returns the count."""
    from mlflow.tracking import MlflowClient

    items = read_spool(path)
    groups: dict[tuple[str, str], list[Record]] = {}
    for uri, run_id, record in items:
        groups.setdefault((tracking_uri or uri, run_id), []).append(record)
    for (uri, run_id), records in groups.items():
        send(MlflowClient(uri), run_id, records)
    Path(path).unlink()
    return len(items)


class MlflowSink:
    """Logs records to one MLflow run from a background thread, never blocking the trainer.

    Every record is first appended to a JSON-lines spool file (``spool_path``), then sent; the
    file is emptied once the tracking server has confirmed everything in it. If the server is
    unreachable, one warning is logged, records keep accumulating in the spool, and sending is
    retried every ``retry_s``; whatever is still unsent at ``close`` stays in the spool, which
    ``green-callbacks replay SPOOL`` sends later. A spool that cannot be written (disk full)
    costs one warning and durability, not the run.
    """

    def __init__(self, run: RunRef | RunTarget, spool_path: str | Path, retry_s: float = 5.0) -> None:
        from mlflow.tracking import MlflowClient

        if isinstance(run, RunTarget):  # transitional: resolved here, blocking, until the sinks package lands
            run = find_or_start_run(run.run_id, run.tracking_uri, run.experiment_name, run.run_name)
            spool_path = Path(spool_path) / f"spool-{run.run_id}.jsonl"
        self.run = run
        self.run_ref = run
        self.local_id = run.run_id
        self.spool_path = Path(spool_path)
        self.retry_s = retry_s
        self._client = MlflowClient(run.tracking_uri)
        self._queue: queue.Queue[Record | None] = queue.Queue()
        self._pending: list[Record] = []
        self._lock = threading.Lock()
        self._failing = False
        self._spool_ok = True
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="green-callbacks-mlflow", daemon=True)
        self._thread.start()

    # -- the trainer's side: enqueue only ---------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._queue.put(Record("metrics", dict(metrics), step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._queue.put(Record("params", {k: str(v) for k, v in params.items()}))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._queue.put(Record("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._queue.put(Record("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path}))

    def set_status(self, status: str) -> None:
        if self.run.owned:
            self._queue.put(Record("status", {"status": status}))

    def interval_end(self) -> None:
        """Transitional: the spool is written by the worker."""

    # -- the worker --------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _spool_append(self, records: Iterable[Record]) -> None:
        if not self._spool_ok:
            return
        try:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spool_path.open("a", encoding="utf-8") as f:
                for r in records:
                    f.write(r.to_json(self.run.run_id, self.run.tracking_uri) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self._spool_ok = False
            self._warn_once("spool", f"green-callbacks cannot write its spool {self.spool_path} ({exc}); "
                                     "records still go to MLflow but are lost if it is unreachable.")

    def _spool_clear(self) -> None:
        if self._spool_ok:
            with contextlib.suppress(OSError):
                self.spool_path.unlink(missing_ok=True)

    def _try_send(self) -> bool:
        with self._lock:
            batch = list(self._pending)
        if not batch:
            return True
        try:
            send(self._client, self.run.run_id, batch)
        except Exception as exc:
            if not self._failing:
                self._failing = True
                self._warn_once("down", f"MLflow at {self.run.tracking_uri} is unavailable ({exc!r}); green-callbacks "
                                        f"keeps every record in {self.spool_path} and sends them when it is back.")
            return False
        with self._lock:
            del self._pending[: len(batch)]
            if not self._pending:
                self._spool_clear()
        if self._failing:
            self._failing = False
            log.warning("MLflow at %s is back; %d spooled records sent.", self.run.tracking_uri, len(batch))
        return True

    def _drain(self, timeout_s: float) -> bool:
        """Move queued records to pending (and the spool); False when ``close`` was asked."""
        closing = False
        got: list[Record] = []
        try:
            item = self._queue.get(timeout=timeout_s)
            while True:
                if item is None:
                    closing = True
                else:
                    got.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if got:
            self._spool_append(got)
            with self._lock:
                self._pending.extend(got)
        return not closing

    def _run(self) -> None:
        last_try = 0.0
        while True:
            running = self._drain(timeout_s=0.2)
            now = time.monotonic()
            if self._pending and (not self._failing or now - last_try >= self.retry_s or not running):
                last_try = now
                self._try_send()
            if not running:
                return

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is sent; False if not confirmed within ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                idle = not self._pending
            if idle and self._queue.empty() and not self._failing:
                return True
            time.sleep(0.05)
        return False

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send what is left (one last try) and stop; True when nothing is left unsent."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)
        leftover: list[Record] = []
        # anything the worker never took (it was stuck in a slow retry) goes to the spool
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftover.append(item)
        if leftover:
            self._spool_append(leftover)
        with self._lock:
            unsent = len(self._pending) + len(leftover)
        if unsent:
            log.warning("green-callbacks: %d records could not be sent to MLflow at %s; they are in %s. "
                        "Send them later with: green-callbacks replay %s", unsent, self.run.tracking_uri,
                        self.spool_path, self.spool_path)
        return unsent == 0
