"""Seeded mutations of a GGUF, and a worker that runs `edge-preattn run` on each in one process.

The worker runs in a subprocess of the test (tests/test_fuzz.py): a flipped byte that slipped past
our header checks could make llama.cpp abort the process, and the test must see that as a failure
naming the case, not die with it. Before each case the worker appends a "started" line to its log
and after it the outcome, so the last line names the case that crashed or hung.

    python tests/gguf_fuzz.py MODEL.gguf SEED N_CASES LOG.jsonl
"""

import contextlib
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

ABSURD_VALUES = (0, 1, 2, 3, 7, 255, 65535, 2**31 - 1, 2**32 - 1, 2**63 - 1)
KINDS = ("header byte flips", "metadata value", "tensor info value", "header cut", "data cut", "data bytes")


def number_spans(path: Path) -> tuple[list, list, int]:
    """(metadata spans, tensor-info spans, data offset): each span (what, byte offset, size) is one
    number of the header — a scalar value, an array's item type or length, a dim, a type, an offset."""
    reader = gguf.GGUFReader(path)
    metadata = []
    for field in reader.fields.values():
        position = field.offset
        is_array = bool(field.types) and field.types[0] == gguf.GGUFValueType.ARRAY
        for index, part in enumerate(field.parts):
            if is_array and index in (2, 3):
                metadata.append((f"{field.name} {('item type', 'length')[index - 2]}", position, part.nbytes))
            elif not is_array and index in field.data and part.dtype != np.uint8:
                metadata.append((field.name, position, part.nbytes))
            position += part.nbytes
    tensor_infos = []
    for tensor in reader.tensors:
        position = tensor.field.offset
        for index, part in enumerate(tensor.field.parts):
            if index >= 2:  # after the name: n_dims, dims, type, offset
                what = ("n_dims", "dim", "type", "offset")[index - 2]
                size = part.itemsize
                tensor_infos += [
                    (f"{tensor.name} {what}", position + i * size, size) for i in range(part.size)
                ]
            position += part.nbytes
    return metadata, tensor_infos, reader.data_offset


def mutate(raw: bytes, spans: tuple[list, list, int], rng: np.random.Generator) -> tuple[bytes, str]:
    """One damaged copy of `raw` and a sentence saying what was done to it."""
    metadata, tensor_infos, data_start = spans
    data = bytearray(raw)
    kind = KINDS[int(rng.integers(0, len(KINDS)))]
    if kind == "header byte flips":
        positions = sorted(int(p) for p in rng.integers(0, data_start, size=int(rng.integers(1, 5))))
        for position in positions:
            data[position] ^= int(rng.integers(1, 256))
        return bytes(data), f"{kind} at {positions}"
    if kind in ("metadata value", "tensor info value"):
        pool = metadata if kind == "metadata value" else tensor_infos
        what, position, size = pool[int(rng.integers(0, len(pool)))]
        if rng.random() < 0.3:  # one flipped bit
            bit = 1 << int(rng.integers(0, 8 * size))
            value = int.from_bytes(data[position : position + size], "little") ^ bit
        else:
            value = int(rng.choice(ABSURD_VALUES)) % 2 ** (8 * size)
        data[position : position + size] = value.to_bytes(size, "little")
        return bytes(data), f"{what} set to {value}"
    if kind == "header cut":
        at = int(rng.integers(0, data_start + 64))
        return bytes(data[:at]), f"cut at byte {at} (header ends at {data_start})"
    if kind == "data cut":
        at = int(rng.integers(data_start, len(data)))
        return bytes(data[:at]), f"cut at byte {at} of {len(data)}"
    positions = rng.integers(data_start, len(data), size=int(rng.integers(1, 64)))
    for position in positions:
        data[int(position)] = int(rng.integers(0, 256))
    return bytes(data), f"{kind}: {len(positions)} overwritten"


def run_cases(model: Path, seed: int, n_cases: int, log_path: Path) -> None:
    from edge_preattn import cli

    raw = model.read_bytes()
    spans = number_spans(model)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as work, log_path.open("a") as log:
        path = Path(work) / "case.gguf"
        for case in range(n_cases):
            data, what = mutate(raw, spans, rng)
            path.write_bytes(data)
            print(json.dumps({"case": case, "what": what, "started": True}), file=log, flush=True)
            logging.root.handlers.clear()  # cli.main binds its handlers to this case's stderr
            logging.getLogger("edge_preattn").handlers.clear()
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(["run", "-m", str(path), "-n", "2", "-c", "64"])
                except BaseException as error:  # reported, never raised: the test fails on it
                    code, err = f"raised {type(error).__name__}", io.StringIO(repr(error))
            outcome = {"case": case, "what": what, "code": code, "stderr": err.getvalue()}
            print(json.dumps(outcome), file=log, flush=True)


if __name__ == "__main__":
    run_cases(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
