"""benchmarks/cuda_check.py, the script for a lent GPU: it finds the datasheet peaks by device name, and without
CUDA it says so and exits 0."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_check.py"


@pytest.fixture(scope="module")
def cuda_check():
    spec = importlib.util.spec_from_file_location("cuda_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peaks_are_found_by_device_name(cuda_check):
    assert cuda_check.published_peaks("NVIDIA H200")["bandwidth_tbs"] == 4.8
    assert cuda_check.published_peaks("NVIDIA H100 80GB HBM3")["bandwidth_tbs"] == 3.35
    assert cuda_check.published_peaks("NVIDIA L40S")["bandwidth_tbs"] == 0.864  # not the L4's row
    assert cuda_check.published_peaks("Tesla T4") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script measures when CUDA is here")
def test_without_cuda_it_says_so_and_exits_0(cuda_check, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cuda_check.py"])
    assert cuda_check.main() == 0
    assert "no CUDA device" in capsys.readouterr().out
