"""Real DDP on CPU with gloo: each rank measures only its own (simulated) GPU; rank 0 logs the exact sum."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fake_nvml_env, free_port, history, ready_store, runs

pytestmark = pytest.mark.alone  # two ranks of their own, and budgets on GPUs whose energy follows wall time

SCRIPTS = Path(__file__).parent / "ddp_scripts"
PER_RANK = json.dumps({"per_rank": [{"profile_seed": 11}, {"profile_seed": 12}]})
SHARED = json.dumps({"devices": [{"profile": [[1.0, 100.0]]}, {"profile": [[1.0, 200.0]]}]})  # one node's two GPUs


def check_sums(uri: str, out: Path, epochs: int) -> None:
    client, found = runs(uri, "ddp")
    assert len(found) == 1, "rank 0 alone logs, into one run"
    run = found[0]
    truth = [json.loads((out / f"truth-rank{r}.json").read_text()) for r in range(2)]
    durations = [json.loads((out / f"durations-rank{r}.json").read_text()) for r in range(2)]
    h = {k: dict(history(client, run.info.run_id, k)) for k in
         ("energy/gpu0_j", "energy/gpu1_j", "energy/gpu_j", "energy/cpu_j", "energy/epoch_j", "power/gpu_mean_w",
          "power/gpu_peak_w")}
    ends = sorted(h["energy/gpu_j"])
    assert len(ends) == epochs
    lags = [json.loads((out / f"lag-rank{r}.json").read_text()) for r in range(2)]
    for epoch, step in enumerate(ends):
        # each rank's device, measured by that rank, equals that device's exact energy (its counter read at most
        # EDGE_LAG_S after the edge's clock: the joules in that time after the edges, found by the rank, bound it)
        for r in range(2):
            below, above = lags[r][epoch]
            assert truth[r][epoch] - below - 0.05 <= h[f"energy/gpu{r}_j"][step] <= truth[r][epoch] + above + 0.05, \
                (r, epoch, h[f"energy/gpu{r}_j"][step], truth[r][epoch], lags[r][epoch])
        # totals are the exact sum over devices: no device counted twice, CPU once per node
        assert h["energy/gpu_j"][step] == pytest.approx(h["energy/gpu0_j"][step] + h["energy/gpu1_j"][step])
        assert h["energy/epoch_j"][step] == pytest.approx(h["energy/gpu_j"][step] + h["energy/cpu_j"][step])
        # the summed power is each GPU's joules over its own rank's window: the ranks reach an epoch's end at
        # slightly different instants, and one rank's duration over both ranks' joules overstated it (HF: +5 %)
        watts = sum(h[f"energy/gpu{r}_j"][step] / durations[r][epoch] for r in range(2))
        assert h["power/gpu_mean_w"][step] == pytest.approx(watts, rel=1e-3)
        assert h["power/gpu_peak_w"][step] >= h["power/gpu_mean_w"][step]
    assert run.data.params["green.world_size"] == "2"
    assert run.data.tags["green.gpu_count"] == "2"


def launch(framework: str, tmp_path: Path, *extra: str) -> str:
    """Run a 2-rank job on CPU (``lightning``: Lightning's ``ddp`` under torchrun, as a multi-node job runs;
    ``lightning-spawn``: ``ddp_spawn``, Lightning starting the ranks; ``hf``: HF under torchrun); return its
    tracking URI (what the job's ranks wrote to stderr: in tmp_path/stderr.txt). (torchrun: 20 s a job here,
    ddp_spawn 29 s: its parent imports Lightning before the ranks do.)"""
    uri = ready_store(tmp_path)
    if framework == "lightning-spawn":
        command = [sys.executable, str(SCRIPTS / "lightning_ddp.py")]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(SCRIPTS / ("lightning_ddp.py" if framework == "lightning" else "hf_ddp.py"))]
    proc = subprocess.run([*command, uri, str(tmp_path), *extra],
                          env=fake_nvml_env(SHARED if "shared" in extra else PER_RANK),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    return uri


def stopped_epochs(tmp_path: Path) -> list[int]:
    return [int((tmp_path / f"stopped-rank{r}.txt").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "hf"])  # (ddp_spawn: tests/test_examples.py's DDP example)
def test_two_ranks_log_the_exact_sum_once(tmp_path, framework):
    check_sums(launch(framework, tmp_path), tmp_path, epochs=2)


@pytest.mark.slow
def test_a_gpu_every_rank_measures_is_counted_once(tmp_path):
    """gpus="all" under torchrun on one node: both ranks see and measure the node's two GPUs (100 W and 200 W). Each
    GPU is counted once, from the first rank (by UUID), with one warning; the run said 4 GPUs and 600 W."""
    uri = launch("hf", tmp_path, "shared")
    client, (run,) = runs(uri, "ddp")
    assert run.data.tags["green.gpu_count"] == "2"
    names = run.data.tags["green.gpu_names"].split("; ")
    assert [n.split(" = ")[0] for n in names] == ["gpu0", "gpu1"] and len({n.split("(")[-1] for n in names}) == 2
    h = {k: dict(history(client, run.info.run_id, k)) for k in
         ("energy/gpu0_j", "energy/gpu1_j", "energy/gpu2_j", "energy/gpu_j", "power/gpu_mean_w", "time/epoch_s")}
    assert not h["energy/gpu2_j"], "a GPU counted once per rank"
    assert len(h["energy/gpu_j"]) == 2
    for step, joules in h["energy/gpu_j"].items():
        seconds = h["time/epoch_s"][step]
        assert h["energy/gpu0_j"][step] / seconds == pytest.approx(100.0, rel=0.02)
        assert h["energy/gpu1_j"][step] / seconds == pytest.approx(200.0, rel=0.02)
        assert joules == pytest.approx(h["energy/gpu0_j"][step] + h["energy/gpu1_j"][step])
        assert h["power/gpu_mean_w"][step] == pytest.approx(300.0, rel=0.02)
    said = (tmp_path / "stderr.txt").read_text()
    assert said.count("GPU(s) are measured by more than one rank") == 1, said[-3000:]


@pytest.mark.slow
def test_lightning_ddp_resumed_into_a_new_run_describes_every_ranks_gpu(tmp_path):
    """A DDP training resumed from its checkpoint in a new process whose MLFlowLogger opens a new run: the new run's
    tags say what every rank's GPU is (rank 1, restored as 'described already', sent nothing: rank 0's GPU alone)."""
    uri = launch("lightning", tmp_path, "first")
    launch("lightning", tmp_path, "resume")
    client, found = runs(uri, "ddp")
    assert len(found) == 2, "each process's logger has a run of its own"
    first, resumed = sorted(found, key=lambda r: r.info.start_time)
    for run in (first, resumed):
        names = run.data.tags["green.gpu_names"].split("; ")
        assert [n.split(" = ")[0] for n in names] == ["gpu0", "gpu1"], names
        assert run.data.tags["green.gpu_count"] == "2"
    first_j = history(client, first.info.run_id, "energy/total_j")[-1][1]
    gpu1 = history(client, resumed.info.run_id, "energy/gpu1_j")
    assert len(gpu1) == 1 and gpu1[0][1] > 0, "the resumed epoch's rank-1 GPU"
    assert history(client, resumed.info.run_id, "energy/total_j")[-1][1] > first_j, "the totals go on"


@pytest.mark.slow
def test_lightning_ddp_ranks_decide_the_same(tmp_path):
    """Only rank 1's metric flattens; the reduced decision stops both ranks at the same epoch."""
    uri = launch("lightning", tmp_path, "stop")
    stopped = stopped_epochs(tmp_path)
    assert stopped[0] == stopped[1] < 10
    _, (run,) = runs(uri, "ddp")
    # rank 1 decided: rank 0's run says why (it said "other_rank", "another rank decided to stop")
    assert run.data.tags["green.stop_reason"] == "efficiency_plateau"
    assert run.data.tags["green.stop_message"].endswith("(decided on rank 1)"), run.data.tags["green.stop_message"]
    # every rank's decision reads the same (rank 1's own lacked the suffix rank 0's had)
    messages = [(tmp_path / f"stop-message-rank{r}.txt").read_text() for r in range(2)]
    assert messages == [run.data.tags["green.stop_message"]] * 2


