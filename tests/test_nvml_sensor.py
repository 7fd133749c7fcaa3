"""NVML sensor and meter against a simulated GPU whose exact energy is known."""

from __future__ import annotations

import threading
import time

import pytest

from green_callbacks.meter import EnergyMeter
from green_callbacks.sensors import Method, NvmlSensor, build_sensors

from helpers import busy_wait, truth

pytestmark = pytest.mark.quiet  # windows checked to their edges: a read a millisecond late on a busy core is off
# (beside the other file of quiet tests only: both sleep through their windows, see conftest.py)


def one_window(sensor, seconds: float, **meter_kw):
    """One window of ``seconds`` of busy work, measured by a meter over ``sensor``."""
    meter = EnergyMeter([sensor], **meter_kw).start()
    try:
        meter.begin("w")
        busy_wait(seconds)
        return meter.end("w")
    finally:
        meter.close()


def test_counter_path_matches_exact_energy(fake_nvml):
    devs = fake_nvml.configure([{"profile_seed": 1}, {"profile_seed": 2}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)]).start()
    try:
        for seconds in (0.3, 1.0, 2.0):
            meter.begin("w")
            busy_wait(seconds)
            m = meter.end("w")
            assert m.method("gpu") is Method.COUNTER
            for label, dev in (("gpu0", devs[0]), ("gpu1", devs[1])):
                exact = truth(dev, m)
                # floor to whole mJ at both edges, plus microseconds between clock and read
                assert m.joules["gpu"][label] == pytest.approx(exact, rel=1e-3, abs=0.05)
            assert m.component_j("gpu") == pytest.approx(truth(devs[0], m) + truth(devs[1], m), rel=1e-3)
    finally:
        meter.close()


def test_the_counter_is_read_at_window_edges_and_about_once_a_second_between(fake_nvml):
    # one read costs milliseconds of driver time on real GPUs (2.4 ms on an H100): not at every tick
    (dev,) = fake_nvml.configure([{"profile_seed": 6}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.01).start()
    try:
        reads = dev.calls["nvmlDeviceGetTotalEnergyConsumption"]
        meter.begin("w")
        busy_wait(2.5)
        m = meter.end("w")
        reads = dev.calls["nvmlDeviceGetTotalEnergyConsumption"] - reads
    finally:
        meter.close()
    assert 2 + 2 <= reads <= 2 + 3, reads  # the two edges and a poll every second, not 250 ticks
    assert dev.calls["nvmlDeviceGetFieldValues"] > 150  # the cheap instant power feeds the trace
    assert m.method("gpu") is Method.COUNTER
    assert m.component_j("gpu") == pytest.approx(truth(dev, m), rel=1e-3, abs=0.05)


def test_peek_makes_no_counter_read_and_stays_close(fake_nvml):
    (dev,) = fake_nvml.configure([{"profile_seed": 7}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml, counter_poll_s=10.0)], period_s=0.01).start()
    try:
        meter.begin("w")
        busy_wait(1.5)
        reads = dev.calls["nvmlDeviceGetTotalEnergyConsumption"]
        peeked = meter.peek("w")
        assert dev.calls["nvmlDeviceGetTotalEnergyConsumption"] == reads
        m = meter.end("w")
    finally:
        meter.close()
    assert peeked.method("gpu") is Method.COUNTER
    exact = dev.energy_between(peeked.start_s, peeked.end_s)
    assert peeked.component_j("gpu") == pytest.approx(exact, rel=0.03)  # 1.5 s of instant power at 100 Hz
    assert m.component_j("gpu") == pytest.approx(truth(dev, m), rel=1e-3, abs=0.05)  # the edge is the counter's


