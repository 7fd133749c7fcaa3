"""Replay of a spool nobody vouches for: it acts on its own run only, uploads only this package's files.

A spool (and its state file) is a file anyone who can write the folder could have forged. The live
sender trusts its spool (the training beside it wrote it a moment ago); ``green-callbacks replay``
does not:

- the destination: a local store (sqlite, a file store) the spool names must already exist, and be
  MLflow's (a sqlite file without its tables, another program's database, gets no migrations; a
  replay creates no database at a path a file names), and a server the spool names gets no MLflow
  credentials (from the environment or MLflow's credentials file) unless the user names it
  (``--tracking-uri``, or ``MLFLOW_TRACKING_URI``: the same scheme, host and port);
- the run: records go to the run the header names, or to the run tagged with the spool's local id
  (created if it never was). Its status is set only when that tag proves this package opened it;
  a state file naming any other run is refused;
- the records: params and tags only under ``green.`` (never ``mlflow.runName`` or another system
  tag), numeric metrics (into a run the tag does not prove its own, only this package's names:
  ``energy/``, ``power/``...), and artifacts only the files this package writes, in a run folder beside
  the spool. Anything else is set aside in ``<spool>.rejected.jsonl`` with the reason;
- the files: the spool, its state file, a local store it names and the files it uploads must be the
  user's own (a spool another user wrote is refused whole). The files replay writes beside the spool
  (its state, ``.rejected.jsonl``) are never written through a link planted at their names.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import sqlite3
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from green_callbacks.sinks.sender import Sender
from green_callbacks.sinks.spool import Record, Unreadable, state_path
from green_callbacks.sinks.tracking import LOCAL_ID_TAG, Blocked, resolve_uri
from green_callbacks.uris import DB_PASSWORD_ENV, PASSWORD_ENV, is_database, without_credentials

ARTIFACT_DIR = "green_callbacks"  # outputs.ARTIFACT_DIR, without importing the tracker's side
ARTIFACT_NAMES = ("intervals.csv", "power_trace.csv", "summary.json", "power.png")  # outputs._write_files
# what MLflow sends to any server it talks to: a password, a token, a client certificate, an auth plugin, AWS SigV4
CREDENTIAL_ENV = (PASSWORD_ENV, DB_PASSWORD_ENV, "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                  "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "DATABRICKS_TOKEN")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # run ids and local ids: nothing a search filter would read as syntax
# the names this package logs (docs/metrics.md): into a run it did not open, a replay sends no others
OWN_METRICS = ("energy/", "power/", "emissions/", "cost/", "efficiency/", "stopping/", "projection/", "throughput/",
               "time/", "test/samples", "predict/samples", "evaluate/samples", "validate/samples")  # (stage_metrics)
REFUSED = "refused"  # the kind a record takes once vetting refused it; set aside when it reaches the head


def credentials() -> list[str]:
    """Where MLflow would take credentials from, whatever the server: its environment variables (a false
    ``MLFLOW_TRACKING_AWS_SIGV4`` is none) and its credentials file, ``~/.mlflow/credentials``."""
    found = [k for k in CREDENTIAL_ENV if os.environ.get(k, "").strip() and not (
        k == "MLFLOW_TRACKING_AWS_SIGV4" and os.environ[k].strip().lower() in ("false", "0"))]
    path = Path(os.path.expanduser("~/.mlflow/credentials"))
    config = configparser.ConfigParser()
    with contextlib.suppress(OSError, configparser.Error, UnicodeDecodeError):
        config.read(path)
    if config.has_section("mlflow") and config["mlflow"].get(PASSWORD_ENV.lower()):
        found.append(str(path))
    return found


def _server(uri: str) -> tuple[str, str, int | None]:
    """Scheme, host and port (the scheme's default where none is written): ``https://h`` and ``http://h`` are two
    servers (a password must not go in clear text to the second), ``http://h`` and ``http://h:80`` one."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)

def local_store(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (sqlite, file store, a plain path); None for a server."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        path = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
        return Path(path) if path and path != ":memory:" else None
    if scheme == "file":
        return Path(urlsplit(uri).path)
    if scheme == "" or len(scheme) == 1:  # a path (or a Windows drive letter)
        return Path(uri)
    return None


def not_yours(path: Path) -> str | None:
    """Why a file (or folder) is not this user's own: another user's (or, run as root, anyone else's); None where it
    is, is not there, or the system has no owners (Windows)."""
    if not hasattr(os, "geteuid"):
        return None
    try:
        owner = path.stat().st_uid
    except OSError:
        return None
    me = os.geteuid()
    return None if owner == me else f"belongs to uid {owner}, not to you (uid {me})"


def _store_exists(path: Path) -> bool:
    if path.is_dir():  # a file store: MLflow keeps a meta.yaml per experiment
        return any(path.glob("*/meta.yaml"))
    try:
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return False
    except OSError:
        return False
    return _mlflow_tables(path)


def _mlflow_tables(path: Path) -> bool:
    """The sqlite file holds an MLflow store (its migrations' table, its runs and experiments), read only.

    Any other database (a browser's, an application's) is not a store: MLflow would run its migrations in
    it, adding its tables, and write the run there."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except (sqlite3.Error, ValueError):
        return False
    try:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return False
    finally:
        db.close()
    return {"alembic_version", "experiments", "runs", "metrics"} <= names


class ReplaySender(Sender):
    """A :class:`Sender` that checks everything a spool asks for (see the module's docstring)."""

    def __init__(self, spool: Path, tracking_uri: str | None = None) -> None:
        for path in (spool, state_path(spool)):
            if (why := not_yours(path)) is not None:
                raise ValueError(f"{path} {why}: replay sends only your own spools (one another user wrote could "
                                 "send your files, or your credentials, where it likes, or change your runs); run "
                                 "replay as its owner, or take the files over (chown) if you trust them")
        super().__init__(spool, tracking_uri)
        self.folder = spool.resolve().parent
        target = self.header.get("target")
        if not isinstance(target, dict):
            raise ValueError(f"{spool}: its header has no run target: not a spool green-callbacks wrote")
        t_ms, local_id = self.header.get("t_ms"), target.get("local_id") or self.header.get("local_id")
        if isinstance(t_ms, bool) or not isinstance(t_ms, int) or t_ms < 0 or not local_id:  # (read at the run's
            # opening: a KeyError there was reported as "MLflow ... cannot be reached", and a retry never mends it)
            raise ValueError(f"{spool}: its header has no {'t_ms' if local_id else 'local_id'} (when and as "
                             "what the training opened it): not a spool green-callbacks wrote; refused")
        ids = (("target.run_id", target.get("run_id")), ("target.local_id", target.get("local_id")),
               ("local_id", self.header.get("local_id")), ("env_experiment_id", self.header.get("env_experiment_id")))
        for name, value in ids:
            if value is not None and not (isinstance(value, str) and _ID.match(value)):
                raise ValueError(f"{spool}: {name}={value!r} is not an id green-callbacks writes; refused")
        for name in ("experiment_name", "run_name", "tracking_uri"):
            if not isinstance(target.get(name), str | None):
                raise ValueError(f"{spool}: target.{name}={target.get(name)!r} is not a string; refused")
        self.local_ids = {i for i in (target.get("local_id"), self.header.get("local_id")) if i}
        self.local_id = target.get("local_id") or self.header.get("local_id")  # the one a run is tagged with (tracking)
        self.claimed_run: str | None = target.get("run_id")
        self.user_named = tracking_uri is not None
        recorded = self.state.tracking_uri if isinstance(self.state.tracking_uri, str) else None
        self.override = tracking_uri or without_credentials(recorded or resolve_uri(self.header))
        if not self.user_named:
            self._check_destination(self.override)
        self.header = {**self.header, "target": {**target, "owned": False}}  # a claim sets no status, proof does

    def _check_destination(self, uri: str) -> None:
        again = f"run replay again with --tracking-uri {uri} if that is where the run belongs"
        store = local_store(uri)
        if store is not None and not _store_exists(store):
            what = "is not an MLflow store" if store.is_file() and store.stat().st_size else "does not exist"
            raise ValueError(f"{self.spool} names the MLflow store {uri}, which {what}; replay creates no store at a "
                             f"path a spool names (nor MLflow's tables in another database): create it, or {again}")
        if store is not None and (why := not_yours(store)) is not None:  # its runs' artifact folders are its say
            raise ValueError(f"{self.spool} names the MLflow store {uri}, which {why}: replay writes only to "
                             f"stores of your own: {again}")
        if store is None and is_database(uri):  # a database server: MLflow would run its migrations in whatever
            # database the spool names, one of yours a local server lets in without a password included
            raise ValueError(f"{self.spool} names the database {uri}; replay writes to a database server only when "
                             f"you name it (its user and password are never in a spool): run replay again with "
                             f"--tracking-uri {uri}, its user and password in it")
        secrets = credentials()
        env_uri = without_credentials(os.environ.get("MLFLOW_TRACKING_URI"))
        if store is None and secrets and (not env_uri or _server(env_uri) != _server(uri)):
            raise ValueError(f"{self.spool} names the server {uri}; MLflow credentials here "
                             f"({', '.join(secrets)}) go only to a server you name: {again}")

    # -- the records -------------------------------------------------------------------------------
    def _take(self, item: Record | Unreadable) -> None:
        """Every record read (a deferred artifact read again included) is vetted before it is queued."""
        if isinstance(item, Record) and (why := self._refusal(item)) is not None:
            item = replace(item, kind=REFUSED, data={
                "reason": why, "record": {"kind": item.kind, "step": item.step, "data": item.data}})
        super()._take(item)

    def _refusal(self, r: Record) -> str | None:
        """Why a record is not one this package writes; None when it is."""
        if r.kind in ("params", "tags"):
            bad = [k for k in r.data if not (isinstance(k, str) and k.startswith("green."))]
            return f"{r.kind} {bad} are not green-callbacks' own (green.*)" if bad else None
        if r.kind in ("metrics", "held"):
            bad = [k for k, v in r.data.items() if isinstance(v, bool) or not isinstance(v, int | float)
                   or (isinstance(v, int) and abs(v) >= 2 ** 63)]
            step_ok = r.step is None or (isinstance(r.step, int) and not isinstance(r.step, bool)
                                         and -2 ** 63 <= r.step < 2 ** 63)  # MLflow's steps are 64-bit
            return None if not bad and step_ok else f"metrics {bad} (step {r.step!r}) are not numbers MLflow takes"
        if r.kind == "artifact":
            return self._artifact_refusal(r.data)
        if r.kind == "status":
            return None if r.data.get("status") in ("FINISHED", "FAILED", "KILLED") else "not a final status"
        if r.kind == "close":
            wait = r.data.get("wait_s", 0.0)
            return None if isinstance(wait, int | float) and not isinstance(wait, bool) else "wait_s is not a number"
        return None

    def _artifact_refusal(self, data: dict[str, Any]) -> str | None:
        path = data.get("path")
        why = (f"replay uploads only green-callbacks' own files ({', '.join(ARTIFACT_NAMES)}) from a run folder beside "
               f"the spool ({self.folder}{os.sep}<run>{os.sep}), never through a link")
        if not isinstance(path, str) or data.get("artifact_path") != ARTIFACT_DIR:
            return why
        p = Path(path)
        if not p.is_absolute() or p.name not in ARTIFACT_NAMES or p.parent.parent != self.folder \
                or os.path.realpath(p) != str(p):
            return why
        if p.exists() and (owner := not_yours(p)) is not None:
            return f"{p} {owner}: {why}"
        return None

    _vetted_line = 0  # the last line whose metrics _foreign_metrics looked at

    def _foreign_metrics(self) -> None:
        """Into a run this spool's tag does not prove this package opened (a trainer's logger's, or one a forged
        header names), only this package's own metrics go; the others (a plain loop's ``report`` sends the user's
        metrics into the tracker's own run) are set aside."""
        for i, r in enumerate(self.pending):
            if not (isinstance(r, Record) and r.kind in ("metrics", "held")) or r.line <= self._vetted_line:
                continue
            self._vetted_line = r.line  # each record looked at once (the queue is rescanned at every send)
            foreign = sorted(k for k in r.data if not (isinstance(k, str) and k.startswith(OWN_METRICS)))
            if foreign:
                self._set_aside(r.line, f"metrics {foreign} are not green-callbacks' own, and the run "
                                f"{self.state.run_id} does not carry this spool's tag {LOCAL_ID_TAG}",
                                {"kind": r.kind, "step": r.step, "data": {k: r.data[k] for k in foreign}},
                                f"metrics not green-callbacks' own (line {r.line})", refused=False)
                self.pending[i] = replace(r, data={k: v for k, v in r.data.items() if k not in foreign})

    def _send_next(self) -> bool | None:
        item = self.pending[0]
        if isinstance(item, Record) and item.kind == REFUSED:
            record = item.data["record"]
            self._set_aside(item.line, item.data["reason"], record, f"line {item.line} ({record['kind']})",
                            refused=False)
            return self._done([item])
        if not self.state.owned:
            self._foreign_metrics()
        if isinstance(item, Record) and item.kind == "status" and not self.state.owned:
            self.note("status", f"green-callbacks: the status {item.data['status']} is not set: the run "
                                f"{self.state.run_id} does not carry this spool's tag {LOCAL_ID_TAG}, so "
                                "green-callbacks did not open it (the trainer's logger, or a forged spool)")
            return self._done([item])
        return super()._send_next()

    # -- the run -------------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.client is not None and self.client.run_id is not None:
            return
        super()._open()
        assert self.client is not None and self.client.run_id is not None
        run_id = self.client.run_id
        tags = self.client.client.get_run(run_id).data.tags
        mine = tags.get(LOCAL_ID_TAG) in self.local_ids
        if not mine and run_id != self.claimed_run:
            self.client.run_id = None
            raise Blocked(f"{state_path(self.spool)} names the run {run_id}, which is not this spool's run (its "
                          f"header names {self.claimed_run or 'a run tagged ' + LOCAL_ID_TAG}); delete the state "
                          "file if the spool is yours")
        self.state.owned = mine
        self.save()

    def plan(self, from_user: bool) -> str:
        """What will be sent where, in one line, before anything is."""
        kinds = Counter(r.kind for r in self.pending if isinstance(r, Record))
        files = [Path(r.data["path"]).name for r in self.pending if isinstance(r, Record) and r.kind == "artifact"]
        what = ", ".join(f"{kinds[k]} {k} records" for k in ("metrics", "params", "tags", "status") if kinds[k])
        target = self.header["target"]
        run = (self.state.run_id or self.claimed_run or
               f"the run tagged {LOCAL_ID_TAG}={self.local_id or '?'} in experiment "
               f"{target.get('experiment_name') or self.header.get('env_experiment_name') or 'Default'} "
               "(created if missing)")
        refused = f"; {kinds[REFUSED]} records refused (set aside)" if kinds[REFUSED] else ""
        return (f"replay {self.spool}: {what or 'nothing'}{', files ' + ', '.join(files) if files else ''} to run "
                f"{run} at {self.uri} ({'--tracking-uri' if from_user else 'named by the spool'}){refused}")
