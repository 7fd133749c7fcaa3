"""green-callbacks report on a real MLflow store: inference-only runs, the energy compared, repeats grouped,
runs told apart, one set of columns in every format, a pipe closed early, money."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from green_callbacks.cli import main as cli
from green_callbacks.comparison import experiment_frame, money
from green_callbacks.records import stage_metrics

from helpers import ready_store

# (run name, model, training joules or None for inference only, val_acc, test joules, test_acc)
RUNS = [("baseline", "baseline", 100.0, 0.90, 2.0, 0.91), ("baseline", "baseline", 110.0, 0.92, 2.2, 0.90),
        ("baseline", "baseline", 90.0, 0.88, 1.8, 0.92), ("student", "student", 40.0, 0.85, 0.9, 0.84),
        ("student", "student", 44.0, 0.86, 1.1, 0.85), ("quantised", "quantised", None, None, 0.5, 0.80)]
SAMPLES = 100


@pytest.fixture
def store(tmp_path):
    """A sqlite store whose artifacts live in tmp_path too, with the runs above logged under the names
    green-callbacks uses (stage metrics from records.stage_metrics itself)."""
    from mlflow.tracking import MlflowClient

    uri = ready_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = []
    for name, model, train_j, val_acc, test_j, test_acc in RUNS:
        run = client.create_run(exp, run_name=name)
        client.log_param(run.info.run_id, "model", model)
        metrics = {**stage_metrics("test", test_j, 1.0, test_j / 3.6e6 * 300, SAMPLES, test_j / 3.6e6 * 0.3),
                   "test_acc": test_acc}
        client.log_param(run.info.run_id, "green.price_per_kwh", "0.3 EUR")
        if train_j is not None:
            metrics.update({"energy/cumulative_j": train_j, "val_acc": val_acc,
                            "emissions/cumulative_g": train_j / 3.6e6 * 300, "cost/cumulative": train_j / 3.6e6 * 0.3})
            client.set_tag(run.info.run_id, "green.method.cpu", "estimated")
        client.set_tag(run.info.run_id, "green.method.test.cpu", "estimated")
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=0)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return uri, ids


def test_inference_only_runs_are_kept_and_the_energy_is_chosen(store, capsys):
    uri, ids = store
    frame = experiment_frame("cmp", uri)
    assert len(frame) == 6 and list(frame["training_j"][:5]) == [40.0, 44.0, 90.0, 100.0, 110.0]
    quantised = frame[frame["run"] == "quantised"].iloc[0]
    assert pd.isna(quantised["training_j"]) and quantised["inference_only"]
    assert quantised["method"] == "test: cpu estimated"  # its stage's, named: no training was measured
    assert cli(["report", "cmp", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"1 run(s) have no training_j: quantised ({ids[5][:8]}); they have test energy: compare with --energy test" \
        in out
    test = experiment_frame("cmp", uri, energy="test")
    assert test["test_j_per_sample"].notna().all()
    assert test["test_j_per_sample"].iloc[0] == pytest.approx(0.5 / SAMPLES) and test["run"].iloc[0] == "quantised"
    assert set(test["metric"]) == {"test_acc"}  # the metric follows the stage when none is named
    assert test["value_per_kj"].iloc[0] == pytest.approx(0.80 / (0.005 / 1000))
    assert cli(["report", "cmp", "--tracking-uri", uri, "--energy", "predict"]) == 2
    err = capsys.readouterr().err
    # the stages some run has, not every other stage; and how each component was measured
    assert "no run of 'cmp' has energy/predict_j_per_sample (energy='predict'); try one of ['test', 'training']" in err
    assert set(test["method"]) == {"cpu estimated"}
    # the stage's cost (all its samples), in the run's currency
    assert test["test_cost"].iloc[0] == pytest.approx(0.5 / 3.6e6 * 0.3) and set(test["currency"]) == {"EUR"}
    assert cli(["report", "cmp", "--tracking-uri", uri, "--markdown", str(Path(uri[10:]).parent / "no" / "t.md")]) == 2
    assert "error: cannot write" in capsys.readouterr().err  # a clear error, not a traceback


def test_the_hint_for_runs_without_the_energy_names_the_energies_they_have(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = ready_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("hint", artifact_location=(tmp_path / "artifacts").as_uri())
    for name, metrics in (("trained", {"energy/cumulative_j": 50.0, "val_acc": 0.9}),
                          ("evaluated", stage_metrics("evaluate", 3.0, 1.0, 0.0002, SAMPLES))):
        run = client.create_run(exp, run_name=name)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=0)
        client.set_terminated(run.info.run_id)
    assert cli(["report", "hint", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "have no training_j: evaluated" in out and out.rstrip().endswith("compare with --energy evaluate")
    assert cli(["report", "hint", "--tracking-uri", uri, "--energy", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert "have no evaluate_j_per_sample: trained" in out and out.rstrip().endswith("with --energy training")
    # a run measured only at a stage, whose GPU was unreadable there but its CPU not: measured, not "nothing"
    run = client.create_run(exp, run_name="predicted")
    client.set_tag(run.info.run_id, "green.method.predict.gpu", "unavailable")
    client.set_tag(run.info.run_id, "green.method.predict.cpu", "estimated")
    client.set_tag(run.info.run_id, "green.method.test.gpu", "unavailable")
    client.set_terminated(run.info.run_id)
    frame = experiment_frame("hint", uri)
    row = frame[frame["run"] == "predicted"].iloc[0]
    assert row["method"] == "predict: gpu unavailable, cpu estimated; test: gpu unavailable" and row["inference_only"]


def test_runs_of_one_name_are_told_apart_and_every_format_has_the_same_columns(store, tmp_path, capsys):
    uri, ids = store
    csv, md, png = tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "p.png"
    assert cli(["report", "cmp", "--tracking-uri", uri, "--csv", str(csv), "--markdown", str(md),
                "--plot", str(png)]) == 0
    console = capsys.readouterr().out.splitlines()
    header = console[0].split()
    frame = pd.read_csv(csv)
    assert list(frame.columns) == header
    assert md.read_text().splitlines()[0] == "| " + " | ".join(header) + " |"
    baselines = frame[frame["run"] == "baseline"]
    assert len(baselines) == 3 and baselines["run_id"].nunique() == 3
    assert set(frame["run_id"]) == {i[:8] for i in ids}
    # money: the cheapest training costs 1.1e-5 EUR: a bound, not 0.0000 or None
    assert "< 0.0001" in console[1] and "EUR" in console[1] and "None" not in "\n".join(console)
    assert "| < 0.0001 | EUR |" in md.read_text()
    assert frame["cost"].iloc[0] == pytest.approx(40 / 3.6e6 * 0.3)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_repeats_grouped_into_mean_and_spread(store, tmp_path, capsys):
    uri, _ = store
    csv, png = tmp_path / "g.csv", tmp_path / "g.png"
    assert cli(["report", "cmp", "--tracking-uri", uri, "--group-by", "model", "--csv", str(csv),
                "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    groups = pd.read_csv(csv).set_index("group")
    assert out.splitlines()[0].split() == ["group", *groups.columns]
    assert list(groups.index) == ["student", "baseline", "quantised"]
    assert groups.loc["baseline", "n"] == 3
    assert groups.loc["baseline", "training_j_mean"] == pytest.approx(100.0)
    assert groups.loc["baseline", "training_j_sd"] == pytest.approx(10.0)  # sample sd of 90, 100, 110
    assert groups.loc["student", "value_sd"] == pytest.approx(pd.Series([0.85, 0.86]).std())
    assert pd.isna(groups.loc["quantised", "training_j_mean"])
    # the means carry how their energy was measured, as the ungrouped table does
    assert groups.loc["baseline", "method"] == "cpu estimated"
    assert groups.loc["quantised", "method"] == "test: cpu estimated"
    assert png.read_bytes()[:4] == b"\x89PNG"
    test = experiment_frame("cmp", uri, energy="test", group_by="model")
    assert test.attrs["energy_column"] == "test_j_per_sample"
    assert cli(["report", "cmp", "--tracking-uri", uri, "--group-by", "nothing"]) == 2
    said = capsys.readouterr().err
    assert "group_by='nothing' is neither a param nor a tag" in said
    assert "they have [" in said and "'model'" in said and "mlflow." not in said  # the names it could have been


def test_labels_of_crowded_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from green_callbacks.pareto_plot import place_labels

    xs = [100.0, 101.0, 102.0, 100.5, 140.0, 141.0, 100.2]
    ys = [0.90, 0.901, 0.899, 0.90, 0.95, 0.951, 0.902]
    labels = [f"baseline ({i:08x})" for i in range(len(xs))]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(xs, ys)
    boxes = place_labels(ax, xs, ys, labels)
    plt.close(fig)
    assert len(boxes) == len(xs)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


def test_money_reads_as_money():
    assert money(0.00002, "EUR") == "< 0.0001 EUR"
    assert money(0.0123, "EUR") == "0.0123 EUR"
    assert money(0.0) == "0" and money(None) == "" and money(float("nan")) == ""
    assert money(12345.678, "USD") == "12,345.68 USD"


@pytest.mark.slow
def test_piped_into_head_no_broken_pipe_and_help_has_no_markup(store):
    uri, _ = store
    proc = subprocess.Popen([sys.executable, "-m", "green_callbacks.cli", "report", "cmp", "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line, as when head has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err
    for argv in (["--help"], ["report", "--help"]):
        out = subprocess.run([sys.executable, "-m", "green_callbacks.cli", *argv], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert "``" not in out and "usage: green-callbacks" in out


def test_a_real_runs_training_energy_is_its_total_not_a_point_before_its_end(tmp_path, fake_nvml):
    """A Lightning run whose end costs something after the last validation (here 25 J at ``on_train_end``, as a
    final checkpoint's save would): its end interval falls at the last point's step, where
    ``energy/cumulative_j`` is not logged again; the report compared that last cumulative value (a real HF run:
    22.68 J of 40.8 J)."""
    import lightning.pytorch as pl

    from green_callbacks import lightning as gl

    from helpers import digits_loaders, history, lightning_digits_module, runs, work_clock

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)

    class Teardown(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            fake_nvml.advance(0.25)

    uri = ready_store(tmp_path)
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, tracking_uri=uri, experiment_name="real",
                               output_dir=str(tmp_path / "out"))
    train, val = digits_loaders()
    pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, callbacks=[work_clock(fake_nvml), Teardown(), monitor]
               ).fit(lightning_digits_module()(), train, val)
    client, (run,) = runs(uri, "real")
    last_cumulative = history(client, run.info.run_id, "energy/cumulative_j")[-1][1]
    assert monitor.cumulative_j == pytest.approx(last_cumulative + 25.0)  # the case: the end after the last point
    frame = experiment_frame("real", uri)
    assert frame["training_j"].iloc[0] == pytest.approx(monitor.cumulative_j)
    assert frame["training_g"].iloc[0] == pytest.approx(run.data.metrics["emissions/total_g"])


def test_a_run_that_measured_nothing_logs_no_energy_and_is_no_cheapest_run(tmp_path, fake_nvml, capsys, green_log):
    """``gpus=None, measure_cpu=False`` (or a machine with no readable sensor): the run logged energy/total_j = 0,
    emissions 0 and power 0 as if measured, and the report sorted it first, on the Pareto front as the cheapest."""
    from green_callbacks import EnergyTracker

    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    uri = ready_store(tmp_path)
    for name, gpus in (("measured", "all"), ("blind", None)):
        tracker = EnergyTracker(gpus=gpus, measure_cpu=False, tracking_uri=uri, experiment_name="cmp2",
                                run_name=name, output_dir=str(tmp_path / "out"))
        with tracker:
            for epoch in range(2):
                with tracker.epoch(epoch):
                    fake_nvml.advance(0.5)
                tracker.report({"val_acc": 0.5 + 0.1 * epoch})
    assert green_log.text.count("nothing can be measured here (gpus=None, measure_cpu=False") == 1
    from helpers import runs

    _, found = runs(uri, "cmp2")
    blind = next(r for r in found if r.info.run_name == "blind")
    assert not [k for k in blind.data.metrics if k.startswith(("energy/", "emissions/", "power/", "cost/"))]
    assert blind.data.tags["green.method.gpu"] == "unavailable" and blind.data.metrics["val_acc"] == 0.6
    capsys.readouterr()
    assert cli(["report", "cmp2", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    frame = experiment_frame("cmp2", uri)
    assert list(frame["run"]) == ["measured", "blind"] and pd.isna(frame["training_j"].iloc[1])
    assert frame["method"].iloc[1] == "nothing measured"
    assert "1 run(s) measured nothing (every sensor unavailable): blind" in out
    import json

    summary = json.loads(next((tmp_path / "out").glob(f"{blind.info.run_id}/summary.json")).read_text())
    assert summary["energy_j"] is None and summary["emissions_g"] is None


@pytest.mark.parametrize("measure_cpu", [False, True])
def test_a_mig_slice_is_nothing_measured_not_0_j(tmp_path, fake_nvml, green_log, measure_cpu):
    """A MIG slice (NVML reads the whole GPU, not the slice) is a device nothing can read: alone, the run is one
    that measured nothing (it logged 0 J as a measurement); beside a CPU estimate, no GPU name is logged."""
    import json

    from green_callbacks import EnergyTracker

    from helpers import runs

    fake_nvml.configure([{"mig": True}], work_clock=True)
    uri = ready_store(tmp_path)
    tracker = EnergyTracker(gpus="all", measure_cpu=measure_cpu, tracking_uri=uri, experiment_name="mig",
                            output_dir=str(tmp_path / "out"))
    with tracker:
        for epoch in range(2):
            with tracker.epoch(epoch):
                fake_nvml.advance(0.5)
                sum(i * i for i in range(200_000))
    _, (run,) = runs(uri, "mig")
    logged = sorted(k for k in run.data.metrics if k.startswith(("energy/", "emissions/", "power/", "cost/")))
    summary = json.loads(next((tmp_path / "out").glob(f"{run.info.run_id}/summary.json")).read_text())
    assert run.data.tags["green.method.gpu"] == "unavailable"
    if measure_cpu:
        assert "energy/cpu_j" in logged and not [k for k in logged if "gpu" in k], logged
        assert summary["energy_j"] > 0 and summary["methods"]["gpu"] == "unavailable"
    else:
        assert logged == [] and summary["energy_j"] is None
        assert green_log.text.count("nothing can be measured here") == 1


def test_old_runs_that_logged_0_j_unmeasured_and_a_ddp_run_with_an_unreadable_gpu_are_told_apart(tmp_path):
    """Before 2026-12-05 a run that measured nothing logged 0 J (its test stage too, with no method tags of its
    own); a DDP run whose one rank's GPU could not be read tags "unavailable" yet logs the other ranks' joules."""
    from mlflow.tracking import MlflowClient

    uri = ready_store(tmp_path)
    _runs_of(uri, "old", [("blind", "FINISHED", 0.0, {"val_acc": 0.5, "energy/test_j": 0.0, "test/samples": 10.0,
                                                        "energy/test_j_per_sample": 0.0, "test_acc": 0.5}),
                          ("ddp", "FINISHED", 500.0, {"val_acc": 0.6, "energy/test_j": 20.0, "test/samples": 10.0,
                                                        "energy/test_j_per_sample": 2.0, "test_acc": 0.6})])
    client = MlflowClient(uri)
    for run in client.search_runs([client.get_experiment_by_name("old").experiment_id]):
        for component in ("gpu", "cpu", "dram"):
            client.set_tag(run.info.run_id, f"green.method.{component}", "unavailable")
    for energy, column in (("training", "training_j"), ("test", "test_j_per_sample")):
        frame = experiment_frame("old", uri, energy=energy).set_index("run")
        assert pd.isna(frame.loc["blind", column]) and frame.loc["blind", "method"] == "nothing measured"
        assert frame.loc["ddp", column] > 0 and frame.loc["ddp", "method"] != "nothing measured"


def test_a_run_still_going_is_compared_at_its_last_cumulative_value(tmp_path):
    """A run resumed after a crash and still training holds the crashed process's energy/total_j (70 J, with the
    work the crash threw away) beside its own later cumulative value: the run's energy so far is the latter."""
    from mlflow.tracking import MlflowClient

    uri = ready_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("going", artifact_location=(tmp_path / "artifacts").as_uri())
    rid = client.create_run(exp, run_name="resumed").info.run_id
    for key, value, step in [("energy/cumulative_j", 60.0, 59), ("energy/total_j", 70.0, 59),
                             ("energy/cumulative_j", 90.0, 89)]:
        client.log_metric(rid, key, value, step=step)
    assert experiment_frame("going", uri)["training_j"].iloc[0] == 90.0
    client.set_terminated(rid)  # (its end logs the total; ended, the total is the run's)
    client.log_metric(rid, "energy/total_j", 95.0, step=90)
    assert experiment_frame("going", uri)["training_j"].iloc[0] == 95.0


