"""Config-faithful MoE GGUFs with random weights, so the system can be tested at true tensor sizes.

Each preset copies a real model's config: the tensor names, shapes, types and hyperparameters that the
llama.cpp vendored in llama-cpp-python 0.3.36 loads for it (src/models/<arch>.cpp), with a
SentencePiece-style tokenizer ("llama": <unk> <s> </s>, 256 byte tokens, then generated pieces) that
llama.cpp accepts at any vocabulary size. Weights are random: routing is not learned, so accuracy
claims use trained models only.

Types are what llama-quantize gives: norms, biases and routers (`ffn_gate_inp`) F32; every other matrix
the chosen type, except `output.weight`, which is q8_0 in a q4_0 file (quantize would use q6_K).
Quantized blocks are written directly: random quants with a per-block f16 scale chosen so that each
weight has std ≈ 1/sqrt(fan_in) (residual writers less, norm weights 1.0), which keeps activations
finite and token-dependent through all layers.
"""

import argparse
import concurrent.futures
import contextlib
import logging
import os
import shutil
import time
import zlib
from collections import deque
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import gguf
import numpy as np

from ..errors import UserError
from ..files import atomic_output, output_target
from ..units import format_bytes
from .presets import PRESETS, QT, QTYPES, SynthConfig, TensorSpec, tensor_plan

