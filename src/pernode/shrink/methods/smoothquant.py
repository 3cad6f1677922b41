"""SmoothQuant: move activation outliers into the weights with per-channel scales s = max|X|^a / max|W|^(1-a),
folded into the preceding op, so both int8 weights and dynamic per-token int8 activations quantize well
(arXiv 2211.10438).

Smoothed: input_layernorm -> q/k/v and post_attention_layernorm -> gate/up (the paper's choice), and, by default,
up_proj -> down_proj (silu(gate) * up is linear in up), where Llama's largest activation outliers sit. o_proj runs
plain W8A8 (GQA keeps v -> o from folding exactly). `alpha="auto"` searches the migration strength per smoothed
projection over a grid, keeping the one whose simulated W8A8 output is closest to the float output on a sample of
the calibration inputs. `W8A8` (methods/w8a8.py) is the naive baseline: the same int8 GEMM, no smoothing. Executed
by `W8A8Linear` (torch._int_mm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pernode.quant_format import W8A8_SCHEME, QuantScheme, quantize_weight
from pernode.serve.kernels.w8a8_linear import quantize_per_token
from pernode.shrink.calibration import capture_inputs, run_sequential
from pernode.shrink.methods.common import install, projections
from pernode.shrink.methods.modifier import Modifier, require

ALPHA_GRID = tuple(i / 10 for i in range(11))  # 0.0 .. 1.0 for alpha="auto"
SAMPLE_ROWS_PER_CALL = 256  # calibration rows kept per forward for the alpha search


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w_absmax = weight.abs().amax(0).float().clamp(min=1e-5)
    return (act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


def simulated_w8a8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T as W8A8Linear computes it (int8 per-channel weights, dynamic per-token int8 x), in float."""
    q, scale, _ = quantize_weight(weight, QuantScheme(8))
    xq, xs = quantize_per_token(x)
    return (xq.float() * xs) @ (q.float() * scale).t()


def search_alpha(x: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor,
                 grid: tuple[float, ...] = ALPHA_GRID) -> tuple[float, torch.Tensor]:
    """(alpha, s) from `grid` minimising ||x W^T - W8A8(x / s, W * s)||^2 on the sample x [T, K]."""
    ref = x @ weight.t()
    best = None
    for alpha in grid:
        s = smoothing_scale(act_absmax, weight, alpha)
        err = (simulated_w8a8(x / s, weight * s) - ref).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


@dataclass(frozen=True)
class SmoothQuant(Modifier):
    """SmoothQuant's options: migration strength `alpha` (0..1, or "auto": searched per smoothed projection) and
    whether up_proj -> down_proj is smoothed too."""

    name: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    required_scheme: ClassVar[QuantScheme] = W8A8_SCHEME

    alpha: float | str = 0.5
    smooth_down: bool = True

    def __post_init__(self) -> None:
        number = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
        require(self.alpha == "auto" or (number and 0.0 <= self.alpha <= 1.0), "alpha", self.alpha,
                "a number in 0..1 (the paper's default is 0.5) or 'auto'")
        require(isinstance(self.smooth_down, bool), "smooth_down", self.smooth_down, "True or False")

    def apply(self, model, scheme: QuantScheme, calibration: torch.Tensor, quiet: bool = False) -> dict:
        """Smooth, then W8A8-quantize every decoder projection in place, layer by layer."""
        alpha, smooth_down = self.alpha, self.smooth_down
        search = alpha == "auto"
        chosen: dict[str, list[float]] = {"qkv_proj": [], "gate_up_proj": [], "down_proj": []}

        def process(i, layer, x, fwd):
            attn, mlp = layer.self_attn, layer.mlp
            absmax: dict[str, torch.Tensor] = {}
            samples: dict[str, list[torch.Tensor]] = {}

            def track(name, inp):
                m = inp.abs().amax(0).float()
                absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m
                if search:
                    step = max(1, inp.shape[0] // SAMPLE_ROWS_PER_CALL)
                    samples.setdefault(name, []).append(inp[::step].float())

            with capture_inputs({"qkv_proj": attn.qkv_proj, "gate_up_proj": mlp.gate_up_proj,
                                 "down_proj": mlp.down_proj}, track):
                fwd.layer(layer, x)

            def scale_for(name, weight):
                if not search:
                    return smoothing_scale(absmax[name], weight, alpha)
                a, s = search_alpha(torch.cat(samples[name]), weight.float(), absmax[name])
                chosen[name].append(a)
                return s

            for norm, lin, name in ((layer.input_layernorm, attn.qkv_proj, "qkv_proj"),
                                    (layer.post_attention_layernorm, mlp.gate_up_proj, "gate_up_proj")):
                s = scale_for(name, lin.weight.data)
                norm.weight.data.div_(s.to(norm.weight.dtype))
                lin.weight.data.mul_(s.to(lin.weight.dtype))
            if smooth_down:
                s = scale_for("down_proj", mlp.down_proj.weight.data)
                up_rows = mlp.gate_up_proj.weight.data[mlp.intermediate_size:]
                up_rows.div_(s[:, None].to(up_rows.dtype))
                mlp.down_proj.weight.data.mul_(s.to(mlp.down_proj.weight.dtype))
            for parent, attr, linear in list(projections(layer)):
                install(parent, attr, *quantize_weight(linear.weight.data, scheme), scheme, f"layers.{i}.{attr}")
            return f"max|x| qkv {absmax['qkv_proj'].max():.1f} down {absmax['down_proj'].max():.1f}"

        run_sequential(model, calibration, process, "SmoothQuant", quiet)
        report = {"alpha": alpha, "smooth_down": smooth_down}
        if search:
            report["alpha_chosen"] = {name: values for name, values in chosen.items() if values}
        return report
