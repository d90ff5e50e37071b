"""A GGUF's header, metadata and tensor infos, read by our own parser (layout.py builds the MoE layout
from it; `bench` sizes stock placements from its tensor sizes).

The header parser is our own, not `gguf.GGUFReader`: the reader walks arrays element by element in
Python without bounding a count by the file size, so one flipped byte in an array length makes it
spin for hours. Here every length and count is checked against the bytes left before it is used, and
a sample of every float tensor's values or block scales is checked to be finite. Split from
layout.py, unchanged but for the names other modules use (read_header, Header, TensorInfo,
MetadataArray; they were private).
"""

import hashlib
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from ..errors import UserError
from ..files import file_kind

GGUF_VERSIONS = (2, 3)  # what llama.cpp's gguf.cpp reads


@dataclass(frozen=True)
class MetadataArray:
    length: int
    values: tuple[Any, ...] | None  # kept for short numeric arrays only


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    fingerprint: str


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


_V = gguf.GGUFValueType
# value types 0-7: UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL; 10-12: UINT64, INT64, FLOAT64
_SCALAR_FORMATS = {_V(i): fmt for i, fmt in enumerate("BbHhIif?")} | {_V(10): "Q", _V(11): "q", _V(12): "d"}
_KEPT_ARRAY_ITEMS = 4096
_MAX_STRING_VALUE_BYTES = 64 * 1024**2  # chat templates run to ~100 KiB; keys and tensor names to 64 KiB
_INT64_MAX = 2**63 - 1
_TOKENS_KEY = "tokenizer.ggml.tokens"  # llama-vocab.cpp asserts that its strings are distinct
_FLOAT_DTYPES = {_V.FLOAT32: "<f4", _V.FLOAT64: "<f8"}
_Q = gguf.GGMLQuantizationType
# where each block's float16 scales sit (byte offset in the block, how many): ggml-common.h
_BLOCK_SCALES = {
    _Q.Q4_0: (0, 1), _Q.Q4_1: (0, 2), _Q.Q5_0: (0, 1), _Q.Q5_1: (0, 2), _Q.Q8_0: (0, 1),
    _Q.Q2_K: (80, 2), _Q.Q3_K: (108, 1), _Q.Q4_K: (0, 2), _Q.Q5_K: (0, 2), _Q.Q6_K: (208, 1),
}  # fmt: skip
_FLOAT_TENSORS = {_Q.F32: "<f4", _Q.F16: "<f2", _Q.F64: "<f8"}
_SAMPLED_BLOCKS = 32  # per tensor: a few pages read, even of a 30B model's expert tensors
_WHOLE_TENSOR_BYTES = 1024**2  # norms, biases, routers: every value checked


