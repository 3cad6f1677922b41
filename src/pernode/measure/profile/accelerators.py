"""Published peaks of the accelerators a fleet can be priced on, from the vendors' datasheets.

All FLOP/s are dense (without the 2:4 sparsity the datasheets also quote, which doubles them). A missing format is
None. These are marketing peaks: measured matmuls reach roughly 60-80% of them, and measured memory bandwidth
roughly 80-90%; a projection that carries a profile's measured fraction of peak over (projection.py) accounts
for that. Memory "GB" is read as GiB: HBM stacks are binary-sized (an "80GB" H100 reports 80 GiB).
"""
from __future__ import annotations

TB = 1e12

PUBLISHED_ACCELERATORS: dict[str, dict] = {
    "H100 SXM": {
        "memory_gb": 80, "bandwidth_tbs": 3.35,
        "fp32_tflops": 67.0, "bf16_tflops": 989.4, "fp8_tflops": 1978.9, "int8_tops": 1978.9,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5), https://www.nvidia.com/en-us/data-center/h100/",
    },
    "H200 SXM": {
        "memory_gb": 141, "bandwidth_tbs": 4.8,
        "fp32_tflops": 67.0, "bf16_tflops": 989.4, "fp8_tflops": 1978.9, "int8_tops": 1978.9,
        "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM), https://www.nvidia.com/en-us/data-center/h200/",
    },
    "A100 80GB SXM": {
        "memory_gb": 80, "bandwidth_tbs": 2.039,
        "fp32_tflops": 19.5, "bf16_tflops": 312.0, "fp8_tflops": None, "int8_tops": 624.0,
        "source": "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM), https://www.nvidia.com/en-us/data-center/a100/",
    },
    "L4": {
        "memory_gb": 24, "bandwidth_tbs": 0.300,
        "fp32_tflops": 30.3, "bf16_tflops": 121.0, "fp8_tflops": 242.5, "int8_tops": 242.5,
        "source": "NVIDIA L4 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/l4/",
    },
    "L40S": {
        "memory_gb": 48, "bandwidth_tbs": 0.864,
        "fp32_tflops": 91.6, "bf16_tflops": 362.05, "fp8_tflops": 733.0, "int8_tops": 733.0,
        "source": "NVIDIA L40S GPU datasheet, https://www.nvidia.com/en-us/data-center/l40s/",
    },
    "MI300X": {
        "memory_gb": 192, "bandwidth_tbs": 5.3,
        "fp32_tflops": 163.4, "bf16_tflops": 1307.4, "fp8_tflops": 2614.9, "int8_tops": 2614.9,
        "source": "AMD Instinct MI300X accelerator data sheet, "
                  "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
    },
}


def get_accelerator(name: str) -> dict:
    """Look an accelerator up by name, ignoring case, spaces and dashes ("h100-sxm" finds "H100 SXM")."""
    def key(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    for known, spec in PUBLISHED_ACCELERATORS.items():
        if key(known) == key(name):
            return {"name": known, **spec}
    raise ValueError(f"accelerator {name!r}: not in the published table; one of "
                     f"{', '.join(PUBLISHED_ACCELERATORS)}")


def hardware_section(name: str) -> dict:
    """The profile's `hardware` section for a published accelerator (peaks in FLOP/s and GB/s)."""
    spec = get_accelerator(name)

    def flops(key: str) -> float | None:
        return None if spec[key] is None else spec[key] * TB

    return {
        "name": spec["name"], "device": "projected", "memory_bytes": int(spec["memory_gb"] * 2**30),
        "peak_bandwidth_gbs": spec["bandwidth_tbs"] * 1000.0,
        "peak_flops": {"fp32": flops("fp32_tflops"), "bf16": flops("bf16_tflops"), "fp8": flops("fp8_tflops"),
                       "int8": flops("int8_tops")},
        "peak_source": spec["source"],
    }
