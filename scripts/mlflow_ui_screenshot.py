"""Screenshot of a run's page in the real MLflow UI, for the README: docs/mlflow-ui.png.

    python scripts/mlflow_ui_screenshot.py [--out docs/mlflow-ui.png]

Starts ``mlflow server`` on a free 127.0.0.1 port over a temporary store, runs
examples/lightning_digits.py against it, and has headless Chromium (Debian's ``chromium``
package, driven by the ``playwright`` Python package) save the run's metrics page once its charts
have drawn. Needs ``chromium`` on PATH and ``pip install playwright`` (no browser download).
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


def shoot(browser: str, url: str, out: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = chromium.new_page(viewport={"width": 1500, "height": 1250})
        page.goto(url)
        page.wait_for_selector("text=energy", timeout=60000)
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
            url = f"{server.uri}/#/experiments/{exp['experiment_id']}/runs/{run['info']['run_id']}/model-metrics"
            shoot(browser, url, args.out)
        finally:
            server.stop()
    print(f"saved {args.out}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
