"""Methods as typed objects and recipes as data: options validated where they are declared, round trips through
dicts, and the command line giving each method only its own flags (no model needed)."""
from __future__ import annotations

import json
import logging

import pytest

from pernode.cli import build_parser, main
from pernode.cli.quantize import recipe_from_args
from pernode.quant_format import W8A8_SCHEME, QuantScheme
from pernode.shrink import AWQ, GPTQ, METHODS, RECIPES, RTN, W8A8, LLMInt8, Recipe, SmoothQuant, method_named
from pernode.shrink.methods import modifier_from_dict
from pernode.shrink.methods.gptq import Observer
from pernode.shrink.methods.lm_head import LM_HEAD_SCHEME


@pytest.mark.parametrize("make,message", [
    (lambda: GPTQ(damp_ratio=-1), "damp_ratio=-1: allowed > 0"),
    (lambda: GPTQ(block_size=0), "block_size=0: allowed >= 1"),
    (lambda: GPTQ(observer="median"), "observer='median': allowed minmax, mse, hmse"),
    (lambda: GPTQ(act_order="yes"), "act_order='yes': allowed True or False"),
    (lambda: AWQ(grid=0), "grid=0: allowed >= 1"),
    (lambda: SmoothQuant(alpha=1.5), "alpha=1.5: allowed a number in 0..1"),
    (lambda: SmoothQuant(alpha="best"), "alpha='best': allowed a number in 0..1"),
    (lambda: LLMInt8(threshold=0.0), "threshold=0.0: allowed > 0"),
])
def test_options_are_checked_where_the_method_declares_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_modifiers_round_trip_through_dicts():
    for modifier in (RTN(), GPTQ(damp_ratio=0.05, act_order=False, observer="mse"), AWQ(clip=False),
                     SmoothQuant(alpha="auto"), SmoothQuant(alpha=0.8, smooth_down=False), W8A8(), LLMInt8(5.0)):
        d = json.loads(json.dumps(modifier.to_dict()))
        assert modifier_from_dict(d) == modifier and d["method"] == modifier.name
    assert GPTQ(observer="mse").observer is Observer.MSE and GPTQ().observer == "hmse"
    assert set(METHODS) == {"rtn", "gptq", "awq", "smoothquant", "w8a8", "llm-int8"}


def test_an_option_of_another_method_is_refused_naming_who_takes_it():
    assert method_named("gptq", damp_ratio=0.05) == GPTQ(damp_ratio=0.05)
    with pytest.raises(ValueError, match=r"method 'awq' has no option 'damp_ratio' \(it is an option of gptq\)"):
        method_named("awq", damp_ratio=0.05)
    with pytest.raises(TypeError):
        AWQ(damp_ratio=0.05)  # the dataclass has no such field


def test_recipes_round_trip_and_check_their_parts():
    for recipe in RECIPES.values():
        assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert QuantScheme.from_dict(QuantScheme(4, 64, False).to_dict()) == QuantScheme(4, 64, False)
    lm8 = RECIPES["gptq-int4-g64+lm8"]
    assert lm8.modifier == GPTQ() and lm8.lm_head == LM_HEAD_SCHEME and lm8.label == "w4-g64 + lm_head w8-g32"
    assert RECIPES["fp32"].is_float and RECIPES["fp32"].label == "fp32" and not RECIPES["fp32"].needs_calibration
    assert RECIPES["smoothquant-w8a8-auto"].modifier == SmoothQuant(alpha="auto")
    with pytest.raises(ValueError, match="scheme=w4-g64: method smoothquant runs int8"):
        Recipe("bad", QuantScheme(4, 64), SmoothQuant())
    with pytest.raises(ValueError, match="allowed both"):
        Recipe("bad", QuantScheme(8))
    with pytest.raises(ValueError, match="scheme fields"):
        QuantScheme.from_dict({"num_bits": 8, "bogus": 1})


def _args(*flags):
    return build_parser().parse_args(["quantize", "--model", "m", "--out", "o", *flags])


def test_cli_gives_a_method_only_its_own_flags():
    recipe = recipe_from_args(_args("--method", "gptq", "--bits", "4", "--group-size", "64", "--damp", "0.05",
                                    "--no-act-order", "--observer", "minmax", "--quantize-lm-head"))
    assert recipe.modifier == GPTQ(damp_ratio=0.05, act_order=False, observer="minmax")
    assert recipe.scheme == QuantScheme(4, 64) and recipe.lm_head == LM_HEAD_SCHEME
    assert recipe_from_args(_args("--method", "awq", "--bits", "4", "--group-size", "64")).modifier == AWQ()
    assert recipe_from_args(_args("--method", "awq", "--no-clip")).modifier == AWQ(clip=False)
    sq = recipe_from_args(_args("--method", "smoothquant", "--alpha", "auto"))
    assert sq.modifier == SmoothQuant(alpha="auto") and sq.scheme == W8A8_SCHEME
    assert recipe_from_args(_args("--method", "llm-int8", "--outlier-threshold", "4")).modifier == LLMInt8(4.0)
    assert recipe_from_args(_args()).modifier == RTN()  # the defaults: rtn, int8 per channel
    with pytest.raises(ValueError, match="--damp applies to --method gptq only, not --method awq"):
        recipe_from_args(_args("--method", "awq", "--damp", "0.05"))
    with pytest.raises(ValueError, match="--alpha applies to --method smoothquant only"):
        recipe_from_args(_args("--method", "w8a8", "--alpha", "0.5"))
    with pytest.raises(ValueError, match="--calib-windows calibrate"):
        recipe_from_args(_args("--method", "rtn", "--calib-windows", "4"))


def test_cli_refuses_a_flag_of_another_method_in_one_line(caplog):
    with caplog.at_level(logging.ERROR, logger="pernode"):
        assert main(["quantize", "--model", "m", "--out", "o", "--method", "awq", "--damp", "0.05"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["--damp applies to --method gptq only, not --method awq"]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pernode"):
        assert main(["quantize", "--model", "m", "--out", "o", "--method", "smoothquant", "--alpha", "2"]) == 2
    assert "--alpha 2.0: allowed a number in 0..1" in caplog.text
