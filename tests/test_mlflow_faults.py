"""MLflow away, hung, restarted or refusing, the training killed: nothing finished is lost, training never waits.

MLflow's client runs at its default settings (no ``MLFLOW_HTTP_REQUEST_*`` here). The server is a real
``mlflow server`` on 127.0.0.1; a ``Link`` stands between client and server as a network does: up
(forwards), down (nothing listens) or hung (accepts and never answers). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import psutil
import pytest
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from test_hf_monitor import digits, hf_trainer  # noqa: F401 - digits is a fixture
from test_lightning_monitor import ValModel, trainer
from transformers import TrainerCallback

from green_callbacks.cli import main as cli
from green_callbacks.lightning import EnergyMonitor
from green_callbacks.records import Kind
from green_callbacks.sinks import read_spool
from green_callbacks.sinks.spool import State
from green_callbacks.transformers import EnergyMonitor as HfEnergyMonitor

from helpers import MlflowServer, fake_nvml_env, free_port, ready_store, settle

SCRIPT = Path(__file__).parent / "fault_scripts" / "mlflow_kill.py"


class Link:
    """A TCP hop on 127.0.0.1 in front of a real server: ``up``, ``down`` (port closed) or ``hung``, or a few
    faulty servers (``flaky``, ``slow-create``, ``late-create``, ``deny-writes``: every write answered 401, reads
    served; ``deny-writes-json``: the same, in the JSON of a gateway, without MLflow's ``error_code``; ``deploy``: every
    write answered ``404 <html>Not Found</html>``, as a gateway during a deploy; ``artifacts-413`` and
    ``artifacts-500``: every artifact upload refused by a proxy's body limit, or failed by a broken artifact store).

    Changing state drops every open connection, as a server that goes away does.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.state = "down"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.answered: dict[str, int] = {}  # requests the link answered itself, per state

    def set(self, state: str) -> None:
        with self._lock:
            self.state = state
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()
            if state == "down" and self._listener is not None:
                self._listener.close()
                self._listener = None
            elif state != "down" and self._listener is None:
                self._listener = socket.socket()
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listener.bind(("127.0.0.1", self.port))
                self._listener.listen(64)
                threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(conn)
                if self.state in FAULTY:
                    threading.Thread(target=self._flaky, args=(conn,), daemon=True).start()
                    continue
                if self.state != "up":
                    continue  # hung: the request is never read, never answered
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
                self._open.append(upstream)
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()

    requests = 0  # in ``flaky``: the requests seen, every other one answered 503
    creates = 0  # in ``slow-create`` and ``late-create``: the runs/create requests seen
    made = 0  # in ``late-create``: those passed on to the server (the run made)

    def _flaky(self, conn: socket.socket) -> None:
        """``flaky``: a replica behind a round-robin balancer answers every other request 503 (one request per
        connection, as the balancer closes them); the others go to the server. ``slow-create``: every request
        goes to the server, and a run's creation is answered 6 s late (a loaded or cold server); ``late-create``:
        every run's creation reaches the server 9 s late (a queue in front of it), and is answered then."""
        with contextlib.suppress(OSError), conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            first = head.split(b"\r\n")[0]
            with self._lock:
                self.requests += 1
                state = self.state
                bad = self.requests % 2 == 1 and state == "flaky"
                slow = state in ("slow-create", "late-create") and b"/runs/create " in first
                self.creates += slow
                answer = ANSWERS.get(state) if (b"/runs/log-batch " in first if state in WRITES
                                                else b"/mlflow-artifacts/" in first) else None
                if answer is not None:
                    self.answered[state] = self.answered.get(state, 0) + 1
            if bad:
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if answer is not None:
                status, kind, text = answer
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(text)}\r\n"
                             "Connection: close\r\n\r\n".encode() + text)
                return
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            if slow and state == "late-create":
                time.sleep(9.0)
                with self._lock:
                    self.made += 1
            with socket.create_connection(("127.0.0.1", self.upstream)) as upstream:
                upstream.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
                if slow and state == "slow-create":
                    time.sleep(6.0)
                while chunk := upstream.recv(65536):
                    conn.sendall(chunk)

    def seen(self, state: str) -> int:
        """How many requests the link answered itself in ``state``."""
        with self._lock:
            return self.answered.get(state, 0)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# what the link answers itself: (status line, content type, body); to writes (POST runs/log-batch) or uploads
ANSWERS = {
    "deny-writes": ("401 Unauthorized", "application/json",
                    b'{"error_code": "UNAUTHENTICATED", "message": "token expired"}'),
    "deny-writes-json": ("401 Unauthorized", "application/json", b'{"message": "Unauthorized"}'),
    "deploy": ("404 Not Found", "text/html", b"<html>Not Found</html>"),
    "artifacts-413": ("413 Request Entity Too Large", "text/html",
                      b"<html><h1>413 Request Entity Too Large</h1>nginx</html>"),
    "artifacts-500": ("500 Internal Server Error", "text/plain", b"artifact store unavailable"),
}
WRITES = ("deny-writes", "deny-writes-json", "deploy")
FAULTY = ("flaky", "slow-create", "late-create", *ANSWERS)


def store(path: Path) -> str:
    return ready_store(path.parent, path.name)


@pytest.fixture(scope="module", autouse=True)
def starting_server(request, tmp_path_factory):
    """The module's real MLflow server, starting (tens of seconds here) while the first tests run,
    when a selected test needs it."""
    root = tmp_path_factory.mktemp("server")
    store(root / "server.db")
    s = MlflowServer(root)
    thread = threading.Thread(target=s.start, daemon=True)
    if any("server" in item.fixturenames for item in request.session.items):
        thread.start()
    yield s, thread
    if thread.is_alive():
        thread.join(timeout=120)
    s.stop()


@pytest.fixture
def server(starting_server):
    s, thread = starting_server
    if thread.is_alive():
        thread.join(timeout=120)
    if s.proc is None:
        pytest.fail("the mlflow server did not start")
    return s


@pytest.fixture
def link(server):
    link = Link(server.port)
    yield link
    link.set("down")


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.25)


def the_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id]) if exp is not None else []
    assert len(found) <= 1, f"one run in {experiment}, not {len(found)}"
    return client, (found[0] if found else None)


def finished(uri: str, experiment: str) -> bool:
    _, run = the_run(uri, experiment)
    return run is not None and run.info.status == "FINISHED"


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_every_interval(client: MlflowClient, run_id: str, records) -> None:
    """Each epoch and evaluation the monitor recorded is in the run, once, at its step."""
    for kind, key in ((Kind.EPOCH, "energy/epoch_j"), (Kind.EVALUATION, "energy/interval_j")):
        assert steps(client, run_id, key) == sorted(r.step for r in records if r.kind is kind), key
    assert len(client.get_metric_history(run_id, "energy/total_j")) == 1


def no_spool(folder: Path) -> bool:
    return not list(folder.glob("spool-*.jsonl*")) or all(p.name.endswith(".rejected.jsonl")
                                                          for p in folder.glob("spool-*"))


class FirstStep:
    """When the first training step began."""

    def __init__(self) -> None:
        self.at: float | None = None

    def mark(self) -> None:
        if self.at is None:
            self.at = time.monotonic()


def start_script(tmp_path: Path, *args: str, uri: str | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(SCRIPT), *args, str(tmp_path)] + (["--uri", uri] if uri else [])
    env = fake_nvml_env("{}")
    env.pop("MLFLOW_TRACKING_URI", None)  # MLflow's default store: mlflow.db in the script's working directory
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def lines_until(proc: subprocess.Popen[str], prefix: str, timeout_s: float = 120.0) -> list[str]:
    """The script's lines up to the first starting with ``prefix`` (or its end)."""
    got: list[str] = []
    end = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        got.append(line.strip())
        if line.startswith(prefix) or time.monotonic() > end:
            break
    return got


