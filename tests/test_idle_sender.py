"""A process that trains again (a sweep's next trial, a notebook's next ``fit``) hands its next spool to the MLflow
sender it kept idle: MLflow's import (seconds of CPU) is paid once, and no spool is ever left without a sender."""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from green_callbacks.sinks import MlflowSink, RunTarget, launch

from helpers import free_port, history, ready_store


def wait_for(what: str, check, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.1)


def ended(pid: int) -> bool:
    """Gone, or exited and not yet reaped."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def train(uri: str | None, out: Path, experiment: str, joules: float) -> tuple[MlflowSink, str]:
    """One training's records through a sink, closed as a training's end closes it; its run's id."""
    sink = MlflowSink(RunTarget(uri, experiment_name=experiment), out)
    for step in range(3):
        sink.log_metrics({"energy/cumulative_j": joules * (step + 1)}, step=step)
        sink.interval_end()
    sink.set_status("FINISHED")
    assert sink.close(60), "MLflow confirmed everything"
    return sink, sink.run_ref.run_id


def test_trainings_of_one_process_share_its_sender_and_each_run_gets_its_own_records(tmp_path):
    """Three trainings in a row, as a sweep runs its trials: one sender sends all three runs, each its own
    records, to two stores (it follows each spool's own store), and each spool is removed once confirmed."""
    first, second = ready_store(tmp_path / "a"), ready_store(tmp_path / "b")
    done = [train(uri, tmp_path / "out", "sweep", float(i + 1)) for i, uri in enumerate((first, second, first))]
    pids = {sink.sender_pid for sink, _ in done}
    assert len(pids) == 1 and not ended(pids.pop())
    for i, (uri, (sink, run_id)) in enumerate(zip((first, second, first), done, strict=True)):
        client = MlflowClient(uri)
        assert history(client, run_id, "energy/cumulative_j") == [(s, (i + 1.0) * (s + 1)) for s in range(3)]
        assert client.get_run(run_id).info.status == "FINISHED" and not sink.spool_path.exists()
    client = MlflowClient(first)
    assert len(client.search_runs([client.get_experiment_by_name("sweep").experiment_id])) == 2


