"""EnergyTracker in a plain PyTorch loop: the API of issue 15 exactly, on a real MLflow store.

The GPU is simulated on a work clock (tests/fake_nvml) at a constant 100 W: a training step does
0.01 s of work (1 J), an evaluation 0.05 s (5 J), and the CPU is not measured, so every number
logged has an exact expected value.
"""

from __future__ import annotations

import itertools
import json
import time

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from helpers import digits_tensors, history, ready_store, records_of, runs

STEP_J, EVAL_J, BATCH = 1.0, 5.0, 64


@pytest.fixture
def gpu(fake_nvml):
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    return fake_nvml


@pytest.fixture
def uri(tmp_path):
    return ready_store(tmp_path)


class Digits:
    """A real model on real data; each step and each evaluation move the simulated GPU's work clock."""

    def __init__(self, gpu, n_train: int = 512) -> None:
        torch.manual_seed(0)
        (xt, yt), (xv, yv) = digits_tensors()
        self.train = DataLoader(TensorDataset(xt[:n_train], yt[:n_train]), batch_size=BATCH, shuffle=True)
        self.xv, self.yv = xv, yv
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.gpu = gpu

    def batches(self):
        for x, y in self.train:
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.gpu.advance(STEP_J / 100.0)
            yield x, y

    def evaluate(self) -> float:
        self.gpu.advance(EVAL_J / 100.0)
        with torch.no_grad():
            return float((self.model(self.xv).argmax(-1) == self.yv).float().mean())


def tracker_for(tmp_path, uri, **kw):
    from green_callbacks import EnergyTracker  # the issue's import, exactly

    return EnergyTracker(country="FR", experiment_name="my-run", gpus="all", measure_cpu=False,
                         tracking_uri=uri, output_dir=str(tmp_path / "out"), **kw)


def the_issues_loop(tracker, work: Digits, max_epochs: int) -> list[float]:
    """The loop of issue 15, as written there; returns each epoch's accuracy."""
    accs = []
    with tracker:
        for epoch in range(max_epochs):
            with tracker.epoch(epoch):
                for _ in work.batches():
                    pass
                with tracker.evaluation():
                    acc = work.evaluate()
                tracker.report({"val_acc": acc})
                accs.append(acc)
            if tracker.should_stop:
                break
    return accs


def test_the_issues_loop_logs_every_epoch_and_evaluation(tmp_path, uri, gpu):
    from green_callbacks.stopping import BudgetStopper, EfficiencyStopper  # noqa: F401 - the issue's import

    tracker = tracker_for(tmp_path, uri)
    tracker.attach(BudgetStopper(energy="2 kWh"))
    accs = the_issues_loop(tracker, Digits(gpu), max_epochs=3)
    client, (run,) = runs(uri, "my-run")
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and not tracker.should_stop
    epoch_j = 8 * STEP_J + EVAL_J  # 512 samples in batches of 64, then the evaluation
    # without step() the step axis is the epoch number: one point of each kind per epoch
    assert history(client, rid, "energy/epoch_j") == [(e, pytest.approx(epoch_j)) for e in range(3)]
    assert history(client, rid, "energy/eval_j") == [(e, pytest.approx(EVAL_J)) for e in range(3)]
    assert history(client, rid, "energy/val_j") == [(e, pytest.approx(EVAL_J)) for e in range(3)]
    assert history(client, rid, "energy/interval_j") == [(e, pytest.approx(epoch_j)) for e in range(3)]
    assert history(client, rid, "efficiency/val_acc_per_kj") == [
        (e, pytest.approx(acc / (epoch_j * (e + 1) / 1000))) for e, acc in enumerate(accs)]
    assert run.data.metrics["energy/total_j"] == pytest.approx(3 * epoch_j)
    # the reported metric itself, in the tracker's own run (MLflow's fluent log_metric would open another run)
    assert history(client, rid, "val_acc") == [(e, pytest.approx(acc)) for e, acc in enumerate(accs)]
    assert run.data.params["green.carbon_intensity_label"].startswith("France")
    assert "green_callbacks/summary.json" in [a.path for a in client.list_artifacts(rid, "green_callbacks")]


