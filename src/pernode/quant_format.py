"""Integer weight formats: the quantization scheme, quantize/dequantize, int4 packing (compressed-tensors layout),
and the checkpoint's `quantization_config` that names them. The quantizers (shrink) and the kernels and loader
(serve) both import this module; it imports nothing of pernode.

Values are signed integers in [-2^(b-1), 2^(b-1) - 1]; w ~= (q - zero_point) * scale, one scale per output row
(strategy "channel") or per `group_size` consecutive input columns of a row (strategy "group").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

ALLOWED_BITS = (4, 8)
ALLOWED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    """How weights (and, for W8A8, activations) are quantized."""

    num_bits: int = 8
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    activations: str | None = None  # None (weight-only) | "int8-token" (dynamic per-token int8, W8A8)
    outlier_threshold: float | None = None  # LLM.int8(): input columns with |x| >= this run in float
    # GGUF's asymmetric form (Q4_1, Q4_K): w = scale * u + min per group, u = q + 2^(b-1) the unsigned stored
    # value and min a float; an integer zero point cannot hold llama.cpp's min exactly.
    float_min: bool = False

    def __post_init__(self) -> None:
        if self.num_bits not in ALLOWED_BITS:
            raise ValueError(f"num_bits={self.num_bits} is not supported: allowed {ALLOWED_BITS}")
        if self.group_size is not None and self.group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported: allowed {ALLOWED_GROUP_SIZES} "
                             "or none (per-channel)")
        if self.activations not in (None, "int8-token"):
            raise ValueError(f"activations={self.activations!r} is not supported: allowed None, 'int8-token'")
        if self.activations and self.num_bits != 8:
            raise ValueError("W8A8 needs num_bits=8 weights")
        if self.float_min and (self.symmetric or self.activations):
            raise ValueError("float_min=True needs symmetric=False and weight-only quantization (no activations)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    def label(self) -> str:
        w = f"w{self.num_bits}" + ("" if self.symmetric else "-min" if self.float_min else "-asym")
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        a = "a8" if self.activations else ""
        return f"{w}{a}-{g}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"scheme fields {unknown} are unknown: allowed {', '.join(sorted(known))}")
        return cls(**d)

    def check_shape(self, name: str, in_features: int) -> None:
        """ValueError naming the layer, its input size and the group sizes that would work."""
        if self.group_size is not None and in_features % self.group_size:
            ok = [g for g in ALLOWED_GROUP_SIZES if in_features % g == 0]
            hint = f"allowed group_size={' or '.join(map(str, ok))}" if ok else "no supported group size divides it"
            raise ValueError(f"group_size={self.group_size} does not divide the input size {in_features} of "
                             f"{name}: {hint}, or per channel (no group size)")
        if self.num_bits == 4 and in_features % 8:
            raise ValueError(f"{name}: int4 packs 8 values per int32 along the input, so its input size "
                             f"{in_features} must be a multiple of 8")


# W8A8 (SmoothQuant, LLM.int8(), naive W8A8): int8 symmetric per-channel weights x dynamic per-token int8 inputs
W8A8_SCHEME = QuantScheme(num_bits=8, group_size=None, symmetric=True, activations="int8-token")


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] -> [N, G, gs]."""
    n, k = w.shape
    gs = group_size or k
    return w.reshape(n, k // gs, gs)


def compute_qparams(w: torch.Tensor, scheme: QuantScheme, clip_ratio: float | torch.Tensor = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [N, G] (fp32) and zero point [N, G] (int, None when symmetric) from min/max of each group."""
    g = group_view(w.float(), scheme.group_size)
    if scheme.symmetric:
        absmax = g.abs().amax(-1) * clip_ratio
        scale = (absmax / scheme.qmax).clamp(min=1e-10)
        return scale, None
    wmax = (g.amax(-1).clamp(min=0)) * clip_ratio
    wmin = (g.amin(-1).clamp(max=0)) * clip_ratio
    scale = ((wmax - wmin) / (scheme.qmax - scheme.qmin)).clamp(min=1e-10)
    zero = (scheme.qmin - torch.round(wmin / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
                  ) -> torch.Tensor:
    """Integer values (int8 tensor holding the signed range) of w [N, K] for given qparams [N, G]."""
    g = group_view(w.float(), scheme.group_size)
    q = torch.round(g / scale[..., None])
    if zero is not None:
        q = q + zero[..., None]
    return q.clamp(scheme.qmin, scheme.qmax).reshape(w.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None
               ) -> torch.Tensor:
    """fp32 weights [N, K] from integer values [N, K] and qparams [N, G]."""
    g = group_view(q.float(), group_size)
    if zero is not None:
        g = g - zero.float()[..., None]
    return (g * scale.float()[..., None]).reshape(q.shape)


def dequantize_float_min(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, num_bits: int,
                         group_size: int | None) -> torch.Tensor:
    """fp32 weights [N, K] of the float-min form: scale * u + min per group, u = q + 2^(b-1) (unsigned).

    Multiply, round, add, round, in that order: the same fp32 operations as gguf's own dequantize, so the result
    is bit-identical to it."""
    u = group_view(q.float() + 2 ** (num_bits - 1), group_size)
    return (u * scale.float()[..., None] + minimum.float()[..., None]).reshape(q.shape)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, clip_ratio: float | torch.Tensor = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: (q int8 [N, K], scale [N, G], zero point [N, G] or None)."""
    scale, zero = compute_qparams(w, scheme, clip_ratio)
    return quantize_with(w, scale, zero, scheme), scale, zero


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    q, scale, zero = quantize_weight(w, scheme, clip_ratio)
    return dequantize(q, scale, zero, scheme.group_size).to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [N, K] -> int32 [N, K/8]: value k at bits 4*(k%8) of word k//8, stored as q + 8."""
    n, k = q.shape
    u = (q.to(torch.int64) + 8).reshape(n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    # Sum in int64 then wrap to int32's two's complement: the top nibble sets the sign bit.
    packed = (u << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, K/8] -> signed int4 values as int8 [N, K]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed[..., None] >> shifts).bitwise_and(0xF)
    return (u - 8).reshape(packed.shape[0], -1)[:, :in_features].to(torch.int8)


def mse_qparams(w: torch.Tensor, scheme: QuantScheme, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4,
                col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [N, G] and zero [N, G] | None like `compute_qparams`, but each group's range shrunk by the factor in
    1, 1 - 1/grid, ... (down to 1 - max_shrink) that minimises sum_k c_k |w_k - deq(q(w_k))|^norm over the group
    (the MSE observer of the GPTQ reference code; c = `col_weight` [K], default 1). Shrink 1 is min-max, so the
    error is never above min-max's."""
    w = w.float()
    g = group_view(w, scheme.group_size)  # [N, G, gs]
    cw = None if col_weight is None else group_view(col_weight.float().reshape(1, -1), scheme.group_size)
    best_err = best_scale = best_zero = None
    for i in range(max(1, int(round(max_shrink * grid)))):
        ratio = 1.0 - i / grid
        scale, zero = compute_qparams(w, scheme, ratio)
        q = torch.round(g / scale[..., None])
        if zero is not None:
            q = (q + zero[..., None]).clamp_(scheme.qmin, scheme.qmax).sub_(zero[..., None])
        else:
            q = q.clamp_(scheme.qmin, scheme.qmax)
        err = (q.mul_(scale[..., None]).sub_(g)).abs_().pow_(norm)
        if cw is not None:
            err = err.mul_(cw)
        err = err.sum(-1)  # [N, G]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# ---- compressed-tensors `quantization_config` <-> QuantScheme ------------------------------------------------

def _format(scheme: QuantScheme) -> str:
    return "pack-quantized" if scheme.num_bits == 4 else "int-quantized"


def _config_group(scheme: QuantScheme, targets: list[str]) -> dict:
    weights = {"num_bits": scheme.num_bits, "type": "int", "symmetric": scheme.symmetric,
               "strategy": scheme.strategy, "group_size": scheme.group_size, "dynamic": False, "actorder": None,
               "observer": "minmax"}
    activations = None
    if scheme.activations:
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
        if scheme.outlier_threshold is not None:
            activations["outlier_threshold"] = scheme.outlier_threshold
    return {"targets": targets, "weights": weights, "input_activations": activations, "output_activations": None,
            "format": _format(scheme)}


def quantization_config_from_scheme(scheme: QuantScheme, method: str, lm_head: QuantScheme | None = None) -> dict:
    """compressed-tensors `quantization_config`: the decoder's Linears in group_0; a quantized lm_head (named
    explicitly, which takes precedence over the class target) in group_1, else `ignore: ["lm_head"]`."""
    groups = {"group_0": _config_group(scheme, ["Linear"])}
    if lm_head is not None:
        groups["group_1"] = _config_group(lm_head, ["lm_head"])
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [] if lm_head is not None else ["lm_head"],
        "kv_cache_scheme": None,
        "pernode_method": method,
    }


def _groups_by_target(qc: dict) -> tuple[dict, dict | None]:
    """(the decoder's config group, the lm_head's or None); ValueError for layouts we cannot run."""
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method is {qc.get('quant_method')!r}: allowed "
                         "'compressed-tensors' (write one with `pernode quantize`)")
    groups = list((qc.get("config_groups") or {}).values())
    head = [g for g in groups if g.get("targets") == ["lm_head"]]
    body = [g for g in groups if g.get("targets") != ["lm_head"]]
    if len(body) != 1 or len(head) > 1:
        raise ValueError(f"quantization_config has {len(groups)} config_groups: allowed one for the decoder's "
                         "Linear layers, plus optionally one targeting exactly ['lm_head']")
    return body[0], (head[0] if head else None)


def scheme_from_quantization_config(qc: dict) -> QuantScheme:
    """The decoder's QuantScheme of a compressed-tensors `quantization_config`; ValueError for what we cannot run."""
    return _scheme_of_group(_groups_by_target(qc)[0])


def lm_head_scheme_from_quantization_config(qc: dict) -> QuantScheme | None:
    """The quantized lm_head's QuantScheme, or None when the lm_head is float (ignored)."""
    head = _groups_by_target(qc)[1]
    return None if head is None else _scheme_of_group(head)


def _scheme_of_group(group: dict) -> QuantScheme:
    w = group.get("weights") or {}
    if w.get("type", "int") != "int" or w.get("strategy") not in ("channel", "group"):
        raise ValueError(f"quantization_config weights {w}: allowed type 'int', strategy 'channel' or 'group'")
    if w.get("actorder") not in (None, "weight", False):
        raise ValueError(f"quantization_config weights.actorder={w.get('actorder')!r}: allowed null or 'weight' "
                         "(group act-order needs g_idx, which is not supported)")
    a = group.get("input_activations")
    return QuantScheme(num_bits=int(w["num_bits"]),
                       group_size=int(w["group_size"]) if w.get("strategy") == "group" else None,
                       symmetric=bool(w.get("symmetric", True)),
                       activations="int8-token" if a else None,
                       outlier_threshold=(a or {}).get("outlier_threshold"))


def schemes_of(qc: dict) -> tuple[QuantScheme, QuantScheme | None]:
    """(decoder scheme, lm_head scheme or None): what `LlamaForCausalLM.apply_quantization` takes."""
    return scheme_from_quantization_config(qc), lm_head_scheme_from_quantization_config(qc)
