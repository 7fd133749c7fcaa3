"""``green-callbacks replay`` of a forged spool: it acts on its own run only, uploads only this package's files,
creates no store and sends no credential to a server the file names; it says where it sends what."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from mlflow.tracking import MlflowClient
from test_spool import epochs, write_spool

from green_callbacks.cli import main as cli
from green_callbacks.sinks import RunTarget, replay_spool
from green_callbacks.sinks.files import open_own
from green_callbacks.sinks.spool import State, rejected_path
from green_callbacks.sinks.tracking import LOCAL_ID_TAG

from helpers import free_port, ready_store


@pytest.fixture
def store(tmp_path):
    uri = ready_store(tmp_path, "m.db")
    client = MlflowClient(uri)
    victim = client.create_run(client.create_experiment("someone else's"), run_name="precious").info.run_id
    return uri, client, victim


def rejected(spool) -> list[dict]:
    return [json.loads(line) for line in rejected_path(spool).read_text().splitlines()]


def test_a_forged_spool_neither_renames_nor_ends_another_run(tmp_path, store, capsys):
    uri, client, victim = store
    records = [*epochs(2), ("tags", {"mlflow.runName": "pwned", "green.method.gpu": "counter"}, None),
               ("params", {"mlflow.user": "mallory"}, None), ("status", {"status": "KILLED"}, None)]
    spool = write_spool(tmp_path / "spool-f1.jsonl", RunTarget(uri, victim, owned=True), records)
    assert cli(["replay", str(spool)]) == 0
    out, err = capsys.readouterr()
    assert f"replay {spool}: 2 metrics records, 1 status records to run {victim} at {uri} (named by the spool); 2 " \
           "records refused (set aside)" in out
    assert "the status KILLED is not set" in err and "did not open it" in err
    run = client.get_run(victim)
    assert (run.info.run_name, run.info.status) == ("precious", "RUNNING")
    assert "mlflow.user" not in run.data.params and "green.method.gpu" not in run.data.tags
    assert {r["content"]["kind"] for r in rejected(spool)} == {"tags", "params"}


def test_a_forged_state_file_cannot_point_replay_at_another_run(tmp_path, store, capsys):
    uri, client, victim = store
    spool = write_spool(tmp_path / "spool-f2.jsonl", RunTarget(uri, experiment_name="mine"),
                        [*epochs(2), ("status", {"status": "KILLED"}, None)])
    State(run_id=victim, tracking_uri=uri, owned=True).save(spool)
    assert cli(["replay", str(spool)]) == 1
    assert f"names the run {victim}, which is not this spool's run" in capsys.readouterr().err
    run = client.get_run(victim)
    assert run.info.status == "RUNNING" and not run.data.metrics
    assert spool.exists(), "the spool is kept"


def test_its_own_run_gets_its_status_and_files_from_its_run_folder(tmp_path, store):
    uri, client, _ = store
    out = tmp_path / "out"
    folder = out / "local-own"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    records = [*epochs(1), ("artifact", {"path": str(folder / "summary.json"), "artifact_path": "green_callbacks"},
                            None), ("status", {"status": "FINISHED"}, None)]
    spool = write_spool(out / "spool-own.jsonl", RunTarget(uri, experiment_name="mine"), records)
    result = replay_spool(spool)
    assert result.complete and result.set_aside == 0
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[LOCAL_ID_TAG] == "own"
    assert [a.path for a in client.list_artifacts(result.run_id, "green_callbacks")] == ["green_callbacks/summary.json"]


def test_a_forged_spool_uploads_no_file_but_this_packages_own(tmp_path, store):
    uri, client, _ = store
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "run" / "summary.json").symlink_to(secret)  # a link with an output's name
    (out / "run" / "notes.txt").write_text("not an output")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "intervals.csv").write_text("a,b\n")  # an output's name, not beside the spool
    paths = [(str(secret), "green_callbacks"), (str(out / "run" / "summary.json"), "green_callbacks"),
             (str(out / "run" / "notes.txt"), "green_callbacks"), (str(tmp_path / "elsewhere" / "intervals.csv"),
                                                                   "green_callbacks"),
             (str(out / "run" / ".." / ".." / "secret.txt"), "green_callbacks"), ("secret.txt", "green_callbacks")]
    records = [("artifact", {"path": p, "artifact_path": a}, None) for p, a in paths]
    spool = write_spool(out / "spool-f3.jsonl", RunTarget(uri, experiment_name="mine"), [*epochs(1), *records])
    result = replay_spool(spool)
    assert result.complete and result.set_aside == len(paths)
    assert client.list_artifacts(result.run_id) == []
    assert all("replay uploads only green-callbacks' own files" in r["reason"] for r in rejected(spool))


def test_files_a_sender_left_for_later_are_vetted_and_sent_by_replay(tmp_path, store):
    """A failing artifact store: the sender sent the run's status and left the files for replay, listed by line in
    its state file (``deferred``). Replay sends them; the state file is trusted no more than the spool: a listed
    line that is not this package's file is refused, one that is no artifact is not sent again."""
    from green_callbacks.sinks import read_spool

    uri, client, _ = store
    out = tmp_path / "out"
    folder = out / "local-later"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    records = [*epochs(1), ("artifact", {"path": str(folder / "summary.json"), "artifact_path": "green_callbacks"},
                            None), ("artifact", {"path": str(secret), "artifact_path": "green_callbacks"}, None),
               ("status", {"status": "FINISHED"}, None)]
    spool = write_spool(out / "spool-later.jsonl", RunTarget(uri, experiment_name="mine"), records)
    last = read_spool(spool).records[-1]
    State(offset=last.end, line=last.line, seq=last.seq, tracking_uri=uri, deferred=[2, 3, 4, 99]).save(spool)
    result = replay_spool(spool)
    assert result.complete and result.set_aside == 1 and not spool.exists()
    assert [a.path for a in client.list_artifacts(result.run_id, "green_callbacks")] == ["green_callbacks/summary.json"]
    assert client.get_metric_history(result.run_id, "energy/epoch_j") == [], "a line that is no artifact, sent again"
    assert [r["content"]["data"]["path"] for r in rejected(spool)] == [str(secret)]