def test_a_slow_counter_is_read_by_the_sampler_only_and_windows_stay_close(fake_nvml, monkeypatch):
    # an H100's or H200's counter read takes 2.4 ms of driver time: at every window edge that is training time
    (dev,) = fake_nvml.configure([{"profile_seed": 6, "counter_read_s": 0.003}])
    readers = []
    real = fake_nvml.nvmlDeviceGetTotalEnergyConsumption

    def recorded(handle):
        readers.append(threading.current_thread().name)
        return real(handle)

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetTotalEnergyConsumption", recorded)
    sensor = NvmlSensor("all", nvml=fake_nvml)
    meter = EnergyMeter([sensor], period_s=0.01).start()
    try:
        readers.clear()  # start() reads (and times) the counter once on this thread
        windows = []
        meter.begin("w")
        for seconds in (0.3, 1.0, 2.0):
            busy_wait(seconds)
            windows.append(meter.end("w", reopen=True))
        meter.end("w")
        described = sensor.describe()
    finally:
        meter.close()
    assert readers and set(readers) == {"green-callbacks-sampler"}, readers  # about once a second, never here
    assert "instant power since" in described["edges"] and "3" in described["edges"]
    for m in windows:
        assert m.method("gpu") is Method.COUNTER
        assert m.component_j("gpu") == pytest.approx(truth(dev, m), rel=0.03)  # at most 1 s of instant power
    whole = dev.energy_between(windows[0].start_s, windows[-1].end_s)
    assert sum(m.component_j("gpu") for m in windows) == pytest.approx(whole, rel=0.01)  # edges shared


def test_a_fast_counter_is_read_at_window_edges(fake_nvml):
    fake_nvml.configure(n=1)
    sensor = NvmlSensor("all", nvml=fake_nvml)
    with EnergyMeter([sensor], period_s=0.05):
        assert sensor.describe()["edges"].startswith("window edges read the counter")


def test_counter_poll_period_must_be_a_number_of_seconds(fake_nvml):
    fake_nvml.configure(n=1)
    with pytest.raises(ValueError, match="counter_poll_s=-1"):
        NvmlSensor("all", nvml=fake_nvml, counter_poll_s=-1)


def test_sampled_path_stays_close_on_a_bursty_profile(fake_nvml):
    (dev,) = fake_nvml.configure([{"profile_seed": 3, "counter": False}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.01).start()
    try:
        errors = []
        for _ in range(3):
            meter.begin("w")
            busy_wait(2.0)
            m = meter.end("w")
            assert m.method("gpu") is Method.SAMPLED
            errors.append(abs(m.component_j("gpu") - truth(dev, m)) / truth(dev, m))
    finally:
        meter.close()
    # segments of 20-400 ms sampled every 10 ms: each edge costs at most one period of error
    assert max(errors) < 0.03, errors


def test_power_usage_fallback_when_instant_power_is_missing(fake_nvml, green_log):
    (dev,) = fake_nvml.configure([{"profile": [(0.5, 100.0), (0.5, 300.0)], "counter": False,
                                   "instant": False}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.02).start()
    try:
        busy_wait(1.0)
        meter.begin("w")
        busy_wait(3.0)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.method("gpu") is Method.SAMPLED
    # the 1-second average lags but over whole periods of a 1 s profile it averages to 200 W
    assert m.component_j("gpu") == pytest.approx(truth(dev, m), rel=0.1)
    assert "nvmlDeviceGetPowerUsage" in green_log.text


def test_not_supported_mid_run_switches_to_sampling(fake_nvml, green_log):
    (dev,) = fake_nvml.configure([{"profile_seed": 4}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.01).start()
    try:
        meter.begin("epoch")
        busy_wait(0.5)
        dev.faults["nvmlDeviceGetTotalEnergyConsumption"] = fake_nvml.NVML_ERROR_NOT_SUPPORTED
        busy_wait(1.5)
        m = meter.end("epoch")
        meter.begin("next")
        busy_wait(0.5)
        m2 = meter.end("next")
    finally:
        meter.close()
    assert m.method("gpu") is Method.SAMPLED and m2.method("gpu") is Method.SAMPLED
    assert m.component_j("gpu") == pytest.approx(truth(dev, m), rel=0.05)
    assert m2.component_j("gpu") == pytest.approx(truth(dev, m2), rel=0.05)
    assert green_log.text.count("NOT_SUPPORTED") == 1


def test_gpu_lost_mid_run_keeps_the_run_and_the_joules_before(fake_nvml, green_log):
    devs = fake_nvml.configure(n=2)
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.01).start()
    try:
        meter.begin("epoch")
        busy_wait(0.5)
        before = devs[1].energy_between(devs[1].t0, time.monotonic())
        for call in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"):
            devs[1].faults[call] = fake_nvml.NVML_ERROR_GPU_IS_LOST
        busy_wait(0.5)
        m = meter.end("epoch")
        meter.begin("after")
        busy_wait(0.2)
        m2 = meter.end("after")
    finally:
        meter.close()
    assert m.methods["gpu"]["gpu0"] is Method.COUNTER
    assert m.methods["gpu"]["gpu1"] is Method.UNAVAILABLE
    assert m.method("gpu") is Method.UNAVAILABLE
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(devs[0], m), rel=1e-3, abs=0.05)
    # the lost GPU keeps what was measured up to the loss, and adds nothing after it
    assert 0 < m.joules["gpu"]["gpu1"] <= before + 50
    assert m2.joules["gpu"]["gpu1"] == 0.0
    assert green_log.text.count("gpu1: NVML failed") == 1


@pytest.mark.parametrize(("counter", "calls"), [
    (True, ["nvmlDeviceGetTotalEnergyConsumption"]),
    (False, ["nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"]),  # a GPU before Volta: power is the source
])
def test_a_passing_nvml_error_is_retried_and_the_gpu_stays_measured(fake_nvml, green_log, counter, calls):
    """A timeout or a busy driver for a fraction of a second (NVML_ERROR_TIMEOUT): the next read covers the gap
    (the counter's exactly; sampled power interpolated across it), one warning, and the GPU keeps its method.
    It used to be 'unavailable' from the first failed read on, most of the run's energy dropped."""
    (dev,) = fake_nvml.configure([{"profile_seed": 3, "counter": counter}])
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=0.05)
    meter = EnergyMeter([sensor], period_s=0.01).start()
    try:
        meter.begin("w")
        busy_wait(0.3)
        for call in calls:
            dev.faults[call] = fake_nvml.NVML_ERROR_TIMEOUT
        busy_wait(0.3)
        dev.faults.clear()
        busy_wait(0.6)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.methods["gpu"]["gpu0"] is (Method.COUNTER if counter else Method.SAMPLED)
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(dev, m), rel=1e-3 if counter else 0.1, abs=0.05)
    assert green_log.text.count("gpu0: NVML reads failed for") == 1 and "unavailable' from now on" not in green_log.text
    if not counter:  # the 1-second average is not taken for good after passing failures of the instant field
        assert "instant power is not readable" not in green_log.text