@pytest.mark.parametrize("stride", [1, 2, 3, 64])
def test_an_axis_that_moves_by_more_than_one_still_gets_its_points_and_budget_checks(tmp_path, uri, gpu, stride):
    """``tracker.step(samples_seen)`` (or micro-batches, tokens): points every N and budget checks every N came only
    at exact multiples, so an axis of 0, 2, 4... never met one: no point in 40 steps, and a 100 J budget ran to
    400 J. Now each comes at the first step past a multiple, on any axis."""
    from green_callbacks.stopping import BudgetStopper

    every = 4 * stride  # in the axis' units: a point (and a check) every 4 steps of work, 40 J
    tracker = tracker_for(tmp_path, uri, log_every_n_steps=every)
    tracker.attach(BudgetStopper(energy="200 J", check_every_n_steps=every))
    steps = [i * stride for i in range(40)]  # 0, s, 2s...: counted from 1 (after step N-1), never a multiple of 4s
    with tracker:
        for step in steps:
            gpu.advance(10.0 / 100.0)  # 10 J a step
            if tracker.step(step):
                break
    client, (run,) = runs(uri, "my-run")
    points = [s for s, _ in history(client, run.info.run_id, "energy/cumulative_j")]
    crossings = [next(s for s in steps if s + 1 >= k * every) for k in range(1, 4)]
    assert points[:3] == crossings, "a point at the first step past every multiple"
    # checked there too: stopped under the budget, with less than two checks' worth (80 J) of it left
    assert tracker.should_stop and 200.0 - 80.0 <= tracker.cumulative_j <= 200.0


def test_the_step_count_from_log_every_s_is_found_on_an_axis_that_moves_by_more_than_one(tmp_path, uri, gpu):
    """With ``log_every_n_steps`` left to ``log_every_s``, ten steps are timed: on an axis of 0, 64, 128... step 10
    never came, so no point was ever taken between the epoch ends (one record, the end)."""
    tracker = tracker_for(tmp_path, uri, log_every_s=0.5)
    with tracker:
        for i in range(60):
            time.sleep(0.01)  # about 0.01 s a step: about 50 steps (3200 on the axis) every 0.5 s
            tracker.step(64 * i)
            if i == 5:  # ten steps are timed, not ten units of the axis (one step of 64 samples)
                assert tracker._every is None
    assert tracker._every is not None and tracker._every > 64, "the count was found (in the axis' units)"
    assert len(records_of(tracker, "point")) >= 1


def test_a_step_axis_that_starts_again_each_epoch_is_calibrated_without_a_fault(tmp_path, uri, gpu, green_log):
    """``tracker.step(batch_idx)``, from 0 again every epoch of 5: the eleventh step was step 0 again, and the
    step time divided by 0 steps (a ZeroDivisionError, turned into a warning by the hook's guard)."""
    tracker = tracker_for(tmp_path, uri, log_every_s=0.5)
    with tracker:
        for epoch in range(4):
            with tracker.epoch(epoch):
                for batch_idx in range(5):
                    tracker.step(batch_idx)
    assert tracker._every is not None and "Error" not in green_log.text


def test_a_budget_sets_should_stop_and_the_loop_breaks(tmp_path, uri, gpu):
    from green_callbacks.stopping import BudgetStopper

    tracker = tracker_for(tmp_path, uri)
    tracker.attach(BudgetStopper(energy="30 J"))
    accs = the_issues_loop(tracker, Digits(gpu), max_epochs=10)
    _, (run,) = runs(uri, "my-run")
    # 13 J an epoch: after two (26 J) a third would overshoot 30 J
    assert tracker.should_stop and len(accs) == 2
    assert run.data.tags["green.stop_reason"] == "energy_budget"
    assert run.data.metrics["energy/total_j"] == pytest.approx(26.0) and run.info.status == "FINISHED"


def test_an_efficiency_stopper_without_a_monitor_watches_val_loss(tmp_path, uri, gpu):
    """``EfficiencyStopper()``, as in Lightning: ``val_loss``, lower is better; a flat loss is a plateau."""
    from green_callbacks.stopping import EfficiencyStopper

    tracker = tracker_for(tmp_path, uri)
    tracker.attach(EfficiencyStopper())
    work = Digits(gpu)
    epochs = 0
    with tracker:
        for epoch in range(30):
            with tracker.epoch(epoch):
                for _ in work.batches():
                    pass
                with tracker.evaluation():
                    work.evaluate()
                tracker.report({"val_loss": 0.5})
            epochs += 1
            if tracker.should_stop:
                break
    _, (run,) = runs(uri, "my-run")
    assert tracker.should_stop and epochs < 30
    assert run.data.tags["green.stop_reason"] == "efficiency_plateau" and run.info.status == "FINISHED"
    assert "val_loss" in run.data.tags["green.stop_message"]
    assert "stopping/val_loss_gain_pct_per_doubling" in run.data.metrics


