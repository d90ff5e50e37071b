"""GGUF → MoE layout: which layers route to experts, and where each expert's bytes lie in the file.

Only the header is read; no weight is loaded. The slot cache uploads expert e of a layer as the byte
range `data_offset + e * bytes_per_expert` of each routed-expert tensor, so those numbers must be
exact: llama.cpp stores a routed-expert tensor as ggml `(ne0, ne1, n_expert)`, expert-major.

The header parser is our own, not `gguf.GGUFReader`: the reader walks arrays element by element in
Python without bounding a count by the file size, so one flipped byte in an array length makes it
spin for hours. Here every length and count is checked against the bytes left before it is used.
"""

import argparse
import dataclasses
import hashlib
import logging
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import UserError
from .files import file_kind, output_target, write_json_atomic
from .units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

HELP = "show a MoE GGUF's layers, experts and expert byte ranges, and how many expert slots fit a VRAM budget"
EXAMPLES = """\
  edge-preattn inspect model.gguf
  edge-preattn inspect model.gguf --vram-budget 8GiB -c 4096
  edge-preattn inspect model.gguf --vram-budget 6GiB --json layout.json
"""

GiB = 1024**3
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: a larger block_count is a corrupt header, not a model
GGUF_VERSIONS = (2, 3)  # what llama.cpp's gguf.cpp reads
COMPUTE_UBATCH_TOKENS = 512  # llama.cpp's default n_ubatch, which sizes its compute buffer
COMPUTE_SLACK_BYTES = 64 * 1024**2
ROUTING_FINGERPRINT_KEY = "edge_preattn.routing_fingerprint"  # see MoeLayout.routing_fingerprint


@dataclass(frozen=True)
class _ArchRules:
    """What src/models/<arch>.cpp passes to build_moe_ffn; most archs hard-code it and ignore metadata."""

    gating: str
    norm_topk_prob: bool | None  # None: the graph reads <arch>.expert_weights_norm (default false)
    reads_gating_key: bool  # the graph uses <arch>.expert_gating_func and expert_weights_scale


ARCHS = {
    "qwen3moe": _ArchRules("softmax", True, False),
    "qwen2moe": _ArchRules("softmax", False, False),
    "deepseek2": _ArchRules("softmax", None, True),
    "phimoe": _ArchRules("softmax", True, False),
    "llama": _ArchRules("softmax", True, False),
    "olmoe": _ArchRules("softmax", False, False),
    "granitemoe": _ArchRules("softmax", True, False),
}
GATING_FUNCS = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}  # llama-hparams.h
_EQUAL_KV_HEAD_ARCHS = ("qwen3moe", "qwen2moe", "llama", "olmoe")  # src/models/<arch>.cpp asserts it
_ROLE_ORDER = ("gate", "up", "gate_up", "down")
_EXPERT_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate_up|gate|up|down)_exps\.weight$")
_LEGACY_EXPERT_NAME = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ExpertTensor:
    """One routed-expert tensor of one layer; `gate_up` holds each expert's gate rows, then its up rows."""

    name: str
    role: str  # "up" | "gate" | "down" | "gate_up"
    ggml_type: str
    shape: tuple[int, ...]  # ggml order (ne0, ne1, n_expert)
    bytes_per_expert: int
    data_offset: int  # absolute file offset of expert 0's slice

    def expert_offset(self, expert: int) -> int:
        """Absolute file offset of one expert's slice: experts are contiguous, expert-major."""
        if not 0 <= expert < self.shape[-1]:
            raise IndexError(f"expert {expert} out of range for {self.name} ({self.shape[-1]} experts)")
        return self.data_offset + expert * self.bytes_per_expert


@dataclass(frozen=True)
class MoeLayer:
    index: int
    n_expert: int
    n_expert_used: int
    tensors: tuple[ExpertTensor, ...]
    router_name: str
    n_shared_experts: int  # shared-expert tensors count as non-expert bytes: always resident
    bytes_per_expert: int  # over the layer's routed-expert tensors


