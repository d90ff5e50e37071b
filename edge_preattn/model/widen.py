"""Widen a trained MoE GGUF's routed experts with zeros, so one expert weighs what a big model's does.

Benchmarks need two things at once: routing with real locality (a trained model) and experts of real
size (what crosses the bus per miss). Trained models small enough to make here have tiny experts; the
synthetic presets have real sizes but random routing. Padding each routed expert's FFN width with zero
rows (gate, up) and zero columns (down) keeps the function exact: silu(0) · 0 = 0 enters the down
projection against zero weights, and an all-zero block of every ggml type (q4_0, q8_0, K-quants, f16,
f32) decodes to zeros. Routers, attention and shared experts are untouched, so routing, tokens and the
predictors trained on the original model carry over unchanged.
"""

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import UserError
from ..files import atomic_output, output_target, regular_input
from ..units import format_bytes, parse_bytes
from .layout import ROUTING_FINGERPRINT_KEY, read_layout
from .presets import PRESETS, QTYPES

log = logging.getLogger(__name__)

# routed-expert tensors and the axis of their numpy data (experts, rows, row bytes) that holds the FFN width
WIDTH_AXIS = {"ffn_gate_exps": 1, "ffn_up_exps": 1, "ffn_down_exps": 2}


@dataclass(frozen=True)
class WidenResult:
    path: Path
    n_ff_from: int
    n_ff_to: int
    expert_bytes_from: int  # one expert of one layer: gate + up + down
    expert_bytes_to: int
    file_bytes: int
    seconds: float


def preset_expert_bytes(preset: str) -> int:
    """Bytes of one routed expert (gate + up + down) of a synth preset at its default type."""
    config = PRESETS[preset]
    block, type_size = gguf.GGML_QUANT_SIZES[QTYPES[config.default_qtype]]
    return 3 * config.n_embd * config.n_ff_exp // block * type_size


def parse_target(text: str) -> int:
    """`--expert-bytes-like`: a synth preset's name, or a size such as 2.65MB."""
    if text in PRESETS:
        return preset_expert_bytes(text)
    try:
        return parse_bytes(text)
    except (ValueError, UserError) as error:
        raise UserError(
            f"--expert-bytes-like {text!r} is neither a preset ({', '.join(PRESETS)}) nor a size like 2.65MB"
        ) from error


def _expert_tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    found = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in WIDTH_AXIS:
            found[tensor.name] = tensor
    return found


def _bytes_per_width(tensors: list[gguf.ReaderTensor]) -> float:
    """Bytes one unit of FFN width adds to one expert (summed over gate, up and down)."""
    total = 0.0
    for tensor in tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        n_embd = int(tensor.shape[1] if tensor.name.endswith("ffn_down_exps.weight") else tensor.shape[0])
        total += n_embd * type_size / block
    return total


def _pad_widths(tensor: gguf.ReaderTensor, n_ff_to: int) -> list[tuple[int, int]]:
    """np.pad widths that grow the tensor's data (as the reader maps it) to FFN width `n_ff_to`."""
    data = tensor.data
    block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    axis = WIDTH_AXIS[tensor.name.split(".")[2]]
    if axis == 1:  # gate/up: [experts, n_ff rows, row]; new rows of zeros
        extra = n_ff_to - data.shape[1]
    else:  # down: [experts, n_embd rows, n_ff row]; each row grows by zero blocks (bytes if quantized)
        per_unit = type_size / block if data.dtype == np.uint8 else 1
        extra = round((n_ff_to - int(tensor.shape[0])) * per_unit)
    pad = [(0, 0)] * data.ndim
    pad[axis] = (0, extra)
    return pad


def _copy_metadata(
    reader: gguf.GGUFReader, writer: gguf.GGUFWriter, arch: str, n_ff_to: int, routing_fingerprint: str
) -> None:
    width_key = f"{arch}.expert_feed_forward_length"
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in (
            "general.architecture",
            "general.name",
            ROUTING_FINGERPRINT_KEY,
        ):
            continue  # the architecture is written by GGUFWriter itself, the name below
        value_type = field.types[0]
        if key == width_key:
            writer.add_key_value(key, n_ff_to, value_type)
        elif value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), value_type)
    # predictors trained on the original serve this file: same routing
    writer.add_key_value(ROUTING_FINGERPRINT_KEY, routing_fingerprint, gguf.GGUFValueType.STRING)
    name = reader.fields.get("general.name")
    label = f"{name.contents() if name else arch} (experts zero-padded to width {n_ff_to})"
    writer.add_key_value("general.name", label, gguf.GGUFValueType.STRING)