def test_window_edges_do_not_wait_on_a_failing_gpu(fake_nvml, green_log, monkeypatch):
    """While a GPU's counter reads fail (a GPU falling off the bus can make each NVML call slow), the training
    thread's window edges read it no more: the sampler thread retries; an edge takes the last reading plus power.
    Every edge in the retries had called NVML on the training thread."""
    import threading

    (dev,) = fake_nvml.configure([{"profile_seed": 5}])
    real = fake_nvml.nvmlDeviceGetTotalEnergyConsumption
    callers = []

    def counted(handle):
        callers.append(threading.current_thread() is threading.main_thread())
        return real(handle)

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetTotalEnergyConsumption", counted)
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=0.05)
    meter = EnergyMeter([sensor], period_s=0.01).start()
    try:
        meter.begin("interval")
        busy_wait(0.2)
        dev.faults["nvmlDeviceGetTotalEnergyConsumption"] = fake_nvml.NVML_ERROR_TIMEOUT
        busy_wait(0.2)  # the sampler's poll has failed: the reads are being retried
        callers.clear()
        for _ in range(5):
            meter.end_many(["interval"], reopen=("interval",))
            busy_wait(0.02)
        on_training_thread = sum(callers)
        dev.faults.clear()
        busy_wait(0.3)
        m = meter.end("interval")
    finally:
        meter.close()
    assert on_training_thread == 0 and len(callers) > 0, "the sampler retried, the edges did not"
    assert m.methods["gpu"]["gpu0"] is Method.COUNTER


def test_an_nvml_error_that_persists_loses_the_gpu_after_lost_after_s(fake_nvml, green_log, monkeypatch):
    (dev,) = fake_nvml.configure([{"profile_seed": 4}])
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=0.05)
    monkeypatch.setattr(sensor, "lost_after_s", 0.3)
    meter = EnergyMeter([sensor], period_s=0.01).start()
    try:
        meter.begin("w")
        busy_wait(0.3)
        before = dev.energy_between(dev.t0, time.monotonic())
        dev.faults["nvmlDeviceGetTotalEnergyConsumption"] = fake_nvml.NVML_ERROR_UNKNOWN
        busy_wait(0.6)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.methods["gpu"]["gpu0"] is Method.UNAVAILABLE
    # what the counter showed, and the power integrated while its reads were retried, are kept
    assert before < m.joules["gpu"]["gpu0"] <= truth(dev, m) * 1.01
    assert green_log.text.count("gpu0: NVML failed") == 1 and len(green_log.records) == 1, "one fault, one warning"


