"""Bench settings: text settings parsed in one place, bad values fail at construction naming the setting (which the
CLI shows as its flag), and both configs read back from their dicts."""
import argparse
import math

import pytest

from pernode.cli import command_flags, with_flags
from pernode.cli.bench import add_offline_arguments, add_serve_arguments, bench_config_from_args, offline_config_from_args
from pernode.measure.bench.config import BenchConfig, OfflineBenchConfig, parse_percentiles, parse_token_range


def test_token_range_and_percentiles():
    assert parse_token_range("512", "x") == (512, 512)
    assert parse_token_range("16:64", "x") == (16, 64)
    with pytest.raises(ValueError, match=r"^random_input_len='x': expected N or MIN:MAX tokens"):
        parse_token_range("x", "random_input_len")
    with pytest.raises(ValueError, match=r"^random_input_len='64:16': need 1 <= MIN <= MAX"):
        parse_token_range("64:16", "random_input_len")
    assert parse_percentiles("50, 99.9") == (50.0, 99.9)
    with pytest.raises(ValueError, match=r"^percentiles='50,101'"):
        parse_percentiles("50,101")


@pytest.mark.parametrize("settings, message", [
    ({"random_input_len": "x"}, "random_input_len='x'"),
    ({"random_output_len": "0"}, "random_output_len='0'"),
    ({"percentiles": "p99"}, "percentiles='p99'"),
    ({"num_prompts": 0}, "num_prompts=0"),
    ({"max_concurrency": 0}, "max_concurrency=0"),
    ({"request_rate": 0.0}, "request_rate=0.0"),
    ({"burstiness": math.inf}, "burstiness=inf"),
    ({"base_url": "localhost:8000"}, "base_url='localhost:8000'"),
    ({"dataset": "jsonl"}, "dataset_path"),
    ({"dataset": "sharegpt"}, "dataset='sharegpt'"),
])
def test_bench_config_names_the_setting(settings, message):
    with pytest.raises(ValueError) as e:
        BenchConfig(**settings)
    assert str(e.value).startswith(message)


def test_cli_shows_the_flag():
    for settings, shown in (({"max_concurrency": 0}, "--max-concurrency 0"),
                            ({"random_input_len": "x"}, "--random-input-len 'x'"),
                            ({"peers": ("vllm",)}, "--peers vllm")):
        with pytest.raises(ValueError) as e:
            (OfflineBenchConfig if "peers" in settings else BenchConfig)(**settings)
        command = ("bench", "offline") if "peers" in settings else ("bench", "serve")
        assert with_flags(str(e.value), command_flags(*command)).startswith(shown)


def test_bench_config_round_trip():
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(
        ["--random-input-len", "16:32", "--percentiles", "50,99.9", "--max-concurrency", "4"])
    config = bench_config_from_args(args)
    assert config.input_len_range == (16, 32) and config.percentile_values == (50.0, 99.9)
    assert math.isinf(config.request_rate)
    assert BenchConfig.from_dict(config.to_dict()) == config
    assert BenchConfig.from_dict({**config.to_dict(), "request_rate": "inf"}) == config  # as result files write it
    assert BenchConfig(base_url="http://h:1/v1/").server_url == "http://h:1"
    with pytest.raises(ValueError, match="unknown bench settings"):
        BenchConfig.from_dict({"rate": 1})


def test_offline_config_from_flags_and_round_trip():
    p = add_offline_arguments(argparse.ArgumentParser())
    config = offline_config_from_args(p.parse_args(["--input-len", "8:16", "--output-len", "4", "--peers", "none",
                                                    "--also-dtypes", "bfloat16", "--hf-batch-sizes", "4,8"]))
    assert config.peers == () and config.also_dtypes == ("bfloat16",) and config.hf_batch_sizes == (4, 8)
    assert config.input_len_range == (8, 16) and config.output_len_range == (4, 4)
    assert OfflineBenchConfig.from_dict(config.to_dict()) == config
    assert offline_config_from_args(p.parse_args([])) == OfflineBenchConfig()  # the flags' defaults are the config's
    with pytest.raises(ValueError, match=r"^output_len='16:8'"):
        OfflineBenchConfig(output_len="16:8")
    with pytest.raises(ValueError, match="--hf-batch-sizes"):
        offline_config_from_args(p.parse_args(["--hf-batch-sizes", "8,x"]))
