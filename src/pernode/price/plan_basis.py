"""What a plan rests on: the measured numbers it was computed from, and, for a projected profile, the assumptions
that carried them to hardware nobody measured. Printed with every plan so a buyer can see what to re-measure."""
from __future__ import annotations

from typing import Mapping

from pernode.measure.profile.profile_schema import Profile
from pernode.price.step_time import StepTimeModel, serving_engine_ratio


def _points(rows: list, key: str) -> str:
    return ", ".join(f"{row[key]:g}" for row in rows if isinstance(row, Mapping) and key in row)


def measured_basis(profile: Profile, step_model: StepTimeModel) -> tuple[str, ...]:
    """One line per measured input of the plan: where and when it was measured, and at which points."""
    hardware = profile.get("hardware") or {}
    kind = str(profile.get("kind", "measured"))
    where = str(hardware.get("name", "unknown hardware"))  # a CPU's name carries its torch thread count
    when = profile.get("created_at", "an unknown date")
    verb = "projected to" if kind == "projected" else "measured on"
    decode = [r for r in profile.get("decode") or [] if isinstance(r, Mapping)]
    if step_model.decode_context_len is not None:
        decode = [r for r in decode if r.get("context_len") == step_model.decode_context_len]
    lines = [f"profile {verb} {where} at {when}",
             f"decode[] step times at batch {_points(decode, 'batch_size')}"
             + (f" (context {step_model.decode_context_len})" if step_model.decode_context_len else ""),
             f"prefill[] rates at prompt lengths {_points(profile.get('prefill') or [], 'prompt_len')}"]
    kv = profile.get("kv_cache") or {}
    lines.append(f"kv_cache: {kv.get('max_tokens')} tokens in blocks of {kv.get('block_size')}")
    serving = profile.get("serving_path")
    if isinstance(serving, Mapping):
        via = {"ray": "through Ray Serve's proxy into one pinned replica, at "
                      f"{_points(serving.get('streams') or [], 'streams')} concurrent streams",
               "serve": "straight to `pernode serve`"}.get(step_model.serving_path or "serve", "")
        curve = step_model.serving_curve_streams
        per_step = (f"per decode step {', '.join(f'{step_model.serving_decode_s(int(c)) * 1000:.2f}' for c in curve)} "
                    f"ms at {', '.join(str(int(c)) for c in curve)} streams (interpolated between them)"
                    if curve is not None else
                    f"{step_model.serving_token_s * 1000:.2f} ms per streamed token"
                    + (f" of each running request + {step_model.serving_step_s * 1000:.2f} ms per decode step"
                       if step_model.serving_step_s else ""))
        line = (f"serving_path: {step_model.serving_request_s * 1000:.1f} ms per request, " + per_step
                + f" (path {step_model.serving_path or 'serve'}: measured over HTTP on loopback, {via}"
                + (f"; {step_model.idle_start_s * 1000:.1f} ms more for a step that starts on an idle replica"
                   if step_model.idle_start_s else "")
                + (f"; the engine's step times x {serving_engine_ratio(profile):.3f}, its CPU time inside the "
                   f"serving process against the profile's" if serving_engine_ratio(profile) != 1.0 else ""))
        noisy = [what for what in ("request", "token")
                 if isinstance(serving.get(what), Mapping) and serving[what].get("below_noise")]
        negative = [what for what in ("request", "token") if isinstance(serving.get(what), Mapping)
                    and not serving[what].get("below_noise") and (serving[what].get("median_s") or 0) < 0]
        if noisy:  # paired measurements say when the difference could not be told from none
            line += f"; the {' and '.join(noisy)} term{'s' if len(noisy) > 1 else ''} below that run's noise"
        if negative:  # HTTP faster than the engine alone: the pairs were biased; planned as 0
            line += f"; the {' and '.join(negative)} term measured negative beyond the noise, taken as 0"
        lines.append(line + ")")
    else:
        lines.append("serving_path: not measured, taken as free (profile with --serving-path to include HTTP, "
                     "tokenizing and streaming)")
    return tuple(lines)


def projection_assumptions(profile: Profile) -> tuple[str, ...]:
    """What a projected profile assumed; empty for a measured one."""
    src = profile.get("projected_from")
    if profile.get("kind") != "projected" or not isinstance(src, Mapping):
        return ()
    target = (profile.get("hardware") or {}).get("name", "the target")
    out = [f"PROJECTION: no {target} was measured; every step time is the {src.get('hardware_name', 'source')} "
           f"measurement scaled by the roofline ({src.get('method', 'roofline ratio')})",
           "each point keeps the fraction of the roofline it reached on the measured node; per-step fixed costs "
           "(kernel launches, the Python scheduler) are scaled with it, not added",
           f"KV cache sized at memory_utilization {src.get('memory_utilization')} of the target's memory",
           "the serving path (HTTP, tokenizing, streaming) is carried over unchanged from the measured node"
           if isinstance(profile.get("serving_path"), Mapping) else
           "the serving path is not in the projection"]
    out += [str(w) for w in src.get("warnings") or ()]
    return tuple(out)