log = logging.getLogger(__name__)
HELP = "write a MoE GGUF with random weights and the exact tensor layout of a real model (or a tiny one)"
EXAMPLES = """\
  edge-preattn synth --preset tiny -o tiny.gguf
  edge-preattn synth --preset qwen3-30b-a3b --layers 4 -o qwen3-4l.gguf
  edge-preattn synth --preset deepseek-v2-lite --type q8_0 --seed 1 -o dsv2-lite.gguf
  edge-preattn synth --preset qwen3-30b-a3b --sparse -o layout-only.gguf   # true size, no disk used
  edge-preattn synth --widen-from moe-ref-a.gguf --expert-bytes-like qwen3-30b-a3b -o ref-wide.gguf
"""
FILE_TYPES = {
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
CHUNK_BYTES = 16 * 1024**2  # one generated buffer; two more may be queued for the writer thread
# rms of the integers we draw uniformly: q4_0 nibbles (q - 8) in -8..7, q8_0 int8 in -128..127, and
# for f16 the 256 half-integers -127.5..127.5
QUANT_STD = {QT.Q4_0: np.sqrt(21.5), QT.Q8_0: np.sqrt(5461.5), QT.F16: np.sqrt(5461.25)}


@dataclass(frozen=True)
class SynthResult:
    path: Path
    bytes_written: int  # the file's size (for --sparse: its apparent size)
    seconds: float
    params: int


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style pieces: specials, the 256 byte tokens, then generated printable pieces."""
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    printable = [chr(c) for c in range(33, 127)]
    pieces = ["▁", *printable, *("▁" + ch for ch in printable)]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    length = 2
    while len(tokens) + len(pieces) < n_vocab:
        for combo in product(letters, repeat=length):
            word = "".join(combo)
            pieces += ["▁" + word, word]
            if len(tokens) + len(pieces) >= n_vocab:
                break
        length += 1
    n_pieces = n_vocab - len(tokens)
    if n_pieces < 1:
        raise UserError(f"a vocabulary of {n_vocab} tokens is too small: it needs more than {len(tokens)}")
    tokens += pieces[:n_pieces]
    types += [tt.NORMAL] * n_pieces
    scores = [0.0] * 259 + [-float(i) for i in range(n_pieces)]
    return tokens, scores, [int(t) for t in types]


def _add_metadata(
    w: gguf.GGUFWriter, preset: str, c: SynthConfig, *, n_layer: int, qtype: str, seed: int
) -> None:
    w.add_name(f"synth-{preset}")
    w.add_description(
        f"random weights by edge-preattn synth: preset {preset}, {n_layer} layers, {qtype}, seed {seed}"
        + (f"; config of {c.source}" if c.source else "")
    )
    w.add_file_type(FILE_TYPES[qtype])
    if qtype != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.n_ctx_train)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_expert_count(c.n_expert)
    w.add_expert_used_count(c.n_expert_used)
    if c.arch == "qwen3moe":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_expert_feed_forward_length(c.n_ff_exp)
    if c.arch == "phimoe":
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_scaling_orig_ctx_len(c.n_ctx_train)
        w.add_sliding_window(c.sliding_window)
    if c.arch == "deepseek2":
        w.add_leading_dense_block_count(min(c.n_layer_dense_lead, n_layer))
        w.add_vocab_size(c.n_vocab)
        # read unless n_layer is 26 or 27 (the loader's "lite" test), so --layers needs it; 0: no q LoRA
        w.add_q_lora_rank(0)
        w.add_kv_lora_rank(c.kv_lora_rank)
        w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        w.add_value_length_mla(c.v_head_dim)
        w.add_expert_feed_forward_length(c.n_ff_exp)
        w.add_expert_shared_count(c.n_expert_shared)
        w.add_expert_weights_scale(c.expert_weights_scale)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_rope_dimension_count(c.qk_rope_head_dim)
    if c.yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.yarn.factor)
        w.add_rope_scaling_orig_ctx_len(c.yarn.original_context)
        w.add_rope_scaling_yarn_beta_fast(c.yarn.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(c.yarn.beta_slow)
        w.add_rope_scaling_yarn_log_mul(c.yarn.log_mul)
    tokens, scores, types = vocabulary(c.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _chunks(spec: TensorSpec, seed: int):
    """The tensor's bytes as buffers of at most CHUNK_BYTES; each tensor has its own random stream."""
    # the stream depends on (seed, name) only, so --layers N writes the same layers as the full model
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, zlib.crc32(spec.name.encode())])))
    if spec.init == "ones":
        yield np.ones(spec.n_elements, np.float32)
        return
    if spec.init == "normal":
        yield rng.standard_normal(spec.n_elements, np.float32) * np.float32(spec.std)
        return
    base = spec.std / QUANT_STD[spec.ggml_type]  # the quant step that gives weights this std
    if spec.ggml_type == QT.F16:  # uniform 8-bit integers times that step, through a lookup table
        table = ((np.arange(256) - 127.5) * base).astype(np.float16)
        for start in range(0, spec.n_elements, CHUNK_BYTES // 2):
            n = min(CHUNK_BYTES // 2, spec.n_elements - start)
            yield table[rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]]
        return
    block_bytes = gguf.GGML_QUANT_SIZES[spec.ggml_type][1]  # f16 scale, then 16 nibble or 32 int8 bytes
    # per-block scales: 16 steps around `base`, picked by a random byte of the block itself. q4_0's also
    # take a random sign (quantize gives both): it cancels the nibbles' mean of -0.5, which would
    # otherwise add up coherently, layer after layer, into one direction that every token shares
    steps = np.linspace(0.75, 1.25, 16)
    if spec.ggml_type == QT.Q4_0:
        steps = np.concatenate([steps, -steps])
    scale_table = (base * steps).astype(np.float16).view(np.uint16)
    pick = len(steps) - 1
    n_blocks, per_chunk = spec.nbytes // block_bytes, CHUNK_BYTES // block_bytes
    for start in range(0, n_blocks, per_chunk):
        n = min(per_chunk, n_blocks - start)
        raw = rng.bit_generator.random_raw((n * block_bytes + 7) // 8).view(np.uint8)[: n * block_bytes]
        blocks = raw.reshape(n, block_bytes)  # blocks: [n, block_bytes]
        blocks.view(np.uint16)[:, 0] = scale_table[blocks[:, 2] & pick]
        yield raw


def _write_data(fout, plan: list[TensorSpec], seed: int, total: int, progress: bool) -> None:
    """Generate on this thread while one writer thread writes (file.write releases the GIL)."""
    from tqdm import tqdm

    pending: deque[tuple[concurrent.futures.Future, int]] = deque()
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tensor data", disable=not progress
    )
    with bar, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="synth-write") as pool:

        def put(buf) -> None:
            size = buf.nbytes if isinstance(buf, np.ndarray) else len(buf)
            pending.append((pool.submit(fout.write, buf), size))
            while len(pending) > 2:
                future, size = pending.popleft()
                future.result()
                bar.update(size)

        for spec in plan:
            for chunk in _chunks(spec, seed):
                put(chunk)
            pad = -spec.nbytes % ALIGNMENT
            if pad:
                put(bytes(pad))
        while pending:
            future, size = pending.popleft()
            future.result()
            bar.update(size)


