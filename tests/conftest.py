"""Shared fixtures. Fakes stand only where the hardware is: NVML and the powercap tree."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

FAKE_NVML_DIR = Path(__file__).parent / "fake_nvml"


@pytest.fixture(autouse=True)
def _work_in_a_temp_folder(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh temporary folder: whatever lands in the working directory (a sqlite
    store's default artifact root ./mlruns, a monitor's default output_dir, Lightning's logs, the
    processes a test starts) lands there, never in the checkout (tests/test_clean_tree.py checks)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    # an end that waited in vain for a store is remembered for a minute per process: not across tests
    monkeypatch.setattr("green_callbacks.sinks.launch._unanswered", {})


@pytest.fixture
def fake_nvml(monkeypatch):
    """A fresh simulated NVML installed as ``pynvml`` for this test."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    spec.loader.exec_module(module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return module


@pytest.fixture
def green_log(caplog):
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    return caplog


def make_powercap(root: Path, packages: int = 1, dram: bool = True, max_uj: int = 262143328850,
                  start_uj: int = 1_000_000) -> Path:
    """A powercap tree like /sys/class/powercap: package zones, each with a dram subzone."""
    for p in range(packages):
        zone = root / f"intel-rapl:{p}"
        zone.mkdir(parents=True)
        (zone / "name").write_text(f"package-{p}\n")
        (zone / "energy_uj").write_text(f"{start_uj}\n")
        (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
        core = zone / f"intel-rapl:{p}:0"
        core.mkdir()
        (core / "name").write_text("core\n")
        (core / "energy_uj").write_text("0\n")
        (core / "max_energy_range_uj").write_text(f"{max_uj}\n")
        if dram:
            d = zone / f"intel-rapl:{p}:1"
            d.mkdir()
            (d / "name").write_text("dram\n")
            (d / "energy_uj").write_text(f"{start_uj}\n")
            (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    psys = root / f"intel-rapl:{packages}"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("5\n")
    (psys / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return root


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Training on one thread: the same seed gives the same curve, so stopping tests decide the same way
    every run (multithreaded CPU reductions are not bit-reproducible), and a 2-core CI is not oversubscribed."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dev dependency
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The checkout's files before any test ran, for ``test_zz_clean_tree.py`` at the end."""
    from test_clean_tree import tree_files

    session.config.green_tree_before = tree_files()


# The two files of ``quiet`` tests first, one on each worker, side by side (one after the other, each had the other
# worker stand still for its whole length); then the files whose tests take longest (``--no-loadscope-reorder``:
# pytest-xdist sends whole files in collection order, to whichever worker is free), so that the suite does not end
# with one worker on a long file while the other stands idle; seconds summed per file in a run on two cores of
# 2026-12-07. The rest follow in their order, and ``test_zz_clean_tree.py`` (which checks what the suite left
# behind) last.
LONGEST_FIRST = ("test_nvml_sensor.py", "test_amd_sensor.py", "test_mlflow_faults.py", "test_faults.py",
                 "test_examples.py", "test_ddp.py", "test_stopping.py", "test_plain_loop.py", "test_intervals.py",
                 "test_spool.py", "test_ray_train.py", "test_lightning_monitor.py", "test_schedule_edges.py",
                 "test_hf_monitor.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def place(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (2 if name == "test_zz_clean_tree.py" else 1), 0

    items.sort(key=place)  # stable: a file's tests keep their order


_held: list = []  # this worker's open lock files and the kind of run it holds (a run of ``alone`` or ``quiet`` tests)


def _kind(item: pytest.Item | None) -> str | None:
    if item is None:
        return None
    return next((k for k in ("alone", "quiet") if item.get_closest_marker(k) is not None), "shared")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """With the tests on several processes (pytest-xdist), a test marked ``alone`` runs with no other test
    beside it: energy that follows wall time into a budget's decision, several ranks or a Ray cluster of their
    own, CPU time charged to a process tree. A test marked ``quiet`` runs beside other ``quiet`` tests only: the
    sensors' tests on simulated devices, which sleep through windows checked to their edges (a read a millisecond
    late on a busy core is a sample off), but whose sampler threads leave the other core free.

    Three lock files: every other test holds ``shared`` (a shared lock), a quiet one ``quiet`` (a shared lock too);
    a test takes the other group's file exclusively for a moment on its way in, so that no test of the other group
    runs (an ``alone`` test takes both, and keeps them). The way in, the ``gate``, is taken exclusively by one test
    at a time, so a stream of one group's tests does not starve the other. The locks are held over the test's whole
    protocol, so the fixtures it sets up and tears down (a module's MLflow server started for its first test) are
    inside it too. A run of ``alone`` (or of ``quiet``) tests one after another on a worker (a file of them: the
    tests go out by file) holds its locks from its first test to its last: taken for each, every one waited for the
    test the other worker had started, and the other worker stood still meanwhile (a third of the suite's time on
    two cores). On one process nothing is locked."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield
        return
    import fcntl

    kind = _kind(item)
    if not _held:
        base = item.config._tmp_path_factory.getbasetemp().parent / f"green-tests-{run}"
        files = {name: open(f"{base}.{name}", "a") for name in ("gate", "shared", "quiet")}  # noqa: SIM115
        fcntl.flock(files["gate"], fcntl.LOCK_EX)
        try:
            if kind == "alone":
                fcntl.flock(files["shared"], fcntl.LOCK_EX)
                fcntl.flock(files["quiet"], fcntl.LOCK_EX)
            else:
                other = files["quiet" if kind == "shared" else "shared"]
                fcntl.flock(other, fcntl.LOCK_EX)  # no test of the other group runs (this one holds the gate)
                fcntl.flock(files[kind], fcntl.LOCK_SH)
                fcntl.flock(other, fcntl.LOCK_UN)
        finally:
            if kind != "alone":
                fcntl.flock(files["gate"], fcntl.LOCK_UN)
        _held[:] = [files, kind]
    try:
        yield
    finally:
        files, held = _held
        if held == "shared" or _kind(nextitem) != held:
            for f in files.values():
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            _held.clear()