class _Cursor:
    """Little-endian reads that never pass the end of the file: a flipped length fails at once."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.end, self.section = buf, 0, len(buf), "header"

    def need(self, n_bytes: int) -> None:
        if self.pos + n_bytes > self.end:
            raise _Truncated(f"in its {self.section} (needs byte {self.pos + n_bytes}, file has {self.end})")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size)
        self.pos += size
        return struct.unpack_from("<" + fmt, self.buf, self.pos - size)[0]

    def string(self, what: str, max_bytes: int = 2**16) -> str:
        n_bytes = self.scalar("Q")
        if n_bytes > max_bytes:  # checked before the copy: a flipped length must not allocate gigabytes
            raise _Corrupt(f"{what} at byte {self.pos - 8} claims {n_bytes} bytes")
        self.need(n_bytes)
        self.pos += n_bytes
        try:
            return self.buf[self.pos - n_bytes : self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {self.pos - n_bytes} is not UTF-8") from None

    def value(self, key: str) -> Any:
        vtype = _value_type(self.scalar("I"), key)
        if vtype == _V.STRING:
            return self.string(f"the value of {key}", _MAX_STRING_VALUE_BYTES)
        if vtype != _V.ARRAY:
            value = self.scalar(_SCALAR_FORMATS[vtype])
            if isinstance(value, float) and not math.isfinite(value):  # an eps or rope base: garbage out
                raise _Corrupt(f"{key} = {value} is not a finite number")
            return value
        item_type, length = _value_type(self.scalar("I"), key), self.scalar("Q")
        if item_type == _V.ARRAY:
            raise _Corrupt(f"{key} is an array of arrays")
        if item_type == _V.STRING:
            self.need(length * 8)  # each string has at least its 8-byte length: bounds the loop
            items = []
            for _ in range(length):
                n_bytes = self.scalar("Q")
                self.need(n_bytes)
                items.append(self.buf[self.pos : self.pos + n_bytes])
                self.pos += n_bytes
            _check_utf8(key, items)
            if key == _TOKENS_KEY:  # llama.cpp aborts (GGML_ASSERT) on a repeated token
                seen: set[bytes] = set()
                for index, item in enumerate(items):
                    token = item or f"[EMPTY_{index}]".encode()
                    if token in seen:
                        raise _Corrupt(f"{key} repeats the token {token!r} (at index {index})")
                    seen.add(token)
            return MetadataArray(length, None)
        fmt = _SCALAR_FORMATS[item_type]
        self.need(length * struct.calcsize(fmt))
        if item_type in _FLOAT_DTYPES and not key.startswith("tokenizer."):  # per-layer hparams
            data = self.buf[self.pos : self.pos + length * struct.calcsize(fmt)]  # a copy: see below
            if not np.isfinite(np.frombuffer(data, _FLOAT_DTYPES[item_type])).all():
                raise _Corrupt(f"{key} holds a value that is not a finite number")
        keep = length <= _KEPT_ARRAY_ITEMS
        values = struct.unpack_from(f"<{length}{fmt}", self.buf, self.pos) if keep else None
        self.pos += length * struct.calcsize(fmt)
        return MetadataArray(length, values)


def _check_utf8(key: str, items: list[bytes]) -> None:
    """Every string of an array is UTF-8, as GGUF says (gguf-py's reader, which `widen` uses, fails on
    others). One decode of them all, newline-separated: an item cut inside a multi-byte character
    cannot borrow the next item's bytes to look whole."""
    try:
        b"\n".join(items).decode("utf-8")
    except UnicodeDecodeError:
        index = next(i for i, item in enumerate(items) if not _is_utf8(item))
        raise _Corrupt(f"{key}[{index}] is not UTF-8 text") from None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _value_type(type_id: int, key: str) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(type_id)
    except ValueError:
        raise _Corrupt(f"{key} has unknown value type {type_id}") from None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse header, metadata and tensor infos; every failure is one UserError naming the file."""
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode  # a FIFO or a device: open() would block or read forever
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise UserError(f"{name} is {file_kind(mode)}, not a regular file; pass a .gguf model file")
        with open(name, "rb") as file:
            file_bytes = os.fstat(file.fileno()).st_size
            if file_bytes < 4:
                raise UserError(f"{name} is not a GGUF file (only {file_bytes} bytes); pass a .gguf model")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, name, file_bytes)
    except FileNotFoundError:
        raise UserError(f"{name} does not exist; pass the path of a .gguf model file") from None
    except IsADirectoryError:
        raise UserError(f"{name} is a directory; pass the path of a .gguf model file inside it") from None
    except PermissionError:
        raise UserError(f"cannot read {name}: permission denied; check the file's permissions") from None
    except _Truncated as error:
        raise UserError(f"{name} is truncated or corrupt {error}; re-download or re-create it") from None
    except (_Corrupt, ValueError, KeyError, IndexError, OverflowError, struct.error) as error:
        raise UserError(f"{name} is not a valid GGUF ({error}); re-download or re-create it") from None
    except OSError as error:
        raise UserError(f"cannot read {name}: {error.strerror or error}; check the path") from None


def _parse(buf: mmap.mmap, name: str, file_bytes: int) -> Header:
    if buf[:4] != b"GGUF":
        raise UserError(f"{name} is not a GGUF file (it starts with {buf[:4]!r}); pass a .gguf model")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("I")
    if version not in GGUF_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big") in GGUF_VERSIONS
        kind = "a big-endian GGUF" if swapped else f"GGUF version {version}"
        raise UserError(f"{name} is {kind}; llama.cpp reads little-endian GGUF v2/v3: re-convert the model")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    cur.section = "KV metadata"
    cur.need(n_kv * 13)  # the smallest KV: key length, type, a 1-byte value
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in metadata or not key.isprintable():
            raise _Corrupt(f"metadata key {key!r} is repeated or not printable")
        metadata[key] = cur.value(key)
    cur.section = "tensor infos"
    cur.need(n_tensors * 24)  # the smallest tensor info: name length, n_dims, type, offset
    infos = []
    for _ in range(n_tensors):
        tensor_name = cur.string("a tensor name")
        if not tensor_name.isprintable():
            raise _Corrupt(f"tensor name {tensor_name!r} is not printable")
        n_dims = cur.scalar("I")
        if n_dims > 4:
            raise _Corrupt(f"tensor {tensor_name!r} has {n_dims} dimensions (ggml has 4)")
        shape = tuple(cur.scalar("Q") for _ in range(n_dims))
        infos.append((tensor_name, shape, cur.scalar("I"), cur.scalar("Q")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for tensor_name, shape, type_id, rel_offset in infos:
        if tensor_name in tensors:
            raise _Corrupt(f"duplicate tensor {tensor_name!r}")
        ggml_type = gguf.GGMLQuantizationType(type_id)  # ValueError on an unknown type
        block, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        n_elements = math.prod(shape)
        if n_elements > _INT64_MAX or (shape[0] if shape else 1) % block or rel_offset % alignment:
            raise _Corrupt(f"tensor {tensor_name!r}: shape {shape} ({ggml_type.name}), offset {rel_offset}")
        n_bytes, offset = n_elements // block * type_bytes, data_start + rel_offset
        if offset + n_bytes > file_bytes:
            raise UserError(
                f"{name} is truncated: tensor {tensor_name} needs bytes up to {offset + n_bytes} but the "
                f"file has {file_bytes}; re-download or re-create it"
            )
        tensors[tensor_name] = TensorInfo(tensor_name, ggml_type, shape, n_elements, n_bytes, offset)
    bad = next((t.name for t in tensors.values() if not _sampled_blocks_finite(buf, t)), None)
    if bad is not None:
        raise _Corrupt(f"tensor {bad} holds NaN or infinite values")
    fingerprint = hashlib.sha256(buf[: min(data_start, file_bytes)]).hexdigest()
    return Header(metadata, tuple(tensors.values()), file_bytes, fingerprint)


def _sampled_blocks_finite(buf: mmap.mmap, tensor: TensorInfo) -> bool:
    """Whether the float values (F32/F16/F64) or block scales (Q4_0..Q8_0, K-quants) of `tensor` are
    finite: all of a small tensor, _SAMPLED_BLOCKS evenly spread blocks of a large one. llama.cpp
    runs a model with NaN weights and prints garbage; types not listed here are not checked."""
    if tensor.ggml_type in _FLOAT_TENSORS:
        dtype, offset, count = _FLOAT_TENSORS[tensor.ggml_type], 0, 1
    elif tensor.ggml_type in _BLOCK_SCALES:
        dtype, (offset, count) = "<f2", _BLOCK_SCALES[tensor.ggml_type]
    else:
        return True
    block_bytes = gguf.GGML_QUANT_SIZES[tensor.ggml_type][1]
    n_blocks = tensor.n_bytes // block_bytes
    if n_blocks == 0:
        return True
    # copies of the bytes, never views of the map: an exception (a Ctrl-C) raised while a view is alive
    # keeps it alive in the traceback, and closing the map then fails with a BufferError in its place
    if tensor.n_bytes > _WHOLE_TENSOR_BYTES:
        sampled = np.linspace(0, n_blocks - 1, _SAMPLED_BLOCKS).astype(np.int64).tolist()
        starts = (tensor.data_offset + index * block_bytes for index in sampled)
        data = b"".join(buf[start : start + block_bytes] for start in starts)
    else:
        data = buf[tensor.data_offset : tensor.data_offset + n_blocks * block_bytes]
    blocks = np.frombuffer(data, np.uint8).reshape(-1, block_bytes)
    size = np.dtype(dtype).itemsize
    scales = np.ascontiguousarray(blocks[:, offset : offset + count * size]).view(dtype)
    return bool(np.isfinite(scales).all())


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of all bytes before the tensor data: metadata, tensor names, shapes, types, offsets.

    Traces and predictors are tied to a model's layout, and this names one in milliseconds without
    reading weights; two files that differ only in weight bytes share it.
    """
    return read_header(path).fingerprint