def test_trainings_into_the_stores_that_set_tracking_uri_names_share_the_sender(tmp_path, monkeypatch):
    """A sweep that names each trial's store with ``mlflow.set_tracking_uri`` (which sets ``MLFLOW_TRACKING_URI``
    in the process's environment): the kept sender is handed every spool (a new one was started, and MLflow
    imported again, at every change of store), and each run's records reach the store that trial named."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)  # (put back after the test, as MLFLOW_TRACKING_URI is)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stores = [ready_store(tmp_path / "a"), ready_store(tmp_path / "b"), ready_store(tmp_path / "c")]
    done = []
    for i, uri in enumerate(stores):
        mlflow.set_tracking_uri(uri)
        done.append(train(None, tmp_path / "out", "sweep", float(i + 1)))
    assert len({sink.sender_pid for sink, _ in done}) == 1, "one sender for the three trainings"
    for i, (uri, (_, run_id)) in enumerate(zip(stores, done, strict=True)):
        client = MlflowClient(uri)
        assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("sweep").experiment_id])] \
            == [run_id], "each store holds its own trial's run"
        assert history(client, run_id, "energy/cumulative_j") == [(s, (i + 1.0) * (s + 1)) for s in range(3)]


@pytest.mark.parametrize("idle_s", [1.0, 0.0], ids=["ends after IDLE_S", "IDLE_S=0 keeps none"])
def test_an_idle_sender_ends_after_its_wait_and_the_next_training_starts_another(tmp_path, monkeypatch, idle_s):
    monkeypatch.setattr(launch, "IDLE_S", idle_s)
    uri = ready_store(tmp_path)
    sink, _ = train(uri, tmp_path / "out", "idle", 1.0)
    wait_for("the idle sender's end", lambda: ended(sink.sender_pid), 30)
    later, run_id = train(uri, tmp_path / "out", "idle", 2.0)
    assert later.sender_pid != sink.sender_pid
    assert history(MlflowClient(uri), run_id, "energy/cumulative_j")[-1] == (2, 6.0)


def test_a_sender_killed_while_idle_is_replaced_and_nothing_is_lost(tmp_path):
    uri = ready_store(tmp_path)
    sink, _ = train(uri, tmp_path / "out", "killed", 1.0)
    os.kill(sink.sender_pid, signal.SIGKILL)
    wait_for("the kill", lambda: ended(sink.sender_pid), 10)
    later, run_id = train(uri, tmp_path / "out", "killed", 2.0)
    assert later.sender_pid != sink.sender_pid
    assert history(MlflowClient(uri), run_id, "energy/cumulative_j")[-1] == (2, 6.0)


def test_a_changed_environment_gets_a_new_sender_and_the_old_one_ends(tmp_path, monkeypatch):
    """The sender reads MLflow's settings and credentials from its environment, once: a training after a change
    of them (a token set, a proxy) is not sent by a sender that still has the old ones."""
    uri = ready_store(tmp_path)
    sink, _ = train(uri, tmp_path / "out", "env", 1.0)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "changed")
    later, run_id = train(uri, tmp_path / "out", "env", 2.0)
    assert later.sender_pid != sink.sender_pid
    wait_for("the old sender's end", lambda: ended(sink.sender_pid), 30)
    assert history(MlflowClient(uri), run_id, "energy/cumulative_j")[-1] == (2, 6.0)


def test_a_sender_whose_spool_was_not_confirmed_is_not_kept_and_ends_with_its_linger(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    sink = MlflowSink(RunTarget(down, experiment_name="down"), tmp_path / "out", first_send_s=0, linger_s=2)
    sink.log_metrics({"energy/cumulative_j": 1.0}, step=0)
    assert not sink.close(0)
    assert launch.IDLE._proc is None or launch.IDLE._proc.pid != sink.sender_pid
    wait_for("the sender's end after its linger", lambda: ended(sink.sender_pid), 60)
    assert sink.spool_path.exists()  # kept for a replay
    later, _ = train(ready_store(tmp_path), tmp_path / "out2", "after", 1.0)
    assert later.sender_pid != sink.sender_pid


def test_a_sink_dropped_without_close_ends_its_sender_once_sent(tmp_path):
    uri = ready_store(tmp_path)
    sink = MlflowSink(RunTarget(uri, experiment_name="dropped"), tmp_path / "out", first_send_s=0)
    sink.log_metrics({"energy/cumulative_j": 1.0}, step=0)
    pid, spool = sink.sender_pid, sink.spool_path
    del sink
    gc.collect()
    wait_for("the dropped sink's sender's end", lambda: ended(pid), 60)
    assert not spool.exists()  # sent, then removed by the sender itself
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("dropped").experiment_id])
    assert history(MlflowClient(uri), run.info.run_id, "energy/cumulative_j") == [(0, 1.0)]


@pytest.mark.slow
def test_a_kept_sender_does_not_hold_the_training_commands_output_open(tmp_path):
    """``subprocess.run(["python", "train.py"], capture_output=True)`` (a CI job, ``| tee``) returns when every
    process holding the output pipe has closed it: a sender kept idle for IDLE_S must end with the training's
    process, not hold the command for its idle wait."""
    uri = ready_store(tmp_path)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from green_callbacks.sinks import MlflowSink, RunTarget
        sink = MlflowSink(RunTarget({uri!r}, experiment_name="cli"), Path({str(tmp_path / "out")!r}))
        sink.log_metrics({{"energy/cumulative_j": 1.0}}, step=0)
        assert sink.close(60)
        print(sink.sender_pid, time.time(), flush=True)
    """)
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    returned = time.time()
    assert done.returncode == 0, done.stderr[-2000:]
    pid, exited = done.stdout.split()
    assert returned - float(exited) < launch.IDLE_S / 3
    # (the command returns once the sender let go of its output, which can be a moment before the sender has exited:
    # once seen still running 0.04 s after the training's exit)
    wait_for("the kept sender's end with its training", lambda: ended(int(pid)),
             launch.IDLE_S / 3 - (time.time() - float(exited)))