@dataclass(frozen=True)
class MoeLayout:
    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    kv_lora_rank: int  # >0 only with MLA (deepseek2): the cache holds kv_lora_rank + n_rot per token, no V
    n_rot: int
    n_expert: int
    n_expert_used: int
    n_shared_experts: int
    gating: str  # what llama.cpp computes, which for most archs ignores <arch>.expert_gating_func
    norm_topk_prob: bool | None
    expert_weights_scale: float  # 0 or 1: not applied
    dense_layers: tuple[int, ...]
    moe_layers: tuple[MoeLayer, ...]
    expert_bytes: int
    non_expert_bytes: int
    total_params: int
    expert_params_per_expert_per_layer: int
    fingerprint: str
    # what traces and predictors are tied to: the fingerprint, or for a model widened from another (zero
    # padded experts, same routing) the original's, which `synth --widen-from` records in the header
    routing_fingerprint: str
    file_bytes: int

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """llama.cpp's f16 KV cache at n_ctx tokens."""
        if self.kv_lora_rank:
            return self.n_layer * n_ctx * (self.kv_lora_rank + self.n_rot) * 2
        return self.n_layer * n_ctx * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * 2


# --- header parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Array:
    length: int
    values: tuple[Any, ...] | None  # kept for short numeric arrays only


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute


@dataclass(frozen=True)
class _Header:
    metadata: dict[str, Any]
    tensors: tuple[_TensorInfo, ...]
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
            return _Array(length, None)
        fmt = _SCALAR_FORMATS[item_type]
        self.need(length * struct.calcsize(fmt))
        if item_type in _FLOAT_DTYPES and not key.startswith("tokenizer."):  # per-layer hparams
            data = self.buf[self.pos : self.pos + length * struct.calcsize(fmt)]  # a copy: see below
            if not np.isfinite(np.frombuffer(data, _FLOAT_DTYPES[item_type])).all():
                raise _Corrupt(f"{key} holds a value that is not a finite number")
        keep = length <= _KEPT_ARRAY_ITEMS
        values = struct.unpack_from(f"<{length}{fmt}", self.buf, self.pos) if keep else None
        self.pos += length * struct.calcsize(fmt)
        return _Array(length, values)


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


def _corrupt(name: str, what: str) -> UserError:
    return UserError(f"{name}: {what}; the file is corrupt: re-download or re-create it")


def _read_header(path: str | os.PathLike[str]) -> _Header:
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


def _parse(buf: mmap.mmap, name: str, file_bytes: int) -> _Header:
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
    tensors: dict[str, _TensorInfo] = {}
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
        tensors[tensor_name] = _TensorInfo(tensor_name, ggml_type, shape, n_elements, n_bytes, offset)
    bad = next((t.name for t in tensors.values() if not _sampled_blocks_finite(buf, t)), None)
    if bad is not None:
        raise _Corrupt(f"tensor {bad} holds NaN or infinite values")
    fingerprint = hashlib.sha256(buf[: min(data_start, file_bytes)]).hexdigest()
    return _Header(metadata, tuple(tensors.values()), file_bytes, fingerprint)


def _sampled_blocks_finite(buf: mmap.mmap, tensor: _TensorInfo) -> bool:
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
    return _read_header(path).fingerprint


# --- metadata → layout ------------------------------------------------------------------------------