def _runs_of(uri: str, experiment: str, runs: list[tuple[str, str, float, dict[str, float]]]) -> None:
    """Runs as green-callbacks logs them: (name, final status, training joules, quality metrics)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    for name, status, joules, metrics in runs:
        rid = client.create_run(exp, run_name=name).info.run_id
        client.log_param(rid, "model", name.split("-")[0])
        for key, value in {"energy/cumulative_j": joules, **metrics}.items():
            client.log_metric(rid, key, value, step=0)
        if status != "RUNNING":
            client.log_metric(rid, "energy/total_j", joules, step=0)
            client.set_terminated(rid, status)


def test_a_loss_is_better_lower_on_the_pareto_front(tmp_path):
    """HF fine-tunes often log only eval_loss, which the report picks by itself: the front took the highest loss
    for the best, naming the worst runs the most efficient (1 epoch, loss 2.22, as the whole front)."""
    from green_callbacks.comparison import pareto_front

    uri = ready_store(tmp_path)
    _runs_of(uri, "ft", [("1ep", "FINISHED", 0.48, {"eval_loss": 2.22}),
                         ("4ep", "FINISHED", 0.48, {"eval_loss": 1.68}),
                         ("12ep", "FINISHED", 1.56, {"eval_loss": 0.52}),
                         ("20ep", "FINISHED", 2.6, {"eval_loss": 0.60})])
    frame = experiment_frame("ft", uri)
    assert list(frame["metric"].unique()) == ["eval_loss"] and frame.attrs["higher_is_better"] is False
    front = pareto_front(list(frame["training_j"]), list(frame["value"]), frame.attrs["higher_is_better"])
    assert sorted(frame["run"].iloc[front]) == ["12ep", "4ep"]
    assert experiment_frame("ft", uri, mode="max").attrs["higher_is_better"] is True  # said otherwise: as said
    assert cli(["report", "ft", "--tracking-uri", uri, "--plot", str(tmp_path / "f.png")]) == 0


def test_a_crashed_repeat_is_left_out_of_its_groups_mean_and_a_running_run_has_its_time_so_far(tmp_path, capsys):
    """A repeat that crashed after its first epoch pulled its group's mean energy and accuracy down (0.45 J and
    0.216 for finished repeats of 0.60 J and 0.258), and a run still going showed a duration of 0 s."""
    uri = ready_store(tmp_path)
    _runs_of(uri, "rep", [("base-0", "FINISHED", 0.60, {"val_acc": 0.26}),
                          ("base-1", "FINISHED", 0.62, {"val_acc": 0.256}),
                          ("base-2", "FAILED", 0.15, {"val_acc": 0.13}),
                          ("base-3", "RUNNING", 0.3, {"val_acc": 0.2})])
    time.sleep(0.2)
    frame = experiment_frame("rep", uri, group_by="model")
    assert frame.set_index("run").loc["base-3", "duration_s"] >= 0.2
    assert cli(["report", "rep", "--tracking-uri", uri, "--group-by", "model", "--csv", str(tmp_path / "g.csv")]) == 0
    (group,) = pd.read_csv(tmp_path / "g.csv").to_dict("records")
    assert (group["n"], group["left_out"]) == (2, 2)
    assert group["training_j_mean"] == pytest.approx(0.61) and group["value_mean"] == pytest.approx(0.258)


def test_runs_of_two_frameworks_are_compared_on_metrics_the_user_can_name(tmp_path, capsys):
    """Lightning logs val_acc and HF eval_accuracy: a group averaged the two as "val_acc" and the plot's axis said
    val_acc alone, silently. Now the report says the metrics differ, names each, and takes a list in --metric."""
    uri = ready_store(tmp_path)
    _runs_of(uri, "mix", [("pl-0", "FINISHED", 0.60, {"val_acc": 0.90, "val_loss": 0.3}),
                          ("hf-0", "FINISHED", 0.50, {"eval_accuracy": 0.70, "eval_loss": 0.9})])
    assert cli(["report", "mix", "--tracking-uri", uri, "--group-by", "model", "--csv", str(tmp_path / "g.csv")]) == 0
    out = capsys.readouterr().out
    assert "the runs report different metrics (eval_accuracy, val_acc)" in out and "--metric eval_accuracy,val_acc" \
        in out
    frame = experiment_frame("mix", uri, metric="val_acc,eval_accuracy")
    assert dict(zip(frame["run"], frame["metric"], strict=True)) == {"pl-0": "val_acc", "hf-0": "eval_accuracy"}
    assert dict(zip(frame["run"], frame["value"], strict=True)) == {"pl-0": 0.90, "hf-0": 0.70}
    # an accuracy and a loss cannot share a front
    with pytest.raises(ValueError, match=r"report metrics of opposite directions \(eval_loss, val_acc\).*--metric"):
        experiment_frame("mix", uri, metric="val_acc,eval_loss")
    assert cli(["report", "mix", "--tracking-uri", uri, "--metric", "val_loss,eval_loss"]) == 0


def test_a_plot_to_a_path_that_cannot_be_written_is_an_error_not_a_traceback(store, tmp_path, capsys):
    uri, _ = store
    assert cli(["report", "cmp", "--tracking-uri", uri, "--plot", str(tmp_path / "no" / "such" / "p.png")]) == 2
    assert "error: cannot write" in capsys.readouterr().err


def test_a_mistyped_store_path_is_an_error_and_makes_no_store(tmp_path, capsys):
    """MLflow creates the store (and its folder) it is pointed at: a report with a typo in the path made an empty
    store of 954 KB and said the experiment was not among ['Default']."""
    typo = tmp_path / "typo" / "mlfow.db"
    for uri in (f"sqlite:///{typo}", f"file://{typo.parent}/mlruns", f"sqlite:///{typo}?timeout=30"):
        assert cli(["report", "cmp", "--tracking-uri", uri]) == 2
        assert "no MLflow store at " in capsys.readouterr().err
        assert not typo.parent.exists()


def test_a_store_named_with_a_query_is_read(store, capsys):
    uri, _ = store
    assert cli(["report", "cmp", "--tracking-uri", f"{uri}?timeout=30"]) == 0
    assert "baseline" in capsys.readouterr().out
