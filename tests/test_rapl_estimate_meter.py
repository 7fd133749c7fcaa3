"""RAPL on a fake powercap tree, the CPU estimate, and the meter's windows and trace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import FrozenInstanceError

import pytest

from green_callbacks.meter import DecimatingTrace, EnergyMeter
from green_callbacks.sensors import CpuEstimateSensor, Method, RaplSensor, build_sensors

from conftest import make_powercap

pytestmark = pytest.mark.alone  # sampled CPU energy is checked against the time it was read


def test_rapl_reads_package_and_dram_and_skips_psys(tmp_path):
    root = make_powercap(tmp_path, packages=2)
    cpu, dram = RaplSensor("cpu", root), RaplSensor("dram", root)
    assert cpu.devices == ["package-0", "package-1"]
    assert dram.devices == ["dram-0", "dram-1"]
    cpu.start(0.0)
    (root / "intel-rapl:0" / "energy_uj").write_text(str(1_000_000 + 5_000_000))
    (root / "intel-rapl:1" / "energy_uj").write_text(str(1_000_000 + 2_500_000))
    r = cpu.read(1.0)
    assert r.joules == {"package-0": 5.0, "package-1": 2.5}
    assert set(r.methods.values()) == {Method.COUNTER}
    assert r.power_w["package-0"] == pytest.approx(5.0)


def test_rapl_wraparound_during_a_window(tmp_path):
    max_uj = 1_000_000_000
    root = make_powercap(tmp_path, max_uj=max_uj, start_uj=max_uj - 3_000_000)
    meter = EnergyMeter([RaplSensor("cpu", root)], period_s=0.01).start()
    try:
        meter.begin("w")
        (root / "intel-rapl:0" / "energy_uj").write_text("4000000")  # wrapped: 3 J + 4 J spent
        time.sleep(0.05)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.joules["cpu"]["package-0"] == pytest.approx(7.0)
    assert m.method("cpu") is Method.COUNTER


def test_a_rapl_counter_reset_is_not_read_as_a_wrap(tmp_path, green_log):
    """A package counter reset to a small value mid-range was read as one wrap: 262 kJ for an epoch of 24 J."""
    max_uj = 262_143_328_850  # a real package's range
    root = make_powercap(tmp_path, max_uj=max_uj, start_uj=100_000_000_000)
    meter = EnergyMeter([RaplSensor("cpu", root)], period_s=0.01).start()
    try:
        meter.begin("w")
        (root / "intel-rapl:0" / "energy_uj").write_text("5000000")  # reset: 5 J spent since
        time.sleep(0.05)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.joules["cpu"]["package-0"] == pytest.approx(5.0)
    assert "taken as a reset" in green_log.text


def test_a_rapl_zone_that_cannot_be_read_at_start_is_said_not_silently_estimated(tmp_path, green_log):
    from green_callbacks.sensors import build_sensors

    root = make_powercap(tmp_path)
    energy = root / "intel-rapl:0" / "energy_uj"
    energy.unlink()
    energy.mkdir()  # reading it raises IsADirectoryError: an OSError, not a permission error
    sensors = build_sensors(gpus=None, measure_cpu=True, rapl_root=root)
    assert [s.component for s in sensors] == ["cpu"] and type(sensors[0]).__name__ == "CpuEstimateSensor"
    assert "RAPL cpu cannot be read" in green_log.text and "falls back to an estimate" in green_log.text


def test_rapl_zone_vanishing_mid_run_becomes_unavailable(tmp_path, green_log):
    root = make_powercap(tmp_path)
    meter = EnergyMeter([RaplSensor("cpu", root)], period_s=0.01).start()
    try:
        meter.begin("w")
        (root / "intel-rapl:0" / "energy_uj").write_text(str(1_000_000 + 2_000_000))
        time.sleep(0.03)
        (root / "intel-rapl:0" / "energy_uj").unlink()
        time.sleep(0.03)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.method("cpu") is Method.UNAVAILABLE
    assert m.joules["cpu"]["package-0"] == pytest.approx(2.0)
    assert green_log.text.count("RAPL package-0") == 1


@pytest.mark.parametrize("root_only", ["every zone", "dram only"])
def test_root_only_rapl_warns_with_the_fix_and_falls_back_to_estimate(tmp_path, root_only):
    """energy_uj readable by its owner only, read by someone else (the CVE-2020-8694 default). Where only DRAM's
    is, the package is still measured and the warning says so (it said CPU energy fell back to an estimate)."""
    root = make_powercap(tmp_path / "pc")
    prefix: list[str] = []
    for f in root.rglob("energy_uj"):
        if root_only == "dram only" and (f.parent / "name").read_text().strip() != "dram":
            continue
        f.chmod(0o400)
        if os.geteuid() == 0:
            os.chown(f, 65534, 65534)
    if os.geteuid() == 0:
        # root reads anything; without CAP_DAC_OVERRIDE it reads like an ordinary user
        if not shutil.which("setpriv"):
            pytest.skip("running as root and util-linux's setpriv is missing to drop DAC capabilities")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    script = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from green_callbacks.sensors import build_sensors
        sensors = build_sensors(gpus=None, rapl_root={str(root)!r})
        print("COMPONENTS", [(s.component, type(s).__name__) for s in sensors])
    """)
    out = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("sudo chmod o+r /sys/class/powercap") == 1
    if root_only == "every zone":
        assert "COMPONENTS [('cpu', 'CpuEstimateSensor')]" in out.stdout
        assert "falls back to an estimate" in out.stderr
    else:
        assert "COMPONENTS [('cpu', 'RaplSensor')]" in out.stdout
        assert "CPU energy is measured by RAPL, DRAM's is not counted" in out.stderr
        assert "falls back to an estimate" not in out.stderr


