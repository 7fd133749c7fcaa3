"""Screenshot of a run's page in the real MLflow UI, for the README: docs/mlflow-ui.png.

    python scripts/mlflow_ui_screenshot.py [--out docs/mlflow-ui.png]

Starts ``mlflow server`` on a free 127.0.0.1 port over a temporary store, runs
examples/lightning_digits.py against it, and has headless Chromium (Debian's ``chromium``
package, driven by the ``playwright`` Python package) save the run's metrics page once its charts
have drawn. MLflow 3 opens an experiment in its GenAI view, where training runs are not listed, so the
script first opens the experiment and clicks the sidebar toggle from "GenAI" to "Model training"
(MLflow keeps that choice in the browser's local storage), waits for the run to be listed, and only
then goes to the run's *Model metrics* page. There it types ``--charts`` (a regular expression; MLflow's
chart search matches it, case-insensitively, against the metric names) into *Search metric charts*,
so that one screen holds a few charts of each of the efficiency/, emissions/, energy/ and power/
sections; ``--charts ''`` keeps every chart (the page is then taller than the screenshot).

Needs ``chromium`` on PATH (``apt-get install chromium`` on Debian/Ubuntu) and
``pip install playwright`` in the venv; do not run ``playwright install``, the system Chromium is used
through ``executable_path``. A manual docs tool: neither is a dependency of the project or of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import MlflowServer  # noqa: E402


def get(server: MlflowServer, endpoint: str, **query: str) -> dict:
    url = f"{server.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


CHARTS = r"efficiency/|emissions/(cumulative|epoch)_g|energy/(cumulative|epoch|cpu)_j|power/mean_w"


def shoot(browser: str, experiment_url: str, run_name: str, url: str, charts: str, out: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = chromium.new_page(viewport={"width": 1500, "height": 1750 if charts else 1250})
        page.goto(experiment_url)
        toggle = page.get_by_role("button", name="Model training", exact=True)
        toggle.wait_for(timeout=60000)
        toggle.click()  # GenAI -> Model training: the training runs are listed only in this view
        page.get_by_text(run_name, exact=True).first.wait_for(timeout=60000)
        page.goto(url)
        page.wait_for_selector("text=energy", timeout=60000)
        if charts:
            page.get_by_placeholder("Search metric charts").fill(charts)
            page.get_by_text("mean_w", exact=True).first.wait_for(timeout=60000)
        close = page.locator("[aria-label='Close']")  # the assistant side panel, when MLflow shows one
        if close.count():
            close.first.click()
        time.sleep(8)  # the charts are drawn lazily, a moment after the page settles
        page.screenshot(path=out)
        chromium.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow-ui.png"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--charts", default=CHARTS, help="regex for MLflow's chart search ('' = every chart)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp))
        server.start()
        try:
            env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
            subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_digits.py"), "--epochs",
                            str(args.epochs)], cwd=tmp, env=env, check=True, capture_output=True)
            exp = get(server, "experiments/get-by-name", experiment_name="green-callbacks-digits")["experiment"]
            req = urllib.request.Request(f"{server.uri}/api/2.0/mlflow/runs/search",
                                         data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                         headers={"Content-Type": "application/json"})
            run = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"][0]
            experiment_url = f"{server.uri}/#/experiments/{exp['experiment_id']}"
            url = f"{experiment_url}/runs/{run['info']['run_id']}/model-metrics"
            shoot(browser, experiment_url, run["info"]["run_name"], url, args.charts, args.out)
        finally:
            server.stop()
    print(f"saved {args.out}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
