"""On a real NVIDIA GPU (skipped without one): the counter and sampled paths agree on the same windows."""

from __future__ import annotations

import pytest


def real_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        pytest.skip(f"no NVIDIA GPU with NVML here ({exc})")
    return pynvml


@pytest.mark.gpu
def test_counter_and_sampled_agree_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    nvml = real_nvml()
    from green_callbacks.meter import EnergyMeter
    from green_callbacks.sensors import Method, NvmlSensor

    counter = NvmlSensor([0], nvml=nvml)
    sampled = NvmlSensor([0], nvml=nvml, use_counter=False)
    meter = EnergyMeter([counter], period_s=0.02).start()
    other = EnergyMeter([sampled], period_s=0.02).start()
    x = torch.randn(8192, 8192, device="cuda")
    try:
        for _ in range(3):
            meter.begin("w")
            other.begin("w")
            for _ in range(200):
                x = torch.tanh(x @ x / 8192)
            torch.cuda.synchronize()
            a, b = meter.end("w"), other.end("w")
            assert a.method("gpu") is Method.COUNTER and b.method("gpu") is Method.SAMPLED
            assert b.total_j == pytest.approx(a.total_j, rel=0.1)
    finally:
        meter.close()
        other.close()