def test_a_forged_spool_creates_no_store_at_a_path_it_names(tmp_path, capsys):
    evil = tmp_path / "planted" / "evil.db"
    evil.parent.mkdir()
    spool = write_spool(tmp_path / "spool-f4.jsonl", RunTarget(f"sqlite:///{evil}", experiment_name="x"), epochs(1))
    assert cli(["replay", str(spool)]) == 1
    err = capsys.readouterr().err
    assert f"names the MLflow store sqlite:///{evil}, which does not exist; replay creates no store" in err
    assert not evil.exists() and spool.exists()
    file_store = tmp_path / "planted" / "mlruns"
    spool = write_spool(tmp_path / "spool-f5.jsonl", RunTarget(str(file_store), experiment_name="x"), epochs(1))
    with pytest.raises(ValueError, match="which does not exist"):
        replay_spool(spool)
    assert not file_store.exists()
    mine = ready_store(tmp_path, "mine.db")  # the store the user names
    assert cli(["replay", str(spool), "--tracking-uri", mine]) == 0
    assert "(--tracking-uri)" in capsys.readouterr().out
    assert len(MlflowClient(mine).search_runs([MlflowClient(mine).get_experiment_by_name("x").experiment_id])) == 1


def test_a_forged_spool_runs_no_migrations_in_another_programs_database(tmp_path, capsys):
    """A sqlite file that exists but holds no MLflow store (a browser's history, an application's data) is refused
    whole: MLflow would add its tables to it and write the run there."""
    import sqlite3

    app = tmp_path / "app.sqlite"
    with contextlib.closing(sqlite3.connect(app)) as db:
        db.execute("CREATE TABLE history (url TEXT)")
        db.execute("INSERT INTO history VALUES ('https://example.org')")
        db.commit()
    before = app.read_bytes()
    spool = write_spool(tmp_path / "spool-f7.jsonl", RunTarget(f"sqlite:///{app}", experiment_name="x"), epochs(1))
    assert cli(["replay", str(spool)]) == 1
    err = capsys.readouterr().err
    assert f"names the MLflow store sqlite:///{app}, which is not an MLflow store; replay creates no store" in err
    assert app.read_bytes() == before and spool.exists()
    mine = ready_store(tmp_path, "mine.db")  # a real store, named in a spool: sent as before
    spool = write_spool(tmp_path / "spool-f8.jsonl", RunTarget(mine, experiment_name="x"), epochs(1))
    assert cli(["replay", str(spool)]) == 0 and not spool.exists()


def test_credentials_in_the_environment_go_only_to_a_server_the_user_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    named = f"http://127.0.0.1:{free_port()}"
    spool = write_spool(tmp_path / "spool-f6.jsonl", RunTarget(named, experiment_name="x"), epochs(1))
    assert cli(["replay", str(spool)]) == 1
    err = capsys.readouterr().err
    assert f"names the server {named}; MLflow credentials here (MLFLOW_TRACKING_PASSWORD) go only " \
           f"to a server you name: run replay again with --tracking-uri {named}" in err
    assert "cannot be reached" not in err, "refused before any request"
    assert cli(["replay", str(spool), "--tracking-uri", named, "--wait", "1"]) == 1
    assert "cannot be reached" in capsys.readouterr().err, "named by the user: tried"


