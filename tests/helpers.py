"""Small real pieces the tests share: MLflow queries, tiny models, a digits data set."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import FAKE_NVML_DIR

# logged at each epoch's end, at the trainer's global step
EPOCH_CONTRACT = ["energy/epoch_j", "energy/gpu_j", "energy/cpu_j", "energy/val_j", "energy/epoch_kwh",
                  "emissions/epoch_g", "power/gpu_mean_w", "power/gpu_peak_w", "time/epoch_s", "energy/gpu0_j"]
# logged at each evaluation, at the trainer's global step
EVAL_CONTRACT = ["energy/eval_j", "time/eval_s", "energy/interval_j", "time/interval_s", "emissions/interval_g"]
# logged at most once per global step: at every evaluation, epoch end and every-N-steps point
CUMULATIVE = ["energy/cumulative_j", "emissions/cumulative_g", "power/mean_w"]


_made_store: list[Path] = []


def made_store() -> Path:
    """One MLflow sqlite store with its tables, made by this test process the first time it is asked for."""
    if not _made_store:
        import mlflow

        made = Path(tempfile.mkdtemp(prefix="green-store-")) / "made.db"
        atexit.register(shutil.rmtree, made.parent, True)
        here = os.getcwd()
        os.chdir(made.parent)  # its Default experiment's ./mlruns, rewritten in each copy (contextlib.chdir: 3.11+)
        try:
            mlflow.MlflowClient(f"sqlite:///{made}").search_experiments()
        finally:
            os.chdir(here)
        _made_store.append(made)
    return _made_store[0]


def ready_store(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of an MLflow sqlite store at ``folder/name`` that has its tables, as a user's store has from its
    second run on: the first call copies in one store this test process made with MLflow, later calls find
    it as the test left it. Making a new store (MLflow's migrations) takes about a second, in the training's
    sender and again in the test's client, which summed over the suite was minutes of CI. What a *new* store
    goes through stays tested where it is the point: the main job and the examples, the default store in the
    working folder (``MLFLOW_TRACKING_URI`` unset), a store that is no database, and the other tests that
    build their URI by hand."""
    target = Path(folder) / name
    if not target.exists():  # a test's second look at its store (a resume, a read) finds it as it left it
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made_store(), target)
        # the Default experiment's artifacts in mlruns/ beside the copy, as MLflow sets it for a store made from
        # its own folder: not in the folder the first copy was made for (nor in the checkout)
        with contextlib.closing(sqlite3.connect(target)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (str(target.parent / "mlruns" / "0"),))
    return f"sqlite:///{target}"


def settle(uri: str, timeout_s: float = 90.0) -> None:
    """Wait (bounded) for the senders of the trainings that wrote to a local store in a test's folder: one still
    sending when a training's end stopped waiting for it (``mlflow_wait_s``, on a loaded machine) would make the
    store's tables while the test reads it, and MLflow's two migrations of one new store trip over each other."""
    import psutil

    from green_callbacks.sinks.spool import all_sent

    if not uri.startswith("sqlite:///"):
        return
    folder = str(Path(uri[len("sqlite:///"):]).parent)
    end = time.monotonic() + timeout_s

    def sending() -> bool:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if "green_callbacks.sinks" not in cmd:
                continue
            # its first spool (the command line), and the one it follows now (a sender kept idle by its process is
            # handed the next training's spool: it holds that one's lock open)
            with contextlib.suppress(psutil.Error):
                spools = {Path(cmd[-1]), *(Path(f.path) for f in proc.open_files() if f.path.endswith(".jsonl"))}
                # (a stage's sender kept for the next stage, or one kept idle, waits with nothing to send)
                if any(str(s).startswith(folder + os.sep) and s.exists() and all_sent(s) is None for s in spools):
                    return True
        return False

    while sending() and time.monotonic() < end:
        time.sleep(0.2)


def runs(uri: str, experiment: str | None = None):
    from mlflow.tracking import MlflowClient

    settle(uri)
    client = MlflowClient(uri)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps if e is not None])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def steps(client, run_id: str, key: str) -> list[int]:
    """The global steps at which ``key`` was logged, in order (a step twice shows twice)."""
    return [s for s, _ in history(client, run_id, key)]


def artifacts(client, run_id: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, "green_callbacks"))


