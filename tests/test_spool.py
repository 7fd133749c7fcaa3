"""The spool and its sender: each record on disk before the call returns; replay sends each exactly once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from green_callbacks.cli import main as cli
from green_callbacks.sinks import MlflowSink, RunTarget, read_spool, replay_spool
from green_callbacks.sinks.mlflow import spool_header
from green_callbacks.sinks.names import sanitise
from green_callbacks.sinks.spool import SpoolWriter, State, rejected_path, state_path

from helpers import free_port, history, ready_store


def write_spool(path: Path, target: RunTarget, records: list[tuple[str, dict, int | None]],
                pid: int | None = None) -> Path:
    """A spool as a training leaves it when its sender never ran (killed with it, say); ``pid``: the training's,
    if not this process's."""

    def fail(exc: OSError) -> None:
        raise exc

    writer = SpoolWriter(path, fail)
    header = spool_header(target, path.stem.removeprefix("spool-"))
    writer.append("open", {**header, "pid": pid or header["pid"]})
    for kind, data, step in records:
        writer.append(kind, data, step)
    writer.close()
    return path


def epochs(n: int, start: int = 0) -> list[tuple[str, dict, int | None]]:
    return [("metrics", {"energy/epoch_j": 10.0 * s, "time/epoch_s": 0.1}, s) for s in range(start, start + n)]


def test_a_replayed_run_ends_when_its_training_ended_not_at_the_replay(tmp_path):
    """A replay sent later (the server was down) set the run's end time to the replay's: a 60-s training showed
    318 s in MLflow. The status record's time is the end."""
    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()  # the store exists (replay creates none a spool names)
    spool = write_spool(tmp_path / "spool-late.jsonl", RunTarget(uri, experiment_name="late"),
                        [*epochs(2), ("status", {"status": "FINISHED"}, None)])
    ended_ms = time.time() * 1000
    time.sleep(1.5)
    assert replay_spool(spool).complete
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("late").experiment_id])
    assert run.info.status == "FINISHED" and run.info.end_time <= ended_ms


