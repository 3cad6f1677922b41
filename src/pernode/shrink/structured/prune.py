"""Structured pruning applied: slice the kept heads, KV groups, FFN channels and layers out of a dense model into a
new, smaller LlamaForCausalLM (a plain dense model: nothing masked, nothing the kernels need to know about)."""
from __future__ import annotations

import torch

from pernode.serve.models.llama import LlamaForCausalLM
from pernode.shrink.structured.importance import ActivationImportance
from pernode.shrink.structured.plan import PruningPlan
from pernode.shrink.structured.refit import refit_output_projections


def _topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    # ties broken by index so the choice is deterministic; kept in their original order
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def kept_heads(head_scores: torch.Tensor, num_kv_heads: int, kv_keep: int, heads_keep: int
               ) -> tuple[list[int], list[int]]:
    """(kept KV groups, kept query heads in new order) of one layer: whole groups ranked by the sum of their query
    heads' scores, then the same number of query heads inside every kept group."""
    group = head_scores.numel() // num_kv_heads
    group_scores = head_scores.view(num_kv_heads, group).sum(-1)
    groups = _topk_sorted(group_scores, kv_keep)
    per_group = heads_keep // kv_keep
    heads = [g * group + h for g in groups for h in _topk_sorted(head_scores[g * group:(g + 1) * group], per_group)]
    return groups, heads


def select_layers(model: LlamaForCausalLM, layer_indices: list[int]) -> LlamaForCausalLM:
    """A model of the chosen decoder layers (in the given order), each a copy of the teacher's (DistilBERT-style
    initialisation); embedding, final norm and lm_head copied too."""
    n = model.config.num_hidden_layers
    bad = [i for i in layer_indices if not 0 <= i < n]
    if bad or not layer_indices or len(set(layer_indices)) != len(layer_indices):
        raise ValueError(f"layers={layer_indices} is not allowed: distinct indices in 0..{n - 1}")
    return prune_model(model, PruningPlan(layers=len(layer_indices)), layer_indices=layer_indices)


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` indices spread over 0..num_layers-1, always including the first and the last layer."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep_layers={keep} is out of range: allowed 1..{num_layers}")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


@torch.no_grad()
def prune_model(model: LlamaForCausalLM, plan: PruningPlan, importance: ActivationImportance | None = None,
                layer_indices: list[int] | None = None, refit_windows: torch.Tensor | None = None
                ) -> LlamaForCausalLM:
    """The pruned model (fp32, CPU, eval mode). `importance` ranks what goes (needed unless only layers are chosen
    explicitly); `layer_indices` names the kept layers (default: the `plan.layers` of highest block importance);
    with `refit_windows`, o_proj and down_proj are refitted by least squares on them (`refit.py`)."""
    c = model.config
    target = plan.target_config(c)
    width_pruned = (target.num_attention_heads, target.num_key_value_heads, target.intermediate_size) != (
        c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    if importance is None and (width_pruned or (layer_indices is None and target.num_hidden_layers < c.num_hidden_layers)):
        raise ValueError("importance is required to choose heads/channels/layers: run measure_importance first")
    if layer_indices is None:
        layer_indices = (list(range(c.num_hidden_layers)) if target.num_hidden_layers == c.num_hidden_layers
                         else _topk_sorted(importance.layers, target.num_hidden_layers))
    if len(layer_indices) != target.num_hidden_layers:
        raise ValueError(f"layers: {len(layer_indices)} layer indices for layers={target.num_hidden_layers}")
    old = model.hf_state_dict()
    new: dict[str, torch.Tensor] = {k: v for k, v in old.items() if not k.startswith("model.layers.")}
    hd = c.head_dim
    for new_i, old_i in enumerate(layer_indices):
        src, dst = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        layer = {k[len(src):]: v for k, v in old.items() if k.startswith(src)}
        if importance is not None and width_pruned:
            groups, heads = kept_heads(importance.heads[old_i], c.num_key_value_heads, target.num_key_value_heads,
                                       target.num_attention_heads)
            q_rows = torch.tensor([h * hd + d for h in heads for d in range(hd)])
            kv_rows = torch.tensor([g * hd + d for g in groups for d in range(hd)])
            channels = torch.tensor(_topk_sorted(importance.ffn[old_i], target.intermediate_size))
            for suffix in ("weight", "bias"):
                for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                    key = f"self_attn.{proj}.{suffix}"
                    if key in layer:
                        layer[key] = layer[key][rows]
            layer["self_attn.o_proj.weight"] = layer["self_attn.o_proj.weight"][:, q_rows]
            layer["mlp.gate_proj.weight"] = layer["mlp.gate_proj.weight"][channels]
            layer["mlp.up_proj.weight"] = layer["mlp.up_proj.weight"][channels]
            layer["mlp.down_proj.weight"] = layer["mlp.down_proj.weight"][:, channels]
        new.update({dst + k: v.contiguous().clone() for k, v in layer.items()})
    pruned = LlamaForCausalLM(target, max_positions=model.rotary.max_positions)
    pruned.load_weights(new.items())
    pruned = pruned.float().eval()
    if refit_windows is not None:
        refit_output_projections(model, pruned, layer_indices, refit_windows)
    return pruned
