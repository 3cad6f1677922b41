"""Measure this machine's peaks (bandwidth, fp32/bf16/int8 matmul) and print them beside published accelerators.

Usage: PYTHONPATH=src python benchmarks/hardware_peaks.py [--device cuda] [--out peaks.json]
"""
import argparse
import json

from rich.console import Console
from rich.table import Table

from pernode.measure.profile.accelerators import PUBLISHED_ACCELERATORS
from pernode.measure.profile.hardware import measure_peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="small sizes (tests); cache-resident, so optimistic")
    ap.add_argument("--out", default=None, help="write the hardware section as JSON")
    args = ap.parse_args()
    console = Console()
    with console.status("measuring peaks (a few seconds)"):
        hw = measure_peaks(args.device, quick=args.quick)
    table = Table(title=f"measured: {hw['name']}")
    for col in ("what", "peak", "kernel"):
        table.add_column(col)
    table.add_row("read bandwidth", f"{hw['peak_bandwidth_gbs']:.1f} GB/s", hw["kernels"]["bandwidth"])
    for key, flops in hw["measured_flops"].items():
        used = "" if hw["peak_flops"].get(key) else " (not used as a peak)"
        table.add_row(f"{key} matmul", "-" if flops is None else f"{flops / 1e9:.1f} GFLOP/s{used}",
                      hw["kernels"].get(key, ""))
    fp32 = hw["peak_flops"].get("fp32")
    if fp32:
        table.add_row("ridge (fp32)", f"{fp32 / (hw['peak_bandwidth_gbs'] * 1e9):.2f} FLOP/byte", "")
    console.print(table)
    for note in hw["notes"]:
        console.print(f"note: {note}")
    pub = Table(title="published (dense)")
    for col in ("accelerator", "memory GB", "TB/s", "bf16 TFLOP/s", "fp8 TFLOP/s", "int8 TOP/s", "bf16 ridge"):
        pub.add_column(col)
    for name, s in PUBLISHED_ACCELERATORS.items():
        pub.add_row(name, f"{s['memory_gb']}", f"{s['bandwidth_tbs']}", f"{s['bf16_tflops']}",
                    f"{s['fp8_tflops'] or '-'}", f"{s['int8_tops']}", f"{s['bf16_tflops'] / s['bandwidth_tbs']:.0f}")
    console.print(pub)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(hw, f, indent=2)


if __name__ == "__main__":
    main()