def test_a_replay_into_a_locked_local_store_tries_the_run_once_then_sends_it_when_unlocked(tmp_path, monkeypatch):
    """A local store's create is tried once, as MLflow tries it: the retries of a create meant for a tracking server
    (``tracking.created``) slept minutes, with MLflow's default settings, on a sqlite store another process held."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)  # MLflow's defaults, as a user's replay has them
    import sqlite3

    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).create_experiment("locked")
    spool = write_spool(tmp_path / "spool-locked.jsonl", RunTarget(uri, experiment_name="locked"),
                        [*epochs(2), ("status", {"status": "FINISHED"}, None)])
    holder = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing: reads go on, every write waits, then fails
    started = time.monotonic()
    try:
        assert not replay_spool(spool).complete
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert took < 60, f"the replay retried a local store's create for {took:.0f} s"
    assert replay_spool(spool).complete
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("locked").experiment_id])
    assert history(client, run.info.run_id, "energy/epoch_j") == [(0, 0.0), (1, 10.0)]


def test_names_are_sanitised_as_lightnings_mlflow_logger_does(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    names = ["val_acc@1", "loss (train)", "a:b", "ü-score", "top-5/acc", "x#y$z", "ok_name.1/2 -3", "f1[macro]"]
    uri = ready_store(tmp_path, "m.db")
    logger = MLFlowLogger(experiment_name="names", tracking_uri=uri)
    logger.log_metrics({n: 1.0 for n in names}, step=0)
    logged = set(MlflowClient(uri).get_run(logger.run_id).data.metrics)
    assert logged == {sanitise(n) for n in names}
    assert sanitise("val_acc@1") == "val_acc1"


def test_two_names_that_sanitise_alike_are_named_in_a_warning(green_log):
    """``val_accé`` and ``val_accè`` both become ``val_acc``: one value silently overwrote the other."""
    from green_callbacks.sinks.names import Names

    names = Names()
    assert names.metrics({"efficiency/val_accé_per_kj": 1.0, "efficiency/val_accè_per_kj": 2.0}) == {
        "efficiency/val_acc_per_kj": 2.0}
    names.metrics({"efficiency/val_accé_per_kj": 1.0, "efficiency/val_accè_per_kj": 2.0})
    assert green_log.text.count("are both logged as 'efficiency/val_acc_per_kj'") == 1
    assert "'efficiency/val_accé_per_kj' and 'efficiency/val_accè_per_kj'" in green_log.text


def test_a_torn_line_costs_only_itself_and_replay_reports_it_by_number(tmp_path, capsys):
    uri = ready_store(tmp_path, "m.db")
    spool = write_spool(tmp_path / "spool-a.jsonl", RunTarget(uri, experiment_name="torn"), epochs(2))
    with spool.open("ab") as f:  # a crash in the middle of writing the next record
        f.write(b'{"seq":4,"kind":"metrics","t":1,"st')
    writer = SpoolWriter(spool, lambda exc: None)  # the next process to append: its first record stays whole
    writer.seq = 10
    writer.append("metrics", {"energy/epoch_j": 20.0, "time/epoch_s": 0.1}, 2)
    writer.close()
    contents = read_spool(spool)
    assert contents.unreadable == [4]
    MlflowClient(uri).search_experiments()  # the store exists: replay creates none at a path a spool names
    assert [r.step for r in contents.records if r.kind == "metrics"] == [0, 1, 2]

    assert cli(["replay", str(spool)]) == 0
    out, err = capsys.readouterr()
    assert "line 4 of" in err and "sent 3 records" in out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("torn").experiment_id])
    assert history(client, run.info.run_id, "energy/epoch_j") == [(0, 0.0), (1, 10.0), (2, 20.0)]
    assert not spool.exists() and not state_path(spool).exists()
    (kept,) = [json.loads(line) for line in rejected_path(spool).read_text().splitlines()]
    assert kept["line"] == 4 and kept["content"].startswith('{"seq":4')


def test_replay_finds_a_relative_sqlite_store_where_the_training_ran(tmp_path, monkeypatch, capsys):
    # the README's own form, sqlite:///mlflow.db, is relative to the training's working directory, not replay's
    train_dir, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    train_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(train_dir)
    MlflowClient(f"sqlite:///{train_dir}/mlflow.db").search_experiments()  # its store (absolute: MLflow caches by URI)
    (train_dir / "out").mkdir()
    spool = write_spool(train_dir / "out" / "spool-rel.jsonl", RunTarget("sqlite:///mlflow.db",
                                                                          experiment_name="relative"), epochs(2))
    monkeypatch.chdir(elsewhere)
    assert cli(["replay", str(spool)]) == 0
    assert f"sqlite:///{train_dir}/mlflow.db" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{train_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("relative").experiment_id])
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [0, 1]
    assert not (elsewhere / "mlflow.db").exists()


def test_replay_finds_the_trainings_default_store_whatever_this_process_set(tmp_path, monkeypatch):
    # a spool of a training on MLflow's default store, replayed by a process that set its own tracking URI
    # (replay_spool() called from a notebook): MLflow's default as the training saw it, not this process's
    import mlflow

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    monkeypatch.chdir(train_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the training's store (written absolute: MLflow caches a store by its URI, and a relative one from another
    # test's folder would be that test's)
    MlflowClient(f"sqlite:///{train_dir}/mlflow.db").search_experiments()
    spool = write_spool(train_dir / "spool-default.jsonl", RunTarget(None, experiment_name="default"), epochs(1))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mine.db")
    try:
        result = replay_spool(spool)
    finally:
        mlflow.set_tracking_uri(None)
    assert result.complete and result.sent == 1
    client = MlflowClient(f"sqlite:///{train_dir}/mlflow.db")
    assert client.get_experiment_by_name("default") is not None


def test_replay_sends_only_what_was_not_sent_yet(tmp_path):
    uri = ready_store(tmp_path, "m.db")
    client = MlflowClient(uri)
    run_id = client.create_run("0").info.run_id
    spool = write_spool(tmp_path / "spool-b.jsonl", RunTarget(uri, run_id, owned=False), epochs(6))
    records = read_spool(spool).records
    third = records[3]  # header, then epochs 0, 1, 2: an earlier sender says it sent them (it did not, here,
    # so a replay that sent them again would show them)
    State(offset=third.end, line=third.line, seq=third.seq, run_id=run_id, tracking_uri=uri).save(spool)

    result = replay_spool(spool)
    assert (result.sent, result.complete, result.run_id) == (3, True, run_id)
    assert [s for s, _ in history(client, run_id, "energy/epoch_j")] == [3, 4, 5]
    assert not spool.exists()


def test_a_refused_name_is_set_aside_and_everything_else_is_sent(tmp_path):
    uri = ready_store(tmp_path, "m.db")
    # 'a//b' passes Lightning's character rule, but MLflow refuses a name that resolves to another path
    records = [("metrics", {"energy/epoch_j": float(s), "efficiency/a//b_per_kj": 1.0}, s) for s in range(3)]
    records += [("params", {"green.pue": "1.0"}, None), ("tags", {"green.method.gpu": "counter"}, None),
                ("status", {"status": "FINISHED"}, None)]
    spool = write_spool(tmp_path / "spool-c.jsonl", RunTarget(uri, experiment_name="poison"), records)
    MlflowClient(uri).search_experiments()  # the store exists: replay creates none at a path a spool names

    result = replay_spool(spool)
    assert result.complete and result.set_aside == 3
    (note,) = result.notes
    assert "refused the metric 'efficiency/a//b_per_kj'" in note and note.count("INVALID_PARAMETER_VALUE") == 1
    assert "the records wait in" not in note
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert [s for s, _ in history(client, result.run_id, "energy/epoch_j")] == [0, 1, 2]
    assert run.data.params["green.pue"] == "1.0" and run.data.tags["green.method.gpu"] == "counter"
    assert run.info.status == "FINISHED"
    kept = [json.loads(line) for line in rejected_path(spool).read_text().splitlines()]
    assert [(k["content"]["key"], k["content"]["step"]) for k in kept] == [("efficiency/a//b_per_kj", s)
                                                                            for s in range(3)]


@pytest.mark.parametrize("answer", [
    ("500 Internal Server Error", "text/html", b"<html>upstream error</html>", "answers HTTP 500"),
    ("500 Internal Server Error", "application/json", b'{"error_code": "INTERNAL_ERROR", "message": "db locked"}',
     "answers HTTP 500"),
    ("503 Service Unavailable", "text/plain", b"maintenance", "answers HTTP 503"),
    ("404 Not Found", "text/html", b"<html>Not Found</html>", "answers HTTP 404"),  # not retried by MLflow
    ("404 Not Found", "application/json", b'{"message": "Not Found"}', "answers HTTP 404"),  # a gateway's JSON
    ("200 OK", "text/html", b"<html><form>Sign in</form></html>", "answers a page that is not MLflow's API"),
    ("hang", "text/plain", b"", "does not answer in time"),  # accepts, answers nothing within the timeout
])
def test_a_server_that_answers_with_errors_is_not_called_unreachable(tmp_path, capsys, monkeypatch, answer):
    """A tracking server that answers every request with an error (its database down, a balancer's maintenance page,
    a gateway's 404 during a deploy, an auth proxy's login page) was said to "cannot be reached", sending its user to
    look for a network fault. It answers: the warning says with what. (MLflow's retries cut to one here: at its
    defaults a 5xx is retried for minutes.)"""
    import http.server
    import threading

    status, kind, body, said = answer

    class Failing(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if status == "hang":
                time.sleep(3)
                return
            self.send_response(int(status.split()[0]))
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        spool = write_spool(tmp_path / "spool-e.jsonl", RunTarget(uri, experiment_name="erring"), epochs(2))
        assert cli(["replay", str(spool)]) == 1
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert said in err and "cannot be reached" not in err, err
    assert "stays in the spool" in err


def test_replay_never_removes_a_spool_it_could_not_send(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spool = write_spool(tmp_path / "spool-d.jsonl", RunTarget(uri, experiment_name="away"), epochs(2))
    assert cli(["replay", str(spool)]) == 1
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "stays in the spool" in err
    assert [r.step for r in read_spool(spool).records if r.kind == "metrics"] == [0, 1]
    assert State.load(spool).offset == 0, "nothing was marked sent"


@pytest.fixture
def default_store(tmp_path, monkeypatch):
    """MLflow's default store as a new user has it: ``mlflow.db`` in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    return f"sqlite:///{tmp_path}/mlflow.db"  # not there yet: the first training makes it