def fake_nvml_env(config: str) -> dict[str, str]:
    """Environment for a subprocess whose ``import pynvml`` finds the fake, configured by JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE_NVML_DIR), str(Path(__file__).parent), *sys.path])
    env["FAKE_NVML_CONFIG"] = config
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 over a sqlite store; stop and start it at will."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            # without the server's job runner for GenAI jobs: eight more processes importing MLflow and
            # polling while the server lives (half a core at each start here); tracking does not use it
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        import urllib.request

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def digits_tensors(seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], split 80/20."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)
    x = torch.tensor(x, dtype=torch.float32)[idx] / 16.0
    y = torch.tensor(y, dtype=torch.long)[idx]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def hf_digits_model(hidden: int = 32, seed: int = 0):
    """A tiny MLP classifier for 8x8 digits, built from a ``PretrainedConfig`` (nothing downloaded)."""
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    class DigitsConfig(PretrainedConfig):
        model_type = "digits-mlp"

        def __init__(self, hidden: int = 32, **kw):
            super().__init__(**kw)
            self.hidden = hidden

    class DigitsMLP(PreTrainedModel):
        config_class = DigitsConfig

        def __init__(self, config):
            super().__init__(config)
            self.net = torch.nn.Sequential(torch.nn.Linear(64, config.hidden), torch.nn.ReLU(),
                                           torch.nn.Linear(config.hidden, 10))
            self.post_init()

        def forward(self, pixels, labels=None):
            logits = self.net(pixels)
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    torch.manual_seed(seed)
    return DigitsMLP(DigitsConfig(hidden=hidden))


class DigitsDataset:
    """(pixels, labels) tensors as the dict rows the HF Trainer collates."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "labels": self.y[i]}


def hf_accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def lightning_digits_module(lr: float = 1e-3, hidden: int = 32, optimizer: str = "adam"):
    """A LightningModule classifying digits, logging val_acc and val_loss."""
    import lightning.pytorch as pl
    import torch

    class DigitsModule(pl.LightningModule):
        def __init__(self, lr: float = lr, hidden: int = hidden, optimizer: str = optimizer) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            if self.hparams.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    return DigitsModule


def digits_loaders(batch_size: int = 64):
    from torch.utils.data import DataLoader, TensorDataset

    (xt, yt), (xv, yv) = digits_tensors()
    return (DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=512))


def work_clock(fake, train_s: float = 0.010, val_s: float = 0.0):
    """A Lightning callback that moves the simulated GPU's work clock (``configure(work_clock=True)``):
    ``train_s`` of work per training step, ``val_s`` per validation batch, so energy follows the work
    done, not the machine's speed or load."""
    import lightning.pytorch as pl

    class Work(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            fake.advance(train_s)

        def on_validation_batch_end(self, *args) -> None:
            if val_s:
                fake.advance(val_s)

    return Work()


def hf_work_clock(fake, train_s: float = 0.010, eval_s: float = 0.0):
    """The same for HF's ``Trainer``: ``train_s`` of work per optimizer step, ``eval_s`` per evaluation batch."""
    from transformers import TrainerCallback

    class HfWork(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fake.advance(train_s)

        def on_prediction_step(self, args, state, control, **kwargs):
            if eval_s:
                fake.advance(eval_s)

    return HfWork()


def records_of(monitor, kind: str) -> list:
    """The monitor's interval records of one kind (``epoch``, ``evaluation``, ``point``, ``end``)."""
    return [r for r in monitor.records if r.kind.value == kind]


def busy_wait(seconds: float) -> None:
    """Let a simulated device's clock run ``seconds`` of wall time (sleeping, so the sampler thread runs)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.001)


def truth(device, m) -> float:
    """A simulated device's exact joules over measurement ``m``'s window."""
    return device.energy_between(m.start_s, m.end_s)


EDGE_LAG_S = 0.005  # how long after its clock was read an edge's counter read may come: both cores busy with the
# ranks of a DDP job, the edge reader waits for the GIL (Python's switch interval) or for a core


def lag_slack(device, window) -> list[float]:
    """The joules ``device`` spent in the ``EDGE_LAG_S`` after each edge of ``window``: how far an exact measurement,
    its counter read late at an edge, may fall below (start) or above (end) the window's own exact joules."""
    return [device.energy_between(window.start_s, window.start_s + EDGE_LAG_S),
            device.energy_between(window.end_s, window.end_s + EDGE_LAG_S)]
