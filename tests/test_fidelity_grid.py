"""benchmarks/fidelity_grid.py: the commands it runs and the table it prints (the grid itself is a benchmark)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fidelity_grid.py")
_spec = importlib.util.spec_from_file_location("fidelity_grid", _PATH)
grid = importlib.util.module_from_spec(_spec)
sys.modules["fidelity_grid"] = grid  # dataclasses look their module up
_spec.loader.exec_module(grid)


def _validation(err_ttft: float) -> dict:
    same = {"ttft_p50_ms": 100.0, "tpot_p50_ms": 50.0, "goodput_rps": 1.0, "ttft_p99_ms": 300.0, "tpot_p99_ms": 80.0}
    measured = {**same, "ttft_p50_ms": 100.0 * (1 + err_ttft / 100)}
    return {"workload": {"rate_rps": 0.6, "num_prompts": 120}, "predicted_same_trace": same, "measured": measured,
            "error_pct_same_trace": {k: 100 * (measured[k] - v) / v for k, v in same.items()},
            "interval_position": {"ttft_p50_ms": "above", "tpot_p50_ms": "inside"},
            "cpu_cores_used": {"ours_cores": 1.9, "others_cores": 0.05}, "load_average_before_after": [0.4, 1.8]}


def test_table_marks_each_figure_against_the_targets():
    md = grid.table([("chat", 30, _validation(4.0)), ("rag", 90, _validation(15.0))])
    lines = md.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|")
    assert "100.0 / 104.0 (+4.0% ✓; above)" in lines[2]  # TTFT p50 within 10%
    assert "100.0 / 115.0 (+15.0% ✗; above)" in lines[3]  # beyond 10%
    assert "50.0 / 50.0 (+0.0% ✓; inside)" in lines[2] and "| 1.90 / 0.05 | 0.40–1.80 |" in lines[2]
    # the run's speed window by window: its own table, only of the runs that have it
    v = _validation(4.0)
    windowed = {**v, "predicted_at_run_speed_by_window": v["predicted_same_trace"],
                "error_pct_at_run_speed_by_window": {**v["error_pct_same_trace"], "ttft_p50_ms": -12.0}}
    md = grid.table([("chat", 30, windowed), ("rag", 90, _validation(15.0))], "at_run_speed_by_window")
    assert "at the run's speed by window / measured" in md and len(md.splitlines()) == 3
    assert "(-12.0% ✗; above)" in md.splitlines()[2]


def test_dry_run_prints_the_pinned_commands(tmp_path, capsys):
    if len(os.sched_getaffinity(0) & {0, 1}) < 2:
        pytest.skip("the grid needs cores 0 and 1")
    assert grid.main(["--quick", "--dry-run", "--out-dir", str(tmp_path), "--shapes", "chat"]) == 0
    commands = (tmp_path / "commands.sh").read_text().splitlines()
    assert commands[0].startswith("taskset -c 0 ") and "--serving-path" in commands[0]
    assert "--num-threads 1" in commands[0] and " plan " in commands[1] and "--replicas 1" in commands[1]
    with pytest.raises(SystemExit, match="--loads"):
        grid.main(["--quick", "--dry-run", "--out-dir", str(tmp_path), "--loads", "120"])


def test_path_flags_measure_that_path_at_several_streams(tmp_path):
    if len(os.sched_getaffinity(0) & {0, 1}) < 2:
        pytest.skip("the grid needs cores 0 and 1")
    base = tmp_path / "base"
    base.mkdir()
    (base / "p_chat.json").write_text("{}")
    assert grid.main(["--quick", "--dry-run", "--out-dir", str(tmp_path / "r"), "--shapes", "chat", "--path", "ray",
                      "--profile-from", str(base)]) == 0
    profile = (tmp_path / "r" / "commands.sh").read_text().splitlines()[0]
    assert "--serving-path ray" in profile and "--serving-path-streams 1,2" in profile
    assert f"--serving-path-into {base / 'p_chat.json'}" in profile and "--batch-sizes" not in profile
    flags = grid.serving_path_flags("serve", grid.FULL_SHAPES[0], quick=False)
    assert flags[:4] == ["--serving-path", "serve", "--serving-path-streams", "1,2,4,8,16,32"]
    assert grid.serving_path_flags("ray", grid.FULL_SHAPES[1], quick=False)[3] == "1,2,4,8"  # long prompts
    assert "80" in flags  # the chat shape's middle prompt length
    with pytest.raises(SystemExit, match="SHAPE:PATH=FILE"):
        grid.rescore_recorded(str(tmp_path), ["chat=p.json"])


def test_the_grid_tabulates_where_ttft_goes():
    parts = {"measured": {"ttft_ms": 200.0, "way_in_and_out_ms": 10.0, "queue_ms": 30.0, "first_steps_ms": 160.0},
             "predicted": {"ttft_ms": 160.0, "way_in_and_out_ms": 2.0, "queue_ms": 18.0, "first_steps_ms": 140.0}}
    text = grid.ttft_parts_table([("chat", 30, {"ttft_parts": parts}), ("chat", 60, {})])
    assert "| chat 30% | 200.0 / 160.0 (+40.0) | 10.0 / 2.0 (+8.0) | 30.0 / 18.0 (+12.0) |" in text
    assert "chat 60%" not in text and grid.ttft_parts_table([("chat", 60, {})]) == ""


def test_the_grid_tabulates_each_run_request_by_request_and_how_well_it_pins_down_its_figures():
    agreement = {m: {"requests": 40, "median_ms": d, "p10_ms": d - 5, "p90_ms": d + 5, "median_abs_pct": 4.0}
                 for m, d in (("ttft_s", 12.5), ("tpot_s", -0.5), ("e2e_s", 30.0))}
    text = grid.request_table([("rag", 60, {"request_agreement_at_run_speed": agreement}), ("chat", 30, {})])
    assert "| rag 60% | at the run's speed | +12.5 (4.0%) | -0.5 (4.0%) | +30.0 (4.0%) |" in text
    assert "chat 30%" not in text and grid.request_table([("chat", 30, {})]) == ""
    # every request alike: resampling cannot move a figure; a spread of TPOTs moves its median
    same = [0.1] * 40
    spread = [0.01 * (k + 1) for k in range(40)]
    text = grid.measurement_spread_table([("chat", 30, {"measured_requests": {"ttft_s": same, "tpot_s": spread}})])
    row = text.splitlines()[2]
    assert row.startswith("| chat 30% | 40 | +0% .. +0% |")
    lo, hi = (int(x.strip().rstrip("%")) for x in row.split("|")[4].split(".."))
    assert -40 < lo < -5 and 5 < hi < 40
    assert grid.measurement_spread_table([("chat", 30, {})]) == ""