@pytest.mark.slow
@pytest.mark.parametrize(("framework", "delay_ms"), [("lightning", 0), ("lightning", 5), ("hf", 0), ("hf", 5)])
def test_killed_right_after_an_epoch_hook_the_epoch_reaches_the_run(tmp_path, framework, delay_ms):
    # the sender dies too (the machine went down): only the spool is left, and replay sends it
    uri = store(tmp_path / "mlflow.db")  # MLflow's default store, in the script's working directory
    proc = start_script(tmp_path, framework, "--epochs", "3", "--kill-epoch", "1", "--delay-ms", str(delay_ms),
                        "--kill-sender")
    try:
        printed = lines_until(proc, "epoch 1")
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    spool = printed[0].split()[2]
    killed_at = int(printed[-1].split()[-1])
    assert cli(["replay", spool, "--wait", "10"]) == 0
    client, run = the_run(uri, "killed")
    assert steps(client, run.info.run_id, "energy/epoch_j")[-1] == killed_at
    assert len(steps(client, run.info.run_id, "energy/epoch_j")) == 2


class OddNames(ValModel):
    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val_acc@1", 0.5 + 0.1 * self.current_epoch)  # MLFlowLogger would log it as val_acc1
        self.log("val/../rank", 1.0)  # allowed characters, but MLflow refuses a name resolving to another path
        return out


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "hf"])
def test_a_refused_metric_name_costs_only_itself(tmp_path, green_log, digits, framework):  # noqa: F811
    uri, out = store(tmp_path / "m.db"), tmp_path / "out"
    if framework == "lightning":
        monitor = EnergyMonitor(tracking_uri=uri, experiment_name="names", output_dir=str(out))
        trainer(tmp_path, [monitor], max_epochs=3).fit(OddNames())
        renamed, refused = "val_acc@1", "val/../rank"
    else:
        def odd_metrics(pred):
            return {"acc@1": float((pred.predictions.argmax(-1) == pred.label_ids).mean()), "/../rank": 1.0}

        monitor = HfEnergyMonitor(tracking_uri=uri, experiment_name="names", output_dir=str(out))
        hf = hf_trainer(tmp_path, digits, [monitor], epochs=3)
        hf.compute_metrics = odd_metrics
        hf.train()
        renamed, refused = "eval_acc@1", "eval_/../rank"
    client, run = the_run(uri, "names")
    assert run.info.status == "FINISHED"
    assert_every_interval(client, run.info.run_id, monitor.records)
    evaluations = sorted(r.step for r in monitor.records if r.kind is Kind.EVALUATION)
    eff = steps(client, run.info.run_id, f"efficiency/{renamed.replace('@', '')}_per_kj")
    # per kJ needs energy: the CPU estimate can read 0 J before its first utilisation sample
    assert eff == evaluations[len(evaluations) - len(eff):] and len(eff) >= len(evaluations) - 1
    assert run.data.params and run.data.tags["green.method.cpu"] in ("estimated", "counter")
    assert len(client.list_artifacts(run.info.run_id, "green_callbacks")) == 4
    assert green_log.text.count(f"'efficiency/{renamed}_per_kj' is logged as") == 1
    assert green_log.text.count(f"refused the metric 'efficiency/{refused}_per_kj' (INVALID_PARAMETER_VALUE") == 1
    assert "the records wait in" not in green_log.text


@pytest.mark.slow
def test_a_torn_spool_line_and_a_resumed_process(tmp_path, capsys):
    uri = store(tmp_path / "m.db")
    ckpts = tmp_path / "ckpt"
    # the machine goes down at the start of epoch 3, after epoch 2's checkpoint: trainer and sender killed,
    # likely before the sender made the run (it calls MLflow 10 s in); the run is found by its local id
    proc = start_script(tmp_path, "lightning", "--epochs", "5", "--checkpoints", str(ckpts),
                        "--kill-at-start", "3", "--kill-sender", uri=uri)
    try:
        spool = Path(lines_until(proc, "sender")[-1].split()[2])
        assert proc.wait(timeout=120) == -signal.SIGKILL
    finally:
        proc.kill()
    with spool.open("ab") as f:  # it died in the middle of a write
        f.write(b'{"seq":99,"kind":"metrics","t":1795000000000,"step":48,"data":{"energy/epo')
    torn_line = len(spool.read_bytes().splitlines())
    resumed = start_script(tmp_path, "lightning", "--epochs", "5", "--resume", str(ckpts / "last.ckpt"), uri=uri)
    assert resumed.wait(timeout=120) == 0

    assert cli(["replay", str(spool), "--wait", "10"]) == 0
    assert f"line {torn_line} of {spool} cannot be read" in capsys.readouterr().err
    client, run = the_run(uri, "killed")
    epochs = steps(client, run.info.run_id, "energy/epoch_j")
    assert len(epochs) == 5 and len(set(epochs)) == 5, "every epoch of both processes, none twice"
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_unwritable_output_dir_costs_one_warning_and_the_run_finishes(tmp_path, green_log, capsys):
    uri = store(tmp_path / "m.db")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder's parent should be")
    monitor = EnergyMonitor(tracking_uri=uri, experiment_name="unwritable", output_dir=str(blocker / "out"))
    trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    client, run = the_run(uri, "unwritable")
    assert run.info.status == "FINISHED"
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert green_log.text.count("the MLflow spool is") == 1
    assert green_log.text.count("cannot write the run's outputs") == 1
    summary = capsys.readouterr().out
    assert "green-callbacks [finished]: 2 epochs" in summary and f"MLflow run {run.info.run_id}" in summary


@pytest.mark.slow
def test_a_monitor_reused_in_a_second_fit_never_logs_a_step_twice(tmp_path, digits):  # noqa: F811
    uri = store(tmp_path / "m.db")
    out = str(tmp_path / "out")
    logger = MLFlowLogger(experiment_name="logger", tracking_uri=uri)
    given = EnergyMonitor(output_dir=out)  # logs into the logger's run: the second fit continues its steps
    own = HfEnergyMonitor(tracking_uri=uri, experiment_name="hf", output_dir=out)  # its own run: a new one
    twice = HfEnergyMonitor(tracking_uri=uri, experiment_name="hf-twice", output_dir=out)
    for _ in range(2):
        trainer(tmp_path, [given], max_epochs=2, logger=logger).fit(ValModel())
        hf_trainer(tmp_path, digits, [own], epochs=1).train()
    same = hf_trainer(tmp_path, digits, [twice], epochs=1)
    same.train()
    same.train()  # the same Trainer (and TrainingArguments) again: a new training, so a new run
    client = MlflowClient(uri)
    for experiment, runs, points in (("logger", 1, 4), ("hf", 2, 2), ("hf-twice", 2, 2)):
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(found) == runs, experiment
        for run in found:
            epochs = steps(client, run.info.run_id, "energy/epoch_j")
            assert len(epochs) == len(set(epochs)), f"{experiment}: a step logged twice {epochs}"
        assert sum(len(steps(client, r.info.run_id, "energy/epoch_j")) for r in found) == points, experiment
    # the second fit's intervals go forwards from where the first's ended, each covering the steps it says
    assert all(r.start_step <= r.step for r in given.records), [(r.kind.value, r.start_step, r.step)
                                                               for r in given.records]
    assert sorted(r.start_step for r in given.records if r.kind.value == "epoch") == [
        r.start_step for r in given.records if r.kind.value == "epoch"]


