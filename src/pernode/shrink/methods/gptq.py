"""GPTQ: quantize weights column by column, pushing each column's rounding error onto the not-yet-quantized
columns through the inverse Hessian of the layer's calibration inputs (arXiv 2210.17323).

Per layer: H = 2/n sum x x^T from calibration inputs that went through the already-quantized earlier layers;
damping (1% of mean diag by default, raised x10 with a message when Cholesky fails); lazy batch updates of 128
columns; act-order (columns by descending diag(H), on by default); groups. With act-order, group qparams are fixed
up front from each group's original weights ("static groups"), so no g_idx is needed in the checkpoint.

Group scales come from an observer: "minmax" (the group's range), "mse" (the range shrunk by the factor minimising
sum |w - deq(w)|^2.4 over the group, as the reference code's Quantizer(mse=True)), or "hmse" (the default: the same
with each column's error weighted by its Hessian diagonal, i.e. the mean square of its input, so columns that see
large activations get the tighter fit).
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar

import torch

from pernode.quant_format import QuantScheme, compute_qparams, dequantize, mse_qparams
from pernode.shrink.calibration import capture_inputs, forward_parts, run_sequential

CALIBRATION_CHUNK_WINDOWS = 8  # windows per calibration forward: 4k tokens of 512, the Hessians summed over chunks
HESSIAN_BLOCKS = 4  # X^T X computed by block rows of its upper triangle: (n + 1) / 2n of the GEMM, 5/8 at 4
from pernode.shrink.methods.common import install, projections, pruned_mask, zero_at_pruned
from pernode.shrink.methods.modifier import Modifier, require

log = logging.getLogger("pernode.shrink")


class Observer(str, enum.Enum):
    """How a group's scale is chosen (str-valued: compares equal to "minmax", "mse", "hmse")."""

    MINMAX = "minmax"  # the group's range
    MSE = "mse"  # the range shrunk to minimise sum |w - deq(w)|^2.4
    HMSE = "hmse"  # as mse, each column's error weighted by its Hessian diagonal


OBSERVERS = tuple(o.value for o in Observer)


def observer_of(value: str) -> Observer:
    require(value in OBSERVERS, "observer", value, ", ".join(OBSERVERS))
    return Observer(value)


