"""The MLflow side of sending: where the run is, batches in ``log_batch``'s limits (what an error means:
``verdicts``).

Everything here runs in the sender process (or ``green-callbacks replay``), never in training.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from green_callbacks.sinks.names import MAX_ENTITIES, MAX_METRICS, MAX_PARAMS, MAX_TAGS
from green_callbacks.sinks.spool import Record
from green_callbacks.sinks.target import context_tags
from green_callbacks.sinks.verdicts import (
    NOT_RECOGNIZED,
    ArtifactFailed,
    access_refused,
    causes,
    describe,
    foreign_json,
    http_timeout_s,
    permanent,
    sqlite_unwritable,
    timed_out,
)
from green_callbacks.uris import temporary_env, with_credentials

LOCAL_ID_TAG = "green.local_id"  # finds a run created by an earlier try whose answer was lost


class Blocked(Exception):
    """Nothing more can go to this run (it was deleted, say); the records stay in the spool."""


def _probed(method: Any) -> Any:
    """A ``RunClient`` method whose error answer, when JSON that is not MLflow's, gets its real status probed."""
    @functools.wraps(method)
    def wrapper(self: RunClient, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.probe(exc)
            raise
    return wrapper


@contextlib.contextmanager
def _as_in(cwd: str | None) -> Iterator[None]:
    """As the training saw it: its working directory, and no ``MLFLOW_TRACKING_URI`` (it had none)."""
    old = os.getcwd()
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        if cwd and Path(cwd).is_dir():
            os.chdir(cwd)
        yield
    finally:
        os.chdir(old)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def resolve_uri(header: dict[str, Any]) -> str:
    """The tracking URI the training meant: its explicit one, its environment's, else MLflow's default
    resolved in the training's working directory (``sqlite:///<cwd>/mlflow.db`` for MLflow 3)."""
    uri = header["target"].get("tracking_uri") or header.get("env_tracking_uri")
    if uri:
        return absolute(str(uri), header.get("cwd"))
    import mlflow

    try:  # not this process's own set_tracking_uri (a replay_spool() called in a process that set one)
        from mlflow.tracking._tracking_service import utils as tracking_utils
    except ImportError:
        tracking_utils = None
    fluent = getattr(tracking_utils, "_tracking_uri", None)
    try:
        if fluent is not None:
            tracking_utils._tracking_uri = None
        with _as_in(header.get("cwd")):
            return str(mlflow.get_tracking_uri())
    finally:
        if fluent is not None:
            tracking_utils._tracking_uri = fluent


def absolute(uri: str, cwd: str | None) -> str:
    """A local store's relative path (``sqlite:///mlflow.db``, ``./mlruns``, ``file:mlruns``) as the training
    meant it, in its working directory, whatever the replaying process's is."""
    if not cwd:
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        return uri if rest.startswith(":memory:") or not rest else f"sqlite:///{Path(cwd, rest)}"
    if uri.startswith("file:") and not uri.startswith("file://"):
        return f"file:{Path(cwd, uri[len('file:'):])}"
    if "://" not in uri and not Path(uri).is_absolute() and uri.split("-")[0] not in ("databricks", "uc"):
        return str(Path(cwd, uri))
    return uri


class RunClient:
    """One run at one tracking URI."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no store start-up chatter in the user's terminal
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow.exceptions").addFilter(NOT_RECOGNIZED)  # (added once: filters are a set)
        self.uri = uri
        why = sqlite_unwritable(uri)
        if why is not None:
            raise PermissionError(why)
        self.client = MlflowClient(with_credentials(uri))  # a database's user and password: in memory only
        self.run_id: str | None = None
        self.remote = uri.startswith(("http://", "https://"))  # a tracking server: creates retried (``created``)
        self._twins_of: tuple[str, str] | None = None  # (experiment, local id) of a run created in several tries

    def probe(self, exc: BaseException) -> None:
        """An error answer in JSON that is not MLflow's (``{"message": "Unauthorized"}``): MLflow calls it a 500
        whatever it was. One request, not retried, finds its real status (a write to the run when there is one,
        an empty batch; else a search), kept on the exception as ``green_http_status``: a 401 or 403 is then a
        refusal of the credentials, not an outage."""
        e = next((e for e in causes(exc) if foreign_json(e)), None)
        if e is None or getattr(e, "green_http_status", None) is not None:
            return
        from mlflow.utils.rest_utils import http_request

        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        creds = getattr(store, "get_host_creds", None)
        if creds is None:
            return
        if self.run_id:
            endpoint, body = "/api/2.0/mlflow/runs/log-batch", {"run_id": self.run_id}
        else:
            endpoint, body = "/api/2.0/mlflow/experiments/search", {"max_results": 1}
        try:
            response = http_request(creds(), endpoint, "POST", max_retries=0, timeout=http_timeout_s(), json=body)
        except Exception:
            return  # unreachable now: an outage after all
        with contextlib.suppress(AttributeError):
            e.green_http_status = int(response.status_code)  # type: ignore[attr-defined]
            e.green_http_probe = f"POST {endpoint}"  # type: ignore[attr-defined]

    @_probed
    def open(self, header: dict[str, Any]) -> tuple[str, bool]:
        """The run of a spool: the one it names, else the one tagged with its local id (created by an
        earlier try whose answer was lost, or by the training this one resumes), else a new one."""
        target = header["target"]
        c = self.client
        if target.get("run_id"):
            run_id = str(target["run_id"])
            self.check(run_id)
            if target.get("owned"):  # a run this package opened, resumed: running again
                c.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id, bool(target.get("owned"))
        exp_id = self._experiment(target.get("experiment_name") or header.get("env_experiment_name"),
                                  header.get("env_experiment_id"))
        local_id = target.get("local_id") or header["local_id"]
        found = self._tagged(exp_id, local_id)
        if found:  # the one holding something (a resumed training's), else the first
            self.run_id = next((r for r in found if _holds_data(r)), found[0]).info.run_id
        else:
            tags = {"mlflow.source.name": "green-callbacks", **context_tags(header), LOCAL_ID_TAG: local_id}
            sent = []

            def create() -> str:
                sent.append(1)
                return str(c.create_run(exp_id, start_time=int(header["t_ms"]), tags=tags,
                                        run_name=target.get("run_name")).info.run_id)

            self.run_id = created(create, lambda: next((r.info.run_id for r in self._tagged(exp_id, local_id)), None),
                                  self.remote)
            found = self._tagged(exp_id, local_id)
            if len(sent) > 1:  # a create that timed out may still land: its twin looked for again at the run's end
                self._twins_of = (exp_id, local_id)
        self._drop_twins(found)
        return self.run_id, True

    def _tagged(self, exp_id: str, local_id: str) -> list[Any]:
        return list(self.client.search_runs([exp_id], f"tags.`{LOCAL_ID_TAG}` = '{local_id}'", max_results=20))

    def _drop_twins(self, found: list[Any]) -> None:
        """Empty runs made by the same create as the one kept: a create retried after a 503 that the server had
        processed, or after a timeout with the run not yet found (``created``). Best effort: they hold nothing."""
        kept = next((r for r in found if r.info.run_id == self.run_id), None)
        for r in found:
            if kept is not None and r is not kept and r.info.start_time == kept.info.start_time and not _holds_data(r):
                with contextlib.suppress(Exception):
                    self.client.delete_run(r.info.run_id)

    def _experiment(self, name: str | None, exp_id: str | None) -> str:
        from mlflow.exceptions import MlflowException

        if not name:
            return str(exp_id or "0")
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return str(created(lambda: self.client.create_experiment(name),
                                   lambda: getattr(self.client.get_experiment_by_name(name), "experiment_id", None),
                                   self.remote))
            except MlflowException:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise Blocked(f"the experiment {name!r} at {self.uri} is deleted (restore it, or replay with another "
                          "--tracking-uri)")
        return str(exp.experiment_id)

    @_probed
    def check(self, run_id: str) -> None:
        """Raise ``Blocked`` when the run cannot take records (missing or deleted)."""
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            if permanent(exc):
                raise Blocked(f"the run {run_id} cannot be read at {self.uri} ({describe(exc)})") from exc
            raise
        if run.info.lifecycle_stage == "deleted":
            raise Blocked(f"the run {run_id} at {self.uri} is deleted")

    @_probed
    def existing_params(self) -> dict[str, str]:
        assert self.run_id is not None
        return dict(self.client.get_run(self.run_id).data.params)

    @_probed
    def log_batch(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        """Log entities in as few requests as MLflow's per-request limits allow."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            p, t = params[:MAX_PARAMS], tags[:MAX_TAGS]
            m = metrics[:min(MAX_METRICS, MAX_ENTITIES - len(p) - len(t))]
            self.client.log_batch(self.run_id, metrics=m, params=p, tags=t, synchronous=True)
            del metrics[:len(m)], params[:len(p)], tags[:len(t)]

    @_probed
    def log_artifact(self, record: Record) -> None:
        """Upload a file. The run is read first: a failure there is the tracking server's (an outage, a refusal
        of the credentials); a failure after it is the artifact store's (``ArtifactFailed``), which must not hold
        back the run's metrics or its status."""
        path = record.data["path"]
        if not Path(path).is_file():
            raise FileNotFoundError(f"the artifact file {path} no longer exists")
        self.client.get_run(self.run_id)
        try:
            self.client.log_artifact(self.run_id, path, record.data.get("artifact_path"))
        except Exception as exc:
            raise ArtifactFailed(path, exc) from exc

    @_probed
    def set_status(self, status: str, end_time_ms: int | None = None) -> None:
        """``end_time_ms``: when the training ended (a replay sends it later: the run's end is not the replay's)."""
        if status == "RUNNING":  # a run going on again (a later stage into it): not terminated, no end time set
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status, end_time=end_time_ms)
            if self._twins_of is not None:
                with contextlib.suppress(Exception):
                    self._drop_twins(self._tagged(*self._twins_of))

    @_probed
    def status(self) -> str:
        return str(self.client.get_run(self.run_id).info.status)