@pytest.mark.slow
def test_a_monitor_reused_for_another_users_run_starts_that_run_from_zero(tmp_path, digits):  # noqa: F811
    """A second training in another run of the user's (a new ``mlflow.start_run()``, HF's MLflowCallback's run of
    a new Trainer): its energy from step 0 and 0 J, not the first run's axis and totals carried on."""
    uri = store(tmp_path / "m.db")
    out = str(tmp_path / "out")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("active")
        given = EnergyMonitor(output_dir=out)
        for _ in range(2):
            with mlflow.start_run():
                trainer(tmp_path, [given], max_epochs=2).fit(ValModel())
        mlflow.set_experiment("hf-runs")
        hf = HfEnergyMonitor(output_dir=out)
        for _ in range(2):
            hf_trainer(tmp_path, digits, [hf], epochs=1, report_to=["mlflow"]).train()
    finally:  # set_experiment leaves MLflow's fluent experiment set, and MLFLOW_EXPERIMENT_ID for subprocesses
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    client = MlflowClient(uri)
    for experiment in ("active", "hf-runs"):
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(found) == 2, experiment
        epochs = [steps(client, r.info.run_id, "energy/epoch_j") for r in found]
        assert epochs[0] == epochs[1], f"{experiment}: each run on its own trainer's axis {epochs}"
        totals = [client.get_metric_history(r.info.run_id, "energy/total_j")[-1].value for r in found]
        firsts = [client.get_metric_history(r.info.run_id, "energy/cumulative_j") for r in found]
        for total, history in zip(totals, firsts, strict=True):
            assert min(m.value for m in history) <= total, "counted from 0 J in each run"
        # a total carried on is the earlier run's total plus the later run's own, of which its epochs are the most:
        # what the later total has beyond its own epochs stays under the earlier run's whole total (a ratio of the
        # two totals was noise: a CPU estimate on a loaded CI machine read 2.9 J and 0.9 J for like trainings)
        (later, later_total), (_, earlier_total) = sorted(zip(found, totals, strict=True),
                                                          key=lambda pair: -pair[0].info.start_time)
        own_epochs = sum(m.value for m in client.get_metric_history(later.info.run_id, "energy/epoch_j"))
        assert later_total - own_epochs < earlier_total, \
            f"{experiment}: the later run carries the earlier's total {earlier_total} ({later_total}, {own_epochs})"


@pytest.mark.slow
def test_hf_a_training_that_raised_is_ended_before_the_next_one_starts(tmp_path, digits):  # noqa: F811
    """HF tells no callback of an exception: the next train() with the same monitor ends the failed one's run
    (FAILED, not left RUNNING) and logs into a new run of its own, never a step twice."""
    uri = store(tmp_path / "m.db")

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("boom")

    monitor = HfEnergyMonitor(tracking_uri=uri, experiment_name="raised", output_dir=str(tmp_path / "out"),
                              log_every_n_steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        hf_trainer(tmp_path, digits, [monitor, Boom()], epochs=1).train()
    hf_trainer(tmp_path, digits, [monitor], epochs=1).train()
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("raised").experiment_id], order_by=["start_time"])
    assert sorted(r.info.status for r in found) == ["FAILED", "FINISHED"]
    for run in found:
        points = steps(client, run.info.run_id, "energy/cumulative_j")
        assert len(points) == len(set(points)), f"a step logged twice: {points}"
    assert monitor.summary()["epochs"] == 1


@pytest.mark.slow
def test_hf_after_a_training_that_raised_evaluate_is_a_stage_of_its_own(tmp_path, digits):  # noqa: F811
    """An evaluate() after a train() that raised (the same Trainer, whose state is the failed training's): the
    failed run ends FAILED and the evaluation is measured as an evaluation of its own, in a new run."""
    uri = store(tmp_path / "m.db")

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("boom")

    monitor = HfEnergyMonitor(tracking_uri=uri, experiment_name="raised-then-eval", output_dir=str(tmp_path / "out"))
    t = hf_trainer(tmp_path, digits, [monitor, Boom()], epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    t.evaluate()
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("raised-then-eval").experiment_id],
                               order_by=["start_time"])
    assert [r.info.status for r in found] == ["FAILED", "FINISHED"]
    assert not client.get_metric_history(found[0].info.run_id, "energy/evaluate_j")
    assert len(client.get_metric_history(found[1].info.run_id, "energy/evaluate_j")) == 1


@pytest.mark.slow
def test_hf_auto_find_batch_size_retry_is_the_same_training(tmp_path, digits):  # noqa: F811
    """HF's auto_find_batch_size starts the training again after an out-of-memory error, with a new state: one
    training, one run, FINISHED, its totals including the attempt that ran out of memory."""
    uri = store(tmp_path / "m.db")

    class OutOfMemoryOnce(TrainerCallback):
        done = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and not self.done:
                self.done = True
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monitor = HfEnergyMonitor(tracking_uri=uri, experiment_name="auto-bs", output_dir=str(tmp_path / "out"))
    hf_trainer(tmp_path, digits, [monitor, OutOfMemoryOnce()], epochs=1, auto_find_batch_size=True).train()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("auto-bs").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "energy/total_j")) == 1


@pytest.mark.slow
def test_hf_evaluate_after_train_stays_in_the_trainings_run(tmp_path, digits, monkeypatch):  # noqa: F811
    """HF's MLflowCallback ends its run at the end of train(); an evaluate() after it logs HF's metrics into a run
    MLflow starts on its own. The evaluation is a later stage of the training: its energy stays in the training's
    run."""
    uri = ready_store(tmp_path, "m.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        monitor = HfEnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
        t = hf_trainer(tmp_path, digits, [monitor], epochs=1, report_to=["mlflow"])
        t.train()
        trained = monitor.run.run_id
        t.evaluate()
        with contextlib.suppress(Exception):
            mlflow.end_run()
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    assert monitor.run.run_id == trained
    assert len(client.get_metric_history(trained, "energy/evaluate_j")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "hf"])
def test_server_down_at_start_then_up(tmp_path, server, link, digits, framework, green_log):  # noqa: F811
    experiment, first = f"late-{framework}", FirstStep()
    out = tmp_path / "out"

    def back_once_it_was_missed() -> None:
        """Up again once the sender has found it down (a flush makes it call MLflow now, not 10 s in)."""
        monitor.sink.flush(0)
        wait_for("the sender found MLflow down", lambda: any(
            "cannot be reached" in note for note in State.load(monitor.sink.spool_path).notes), 60)
        link.set("up")

    t0 = time.monotonic()
    if framework == "lightning":
        class Net(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                first.mark()

            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == 1:
                    back_once_it_was_missed()

        monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name=experiment, output_dir=str(out))
        trainer(tmp_path, [monitor, Net()], max_epochs=4).fit(ValModel())
    else:
        class HfNet(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                first.mark()

            def on_epoch_end(self, args, state, control, **kwargs):
                if round(state.epoch) == 2:
                    back_once_it_was_missed()

        monitor = HfEnergyMonitor(tracking_uri=link.uri, experiment_name=experiment, output_dir=str(out))
        hf_trainer(tmp_path, digits, [monitor, HfNet()], epochs=4).train()
    assert first.at is not None and first.at - t0 < 30, "the first step did not wait for MLflow"
    wait_for("the run finished in MLflow", lambda: finished(server.uri, experiment))
    client, run = the_run(server.uri, experiment)
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert "green_callbacks/summary.json" in [a.path for a in client.list_artifacts(run.info.run_id, "green_callbacks")]
    assert green_log.text.count("cannot be reached") == 1, "one warning for the outage"
    wait_for("the sender removed its spool", lambda: no_spool(out), 30)


def test_a_server_answering_every_other_request_503_gets_everything(tmp_path, server, link, green_log):
    """A balancer over a healthy and a failing replica: every other request is a 503. The sender retried whole
    sequences (find the run, create it), which then failed at the same request every time: no run was created."""
    link.set("flaky")
    out = tmp_path / "out"
    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name="flaky", output_dir=str(out))
    trainer(tmp_path, [monitor], max_epochs=3).fit(ValModel())
    wait_for("the run finished in MLflow", lambda: finished(server.uri, "flaky"), 90)
    client, run = the_run(server.uri, "flaky")
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert link.requests > 4 and "the records wait in" not in green_log.text
    wait_for("the sender removed its spool", lambda: no_spool(out), 30)


