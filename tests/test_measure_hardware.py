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