def test_a_dead_gpus_last_watts_are_not_carried_through_the_retries(fake_nvml, green_log):
    """Every read fails (NVML says UNKNOWN, not GPU_IS_LOST) until the GPU counts as lost: edges inside the retries
    carried the last power on (330 J for a window cut there) and the loss then dropped it, so two intervals
    summed 330 J in an epoch of 90 J. Now nothing is carried past the first failure: they tile the epoch."""
    (dev,) = fake_nvml.configure([{"profile": [[1.0, 300.0]]}])
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=0.05)
    sensor.lost_after_s = 1.0
    meter = EnergyMeter([sensor], period_s=0.01).start()
    try:
        meter.begin("epoch")
        meter.begin("interval")
        busy_wait(0.3)
        for call in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"):
            dev.faults[call] = fake_nvml.NVML_ERROR_UNKNOWN
        busy_wait(0.8)
        (first,) = meter.end_many(["interval"], reopen=("interval",))
        busy_wait(0.8)
        second, epoch = meter.end_many(["interval", "epoch"])
    finally:
        meter.close()
    a, b, e = (m.joules["gpu"]["gpu0"] for m in (first, second, epoch))
    assert a + b == pytest.approx(e, abs=0.5) and 0.3 * 300 * 0.9 < e < 0.3 * 300 * 1.2
    assert epoch.methods["gpu"]["gpu0"] is Method.UNAVAILABLE and green_log.text.count("gpu0: NVML failed") == 1


def test_the_window_an_outages_joules_arrive_in_is_not_a_measurement(fake_nvml, green_log):
    """Every read times out across a window's edge, then works again (no loss): the window that ended in the outage
    was marked unread, but the next, in which the reads resumed, held the gap's joules too (+191 % for an epoch)
    and was logged as a counter measurement. Both are unread now; the run's total keeps the gap's joules."""
    (dev,) = fake_nvml.configure([{"profile": [[1.0, 250.0]]}])
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=0.05)
    meter = EnergyMeter([sensor], period_s=0.01).start()
    calls = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage")
    try:
        meter.begin("w")
        busy_wait(0.3)
        (first,) = meter.end_many(["w"], reopen=("w",))
        for call in calls:
            dev.faults[call] = fake_nvml.NVML_ERROR_TIMEOUT
        busy_wait(0.4)
        (outage,) = meter.end_many(["w"], reopen=("w",))
        busy_wait(0.2)
        for call in calls:
            del dev.faults[call]
        busy_wait(0.4)
        (after,) = meter.end_many(["w"], reopen=("w",))
        busy_wait(0.3)
        (clean,) = meter.end_many(["w"])
        run = meter.since_start()
    finally:
        meter.close()
    assert [("gpu0" in m.stale) for m in (first, outage, after, clean)] == [False, True, True, False]
    assert after.methods["gpu"]["gpu0"] is Method.COUNTER and after.joules["gpu"]["gpu0"] > 1.5 * truth(dev, after)
    assert clean.joules["gpu"]["gpu0"] == pytest.approx(truth(dev, clean), rel=1e-3, abs=0.05)
    assert run.joules["gpu"]["gpu0"] == pytest.approx(truth(dev, run), rel=0.02)


@pytest.mark.parametrize("code", ["NVML_ERROR_UNKNOWN", "NVML_ERROR_NO_PERMISSION"])
def test_a_gpu_unreadable_from_the_start_is_unavailable_at_once(fake_nvml, green_log, code):
    """Neither counter nor power readable at the start: no gap to carry over, so no retries (it read 'sampled',
    0 J, for the 5 s of retries, which short stages never outlast)."""
    (dev,) = fake_nvml.configure(n=1)
    for call in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"):
        dev.faults[call] = getattr(fake_nvml, code)
    m = one_window(NvmlSensor("all", nvml=fake_nvml), 0.2, period_s=0.01)
    assert m.methods["gpu"]["gpu0"] is Method.UNAVAILABLE and m.joules["gpu"]["gpu0"] == 0.0
    assert green_log.text.count("gpu0: NVML failed") == 1


