"""A real 2-node torchrun job on this machine (1 CPU process per node, gloo): each rank's simulated GPU is
counted once, each node's CPU once and labelled by node, the totals are the sums, one run is logged once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from green_callbacks.distributed import node_name

from helpers import fake_nvml_env, free_port, history, ready_store, runs, steps

pytestmark = pytest.mark.alone  # four ranks of their own

SCRIPT = Path(__file__).parent / "ddp_scripts" / "lightning_nodes.py"
PER_RANK = json.dumps({"per_rank": [{"profile_seed": 21}, {"profile_seed": 22}]})


def test_node_identity_comes_from_the_launcher_before_the_host_name(monkeypatch):
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    import socket

    assert node_name() == socket.gethostname()
    monkeypatch.setenv("SLURM_NODEID", "3")
    assert node_name() == "node3"
    monkeypatch.setenv("GROUP_RANK", "1")  # torchrun's, first
    assert node_name() == "node1"
    assert node_name(0) == "node0"  # what the trainer says (Lightning's trainer.node_rank) wins


@pytest.mark.slow
def test_two_nodes_on_one_host_count_each_device_and_each_node_once(tmp_path):
    uri, port = ready_store(tmp_path), free_port()
    env = fake_nvml_env(PER_RANK)
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(var, None)
    env["OMP_NUM_THREADS"] = "1"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(n),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(SCRIPT),
                uri,
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    facts = [json.loads((tmp_path / f"truth-rank{r}.json").read_text()) for r in range(2)]
    assert [f["node"] for f in facts] == ["node0", "node1"]  # one host, two nodes, told apart
    client, found = runs(uri, "nodes")
    assert len(found) == 1, "one job, one run"
    run = found[0]
    rid = run.info.run_id
    keys = (
        "energy/gpu0_j",
        "energy/gpu1_j",
        "energy/gpu_j",
        "energy/cpu_j",
        "energy/epoch_j",
        "energy/node0/cpu_j",
        "energy/node1/cpu_j",
    )
    h = {k: dict(history(client, rid, k)) for k in keys}
    ends = steps(client, rid, "energy/epoch_j")
    assert len(ends) == 2 and len(set(ends)) == 2, "each epoch logged once"
    for epoch, step in enumerate(ends):
        # every rank's device, measured by that rank, is its exact energy, and counted once
        assert h["energy/gpu0_j"][step] == pytest.approx(facts[0]["gpu_j"][epoch], rel=1e-3, abs=0.05)
        assert h["energy/gpu1_j"][step] == pytest.approx(facts[1]["gpu_j"][epoch], rel=1e-3, abs=0.05)
        assert h["energy/gpu_j"][step] == pytest.approx(h["energy/gpu0_j"][step] + h["energy/gpu1_j"][step])
        # each node's CPU, measured by that node, under its own label; the component is their sum
        node_cpu = [h[f"energy/node{n}/cpu_j"][step] for n in (0, 1)]
        assert min(node_cpu) > 0
        assert h["energy/cpu_j"][step] == pytest.approx(sum(node_cpu))
        assert h["energy/epoch_j"][step] == pytest.approx(h["energy/gpu_j"][step] + h["energy/cpu_j"][step])
    assert run.data.params["green.world_size"] == "2"
    assert run.data.tags["green.gpu_count"] == "2"
