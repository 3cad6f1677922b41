"""Measured peaks: positive, with the kernel that set each recorded, usable as a profile's hardware section."""
from pernode.measure.profile.hardware import measure_peaks
from pernode.measure.profile.profile_schema import _check_section, _HARDWARE_FIELDS


def test_measure_peaks_quick():
    hw = measure_peaks("cpu", quick=True)
    _check_section("hardware", hw, _HARDWARE_FIELDS)
    assert hw["device"] == "cpu" and hw["peak_source"] == "measured" and hw["memory_bytes"] > 2**30
    assert hw["peak_bandwidth_gbs"] > 0.1
    assert hw["measured_flops"]["fp32"] > 1e8
    assert set(hw["peak_flops"]) >= {"fp32", "bf16", "int8"}
    assert "torch.sum" in hw["kernels"]["bandwidth"] and "torch.mm fp32" in hw["kernels"]["fp32"]
    assert hw["peak_flops"]["int8"] is None or "_int_mm" in hw["kernels"]["int8"]
    if hw["peak_flops"]["bf16"] is None:  # no fast bf16: the measured value and a note remain
        assert any("bf16" in n for n in hw["notes"])


def test_a_slow_format_is_timed_once_past_the_budget(monkeypatch):
    import time

    import torch

    from pernode.measure.profile import hardware

    monkeypatch.setattr(hardware, "TIMING_BUDGET_S", 0.05)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    best, timings = hardware._time_best_s(slow, torch.device("cpu"), repeats=5, inner=1)
    assert timings == 1 and len(calls) == 2 and best >= 0.03  # the warm-up and one timing, not six calls
    calls.clear()
    best, timings = hardware._time_best_s(lambda: calls.append(1), torch.device("cpu"), repeats=5, inner=2)
    assert timings == 5 and len(calls) == 1 + 5 * 2  # fast: every repeat
