"""Quantize-and-measure runs (`pernode.jobs.compare_quantized`), as the report and the benchmark use them (tiny model)."""
from __future__ import annotations

import os

import pytest

from pernode.jobs.compare_quantized import build_and_score, measure_speeds
from pernode.jobs.report import _quantization_section
from pernode.serve.kernels.quant_linear import QuantLinear
from pernode.serve.models.loader import load_model
from pernode.shrink.recipes import recipes_named
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("cmp") / "tiny"), tiny_config())


def test_build_score_and_time_checkpoints(tiny_folder, tmp_path):
    seen = []
    recipes = recipes_named(["fp32", "rtn-int8", "rtn-int4-g64+lm8"])
    rows = build_and_score(tiny_folder, recipes, str(tmp_path), seq_len=64,
                           windows=2, progress=lambda r: seen.append(r["name"]))
    assert seen == ["fp32", "rtn-int8", "rtn-int4-g64+lm8"]
    fp32, int8, int4 = rows
    assert fp32["path"] == tiny_folder and os.path.isdir(int4["path"])
    assert isinstance(load_model(int4["path"])[0].lm_head, QuantLinear)  # the checkpoint is what was measured
    # the +lm8 checkpoint stores an int8 lm_head beside the float embedding (on this tiny model, most of it)
    assert int8["checkpoint_mb"] < fp32["checkpoint_mb"] < int4["checkpoint_mb"]
    assert fp32["ppl_tokens"] == 2 * 63 and fp32["ppl_decode_path"] == pytest.approx(fp32["ppl"], rel=1e-4)
    assert int8["ppl"] == pytest.approx(fp32["ppl"], rel=0.05)  # int8 per channel barely moves a random model
    assert measure_speeds(rows, steps1=2, steps64=None, rounds=1) is None  # no peer asked for
    assert all(r["decode_b1_tok_s"] > 0 and r["decode_b64_tok_s"] is None for r in rows)
    assert int4["weight_mb_per_token"] < int8["weight_mb_per_token"] < fp32["weight_mb_per_token"]

    section = _quantization_section(rows)
    assert [r[0] for r in section["rows"]] == ["fp32", "rtn-int8", "rtn-int4-g64+lm8"]
    assert section["rows"][0][4] == "+0.00%" and "<img" in section["html"]


def test_unknown_configuration_lists_the_known_ones():
    with pytest.raises(ValueError, match="allowed fp32, rtn-int8"):
        recipes_named(["fp32", "rtn-int3"])
