"""AWQ: scale up the weight channels that see large activations before rounding, and fold the inverse scale
into the preceding op, so salient channels lose less to quantization (arXiv 2306.00978).

Per layer, from calibration inputs that went through the already-quantized earlier layers:
  input_layernorm -> q/k/v     scales folded into the RMSNorm weight
  post_attention_layernorm -> gate/up
  up_proj -> down_proj         scales folded into up_proj's rows (silu(gate) * up is linear in up)
  o_proj is not scaled: under grouped-query attention its input channels are v heads repeated per query group,
  so one v row feeds several o columns and a per-column scale cannot be folded into v exactly.
Scales are s = mean|x|^alpha (normalised), alpha from a grid minimising the linear's output error after fake
quantization; then an optional per-group clip search shrinks each group's range where that lowers output error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pernode.quant_format import QuantScheme, fake_quantize, group_view, quantize_weight
from pernode.shrink.calibration import capture_inputs, run_sequential
from pernode.shrink.methods.common import install, projections
from pernode.shrink.methods.modifier import Modifier, require

SEARCH_TOKENS = 512


def _subsample(x: torch.Tensor, n: int = SEARCH_TOKENS) -> torch.Tensor:
    step = max(1, x.shape[0] // n)
    return x[::step][:n].float()


@torch.no_grad()
def search_scale(x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, grid: int = 20) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale s (weights multiplied, inputs divided) and the alpha that chose it."""
    x_mean = x.abs().mean(0)
    ref = x @ weight.t()
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = ((x / s) @ fake_quantize(weight * s, scheme).t() - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, steps: int = 10,
                min_ratio: float = 0.5) -> torch.Tensor:
    """Per-(row, group) clip ratio of the range in [min_ratio, 1] minimising that group's output error."""
    n = weight.shape[0]
    wg = group_view(weight.float(), scheme.group_size)  # [N, G, gs]
    xg = group_view(x, scheme.group_size)  # [T, G, gs]
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_ratio = torch.ones(wg.shape[:2])
    for i in range(steps + 1):
        ratio = 1.0 - (1.0 - min_ratio) * i / steps
        dq = group_view(fake_quantize(weight, scheme, ratio), scheme.group_size)
        err = torch.einsum("tgk,ngk->tng", xg, wg - dq).pow(2).mean(0)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio.view(n, -1)


@dataclass(frozen=True)
class AWQ(Modifier):
    """AWQ's options: `grid` alphas in [0, 1) tried per scaled projection, and the per-group clip search."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True

    grid: int = 20
    clip: bool = True

    def __post_init__(self) -> None:
        require(isinstance(self.grid, int) and self.grid >= 1, "grid", self.grid, ">= 1")
        require(isinstance(self.clip, bool), "clip", self.clip, "True or False")

    def apply(self, model, scheme: QuantScheme, calibration: torch.Tensor, quiet: bool = False) -> dict:
        """AWQ-scale, clip and quantize every decoder projection in place, layer by layer."""
        grid, clip = self.grid, self.clip
        report = {"alphas": [], "clip": clip, "o_proj_scaled": False}

        def process(i, layer, x, fwd):
            attn, mlp = layer.self_attn, layer.mlp
            inputs: dict[str, torch.Tensor] = {}
            linears = {"qkv_proj": attn.qkv_proj, "o_proj": attn.o_proj, "gate_up_proj": mlp.gate_up_proj,
                       "down_proj": mlp.down_proj}
            with capture_inputs(linears, lambda name, inp: inputs.__setitem__(name, _subsample(inp))):
                fwd.layer(layer, x)
            alphas = []
            # input_layernorm -> qkv, post_attention_layernorm -> gate_up
            for norm, lin, name in ((layer.input_layernorm, attn.qkv_proj, "qkv_proj"),
                                    (layer.post_attention_layernorm, mlp.gate_up_proj, "gate_up_proj")):
                s, alpha = search_scale(inputs[name], lin.weight.data.float(), scheme, grid)
                norm.weight.data.div_(s.to(norm.weight.dtype))
                lin.weight.data.mul_(s.to(lin.weight.dtype))
                inputs[name] = inputs[name] / s
                alphas.append(alpha)
            # up_proj rows -> down_proj columns
            s, alpha = search_scale(inputs["down_proj"], mlp.down_proj.weight.data.float(), scheme, grid)
            inter = mlp.intermediate_size
            mlp.gate_up_proj.weight.data[inter:].div_(s[:, None].to(mlp.gate_up_proj.weight.dtype))
            mlp.down_proj.weight.data.mul_(s.to(mlp.down_proj.weight.dtype))
            inputs["down_proj"] = inputs["down_proj"] / s
            alphas.append(alpha)
            report["alphas"].append(alphas)
            for parent, attr, lin in list(projections(layer)):
                w = lin.weight.data.float()
                ratio = search_clip(inputs[attr], w, scheme) if clip else 1.0
                install(parent, attr, *quantize_weight(w, scheme, ratio), scheme, f"layers.{i}.{attr}")
            return "alpha " + "/".join(f"{a:.2f}" for a in alphas)

        run_sequential(model, calibration, process, "AWQ", quiet)
        return report