def test_an_epoch_block_inside_another_is_ignored_with_one_warning(tmp_path, uri, gpu, green_log):
    tracker = tracker_for(tmp_path, uri)
    with tracker:
        for epoch in range(2):
            with tracker.epoch(epoch):
                gpu.advance(0.05)  # 5 J
                with tracker.epoch(epoch):  # a helper that opens its own epoch, say
                    gpu.advance(0.05)
                gpu.advance(0.05)  # still the outer epoch's
    epochs = records_of(tracker, "epoch")
    assert [r.energy_j for r in epochs] == [pytest.approx(15.0), pytest.approx(15.0)]
    assert green_log.text.count("inside another epoch() block") == 1


def test_a_stop_is_decided_once_though_the_loop_finishes_its_epoch(tmp_path, uri, gpu, green_log):
    """A loop that finishes its epoch after ``should_stop`` (a common way to write one): the budget checked every
    step decided the stop again at every later step, each time with its warning, its tags and its
    message."""
    from green_callbacks.stopping import BudgetStopper

    tracker = tracker_for(tmp_path, uri)
    tracker.attach(BudgetStopper(energy="5 J", check_every_n_steps=1))
    work = Digits(gpu)
    with tracker, tracker.epoch(0):
        for _ in work.batches():  # 8 steps of 1 J: the stop falls due after about 3, the epoch goes on
            time.sleep(2 * tracker.sampling_period_s)  # a check between points reads the sampler's latest
            tracker.step()
    _, (run,) = runs(uri, "my-run")
    assert tracker.should_stop and tracker.stop_decision.reason.value == "energy_budget"
    assert green_log.text.count("stopping:") == 1
    assert run.data.tags["green.stop_message"] == tracker.stop_decision.message


def test_calls_outside_with_tracker_warn_once_that_nothing_is_measured(tmp_path, uri, gpu, green_log):
    tracker, work = tracker_for(tmp_path, uri), Digits(gpu)
    with tracker.epoch(0):  # `with tracker:` forgotten: nothing ran, silently
        for _ in work.batches():
            assert tracker.step() is False
        with tracker.evaluation():
            acc = work.evaluate()
        assert tracker.report({"val_acc": acc}) is False
    assert green_log.text.count("outside `with tracker:`") == 1 and not tracker.records
    with tracker, tracker.epoch(0):
        for _ in work.batches():
            tracker.step()
    records, total = len(tracker.records), tracker.cumulative_j
    with tracker.epoch(1):  # after the block: nothing either (it read the closed sensors and added records)
        with tracker.evaluation():
            acc = work.evaluate()
        assert tracker.report({"val_acc": acc}) is False and tracker.step() is False
    assert (len(tracker.records), tracker.cumulative_j) == (records, total)


def test_a_with_tracker_that_failed_to_start_leaves_the_next_one_free(tmp_path, uri, gpu):
    # the failed start counted as an open block: every later `with tracker:` was taken for a nested one, ignored
    tracker, work = tracker_for(tmp_path, uri), Digits(gpu)
    tracker.gpus = [5]  # an index this machine lacks: a ValueError at the start, before the first step
    with pytest.raises(ValueError, match="5"), tracker:
        pass
    tracker.gpus = "all"
    with tracker, tracker.epoch(0):
        for _ in work.batches():
            tracker.step()
    assert tracker.cumulative_j == pytest.approx(8.0)


