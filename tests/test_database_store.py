"""MLflow's database stores take their user and password from the URI only (SQLAlchemy reads no MLflow variable).
A real PostgreSQL server (``pgserver``: PostgreSQL's own binaries, run in a temporary folder) that asks for a
password: the records of a training whose tracking URI holds one reach it, and no file or line of output holds
the password; replay writes to a database only where the user names it."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient
from test_intervals import lightning_fit
from test_secrets import assert_nowhere, stop_sender
from test_spool import epochs, write_spool

from green_callbacks import lightning as gl
from green_callbacks.cli import main as cli
from green_callbacks.sinks import RunTarget

from helpers import lightning_digits_module

SECRET = "hunter2-s3cr3t"
PASSWORD = f"{SECRET}/@:#"  # characters a URI takes only percent-encoded


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The URI of a database ``mlflow`` owned by the role ``dave``, who must give his password (scram-sha-256)
    over the server's socket; without the user and password."""
    import pgserver

    folder = Path(tempfile.mkdtemp(prefix="pg"))  # short: a socket's path has at most 107 characters
    server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        secret = PASSWORD.replace("'", "''")
        server.psql(f"CREATE ROLE dave LOGIN PASSWORD '{secret}';")
        server.psql("CREATE DATABASE mlflow OWNER dave;")
        (folder / "pg_hba.conf").write_text(f"local all {server.postgres_user} trust\n"
                                            "local all all scram-sha-256\n")
        server.psql("SELECT pg_reload_conf();")
        yield f"postgresql+pg8000:///mlflow?unix_sock={folder}/.s.PGSQL.5432"
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def with_user(uri: str) -> str:
    return uri.replace(":///", f"://dave:{quote(PASSWORD, safe='')}@/", 1)


def test_a_password_protected_database_gets_the_records_and_no_file_the_password(tmp_path, postgres, capsys,
                                                                                 caplog):
    out = tmp_path / "out"
    monitor = gl.EnergyMonitor(tracking_uri=with_user(postgres), output_dir=str(out), experiment_name="db",
                               mlflow_wait_s=60)
    caplog.set_level(logging.INFO)
    try:
        lightning_fit(tmp_path, lightning_digits_module()(), [monitor], max_epochs=2)
    finally:
        stop_sender(out)
    printed = capsys.readouterr()
    assert "nothing more can be sent" not in printed.err + caplog.text, printed.err
    client = MlflowClient(with_user(postgres))
    (run,) = client.search_runs([client.get_experiment_by_name("db").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "energy/epoch_j")) == 2
    assert not list(out.glob("spool-*.jsonl")), "everything sent"
    assert assert_nowhere(tmp_path, printed.out, printed.err, caplog.text) >= 2
    assert SECRET not in "".join(str(v) for v in run.data.params.values())
    assert cli(["report", "db", "--tracking-uri", with_user(postgres)]) == 0  # the report reads it back
    printed = capsys.readouterr()
    assert run.info.run_id[:8] in printed.out and SECRET not in printed.out + printed.err


def test_replay_writes_to_a_database_only_where_the_user_names_it(tmp_path, postgres, capsys):
    spool = write_spool(tmp_path / "spool-d1.jsonl", RunTarget(postgres, experiment_name="replayed"), epochs(2))
    assert cli(["replay", str(spool)]) == 1
    err = capsys.readouterr().err
    assert f"names the database {postgres}; replay writes to a database server only when you name it" in err
    assert spool.exists()
    assert cli(["replay", str(spool), "--tracking-uri", with_user(postgres), "--wait", "5"]) == 0
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err and not spool.exists()
    client = MlflowClient(with_user(postgres))
    (run,) = client.search_runs([client.get_experiment_by_name("replayed").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "energy/epoch_j")) == 2
    assert_nowhere(tmp_path)