@pytest.mark.parametrize("call", ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName"])
def test_a_gpu_lost_before_the_start_is_unavailable_and_the_others_are_measured(fake_nvml, green_log, monkeypatch,
                                                                                 call):
    """One GPU of two fallen off the bus before the sensors start (NVML fails on it while they look the GPUs up):
    that GPU is 'unavailable' with one warning; the other is measured (it had taken all measurement with it)."""
    devs = fake_nvml.configure(n=2)
    real = getattr(fake_nvml, call)

    def lost_on_gpu1(target, *args):
        if target in (1, devs[1]) or getattr(target, "index", None) == 1:
            raise fake_nvml.NVMLError(fake_nvml.NVML_ERROR_GPU_IS_LOST)
        return real(target, *args)

    monkeypatch.setattr(fake_nvml, call, lost_on_gpu1)
    m = one_window(NvmlSensor("all", nvml=fake_nvml), 0.3, period_s=0.01)
    assert m.methods["gpu"]["gpu0"] is Method.COUNTER and m.methods["gpu"]["gpu1"] is Method.UNAVAILABLE
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(devs[0], m), rel=1e-3, abs=0.05)
    assert green_log.text.count("gpu1: NVML failed on it at start") == 1


def test_counter_reset_counts_on(fake_nvml, green_log):
    (dev,) = fake_nvml.configure([{"counter_offset_mj": 10_000_000}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.01).start()
    try:
        meter.begin("w")
        busy_wait(0.3)
        dev.counter_offset_mj = 0  # driver reload: the counter restarts near zero
        busy_wait(0.3)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.method("gpu") is Method.COUNTER
    assert 0 < m.component_j("gpu") <= truth(dev, m) * 1.01 + dev.energy_between(dev.t0, m.end_s)
    assert "went backwards" in green_log.text


def test_cuda_visible_devices_maps_by_uuid(fake_nvml, monkeypatch):
    devs = fake_nvml.configure([{"profile_seed": s} for s in range(4)])
    # CUDA device 0 is NVML device 2 and CUDA device 1 is NVML device 0, named by UUID prefix
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{devs[2].uuid[:12]},{devs[0].uuid}")
    sensor = NvmlSensor("all", nvml=fake_nvml)
    assert sensor.devices == ["gpu0", "gpu1"]
    assert sensor.describe()["gpu0"].endswith(f"({devs[2].uuid})")
    m = one_window(sensor, 0.5)
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(devs[2], m), rel=1e-3, abs=0.05)
    assert m.joules["gpu"]["gpu1"] == pytest.approx(truth(devs[0], m), rel=1e-3, abs=0.05)
    # each DDP rank measures only its own device: LOCAL_RANK picks it under "auto"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert NvmlSensor("auto", nvml=fake_nvml).describe() == {"gpu1": f"Fake H100 ({devs[0].uuid})"}
    assert NvmlSensor("auto", cuda_indices=[0], nvml=fake_nvml).describe()["gpu0"].endswith(f"({devs[2].uuid})")


def test_cuda_visible_devices_integers_and_invalid_entries(fake_nvml, monkeypatch):
    devs = fake_nvml.configure(n=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1,bogus,0")  # CUDA stops at the bad entry
    sensor = NvmlSensor("all", nvml=fake_nvml)
    assert [v.split("(")[1][:-1] for v in sensor.describe().values()] == [devs[2].uuid, devs[1].uuid]
    # an index past the last GPU ends the list: it is not a UUID prefix ("3" named GPU-3f9e..., another job's GPU)
    devs = fake_nvml.configure([{"uuid": "GPU-0a1b2c3d-0000"}, {"uuid": "GPU-3f9e8d7c-0000"}])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert [v.split("(")[1][:-1] for v in NvmlSensor("all", nvml=fake_nvml).describe().values()] == [devs[0].uuid]


def test_a_device_named_twice_in_cuda_visible_devices_shows_none_as_in_cuda(fake_nvml, monkeypatch):
    """"1,1": CUDA (and torch) show no device for a repeated entry; it was one 200-W GPU measured twice, at 400 W."""
    devs = fake_nvml.configure(n=2)
    for repeated in ("1,1", f"0,{devs[1].uuid},1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", repeated)
        assert NvmlSensor("all", nvml=fake_nvml).devices == [], repeated


def test_a_window_shorter_than_the_sampling_period_has_a_peak_of_at_least_its_mean(fake_nvml):
    """No sampler tick inside it: its peak power was missing ({}) beside a mean of 300 W."""
    fake_nvml.configure([{"profile": [(1.0, 300.0)]}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)], period_s=0.5).start()
    try:
        time.sleep(0.05)
        meter.begin("w")
        time.sleep(0.01)
        m = meter.end("w")
    finally:
        meter.close()
    assert m.mean_power_w("gpu") == pytest.approx(300.0, rel=0.05)
    assert m.peak_power_w["gpu"] >= m.mean_power_w("gpu")