def write_synthetic(  # noqa: PLR0917 (the signature other modules call positionally)
    preset: str,
    path: str | os.PathLike[str],
    n_layers: int | None = None,
    qtype: str | None = None,
    seed: int = 0,
    sparse: bool = False,
    progress: bool = True,
) -> SynthResult:
    """Write the preset's GGUF to `path` (through a temporary name, renamed when complete)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    n_layer = config.n_layer if n_layers is None else n_layers
    if not 1 <= n_layer <= config.n_layer:
        raise UserError(f"--layers must be between 1 and {config.n_layer} for {preset}, not {n_layers}")
    if seed < 0:  # numpy's SeedSequence takes non-negative integers only
        raise UserError(f"--seed must be 0 or more, not {seed}")
    qtype = qtype or config.default_qtype
    if qtype not in QTYPES:
        raise UserError(f"unknown type {qtype!r}; choose one of {', '.join(QTYPES)}")
    path = Path(path)
    output_target(path)  # a missing folder, or a device or FIFO in the way: refused before any work
    plan = tensor_plan(config, n_layer, qtype)
    data_bytes = sum(spec.nbytes + (-spec.nbytes % ALIGNMENT) for spec in plan)
    free = shutil.disk_usage(path.parent).free
    if not sparse and data_bytes > free:
        raise UserError(
            f"{preset} needs {format_bytes(data_bytes)} but {path.parent} has {format_bytes(free)} free; "
            "use --layers N, or --sparse for a layout-only file"
        )
    log.info("%s: %d tensors, %s of tensor data", preset, len(plan), format_bytes(data_bytes))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        temporary = stack.enter_context(atomic_output(path))
        writer = stack.enter_context(contextlib.closing(gguf.GGUFWriter(temporary, config.arch)))
        _add_metadata(writer, preset, config, n_layer=n_layer, qtype=qtype, seed=seed)
        for spec in plan:  # gguf-py takes numpy-order shapes and reverses them into ggml's ne
            writer.add_tensor_info(
                spec.name, spec.ne[::-1], np.float32, spec.nbytes, raw_dtype=spec.ggml_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        size = fout.tell() + data_bytes
        if sparse:
            fout.truncate(size)  # a hole of zeros: the true size, no blocks on disk
        else:
            _write_data(fout, plan, seed, data_bytes, progress)
        writer.close()  # a full disk, a quota: atomic_output removes the temporary file, says why
        if os.path.getsize(temporary) != size:
            raise AssertionError(f"wrote {os.path.getsize(temporary)} bytes, planned {size}")
    seconds = time.monotonic() - started
    return SynthResult(path, size, seconds, sum(spec.n_elements for spec in plan))


def add_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), help="the model whose config to copy")
    source.add_argument(
        "--widen-from",
        metavar="MODEL.gguf",
        help="instead: a trained MoE GGUF whose routed experts are zero-padded (same function, same "
        "routing, same tokens) until one expert weighs --expert-bytes-like",
    )
    parser.add_argument(
        "--expert-bytes-like",
        metavar="PRESET|SIZE",
        default="qwen3-30b-a3b",
        help="--widen-from: a preset whose expert size to match, or a size (default qwen3-30b-a3b: "
        "2.65 MB at q4_0)",
    )
    parser.add_argument(
        "--layers", type=int, metavar="N", help="keep the first N layers (deepseek2: the first stays dense)"
    )
    parser.add_argument(
        "--type",
        dest="qtype",
        choices=list(QTYPES),
        help="type of the weight matrices (default: q4_0 for the real-model presets, q8_0 for the tiny "
        "ones); norms, biases and routers stay F32",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="write the header and a hole of zeros: the true file size and layout at no disk cost; "
        "for inspect only (every weight is 0)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="FILE.gguf", help="where to write")


def main(args: argparse.Namespace) -> int:
    if args.widen_from:
        from .widen import parse_target, widen

        widened = widen(Path(args.widen_from), parse_target(args.expert_bytes_like), Path(args.output))
        print(
            f"wrote {widened.path}: expert width {widened.n_ff_from} -> {widened.n_ff_to}, "
            f"{format_bytes(widened.expert_bytes_from)} -> {format_bytes(widened.expert_bytes_to)} per "
            f"expert, {format_bytes(widened.file_bytes)} in {widened.seconds:.1f} s"
        )
        return 0
    result = write_synthetic(args.preset, args.output, args.layers, args.qtype, args.seed, args.sparse)
    n = result.params
    params = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    how = (
        "sparse: every weight is 0"
        if args.sparse
        else f"{result.bytes_written / max(result.seconds, 1e-6) / 1e6:.0f} MB/s"
    )
    print(
        f"wrote {result.path}: {format_bytes(result.bytes_written)}, {params} parameters, "
        f"in {result.seconds:.2f} s ({how})"
    )
    return 0