def test_a_store_deleted_and_made_again_between_trainings_gets_the_next_run(tmp_path):
    """A notebook's ``rm mlflow.db`` between two trainings: the kept sender wrote through MLflow's cached engine to
    the deleted file ("attempt to write a readonly database") and the second training's records were refused."""
    uri = ready_store(tmp_path / "store")
    train(uri, tmp_path / "out", "again", 1.0)
    shutil.rmtree(tmp_path / "store")
    (tmp_path / "store").mkdir()
    _, run_id = train(uri, tmp_path / "out", "again", 2.0)
    assert history(MlflowClient(uri), run_id, "energy/cumulative_j")[-1] == (2, 6.0)


def test_a_spool_deleted_under_its_sender_is_not_handed_on(tmp_path):
    """The output folder removed before the training's end: close() found no spool and kept the sender, which was
    still following the deleted spool, so the next training's spool was handed to a sender that never read it."""
    uri = ready_store(tmp_path)
    sink = MlflowSink(RunTarget(uri, experiment_name="gone"), tmp_path / "out1")
    sink.log_metrics({"energy/cumulative_j": 1.0}, step=0)
    shutil.rmtree(tmp_path / "out1")
    sink.close(5)
    _, run_id = train(uri, tmp_path / "out2", "gone", 2.0)
    assert history(MlflowClient(uri), run_id, "energy/cumulative_j")[-1] == (2, 6.0)
    wait_for("the first sender's end (its spool is gone)", lambda: ended(sink.sender_pid), 30)


@pytest.mark.parametrize("change", ["PL_GLOBAL_SEED", "LOCAL_RANK"])
def test_what_a_framework_sets_as_it_runs_does_not_refuse_the_kept_sender(tmp_path, monkeypatch, change):
    """``seed_everything(trial)`` sets ``PL_GLOBAL_SEED`` at every trial of a sweep: no trial reused the sender."""
    uri = ready_store(tmp_path)
    sink, _ = train(uri, tmp_path / "out", "seeded", 1.0)
    monkeypatch.setenv(change, "7")
    later, _ = train(uri, tmp_path / "out", "seeded", 2.0)
    assert later.sender_pid == sink.sender_pid


def test_a_forked_child_does_not_keep_the_idle_sender_past_its_wait(tmp_path, monkeypatch):
    """A fork-started pool after a training holds a copy of the sender's stdin: closing it never gave the sender
    its end of file, and it stayed (220 MiB) for as long as the pool lived."""
    monkeypatch.setattr(launch, "IDLE_S", 1.0)
    sink, _ = train(ready_store(tmp_path), tmp_path / "out", "fork", 1.0)
    with multiprocessing.get_context("fork").Pool(1):
        wait_for("the idle sender's end beside a forked pool", lambda: ended(sink.sender_pid), 20)


def test_a_stage_sink_dropped_with_everything_confirmed_hands_its_sender_on(tmp_path):
    """A trial's ``fit()`` then ``test()``: the stage's sink is kept for a next stage; its monitor collected, its
    sender was ended rather than kept for the process's next training."""
    uri = ready_store(tmp_path)
    sink = MlflowSink(RunTarget(uri, experiment_name="staged"), tmp_path / "out")
    sink.log_metrics({"energy/test_j": 1.0}, step=0)
    assert sink.flush(60) and sink.unconfirmed == 0
    sink.park()
    pid = sink.sender_pid
    del sink
    gc.collect()
    later, run_id = train(uri, tmp_path / "out", "staged", 2.0)
    assert later.sender_pid == pid
    assert history(MlflowClient(uri), run_id, "energy/cumulative_j")[-1] == (2, 6.0)


def staged_trial(tmp_path: Path, uri: str, name: str):
    """A sweep's trial: a monitor of its own, ``fit()`` then ``validate()`` (whose sink is kept, parked, for a next
    stage of its monitor); the monitor, the trainer, the model and the validation data."""
    import lightning.pytorch as pl

    from green_callbacks.lightning import EnergyMonitor

    from helpers import digits_loaders, lightning_digits_module

    train_data, val_data = digits_loaders()
    mon = EnergyMonitor(tracking_uri=uri, experiment_name="sweep", output_dir=str(tmp_path / "out"),
                        log_artifacts=False)
    t = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[mon], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path / name, num_sanity_val_steps=0)
    model = lightning_digits_module()()
    t.fit(model, train_data, val_data)
    t.validate(model, val_data, verbose=False)
    return mon, t, model, val_data


