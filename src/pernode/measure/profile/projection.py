"""Project a measured profile onto another accelerator by the roofline, labelled `"kind": "projected"`.

Each measured point carries its FLOPs and bytes. On any machine its roofline time is
max(bytes / bandwidth, flops / peak_flops); the measured time divided into that is the fraction of the roofline the
implementation reached. A projection assumes the same fraction on the target:

    step_s_target = step_s_measured * roofline_time_target / roofline_time_measured

so a point memory-bound on both machines scales by the bandwidth ratio, one compute-bound on both by the FLOP
ratio, and a point that changes sides (decode at large batch: compute-bound on a CPU, memory-bound on an H100)
gets the roof that binds on the target. KV capacity is redone from the target's memory.
"""
from __future__ import annotations

import copy
from collections import Counter

from pernode.measure.profile.accelerators import hardware_section
from pernode.measure.profile.profile_schema import (Profile, config_from_model_section, kv_cache_section, peak_flops_for,
                                            validate_profile)
from pernode.measure.profile.roofline import crossover_batch_size, place_on_roofline, roofline_time_s

DEFAULT_MEMORY_UTILIZATION = 0.9  # as vLLM's gpu_memory_utilization: the rest is activations and workspace


def project_profile(profile: Profile, accelerator_name: str,
                    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION) -> Profile:
    """A new profile: `profile`'s points rescaled to `accelerator_name` (a key of PUBLISHED_ACCELERATORS).

    KV capacity on the target = memory_utilization * memory - weight bytes, in the source's block size and
    context length. Measured serve runs and mixed-step points (how this CPU runs decodes and prompt chunks in one
    step) do not carry over and are dropped.
    """
    validate_profile(profile)
    if profile["kind"] != "measured":
        raise ValueError(f"profile.kind = {profile['kind']!r}: project from a measured profile, not from a "
                         f"projection (errors would compound)")
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization = {memory_utilization}: must be in (0, 1]")
    src_hw, dst_hw = profile["hardware"], hardware_section(accelerator_name)
    dtype = profile["model"]["dtype"]
    src_peak, src_key = peak_flops_for(src_hw, dtype)
    dst_peak, dst_key = peak_flops_for(dst_hw, dtype)
    src_bw, dst_bw = src_hw["peak_bandwidth_gbs"], dst_hw["peak_bandwidth_gbs"]

    def rescale(time_s: float, flops: float, bytes_moved: float) -> tuple[float, float]:
        roof_src = roofline_time_s(flops, bytes_moved, src_bw, src_peak)
        roof_dst = roofline_time_s(flops, bytes_moved, dst_bw, dst_peak)
        return time_s * roof_dst / roof_src, roof_src / time_s

    decode = []
    for p in profile["decode"]:
        step_s, eff = rescale(p["step_s"], p["flops_per_step"], p["bytes_per_step"])
        rp = place_on_roofline(p["flops_per_step"], p["bytes_per_step"], step_s, dst_bw, dst_peak)
        decode.append({**p, "step_s": step_s, "output_tokens_per_s": p["batch_size"] / step_s,
                       "achieved_gbs": rp.achieved_gbs, "achieved_flops": rp.achieved_flops,
                       "fraction_of_peak": rp.fraction_of_peak, "bound": rp.bound,
                       "measured_step_s": p["step_s"], "roofline_efficiency": eff})
    prefill = []
    for p in profile["prefill"]:
        ttft_s, eff = rescale(p["ttft_s"], p["flops"], p["bytes"])
        rp = place_on_roofline(p["flops"], p["bytes"], ttft_s, dst_bw, dst_peak)
        prefill.append({**p, "ttft_s": ttft_s, "prefill_tokens_per_s": p["prompt_len"] / ttft_s,
                        "achieved_flops": rp.achieved_flops, "achieved_gbs": rp.achieved_gbs,
                        "arithmetic_intensity": rp.arithmetic_intensity,
                        "fraction_of_peak": rp.fraction_of_peak, "bound": rp.bound,
                        "measured_ttft_s": p["ttft_s"], "roofline_efficiency": eff})

    model = profile["model"]
    src_kv = profile["kv_cache"]
    warnings = []
    kv_bytes = memory_utilization * dst_hw["memory_bytes"] - model["weight_bytes"]
    if kv_bytes <= 0:
        warnings.append(f"weights ({model['weight_bytes'] / 1e9:.1f} GB) do not fit in {memory_utilization:.0%} "
                        f"of {dst_hw['name']}'s {dst_hw['memory_bytes'] / 2**30:.0f} GiB; KV capacity is 0")
    kv_cache = kv_cache_section(kv_bytes, src_kv["block_size"], model["kv_bytes_per_token"], src_kv["context_len"])

    cfg = config_from_model_section(model)
    context_len = Counter(p["context_len"] for p in profile["decode"]).most_common(1)[0][0]
    crossover = crossover_batch_size(cfg, context_len, dst_bw, dst_peak,
                                     weight_bytes_per_param=model["weight_bytes"] / model["num_params"],
                                     kv_bytes_per_element=model["kv_bytes_per_token"] / cfg.kv_bytes_per_token(1))

    out = copy.deepcopy(profile)
    out.pop("mixed", None)
    out.update({
        "kind": "projected",
        "projected_from": {
            "hardware_name": src_hw["name"], "device": src_hw["device"], "created_at": profile["created_at"],
            "peak_bandwidth_gbs": src_bw, "peak_flops": src_peak, "peak_flops_key": src_key,
            "target_peak_flops_key": dst_key, "memory_utilization": memory_utilization,
            "method": "step_s * roofline_time(target) / roofline_time(measured), "
                      "roofline_time = max(bytes / bandwidth, flops / peak_flops)",
            "warnings": warnings,
        },
        "hardware": dst_hw, "kv_cache": kv_cache, "decode": decode, "prefill": prefill,
        "crossover_batch_size": crossover, "memory_high_water_bytes": None, "serve_runs": [],
    })
    return validate_profile(out)
