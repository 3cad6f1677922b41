"""Every `PERNODE_*` environment variable pernode reads, in one place. Nothing else in pernode reads the environment
for its own settings.

When: each function reads its variable when it is called; nothing is cached here, so `monkeypatch.setenv` takes
effect at the next call. Layers on the decode path read theirs once, when they are built or loaded (dense
`Linear`, `RMSNorm`, `RotaryEmbedding`, `Attention`, `QuantLinear.post_load`): a step makes a few hundred such
calls and a read costs microseconds. Direct calls of the kernel functions read the variable each time.

Kernel switches share one vocabulary, `native` (the default: the C++/fused kernel where it applies) or
`reference` (the plain-torch path the kernel is held to); `off` is accepted for `reference`:

  PERNODE_ATTENTION      paged attention (kernels/attention.py)
  PERNODE_LAYER_OPS      RMSNorm and rotary embedding (kernels/layer_ops.py)
  PERNODE_DENSE_GEMV     fp32 decode GEMV of dense linears (kernels/dense_linear.py)
  PERNODE_QUANT_KERNEL   weight-only int8/int4 linear (kernels/quant_linear.py)

Other settings:

  PERNODE_QUANT_INPUT    int8 | float: whether the int4 GEMV quantizes x to int8 per 32 values (default: int8 where
                         the CPU has AVX-512 VNNI, float elsewhere; int8 uses AVX2's integer path without it)
  PERNODE_QUANT_THREADS  threads of the small-batch quantized and dense GEMVs; 0 (default): torch's thread count
  PERNODE_GEMM_INPUT     int16 | float: whether int4 GEMMs (prefill chunks, large decode batches) quantize x to
                         int16 per 32 values and multiply integers (default where the CPU has AVX2 without AVX-512:
                         int16, csrc/gemm_int4_int16x_avx2.h; elsewhere float, the only choice there)
  PERNODE_GEMM_FROM_ROWS rows from which quantized linears run the GEMM instead of the GEMV (default: measured on
                         this CPU per layer shape, see kernels/gemm_dispatch.py)
  PERNODE_PANEL_FROM_ROWS off | measure | N: rows from which int4 linears with int8 x run the panel kernel
                         instead of the GEMV (up to 64 rows: decode steps, and prompt chunks the GEMV would take);
                         measure (default): the crossover measured per shape
  PERNODE_DECODE_INT8_ROWS N: the rows up to which decode steps (no sequence with more than 8 query tokens) run
                         the int8-x GEMV/panel kernels of int4 layers instead of the GEMM or float x (default:
                         measured per layer shape against the float-x path, up to 64)
  PERNODE_REMEASURE_KERNELS 1: measure the GEMV/GEMM crossovers again and replace the cached ones (default 0)
  PERNODE_KERNEL_CACHE   folder of compiled kernels (default ~/.cache/pernode/kernels)
  PERNODE_COMPILE_CACHE  torch.compile's (inductor's) cache under --compile (default ~/.cache/pernode/inductor);
                         it becomes TORCHINDUCTOR_CACHE_DIR when the engine compiles
  PERNODE_API_KEY        `pernode serve`'s API key when --api-key is not given (default: none)
  PERNODE_FLEET_STATE    file where `pernode fleet` keeps its deployment's state (default, in a private 0700
                         folder: $XDG_RUNTIME_DIR/pernode/, else ~/.cache/pernode/fleet/, pernode-fleet-<uid>.json)

A value outside a variable's vocabulary raises ValueError naming the variable and what it allows.
"""
from __future__ import annotations

import enum
import os
from pathlib import Path


class KernelChoice(str, enum.Enum):
    NATIVE = "native"
    REFERENCE = "reference"

    def __str__(self) -> str:
        return self.value


class GemmInput(str, enum.Enum):
    INT16 = "int16"
    FLOAT = "float"

    def __str__(self) -> str:
        return self.value


class QuantInput(str, enum.Enum):
    INT8 = "int8"
    FLOAT = "float"

    def __str__(self) -> str:
        return self.value


_KERNEL_ALIASES = {"": KernelChoice.NATIVE, "native": KernelChoice.NATIVE, "reference": KernelChoice.REFERENCE,
                   "off": KernelChoice.REFERENCE}


def _raw(name: str) -> str:
    return os.environ.get(name, "")


def _kernel_choice(name: str) -> KernelChoice:
    value = _raw(name)
    choice = _KERNEL_ALIASES.get(value.strip().lower())
    if choice is None:
        raise ValueError(f"{name}={value!r} is not a kernel choice: allowed native or reference (or unset)")
    return choice


def attention_kernel() -> KernelChoice:
    """PERNODE_ATTENTION: `reference` forces plain-torch paged attention on every device."""
    return _kernel_choice("PERNODE_ATTENTION")


def layer_ops_kernel() -> KernelChoice:
    """PERNODE_LAYER_OPS: `reference` keeps RMSNorm and rotary embedding in plain torch."""
    return _kernel_choice("PERNODE_LAYER_OPS")


def fused_decode_kernel() -> KernelChoice:
    """PERNODE_FUSED_DECODE: `reference` runs decode-sized steps layer by layer in Python instead of the one C++
    call over the whole decoder stack."""
    return _kernel_choice("PERNODE_FUSED_DECODE")


def dense_gemv_kernel() -> KernelChoice:
    """PERNODE_DENSE_GEMV: `reference` (or `off`) keeps dense linears on F.linear at decode."""
    return _kernel_choice("PERNODE_DENSE_GEMV")


def sparse_kernel() -> KernelChoice:
    """PERNODE_SPARSE_KERNEL: `reference` serves a sparse checkpoint's projections dense (decompressed at load)
    even where the bitmask GEMV measured faster."""
    return _kernel_choice("PERNODE_SPARSE_KERNEL")


