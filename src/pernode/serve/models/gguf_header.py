"""A bounds-checked walk of a GGUF file's header, before `gguf.GGUFReader` (which checks no bounds) reads it.

An untrusted GGUF can claim a kv count, a string or array length or a tensor size far beyond the file: the reader
then loops or allocates until memory runs out (a 57-byte file is enough). This walk reads the header the way
llama.cpp's gguf.cpp does, checks every count, length and offset against the bytes the file really has, and
raises a ValueError naming the field, so the work and memory of a load stay bounded by the file's size.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", uint32 version, uint64 tensor
count, uint64 kv count; kv pairs (string key, uint32 type, value); tensor infos (string name, uint32 n_dims, uint64
dims[n_dims], uint32 type, uint64 offset); padding to `general.alignment`; tensor data.
"""
from __future__ import annotations

import mmap
import os
import struct

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf.GGUFReader reads
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4  # arrays of arrays: llama.cpp reads none; gguf-py writes them, so allow a little

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# Fewest bytes one element of each type takes: a string is at least its 8-byte length, an array its type + count.
_MIN_SIZE = {t: struct.calcsize("<" + f) for t, f in _SCALAR_FORMATS.items()}
_MIN_SIZE[GGUFValueType.STRING] = 8
_MIN_SIZE[GGUFValueType.ARRAY] = 12
_MIN_KV_SIZE = 8 + 4 + 1  # key length, type, a one-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Walker:
    def __init__(self, path: str, data: mmap.mmap | bytes, size: int) -> None:
        self.path, self.data, self.size, self.offset = path, data, size, 0
        self.order = "<"

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: invalid GGUF: {what} (the file is {self.size} bytes)")

    def need(self, nbytes: int, field: str) -> None:
        if nbytes > self.size - self.offset:
            raise self.fail(f"{field} needs {nbytes} bytes at offset {self.offset}, "
                            f"only {self.size - self.offset} remain")

    def read(self, fmt: str, field: str) -> int | float | bool:
        nbytes = struct.calcsize("<" + fmt)
        self.need(nbytes, field)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += nbytes
        return value

    def count(self, field: str, min_item_size: int) -> int:
        """A uint64 count of items of at least `min_item_size` bytes each, checked against the bytes left."""
        n = self.read("Q", field)
        left = self.size - self.offset
        if n * min_item_size > left:
            raise self.fail(f"{field} = {n} is out of range: {left} bytes remain, room for at most "
                            f"{left // min_item_size} (each takes >= {min_item_size} bytes)")
        return n

    def string(self, field: str) -> str:
        length = self.count(f"{field} length", 1)
        raw = bytes(self.data[self.offset:self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{field} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value_type(self, field: str) -> GGUFValueType:
        raw = self.read("I", f"{field} type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            allowed = ", ".join(f"{t.value} ({t.name})" for t in GGUFValueType)
            raise self.fail(f"{field} type = {raw} is not a GGUF value type: allowed {allowed}") from None

    def value(self, vtype: GGUFValueType, field: str, depth: int = 0) -> object:
        if vtype == GGUFValueType.STRING:
            return self.string(field)
        if vtype != GGUFValueType.ARRAY:
            return self.read(_SCALAR_FORMATS[vtype], field)
        item_type = self.value_type(f"{field} array item")
        if item_type == GGUFValueType.ARRAY and depth + 1 >= MAX_ARRAY_NESTING:
            raise self.fail(f"{field}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        n = self.count(f"{field} array length", _MIN_SIZE[item_type])
        if item_type in _SCALAR_FORMATS:  # fixed size: checked by count(), skipped in one step
            self.offset += n * _MIN_SIZE[item_type]
            return None
        for i in range(n):
            self.value(item_type, f"{field}[{i}]", depth + 1)
        return None


def validate_gguf_header(path: str | os.PathLike[str]) -> None:
    """ValueError naming the first field of the GGUF header that is malformed or points past the end of the file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: invalid GGUF: the file is {size} bytes, shorter than the 24-byte header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk(_Walker(path, data, size))


def _walk(w: _Walker) -> None:
    magic = bytes(w.data[:4])
    if magic != GGUF_MAGIC:
        raise w.fail(f"magic = {magic!r}, expected {GGUF_MAGIC!r}")
    w.offset = 4
    version = w.read("I", "version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order, as gguf.GGUFReader accepts
        w.order, w.offset = ">", 4
        version = w.read("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise w.fail(f"version = {version} is not supported: allowed {', '.join(map(str, SUPPORTED_VERSIONS))}")
    tensor_count = w.read("Q", "tensor_count")
    kv_count = w.count("kv_count", _MIN_KV_SIZE)
    if tensor_count * _MIN_TENSOR_INFO_SIZE > w.size - w.offset:
        raise w.fail(f"tensor_count = {tensor_count} is out of range: {w.size - w.offset} bytes remain, room for "
                     f"at most {(w.size - w.offset) // _MIN_TENSOR_INFO_SIZE} tensor infos")

    alignment = DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for i in range(kv_count):
        key = w.string(f"key #{i}")
        if key in keys:
            raise w.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = w.value_type(f"key {key!r}")
        value = w.value(vtype, f"key {key!r}")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32 or value == 0 or value & (value - 1):
                raise w.fail(f"general.alignment = {value!r} ({vtype.name}): allowed a uint32 power of two")
            alignment = value

    tensors = []
    names: set[str] = set()
    for i in range(tensor_count):
        name = w.string(f"tensor #{i} name")
        if name in names:
            raise w.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = w.read("I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} n_dims = {n_dims} is out of range: allowed 1..{MAX_DIMS}")
        dims = [w.read("Q", f"tensor {name!r} dims[{d}]") for d in range(n_dims)]
        raw_type = w.read("I", f"tensor {name!r} type")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise w.fail(f"tensor {name!r} type = {raw_type} is not a GGML tensor type") from None
        if dims[0] % block_size:
            raise w.fail(f"tensor {name!r} dims[0] = {dims[0]} is not a multiple of {qtype.name}'s block of "
                         f"{block_size} values")
        n_elements = 1
        for d in dims:
            n_elements *= d
        offset = w.read("Q", f"tensor {name!r} offset")
        if offset % alignment:
            raise w.fail(f"tensor {name!r} offset = {offset} is not a multiple of the alignment {alignment}")
        tensors.append((name, dims, n_elements // block_size * type_size, offset))

    data_start = -(-w.offset // alignment) * alignment
    for name, dims, nbytes, offset in tensors:
        end = data_start + offset + nbytes
        if end > w.size:
            raise w.fail(f"tensor {name!r} (dims {dims}, {nbytes} bytes at data offset {offset}) ends at byte "
                         f"{end}, past the end of the file")
