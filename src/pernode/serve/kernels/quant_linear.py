"""Weight-only quantized linear layers: int8/int4 weights (per group), float activations.

Weight-only layers call the C++ kernels in csrc/quant_linear.h (built by kernels/jit.py); `woq_linear_reference`
is the plain-torch result they are held to, and the fallback where they cannot build. Each call picks one of two
kernels by its row count, from the crossover measured for the layer's shape on this CPU (gemm_dispatch.py):
decode-sized steps run the GEMV, which streams the packed weights (for int4 it quantizes x to int8 per 32-value
block and multiplies integers with VNNI, as llama.cpp's Q8 activations do; int8 weights and
`PERNODE_QUANT_INPUT=float` keep x in fp32; input_precision.py decides); int4 calls with int8 x from a second
(measured) crossover on, up to PANEL_MAX_ROWS rows, run `woq_panel_gemm`, the same int8-x products register-blocked
over rows, so each weight is unpacked once per call instead of once per 8 rows, and the fused decoder's decode steps
keep them past the GEMM crossover for as long as they measured faster (decode_int8_max_rows); compute-bound steps
(prefill chunks) run `woq_gemm`, dequantized tiles through a GEMM in the activations' dtype (bf16 on CPUs that
compute it natively), or `woq_gemm_int16x`, x as int16 per 32 values and the stored integers multiplied as such, for
int4 layers on AVX2 CPUs without AVX-512 and int8 layers (the Q8_0 lm_head) on AVX-512 VNNI (int16_gemm_applies).
W8A8 layers (int8 activations too) are in w8a8_linear.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pernode import envs
from pernode.envs import KernelChoice
from pernode.quant_format import QuantScheme, dequantize, dequantize_float_min, pack_int4, unpack_int4
from pernode.serve.kernels.gemm_dispatch import NEVER, LinearShape, gemm_from_rows
from pernode.serve.kernels.input_precision import (ACT_BLOCK, FLOAT_GEMV_MAX_ROWS, int8_input_max_rows,  # noqa: F401
                                                  int16_gemm_applies, quantize_input_blocks)
from pernode.serve.kernels.jit import build_path, load_extension
from pernode.serve.kernels.w8a8_linear import W8A8Linear

SOURCE = "quant_linear.cpp"
QPARAM_BUFFERS = ("weight_scale", "weight_min")  # float qparams: kept in fp32 whatever dtype the model runs in

# The int4 panel kernel (csrc/int4_panel_gemm.h) serves decode-sized steps only, up to the fused decoder stack's
# rows (models/fused_decode.MAX_ROWS); prefill chunks keep the GEMM and its bf16 activations' numbers.
PANEL_MAX_ROWS = 64
# Timed on one layer with its weights warm in L2, the panel wins from 4 rows; in a model's step, weights streaming,
# the default model's decode (1 thread, Zen 4) took 1.20x / 1.31x / 1.10x / 1.04x the time at 4-7 sequences with the
# panel from 4 rows, 1.02x at 8 (docs/threads.md). So a measured crossover starts at the GEMV's second pass.
PANEL_MEASURED_MIN_ROWS = 9
# Decode steps on a CPU that caps int8 x (AVX2) keep it up to the float-x crossover; without the panel kernel, at
# most six 8-row GEMV passes (csrc/gemv_int8x_avx2.h): two-thread decode steps took 0.73x / 0.87x / 0.85-0.91x a
# 16-row cap's time at 24 / 32 / 48 sequences (docs/threads.md).
DECODE_INT8_MAX_ROWS = 6 * FLOAT_GEMV_MAX_ROWS


def load_kernel() -> Callable | None:
    """`torch.ops.pernode.woq_linear`, building it if needed; None if it can't be built (or
    PERNODE_QUANT_KERNEL=reference)."""
    if envs.quant_kernel() is KernelChoice.REFERENCE:
        return None
    return torch.ops.pernode.woq_linear if load_extension(SOURCE) else None


def build_kernels() -> Path | None:
    """Build the kernel now (e.g. from the Makefile) and return its build folder, or None if it failed."""
    return build_path(SOURCE)


# ---- weight-only ------------------------------------------------------------------------------------------------
def unpacked_weight(weight: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """Signed integer values [N, K] (int8) from the stored int8 weight or int4 words."""
    return weight if num_bits == 8 else unpack_int4(weight, in_features)


def dequantize_layer_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                            num_bits: int, group_size: int | None, in_features: int,
                            weight_min: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [N, K] of a stored weight: integer zero point (compressed-tensors) or float min (GGUF) form."""
    q = unpacked_weight(weight, num_bits, in_features)
    if weight_min is not None:
        return dequantize_float_min(q, scale, weight_min, num_bits, group_size)
    return dequantize(q, scale, zero_point, group_size)