@pytest.mark.slow
def test_sink_writes_ahead_and_fills_the_default_store_then_a_resumed_sink_continues(tmp_path, default_store):
    sink = MlflowSink(RunTarget(experiment_name="sink"), tmp_path / "out")
    for step in range(3):
        sink.log_metrics({"energy/epoch_j": float(step)}, step=step)
        on_disk = read_spool(sink.spool_path).records  # read before anything else runs: written ahead
        assert on_disk[-1].kind == "metrics" and on_disk[-1].step == step
        sink.interval_end()
    sink.log_params({"green.pue": 1.2})
    sink.set_tags({"green.method.gpu": "counter"})
    artifact = tmp_path / "summary.json"
    artifact.write_text("{}")
    sink.log_artifact(artifact)
    sink.set_status("FINISHED")
    assert sink.close(timeout_s=60)
    assert not sink.spool_path.exists() and not state_path(sink.spool_path).exists()
    ref = sink.run_ref
    assert ref is not None and ref.owned and ref.tracking_uri == default_store

    # a resumed training: the checkpoint's RunRef, passed back as the target
    resumed = MlflowSink(RunTarget(**asdict(ref)), tmp_path / "out")
    assert resumed.run_ref == ref, "known at once: no wait for the sender"
    resumed.log_metrics({"energy/epoch_j": 3.0}, step=3)
    resumed.set_status("FINISHED")
    assert resumed.close(timeout_s=60)
    client = MlflowClient(default_store)
    run = client.get_run(ref.run_id)
    assert history(client, ref.run_id, "energy/epoch_j") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert run.info.status == "FINISHED" and run.data.params["green.pue"] == "1.2"
    assert [a.path for a in client.list_artifacts(ref.run_id, "green_callbacks")] == ["green_callbacks/summary.json"]