def test_a_nested_with_tracker_is_ignored_and_the_run_goes_on(tmp_path, uri, gpu, green_log):
    # the inner block's end ended the run: the energy after it never reached MLflow, and the step axis restarted
    tracker, work = tracker_for(tmp_path, uri), Digits(gpu)
    with tracker:
        with tracker.epoch(0):
            for _ in work.batches():  # 8 steps of 1 J
                tracker.step()
        with tracker, tracker.epoch(1):
            for _ in work.batches():
                tracker.step()
        with tracker.epoch(2):
            for _ in work.batches():
                tracker.step()
    client, (run,) = runs(uri, "my-run")
    assert run.data.metrics["energy/total_j"] == pytest.approx(24.0) and run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "energy/epoch_j")] == [7, 15, 23]
    assert green_log.text.count("inside another one of the same tracker is ignored") == 1


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_an_exception_in_the_block_propagates_and_ends_the_run(tmp_path, uri, gpu, error, status):
    tracker = tracker_for(tmp_path, uri)
    work = Digits(gpu)
    with pytest.raises(error, match="boom"), tracker:
        with tracker.epoch(0):
            for _ in work.batches():
                pass
        with tracker.epoch(1):
            for i, _ in enumerate(work.batches()):
                if i == 2:
                    raise error("boom")
    client, (run,) = runs(uri, "my-run")
    assert run.info.status == status
    # the finished epoch, then the partial one (3 steps) booked as the run ends
    assert history(client, run.info.run_id, "energy/epoch_j") == [(0, pytest.approx(8.0)),
                                                                   (1, pytest.approx(3.0, abs=0.01))]
    assert history(client, run.info.run_id, "energy/total_j") == [(1, pytest.approx(11.0, abs=0.01))]
    assert not tracker.started


def test_an_epoch_is_its_block_and_work_between_blocks_is_in_no_epoch(tmp_path, uri, gpu):
    tracker = tracker_for(tmp_path, uri)
    work = Digits(gpu)
    with tracker:
        for epoch in range(2):
            with tracker.epoch(epoch):
                for _ in work.batches():
                    pass
            gpu.advance(0.2)  # a checkpoint's save between the blocks: 20 J, in the run but in no epoch
    epochs = records_of(tracker, "epoch")
    assert [r.energy_j for r in epochs] == [pytest.approx(8.0), pytest.approx(8.0)]
    assert epochs[1].start_rel_s > epochs[0].end_rel_s, "the second epoch starts at its block"
    assert tracker.cumulative_j == pytest.approx(56.0)


def test_an_exception_the_loop_catches_ends_its_evaluation_or_epoch_and_training_goes_on(tmp_path, uri, gpu):
    # an evaluation left by an exception stayed open: the next epoch's training was counted as evaluation (val_j
    # 18 J in a 13-J epoch); an epoch left by one stayed open and took the next epoch into it ("2 epochs" of 3)
    tracker = tracker_for(tmp_path, uri)
    with tracker:
        for epoch in range(3):
            try:
                with tracker.epoch(epoch):
                    for i in range(8):
                        gpu.advance(STEP_J / 100.0)
                        if epoch == 1 and i == 3:
                            raise RuntimeError("a bad batch")
                        tracker.step()
                    try:
                        with tracker.evaluation():
                            gpu.advance(EVAL_J / 100.0)
                            if epoch == 0:
                                raise RuntimeError("the evaluation failed")
                        tracker.report({"val_acc": 0.5})
                    except RuntimeError:
                        pass
            except RuntimeError:
                pass
    epochs, evaluations = records_of(tracker, "epoch"), records_of(tracker, "evaluation")
    assert [(r.epoch, r.energy_j) for r in epochs] == [(0, pytest.approx(13.0)), (1, pytest.approx(4.0)),
                                                       (2, pytest.approx(13.0))]
    assert [r.eval_j for r in epochs] == [pytest.approx(5.0), 0.0, pytest.approx(5.0)]
    assert [r.eval_j for r in evaluations] == [pytest.approx(5.0), pytest.approx(5.0)]
    assert tracker.cumulative_j == pytest.approx(30.0)


def test_the_cumulative_series_at_an_evaluations_step_holds_the_evaluation(tmp_path, uri, gpu):
    # step() takes a logging point at once; an evaluation at the same step came after it, and the series kept the
    # point's value alone: at step 7, 8 J where 13 J were spent, and its last value 5 J short of energy/total_j
    tracker = tracker_for(tmp_path, uri, log_every_n_steps=4)
    with tracker:
        for epoch in range(2):
            with tracker.epoch(epoch):
                for _ in range(8):
                    gpu.advance(STEP_J / 100.0)
                    tracker.step()
                with tracker.evaluation():
                    gpu.advance(EVAL_J / 100.0)
                tracker.report({"val_acc": 0.5})
    client, (run,) = runs(uri, "my-run")
    series = history(client, run.info.run_id, "energy/cumulative_j")
    assert series == [(3, pytest.approx(4.0)), (7, pytest.approx(8.0)), (7, pytest.approx(13.0)),
                      (11, pytest.approx(17.0)), (15, pytest.approx(21.0)), (15, pytest.approx(26.0))]
    assert series[-1][1] == pytest.approx(run.data.metrics["energy/total_j"])