def widen(source: Path, target_expert_bytes: int, output: Path) -> WidenResult:
    """Write `source` with every routed expert padded to the smallest width whose expert weighs at least
    `target_expert_bytes` (a whole number of quantization blocks)."""
    source, output = Path(source), Path(output)
    regular_input(source, "the model")  # missing, a folder, a FIFO, a link loop: before gguf-py's reader
    if os.path.realpath(source) == os.path.realpath(output):  # realpath, unlike resolve(), takes loops
        raise UserError(f"-o {output} is the model being widened: choose another file")
    # our reader checks what gguf-py's assumes (UTF-8 strings, sizes, offsets): one line, not a traceback
    routing_fingerprint = read_layout(source).routing_fingerprint
    try:  # gguf-py reads lazily: a damaged header fails here or in the first contents()
        reader = gguf.GGUFReader(source)
        arch_field = reader.fields.get("general.architecture")
        arch = arch_field.contents() if arch_field else ""
        width_field = reader.fields.get(f"{arch}.expert_feed_forward_length")
        experts = _expert_tensors(reader)
    except (ValueError, KeyError, IndexError, OverflowError) as error:
        raise UserError(f"{source} is not a valid GGUF ({error}); pass a MoE .gguf model") from None
    if width_field is None or not experts:
        raise UserError(
            f"{source} has no separate routed-expert tensors (blk.N.ffn_gate/up/down_exps) with "
            f"{arch}.expert_feed_forward_length: only such MoE models can be widened"
        )
    n_ff_from = int(width_field.contents())
    first_layer = next(iter(experts)).split(".")[1]
    per_width = _bytes_per_width([t for name, t in experts.items() if name.split(".")[1] == first_layer])
    expert_bytes_from = round(per_width * n_ff_from)
    step = math.lcm(*(gguf.GGML_QUANT_SIZES[t.tensor_type][0] for t in experts.values()))
    n_ff_to = max(n_ff_from, math.ceil(target_expert_bytes / per_width / step) * step)
    pads = {name: _pad_widths(t, n_ff_to) for name, t in experts.items()}
    shapes = {
        name: tuple(n + sum(pad) for n, pad in zip(t.data.shape, pads[name], strict=True))
        for name, t in experts.items()
    }
    added_bytes = sum(int(np.prod(shapes[n])) * t.data.itemsize - t.data.nbytes for n, t in experts.items())
    output = output_target(output, inputs=(source,))  # a device, FIFO, link loop or missing folder: refused
    needed = source.stat().st_size + added_bytes
    free = shutil.disk_usage(output.parent).free
    if needed > free:
        raise UserError(
            f"the widened model needs {format_bytes(needed)}; {output.parent} has {format_bytes(free)} free"
        )
    log.info(
        "%s: expert width %d -> %d (%s -> %s per expert)",
        source.name,
        n_ff_from,
        n_ff_to,
        format_bytes(expert_bytes_from),
        format_bytes(round(per_width * n_ff_to)),
    )

    started = time.monotonic()
    with atomic_output(output) as temporary:  # renamed over `output` when complete; OSError: one line
        writer = gguf.GGUFWriter(temporary, arch)
        try:
            _copy_metadata(reader, writer, arch, n_ff_to, routing_fingerprint)
            for tensor in reader.tensors:
                shape = shapes.get(tensor.name, tensor.data.shape)
                nbytes = int(np.prod(shape)) * tensor.data.itemsize
                writer.add_tensor_info(
                    tensor.name, shape, tensor.data.dtype, nbytes, raw_dtype=tensor.tensor_type
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in reader.tensors:  # one padded tensor in memory at a time
                pad = pads.get(tensor.name)
                writer.write_tensor_data(tensor.data if pad is None else np.pad(tensor.data, pad))
        finally:
            writer.close()
    return WidenResult(
        path=output,
        n_ff_from=n_ff_from,
        n_ff_to=n_ff_to,
        expert_bytes_from=expert_bytes_from,
        expert_bytes_to=round(per_width * n_ff_to),
        file_bytes=output.stat().st_size,
        seconds=time.monotonic() - started,
    )
