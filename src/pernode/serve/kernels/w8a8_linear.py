"""W8A8 linear layers: int8 per-channel weights x dynamic per-token int8 activations through `torch._int_mm` (oneDNN's
VNNI int8 GEMM on CPU), with LLM.int8()'s float path for outlier input columns (Dettmers et al., arXiv 2208.07339).
`w8a8_linear_reference` is the plain-torch result the layer is held to.
"""
from __future__ import annotations

import torch
from torch import nn

from pernode.quant_format import QuantScheme


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: (int8 [M, K], scale [M, 1])."""
    scale = (x.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-10)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def w8a8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          outlier_threshold: float | None = None) -> torch.Tensor:
    """Plain torch, float64: the int8 x int8 products and (LLM.int8()) the float outlier columns."""
    x = x.double()
    w = weight.double() * weight_scale.double().reshape(-1, 1)
    outliers = torch.zeros(x.shape[-1], dtype=torch.bool)
    if outlier_threshold is not None:
        outliers = (x.abs() >= outlier_threshold).any(0)
    x_in = x.masked_fill(outliers, 0.0)
    scale = (x_in.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-10)
    xq = torch.round(x_in / scale).clamp(-127, 127)
    y = (xq @ weight.double().t()) * scale * weight_scale.double().reshape(1, -1)
    return (y + x[:, outliers] @ w[:, outliers].t()).float()


class W8A8Linear(nn.Module):
    """int8 per-channel weights x dynamic per-token int8 activations through `torch._int_mm`.

    With `outlier_threshold` (LLM.int8()), input columns where any token has |x| >= threshold are multiplied in
    float against the dequantized weight columns; counts of such columns are kept for reporting."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))
        self.weight_zero_point = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.outlier_threshold = scheme.outlier_threshold
        self._wt: torch.Tensor | None = None
        self.num_calls = 0
        self.num_outlier_columns = 0
        self.max_outlier_columns = 0

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        self.weight = q.to(torch.int8).contiguous()
        self.weight_scale.copy_(scale)
        self.post_load()

    def post_load(self) -> None:
        # _int_mm is ~1.6x faster with B stored [K, N]; keep only that copy and view it back as [N, K].
        wt = self.weight.t().contiguous()
        self._wt = wt
        self.weight = wt.t()
        self._scale_row = self.weight_scale.float().reshape(1, -1)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._wt is None:
            self.post_load()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        outlier_cols = None
        if self.outlier_threshold is not None:
            mask = (x2.abs() >= self.outlier_threshold).any(0)
            outlier_cols = mask.nonzero().flatten()
            n_out = int(outlier_cols.numel())
            self.num_calls += 1
            self.num_outlier_columns += n_out
            self.max_outlier_columns = max(self.max_outlier_columns, n_out)
            if n_out:
                x_out = x2[:, outlier_cols]
                x2 = x2.index_fill(1, outlier_cols, 0.0)
            else:
                outlier_cols = None
        xq, xs = quantize_per_token(x2)
        y = torch._int_mm(xq, self._wt).float().mul_(xs).mul_(self._scale_row)
        if outlier_cols is not None:
            w_out = self._wt[outlier_cols].float() * self._scale_row  # [n_out, N]
            y += x_out @ w_out
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        extra = f", outliers |x|>={self.outlier_threshold}" if self.outlier_threshold is not None else ""
        return f"in={self.in_features}, out={self.out_features}, w8a8-token{extra}"
