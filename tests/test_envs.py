"""pernode.envs: one vocabulary for kernel switches, read at each call, and clear errors for bad values."""
from __future__ import annotations

from pathlib import Path

import pytest

from pernode import envs
from pernode.envs import KernelChoice, QuantInput

SWITCHES = {"PERNODE_ATTENTION": envs.attention_kernel, "PERNODE_LAYER_OPS": envs.layer_ops_kernel,
            "PERNODE_DENSE_GEMV": envs.dense_gemv_kernel, "PERNODE_QUANT_KERNEL": envs.quant_kernel}


@pytest.mark.parametrize("name", SWITCHES)
def test_kernel_switches_share_one_vocabulary(name, monkeypatch):
    read = SWITCHES[name]
    monkeypatch.delenv(name, raising=False)
    assert read() is KernelChoice.NATIVE
    for value, choice in [("native", KernelChoice.NATIVE), ("reference", KernelChoice.REFERENCE),
                          ("Reference", KernelChoice.REFERENCE), ("off", KernelChoice.REFERENCE),
                          ("", KernelChoice.NATIVE)]:
        monkeypatch.setenv(name, value)
        assert read() is choice, value  # read at the call: no restart or reload needed
    monkeypatch.setenv(name, "fast")
    with pytest.raises(ValueError, match=rf"{name}='fast' is not a kernel choice: allowed native or reference"):
        read()


def test_quant_settings(monkeypatch):
    monkeypatch.delenv("PERNODE_QUANT_INPUT", raising=False)
    monkeypatch.delenv("PERNODE_QUANT_THREADS", raising=False)
    assert envs.quant_input() is None and envs.quant_threads() == 0  # None: the CPU decides
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "float")
    monkeypatch.setenv("PERNODE_QUANT_THREADS", "3")
    assert envs.quant_input() is QuantInput.FLOAT and envs.quant_threads() == 3
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "int4")
    monkeypatch.setenv("PERNODE_QUANT_THREADS", "-1")
    with pytest.raises(ValueError, match="PERNODE_QUANT_INPUT='int4'"):
        envs.quant_input()
    with pytest.raises(ValueError, match="PERNODE_QUANT_THREADS='-1'"):
        envs.quant_threads()


def test_paths_and_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("PERNODE_API_KEY", raising=False)
    monkeypatch.delenv("PERNODE_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("PERNODE_FLEET_STATE", raising=False)
    assert envs.api_key() is None
    assert envs.kernel_cache_dir() == Path.home() / ".cache" / "pernode" / "kernels"
    assert envs.fleet_state_path().name.startswith("pernode-fleet-")
    monkeypatch.setenv("PERNODE_API_KEY", "k")
    monkeypatch.setenv("PERNODE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("PERNODE_FLEET_STATE", str(tmp_path / "fleet.json"))
    assert envs.api_key() == "k" and envs.kernel_cache_dir() == tmp_path
    assert envs.fleet_state_path() == tmp_path / "fleet.json"
