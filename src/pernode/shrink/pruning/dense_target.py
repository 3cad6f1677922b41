"""Calibrating a pruned layer toward the dense model's outputs (asymmetric calibration).

Sequential calibration feeds layer i the outputs of the already-pruned layers before it (X_p), so each layer is fitted
to the inputs it will really see. Fitting ||W X_p - W' X_p|| there still takes the layer's own dense output on
those drifted inputs as the target, so the error of the earlier layers is carried forward untouched. Aiming at the
dense model's output instead, min ||W X_d - W' X_p|| (X_d: the dense model's inputs to the layer), lets each
layer absorb part of the drift. It splits into a least-squares refit and the usual pruning problem:

    W* = W C H^-1 with H = X_p^T X_p, C = X_d^T X_p, and then ||W X_d - W' X_p||^2 = ||W* X_p - W' X_p||^2 + const,

so SparseGPT (or Wanda / GPTQ after it) runs unchanged on W* with the Hessian H. Same idea as GPTAQ (Li et al.
2025, arXiv 2504.02692) for quantization; here it is applied before the pruning's OBS updates.
"""
from __future__ import annotations

import torch

from pernode.shrink.calibration import capture_inputs, forward_parts
from pernode.shrink.methods.common import projections
from pernode.shrink.methods.gptq import add_gram_upper_, mirror_block_upper_


@torch.no_grad()
def cross_statistics(layer, x_pruned: torch.Tensor, x_dense: torch.Tensor, fwd
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{attribute: (H = 2/n X_p^T X_p, C = 2/n X_d^T X_p)} of each projection of `layer` (still dense), from its
    forward on the pruned model's inputs and on the dense model's, chunk by chunk (the rows of both align)."""
    linears = {attr: lin for _, attr, lin in projections(layer)}
    h = {a: torch.zeros(lin.in_features, lin.in_features) for a, lin in linears.items()}
    c = {a: torch.zeros(lin.in_features, lin.in_features) for a, lin in linears.items()}
    # one H and one C per projection: the model holds q/k/v and gate/up fused, so no two share an input (telling
    # shared inputs apart by address is unsafe: a freed input's storage is reused by a later one of the same shape)
    count = 0
    for (part_fwd, xp), (_, xd) in zip(forward_parts(fwd, x_pruned), forward_parts(fwd, x_dense)):
        seen_p: dict[str, torch.Tensor] = {}
        seen_d: dict[str, torch.Tensor] = {}
        with capture_inputs(linears, lambda name, inp: seen_p.__setitem__(name, inp.float().clone())):
            part_fwd.layer(layer, xp)
        with capture_inputs(linears, lambda name, inp: seen_d.__setitem__(name, inp.float().clone())):
            part_fwd.layer(layer, xd)
        for a in linears:
            add_gram_upper_(h[a], seen_p[a], 2.0)
            c[a].addmm_(seen_d[a].t(), seen_p[a], alpha=2.0)
        count += xp.shape[0]
    for a in linears:
        mirror_block_upper_(h[a])
    return {a: (h[a] / max(count, 1), c[a] / max(count, 1)) for a in linears}


@torch.no_grad()
def refit_to_dense_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                          damp_ratio: float = 0.01) -> torch.Tensor:
    """W* = W (C + damp I) (H + damp I)^-1: the dense layer refitted to map the pruned model's inputs onto the
    dense model's outputs, regularised toward W itself (not toward 0), so that where nothing has drifted yet (C = H,
    the first layer) W* = W exactly; damp is the pruner's, a fraction of H's mean diagonal. Inputs that were
    always zero in the pruned stream keep their weights (they are pruned first anyway)."""
    w = weight.detach().float()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = damp_ratio * torch.mean(torch.diag(h)).item()
    eye = damp * torch.eye(h.shape[0], dtype=h.dtype)
    chol = torch.linalg.cholesky(h + eye)
    # W (C + dI) (H + dI)^-1 = ((H + dI)^-1 (C + dI)^T W^T)^T, H symmetric
    refit = torch.cholesky_solve((w @ (cross.float() + eye)).t(), chol).t()
    refit[:, dead] = w[:, dead]
    return refit.to(weight.dtype)