@pytest.mark.parametrize("state", ["slow-create", "late-create"])
def test_a_server_slow_to_create_the_run_leaves_one_run(tmp_path, server, link, green_log, state):
    """A server that answers the run's creation after the sender's timeout. The sender sends it again, and the
    server made a run per try (two stayed RUNNING and empty for ever beside the real one); since MLflow 3.18, whose
    client no longer retries a create, the creation failed and the sender began again later. ``slow-create``: the
    run is made at once and answered late, and the sender finds it before creating another. ``late-create``: the
    run is made late, so the sender creates again; the second creation reaches the server after the sender found
    the first run, and its twin, made before the training's end, is deleted then."""
    link.set(state)
    out = tmp_path / "out"
    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name=state, output_dir=str(out))

    class TwinMade(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            if state == "late-create":
                wait_for("the second creation made a run", lambda: link.made >= 2, 60)

    trainer(tmp_path, [TwinMade(), monitor], max_epochs=3).fit(ValModel())  # (its end before the status)

    def ended() -> bool:
        exp = MlflowClient(server.uri).get_experiment_by_name(state)
        return exp is not None and any(r.info.status == "FINISHED"
                                       for r in MlflowClient(server.uri).search_runs([exp.experiment_id]))

    wait_for("the run finished in MLflow", ended, 120)
    client, run = the_run(server.uri, state)  # one live run
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert link.creates == 1 if state == "slow-create" else link.creates > 1
    exp = client.get_experiment_by_name(state)
    every = client.search_runs([exp.experiment_id], run_view_type=3)  # deleted runs too
    assert len(every) == link.creates and all(r.info.lifecycle_stage == "deleted"
                                              for r in every if r.info.run_id != run.info.run_id)
    assert "the records wait in" not in green_log.text  # no outage: one request was slow


def end_wait_s(tmp_path, uri: str) -> float:
    """A short fit logging to ``uri`` with ``mlflow_wait_s=2``: the seconds from training's end to fit's return."""
    monitor = EnergyMonitor(tracking_uri=uri, output_dir=str(tmp_path / "out"), mlflow_wait_s=2, log_artifacts=False)
    t = trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    ended = []

    class End(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            ended.append(time.monotonic())

    t.callbacks.insert(0, End())
    t.fit(ValModel())
    return time.monotonic() - ended[0]

def test_a_store_that_is_no_database_is_a_refusal_and_the_end_waits_only_mlflow_wait_s(tmp_path, green_log):
    """An ``mlflow.db`` that is not a database: opening it failed inside the client's constructor, before the
    sender had noted that it was trying, so the end waited ``mlflow_wait_s`` plus the start-up allowance (30 s)
    and called it an outage, retried for a minute."""
    (tmp_path / "mlflow.db").write_bytes(b"not a database " * 100)
    assert end_wait_s(tmp_path, f"sqlite:///{tmp_path}/mlflow.db") < 12, \
        "the end waited for the store far beyond mlflow_wait_s"

    def said() -> str:  # the end relays the sender's notes; on a loaded machine the sender may say it later
        spools = [p for p in (tmp_path / "out").glob("spool-*.jsonl") if not p.name.endswith(".rejected.jsonl")]
        return green_log.text + "".join(" ".join(State.load(p).notes) for p in spools)

    wait_for("the sender named the broken store", lambda: "file is not a database" in said(), 60)
    assert "the records wait in" not in said()


PIPED = """
import atexit, sys, time
atexit.register(lambda: print("exited", time.time(), flush=True))  # registered first: runs last
import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel
from green_callbacks.lightning import EnergyMonitor
monitor = EnergyMonitor(tracking_uri=sys.argv[1], output_dir=sys.argv[2], mlflow_wait_s=1, log_artifacts=False)
pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[monitor], logger=False,
           enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(BoringModel())
print("spool", monitor.sink.spool_path if monitor.sink else monitor.summary().get("mlflow_spool"), flush=True)
"""


CHECKPOINT_KILLED = """
import os, signal, sys
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from green_callbacks.lightning import EnergyMonitor

class Kill(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 8:  # the machine goes down: the training and its sender
            os.kill(monitor.sink.sender_pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

monitor = EnergyMonitor(tracking_uri=sys.argv[1], experiment_name="ckpt", output_dir=sys.argv[2],
                        log_every_n_steps=1000)
pl.Trainer(max_epochs=1, limit_train_batches=20, limit_val_batches=2, logger=False, enable_progress_bar=False,
           enable_model_summary=False, num_sanity_val_steps=0,
           callbacks=[monitor, Kill(), ModelCheckpoint(dirpath=sys.argv[2] + "/ckpt", every_n_train_steps=5,
                                                       save_top_k=-1)]).fit(BoringModel())
"""


@pytest.mark.slow
def test_killed_after_a_step_checkpoint_its_point_reaches_the_run(tmp_path):
    """A step checkpoint's point (its totals saved in the checkpoint) kept its metrics in memory until the next
    point: a kill -9 before that lost them, though the hook that made them had returned."""
    uri, out = store(tmp_path / "m.db"), tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(CHECKPOINT_KILLED)
    proc = subprocess.run([sys.executable, str(script), uri, str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=fake_nvml_env("{}"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert cli(["replay", str(out)]) == 0
    client, run = the_run(uri, "ckpt")
    assert 4 in steps(client, run.info.run_id, "energy/cumulative_j"), "the checkpoint's point, at its step"


INTERRUPTED_END = """
import sys, time
import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel
from green_callbacks.lightning import EnergyMonitor

class End(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        print("end", flush=True)

monitor = EnergyMonitor(tracking_uri=sys.argv[1], output_dir=sys.argv[2], mlflow_wait_s=30)
pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[End(), monitor], logger=False,
           enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(BoringModel())
"""


INTERRUPTED_LOOP_END = """
import sys
from green_callbacks import EnergyTracker

with EnergyTracker(tracking_uri=sys.argv[1], output_dir=sys.argv[2], mlflow_wait_s=30) as tracker:
    with tracker.epoch(0):
        sum(range(10 ** 6))
    print("end", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script_text, sig", [(INTERRUPTED_END, signal.SIGINT), (INTERRUPTED_END, signal.SIGTERM),
                                              (INTERRUPTED_LOOP_END, signal.SIGTERM)],
                         ids=["lightning-ctrl-c", "lightning-sigterm", "loop-sigterm"])
def test_ctrl_c_while_the_end_waits_for_mlflow_ends_at_once(tmp_path, script_text, sig):
    """The server down, ``mlflow_wait_s=30``: a Ctrl-C in the end's wait for MLflow cut the flush short, and
    close() then waited the whole 30 s again; and the run's files, written after that wait, were never written.
    A SIGTERM there (``timeout``, Slurm, Kubernetes, ``docker stop``) killed the process at once, without its files,
    and the finished training was marked KILLED; now it ends as a Ctrl-C does, then by the signal."""
    with _against_a_down_server(tmp_path, script_text) as (proc, out):
        assert lines_until(proc, "end")[-1] == "end"
        wait_for("the sender tries MLflow", lambda: any(State.load(p).trying_since for p in _spools(out)), 60)
        time.sleep(1.0)
        interrupted = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert time.monotonic() - interrupted < 10, "the end waited for MLflow again after the Ctrl-C"
        if script_text is INTERRUPTED_LOOP_END:  # nobody else handles SIGTERM: the process ends by it, as it would
            assert proc.returncode == -signal.SIGTERM
        # the run's files were written after the cut wait, not lost with it, and spooled as artifacts to send
        _files_written_and_spooled(out, "FINISHED")  # the training had ended


def _spools(out: Path) -> list[Path]:
    return [p for p in out.glob("spool-*.jsonl") if not p.name.endswith(".rejected.jsonl")]


@contextlib.contextmanager
def _against_a_down_server(tmp_path: Path, script_text: str):
    """The script run with a tracking URI where nothing listens and an output folder; killed at the end, with the
    senders it left."""
    script = tmp_path / "script.py"
    script.write_text(script_text)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), f"http://127.0.0.1:{free_port()}", str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=fake_nvml_env("{}"))
    try:
        yield proc, out
    finally:
        proc.kill()
        for spool in out.glob("spool-*.jsonl"):
            with contextlib.suppress(ProcessLookupError, TypeError, ValueError):
                os.kill(State.load(spool).pid, signal.SIGKILL)


def _files_written_and_spooled(out: Path, status: str) -> None:
    """The run's files are in its folder, spooled as artifacts for the sender, and the spool has ``status``."""
    assert {p.name for p in out.glob("*/*")} >= {"intervals.csv", "summary.json", "power_trace.csv"}
    (spool,) = _spools(out)
    records = read_spool(spool).records
    assert len([r for r in records if r.kind == "artifact"]) >= 3, "the files are spooled for the sender"
    assert [r.data["status"] for r in records if r.kind == "status"] == [status]


TERMINATED_TRAINING = """
import sys, time
import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel
from green_callbacks.lightning import EnergyMonitor

class Slow(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        print("epoch", trainer.current_epoch, flush=True)

    def on_train_batch_end(self, *args):
        time.sleep(0.02)

monitor = EnergyMonitor(tracking_uri=sys.argv[1], output_dir=sys.argv[2])
pl.Trainer(max_epochs=100000, limit_train_batches=4, limit_val_batches=2, callbacks=[Slow(), monitor], logger=False,
           enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(BoringModel())
"""


TERMINATED_LOOP = """
import sys, time
from green_callbacks import EnergyTracker

with EnergyTracker(tracking_uri=sys.argv[1], output_dir=sys.argv[2]) as tracker:
    for epoch in range(100000):
        with tracker.epoch(epoch):
            print("epoch", epoch, flush=True)
            time.sleep(0.1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script_text", [TERMINATED_TRAINING, TERMINATED_LOOP], ids=["lightning", "loop"])
def test_a_sigterm_in_training_ends_it_with_its_files_within_dockers_grace_period(tmp_path, script_text):
    """``docker stop`` (Kubernetes, Slurm, ``timeout``): SIGTERM, then SIGKILL 10 s later. The SIGTERM came during
    training with the server down, at MLflow's and the package's defaults: the end waited the whole 10 s for MLflow
    before writing the run's files, and the SIGKILL came first: no intervals.csv, no summary.json."""
    with _against_a_down_server(tmp_path, script_text) as (proc, out):
        assert lines_until(proc, "epoch 3")[-1] == "epoch 3"
        # (the sender may be starting still: the end's cap counts its start-up too, up to 30 s more before)
        terminated = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - terminated
        print(f"SIGTERM to exit: {took:.2f} s")
        assert took < 6, f"the end took {took:.1f} s of docker's 10-s grace period"
        _files_written_and_spooled(out, "KILLED")


@pytest.mark.slow
def test_a_lingering_sender_does_not_hold_the_trainings_output_pipe_open(tmp_path):
    """``python train.py | tee log``, a CI job, ``subprocess.run(capture_output=True)``: the pipe ends when every
    process holding it has closed it. The sender, lingering to send what MLflow did not take, held the training's
    stderr: the user's command returned a minute after the training had exited."""
    script = tmp_path / "piped.py"
    script.write_text(PIPED)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), f"http://127.0.0.1:{free_port()}", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    returned = time.time()
    exited = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("exited")))
    (spool,) = out.glob("spool-*[0-9a-f].jsonl")
    pid = State.load(spool).pid
    try:
        assert proc.returncode == 0, proc.stderr
        assert psutil.pid_exists(pid), "the sender lingers (MLflow never answered)"
        assert returned - exited < 10, f"the pipe stayed open {returned - exited:.1f} s after the training exited"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_server_down_at_start_and_never_back_replay_creates_and_fills_the_run(tmp_path, server, link, green_log,
                                                                             capsys):
    out = tmp_path / "out"
    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name="never", output_dir=str(out))
    t0 = time.monotonic()
    trainer(tmp_path, [monitor], max_epochs=3).fit(ValModel())
    assert time.monotonic() - t0 < 60, "training and its end took MLflow's minutes of retries"
    (spool,) = out.glob("spool-*[0-9a-f].jsonl")
    assert f"green-callbacks replay {spool}" in green_log.text
    held = read_spool(spool)
    assert sorted(r.step for r in held.records if r.kind == "metrics" and "energy/epoch_j" in r.data) == \
        sorted(r.step for r in monitor.records if r.kind is Kind.EPOCH)
    assert [r.data["status"] for r in held.records if r.kind == "status"] == ["FINISHED"]
    # the sender would keep trying a while; here it gave up (the machine was switched off, say)
    with contextlib.suppress(ProcessLookupError):
        os.kill(State.load(spool).pid, signal.SIGKILL)

    link.set("up")
    assert cli(["replay", str(out), "--wait", "10"]) == 0
    assert "sent" in capsys.readouterr().out
    client, run = the_run(server.uri, "never")
    assert run.info.status == "FINISHED"
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert len(client.list_artifacts(run.info.run_id, "green_callbacks")) == 4
    assert no_spool(out)


@pytest.mark.slow
def test_server_hung_mid_run_then_training_killed_loses_no_epoch(tmp_path, server, link):
    link.set("up")
    proc = start_script(tmp_path, "lightning", "--epochs", "6", "--pause-epoch", "0", "--kill-epoch", "3",
                        uri=link.uri)
    try:
        _, spool = lines_until(proc, "sender")[-1].split()[1:]
        lines_until(proc, "epoch 0")  # printed once epoch 0 is in MLflow
        _, run = the_run(server.uri, "killed")
        assert len(MlflowClient(server.uri).get_metric_history(run.info.run_id, "energy/epoch_j")) == 1
        link.set("hung")  # from here every request hangs
        (tmp_path / "go").touch()
        printed = lines_until(proc, "epoch 3")
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    logged = [int(line.split()[-1]) for line in printed if line.startswith("epoch")]
    held = read_spool(spool)
    assert [r.step for r in held.records if "energy/epoch_j" in r.data][-3:] == logged, "written ahead of the hang"
    with contextlib.suppress(ProcessLookupError):
        os.kill(State.load(Path(spool)).pid, signal.SIGKILL)  # still waiting on the hung server
    link.set("up")
    assert cli(["replay", spool, "--wait", "10"]) == 0
    client, run = the_run(server.uri, "killed")
    assert len(steps(client, run.info.run_id, "energy/epoch_j")) == 4, "epochs 0-3, each once"


@pytest.mark.slow
def test_server_restarted_across_the_end_of_fit(tmp_path, server, green_log):
    out, sender = tmp_path / "out", []

    class Restart(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == trainer.max_epochs - 1:
                sender.append(monitor.sink.sender_pid)
                server.stop()  # the artifacts and the status are still to come

    monitor = EnergyMonitor(tracking_uri=server.uri, experiment_name="restart", output_dir=str(out))
    trainer(tmp_path, [monitor, Restart()], max_epochs=3).fit(ValModel())
    assert "green-callbacks replay" in green_log.text, "close() gave up after its short wait and said how to replay"
    server.start()
    wait_for("the run finished in MLflow", lambda: finished(server.uri, "restart"), 90)
    client, run = the_run(server.uri, "restart")
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert len(client.list_artifacts(run.info.run_id, "green_callbacks")) == 4
    wait_for("the sender removed the spool", lambda: no_spool(out), 30)
    wait_for("the sender ended", lambda: not psutil.pid_exists(sender[0])
             or psutil.Process(sender[0]).status() == psutil.STATUS_ZOMBIE, 30)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "10", True, None])