def test_a_sweeps_next_trial_takes_the_sender_the_last_trials_stage_kept(tmp_path):
    """A sweep's trials, each with a monitor of its own, each ``fit()`` then ``validate()``: the stage's sink is kept
    (parked) for a next stage of its monitor, and every trial started a sender of its own (MLflow's import: 3.5 s
    at a short trial's end: examples/green_ai_comparison.py --quick took 78 s, 36 s now). The next trial takes it;
    the earlier monitor, testing again, opens a sink of its own and its records still reach its run."""
    uri = ready_store(tmp_path)
    trials = [staged_trial(tmp_path, uri, str(trial)) for trial in range(2)]
    first, second = (mon._idle_sink for mon, *_ in trials)
    assert second.sender_pid == first.sender_pid, "one sender for both trials"
    _, t, model, val_data = trials[0]
    t.validate(model, val_data, verbose=False)  # the first trial's monitor, again: a sink of its own
    client = MlflowClient(uri)
    for (mon, *_), stages in zip(trials, (2, 1), strict=True):
        assert client.get_run(mon.run.run_id).info.status == "FINISHED"
        assert len(history(client, mon.run.run_id, "energy/validate_j")) == stages, mon.run.run_id


def test_a_forked_childs_training_leaves_the_parents_parked_sink_alone(tmp_path):
    """A trial in a forked child (a fork-per-trial sweep, Lightning's ``ddp_notebook``) while the parent's monitor
    keeps its stage's sink parked: the child's copy of the parked list named the parent's sink, the child ended that
    spool, and the parent's next stage went to a deleted spool, lost without a word (one of two validations)."""
    uri = ready_store(tmp_path)
    mon, t, model, val_data = staged_trial(tmp_path, uri, "parent")
    child = multiprocessing.get_context("fork").Process(target=staged_trial, args=(tmp_path, uri, "child"))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    t.validate(model, val_data, verbose=False)  # the parent's monitor again
    client = MlflowClient(uri)
    assert client.get_run(mon.run.run_id).info.status == "FINISHED"
    assert len(history(client, mon.run.run_id, "energy/validate_j")) == 2


def test_sinks_parked_and_taken_on_threads_at_once_are_each_taken_once():
    """A sweep whose trials train on threads of one process (Optuna's ``n_jobs``): one trial's stage parks its sink
    while another's new sink looks for a parked one. The parked set changed while it was being read ("Set changed
    size during iteration", raised into the new trial's training), and two new sinks could take one sender."""
    parked = launch.ParkedSinks()

    class Stage:  # what the set holds: any sink, weakly
        pass

    stages = [Stage() for _ in range(40)]
    for stage in stages[:20]:
        parked.add(stage)
    stop, errors, taken = False, [], []

    def park_and_resume():  # the other trial's stages, parked and in use again
        i = 0
        while not stop:
            stage = stages[20 + i % 20]
            parked.add(stage)
            parked.discard(stage)
            i += 1

    def take():
        try:
            for _ in range(2000):
                got = parked.take(None)
                if got is not None:
                    taken.append(got)
                    parked.add(got)
        except RuntimeError as exc:
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        hammer = threading.Thread(target=park_and_resume)
        takers = [threading.Thread(target=take) for _ in range(2)]
        hammer.start()
        for thread in takers:
            thread.start()
        for thread in takers:
            thread.join(60)
    finally:
        stop = True
        sys.setswitchinterval(old)
        hammer.join(60)
    assert not errors, errors[0]
    assert taken
    # a sink taken is no longer parked: a second take of it would give one sender to two sinks
    first = parked.take(None)
    assert first is not None and parked.take(None) is not first and not parked.discard(first)


