"""Distillation measured as served: a `pernode distill` run, then the teacher's and the students' decode speed at
batch 1 and batch 32 in the same process, round-robin, best of `rounds` (a shared CPU's load moves absolute numbers;
interleaving hits every model alike), and the report's "distillation" section."""
from __future__ import annotations

import json
import os

from pernode.measure.profile.decode_speed import (decode_blocks_needed, decode_engine, decode_tokens_per_s,
                                                  weight_bytes_per_token)
from pernode.shrink.distill import DistillConfig, StudentSpec, TrainingConfig, distill

RESULT_JSON = "distill.json"


def decode_speeds(models: dict[str, str], batches: tuple[int, ...] = (1, 32), steps: int = 16, rounds: int = 2
                  ) -> dict[str, dict]:
    """{name: {"b1_tok_s": .., "b32_tok_s": .., "weight_mb_per_token": ..}} for model paths, measured together."""
    num_blocks = max(decode_blocks_needed(b, steps) for b in batches)
    engines = {name: decode_engine(path, num_blocks) for name, path in models.items()}
    best = {name: {b: 0.0 for b in batches} for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            for b in batches:
                best[name][b] = max(best[name][b], decode_tokens_per_s(engine, b, steps))
    out = {}
    for name, engine in engines.items():
        out[name] = {f"b{b}_tok_s": round(best[name][b], 2) for b in batches}
        out[name]["weight_mb_per_token"] = round(weight_bytes_per_token(engine.model) / 1e6, 1)
    first = next(iter(out))
    for name in out:  # speed-up over the first model (the teacher), per batch size
        for b in batches:
            out[name][f"b{b}_speedup"] = round(out[name][f"b{b}_tok_s"] / out[first][f"b{b}_tok_s"], 3)
    return out


def run_distillation(config: DistillConfig, measure_speed: bool = True, speed_rounds: int = 2, log=print) -> dict:
    """`distill(config)`, then decode speeds of teacher, KD student (and the hard-label student); the result is
    written to OUT/distill.json and returned."""
    result = distill(config, log)
    if measure_speed:
        log("decode speed: teacher and student, batch 1 and 32, same run")
        result["decode"] = decode_speeds({"teacher": config.teacher, "student": config.out}, rounds=speed_rounds)
    with open(os.path.join(config.out, RESULT_JSON), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def quick_report_config(teacher: str, out_dir: str) -> DistillConfig:
    """The report's own run when no recorded result exists: seconds-scale, enough to show the mechanism (a 2-layer
    student, 12 steps), not to produce a useful draft."""
    return DistillConfig(teacher=teacher, out=out_dir, student=StudentSpec(keep_layers=2),
                         training=TrainingConfig(steps=12, batch_size=2, lr=1e-3, warmup_steps=2),
                         seq_len=64, top_k=32, seq_kd_prompts=0, eval_seq_len=256, eval_windows=2, quiet=True)


def distillation_report(teacher: str, report_dir: str, log=print) -> dict:
    """The report's section. A real distillation takes tens of minutes on a CPU node, longer than a report should,
    so the report shows a recorded run, REPORT_DIR/distill/distill.json (`pernode distill --out
    REPORT_DIR/distill`), when one exists for this teacher; otherwise it makes a very short run (a 2-layer student,
    12 steps; about a minute) that shows the mechanism and says so."""
    folder = os.path.join(report_dir, "distill")
    recorded = os.path.join(folder, RESULT_JSON)
    if os.path.isfile(recorded):
        with open(recorded, encoding="utf-8") as f:
            result = json.load(f)
        if result.get("teacher") == teacher:
            result["source"] = f"Recorded run: {recorded}."
            return distillation_section(result)
    log("distillation: no recorded run in the report folder; a 12-step run shows the mechanism")
    result = run_distillation(quick_report_config(teacher, os.path.join(report_dir, "distill-short")), speed_rounds=1,
                              log=log)
    result["source"] = ("A 12-step run inside the report; record a real one with "
                        f"`pernode distill --model {teacher} --out {folder}`.")
    return distillation_section(result)


def distillation_section(result: dict) -> dict:
    """The report's "distillation" section: sizes, perplexity beside the teacher's, KD vs hard labels, speed."""
    ppl, stdlib = result["perplexity_pydoc"], result.get("perplexity_stdlib_heldout", {})
    speed = result.get("decode", {})
    steps = result["config"]["training"]["steps"]

    def row(name, key, params):
        s = speed.get("teacher" if key == "teacher" else "student" if key == "student_kd" else "", {})
        return [name, round(params / 1e6, 1), ppl.get(key), stdlib.get(key), s.get("b1_tok_s"), s.get("b32_tok_s")]

    rows = [row("teacher", "teacher", result["teacher_non_embedding_params"]),
            row("student before training", "student_init", result["student_non_embedding_params"]),
            row(f"student, hard labels, {steps} steps", "student_hard_labels", result["student_non_embedding_params"]),
            row(f"student, KD, {steps} steps", "student_kd", result["student_non_embedding_params"])]
    rows = [r for r in rows if r[2] is not None]
    text = (f"Student: teacher layers {result['student_layers']}, {100 * result['param_ratio']:.0f}% of the teacher's "
            f"non-embedding parameters. ")
    if "kd_improvement_pct" in result:
        gain = result["kd_improvement_pct"]
        text += (f"At equal steps, KD {'lowers' if gain > 0 else 'raises'} held-out perplexity by {abs(gain):.1f}% "
                 "against hard labels. ")
    text += result.get("source", "")
    return {"title": "Distillation: a smaller student from the served model (held-out perplexity, decode tok/s)",
            "text": text,
            "columns": ["model", "non-embedding M params", "ppl pydoc (held out)", "ppl stdlib (held out)",
                        "batch-1 tok/s", "batch-32 tok/s"],
            "rows": rows}