@pytest.mark.parametrize("counter", ["failing", "not supported"])
def test_an_energy_counter_failing_at_start_is_sampled_with_one_warning(fake_nvml, green_log, counter):
    """A counter that errs at start (UNKNOWN, no permission) switched to sampled power silently, while the same fault
    mid-run is said; one a GPU does not have (NOT_SUPPORTED) is sampled silently, as designed."""
    spec = {"profile": [(1.0, 250.0)]}
    spec.update({"faults": {"nvmlDeviceGetTotalEnergyConsumption": fake_nvml.NVML_ERROR_UNKNOWN}}
                if counter == "failing" else {"counter": False})
    (dev,) = fake_nvml.configure([spec])
    m = one_window(NvmlSensor("all", nvml=fake_nvml), 0.3)
    assert m.methods["gpu"]["gpu0"] is Method.SAMPLED
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(dev, m), rel=0.05)
    said = green_log.text.count("its energy counter failed at start")
    assert said == (1 if counter == "failing" else 0), green_log.text


def test_bad_gpu_selection_names_the_valid_choices(fake_nvml):
    fake_nvml.configure(n=2)
    with pytest.raises(ValueError, match=r"gpus=\[5\].*valid indices are \[0, 1\]"):
        NvmlSensor([5], nvml=fake_nvml)
    with pytest.raises(ValueError, match=r"gpus='some'.*\"auto\", \"all\""):
        NvmlSensor("some", nvml=fake_nvml)


def test_mig_instance_is_explained_and_unavailable(fake_nvml, green_log):
    fake_nvml.configure([{"mig": True}])
    meter = EnergyMeter([NvmlSensor("all", nvml=fake_nvml)]).start()
    try:
        meter.begin("w")
        m = meter.end("w")
    finally:
        meter.close()
    assert m.method("gpu") is Method.UNAVAILABLE
    assert "MIG instance" in green_log.text and "whole physical GPU" in green_log.text


def test_no_nvml_means_no_gpu_sensor_and_no_error(monkeypatch, tmp_path):
    import sys

    class Broken:
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    sensors = build_sensors("auto", rapl_root=tmp_path)
    assert [s.component for s in sensors] == ["cpu"]


def test_a_sensor_leaves_the_callers_nvml_initialised(fake_nvml):
    # NVML's init is reference-counted per process: closing a sensor must not shut down the caller's
    fake_nvml.configure(n=1)
    fake_nvml.nvmlInit()
    NvmlSensor("all", nvml=fake_nvml).close()
    assert fake_nvml._initialised


class _Ticked(EnergyMeter):
    """A meter whose sampler ticks are the test's (on the fake's work clock): nothing runs between them."""

    def _run(self) -> None:
        pass


def _ticked_run(fake, sensor, before_s: float, after_s: float, at_half_time) -> tuple:
    """A window over ``before_s`` + ``after_s`` of simulated work, ticked every 50 ms; ``at_half_time`` is called
    between, 25 ms after a tick (between a poll and the next)."""
    meter = _Ticked([sensor], period_s=0.05, clock=fake._now).start()
    try:
        meter.begin("w")
        for seconds, hook in ((before_s, at_half_time), (after_s, None)):
            for _ in range(round(seconds / 0.05)):
                fake.advance(0.05)
                meter.tick(fake._now())
            if hook is not None:
                fake.advance(0.025)
                hook()
        return meter.end("w")
    finally:
        meter.close()


