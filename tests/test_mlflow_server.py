"""A real ``mlflow server`` on 127.0.0.1: the per-epoch metrics, params and artifacts through its REST API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from test_lightning_monitor import ValModel, trainer

from green_callbacks.lightning import EnergyMonitor
from green_callbacks.records import Kind

from helpers import MlflowServer


def rest(server: MlflowServer, endpoint: str, body: dict | None = None, **query: str) -> dict:
    url = f"{server.uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_energy_reaches_a_real_tracking_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        monitor = EnergyMonitor(tracking_uri=server.uri, experiment_name="served", country="FR",
                                output_dir=str(tmp_path / "out"))
        trainer(tmp_path, [monitor], max_epochs=3).fit(ValModel())
        exp = rest(server, "experiments/get-by-name", experiment_name="served")["experiment"]
        found = rest(server, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert len(found) == 1
        run = found[0]
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        epochs = sorted(r.step for r in monitor.records if r.kind is Kind.EPOCH)
        assert len(epochs) == 3
        for key in ("energy/epoch_j", "emissions/epoch_g", "time/epoch_s"):
            steps = [m["step"] for m in rest(server, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]]
            assert sorted(steps) == epochs, key
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["green.carbon_intensity_label"] == "France (FRA)"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["green.method.cpu"] in ("estimated", "counter")
        files = rest(server, "artifacts/list", run_id=run_id, path="green_callbacks")["files"]
        assert sorted(f["path"] for f in files) == ["green_callbacks/intervals.csv", "green_callbacks/power.png",
                                                    "green_callbacks/power_trace.csv",
                                                    "green_callbacks/summary.json"]
    finally:
        server.stop()