def test_build_sensors_prefers_rapl_when_readable(tmp_path):
    root = make_powercap(tmp_path)
    kinds = [(s.component, type(s).__name__) for s in build_sensors(gpus=None, rapl_root=root)]
    assert kinds == [("cpu", "RaplSensor"), ("dram", "RaplSensor")]


def test_cpu_estimate_is_labelled_estimated_and_bounded_by_tdp():
    meter = EnergyMeter([CpuEstimateSensor(tdp_w=100.0)], period_s=0.02).start()
    try:
        meter.begin("busy")
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            sum(i * i for i in range(1000))
        m = meter.end("busy")
    finally:
        meter.close()
    assert m.method("cpu") is Method.ESTIMATED
    assert 0 < m.component_j("cpu") <= 100.0 * m.duration_s * 1.05
    with pytest.raises(ValueError, match="cpu_tdp_w=-5"):
        CpuEstimateSensor(tdp_w=-5)


def test_nested_windows_and_frozen_measurements(fake_nvml):
    from green_callbacks.sensors import NvmlSensor

    # The devices run on the work clock, which only ``advance`` moves: the counter's value at an
    # edge does not depend on how long the host took between its timestamp and its read (a
    # loaded CI machine's preemption there once cost 0.27 % against a wall-clock truth).
    (dev,) = fake_nvml.configure([{"profile_seed": 7}], work_clock=True)
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.01).start()

    def work(seconds):
        time.sleep(seconds)
        fake_nvml.advance(seconds)

    try:
        meter.begin("epoch")
        work(0.3)
        meter.begin("validation")
        work(0.2)
        val = meter.end("validation")
        work(0.1)
        epoch = meter.end("epoch")
        with pytest.raises(ValueError, match="window 'epoch' is not open; open windows: \\[\\]"):
            meter.end("epoch")
    finally:
        meter.close()
    assert epoch.start_s < val.start_s < val.end_s < epoch.end_s
    assert 0 < val.total_j < epoch.total_j
    # exact to the counter's millijoule resolution
    assert epoch.total_j == pytest.approx(dev.energy_between(0.0, 0.6), abs=2e-3)
    assert val.total_j == pytest.approx(dev.energy_between(0.3, 0.5), abs=2e-3)
    assert 0 < epoch.mean_power_w("gpu") <= epoch.peak_power_w["gpu"] <= 400
    with pytest.raises(FrozenInstanceError):
        epoch.name = "x"  # type: ignore[misc]
    frame = meter.trace_frame()
    assert list(frame.columns) == ["time_s", "gpu_w"] and len(frame) > 10


def test_trace_memory_is_bounded_and_covers_the_whole_run():
    trace = DecimatingTrace(["gpu_w"], capacity=64)
    for i in range(100_000):
        trace.add(i * 0.05, [float(i % 7)])
    rows = trace.rows()
    assert len(rows) < 64
    assert rows[0][0] < 100 and rows[-1][0] > 0.9 * 100_000 * 0.05
    assert sum(r[1] for r in rows) / len(rows) == pytest.approx(3.0, rel=0.01)


def test_a_sensor_that_raises_is_disabled_not_fatal(green_log):
    class Exploding(CpuEstimateSensor):
        def sample(self, now_s):
            raise RuntimeError("driver bug")

    meter = EnergyMeter([Exploding()], period_s=0.01).start()
    meter.begin("w")
    time.sleep(0.05)
    m = meter.end("w")
    meter.close()
    assert m.total_j >= 0
    assert green_log.text.count("driver bug") == 1