@pytest.mark.parametrize("counter_poll_s", [1.0, 0.05])
def test_a_counter_read_a_little_low_once_is_not_taken_for_a_reset(fake_nvml, green_log, counter_poll_s):
    # amdsmi and NVML reads are not always monotone (ROCm/amdsmi#115): one read 1 J below the last, on a counter
    # 10 MJ since the driver loaded, once counted the whole 10 MJ again as energy "since the reset"
    (dev,) = fake_nvml.configure([{"profile_seed": 4, "counter_offset_mj": 10_000_000_000}], work_clock=True)
    real, low = fake_nvml.nvmlDeviceGetTotalEnergyConsumption, {"at": None, "last": 0}

    def counter(h):
        value = real(h)
        if low["at"] is not None and fake_nvml._now() >= low["at"]:
            low["at"] = None
            return low["last"] - 1000
        low["last"] = value
        return value

    fake_nvml.nvmlDeviceGetTotalEnergyConsumption = counter
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=counter_poll_s)
    m = _ticked_run(fake_nvml, sensor, 1.0, 2.0, lambda: low.update(at=fake_nvml._now()))
    assert low["at"] is None  # the low read was made
    assert m.method("gpu") is Method.COUNTER
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(dev, m), rel=1e-3, abs=0.05)
    assert "1.000 J below its last value" in green_log.text and "went backwards" not in green_log.text


def test_a_counter_reset_between_polls_keeps_the_energy_before_it(fake_nvml, green_log):
    # the counter restarts at 0 half a second after a poll (a driver reload): what it shows then is only what was
    # spent since the restart; the power read since the last poll covers the half second before (it was lost: -18 %)
    (dev,) = fake_nvml.configure([{"profile_seed": 4, "counter_offset_mj": 10_000_000_000}], work_clock=True)
    real, restart = fake_nvml.nvmlDeviceGetTotalEnergyConsumption, {"at": None}

    def counter(h):
        if restart["at"] is not None and fake_nvml._now() >= restart["at"]:
            return int(h.energy_between(restart["at"], fake_nvml._now()) * 1000)
        return real(h)

    fake_nvml.nvmlDeviceGetTotalEnergyConsumption = counter
    sensor = NvmlSensor("all", nvml=fake_nvml)  # the default poll, once a second
    m = _ticked_run(fake_nvml, sensor, 1.0, 2.0, lambda: restart.update(at=fake_nvml._now() + 0.5))
    assert m.method("gpu") is Method.COUNTER
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(dev, m), rel=0.01)
    assert "went backwards" in green_log.text


def test_one_slow_edge_read_on_a_busy_machine_keeps_the_edges_exact(fake_nvml):
    # a single edge read over 10 ms (a preemption on a loaded machine: CI) ended the edges' counter reads for the
    # rest of the run, and every window after it was interpolated from sampled power; three in a row still end them
    (dev,) = fake_nvml.configure([{"profile_seed": 3}])
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=60.0)
    meter = EnergyMeter([sensor], period_s=0.05).start()

    (gpu,) = sensor._gpus

    def edges(read_s: float, n: int) -> bool:  # n edge reads on the training thread, each taking read_s
        dev.counter_read_s = read_s
        for _ in range(n):
            with gpu.io:  # (as an edge takes it: the sampler is in no call on the device meanwhile)
                assert sensor._edge_poll(gpu, time.monotonic())
        dev.counter_read_s = 0.0
        return sensor.describe()["edges"].startswith("window edges read the counter")

    try:
        meter.begin("w")
        assert edges(0.0, 2)
        assert edges(0.02, 2) and edges(0.0, 1) and edges(0.02, 2) and edges(0.0, 1), "slow now and then: the counter"
        assert not edges(0.02, 20), "slow reads in a row: a slow driver, the training thread no longer waits"
    finally:
        meter.close()


def test_the_training_thread_never_waits_on_the_samplers_slow_library_calls(fake_nvml):
    # two GPUs whose counter reads take 0.3 s (a busy driver): the sampler makes them, and the window edges and
    # peeks on the training thread show the last reads instead of waiting for its calls to return (600 ms before)
    fake_nvml.configure([{"profile_seed": 1, "counter_read_s": 0.3}, {"profile_seed": 2, "counter_read_s": 0.3}])
    sensor = NvmlSensor("all", nvml=fake_nvml, counter_poll_s=0.0)  # a poll at every tick: the sampler always in one
    meter = EnergyMeter([sensor], period_s=0.05).start()
    waits = []
    try:
        meter.begin("w")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            t = time.perf_counter()
            meter.peek("w")
            meter.end("w", reopen=True)
            waits.append(time.perf_counter() - t)
            time.sleep(0.003)
    finally:
        meter.close()
    assert max(waits) < 0.1, sorted(waits)[-3:]