def test_mlflow_wait_s_must_be_seconds(value):
    with pytest.raises(ValueError, match=r"mlflow_wait_s=.* must be a finite number"):
        EnergyMonitor(mlflow_wait_s=value)


@pytest.mark.slow
def test_the_end_waits_for_mlflow_no_longer_than_mlflow_wait_s(tmp_path, link, caplog):
    """Server down: with ``mlflow_wait_s=0`` the end does not wait for the sender at all; the spool keeps it all,
    and the end says where, with the command that sends it (a warning once the sender found the store down)."""
    caplog.set_level(logging.INFO, logger="green_callbacks")
    out, ended = tmp_path / "out", []

    class TrainingEnd(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            ended.append(time.monotonic())

    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name="no-wait", output_dir=str(out), mlflow_wait_s=0)
    trainer(tmp_path, [monitor, TrainingEnd()], max_epochs=2).fit(ValModel())
    assert time.monotonic() - ended[0] < 8, "the end waited for MLflow although mlflow_wait_s=0"
    (spool,) = out.glob("spool-*[0-9a-f].jsonl")
    assert f"green-callbacks replay {spool}" in caplog.text
    held = read_spool(spool)
    assert len([r for r in held.records if r.kind == "metrics" and "energy/epoch_j" in r.data]) == 2
    with contextlib.suppress(ProcessLookupError):
        os.kill(State.load(spool).pid, signal.SIGKILL)