def _hparam(
    meta: dict[str, Any], key: str, name: str, default: int | None, n_layer: int = 1
) -> tuple[int, ...]:
    """A non-negative integer per layer, stored as one number or as an array of n_layer numbers."""
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"{name} lacks the metadata key {key}; re-convert it with convert_hf_to_gguf.py")
    values = value.values if isinstance(value, _Array) else (value,) * n_layer
    if not values or (n_layer > 1 and len(values) != n_layer):
        raise _corrupt(name, f"metadata {key} has {len(values or ())} values for {n_layer} layers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _corrupt(name, f"metadata {key} = {value!r} is not a non-negative integer")
    return tuple(values)


def _check_attention(layout: MoeLayout) -> MoeLayout:
    """What llama.cpp asserts (aborting the process) mid-graph instead of refusing at load: head
    counts and sizes whose uint32 products wrap around, and K/V head sizes its graphs require equal."""
    lo = layout
    if max(lo.n_head, lo.n_head_kv) * max(lo.head_dim_k, lo.head_dim_v) >= 2**31:
        raise _corrupt(lo.path, f"attention sizes overflow ({lo.n_head} heads, {lo.n_head_kv} KV heads)")
    if lo.n_head_kv > lo.n_head or (lo.n_head_kv and lo.n_head % lo.n_head_kv):
        raise _corrupt(lo.path, f"{lo.n_head} attention heads are not a multiple of {lo.n_head_kv} KV heads")
    if lo.arch in _EQUAL_KV_HEAD_ARCHS and lo.head_dim_k != lo.head_dim_v:
        raise _corrupt(lo.path, f"key and value head sizes differ ({lo.head_dim_k} vs {lo.head_dim_v})")
    return layout


def read_layout(path: str | os.PathLike[str]) -> MoeLayout:
    """The MoE layout of a GGUF, refused where llama.cpp's loader would refuse it."""
    name = os.fspath(path)
    header = _read_header(path)
    meta, tensors = header.metadata, {t.name: t for t in header.tensors}
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch.isprintable():
        raise UserError(f"{name} has no general.architecture; re-convert it with convert_hf_to_gguf.py")
    legacy = [t for t in tensors if _LEGACY_EXPERT_NAME.match(t)]
    if legacy:
        raise UserError(
            f"{name} stores each expert as its own tensor ({legacy[0]}), which this llama.cpp no longer "
            "loads; re-convert it with a current convert_hf_to_gguf.py"
        )
    by_layer: dict[int, dict[str, _TensorInfo]] = {}
    for tensor in header.tensors:
        if match := _EXPERT_NAME.match(tensor.name):
            by_layer.setdefault(int(match[1]), {})[match[2]] = tensor
    if not by_layer:
        raise UserError(
            f"{name} is a dense {arch} model: no routed experts; edge-preattn needs a Mixture-of-Experts GGUF"
        )
    if arch not in ARCHS:
        unknown = "" if arch in gguf.MODEL_ARCH_NAMES.values() else " (nor does llama.cpp know it)"
        supported = ", ".join(ARCHS)
        raise UserError(f"{name}: architecture {arch!r} is not supported{unknown}; supported: {supported}")
    rules = ARCHS[arch]
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        eps = meta.get(key, 0.0)  # ggml asserts eps >= 0 in the middle of the first decode
        if not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise _corrupt(name, f"{key} = {eps!r} is not a finite non-negative number")

    def hparam(suffix: str, default: int | None = None) -> int:
        return max(_hparam(meta, f"{arch}.{suffix}", name, default))

    n_layer = hparam("block_count")
    if not 1 <= n_layer <= MAX_LAYERS:
        raise _corrupt(name, f"{arch}.block_count = {n_layer} is outside 1..{MAX_LAYERS}")
    past = [t for t in tensors if (block := _BLOCK_NAME.match(t)) and int(block[1]) >= n_layer]
    if past:
        raise _corrupt(name, f"tensor {past[0]} is past {arch}.block_count = {n_layer}")
    n_embd, n_head = hparam("embedding_length"), hparam("attention.head_count", 0)
    head_dim = n_embd // n_head if n_head else 0
    head_dim_k = hparam("attention.key_length", head_dim)
    is_mla = f"{arch}.attention.key_length_mla" in meta and f"{arch}.attention.value_length_mla" in meta
    n_expert = hparam("expert_count")
    n_expert_used = _hparam(meta, f"{arch}.expert_used_count", name, None, n_layer)
    has_shexp = any(t.endswith("_shexp.weight") and "gate_inp_shexp" not in t for t in tensors)
    n_shared = hparam("expert_shared_count", int(has_shexp))
    embd = tensors.get("token_embd.weight") or tensors.get("output.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    if embd is not None and len(embd.shape) == 2:
        n_vocab = embd.shape[1]
    else:
        n_vocab = tokens.length if isinstance(tokens, _Array) else hparam("vocab_size", 0)

    gating, norm_topk_prob, scale = rules.gating, rules.norm_topk_prob, 0.0
    gating_id = meta.get(f"{arch}.expert_gating_func", 0)
    if gating_id != 0 and gating_id not in GATING_FUNCS:
        raise _corrupt(name, f"{arch}.expert_gating_func = {gating_id!r} is not a gating function")
    if rules.reads_gating_key:
        if gating_id:
            gating = GATING_FUNCS[gating_id]
        elif n_layer in (47, 48) and n_vocab == 154880:
            gating = "sigmoid"  # deepseek2.cpp: GLM 4.7 Lite GGUFs lack the key
        norm_topk_prob = meta.get(f"{arch}.expert_weights_norm", False) is True
        scale = meta.get(f"{arch}.expert_weights_scale", 0.0)
        scale = float(scale) if isinstance(scale, (int, float)) else 0.0
    elif gating_id and GATING_FUNCS[gating_id] != gating:
        log.warning("%s: llama.cpp's %s graph ignores expert_gating_func %d", name, arch, gating_id)

    moe_layers = []
    for il, roles in sorted(by_layer.items()):
        if (
            "down" not in roles
            or len({"up", "gate_up"} & roles.keys()) != 1
            or {"gate", "gate_up"} <= roles.keys()
        ):
            raise _corrupt(name, f"layer {il} has expert tensors {sorted(roles)}, not down + up/gate_up")
        router = f"blk.{il}.ffn_gate_inp.weight"
        if router not in tensors:
            raise _corrupt(name, f"layer {il} has routed experts but no router {router}")
        if not 0 < n_expert_used[il] <= n_expert:
            raise _corrupt(name, f"layer {il} uses {n_expert_used[il]} of {n_expert} experts per token")
        experts = []
        for role in sorted(roles, key=_ROLE_ORDER.index):
            t = roles[role]
            if len(t.shape) != 3 or t.shape[2] != n_expert or t.n_bytes == 0:
                raise _corrupt(name, f"{t.name} has shape {t.shape}, not (ne0, ne1, {n_expert} experts)")
            per_expert = t.n_bytes // n_expert
            experts.append(ExpertTensor(t.name, role, t.ggml_type.name, t.shape, per_expert, t.data_offset))
        shared = n_shared if f"blk.{il}.ffn_down_shexp.weight" in tensors else 0
        layer_bytes = sum(e.bytes_per_expert for e in experts)
        moe_layers.append(
            MoeLayer(il, n_expert, n_expert_used[il], tuple(experts), router, shared, layer_bytes)
        )
    dense_layers = tuple(il for il in range(n_layer) if il not in by_layer)
    lead = meta.get(f"{arch}.leading_dense_block_count")
    if isinstance(lead, int) and dense_layers != tuple(range(min(lead, n_layer))):  # llama.cpp fails on it
        raise _corrupt(name, f"{arch}.leading_dense_block_count is {lead} but the layers without experts "
                       f"are {list(dense_layers)}")  # fmt: skip

    expert_bytes = sum(t.bytes_per_expert * n_expert for layer in moe_layers for t in layer.tensors)
    return _check_attention(MoeLayout(
        path=name, arch=arch, n_layer=n_layer, n_embd=n_embd, n_vocab=n_vocab,
        n_ctx_train=hparam("context_length", 0), n_head=n_head,
        n_head_kv=hparam("attention.head_count_kv", n_head), head_dim_k=head_dim_k,
        head_dim_v=hparam("attention.value_length", head_dim),
        kv_lora_rank=hparam("attention.kv_lora_rank") if is_mla else 0,
        n_rot=hparam("rope.dimension_count", head_dim_k), n_expert=n_expert,
        n_expert_used=max(layer.n_expert_used for layer in moe_layers), n_shared_experts=n_shared,
        gating=gating,
        norm_topk_prob=norm_topk_prob, expert_weights_scale=scale, dense_layers=dense_layers,
        moe_layers=tuple(moe_layers), expert_bytes=expert_bytes,
        non_expert_bytes=sum(t.n_bytes for t in header.tensors) - expert_bytes,
        total_params=sum(t.n_elements for t in header.tensors),
        expert_params_per_expert_per_layer=max(
            sum(t.shape[0] * t.shape[1] for t in layer.tensors) for layer in moe_layers
        ),
        fingerprint=header.fingerprint, routing_fingerprint=_routing_fingerprint(header),
        file_bytes=header.file_bytes,
    ))  # fmt: skip


def _routing_fingerprint(header: _Header) -> str:
    recorded = header.metadata.get(ROUTING_FINGERPRINT_KEY)
    if isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded):
        return recorded
    return header.fingerprint


# --- VRAM budget → expert slots ---------------------------------------------------------------------


@dataclass(frozen=True)
class SlotPlan:
    budget_bytes: int
    non_expert_bytes: int
    kv_cache_bytes: int
    compute_buffer_bytes: int  # an ESTIMATE: see estimate_compute_buffer_bytes
    bytes_per_slot: int  # max bytes_per_expert over MoE layers
    slots_per_layer: int  # capped at n_expert
    fits_all: bool  # every expert fits: no cache needed
    n_ctx: int
    n_moe_layers: int
    expert_cache_bytes: int  # slots_per_layer * n_moe_layers * bytes_per_slot
    min_budget_bytes: int  # n_expert_used slots per MoE layer: with less, one token cannot run


def estimate_compute_buffer_bytes(layout: MoeLayout, n_ctx: int) -> int:
    """An ESTIMATE of llama.cpp's GPU compute buffer, which is only known once a graph is reserved.

    f32 logits of one 512-token ubatch (n_vocab * 4 B * 512), plus the f32 attention scores of that
    ubatch without flash attention (n_head * n_ctx * 4 B * 512), plus 64 MiB for everything else.
    """
    return COMPUTE_UBATCH_TOKENS * 4 * (layout.n_vocab + layout.n_head * n_ctx) + COMPUTE_SLACK_BYTES


def plan_slots(layout: MoeLayout, budget_bytes: int, n_ctx: int = 4096) -> SlotPlan:
    """How many expert slots per MoE layer fit in the VRAM left once the resident part is placed."""
    if n_ctx <= 0:
        raise UserError(f"context size {n_ctx} must be positive; pass -c 4096 or similar")
    kv_bytes, compute_bytes = layout.kv_cache_bytes(n_ctx), estimate_compute_buffer_bytes(layout, n_ctx)
    resident_bytes = layout.non_expert_bytes + kv_bytes + compute_bytes
    n_moe_layers = len(layout.moe_layers)
    bytes_per_slot = max(layer.bytes_per_expert for layer in layout.moe_layers)
    min_budget_bytes = resident_bytes + n_moe_layers * layout.n_expert_used * bytes_per_slot
    if budget_bytes < min_budget_bytes:
        raise UserError(
            f"a VRAM budget of {format_bytes(budget_bytes)} is below the {format_bytes(min_budget_bytes)} "
            f"{Path(layout.path).name} needs at -c {n_ctx} (non-expert "
            f"{format_bytes(layout.non_expert_bytes)}, KV cache {format_bytes(kv_bytes)}, compute buffer "
            f"~{format_bytes(compute_bytes)}, "
            f"{layout.n_expert_used} experts x {n_moe_layers} MoE layers); raise --vram-budget to at least "
            f"{math.ceil(min_budget_bytes / GiB * 100) / 100:.2f}GiB or use a smaller -c"
        )
    slots = min(layout.n_expert, (budget_bytes - resident_bytes) // (n_moe_layers * bytes_per_slot))
    return SlotPlan(
        budget_bytes=budget_bytes, non_expert_bytes=layout.non_expert_bytes, kv_cache_bytes=kv_bytes,
        compute_buffer_bytes=compute_bytes, bytes_per_slot=bytes_per_slot, slots_per_layer=slots,
        fits_all=resident_bytes + layout.expert_bytes <= budget_bytes, n_ctx=n_ctx,
        n_moe_layers=n_moe_layers, expert_cache_bytes=slots * n_moe_layers * bytes_per_slot,
        min_budget_bytes=min_budget_bytes,
    )  # fmt: skip


# --- the `inspect` verb -----------------------------------------------------------------------------


def format_table(layout: MoeLayout, plan: SlotPlan | None = None) -> str:
    """The human-readable report: summary, layers (identical neighbours collapsed), expert tensors."""
    lo, b = layout, format_bytes
    if lo.kv_lora_rank:
        attn = f"MLA, kv_lora_rank {lo.kv_lora_rank} + rope {lo.n_rot} cached per token per layer"
    else:
        attn = f"n_head {lo.n_head}, n_head_kv {lo.n_head_kv}, head dim k/v {lo.head_dim_k}/{lo.head_dim_v}"
    norm = {True: "yes", False: "no", None: "unknown"}[lo.norm_topk_prob]
    scaled = f", scaled x{lo.expert_weights_scale:g}" if lo.expert_weights_scale not in (0.0, 1.0) else ""
    lines = [
        f"{Path(lo.path).name}: {lo.arch}, {b(lo.file_bytes)}, fingerprint {lo.fingerprint[:16]}",
        f"  {lo.n_layer} layers ({len(lo.moe_layers)} MoE, {len(lo.dense_layers)} dense), "
        f"n_embd {lo.n_embd}, n_vocab {lo.n_vocab}, n_ctx_train {lo.n_ctx_train}",
        f"  attention: {attn}",
        f"  experts: {lo.n_expert} routed, top-{lo.n_expert_used}, {lo.n_shared_experts} shared; "
        f"gating {lo.gating}, top-k weights renormalized: {norm}{scaled}",
        "",
        f"  {'layers':<10}{'kind':<7}{'experts':>8}{'top-k':>7}{'shared':>8}{'bytes/expert':>16}",
    ]
    rows: dict[int, tuple[object, ...]] = dict.fromkeys(lo.dense_layers, ("dense", "-", "-", "-", "-"))
    for layer in lo.moe_layers:
        per_expert = b(layer.bytes_per_expert)
        rows[layer.index] = ("MoE", layer.n_expert, layer.n_expert_used, layer.n_shared_experts, per_expert)
    start = 0
    for il in range(1, lo.n_layer + 1):
        if il == lo.n_layer or rows[il] != rows[start]:
            span = f"{start}" if il - 1 == start else f"{start}-{il - 1}"
            kind, n_expert, k, shared, per_expert = (str(cell) for cell in rows[start])
            lines.append(f"  {span:<10}{kind:<7}{n_expert:>8}{k:>7}{shared:>8}{per_expert:>16}")
            start = il
    lines.append(
        "\n  routed-expert tensors: expert e's slice starts at offset + e * stride (stride = bytes/expert)"
    )
    row = "  {:<7}{:<9}{:<7}{:<26}{:>12}{:>14}"
    lines.append(row.format("layer", "role", "type", "shape (ne0 ne1 n_expert)", "stride", "offset"))
    for layer in lo.moe_layers:
        for t in layer.tensors:
            shape = " ".join(str(ne) for ne in t.shape)
            lines.append(
                row.format(layer.index, t.role, t.ggml_type, shape, t.bytes_per_expert, t.data_offset)
            )
    lines.append(
        f"\n  expert bytes {b(lo.expert_bytes)}, non-expert bytes {b(lo.non_expert_bytes)}, params "
        f"{lo.total_params:,} ({lo.expert_params_per_expert_per_layer:,} per expert per layer)"
    )
    if plan is not None:
        cache = f"{plan.slots_per_layer} of {lo.n_expert} slots per MoE layer ({b(plan.expert_cache_bytes)})"
        lines.append(f"\n  VRAM budget {b(plan.budget_bytes)} at -c {plan.n_ctx}: ")
        lines[-1] += "all experts fit, no cache needed" if plan.fits_all else cache
        lines.append(
            f"    non-expert {b(plan.non_expert_bytes)} + KV cache {b(plan.kv_cache_bytes)} (f16) + compute "
            f"buffer {b(plan.compute_buffer_bytes)} (ESTIMATE); slot {b(plan.bytes_per_slot)}; "
            f"minimum budget {b(plan.min_budget_bytes)}"
        )
    return "\n".join(lines)


DEFAULT_PLAN_BUDGET = "8GiB"  # a common consumer GPU: the plan `inspect` prints without --vram-budget


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL.gguf", help="the GGUF model to inspect")
    parser.add_argument("-m", "--model", dest="model_flag", metavar="MODEL.gguf", help="the same, as a flag")
    parser.add_argument(
        "--vram-budget",
        metavar="SIZE",
        help=f"plan expert slots for this much VRAM (default {DEFAULT_PLAN_BUDGET})",
    )
    parser.add_argument("-c", "--ctx-size", type=int, default=4096, help="context for the KV cache")
    parser.add_argument("--json", metavar="FILE", help="also write the layout (and plan) as JSON")


def main(args: argparse.Namespace) -> int:
    model = args.model_flag or args.model
    if not model:
        raise UserError("no model given; run: edge-preattn inspect MODEL.gguf")
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        output_target(json_path, inputs=(Path(model),))  # before the work: a device, the model itself
    layout = read_layout(model)
    try:
        plan = plan_slots(layout, parse_bytes(args.vram_budget or DEFAULT_PLAN_BUDGET), args.ctx_size)
    except UserError:
        if args.vram_budget is not None or args.ctx_size <= 0:
            raise
        plan = None  # the default budget is too small for this model: the table says so, not an error
    print(format_table(layout, plan))
    if plan is None:
        print(
            f"\n  no slot plan: {DEFAULT_PLAN_BUDGET} (the default --vram-budget) does not hold this model's "
            "non-expert part, KV cache and k experts per layer; pass a larger --vram-budget"
        )
    if json_path is not None:
        payload = {"layout": dataclasses.asdict(layout), "plan": plan and dataclasses.asdict(plan)}
        write_json_atomic(json_path, payload)
    return 0