def test_a_gpu_whose_reads_hang_as_it_falls_off_the_bus_costs_no_wait_and_is_recorded_unavailable(fake_nvml, green_log):
    # GPU 1's reads hang 3 s, then fail GPU_IS_LOST: the edge that ends measuring waits at most settle_wait_s for
    # the sampler's call and records the device as failing (it waited 4 s, and recorded 'counter', before)
    devs = fake_nvml.configure([{"profile_seed": 1}, {"profile_seed": 2}])
    hang = threading.Event()
    real = fake_nvml.nvmlDeviceGetFieldValues, fake_nvml.nvmlDeviceGetTotalEnergyConsumption

    def hanging(i):
        def call(h, *args):
            if hang.is_set() and h is devs[1]:
                time.sleep(3.0)
                raise fake_nvml.NVMLError(fake_nvml.NVML_ERROR_GPU_IS_LOST)
            return real[i](h, *args)
        return call

    fake_nvml.nvmlDeviceGetFieldValues, fake_nvml.nvmlDeviceGetTotalEnergyConsumption = hanging(0), hanging(1)
    sensor = NvmlSensor("all", nvml=fake_nvml)
    meter = EnergyMeter([sensor], period_s=0.05).start()
    try:
        meter.begin("w")
        busy_wait(0.3)
        hang.set()
        time.sleep(0.2)  # the sampler is in a hanging call now
        t = time.perf_counter()
        meter.settle()
        m = meter.end("w")
        waited_s = time.perf_counter() - t
    finally:
        meter.close()
    assert waited_s < sensor.settle_wait_s + 0.3, waited_s
    assert m.methods["gpu"] == {"gpu0": Method.COUNTER, "gpu1": Method.UNAVAILABLE}
    assert m.joules["gpu"]["gpu0"] == pytest.approx(truth(devs[0], m), rel=1e-3, abs=0.05)
    assert "has not returned for" in green_log.text


def test_an_epoch_that_ends_while_reads_are_retried_logs_no_joules_for_that_gpu(fake_nvml, tmp_path):
    """NVML failing (retried, not yet lost) across an epoch's end: that epoch was logged `energy/gpu0_j` = 0.0,
    labelled `counter` (a 0 read as a measurement). Now the GPU is unread in that epoch (no per-GPU joules), the
    epoch after the recovery counts the gap from the counter and is unread too (it holds joules from before it: it
    was logged as a measurement, +191 % in the #6 probe), the run's method stays `counter` and its total the
    counter's."""
    from green_callbacks import EnergyTracker
    from green_callbacks.records import Kind

    (dev,) = fake_nvml.configure([{"profile_seed": 3}])
    calls = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage")
    tracker = EnergyTracker(gpus="all", measure_cpu=False, mlflow=False, output_dir=str(tmp_path))
    with tracker:
        t0 = tracker.meter.clock()
        with tracker.epoch(0):
            busy_wait(0.5)
        with tracker.epoch(1):
            busy_wait(0.3)
            for call in calls:
                dev.faults[call] = fake_nvml.NVML_ERROR_TIMEOUT
            busy_wait(1.2)  # the sampler's poll fails meanwhile
        with tracker.epoch(2):
            busy_wait(0.3)
            dev.faults.clear()
            busy_wait(1.5)  # a poll succeeds: the gap is counted
        t1 = tracker.meter.clock()
    epochs = [r for r in tracker.records if r.kind is Kind.EPOCH]
    assert [("gpu0" in r.unread) for r in epochs] == [False, True, True]
    assert {r.methods["gpu"] for r in epochs} == {"counter"}
    assert sum(r.components_j["gpu"] for r in tracker.records) == pytest.approx(dev.energy_between(t0, t1), rel=0.02)
    assert epochs[2].components_j["gpu"] > dev.energy_between(t0, t1) * 0.4  # the gap is in it