def woq_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                         num_bits: int, group_size: int | None, quantize_input: bool = False,
                         weight_min: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: dequantize the whole weight to fp32 (and x per block to int8 if asked), then a matmul."""
    w = dequantize_layer_weight(weight, scale, zero_point, num_bits, group_size, x.shape[-1], weight_min)
    x = quantize_input_blocks(x) if quantize_input else x.float()
    return F.linear(x, w)


def zero_term(scale: torch.Tensor, zero_point: torch.Tensor | None, num_bits: int,
              weight_min: torch.Tensor | None = None) -> torch.Tensor | None:
    """-(offset + zero_point) * scale: the per-group term the kernel adds times the group's sum of x; None without a
    zero point (the kernel then applies int4's offset itself, which lets its GEMV fold it into the x side).

    The kernel multiplies raw stored integers; int4 words hold q + 8, so offset is 8 for int4 and 0 for int8. The
    float-min form (w = scale * (q + 2^(b-1)) + min) gives min itself for int4 (the kernel multiplies u = q + 8)
    and min + 128 * scale for int8 (it multiplies q)."""
    if weight_min is not None:
        return (weight_min.float() if num_bits == 4 else weight_min.float() + 128.0 * scale.float()).contiguous()
    if zero_point is None:
        return None
    return (-((8.0 if num_bits == 4 else 0.0) + zero_point.float()) * scale.float()).contiguous()


def fp16_if_exact(scale: torch.Tensor, term: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, term) in fp16 if both hold exactly the same values there, else as given (fp32)."""
    halves = [t if t is None else t.half() for t in (scale, term)]
    if all(t is None or torch.equal(h.float(), t) for t, h in zip((scale, term), halves)):
        return halves[0], halves[1]
    return scale, term


class QuantLinear(nn.Module):
    """Weight-only int8/int4 linear; tensors named as compressed-tensors checkpoints name them."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = 1 if scheme.group_size is None else in_features // scheme.group_size
        if scheme.num_bits == 4:
            self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, dtype=torch.int32,
                                                              device=device))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        if scheme.float_min:  # GGUF Q4_1/Q4_K: a float min per group instead of an integer zero point
            self.register_buffer("weight_min", torch.zeros(out_features, groups, device=device))
            self.weight_zero_point = None
        elif not scheme.symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8,
                                                                  device=device))
        else:
            self.weight_zero_point = None
        if not scheme.float_min:
            self.weight_min = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._scale: torch.Tensor | None = None
        self._zero_term: torch.Tensor | None = None
        self._gemm_from_rows: dict[torch.dtype, int] = {}
        self._panel_from_rows: dict[torch.dtype, int] = {}
        self._decode_int8_rows: dict[torch.dtype, int] = {}

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the float qparams: GGUF's fp16 scales and mins would lose 3 bits each.
        # They keep fp32 and only follow the device.
        kept = {name: getattr(self, name) for name in QPARAM_BUFFERS if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                moved = (torch.empty_like(after, dtype=torch.float32) if before.is_meta or after.is_meta
                         else before.to(device=after.device, dtype=torch.float32))
                setattr(self, name, moved)
        return self

    @property
    def qweight(self) -> torch.Tensor:
        return self.weight_packed if self.scheme.num_bits == 4 else self.weight

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Store integer values q [N, K] (signed) with their qparams (`zero`: the float min in the float-min form)."""
        self.qweight.copy_(pack_int4(q) if self.scheme.num_bits == 4 else q)
        self.weight_scale.copy_(scale)
        if self.weight_zero_point is not None:
            self.weight_zero_point.copy_(zero)
        if self.weight_min is not None:
            self.weight_min.copy_(zero)
        self.post_load()

    def post_load(self) -> None:
        """Derive what the kernel reads (fp32 scales, the zero term) once the stored tensors are in place."""
        self._scale = self.weight_scale.float().contiguous()
        self._zero_term = zero_term(self._scale, self.weight_zero_point, self.scheme.num_bits, self.weight_min)
        self._int8_max_rows = int8_input_max_rows(self.scheme.num_bits, self.in_features, self.scheme.group_size)
        self._int8_input = self._int8_max_rows > 0
        # A decode step calls ~120 of these layers: resolve the kernel and its constant operands once, not per call.
        # PERNODE_QUANT_THREADS: 1 is the robust choice on a CPU shared with other busy processes (see the kernel).
        self._op = load_kernel() if self.qweight.device.type == "cpu" else None
        self._gemm = torch.ops.pernode.woq_gemm if self._op is not None else None
        self._gemm_int16 = (torch.ops.pernode.woq_gemm_int16x
                            if self._op is not None and int16_gemm_applies(self.scheme.num_bits, self.in_features,
                                                                           self.scheme.group_size) else None)
        # The panel kernel multiplies what the int8-x GEMV does (int4 weights where x is quantized: every GEMV call
        # with VNNI, calls within the cap on AVX2) and serves decode-sized calls and the fused decoder's decode steps;
        # prefill chunks keep the GEMV/GEMM crossover, so a prompt the GEMM takes keeps its float numbers.
        self._panel = (torch.ops.pernode.woq_panel_gemm
                       if self._op is not None and self.scheme.num_bits == 4 and self._int8_max_rows > 0 else None)
        layout = (self.scheme.num_bits, self.scheme.group_size or 0, envs.quant_threads())
        self._float_op_args = (self.qweight, self._scale, self._zero_term, *layout)
        self._op_args = self._float_op_args
        if self._int8_input:  # the int8-x GEMV reads fp16 qparams where they are exact (GGUF's are): fewer bytes
            self._op_args = (self.qweight, *fp16_if_exact(self._scale, self._zero_term), *layout)
        self._gemm_from_rows = {}
        self._panel_from_rows = {}
        self._decode_int8_rows = {}

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_layer_weight(self.qweight, self.weight_scale, self.weight_zero_point, self.scheme.num_bits,
                                       self.scheme.group_size, self.in_features, self.weight_min)

    # ---- GEMV or GEMM -----------------------------------------------------------------------------------------
    def quantizes_input(self, rows: int) -> bool:
        """Whether a GEMV call with `rows` rows quantizes x to int8 (int8_input_max_rows)."""
        return rows <= self._int8_max_rows

    def decode_int8_max_rows(self, dtype: torch.dtype) -> int:
        """Up to how many rows a decode step (no sequence with more than FLOAT_GEMV_MAX_ROWS query tokens: decodes
        and speculative verification, models/fused_decode.py) runs the int8-x kernels (the GEMV, from its crossover
        the panel kernel) instead of the GEMM, where that is measured faster than the GEMM with float x, at most
        PANEL_MAX_ROWS; where int8 x is capped (AVX2), past the cap for as long as it beats the float-x path (GEMV
        or GEMM), at most DECODE_INT8_MAX_ROWS without the panel kernel. PERNODE_DECODE_INT8_ROWS fixes it (up to
        PANEL_MAX_ROWS). Prefill chunks keep the GEMV/GEMM crossover (and the cap), so a prompt's numbers stay
        float. Without int8 x: 0."""
        cap = self._int8_max_rows
        if cap == 0 or self._op is None:
            return cap
        rows = self._decode_int8_rows.get(dtype)
        if rows is None:
            rows = envs.decode_int8_rows()
            if rows is None and self.panel_from_rows(dtype) <= PANEL_MAX_ROWS:  # GEMV, then panel, against float x
                rows = gemm_from_rows(self._shape(dtype, "int8-x gemv+panel/float x"), SOURCE, self._run_int8_decode,
                                      self._run_float_x, gemm_setting=False) - 1
            elif rows is None and cap < NEVER:
                rows = min(DECODE_INT8_MAX_ROWS, gemm_from_rows(self._shape(dtype, "int8-x gemv/float x"), SOURCE,
                                                                self._run_int8_gemv, self._run_float_x,
                                                                gemm_setting=False) - 1)
            elif rows is None:  # every GEMV call has int8 x and there is no panel kernel: the GEMV's own crossover
                rows = self.gemm_from_rows(dtype) - 1
            floor = min(cap, self.gemm_from_rows(dtype) - 1)  # no fewer rows than other calls give the GEMV
            rows = self._decode_int8_rows[dtype] = max(floor, min(rows, PANEL_MAX_ROWS))
        return rows

    def step_kernels(self, dtype: torch.dtype, rows: int, decode: bool) -> tuple[bool, int]:
        """(int8 x, GEMM from rows) for a fused-decoder step: decode steps keep the int8-x kernels to
        decode_int8_max_rows; a prompt chunk past FLOAT_GEMV_MAX_ROWS tokens runs the GEMM (float x)."""
        int8_x, gemm_rows = self.quantizes_input(rows), self.gemm_from_rows(dtype)
        if decode and rows <= self.decode_int8_max_rows(dtype):  # measured faster than float x or the GEMM
            return True, max(gemm_rows, rows + 1)
        if not decode and int8_x and rows > FLOAT_GEMV_MAX_ROWS:
            return int8_x, min(gemm_rows, rows)
        return int8_x, gemm_rows

    @property
    def gemm_takes_int16(self) -> bool:
        """Whether this layer's GEMM quantizes x to int16 (int16_gemm_applies)."""
        return self._gemm_int16 is not None

    def gemv_args(self, rows: int, int8_x: bool | None = None) -> tuple:
        """The GEMV's operands after x for a call with `rows` rows (or, given, with int8 x or not): fp16 qparams for
        the int8-x GEMV where exact."""
        return self._op_args if (self.quantizes_input(rows) if int8_x is None else int8_x) else self._float_op_args

    def _run_int8_gemv(self, x2: torch.Tensor) -> torch.Tensor:
        return self._op(x2, *self._op_args, True)

    def _run_int8_decode(self, x2: torch.Tensor) -> torch.Tensor:
        """What a decode step with int8 x runs past the cap: the GEMV, or from its crossover the panel kernel."""
        if x2.shape[0] >= self.panel_from_rows(x2.dtype):
            return self._run_panel(x2)
        return self._run_int8_gemv(x2)

    def _run_float_x(self, x2: torch.Tensor) -> torch.Tensor:
        """What a call with float x runs: the float-x op (GEMV, tiled matmul past its rows) or, from the crossover, the
        GEMM."""
        if x2.shape[0] >= self.gemm_from_rows(x2.dtype):
            return self._run_gemm(x2)
        return self._op(x2, *self._float_op_args, False)

    def _run_gemv(self, x2: torch.Tensor) -> torch.Tensor:
        rows = x2.shape[0]
        return self._op(x2, *self.gemv_args(rows), self.quantizes_input(rows))

    def _run_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        gemm_x = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
        if self._gemm_int16 is not None:
            return self._gemm_int16(gemm_x, self.qweight, self._scale, self._zero_term, *self._op_args[4:6])
        return self._gemm(gemm_x, self.qweight, self._scale, self._zero_term, *self._op_args[3:5])  # fp32 qparams

    def _run_panel(self, x2: torch.Tensor) -> torch.Tensor:
        return self._panel(x2, self.qweight, self._op_args[1], self._op_args[2], self._op_args[4], self._op_args[5])

    def _run_decode(self, x2: torch.Tensor) -> torch.Tensor:
        """The kernel below the GEMM crossover: the GEMV, or from its own crossover on the panel kernel."""
        rows = x2.shape[0]
        if rows <= PANEL_MAX_ROWS and rows >= self.panel_from_rows(x2.dtype) and self.quantizes_input(rows):
            return self._run_panel(x2)
        return self._run_gemv(x2)

    def _shape(self, dtype: torch.dtype, kernels: str) -> LinearShape:
        if self._gemm_int16 is not None and kernels.endswith("gemm"):
            kernels = kernels.removesuffix("gemm") + "int16-x gemm"
        if 0 < self._int8_max_rows < NEVER:
            kernels += f" (int8 x up to {self._int8_max_rows} rows)"
        return LinearShape(self.out_features, self.in_features, self.scheme.num_bits, self.scheme.group_size or 0,
                           self._zero_term is not None, self._int8_input, dtype,
                           envs.quant_threads() or torch.get_num_threads(), kernels)

    def panel_from_rows(self, dtype: torch.dtype) -> int:
        """Row count from which calls with int8 x of `dtype` run the panel kernel instead of the GEMV (up to
        PANEL_MAX_ROWS; NEVER where there is none, it never wins below that, or it is off). Unset
        PERNODE_PANEL_FROM_ROWS: measured. Prefill chunks reach it only below the GEMV/GEMM crossover, where their x
        is int8 for the GEMV too; decode steps up to decode_int8_max_rows."""
        rows = self._panel_from_rows.get(dtype)
        if rows is None:
            setting = envs.panel_from_rows()
            if self._panel is None or setting == envs.PANEL_OFF:
                rows = NEVER
            elif setting is None or setting == envs.PANEL_MEASURE:  # both with int8 x
                rows = max(PANEL_MEASURED_MIN_ROWS, gemm_from_rows(
                    self._shape(dtype, "gemv/panel"), SOURCE, self._run_int8_gemv, self._run_panel, gemm_setting=False))
            else:
                rows = setting
            rows = rows if rows <= PANEL_MAX_ROWS else NEVER
            self._panel_from_rows[dtype] = rows
        return rows

    def gemm_from_rows(self, dtype: torch.dtype) -> int:
        """Row count from which calls with x of `dtype` run the GEMM (measured once per shape, see gemm_dispatch):
        the GEMV against the GEMM, so prefill chunks past it keep the GEMM's float x whatever the panel kernel does
        for decode steps (decode_int8_max_rows)."""
        rows = self._gemm_from_rows.get(dtype)
        if rows is None:
            rows = self._gemm_from_rows[dtype] = gemm_from_rows(self._shape(dtype, "gemv/gemm"), SOURCE,
                                                                self._run_gemv, self._run_gemm)
        return rows

    def calibrate(self, dtype: torch.dtype) -> None:
        """Settle the GEMV/GEMM crossover for x of `dtype` now (at load), not in the first step."""
        if self._scale is None:
            self.post_load()
        if self._op is not None:
            self.gemm_from_rows(dtype)
            self.decode_int8_max_rows(dtype)

    def kernel_switch_rows(self, dtype: torch.dtype) -> list[int]:
        """Row counts from which a call with x of `dtype` runs another kernel, whose accumulation order differs:
        the measured GEMM crossover, the panel kernel's (int4, int8 x) below it, the end of int8 x where it is capped
        (for prefill chunks, and further on for decode steps), and for float x the op's own switch to a tiled fp32
        matmul past FLOAT_GEMV_MAX_ROWS. Below the first, each row is computed alike whatever the rows beside it (the
        panel kernel too: its rows share no accumulator)."""
        if self._op is None:
            return []
        gemm = self.gemm_from_rows(dtype)
        switches = {gemm}
        if self.panel_from_rows(dtype) < gemm:
            switches.add(self.panel_from_rows(dtype))
        if self._int8_max_rows < NEVER:  # some calls run float x
            switches |= {FLOAT_GEMV_MAX_ROWS + 1} | ({self._int8_max_rows + 1} if self._int8_input else set())
        decode_rows = self.decode_int8_max_rows(dtype)
        if self._int8_input and decode_rows + 1 != gemm:  # decode steps leave the int8-x kernels there
            switches.add(decode_rows + 1)
        return sorted(switches)

    def gemv_quantizes_input(self, rows: int, dtype: torch.dtype = torch.float32) -> bool:
        """Whether a call with `rows` rows goes through the int8-x GEMV or panel kernel (what its reference must
        model)."""
        return self._op is not None and self.quantizes_input(rows) and rows < self.gemm_from_rows(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            self.post_load()
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self._op is not None and x.device.type == "cpu":
            gemm_rows = self._gemm_from_rows.get(x2.dtype) or self.gemm_from_rows(x2.dtype)
            y = self._run_gemm(x2) if x2.shape[0] >= gemm_rows else self._run_decode(x2)
        else:
            y = woq_linear_reference(x2, self.qweight, self.weight_scale, self.weight_zero_point,
                                     self.scheme.num_bits, self.scheme.group_size, weight_min=self.weight_min)
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.label()}"


QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def make_quantized_linear(linear: nn.Linear, scheme: QuantScheme, name: str = "linear") -> nn.Module:
    """An empty quantized layer shaped like `linear`, on its device (meta included)."""
    scheme.check_shape(name, linear.in_features)
    cls = W8A8Linear if scheme.activations else QuantLinear
    return cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None,
               device=linear.weight.device)


def replace_linears(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Swap every decoder-layer projection for an (empty) quantized layer; lm_head and embeddings stay float."""
    for layer_idx, layer in enumerate(model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for attr in QUANTIZED_LINEARS:
                linear = getattr(parent, attr, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, attr, make_quantized_linear(linear, scheme, f"layers.{layer_idx}.{attr}"))
    return model

