"""Sparse weight formats as compressed-tensors stores them, and the `sparsity_config` that names them. The pruners'
checkpoint writer (shrink) and the loader and sparse kernel (serve) both import this module; it imports nothing of
pernode.

Formats (compressed-tensors' names), per sparse HF linear `x.weight` [rows, cols]:
  sparse-bitmask     x.shape [2] int64, x.compressed (the nonzeros, row-major, 1-D), x.bitmask uint8
                     [rows, ceil(cols/8)] (bit c%8 of byte c//8 marks column c: numpy's packbits, bitorder "little"),
                     x.row_offsets int64 [rows] (where each row's values start in x.compressed)
  sparse-24-bitmask  x.shape [2, 1] int64, x.compressed [rows, cols/2] (the 2 kept of every 4), x.bitmask as above
  dense              the weights are stored as they are (e.g. quantized); the config records the sparsity only
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


class SparseFormat(str, enum.Enum):
    BITMASK = "sparse-bitmask"
    BITMASK_24 = "sparse-24-bitmask"
    DENSE = "dense"


SPARSE_SUFFIXES = (".compressed", ".bitmask", ".row_offsets", ".shape")


@dataclass(frozen=True)
class SparsityPattern:
    """`n` kept of every `m` consecutive input columns of a row (N:M), or unstructured (n = m = 0)."""

    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if (self.n, self.m) != (0, 0) and not (0 < self.n < self.m <= 32):
            raise ValueError(f"pattern={self.n}:{self.m}: allowed N:M with 0 < N < M <= 32 (e.g. 2:4, 4:8), "
                             "or unstructured")

    @property
    def is_structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None: unstructured, any sparsity)."""
        return 1 - self.n / self.m if self.m else None

    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"

    @classmethod
    def parse(cls, text: str | None) -> SparsityPattern:
        """"2:4" -> SparsityPattern(2, 4); None / "" / "unstructured" -> unstructured."""
        if not text or text == "unstructured" or text == "0:0":
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"pattern={text!r}: allowed N:M such as 2:4 or 4:8, or unstructured")
        return cls(int(parts[0]), int(parts[1]))


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], column c at bit c%8 of byte c//8 (packbits "little")."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=mask.device))
    return (padded.view(rows, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_bitmask`: uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    bits = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    unpacked = (bitmask[..., None] >> bits) & 1
    return unpacked.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-bitmask tensors (suffix -> tensor) of a 2-D weight; zeros are the pruned entries."""
    mask = weight != 0
    counts = mask.sum(-1)
    return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64), "compressed": weight[mask].contiguous(),
            "bitmask": pack_bitmask(mask), "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def compress_24_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-24-bitmask tensors of a 2:4-sparse weight: the 2 largest |w| of every 4 (a group with more zeros keeps
    one of them as an explicit 0, as compressed-tensors does)."""
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"sparse-24-bitmask needs a column count divisible by 4, got {cols}")
    groups = weight.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    if (groups[~keep] != 0).any():
        raise ValueError("weight is not 2:4 sparse: a group of 4 has more than 2 nonzeros")
    mask = keep.view(rows, cols)
    return {"shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
            "compressed": weight[mask].reshape(rows, cols // 2).contiguous(), "bitmask": pack_bitmask(mask)}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense weight from either format's tensors (suffix -> tensor); ValueError naming what is inconsistent."""
    missing = {"shape", "compressed", "bitmask"} - set(parts)
    if missing:
        raise ValueError(f"sparse weight lacks {sorted(missing)}")
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"sparse weight shape {shape}: allowed [rows, cols] > 0")
    rows, cols = shape
    bitmask = parts["bitmask"]
    if tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"sparse weight bitmask {tuple(bitmask.shape)}: expected {(rows, (cols + 7) // 8)}")
    mask = unpack_bitmask(bitmask.to(torch.uint8), cols)
    values = parts["compressed"].flatten()
    if values.numel() != int(mask.sum()):
        raise ValueError(f"sparse weight has {values.numel()} values for {int(mask.sum())} set bits")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values
    return dense


def sparsity_config(fmt: SparseFormat, global_sparsity: float, pattern: SparsityPattern) -> dict:
    """compressed-tensors' `sparsity_config` (nested in config.json's quantization_config)."""
    return {"format": fmt.value, "global_sparsity": global_sparsity, "registry_requires_subclass": False,
            "sparsity_structure": pattern.label(), "targets": ["Linear"], "ignore": ["lm_head"]}


def sparse_format_of(qc: dict | None) -> SparseFormat | None:
    """The sparse format of a checkpoint's quantization_config (None: no sparsity_config); ValueError otherwise."""
    sc = (qc or {}).get("sparsity_config")
    if not sc:
        return None
    fmt = sc.get("format")
    allowed = [f.value for f in SparseFormat]
    if fmt not in allowed:
        raise ValueError(f"sparsity_config.format={fmt!r}: allowed {', '.join(allowed)}")
    return SparseFormat(fmt)


def decompressed_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) stream with every sparse weight's parts (x.compressed, x.bitmask, ...) replaced by the dense
    x.weight; the parts are held until the stream ends, since a file need not store them side by side."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        prefix, _, suffix = name.rpartition(".")
        if "." + suffix in SPARSE_SUFFIXES:
            parts.setdefault(prefix, {})[suffix] = tensor
        else:
            yield name, tensor
    for prefix, p in parts.items():
        try:
            yield f"{prefix}.weight", decompress(p)
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from None