def quant_kernel() -> KernelChoice:
    """PERNODE_QUANT_KERNEL: `reference` dequantizes and multiplies in plain torch instead of the C++ GEMV."""
    return _kernel_choice("PERNODE_QUANT_KERNEL")


def quant_input() -> QuantInput | None:
    """PERNODE_QUANT_INPUT: `int8` or `float` x in the int4 GEMV; None (unset): the CPU decides
    (kernels/quant_linear.int8_input_max_rows)."""
    value = _raw("PERNODE_QUANT_INPUT").strip().lower()
    if not value:
        return None
    try:
        return QuantInput(value)
    except ValueError:
        raise ValueError(f"PERNODE_QUANT_INPUT={value!r} is not allowed: allowed int8 or float (or unset)") from None


def gemm_input() -> GemmInput | None:
    """PERNODE_GEMM_INPUT: `int16` or `float` x in int4 GEMMs; None (unset): the CPU decides
    (kernels/quant_linear.QuantLinear.post_load)."""
    value = _raw("PERNODE_GEMM_INPUT").strip().lower()
    if not value:
        return None
    try:
        return GemmInput(value)
    except ValueError:
        raise ValueError(f"PERNODE_GEMM_INPUT={value!r} is not allowed: allowed int16 or float (or unset)") from None


def quant_threads() -> int:
    """PERNODE_QUANT_THREADS: threads of the small-batch GEMVs; 0 (default) means torch's intra-op thread count."""
    value = _raw("PERNODE_QUANT_THREADS")
    try:
        threads = int(value or "0")
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(f"PERNODE_QUANT_THREADS={value!r} is not allowed: allowed an integer >= 0 (or unset)")
    return threads


def _rows_setting(name: str) -> int | None:
    value = _raw(name).strip()
    if not value:
        return None
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"{name}={value!r} is not allowed: allowed an integer >= 1 (or unset)")
    return rows


def gemm_from_rows() -> int | None:
    """PERNODE_GEMM_FROM_ROWS: a fixed GEMV/GEMM crossover for quantized linears; None (unset): measure it."""
    return _rows_setting("PERNODE_GEMM_FROM_ROWS")


def decode_int8_rows() -> int | None:
    """PERNODE_DECODE_INT8_ROWS: fixed rows up to which decode steps run the int8-x kernels; None: measure."""
    return _rows_setting("PERNODE_DECODE_INT8_ROWS")


PANEL_MEASURE = -1  # panel_from_rows(): measure the crossover
PANEL_OFF = 0  # panel_from_rows(): no panel kernel


def panel_from_rows() -> int | None:
    """PERNODE_PANEL_FROM_ROWS: unset: None, measured (kernels/quant_linear.QuantLinear.panel_from_rows);
    "off": no panel kernel (PANEL_OFF); "measure": measure the GEMV/panel crossover (PANEL_MEASURE); an integer
    >= 1: that crossover. Unset measures it too. The panel never takes a prompt chunk off the GEMM (its int8
    activations would flip near-tie greedy answers, as the chat question "What is the capital of France?" showed):
    QuantLinear.gemm_from_rows stays the GEMV's crossover."""
    value = _raw("PERNODE_PANEL_FROM_ROWS").strip().lower()
    if value == "":
        return None
    if value == "off":
        return PANEL_OFF
    if value == "measure":
        return PANEL_MEASURE
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"PERNODE_PANEL_FROM_ROWS={value!r} is not allowed: allowed off, measure or an integer >= 1 "
                         "(or unset: measured)")
    return rows


def remeasure_kernels() -> bool:
    """PERNODE_REMEASURE_KERNELS: 1 measures kernel crossovers again instead of reading the cache; 0/unset reads it."""
    value = _raw("PERNODE_REMEASURE_KERNELS").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"PERNODE_REMEASURE_KERNELS={value!r} is not allowed: allowed 1 or 0 (or unset)")


def kernel_cache_dir() -> Path:
    """PERNODE_KERNEL_CACHE: where compiled kernels live, else ~/.cache/pernode/kernels."""
    value = _raw("PERNODE_KERNEL_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "pernode" / "kernels"


def compile_cache_dir() -> Path:
    """PERNODE_COMPILE_CACHE: where torch.compile keeps compiled graphs between runs, else ~/.cache/pernode/inductor."""
    value = _raw("PERNODE_COMPILE_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "pernode" / "inductor"


def omp_num_threads() -> int | None:
    """OMP_NUM_THREADS as a thread count the user chose for this process; None when unset or not a number >= 1."""
    try:
        value = int(_raw("OMP_NUM_THREADS"))
    except ValueError:
        return None
    return value if value >= 1 else None


def api_key() -> str | None:
    """PERNODE_API_KEY: the server's API key when none is given explicitly; None when unset or empty."""
    return _raw("PERNODE_API_KEY") or None


def take_api_key() -> str | None:
    """PERNODE_API_KEY read and removed from this process's environment, so that the processes it starts (a local
    Ray's) do not inherit it: how a detached fleet's owner process receives its key."""
    return os.environ.pop("PERNODE_API_KEY", "") or None


def fleet_state_path() -> Path:
    """PERNODE_FLEET_STATE: the fleet's state file, else pernode-fleet-<uid>.json in a folder only this user
    reaches: $XDG_RUNTIME_DIR/pernode (when XDG_RUNTIME_DIR is set), else ~/.cache/pernode/fleet. Never the
    shared system temp folder."""
    value = _raw("PERNODE_FLEET_STATE")
    if value:
        return Path(value)
    runtime = _raw("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "pernode" if runtime else Path.home() / ".cache" / "pernode" / "fleet"
    return folder / f"pernode-fleet-{os.getuid()}.json"
