"""The teacher's top-k logits for every training position, cached on disk as safetensors shards, so the teacher runs
once however many students (KD, hard-label baseline, resumed runs) learn from it.

A shard holds `windows` [n, L] (the token ids, so the cache is self-describing), `values` [n, L, k] (float16 logits),
`indices` [n, L, k] (int32 token ids) and `log_normalizer` [n, L] (float32 logsumexp of logits / T over the whole
vocabulary, so the loss knows the mass outside the top-k); `cache.json` records the teacher, k, T, the windows' SHA-1
and the shards. A cache without the log-normaliser (older format) is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from pernode.shrink.distill.losses import TeacherTopK
from pernode.shrink.distill.progress import StepProgress
from pernode.shrink.training_forward import logits as forward_logits

CACHE_JSON = "cache.json"


def windows_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha1(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class TeacherCache:
    """Top-k teacher logits of a fixed set of windows, loaded into memory: `cache[idx]` -> TeacherTopK."""

    def __init__(self, windows: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, meta: dict,
                 log_normalizer: torch.Tensor | None = None):
        self.windows, self.values, self.indices, self.meta = windows, values, indices, meta
        self.log_normalizer = log_normalizer

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, idx) -> TeacherTopK:
        lse = None if self.log_normalizer is None else self.log_normalizer[idx].float()
        return TeacherTopK(self.values[idx].float(), self.indices[idx].long(), lse,
                           float(self.meta.get("temperature", 1.0)))

    @classmethod
    def load(cls, folder: str) -> "TeacherCache":
        with open(os.path.join(folder, CACHE_JSON), encoding="utf-8") as f:
            meta = json.load(f)
        parts = [load_file(os.path.join(folder, name)) for name in meta["shards"]]
        windows = torch.cat([p["windows"] for p in parts])
        if windows_fingerprint(windows) != meta["windows_sha1"]:
            raise ValueError(f"{folder}: the shards' windows do not match cache.json (windows_sha1); rebuild the cache")
        lse = torch.cat([p["log_normalizer"] for p in parts]) if all("log_normalizer" in p for p in parts) else None
        return cls(windows, torch.cat([p["values"] for p in parts]), torch.cat([p["indices"] for p in parts]), meta,
                   lse)

    @classmethod
    def matching(cls, folder: str, windows: torch.Tensor, teacher_id: str, k: int,
                 temperature: float = 1.0) -> "TeacherCache | None":
        """The cache in `folder` if it was built by this teacher with this k and T over exactly these windows."""
        path = os.path.join(folder, CACHE_JSON)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if (meta.get("teacher"), meta.get("k"), meta.get("windows_sha1"), meta.get("temperature")) != (
                teacher_id, k, windows_fingerprint(windows), float(temperature)):
            return None
        return cls.load(folder)


@torch.no_grad()  # not inference_mode: the cached tensors later enter autograd graphs
def build_teacher_cache(teacher, windows: torch.Tensor, folder: str, k: int, teacher_id: str,
                        batch_size: int = 4, shard_windows: int = 256, autocast_dtype: torch.dtype | None = None,
                        quiet: bool = False, temperature: float = 1.0) -> TeacherCache:
    """Run the teacher over windows [N, L] once and write the top-k shards (with the log-normaliser at
    `temperature`, the loss temperature); reuses a matching cache."""
    if not 1 <= k <= teacher.config.vocab_size:
        raise ValueError(f"top_k={k} is out of range: allowed 1..{teacher.config.vocab_size}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} is out of range: allowed > 0")
    cached = TeacherCache.matching(folder, windows, teacher_id, k, temperature)
    if cached is not None:
        return cached
    os.makedirs(folder, exist_ok=True)
    device = teacher.embed_tokens.weight.device
    values, indices, normalizers, shards = [], [], [], []
    with StepProgress("teacher top-k", windows.shape[0], quiet=quiet) as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                top = TeacherTopK.from_logits(forward_logits(teacher, batch), k, temperature)
            values.append(top.values.to(torch.float16).cpu())
            normalizers.append(top.log_normalizer.float().cpu())
            indices.append(top.indices.to(torch.int32).cpu())
            bar.advance(batch.shape[0])
    values_t, indices_t, lse_t = torch.cat(values), torch.cat(indices), torch.cat(normalizers)
    for i, start in enumerate(range(0, windows.shape[0], shard_windows)):
        name = f"teacher_topk_{i:05d}.safetensors"
        sl = slice(start, start + shard_windows)
        save_file({"windows": windows[sl].contiguous(), "values": values_t[sl].contiguous(),
                   "indices": indices_t[sl].contiguous(), "log_normalizer": lse_t[sl].contiguous()},
                  os.path.join(folder, name))
        shards.append(name)
    meta = {"teacher": teacher_id, "k": k, "temperature": float(temperature), "seq_len": windows.shape[1],
            "num_windows": windows.shape[0],
            "windows_sha1": windows_fingerprint(windows), "shards": shards,
            "dtype": str(autocast_dtype or torch.float32).removeprefix("torch.")}
    with open(os.path.join(folder, CACHE_JSON), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return TeacherCache(windows, values_t, indices_t, meta, lse_t)