@pytest.mark.slow
def test_unwritable_output_dir_costs_one_warning_and_nothing_else(tmp_path, default_store, green_log):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = MlflowSink(RunTarget(experiment_name="elsewhere"), blocker / "out")  # its parent is a file
    for step in range(3):
        sink.log_metrics({"energy/epoch_j": float(step)}, step=step)
        sink.interval_end()
    sink.set_status("FINISHED")
    assert sink.close(timeout_s=60)
    warnings = [r.getMessage() for r in green_log.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "the MLflow spool is" in warnings[0] and str(blocker) in warnings[0]
    client = MlflowClient(default_store)
    assert [s for s, _ in history(client, sink.run_ref.run_id, "energy/epoch_j")] == [0, 1, 2]


def test_a_sender_whose_training_died_before_it_started_sends_and_exits(tmp_path):
    """A training killed in its first moments, before its sender ran a line: the sender's parent is then already
    another process, so it takes the training's pid from the spool's header, finds it gone, sends what the spool
    holds and exits (it had waited for that training for ever, holding the spool's lock)."""
    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    spool = write_spool(tmp_path / "spool-e.jsonl", RunTarget(uri, experiment_name="early"), epochs(2),
                        pid=int(dead.stdout))
    root = str(Path(__file__).resolve().parents[1])
    sender = subprocess.run([sys.executable, "-m", "green_callbacks.sinks", str(spool)], timeout=120,
                            env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    assert sender.returncode == 0, sender.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    assert history(client, run.info.run_id, "energy/epoch_j") == [(0, 0.0), (1, 10.0)]
    assert run.info.status == "KILLED", "the training never ended its run: not left RUNNING for ever"
    assert not spool.exists()


@pytest.mark.parametrize("closed", [True, False])
def test_replay_of_a_closed_spool_while_its_training_process_lives_on(tmp_path, closed):
    """A notebook or a sweep: ``fit`` returned, its sender gave up, the process lives on. A spool the training
    closed can be replayed from another process at once; one it may still write to is refused."""
    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    spool = write_spool(tmp_path / "spool-f.jsonl", RunTarget(uri, experiment_name="notebook"),
                        [*epochs(2), *([("close", {"wait_s": 0.0}, None)] if closed else [])])  # pid: this process
    root = str(Path(__file__).resolve().parents[1])
    replay = subprocess.run([sys.executable, "-m", "green_callbacks.cli", "replay", str(spool), "--wait", "0"],
                            timeout=120, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    if closed:
        assert replay.returncode == 0, replay.stderr
        assert not spool.exists()
    else:
        assert replay.returncode != 0 and "still running" in replay.stderr
        assert spool.exists()


def test_replay_of_a_running_trainings_spool_says_so_at_once(tmp_path):
    """``green-callbacks replay <folder>`` while a training writes into that folder: its sender holds the spool,
    and replay waited the whole ``--wait`` for it, then failed with 'run replay again'; the training is running
    and its own sender sends it, which replay says at once."""
    from green_callbacks.sinks.files import lock

    uri = ready_store(tmp_path, "m.db")
    spool = write_spool(tmp_path / "spool-l.jsonl", RunTarget(uri, experiment_name="live"), epochs(2))  # pid: ours
    held = lock(spool)  # as this training's sender holds it
    try:
        root = str(Path(__file__).resolve().parents[1])
        started = time.monotonic()
        replay = subprocess.run([sys.executable, "-m", "green_callbacks.cli", "replay", str(tmp_path), "--wait",
                                 "60"], timeout=120, env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                                text=True)
        assert time.monotonic() - started < 30 and "still running" in replay.stderr and spool.exists()
    finally:
        held.close()


def test_a_damaged_line_is_set_aside_whole(tmp_path):
    """A metrics line is 700-800 bytes: one damaged byte, and the whole line goes to the rejected file (replay
    removes the spool after, so that copy is all there is of it)."""
    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    metrics = {f"energy/a_metric_with_a_long_name_{i}": 1.0 * i for i in range(30)}
    spool = write_spool(tmp_path / "spool-g.jsonl", RunTarget(uri, experiment_name="damaged"),
                        [("metrics", metrics, 0), *epochs(1, start=1)])
    lines = spool.read_bytes().split(b"\n")
    damaged = lines[1].replace(b'"kind"', b'"ki\x00d', 1)  # the header is line 1, the long record line 2
    assert len(damaged) > 700
    spool.write_bytes(b"\n".join([lines[0], damaged, *lines[2:]]))
    assert cli(["replay", str(spool)]) == 0
    (kept,) = [json.loads(line) for line in rejected_path(spool).read_text().splitlines()]
    assert kept["line"] == 2 and kept["content"].startswith(damaged.decode("utf-8", "replace"))


@pytest.mark.slow
def test_a_run_deleted_under_the_training_ends_with_the_senders_reason_not_a_promise(tmp_path, green_log):
    """The run is deleted in MLflow while the training logs: the sender stops (nothing more can go to it) and the
    end's warning says so and gives the replay command, instead of 'its sender keeps trying for up to 60 s'."""
    uri = ready_store(tmp_path, "m.db")
    sink = MlflowSink(RunTarget(uri, experiment_name="deleted"), tmp_path / "out")
    sink.log_metrics({"energy/epoch_j": 0.0}, step=0)
    assert sink.flush(60), "the run exists and took the first record"
    MlflowClient(uri).delete_run(sink.run_ref.run_id)
    sink.log_metrics({"energy/epoch_j": 1.0}, step=1)
    sink.set_status("FINISHED")
    assert not sink.close(timeout_s=20)
    (warning,) = [r.getMessage() for r in green_log.records if "not yet confirmed" in r.getMessage()]
    assert "its sender stopped:" in warning and "keeps trying" not in warning
    said = [r.getMessage() for r in green_log.records]
    assert sum("is deleted" in m for m in said) == 1, said  # the reason, once: here, or in the warning before it
    assert "is deleted" in warning or "the warning above says why" in warning
    assert f"green-callbacks replay {sink.spool_path}" in warning


def test_a_name_refused_once_costs_one_request_of_its_own_per_later_batch(tmp_path, monkeypatch):
    """A refused name is found by sending each entity of the refused batch alone; the sender forgot it and found
    it again in every later batch (79 requests for a 3-epoch run whose efficiency metric had a 300-character
    name). Once refused, it is left out of later batches and sent alone after each (refused for the sender's
    life, a name refused by a passing fault would have lost every later value): two requests per later batch."""
    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    bad = "efficiency/val_" + "x" * 300 + "_per_kj"  # longer than MLflow's 250 characters
    records: list[tuple[str, dict, int | None]] = []
    for s in range(3):  # three batches: a flush between them makes the sender send each on its own
        records += [("metrics", {"energy/epoch_j": float(s), bad: 1.0}, s), ("flush", {}, None)]
    spool = write_spool(tmp_path / "spool-r.jsonl", RunTarget(uri, experiment_name="refused"), records)
    MlflowClient(uri).search_experiments()
    calls = []
    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    sender = Sender(spool)
    sender.read(final=True)
    assert sender.send()
    assert len(calls) == 3 + 2 + 2  # the first batch, then its two entities alone; then a batch and the name alone
    client = MlflowClient(uri)
    assert [s for s, _ in history(client, sender.state.run_id, "energy/epoch_j")] == [0, 1, 2]
    kept = [json.loads(line) for line in rejected_path(spool).read_text().splitlines()]
    assert [k["content"]["step"] for k in kept] == [0, 1, 2]


def test_a_replay_waiting_for_another_that_sends_everything_ends_complete(tmp_path):
    """Two replays at once: the second waited on the first's lock, then found the spool gone (the first sent it
    all and removed it) and failed with 'no spool file' (exit 2), although nothing was left to send."""
    import threading
    import time

    from green_callbacks.sinks.files import lock

    uri = ready_store(tmp_path, "m.db")
    spool = write_spool(tmp_path / "spool-w.jsonl", RunTarget(uri, experiment_name="w"), epochs(2))
    held = lock(spool)  # the first replay
    results, waited = [], []
    second = threading.Thread(target=lambda: results.append(replay_spool(spool, wait_s=30, waiting=waited.append)))
    second.start()
    time.sleep(1.0)
    for path in (spool, state_path(spool)):  # the first one is done: everything sent, the files removed
        path.unlink(missing_ok=True)
    held.close()
    second.join(timeout=30)
    (result,) = results
    assert waited and result.complete and result.sent == 0
    assert "nothing is left to send" in result.notes[0]


def test_two_replays_of_one_folder_at_once_both_succeed(tmp_path, capsys):
    """Two ``green-callbacks replay FOLDER`` at once (cron, CI): the second listed the folder, and each spool the
    first had sent and removed by the time the second reached it failed with 'no spool file' (exit 2), although
    nothing was left to send. In a folder, a spool gone since the listing was sent by another process."""
    import threading

    from green_callbacks.sinks.files import lock

    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    folder = tmp_path / "out"
    a = write_spool(folder / "spool-a.jsonl", RunTarget(uri, experiment_name="a"), epochs(2))
    b = write_spool(folder / "spool-b.jsonl", RunTarget(uri, experiment_name="b"), epochs(2))
    held = lock(a)  # the first replay is sending spool a
    codes: list[int] = []
    second = threading.Thread(target=lambda: codes.append(cli(["replay", str(folder), "--wait", "30"])))
    second.start()
    err = ""
    end = time.monotonic() + 30
    while "is still sending" not in err and time.monotonic() < end:  # the second has listed a and b, waits on a
        time.sleep(0.1)
        err += capsys.readouterr().err
    assert "is still sending" in err
    assert replay_spool(b).complete and not b.exists()  # the first replay goes on with b, sends it, removes it
    held.close()
    assert replay_spool(a, wait_s=30).complete  # (or the second one sends a: whichever takes the lock first)
    second.join(timeout=60)
    err += capsys.readouterr().err
    assert codes == [0], err
    assert "error" not in err
    client = MlflowClient(uri)
    for name in ("a", "b"):
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [0, 1]


def test_a_refused_name_in_a_batch_cut_off_by_an_outage_is_set_aside_once(tmp_path, monkeypatch):
    """The entities of a refused name were set aside as the batch was made, before it was sent: a batch the
    outage cut off, tried again every few seconds, set them aside again each time (the .rejected file and the
    count the user is shown grew for as long as the outage lasted)."""
    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    bad = "efficiency/val_" + "x" * 300 + "_per_kj"
    records = [("metrics", {"energy/epoch_j": 0.0, bad: 1.0}, 0), ("flush", {}, None),
               ("metrics", {"energy/epoch_j": 1.0, bad: 1.0}, 1)]
    spool = write_spool(tmp_path / "spool-r.jsonl", RunTarget(uri, experiment_name="refused"), records)
    MlflowClient(uri).search_experiments()
    sender = Sender(spool)
    sender.read(final=True)
    sender.pending, rest = sender.pending[:2], sender.pending[2:]
    assert sender.send() and sender.state.set_aside == 1
    sender.pending = rest
    original, outage = MlflowClient.log_batch, [3]

    def flaky(self, *args, **kwargs):
        if outage[0]:
            outage[0] -= 1
            raise ConnectionError("Connection refused")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    results = []
    for _ in range(4):
        sender.retry_at = 0.0
        results.append(sender.send())
    assert results == [False, False, False, True]
    kept = [json.loads(line) for line in rejected_path(spool).read_text().splitlines()]
    assert [k["content"]["step"] for k in kept] == [0, 1] and sender.state.set_aside == 2


@pytest.mark.parametrize("user_timeout", [None, "7"])
def test_a_timed_out_request_lengthens_the_senders_timeout_not_the_callers(tmp_path, monkeypatch, user_timeout):
    """A request that timed out doubled the HTTP timeout in the environment of the process running the sender:
    ``replay_spool()`` in a user's process left that process's MLflow calls with 10 s (MLflow's default is
    120 s) or twice the user's own value, for good."""
    import requests

    from green_callbacks.sinks.sender import Sender

    if user_timeout is None:
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", user_timeout)
    uri = ready_store(tmp_path, "m.db")
    spool = write_spool(tmp_path / "spool-t.jsonl", RunTarget(uri, experiment_name="slow"), epochs(2))
    MlflowClient(uri).search_experiments()
    original, seen, slow = MlflowClient.log_batch, [], [1]

    def timing_out(self, *args, **kwargs):
        seen.append(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
        if slow[0]:
            slow[0] -= 1
            raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=7)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", timing_out)
    sender = Sender(spool)
    sender.read(final=True)
    assert not sender.send()
    assert os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") == user_timeout  # the caller's, as it was
    sender.retry_at = 0.0
    assert sender.send()
    doubled = str(min(2 * int(user_timeout or 120), 30)) if user_timeout else "120"  # never shorter than it was
    assert seen == [user_timeout, doubled]
    assert os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") == user_timeout and sender.timeout_s is None


def test_a_state_file_that_cannot_be_written_costs_one_warning_and_sending_goes_on(tmp_path, capsys):
    """The sender saves its progress beside the spool after each send; a folder that turned read-only (or a full
    disk) made that save raise inside the sender: it crashed, was restarted and crashed again, and nothing reached
    a store that was up."""
    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    spool = write_spool(tmp_path / "spool-w.jsonl", RunTarget(uri, experiment_name="unwritable"), epochs(3))
    state_path(spool).mkdir()  # where the state goes, something that cannot be replaced by a file
    sender = Sender(spool)
    sender.read(final=True)
    assert sender.send()
    client = MlflowClient(uri)
    assert [s for s, _ in history(client, sender.state.run_id, "energy/epoch_j")] == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and str(state_path(spool)) in err
    assert not list(tmp_path.glob("*.tmp")), "no half-written state left behind"


def test_an_emptied_state_file_is_a_replay_from_the_start_not_an_error(tmp_path, capsys):
    """A power cut between the state's write and its rename can leave it empty: replay failed with a bare
    'Expecting value: line 1 column 1', every time. Progress unknown, it sends everything again; MLflow keeps one
    copy of each identical value, so nothing shows twice."""
    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    spool = write_spool(tmp_path / "spool-e.jsonl", RunTarget(uri, experiment_name="emptied"),
                        [*epochs(2), ("flush", {}, None), *epochs(2, start=2)])
    sender = Sender(spool)
    sender.read(final=True)
    sender.pending = sender.pending[:3]  # the first two epochs and the flush were sent
    assert sender.send()
    state_path(spool).write_text("")
    assert cli(["replay", str(spool)]) == 0
    err = capsys.readouterr().err
    assert "cannot be read" in err and str(state_path(spool)) in err
    client = MlflowClient(uri)
    assert [s for s, _ in history(client, sender.state.run_id, "energy/epoch_j")] == [0, 1, 2, 3]
    assert not spool.exists()


@pytest.mark.parametrize("then", ["a stop's own metrics", "the point that carries it"])
def test_a_held_checkpoint_point_is_sent_once_and_only_if_nothing_carried_it(tmp_path, then):
    """A checkpoint's point is written as a held record: the next point at its step carries its values (once per
    step); a record of a stop decided there (``energy/saved_j_projected``) does not, and the training killed after
    it lost the held values."""
    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    later = ({"energy/saved_j_projected": 50.0} if then == "a stop's own metrics" else
             {"energy/cumulative_j": 130.0, "energy/eval_j": 30.0})
    spool = write_spool(tmp_path / "spool-h.jsonl", RunTarget(uri, experiment_name="held"),
                        [("held", {"energy/cumulative_j": 100.0}, 5), ("metrics", later, 5)])
    sender = Sender(spool)
    sender.read(final=True)  # the training was killed here
    assert sender.send()
    cumulative = history(MlflowClient(uri), sender.state.run_id, "energy/cumulative_j")
    assert cumulative == ([(5, 100.0)] if then == "a stop's own metrics" else [(5, 130.0)])


def test_replay_of_a_folder_beside_a_kept_idle_sender_has_nothing_to_send(tmp_path):
    """A notebook: ``trainer.evaluate()`` ended, everything confirmed, its sender kept for the next call. A
    ``green-callbacks replay`` of the folder said "error: ... still running" and exited 1, with nothing to send."""
    uri = ready_store(tmp_path, "m.db")
    sink = MlflowSink(RunTarget(uri, experiment_name="idle"), tmp_path / "out")
    sink.log_metrics({"energy/evaluate_j": 1.5}, step=0)
    sink.set_status("FINISHED")
    assert sink.flush(60) and sink.unconfirmed == 0  # as a stage's end leaves it (its sender kept)
    root = str(Path(__file__).resolve().parents[1])
    replay = subprocess.run([sys.executable, "-m", "green_callbacks.cli", "replay", str(tmp_path / "out"), "--wait",
                             "5"], timeout=120, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    assert replay.returncode == 0, replay.stderr
    assert "everything in it is in MLflow" in replay.stderr and sink.spool_path.exists()
    assert sink.close(30) and not sink.spool_path.exists()


@pytest.mark.slow
def test_replay_after_the_machine_went_down_with_everything_sent_marks_the_run_killed(tmp_path):
    """Training and sender killed -9 together after the sender had sent everything: the replay found nothing to
    send, had opened no client, and left the run RUNNING for ever (then removed the spool: nothing could fix it)."""
    uri = ready_store(tmp_path, "m.db")
    child = textwrap.dedent(f"""
        import os, signal, time
        from green_callbacks.sinks import MlflowSink, RunTarget
        sink = MlflowSink(RunTarget(tracking_uri={uri!r}, experiment_name="down"), {str(tmp_path / "out")!r},
                          first_send_s=0, cadence_s=0.2)
        for step in range(3):
            sink.log_metrics({{"energy/cumulative_j": 10.0 * step}}, step)
            sink.interval_end()
        end = time.time() + 90
        while sink.unconfirmed and time.time() < end:
            time.sleep(0.1)
        print("confirmed", not sink.unconfirmed, flush=True)
        os.kill(sink.sender_pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    died = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=180)
    assert "confirmed True" in died.stdout, died.stderr[-2000:]
    replay = subprocess.run([sys.executable, "-m", "green_callbacks.cli", "replay", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=180)
    assert replay.returncode == 0, replay.stderr[-2000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("down").experiment_id])
    assert run.info.status == "KILLED" and history(client, run.info.run_id, "energy/cumulative_j")[-1] == (2, 20.0)


def test_one_refused_name_in_a_backlog_costs_a_few_requests_not_one_per_metric(tmp_path, monkeypatch):
    """One name MLflow refuses among 400 records sent together: the batch was sent again one metric at a time
    (800 requests; over HTTP 1,289 requests and 79 s for 300 steps, the run RUNNING and the end's wait given up).
    Now the refused batch is halved until the refused name stands alone: the rest still arrives, in a few
    requests, and the name alone is set aside."""
    from green_callbacks.sinks.tracking import RunClient

    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    records = [("metrics", {"energy/cumulative_j": float(s), "power/mean_w": 1.0 + s}, s) for s in range(400)]
    records[150][1]["efficiency/val/../x_per_kj"] = 1.0  # a path MLflow refuses as a metric name
    spool = write_spool(tmp_path / "spool-bad.jsonl", RunTarget(uri, experiment_name="bad"), records)
    calls = []
    real = RunClient.log_batch

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunClient, "log_batch", counted)
    result = replay_spool(spool)
    assert result.complete and result.set_aside == 1
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert len(history(client, run.info.run_id, "energy/cumulative_j")) == 400
    assert len(history(client, run.info.run_id, "power/mean_w")) == 400
    assert len(calls) <= 30, len(calls)


@pytest.mark.slow
@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
def test_records_a_full_disk_kept_from_the_spool_are_copied_elsewhere_for_a_replay(tmp_path, monkeypatch, green_log,
                                                                                    torn):
    """The spool's disk fills mid-run (ENOSPC): the records after it, the run's status among them, were kept in
    memory and dropped at the end ("are lost"), the run left RUNNING. Now the whole spool, they included, is
    copied to the temporary directory (another disk) with the sender's progress, and its replay sends the rest.
    torn: the disk fills in the middle of a record (part of it written): that part is taken back from the file, not
    left as a line the replay "cannot read" and "sets aside"."""
    import errno
    import tempfile
    import types

    from green_callbacks.sinks import spool as spool_module

    uri = ready_store(tmp_path, "m.db")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "elsewhere"))
    sink = MlflowSink(RunTarget(uri, experiment_name="full"), tmp_path / "out", first_send_s=0, cadence_s=0.2)
    for step in range(3):
        sink.log_metrics({"energy/cumulative_j": float(step)}, step=step)
        sink.interval_end()
    assert sink.flush(60)

    real_write, room = os.write, [64 if torn else 0]  # bytes left on the disk

    def full(fd, data):
        if room[0] > 0:
            room[0], written = 0, real_write(fd, bytes(data)[:room[0]])
            return written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "os", types.SimpleNamespace(**{**vars(os), "write": full}))
    for step in range(3, 6):
        sink.log_metrics({"energy/cumulative_j": float(step)}, step=step)
    sink.set_status("FINISHED")
    began = time.monotonic()
    assert not sink.close(timeout_s=20)
    # what could not be written never reaches the sender: the end does not wait for it (it waited the whole wait, and
    # 30 s more where the sender could not save its progress either)
    assert time.monotonic() - began < 10
    monkeypatch.undo()
    (copy,) = (tmp_path / "elsewhere" / "green_callbacks").glob("spool-*.jsonl")
    assert f"is copied to {copy}" in green_log.text and f"green-callbacks replay {copy}" in green_log.text
    result = replay_spool(copy)
    assert result.complete and result.set_aside == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert [s for s, _ in history(client, run.info.run_id, "energy/cumulative_j")] == list(range(6))
    assert run.info.status == "FINISHED"


def test_a_refusal_whose_rejected_file_cannot_be_written_says_where_it_stays(tmp_path):
    """The warning said a refused metric "is set aside in ....rejected.jsonl" when that file could not be written
    (a full disk, a read-only folder): the file was empty. Now it says the record is not kept (the spool that holds
    it is removed once the rest is sent)."""
    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    bad = "efficiency/val_" + "x" * 300 + "_per_kj"
    spool = write_spool(tmp_path / "spool-ro.jsonl", RunTarget(uri, experiment_name="ro"),
                        [("metrics", {"energy/epoch_j": 1.0, bad: 1.0}, 0)])
    rejected_path(spool).mkdir()  # where the file would go, a folder: writing it fails
    sender = Sender(spool)
    sender.read(final=True)
    assert sender.send()
    (note,) = [n for n in sender.state.notes if "refused the metric" in n]
    assert "it is not kept" in note and "at line 2 of" in note and "set aside in" not in note


def test_an_mlflow_error_code_is_said_once():
    """A server's refusal read 'INVALID_PARAMETER_VALUE: INVALID_PARAMETER_VALUE: ...' (the code, then MLflow's
    message, which starts with it over HTTP)."""
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from green_callbacks.sinks.verdicts import describe

    over_http = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "'Metric name' is too long"})
    assert describe(over_http) == "INVALID_PARAMETER_VALUE: 'Metric name' is too long"
    local = MlflowException("'Metric name' is too long", error_code=INVALID_PARAMETER_VALUE)
    assert describe(local) == "INVALID_PARAMETER_VALUE: 'Metric name' is too long"


@pytest.mark.slow
def test_a_locked_sqlite_store_is_said_to_be_locked_not_unreachable(tmp_path):
    """Another process holding the default store's write lock (a second training, `mlflow ui` migrating it) was
    reported as "MLflow at sqlite:///... cannot be reached"."""
    import sqlite3

    from green_callbacks.sinks.sender import Sender

    uri = ready_store(tmp_path, "m.db")
    MlflowClient(uri).search_experiments()
    spool = write_spool(tmp_path / "spool-lk.jsonl", RunTarget(uri, experiment_name="locked"), epochs(1))
    holder = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sender = Sender(spool)
        sender.read(final=True)
        sender.send()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    notes = " ".join(sender.state.notes)
    assert "is locked by another process" in notes and "cannot be reached" not in notes, notes


CONTEXT_SCRIPT = """
import sys
from green_callbacks import EnergyTracker

with EnergyTracker(tracking_uri=sys.argv[1], experiment_name="context", output_dir=sys.argv[2]) as tracker:
    with tracker.epoch(0):
        sum(range(10 ** 5))
"""


@pytest.mark.slow
def test_a_run_the_package_opens_has_mlflows_context_tags(tmp_path):
    """MLflow tags a run it opens with its user, its script and the git commit; a run this package opened had
    ``mlflow.source.name`` "green-callbacks" and no user: the UI's Source column named no script of the user's."""
    import getpass

    repo = tmp_path / "project"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text("0123456789abcdef0123456789abcdef01234567\n")
    script = repo / "train.py"
    script.write_text(CONTEXT_SCRIPT)
    uri = ready_store(tmp_path)
    proc = subprocess.run([sys.executable, str(script), uri, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("context").experiment_id])
    tags = run.data.tags
    assert tags["mlflow.source.name"] == str(script)
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.git.commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["green.local_id"]  # (how a retry finds the run)


def test_git_commit_is_read_from_packed_refs_a_worktree_and_a_detached_head(tmp_path):
    from green_callbacks.sinks.target import context_tags, git_commit

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    main = tmp_path / "main"
    (main / ".git").mkdir(parents=True)
    (main / ".git" / "HEAD").write_text("ref: refs/heads/dev\n")
    (main / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/dev\n")
    (main / "src" / "deep").mkdir(parents=True)
    assert git_commit(main / "src" / "deep") == sha
    worktree = tmp_path / "wt"  # git worktree add: a .git file naming a folder whose commondir is the main .git
    gitdir = main / ".git" / "worktrees" / "wt"
    gitdir.mkdir(parents=True)
    (gitdir / "HEAD").write_text("ref: refs/heads/dev\n")
    (gitdir / "commondir").write_text("../..\n")
    worktree.mkdir()
    (worktree / ".git").write_text(f"gitdir: {gitdir}\n")
    assert git_commit(worktree) == sha
    (gitdir / "HEAD").write_text(sha[::-1] + "\n")
    assert git_commit(worktree) == sha[::-1]
    assert git_commit(tmp_path / "elsewhere") is None or (tmp_path / ".git").exists()
    # a forged spool header sets MLflow's context tags only, as short printable text
    assert context_tags({"context": {"mlflow.user": "me", "mlflow.runName": "x", "mlflow.source.name": "a\nb",
                                     "green.stop_reason": "x"}}) == {"mlflow.user": "me"}