@pytest.mark.slow
def test_mlflow_wait_s_0_on_a_healthy_store_ends_without_a_warning(tmp_path, caplog):
    """Not waiting was the user's choice, and the store is fine: every run's end warned "N records are not yet
    confirmed by MLflow ... Send them with: green-callbacks replay", though the sender sent them a second later."""
    caplog.set_level(logging.INFO, logger="green_callbacks")
    uri = ready_store(tmp_path)
    monitor = EnergyMonitor(tracking_uri=uri, experiment_name="no-wait", output_dir=str(tmp_path / "out"),
                            mlflow_wait_s=0)
    trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    (said,) = [r for r in caplog.records if "mlflow_wait_s=0: the end did not wait" in r.getMessage()]
    assert "green-callbacks replay" in said.getMessage()  # (should the sender fail after all)
    settle(uri)
    client, run = the_run(uri, "no-wait")
    assert len(client.get_metric_history(run.info.run_id, "energy/epoch_j")) == 2 and run.info.status == "FINISHED"


@pytest.mark.alone  # its waits are checked to within a second or two
def test_the_ends_flush_and_close_share_one_wait(tmp_path, link):
    """The end waits for MLflow once: what its flush waited is taken from close's wait (the end of a run whose
    flush was slow, then whose last records met a hung server, took the wait twice)."""
    from green_callbacks.sinks import MlflowSink, RunTarget

    link.set("hung")  # MLflow's default client: each request waits for its timeout and retries
    sink = MlflowSink(RunTarget(link.uri, experiment_name="one-wait"), tmp_path / "out", close_wait_s=3.0)
    sink.log_metrics({"energy/epoch_j": 1.0}, step=0)
    t0 = time.monotonic()
    assert not sink.flush(3.0, ending=True)
    flushed = time.monotonic()
    assert not sink.close()
    closed = time.monotonic()
    assert flushed - t0 >= 2.9, "the flush waited for MLflow"
    assert closed - flushed < 1.5, f"close waited {closed - flushed:.1f} s more, after the flush's 3 s"
    with contextlib.suppress(ProcessLookupError):
        os.kill(State.load(sink.spool_path).pid, signal.SIGKILL)


