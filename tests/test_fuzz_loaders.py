"""Untrusted model files: a crafted or damaged GGUF fails with a ValueError naming the field, in time and memory
bounded by the file's size (gguf.GGUFReader itself checks no bounds)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pernode.serve.models.gguf_file import GGUFFile
from pernode.serve.models.gguf_header import validate_gguf_header

STRING, ARRAY, UINT32 = 8, 9, 4


def _header(tensor_count: int, kv_count: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def crafted_57_bytes() -> bytes:
    """One key whose value is an array of 2**62 uint32: GGUFReader reads past the end of the file as empty arrays,
    so it loops 2**62 times, appending one to a list each time."""
    data = _header(0, 1) + _key("evil.keys") + struct.pack("<IIQ", ARRAY, UINT32, 2**62)
    assert len(data) == 57
    return data


def write_tiny_gguf(path: str) -> str:
    """A small valid llama GGUF (~1.5 KB): scalar, string and array metadata, an F32 and a Q8_0 tensor."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_vocab_size(4)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c", "</s>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_eos_token_id(3)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.normal(size=(4, 8)).astype(np.float32))
    q8 = gguf.quants.quantize(rng.normal(size=(8, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_everything(path: str) -> None:
    """What a load does with a GGUF: header, config, every tensor dequantized."""
    f = GGUFFile(path)
    f.model_config()
    for _ in f.iter_tensors():
        pass


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    path = write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))
    load_everything(path)  # valid as written
    with open(path, "rb") as f:
        return f.read()


def test_crafted_57_byte_gguf_fails_fast_in_bounded_memory(tmp_path):
    path = tmp_path / "evil.gguf"
    path.write_bytes(crafted_57_bytes())
    # In a child allowed 512 MiB more address space than its imports took: before the header check
    # GGUFReader looped here until it ran out.
    code = textwrap.dedent(f"""
        import os, resource
        from pernode.serve.models.gguf_file import GGUFFile
        limit = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + (512 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            GGUFFile({str(path)!r})
        except ValueError as e:
            print("ValueError:", e)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ValueError:" in done.stdout and "'evil.keys' array length = 4611686018427387904" in done.stdout


@pytest.mark.parametrize("data, message", [
    (_header(0, 2**60), r"kv_count = 1152921504606846976 is out of range"),
    (_header(2**40, 0), r"tensor_count = 1099511627776 is out of range"),
    (_header(0, 1) + struct.pack("<Q", 2**50) + b"x" * 16, r"key #0 length = 1125899906842624 is out of range"),
    (_header(0, 1) + _key("general.name") + struct.pack("<IQ", STRING, 10**9) + b"abc",
     r"key 'general.name' length = 1000000000 is out of range"),
    (_header(0, 1) + _key("a.b") + struct.pack("<IIQ", ARRAY, UINT32, 2**40) + b"\0" * 8,
     r"key 'a.b' array length = 1099511627776 is out of range"),
    (_header(0, 1) + _key("a.b") + struct.pack("<I", 77) + b"\0" * 8, r"key 'a.b' type = 77 is not a GGUF value"),
    (_header(0, 2) + _key("a") + struct.pack("<II", UINT32, 1) + _key("a") + struct.pack("<II", UINT32, 1),
     r"key 'a' appears twice"),
    (_header(0, 1) + _key("general.alignment") + struct.pack("<II", UINT32, 3) + b"\0" * 8,
     r"general.alignment = 3"),
    (_header(1, 0) + _key("w") + struct.pack("<I", 1) + struct.pack("<Q", 2**40) + struct.pack("<IQ", 0, 0),
     r"tensor 'w' .* ends at byte \d+, past the end of the file"),
    (_header(1, 0) + _key("w") + struct.pack("<IQ", 1, 4) + struct.pack("<IQ", 0, 7) + b"\0" * 64,
     r"tensor 'w' offset = 7 is not a multiple of the alignment 32"),
    (_header(1, 0) + _key("w") + struct.pack("<I", 9) + b"\0" * 80, r"tensor 'w' n_dims = 9 is out of range"),
    (b"GGML" + b"\0" * 30, r"magic = b'GGML'"),
    (_header(0, 0, version=99), r"version = 99 is not supported"),
    (b"GGUF\3\0\0\0", r"the file is 8 bytes, shorter than the 24-byte header"),
])
def test_bad_header_fields_are_named(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        GGUFFile(path)


def test_every_truncation_of_a_valid_file_is_a_value_error(tmp_path, tiny_gguf):
    path = str(tmp_path / "cut.gguf")
    with open(path, "wb") as f:
        f.write(tiny_gguf)
    data_end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(path).tensors)  # then only padding
    for length in range(data_end):
        with open(path, "wb") as f:
            f.write(tiny_gguf[:length])
        with pytest.raises(ValueError, match="invalid GGUF|GGUF"):
            load_everything(path)


def test_valid_file_passes_the_header_check(default_gguf_path):
    validate_gguf_header(default_gguf_path)  # the real 135M model: every field in range


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_raises_only_value_error(tmp_path, tiny_gguf, data):
    """Random byte overwrites (biased to the header, where lengths and counts live) and truncations."""
    header_end = len(tiny_gguf) - 8 * 4 * 4 - 8 * 34  # where the tensor data starts, roughly
    blob = bytearray(tiny_gguf)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        pos = data.draw(st.integers(0, header_end), label="position")
        blob[pos:pos + 1] = bytes([data.draw(st.integers(0, 255), label="byte")])
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob)), label="length")]
    path = str(tmp_path / "mutated.gguf")
    with open(path, "wb") as f:
        f.write(bytes(blob))
    try:
        load_everything(path)
    except ValueError:
        pass
    assert os.path.getsize(path) == len(blob)