def test_the_sender_still_ending_its_work_is_no_resource_warning(tmp_path, uri, gpu):
    # the sink let go of its sender's Popen while the sender was ending: Python warned "subprocess N is still
    # running" (a ResourceWarning, which pytest shows) for every training
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracker_for(tmp_path, uri)
        with tracker:
            gpu.advance(STEP_J / 100.0)
            tracker.step()
        del tracker
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_step_axis_points_and_samples_per_joule(tmp_path, uri, gpu):
    tracker = tracker_for(tmp_path, uri, log_every_n_steps=3)
    work = Digits(gpu, n_train=500)  # 8 steps an epoch: seven of 64 samples, one of 52
    sizes: dict[int, int] = {}
    step = -1
    with tracker:
        for epoch in range(2):
            with tracker.epoch(epoch):
                for x, _ in work.batches():
                    step += 1
                    sizes[step] = len(x)
                    tracker.step(step, batch=(x, _))
                with tracker.evaluation():
                    acc = work.evaluate()
                tracker.report({"val_acc": acc})
    client, (run,) = runs(uri, "my-run")
    rid = run.info.run_id
    # every 3 steps counted (after steps 2, 5, 8...: the 3rd, 6th, 9th), and at the epochs' ends 7 and 15
    assert [s for s, _ in history(client, rid, "energy/cumulative_j")] == [2, 5, 7, 8, 11, 14, 15]
    assert [s for s, _ in history(client, rid, "energy/eval_j")] == [7, 15]
    # each interval: the samples of its steps over its training joules (1 J a step; evaluations excluded)
    logged = history(client, rid, "throughput/samples_per_j")
    edges = [-1, 2, 5, 7, 8, 11, 14, 15]
    expected = [(b, sum(sizes[s] for s in range(a + 1, b + 1)) / ((b - a) * STEP_J))
                for a, b in itertools.pairwise(edges)]
    assert logged == [(s, pytest.approx(v)) for s, v in expected]
    assert "throughput/tokens_per_j" not in run.data.metrics  # no input_ids in these batches


def test_logs_into_the_active_mlflow_run(tmp_path, uri, gpu):
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("mine")) as active:
            tracker = tracker_for(tmp_path, uri)
            with tracker, tracker.epoch(0):
                for _ in Digits(gpu).batches():
                    pass
                tracker.report({"val_acc": 0.5})  # the user logs their own metrics into their own run
    finally:
        mlflow.set_tracking_uri(None)
    client, (run,) = runs(uri, "mine")
    assert run.info.run_id == active.info.run_id and tracker.run.run_id == active.info.run_id
    assert history(client, run.info.run_id, "energy/epoch_j") == [(0, pytest.approx(8.0))]
    assert "val_acc" not in run.data.metrics and "efficiency/val_acc_per_kj" in run.data.metrics
    assert runs(uri, "my-run")[1] == []


def test_a_report_after_the_epoch_block_is_that_epochs_evaluation(tmp_path, uri, gpu):
    """The evaluation inside ``with tracker.epoch()``, its report after the block: the epoch's end flushed the
    evaluation without metrics, and the report made a second evaluation point with none of its energy (6 evaluations
    for 3; two ``energy/interval_j`` values at each step, 0 J and the epoch's)."""
    tracker, work = tracker_for(tmp_path, uri), Digits(gpu)
    accs = []
    with tracker:
        for epoch in range(3):
            with tracker.epoch(epoch):
                for _ in work.batches():
                    pass
                with tracker.evaluation():
                    accs.append(work.evaluate())
            tracker.report({"val_acc": accs[-1]})
    client, (run,) = runs(uri, "my-run")
    rid, epoch_j = run.info.run_id, 8 * STEP_J + EVAL_J
    assert tracker.evaluations == 3
    assert history(client, rid, "energy/eval_j") == [(e, pytest.approx(EVAL_J)) for e in range(3)]
    assert history(client, rid, "energy/interval_j") == [(e, pytest.approx(epoch_j)) for e in range(3)]
    assert history(client, rid, "energy/epoch_j") == [(e, pytest.approx(epoch_j)) for e in range(3)]
    assert history(client, rid, "efficiency/val_acc_per_kj") == [
        (e, pytest.approx(acc / (epoch_j * (e + 1) / 1000))) for e, acc in enumerate(accs)]


