"""PruningPlan: the target shapes of a structured prune, validated against the model it applies to.

The engine builds every layer from one ModelConfig, so widths are uniform across layers: each layer keeps its own
most important heads and channels, but the same number of them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pernode.config import ModelConfig


@dataclass(frozen=True)
class PruningPlan:
    """None keeps the teacher's value. heads: query heads kept (a multiple of kv_heads); kv_heads: KV groups kept
    (whole groups go, with their query heads); ffn: intermediate channels kept; layers: decoder layers kept."""

    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    layers: int | None = None

    @classmethod
    def parse(cls, text: str) -> "PruningPlan":
        """`ffn=1024,heads=6,kv_heads=3,layers=24` -> PruningPlan; ValueError naming the bad key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields or not value.strip().isdigit():
                raise ValueError(f"structured={text!r}: {part!r} is not KEY=INT with KEY one of "
                                 f"{', '.join(sorted(fields))}")
            values[key] = int(value)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def is_identity(self) -> bool:
        return all(v is None for v in dataclasses.asdict(self).values())

    def target_config(self, config: ModelConfig) -> ModelConfig:
        """The pruned model's ModelConfig; ValueError naming the field and its allowed range."""
        kv = self.kv_heads if self.kv_heads is not None else config.num_key_value_heads
        per_group = config.num_attention_heads // config.num_key_value_heads
        heads = self.heads if self.heads is not None else kv * per_group
        ffn = self.ffn if self.ffn is not None else config.intermediate_size
        layers = self.layers if self.layers is not None else config.num_hidden_layers
        _check("kv_heads", kv, 1, config.num_key_value_heads)
        _check("heads", heads, kv, kv * per_group)
        if heads % kv:
            raise ValueError(f"heads={heads} is not allowed: it must be a multiple of kv_heads={kv} (each KV group "
                             "keeps the same number of query heads)")
        _check("ffn", ffn, 1, config.intermediate_size)
        _check("layers", layers, 1, config.num_hidden_layers)
        return dataclasses.replace(config, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                                   num_hidden_layers=layers, head_dim=config.head_dim)


def _check(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: allowed {low}..{high}")


def non_embedding_params(config: ModelConfig) -> int:
    """Parameters outside the embedding and lm_head: what decides a decoder's per-token cost beyond the vocab."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * (2 * q + 2 * kv) + (q + 2 * kv if c.attention_bias else 0)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp + 2 * c.hidden_size) + c.hidden_size