@dataclass(frozen=True)
class GPTQ(Modifier):
    """GPTQ's options: lazy-update block of `block_size` columns, damping `damp_ratio` of the mean Hessian
    diagonal, act-order, and the observer of the group scales."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    block_size: int = 128
    damp_ratio: float = 0.01
    act_order: bool = True
    observer: Observer = Observer.HMSE

    def __post_init__(self) -> None:
        require(isinstance(self.block_size, int) and self.block_size >= 1, "block_size", self.block_size, ">= 1")
        require(isinstance(self.damp_ratio, (int, float)) and self.damp_ratio > 0, "damp_ratio", self.damp_ratio,
                "> 0 (a fraction of the mean Hessian diagonal; 0.01 is the paper's)")
        require(isinstance(self.act_order, bool), "act_order", self.act_order, "True or False")
        object.__setattr__(self, "observer", observer_of(self.observer))

    def weight_observer(self) -> str:
        return "minmax" if self.observer == Observer.MINMAX else "mse"

    def apply(self, model, scheme: QuantScheme, calibration: torch.Tensor, quiet: bool = False) -> dict:
        """GPTQ every decoder projection in place, layer by layer."""
        report = {"damp_ratio": self.damp_ratio, "act_order": self.act_order, "observer": self.observer.value,
                  "calibration_tokens": calibration.numel()}

        staged = []  # the previous layer's installs, run once its calibration forward (on float weights) is done

        def process(i, layer, x, fwd):
            install_staged(staged)
            hessians = layer_hessians(layer, x, fwd)
            for parent, attr, lin in list(projections(layer)):
                staged.append(self.stage_linear(parent, attr, hessians[attr], scheme, f"layers.{i}.{attr}"))
            return f"layer {i}"

        run_sequential(model, calibration, process, "GPTQ", quiet, CALIBRATION_CHUNK_WINDOWS)
        install_staged(staged)
        return report

    def quantize_linear(self, parent, attr: str, hessian: torch.Tensor, scheme: QuantScheme, name: str) -> None:
        """GPTQ parent.attr given its layer's Hessian; a pruned layer (see `pruned_mask`) keeps its zeros, the
        error of each zero pushed onto the columns after it like a rounding error (SparseGPT's joint pass)."""
        lin = getattr(parent, attr)
        q, s, z = gptq_quantize_weight(lin.weight.data, hessian, scheme, self.damp_ratio, self.block_size,
                                       self.act_order, name, self.observer, keep=pruned_mask(lin))
        install(parent, attr, q, s, z, scheme, name)

    def stage_linear(self, parent, attr: str, hessian: torch.Tensor, scheme: QuantScheme, name: str
                     ) -> Callable[[], None]:
        """GPTQ parent.attr, leaving its dequantized weights in the float Linear and returning the install.

        The next layer calibrates on this layer's outputs: a float GEMM on the dequantized weights gives them (up
        to summation order) at BLAS speed, where the weight-only-quantized kernel is several times slower on
        tens of thousands of calibration tokens. Schemes that quantize activations install at once."""
        if scheme.activations:
            self.quantize_linear(parent, attr, hessian, scheme, name)
            return lambda: None
        lin = getattr(parent, attr)
        keep = pruned_mask(lin)
        q, s, z = gptq_quantize_weight(lin.weight.data, hessian, scheme, self.damp_ratio, self.block_size,
                                       self.act_order, name, self.observer, keep=keep)
        if keep is not None:
            q = zero_at_pruned(q, z, keep)
        lin.weight.data.copy_(dequantize(q, s, z, scheme.group_size).to(lin.weight.dtype))
        return lambda: install(parent, attr, q, s, z, scheme, name)


def install_staged(staged: list) -> None:
    """Run and clear the installs `stage_linear` returned."""
    for do_install in staged:
        do_install()
    staged.clear()


class _AllInputsSeen(Exception):
    """Raised from the last projection's hook: the rest of the layer's forward is not needed for its Hessians."""


@torch.no_grad()
def layer_hessians(layer, x: torch.Tensor, fwd, diagonal_only: bool = False, stop_early: bool = True
                   ) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T of each projection's inputs (attribute -> [K, K]) over one forward of `layer` on `x`, or
    with `diagonal_only` just its diagonal (2/n sum x^2, [K]: what Wanda's ||X|| needs). Shared by GPTQ,
    SparseGPT and Wanda so that all calibrate on the same statistics. With `stop_early` the forward stops once
    every projection has seen its input (the layer's output is not used here)."""
    linears = {attr: lin for _, attr, lin in projections(layer)}
    if diagonal_only:
        sums = {a: torch.zeros(lin.in_features) for a, lin in linears.items()}
    else:
        sums = {a: torch.zeros(lin.in_features, lin.in_features) for a, lin in linears.items()}
    counts = dict.fromkeys(linears, 0)
    seen = set()  # projections that saw this chunk's input

    def accumulate(name, inp):
        inp = inp.float()
        if diagonal_only:
            sums[name].add_(inp.square().sum(0), alpha=2.0)
        else:
            add_gram_upper_(sums[name], inp, 2.0)
        counts[name] += inp.shape[0]
        seen.add(name)
        if stop_early and len(seen) == len(linears):
            raise _AllInputsSeen  # skips the last projection's GEMM and what follows: ~1/4 of the layer's FLOPs

    with capture_inputs(linears, accumulate):
        for part_fwd, part in forward_parts(fwd, x):
            seen.clear()
            try:
                part_fwd.layer(layer, part)
            except _AllInputsSeen:
                pass
    if not diagonal_only:
        for h in sums.values():
            mirror_block_upper_(h)
    return {a: sums[a] / max(counts[a], 1) for a in linears}


def _block_edges(k: int, blocks: int = HESSIAN_BLOCKS) -> list[int]:
    return sorted({round(i * k / blocks) for i in range(blocks + 1)})


def add_gram_upper_(h: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """h += alpha x^T x on the diagonal blocks and above only (x [T, K]): X^T X is symmetric, so the blocks below
    are the transposes of those above (`mirror_block_upper_` fills them once, after the last chunk)."""
    edges = _block_edges(x.shape[1])
    for a, b in zip(edges, edges[1:]):
        h[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], alpha=alpha)


def mirror_block_upper_(h: torch.Tensor) -> None:
    """Copy the blocks above the diagonal blocks onto those below (what `add_gram_upper_` left at zero)."""
    edges = _block_edges(h.shape[0])
    for a, b in zip(edges, edges[1:]):
        h[b:, a:b] = h[a:b, b:].t()


def inverse_hessian_cholesky(h: torch.Tensor, damp_ratio: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising damp x10 until H + damp I is positive definite."""
    mean_diag = torch.mean(torch.diag(h)).item()
    ratio = damp_ratio
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(8):
        try:
            chol = torch.linalg.cholesky(h + ratio * mean_diag * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            log.warning("GPTQ %s: Hessian not positive definite with damping %.3g of the mean diagonal; "
                        "raising damping to %.3g", name, ratio, max(ratio * 10, 1e-3))
            ratio = max(ratio * 10, 1e-3)
    raise ValueError(f"GPTQ {name}: Hessian stays singular even with damping {ratio:.3g}; give more calibration text")


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp_ratio: float = 0.01,
                         block_size: int = 128, act_order: bool = True, name: str = "layer",
                         observer: str = "hmse", keep: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 [N, K], scale [N, G], zero [N, G] | None) minimising ||W X - Q X|| for the inputs behind `hessian`;
    with `keep` (bool [N, K]), the entries outside it are pruned: they dequantize to exactly 0."""
    observer = observer_of(observer)
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = scheme.group_size or k
    static = act_order or scheme.group_size is None
    col_weight = torch.diag(h).clamp(min=1e-12) if observer == "hmse" else None  # original column order

    def observe(ws, sch, cw):
        if observer == "minmax":
            return compute_qparams(ws, sch)
        return mse_qparams(ws, sch, col_weight=cw)

    if static:  # qparams from the original weights, per group in original column order
        scale_all, zero_all = observe(w, scheme, col_weight)
    else:
        scale_all = torch.zeros(n, k // gs)
        zero_all = None if scheme.symmetric else torch.zeros(n, k // gs)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    keep = None if keep is None else keep[:, perm]
    group_of = perm // gs  # group (original order) of each permuted column
    hinv = inverse_hessian_cholesky(h, damp_ratio, name)

    q_int = torch.zeros(n, k, dtype=torch.int8)
    qmin, qmax = scheme.qmin, scheme.qmax
    if not static and block_size % gs:  # a group must not straddle two lazy-update blocks
        block_size = gs * max(1, block_size // gs)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:  # group qparams from the error-updated weights of this group
                g = col // gs
                s, z = observe(w1[:, i:i + gs], QuantScheme(scheme.num_bits, None, scheme.symmetric),
                               None if col_weight is None else col_weight[col:col + gs])  # perm is identity
                scale_all[:, g] = s[:, 0]
                if zero_all is not None:
                    zero_all[:, g] = z[:, 0]
            g = group_of[col]
            s = scale_all[:, g]
            z = zero_all[:, g] if zero_all is not None else 0.0
            wc = w1[:, i]
            qc = torch.clamp(torch.round(wc / s) + z, qmin, qmax)
            if keep is not None:  # a pruned weight is stored as the zero point: it dequantizes to 0
                qc = torch.where(keep[:, col], qc, z if torch.is_tensor(z) else torch.zeros_like(qc))
            deq = (qc - z) * s
            q_int[:, col] = qc.to(torch.int8)
            e = (wc - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return q_int[:, inv], scale_all, zero_all

