"""The `pernode` command line on a tiny model: generate streams text, chat answers turns from stdin, bad input
gets one clear line and exit status 2."""
import os
import subprocess
import sys

import pytest

from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("cli") / "llama"))


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "pernode.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_generate_streams_the_continuation(tiny_dir):
    from pernode import LLM, SamplingParams

    expected = LLM(tiny_dir, num_blocks=64, max_model_len=256, dtype="float32").generate(
        ["Hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].text
    r = run_cli("generate", "Hello there", "--model", tiny_dir, "--max-tokens", "8", "--num-blocks", "64",
                "--max-model-len", "256", "--dtype", "float32")  # fp32: the default is bf16 on bf16-capable CPUs
    assert r.returncode == 0, r.stderr
    assert expected.strip() and expected.strip() in r.stdout
    # K and V: 2 layers x 2 kv heads x 16 dims x 2 bytes (float16, the cache under fp32 compute) x 2
    assert "KV cache: 256 bytes/token (float16)" in r.stderr
    assert "64 blocks" in r.stderr


def test_chat_reads_turns_until_an_empty_line(tiny_dir):
    r = run_cli("chat", "--model", tiny_dir, "--max-tokens", "4", "--num-blocks", "64", "--max-model-len", "256",
                stdin="hi\nagain\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model>") == 2


def test_bad_input_gives_one_clear_line_and_status_2(tiny_dir):
    r = run_cli("generate", "x", "--model", "no-such-model")
    assert r.returncode == 2
    assert "smollm2-135m" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "x", "--model", tiny_dir, "--temperature", "-1", "--num-blocks", "8")
    assert r.returncode == 2 and "--temperature -1.0" in r.stderr and "Traceback" not in r.stderr  # the setting, shown as its flag