@pytest.mark.parametrize("where", ["the same host over http", "the credentials file", "an auth plugin"])
def test_credentials_go_nowhere_else_than_the_server_the_user_named(tmp_path, monkeypatch, capsys, where):
    """A forged spool naming ``http://host`` while the user's ``MLFLOW_TRACKING_URI`` is ``https://host`` got the
    password sent in clear text (only host:port was compared); MLflow's credentials file and its auth settings
    were not counted as credentials, so a spool naming any server got them."""
    port = free_port()
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    named = f"http://127.0.0.1:{port}"
    if where == "the same host over http":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
        said = "MLFLOW_TRACKING_PASSWORD"
    elif where == "the credentials file":
        (tmp_path / ".mlflow").mkdir()
        (tmp_path / ".mlflow" / "credentials").write_text(
            "[mlflow]\nmlflow_tracking_username = me\nmlflow_tracking_password = hunter2\n")
        said = str(tmp_path / ".mlflow" / "credentials")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "my_company_auth")
        said = "MLFLOW_TRACKING_AUTH"
    spool = write_spool(tmp_path / "spool-f7.jsonl", RunTarget(named, experiment_name="x"), epochs(1))
    assert cli(["replay", str(spool)]) == 1
    err = capsys.readouterr().err
    assert f"names the server {named}; MLflow credentials here ({said}) go only to a server you " \
           "name" in err and "cannot be reached" not in err, "refused before any request"


def test_a_password_that_reads_as_false_is_still_a_password(monkeypatch):
    from green_callbacks.sinks.vetting import credentials

    monkeypatch.setenv("HOME", "/nonexistent")
    for name in ("MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN", "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "0")
    assert credentials() == ["MLFLOW_TRACKING_PASSWORD"]
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_AWS_SIGV4", "false")  # SigV4 switched off: no credential
    assert credentials() == []


def test_the_server_the_user_named_is_the_same_with_its_default_port_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://LOCALHOST")
    spool = write_spool(tmp_path / "spool-f8.jsonl", RunTarget("http://localhost:80", experiment_name="x"), epochs(1))
    cli(["replay", str(spool), "--wait", "1"])
    assert "go only to a server you name" not in capsys.readouterr().err, "http://LOCALHOST is http://localhost:80"


@pytest.mark.parametrize("field", ["local_id", "run_id"])
def test_an_id_that_is_not_one_is_refused(tmp_path, store, field):
    uri, _, _ = store
    target = RunTarget(uri, **{field: "x' OR tags.a = 'b"})
    spool = write_spool(tmp_path / "spool-f7.jsonl", target, epochs(1))
    with pytest.raises(ValueError, match=rf"target.{field}=\"x' OR tags.a = 'b\" is not an id green-callbacks writes"):
        replay_spool(spool)


def test_a_header_without_its_time_is_refused_as_not_a_spool(tmp_path, store):
    """A header without t_ms was reported as "MLflow at ... cannot be reached (KeyError: 't_ms')": an outage, which
    a replay run again never mends."""
    uri, _, _ = store
    spool = write_spool(tmp_path / "spool-f8.jsonl", RunTarget(uri, experiment_name="h"), epochs(1))
    lines = spool.read_text().splitlines()
    header = json.loads(lines[0])
    del header["data"]["t_ms"]
    spool.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"its header has no t_ms .*: not a spool green-callbacks wrote; refused"):
        replay_spool(spool)


def test_a_line_nested_deeper_than_the_parser_goes_is_set_aside_alone(tmp_path, store):
    """[[[[... 100000 deep: a RecursionError failed the whole replay ("the spool is kept"); any other unreadable
    line is set aside by its number and the rest sent."""
    uri, client, _ = store
    spool = write_spool(tmp_path / "spool-f9.jsonl", RunTarget(uri, experiment_name="deep"), epochs(2))
    lines = spool.read_text().splitlines()
    spool.write_text("\n".join([*lines[:2], "[" * 100_000 + "]" * 100_000, *lines[2:]]) + "\n")
    result = replay_spool(spool)
    assert result.complete and result.unreadable == [3] and result.set_aside == 1
    (run,) = client.search_runs([client.get_experiment_by_name("deep").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "energy/epoch_j")) == 2


def test_credentials_in_the_replay_uri_are_never_written_or_printed(tmp_path, store, capsys):
    uri, _, _ = store
    spool = write_spool(tmp_path / "spool-f8.jsonl", RunTarget(uri, experiment_name="x"), epochs(1))
    port = free_port()
    assert cli(["replay", str(spool), "--tracking-uri", f"http://u:hunter2@127.0.0.1:{port}", "--wait", "1"]) == 1
    out, err = capsys.readouterr()
    assert f"at http://127.0.0.1:{port} (--tracking-uri)" in out and "cannot be reached" in err
    assert "hunter2" not in out + err
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ, "set for the replay only"
    for path in tmp_path.iterdir():
        if path.is_file():
            assert b"hunter2" not in path.read_bytes(), path