@pytest.mark.slow
def test_two_spawned_ranks_log_both_energies_once(tmp_path):
    """torch.multiprocessing.spawn + gloo, no LOCAL_RANK: one run, each rank's GPU exact, the CPU measured once."""
    import subprocess
    import sys

    from test_ddp import PER_RANK, SCRIPTS, check_sums

    from helpers import fake_nvml_env, free_port

    uri = ready_store(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plain_ddp.py"), uri, str(tmp_path), str(free_port())],
                          env=fake_nvml_env(PER_RANK), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sums(uri, tmp_path, epochs=2)
    assert [(tmp_path / f"local-rank{r}.txt").read_text() for r in range(2)] == ["0", "1"]
    client, (run,) = runs(uri, "ddp")
    # both ranks' samples (2 x 16 a step) over the job's energy of the interval (4, 9]: every 5 steps counted
    cumulative = {}  # the logging point's value (an evaluation at its step logs the series again, after it)
    for step, value in history(client, run.info.run_id, "energy/cumulative_j"):
        cumulative.setdefault(step, value)
    per_j = dict(history(client, run.info.run_id, "throughput/samples_per_j"))
    assert per_j[9] == pytest.approx(5 * 32 / (cumulative[9] - cumulative[4]))


@pytest.mark.slow
def test_two_ranks_that_measure_nothing_log_no_energy(tmp_path):
    """No rank measures anything (gpus=None, measure_cpu=False; a job of MIG slices): the single-process rule (no
    0 J logged as a measurement) held only for one process; two ranks logged energy/total_j = 0."""
    import subprocess
    import sys

    from test_ddp import PER_RANK, SCRIPTS

    from helpers import fake_nvml_env, free_port

    uri = ready_store(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plain_ddp.py"), uri, str(tmp_path), str(free_port()),
                           "blind"], env=fake_nvml_env(PER_RANK), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, (run,) = runs(uri, "ddp")
    assert not [k for k in run.data.metrics if k.startswith(("energy/", "emissions/", "power/", "throughput/"))]
    assert "val_loss" in run.data.metrics and run.data.tags["green.method.gpu"] == "unavailable"
    assert proc.stderr.count("nothing can be measured here") == 1


def test_report_takes_tensors_and_leaves_out_what_is_not_a_number(tmp_path, uri, gpu, green_log):
    tracker = tracker_for(tmp_path, uri)
    with tracker, tracker.epoch(0):
        for _ in Digits(gpu).batches():
            pass
        tracker.report({"val_acc": torch.tensor(0.5), "val_note": "fine"})
    client, (run,) = runs(uri, "my-run")
    assert history(client, run.info.run_id, "efficiency/val_acc_per_kj") == [(0, pytest.approx(0.5 / 0.008))]
    assert "val_note" in green_log.text and "not a number" in green_log.text


def test_the_summary_line_counts_in_words(tmp_path, gpu, capsys):
    """One epoch and one evaluation read "1 epoch, 1 evaluation" (it said "1 epochs, 1 evaluations")."""
    tracker = tracker_for(tmp_path, None, mlflow=False)
    the_issues_loop(tracker, Digits(gpu), max_epochs=1)
    assert "green-callbacks [finished]: 1 epoch, 1 evaluation, to step 0, 13.0 J" in capsys.readouterr().out


def test_a_second_training_into_the_same_run_keeps_the_first_ones_files(tmp_path, uri, gpu):
    """Two trainings into one MLflow run (a resume after a crash, a second monitor given the same run): the second
    wrote its intervals.csv and summary.json over the first's, in the run's folder and its artifacts, and with them
    the records of the first (a crashed process's: the work the crash threw away)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("mine")) as active:
            for epochs in (2, 1):
                the_issues_loop(tracker_for(tmp_path, uri), Digits(gpu), max_epochs=epochs)
    finally:
        mlflow.set_tracking_uri(None)
    folder = tmp_path / "out" / active.info.run_id
    assert len(pd.read_csv(folder / "intervals.before-1.csv")) > len(pd.read_csv(folder / "intervals.csv"))
    assert json.loads((folder / "summary.before-1.json").read_text())["epochs"] == 2
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 1
    client, (run,) = runs(uri, "mine")
    assert {"green_callbacks/intervals.csv", "green_callbacks/intervals.before-1.csv",
            "green_callbacks/summary.before-1.json"} <= {a.path for a in client.list_artifacts(run.info.run_id,
                                                                                            "green_callbacks")}


def _gpu_epochs(tracker, fake_nvml, epochs: int, start: int = 0) -> None:
    """``epochs`` epochs of half a second of the simulated GPU each, in ``tracker``'s context."""
    with tracker:
        for epoch in range(start, start + epochs):
            with tracker.epoch(epoch):
                fake_nvml.advance(0.5)


def _checkpointed(tmp_path, uri: str, fake_nvml, counter: bool):
    """A tracker that trained 2 epochs on a GPU read by its counter (or by sampled power), and its checkpoint state as
    a checkpoint holds it (through JSON)."""
    from green_callbacks import EnergyTracker

    fake_nvml.configure([{"counter": counter}], work_clock=True)
    first = EnergyTracker(gpus="all", measure_cpu=False, tracking_uri=uri, experiment_name="r",
                          output_dir=str(tmp_path / "out"))
    _gpu_epochs(first, fake_nvml, 2)
    return first, json.loads(json.dumps(first.state_dict()))


def test_a_training_resumed_into_a_new_run_tags_the_checkpoints_weaker_method(tmp_path, fake_nvml):
    """The checkpoint's training read its GPU by sampled power, the resumed one reads the counter, into a run of its
    own (the user's active run: HF's report_to=mlflow and a new MLFlowLogger do the same): the new run's totals hold
    the sampled part, so its tag must say 'sampled', not the resumed process's 'counter'."""
    import mlflow

    from green_callbacks import EnergyTracker

    uri = ready_store(tmp_path)
    first, state = _checkpointed(tmp_path, uri, fake_nvml, counter=False)
    fake_nvml.configure([{"counter": True}], work_clock=True)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("mine")) as active:
            resumed = EnergyTracker(gpus="all", measure_cpu=False, output_dir=str(tmp_path / "out"))
            resumed.load_state_dict(state)
            _gpu_epochs(resumed, fake_nvml, 2, start=2)
    finally:
        mlflow.set_tracking_uri(None)
    _, (run,) = runs(uri, "mine")
    assert run.info.run_id == active.info.run_id != first.run.run_id
    assert run.data.tags["green.method.gpu"] == "sampled"


