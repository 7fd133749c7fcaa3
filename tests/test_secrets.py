"""A password in a tracking URI reaches MLflow through its environment variables, and nothing this package
writes or prints holds it: artifacts, spool, checkpoints, HF's trainer_state.json, the summary line."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from test_hf_monitor import digits, hf_trainer  # noqa: F401 - digits is a fixture
from test_intervals import lightning_fit

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt
from green_callbacks.sinks.spool import State
from green_callbacks.uris import redact, split_credentials

from helpers import lightning_digits_module

SECRET = "hunter2-s3cr3t"


class Unavailable:
    """A server that answers every request 503 (down for maintenance), keeping each request's Authorization."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.authorizations: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                    head += chunk
                for line in head.decode("latin-1").split("\r\n"):
                    if line.lower().startswith("authorization:"):
                        self.authorizations.append(line.split(":", 1)[1].strip())
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture
def unavailable():
    server = Unavailable()
    yield server
    server.sock.close()


def stop_sender(out: Path) -> None:
    for spool in out.glob("spool-*[0-9a-f].jsonl"):
        pid = State.load(spool).pid
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def assert_nowhere(root: Path, *texts: str) -> int:
    """No file under ``root`` and none of ``texts`` holds the secret; how many files were read."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    for text in texts:
        assert SECRET not in text
    return len(files)


def test_split_credentials():
    assert split_credentials(f"http://me:{SECRET}@host:5000/x?y=1") == (
        "http://host:5000/x?y=1", {"MLFLOW_TRACKING_USERNAME": "me", "MLFLOW_TRACKING_PASSWORD": SECRET})
    assert split_credentials("https://me%40corp:p%3Aw@h") == (
        "https://h", {"MLFLOW_TRACKING_USERNAME": "me@corp", "MLFLOW_TRACKING_PASSWORD": "p:w"})
    assert redact("sqlite:////tmp/a@b/m.db") == "sqlite:////tmp/a@b/m.db"
    assert redact(None) is None and redact("databricks") == "databricks"


def test_lightning_run_writes_and_prints_no_password(tmp_path, unavailable, capsys, caplog):
    out = tmp_path / "out"
    monitor = gl.EnergyMonitor(tracking_uri=f"http://me:{SECRET}@127.0.0.1:{unavailable.port}",
                               output_dir=str(out), experiment_name="secret")
    caplog.set_level(logging.INFO)
    try:
        trainer = lightning_fit(tmp_path, lightning_digits_module()(), [monitor], max_epochs=2)
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    finally:
        stop_sender(out)
    printed = capsys.readouterr()
    expected = "Basic " + base64.b64encode(f"me:{SECRET}".encode()).decode()
    assert unavailable.authorizations and set(unavailable.authorizations) == {expected}, "through MLflow's env vars"
    assert (tmp_path / "last.ckpt").exists() and any(out.rglob("summary.json")) and any(out.glob("spool-*.jsonl"))
    assert f"http://127.0.0.1:{unavailable.port}" in next(out.glob("spool-*[0-9a-f].jsonl")).read_text()
    assert assert_nowhere(tmp_path, printed.out, printed.err, caplog.text) >= 5


def test_hf_run_writes_and_prints_no_password(tmp_path, digits, unavailable, capsys, caplog):  # noqa: F811
    out = tmp_path / "out"
    monitor = gt.EnergyMonitor(tracking_uri=f"http://me:{SECRET}@127.0.0.1:{unavailable.port}",
                               output_dir=str(out))
    caplog.set_level(logging.INFO)
    try:
        hf_trainer(tmp_path, digits, [monitor], epochs=1, save_strategy="epoch").train()
    finally:
        stop_sender(out)
    printed = capsys.readouterr()
    (state,) = (tmp_path / "hf").rglob("trainer_state.json")
    assert f'"tracking_uri": "http://127.0.0.1:{unavailable.port}"' in state.read_text()
    assert assert_nowhere(tmp_path, printed.out, printed.err, caplog.text) >= 5


def test_a_named_run_is_recorded_without_the_password(tmp_path, unavailable):
    from green_callbacks.sinks import MlflowSink, RunTarget

    out = tmp_path / "out"
    sink = MlflowSink(RunTarget(f"http://me:{SECRET}@127.0.0.1:{unavailable.port}", "a" * 32, owned=False), out,
                      close_wait_s=0)
    try:
        assert sink.run_ref.tracking_uri == f"http://127.0.0.1:{unavailable.port}"  # summary.json, checkpoints
        sink.close()
    finally:
        stop_sender(out)
    assert assert_nowhere(tmp_path) >= 1


def test_the_report_prints_no_password_and_sends_it_as_mlflows_credentials(unavailable, monkeypatch, capsys):
    """``green-callbacks report EXP --tracking-uri http://me:PW@host``: the error printed the URI whole, and
    MLflow's own message (the request's URL) repeated it."""
    from green_callbacks.cli import main as cli

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the server answers 503: no retries to wait out
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert cli(["report", "ft", "--tracking-uri", f"http://me:{SECRET}@127.0.0.1:{unavailable.port}"]) != 0
    out, err = capsys.readouterr()
    assert f"cannot read MLflow at http://127.0.0.1:{unavailable.port}" in err
    assert_nowhere(Path("/nonexistent"), out, err)
    assert unavailable.authorizations and all(
        base64.b64decode(a.split()[1]).decode() == f"me:{SECRET}" for a in unavailable.authorizations)
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ, "set for the report's calls only"