def created(create: Callable[[], Any], find: Callable[[], Any], remote: bool) -> Any:
    """What ``create`` made (a run, an experiment), retried here as MLflow's client retried it before 3.18, which
    retries no request that may have reached the server: a create that timed out, or answered 503 (a balancer's
    failing replica, a server starting), failed at once, and a whole sequence retried later could fail at the same
    request every time. After a timeout the server may be making it still: ``find`` looks for it first. After an
    answer, the create goes again at once (a twin made by a 503 that was processed is dropped by ``_drop_twins``; a
    second experiment of the name is refused). The client's own retries are off for it (the same on every MLflow
    version); the count and backoff are its settings (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR``).
    Not ``remote`` (a local store: no HTTP, nothing MLflow would retry): one try, its error raised at once."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    if not remote:
        return create()
    retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    attempt = 0
    while True:
        try:
            with temporary_env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}):
                return create()
        except Exception as exc:
            if attempt >= retries or permanent(exc) or access_refused(exc):
                raise
            if attempt:  # urllib3's backoff: none before the first retry, then factor * 2, 4 ... s
                time.sleep(min(factor * 2 ** attempt, 60) * (1 + random.random() / 2))
            if timed_out(exc) and (made := find()) is not None:
                return made
        attempt += 1


def _holds_data(run: Any) -> bool:
    """Whether a run has any metric or param (a tag is set at its creation)."""
    return bool(run.data.metrics or run.data.params)


def entities(record: Record) -> tuple[list[Any], list[Any], list[Any]]:
    """A metrics, params or tags record as MLflow entities."""
    from mlflow.entities import Metric, Param, RunTag

    if record.kind == "metrics":
        return [Metric(k, float(v), record.t_ms, int(record.step or 0)) for k, v in record.data.items()], [], []
    if record.kind == "params":
        return [], [Param(k, str(v)) for k, v in record.data.items()], []
    return [], [], [RunTag(k, str(v)) for k, v in record.data.items()]