def test_a_resumed_run_tags_a_method_weaker_than_before_the_checkpoint(tmp_path, fake_nvml):
    """Resumed from a checkpoint on a GPU whose counter is gone (sampled now): the run's green.method.gpu tag stayed
    'counter' (the tags were not known after the resume), while summary.json said 'sampled'."""
    from green_callbacks import EnergyTracker
    from green_callbacks.outputs import summary

    uri = ready_store(tmp_path)
    _, state = _checkpointed(tmp_path, uri, fake_nvml, counter=True)
    fake_nvml.configure([{"counter": False}], work_clock=True)  # a new process, on a GPU read by sampled power
    resumed = EnergyTracker(gpus="all", measure_cpu=False, tracking_uri=uri, experiment_name="r",
                            output_dir=str(tmp_path / "out"))
    resumed.load_state_dict(state)
    _gpu_epochs(resumed, fake_nvml, 2, start=2)
    _, (run,) = runs(uri, "r")
    assert run.data.tags["green.method.gpu"] == summary(resumed)["methods"]["gpu"] == "sampled"


def test_a_fork_pool_ended_inside_a_training_leaves_the_run_to_the_training(tmp_path, uri, gpu, capfd):
    """A fork-started ``multiprocessing`` pool inside an epoch: ``Pool.__exit__`` ends its workers by SIGTERM, and
    each worker's copy of the package's handler ended its copy of the parent's tracker, ``KILLED``: its final
    metrics, artifacts and status went into the parent's spool (a second ``energy/total_j``, a "[killed]" summary
    per worker)."""
    import multiprocessing

    tracker = tracker_for(tmp_path, uri)
    with tracker, tracker.epoch(0):
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
        gpu.advance(0.01)
    _, (run,) = runs(uri, "my-run")
    assert run.info.status == "FINISHED"
    assert len(history(MlflowClient(uri), run.info.run_id, "energy/total_j")) == 1
    assert "[killed]" not in capfd.readouterr().out