def test_a_stage_resuming_its_parked_sink_as_another_thread_takes_it_opens_its_own(tmp_path):
    """Trials on threads of one process: a monitor's next stage (into the ``MLFlowLogger`` run, which it does not
    own) resumes its parked sink just as another trial's new sink takes that sink's sender. The stage wrote into a
    sink given up under it, and its records were lost without a word; once it no longer did, the monitor closed the
    taken sink while the other thread gave it up, and the close could fail (a ValueError out of ``validate()``)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger

    from green_callbacks.lightning import EnergyMonitor

    from helpers import digits_loaders, lightning_digits_module

    uri = ready_store(tmp_path)
    taken, left_to_taker = [], []

    class AnotherTrialStarts(pl.Callback):  # the other thread's new sink, at the two moments that race
        def on_validation_start(self, trainer, pl_module):  # before the monitor resumes its parked sink
            if mon._idle_sink is not None:  # the second validate(): the first one's sink is parked
                taken.append(launch.PARKED.take(None))

        def on_validation_batch_end(self, trainer, *args):  # in the stage: it gives the taken sink's sender up
            if taken and taken[-1] is not None:
                sink = taken.pop()
                left_to_taker.append(sink._closed is None)  # the monitor did not close it too (the two raced)
                sink.give_up_sender()

    train_data, val_data = digits_loaders()
    mon = EnergyMonitor(output_dir=str(tmp_path / "out"), log_artifacts=False)
    logger = MLFlowLogger(experiment_name="threads", tracking_uri=uri)
    t = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, callbacks=[AnotherTrialStarts(), mon],
                   logger=logger, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0)
    model = lightning_digits_module()()
    t.fit(model, train_data, val_data)
    t.validate(model, val_data, verbose=False)
    assert mon._idle_sink is not None
    t.validate(model, val_data, verbose=False)
    assert not taken and left_to_taker == [True], "the race happened, and the taker alone ended the sink"
    client = MlflowClient(uri)
    assert len(history(client, logger.run_id, "energy/validate_j")) == 2


def what_a_new_sink_asks() -> None:
    launch.IDLE.holds()
    launch.PARKED.take(None)


@pytest.mark.parametrize("held", ["idle sender", "parked sinks"])
def test_a_child_forked_while_a_thread_held_the_senders_lock_can_train(held):
    """A fork (a DataLoader's workers, a fork-per-trial sweep) while another thread of the parent held the idle
    sender's or the parked sinks' lock (the idle sender's timer ending it, a trial on another thread parking its
    sink): the child's copy of the lock stayed held, and the child's first sink waited on it for ever."""
    registry = launch.IDLE if held == "idle sender" else launch.PARKED
    registry._lock.acquire()  # as the other thread holds it at the fork
    try:
        child = multiprocessing.get_context("fork").Process(target=what_a_new_sink_asks)
        child.start()
        child.join(20)
        hung = child.is_alive()
        if hung:
            child.kill()
    finally:
        registry._lock.release()
    assert not hung and child.exitcode == 0


def validate_again(t, model, val_data) -> None:
    t.validate(model, val_data, verbose=False)


def test_a_forked_child_validating_with_the_parents_monitor_writes_a_spool_of_its_own(tmp_path, green_log):
    """A child forked after a stage (a fork-per-evaluation pool) runs a stage with its copy of the parent's monitor,
    whose sink the parent keeps parked: the child's copy resumed the parent's sink and wrote into the parent's spool
    beside it (two writers, one file), and its end would have ended the parent's sender."""
    uri = ready_store(tmp_path)
    mon, t, model, val_data = staged_trial(tmp_path, uri, "parent")
    parked, pid = mon._idle_sink, mon._idle_sink.sender_pid
    child = multiprocessing.get_context("fork").Process(target=validate_again, args=(t, model, val_data))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    t.validate(model, val_data, verbose=False)  # the parent's monitor again: its own parked sink, sender and spool
    assert mon._idle_sink is parked and parked.sender_pid == pid and not ended(pid)
    client = MlflowClient(uri)
    points = lambda: len(history(client, mon.run.run_id, "energy/validate_j"))  # noqa: E731
    wait_for("the child's validation in the run", lambda: points() == 3)
    assert client.get_run(mon.run.run_id).info.status == "FINISHED"
    assert "sent again from its start" not in green_log.text