def test_replay_writes_nothing_through_a_link_planted_beside_the_spool(tmp_path, store):
    """A link at ``spool-<id>.rejected.jsonl`` made replay append forged text (``$(id > ...)``) to the user's
    ``~/.bashrc``, and links at the state file's temporary names (``<pid>.tmp``) had it replaced by the state."""
    uri, client, victim = store
    home = tmp_path / "home"
    home.mkdir()
    bashrc = home / ".bashrc"
    bashrc.write_text("export PATH=$HOME/bin:$PATH\n")
    spool = write_spool(tmp_path / "spool-a3.jsonl", RunTarget(uri, victim),
                        [*epochs(1), ("params", {"$(id > /tmp/pwned)": "x"}, None)])
    rejected_path(spool).symlink_to(bashrc)
    for pid in range(os.getpid(), os.getpid() + 50):  # the old temporary names, one per pid
        (tmp_path / f"spool-a3.jsonl.state.json.{pid}.tmp").symlink_to(bashrc)
    assert cli(["replay", str(spool)]) == 0
    hard = tmp_path / "spool-a3.jsonl.log"  # the sender's log, once its training has gone: a hard link there
    os.link(bashrc, hard)
    os.close(open_own(hard, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
    assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n" and hard.stat().st_nlink == 1
    copy = tmp_path / "rescued.jsonl"  # a rescued copy is written with O_TRUNC: a hard link's target is not emptied
    os.link(bashrc, copy)
    os.close(open_own(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
    assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n"
    fifo = tmp_path / "spool-a3.jsonl.fifo"  # a FIFO at the name: refused at once, not waited on
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # (ENXIO: no reader; it would have blocked until one came)
        open_own(fifo, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    assert not rejected_path(spool).is_symlink() and rejected(spool)[0]["content"]["kind"] == "params"
    assert client.get_run(victim).data.metrics == {"energy/epoch_j": 0.0, "time/epoch_s": 0.1}


def test_into_a_run_it_did_not_open_a_forged_spool_logs_only_this_packages_metrics(tmp_path, store):
    """A spool naming someone's run added ``val_acc`` 0.999 at the next step to its history."""
    uri, client, victim = store
    client.log_metric(victim, "val_acc", 0.80, step=10)
    spool = write_spool(tmp_path / "spool-a1.jsonl", RunTarget(uri, victim),
                        [("metrics", {"val_acc": 0.999, "test_acc": 0.999, "energy/epoch_j": 5.0, "test/samples": 8.0},
                          11),
                         ("metrics", {"energy/epoch_j": 2.0}, 2 ** 70)])
    assert cli(["replay", str(spool)]) == 0
    assert [(m.step, m.value) for m in client.get_metric_history(victim, "val_acc")] == [(10, 0.80)]
    assert "test_acc" not in client.get_run(victim).data.metrics
    assert [(m.step, m.value) for m in client.get_metric_history(victim, "energy/epoch_j")] == [(11, 5.0)]
    assert client.get_run(victim).data.metrics["test/samples"] == 8.0  # a stage's own count is this package's
    reasons = [r["reason"] for r in rejected(spool)]
    assert any("['test_acc', 'val_acc'] are not green-callbacks' own" in r for r in reasons), reasons
    assert any("not numbers MLflow takes" in r for r in reasons), reasons


def test_a_spool_another_user_wrote_is_refused_whole(tmp_path, store, capsys):
    """Another user's spool (or the store it names, or a file it uploads) could send the user's files or
    credentials anywhere, or write where its store's artifact folders say: refused."""
    uri, client, victim = store
    spool = write_spool(tmp_path / "spool-o1.jsonl", RunTarget(uri, victim), epochs(1))
    try:
        os.chown(spool, os.geteuid() + 4242, -1)
    except PermissionError:
        pytest.skip("files can be given to another user only by root")
    assert cli(["replay", str(spool)]) != 0
    assert f"belongs to uid {os.geteuid() + 4242}, not to you" in capsys.readouterr().err
    assert not client.get_run(victim).data.metrics
    os.chown(spool, os.geteuid(), -1)
    os.chown(uri.removeprefix("sqlite:///"), os.geteuid() + 4242, -1)
    assert cli(["replay", str(spool)]) != 0
    assert "names the MLflow store" in capsys.readouterr().err and not client.get_run(victim).data.metrics