@pytest.mark.slow
def test_what_every_rank_would_say_alike_is_said_once(tmp_path):
    """A warn-only budget passed, its projection, and a stopper with no validation to decide at: drawn from what every
    rank shares (the merged joules, the schedule), said by rank 0 only; each was said once per rank."""
    launch("lightning", tmp_path, "warn")
    said = (tmp_path / "stderr.txt").read_text()
    for line in ("EnergyBudget: at this rate the whole run would need", "(on_exceed='warn': training continues; "
                 "said once)", "decides at evaluations, and this training has none (limit_val_batches=0)"):
        assert said.count(line) == 1, (line, said[-3000:])


@pytest.mark.slow
def test_energy_warnings_are_said_once_whatever_rank_zeros_metric(tmp_path):
    """No energy yet at an evaluation, or none since the last: about the joules every rank shares, so said by rank
    0, also where rank 0's own metric was NaN there (each rank reports its own) and only rank 1 reached the check."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plain_alike.py"), str(tmp_path), str(free_port())],
                          env=fake_nvml_env("{}"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("EfficiencyEarlyStopping: no energy measured yet at an evaluation",
                 "EfficiencyEarlyStopping: no energy measured since the last evaluation (200 J)",
                 "EfficiencyEarlyStopping: val_acc=nan at an evaluation; skipped"):
        assert proc.stderr.count(line) == 1, (line, proc.stderr[-3000:])


@pytest.mark.slow
def test_hf_torchrun_budget_stops_both_ranks(tmp_path):
    uri = launch("hf", tmp_path, "stop")
    stopped = stopped_epochs(tmp_path)
    assert stopped[0] == stopped[1] < 20
    client, (run,) = runs(uri, "ddp")
    assert run.data.tags["green.stop_reason"] == "energy_budget"
    epochs = [v for _, v in history(client, run.info.run_id, "energy/epoch_j")]
    assert sum(epochs) <= 500 + max(epochs), "the overshoot stays within one epoch (checks run every 2 steps)"