@pytest.mark.alone  # its waits are checked to within a second or two
@pytest.mark.slow
def test_hf_evaluate_in_a_loop_with_mlflow_down_waits_once(tmp_path, digits, green_log):  # noqa: F811
    """Each evaluate() outside training ends as train() does, waiting for MLflow; with the server down the
    first call waits mlflow_wait_s, and the calls in the minute after it do not wait again."""
    uri = f"http://127.0.0.1:{free_port()}"
    monitor = HfEnergyMonitor(tracking_uri=uri, experiment_name="eval-loop", output_dir=str(tmp_path / "out"),
                              mlflow_wait_s=3)
    t = hf_trainer(tmp_path, digits, [monitor], epochs=1)
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        t.evaluate()
        took.append(time.monotonic() - t0)
    assert took[0] >= 2.5, f"the first call waited for MLflow: {took}"
    assert max(took[1:]) < 2.0, f"later calls waited again: {took}"
    spools = list((tmp_path / "out").glob("spool-*[0-9a-f].jsonl"))
    assert len(spools) == 3 and all("energy/evaluate_j" in str(read_spool(p).records) for p in spools)
    for spool in spools:
        pid = State.load(spool).pid
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_sender_killed_while_training_goes_on_is_started_again(tmp_path, green_log):
    """Its sender killed mid-training (an OOM killer's pick, a stray pkill): a new one goes on from what was
    sent, and the run ends complete and FINISHED, not RUNNING with the epochs since missing."""
    uri = store(tmp_path / "m.db")
    monitor = EnergyMonitor(tracking_uri=uri, experiment_name="sender-killed", output_dir=str(tmp_path / "out"))
    killed = []

    class KillSender(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pid = monitor.sink.sender_pid
                os.kill(pid, signal.SIGKILL)
                wait_for("the sender died", lambda: monitor.sink._proc.poll() is not None, 10)
                killed.append(pid)
                time.sleep(0.6)  # the next interval's end hears of it (the sink looks every 0.5 s at most)

    trainer(tmp_path, [monitor, KillSender()], max_epochs=4).fit(ValModel())
    assert killed and monitor.sink is None
    client, run = the_run(uri, "sender-killed")
    assert run.info.status == "FINISHED"
    assert len(steps(client, run.info.run_id, "energy/epoch_j")) == 4
    assert len(client.get_metric_history(run.info.run_id, "energy/total_j")) == 1
    assert "started a new one (1 of at most 3)" in green_log.text


def test_a_sender_killed_more_often_than_it_is_restarted_is_named_in_the_summary(tmp_path, capsys):
    """Every sender killed (three restarts used up): the summary said 'MLflow not reached yet ... sent when it
    answers', a promise nothing was left to keep."""
    uri = store(tmp_path / "m.db")
    monitor = EnergyMonitor(tracking_uri=uri, experiment_name="senders-killed", output_dir=str(tmp_path / "out"),
                            mlflow_wait_s=1)

    class KillSender(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if monitor.sink._proc.poll() is None:  # the last one stays dead: nothing restarts it
                os.kill(monitor.sink.sender_pid, signal.SIGKILL)
                wait_for("the sender died", lambda: monitor.sink._proc.poll() is not None, 10)
            time.sleep(0.6)  # the next interval's end hears of it

    trainer(tmp_path, [monitor, KillSender()], max_epochs=5).fit(ValModel())
    out = capsys.readouterr().out
    assert "no sender is running" in out and "green-callbacks replay" in out and "not taken the records yet" not in out


@pytest.mark.slow
@pytest.mark.parametrize("denied", ["deny-writes", "deny-writes-json"])
def test_credentials_refused_mid_run_keep_every_record_for_a_replay(tmp_path, server, link, green_log, capsys,
                                                                    denied):
    """A token that expires mid-run (every write answered 401, reads still served): each metric was tried alone
    and set aside as refused, one warning per name, and nothing after it was ever sent, by the sender or by
    ``replay`` once the token was renewed. A refusal of the credentials is the whole run's: it stops the sending,
    with one warning, and the records wait in the spool. A gateway's 401 in JSON of its own (``{"message":
    "Unauthorized"}``, no MLflow ``error_code``), which MLflow reads as a 500, was taken for an outage: retried
    for the whole linger, MLflow's 'error code not recognized' warning at every try."""
    link.set("up")
    out, experiment = tmp_path / "out", f"expired-{denied}"

    class Expire(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                wait_for("the run is in MLflow", lambda: the_run(server.uri, experiment)[1] is not None, 60)
                link.set(denied)

    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name=experiment, output_dir=str(out), mlflow_wait_s=15)
    trainer(tmp_path, [Expire(), monitor], max_epochs=4).fit(ValModel())
    assert green_log.text.count("nothing more can be sent") == 1, green_log.text
    assert "refused the metric" not in green_log.text
    assert "ended early" not in green_log.text, "the block, said once: no second warning like a crash"
    # the 401 is no outage (a request in flight when the link switched, its connection dropped, may be one)
    outages = [line for line in green_log.text.splitlines() if "the records wait in" in line]
    assert not [line for line in outages if "401" in line or "nauthori" in line or "UNAUTHENTICATED" in line]
    assert link.seen(denied) > 0
    assert not [p for p in out.glob("*.rejected.jsonl") if p.read_text().strip()], "records set aside as refused"
    (spool,) = out.glob("spool-*[0-9a-f].jsonl")
    with contextlib.suppress(ProcessLookupError):
        os.kill(State.load(spool).pid, signal.SIGKILL)

    link.set("up")  # the token renewed
    assert cli(["replay", str(out), "--wait", "10"]) == 0
    client, run = the_run(server.uri, experiment)
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert run.info.status == "FINISHED"


def test_mlflow_run_id_in_the_environment_takes_the_energy(tmp_path, monkeypatch):
    """A scheduler (or ``mlflow run``) names the run in ``MLFLOW_RUN_ID``, as MLflow's ``start_run()`` resumes it:
    the energy went to a new run of its own instead, and the scheduler's run stayed empty."""
    uri = store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("scheduled")).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    mlflow.set_tracking_uri(uri)
    try:
        monitor = EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
        trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    finally:
        mlflow.set_tracking_uri(None)
    settle(uri)
    assert [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])] \
        == [run_id], "one run: the scheduler's"
    assert steps(client, run_id, "energy/epoch_j") == sorted(r.step for r in monitor.records if r.kind is Kind.EPOCH)
    assert client.get_run(run_id).info.status == "RUNNING"  # the scheduler's to end

    # an explicit tracking_uri is the user's choice of store: the energy goes to a run of the monitor's own there,
    # not to the scheduler's run id looked up in it (where it is not: the sending was blocked, nothing arrived)
    mine = store(tmp_path / "mine.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(mine)  # (the same store as MLflow's current one: no warning about another store)
    try:
        monitor = EnergyMonitor(tracking_uri=mine, output_dir=str(tmp_path / "out2"), log_artifacts=False)
        trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    finally:
        mlflow.set_tracking_uri(None)
    settle(mine)
    other = MlflowClient(mine)
    (own,) = other.search_runs([e.experiment_id for e in other.search_experiments()])
    assert own.info.run_id != run_id and own.info.status == "FINISHED"
    assert steps(other, own.info.run_id, "energy/epoch_j") == sorted(r.step for r in monitor.records
                                                                     if r.kind is Kind.EPOCH)


def test_a_file_store_refused_by_mlflow_3_says_how_to_allow_it(tmp_path, green_log, monkeypatch, capsys):
    """MLflow 3 refuses a file store (``file:./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true``, and says so at the
    end of a long message; the warning cut it at 300 characters, so the way out never showed. The long message
    is said once: the end's warning and the summary line said it twice more (three copies of 600 characters).
    Such a URI is refused at construction now (test_input.py); allowed there and refused where the sender runs (the
    variable unset between the two), the refusal is said as it was."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "out"
    # (the refusal ends the end's wait at once; a wait of 5 s ran out first on a loaded machine, its sender's store
    # not opened yet, and the end's warning could not yet say why)
    monitor = EnergyMonitor(tracking_uri=f"file:{tmp_path}/mlruns", output_dir=str(out), mlflow_wait_s=30,
                            log_artifacts=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=4, limit_val_batches=2).fit(ValModel())

    def said() -> str:
        spools = [p for p in out.glob("spool-*.jsonl") if not p.name.endswith(".rejected.jsonl")]
        return green_log.text + "".join(" ".join(State.load(p).notes) for p in spools)

    wait_for("the sender named the refusal", lambda: "maintenance mode" in said(), 60)
    assert "MLFLOW_ALLOW_FILE_STORE=true" in said()
    printed = green_log.text + capsys.readouterr().out
    assert "not yet confirmed" in printed and "the warning above says why" in printed  # the end's warning
    assert printed.count("MLFLOW_ALLOW_FILE_STORE=true") == 1, printed
    assert "MLflow stopped taking the records" in printed and "maintenance mode" in printed.split("[finished]")[1]


def notes_of(out: Path) -> str:
    """What the senders of the spools in ``out`` said, as far as their state files still hold it."""
    spools = [p for p in out.glob("spool-*.jsonl") if not p.name.endswith(".rejected.jsonl")]
    return "\n".join(n for p in spools for n in State.load(p).notes)


@pytest.mark.slow
def test_a_gateway_answering_404_during_a_deploy_is_an_outage_not_a_refusal(tmp_path, server, link, green_log):
    """A deploy: the gateway in front of MLflow answers every batch ``404 <html>Not Found</html>`` for a while, the
    other endpoints served. The sender took the 404 for MLflow's verdict on each name: every metric, param and tag
    was set aside as refused, and so was every later record of those names, for the sender's life (the run ended
    FINISHED with 4 metrics and no params). A 404 that is not MLflow's own answer refuses nothing: an outage,
    and everything arrives once the gateway is back."""
    link.set("deploy")  # the run is found and created; its params, tags and metrics meet the 404s
    out = tmp_path / "out"

    class Deploy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                monitor.sink.flush(0)  # the sender sends what is pending now, into the deploy
                wait_for("three requests met the gateway's 404", lambda: link.seen("deploy") >= 3, 60)
                link.set("up")  # the deploy is over

    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name="deploy", output_dir=str(out))
    trainer(tmp_path, [monitor, Deploy()], max_epochs=4).fit(ValModel())
    wait_for("the run finished in MLflow", lambda: finished(server.uri, "deploy"), 90)
    client, run = the_run(server.uri, "deploy")
    assert_every_interval(client, run.info.run_id, monitor.records)
    assert "efficiency/val_score_per_kj" in run.data.metrics and "energy/cumulative_j" in run.data.metrics
    assert run.data.params and run.data.tags["green.method.cpu"] in ("estimated", "counter")
    assert "refused the" not in green_log.text + notes_of(out)
    assert not [p for p in out.glob("*.rejected.jsonl") if p.read_text().strip()], "records set aside as refused"
    wait_for("the sender removed its spool", lambda: no_spool(out), 30)


@pytest.mark.slow
def test_an_artifact_a_proxy_refuses_is_set_aside_and_the_run_finishes(tmp_path, server, link, green_log):
    """A proxy's body limit answers every upload 413 (the tracking API served): the upload's ``HTTPError`` counted
    as an outage, and the FINISHED status queued behind the files was never sent: the run stayed RUNNING for
    ever, and replay failed for ever. A file refused is set aside, with one warning naming it, and the run ends."""
    link.set("artifacts-413")
    out = tmp_path / "out"
    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name="art-413", output_dir=str(out))
    trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    wait_for("the run finished in MLflow", lambda: finished(server.uri, "art-413"), 60)
    client, run = the_run(server.uri, "art-413")
    assert_every_interval(client, run.info.run_id, monitor.records)
    wait_for("the sender removed its spool", lambda: no_spool(out), 30)
    (rejected,) = out.glob("*.rejected.jsonl")
    kept = [json.loads(line)["content"]["path"] for line in rejected.read_text().splitlines()]
    assert len(kept) == 4 and link.seen("artifacts-413") >= 4
    for path in kept:
        assert green_log.text.count(f"refused the artifact {path} (") == 1, green_log.text
    assert "413" in green_log.text and "the records wait in" not in green_log.text


@pytest.mark.slow
def test_a_failing_artifact_store_holds_back_neither_the_metrics_nor_the_status(tmp_path, server, link):
    """The artifact store answers every upload 500 (the tracking API served): the run stayed RUNNING for ever,
    its FINISHED status queued behind the files. The status goes; the files wait in the spool, with one warning,
    and a replay sends them once the store is back."""
    link.set("artifacts-500")
    out = tmp_path / "out"
    monitor = EnergyMonitor(tracking_uri=link.uri, experiment_name="art-500", output_dir=str(out), mlflow_wait_s=3)
    trainer(tmp_path, [monitor], max_epochs=2).fit(ValModel())
    wait_for("the run finished in MLflow", lambda: finished(server.uri, "art-500"), 90)
    client, run = the_run(server.uri, "art-500")
    assert_every_interval(client, run.info.run_id, monitor.records)
    (spool,) = out.glob("spool-*[0-9a-f].jsonl")
    wait_for("the sender said the files wait", lambda: "did not take" in notes_of(out), 60)
    notes = State.load(spool).notes
    assert sum("did not take" in n for n in notes) == 1 and not any("the records wait in" in n for n in notes), notes
    assert not client.list_artifacts(run.info.run_id, "green_callbacks")
    with contextlib.suppress(ProcessLookupError):  # it would keep trying for its linger time
        os.kill(State.load(spool).pid, signal.SIGKILL)

    link.set("up")
    assert cli(["replay", str(out), "--wait", "10"]) == 0
    assert len(client.list_artifacts(run.info.run_id, "green_callbacks")) == 4
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert no_spool(out)


def test_a_sqlite_store_in_a_folder_that_cannot_be_written_is_a_refusal_at_once(tmp_path, green_log):
    """The default store (``sqlite:///mlflow.db``) in a working directory that cannot be written (a read-only
    mount): taken for an outage, MLflow's engine retried for about 101 s per try, its warnings flooded the
    terminal and the sender lingered three minutes. A store that cannot be opened for writing is a refusal, said
    once and naming the file, before MLflow tries (here: a path under a regular file, which fails for root too)."""
    blocker = tmp_path / "file"
    blocker.write_text("a file where the store's folder should be")
    db = blocker / "mlflow.db"
    assert end_wait_s(tmp_path, f"sqlite:///{db}") < 12, "the end waited for the store far beyond mlflow_wait_s"
    said = lambda: green_log.text + notes_of(tmp_path / "out")  # noqa: E731
    wait_for("the sender named the store", lambda: "nothing more can be sent" in said(), 60)
    assert f"the MLflow store {db} cannot be created" in said()
    assert "the records wait in" not in said()
    assert not blocker.with_name("mlflow.db").exists() and blocker.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("training", ["exits", "stays"])
def test_a_sender_left_alone_with_a_hung_server_ends_with_its_linger(tmp_path, server, link, training):
    """The linger (how long the sender goes on once the training has closed) was checked only between sends: a
    send to a hung server, its request timeouts growing 5, 10, 20 s, held the sender 110 s past a 60 s linger, and
    a replay meanwhile waited for it and gave up. Now no request starts past the linger, none started during it
    waits past it, and the linger counts from the close, also where the training's process has exited by then (it
    counted from the end of the request in flight at the close: 64-83 s after the close with a 60-s linger)."""
    link.set("up")
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from green_callbacks.sinks import MlflowSink, RunTarget
        sink = MlflowSink(RunTarget({link.uri!r}, experiment_name="hung-end"), Path({str(tmp_path / "out")!r}),
                          first_send_s=0, cadence_s=0.2, linger_s=15)
        sink.log_metrics({{"energy/cumulative_j": 0.0}}, step=0)
        sink.interval_end()
        assert sink.flush(60)
        print(sink.sender_pid, flush=True)
        sys.stdin.readline()  # the server hangs now
        for step in range(1, 400):
            sink.log_metrics({{"energy/cumulative_j": float(step)}}, step=step)
            sink.interval_end()
        time.sleep(1)  # a send is in flight
        assert not sink.close(timeout_s=1)
        print("closed", flush=True)
        if {training == "stays"!r}:
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        process = psutil.Process(int(proc.stdout.readline()))
        link.set("hung")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        closed = time.monotonic()
        def ended() -> bool:  # gone, or a zombie that its parent, still training, has not reaped
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for("the sender's end", ended, timeout_s=90)
        # the linger counts from the close, not from the end of the request in flight then (5 s, retried twice by
        # MLflow: about 17 s): the sender ends at the later of the two, within about 20 s (with a 15-s linger)
        assert time.monotonic() - closed < 25
    finally:
        proc.kill()


@pytest.mark.slow
def test_the_runs_time_ends_where_training_ended_not_after_the_wait_for_mlflow(tmp_path):
    """Server down, ``mlflow_wait_s=3``: the summary said "over 36.3 s" for a training of 26.1 s (the end's wait for
    MLflow counted as the run's time; its energy did not)."""
    from green_callbacks import EnergyTracker

    out = tmp_path / "out"
    tracker = EnergyTracker(tracking_uri=f"http://127.0.0.1:{free_port()}", output_dir=str(out), mlflow_wait_s=3)
    began = time.monotonic()
    with tracker:
        with tracker.epoch(0):
            time.sleep(0.2)
        trained_s = time.monotonic() - began
    assert time.monotonic() - began >= 2.5, "the end did not wait for MLflow"
    (summary,) = out.glob("*/summary.json")
    assert 0.2 <= json.loads(summary.read_text())["duration_s"] < trained_s + 0.5
    for spool in out.glob("spool-*[0-9a-f].jsonl"):
        with contextlib.suppress(ProcessLookupError, TypeError, ValueError):
            os.kill(State.load(spool).pid, signal.SIGKILL)
