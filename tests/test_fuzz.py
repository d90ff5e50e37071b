"""Seeded fuzzing: damaged GGUFs through `edge-preattn run` (llama.cpp included, in a subprocess, so an
abort fails the test by name instead of killing it) and damaged trace manifests through TraceSet.
Every case ends in a clean run or in one line naming the problem; never a crash, hang or traceback.
(Damaged predictor manifests: tests/test_predictors.py; damaged headers alone: tests/test_layout.py.)"""

import collections
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_preattn.errors import UserError
from edge_preattn.model import gguf_header, layout
from edge_preattn.model.synth import write_synthetic
from edge_preattn.traces.collect import CollectSettings, collect
from edge_preattn.traces.trace_set import TraceSet

from .gguf_fuzz import number_spans
from .robustness_log import record

WORKER = Path(__file__).with_name("gguf_fuzz.py")
CASES_PER_MODEL = 150
WORKER_TIMEOUT_S = 120  # about 3 s of work; a hang in llama.cpp ends here


def outcome_class(outcome: dict) -> str:
    """A short name for what a case produced, digits folded, for counting."""
    if outcome["code"] == 0:
        return "ran"
    return fold(re.sub(r"/\S+/case\.gguf", "FILE", outcome["stderr"].strip().partition("error: ")[2]))


def fold(message: str) -> str:
    """A message without its fix, tensor names, quoted strings and numbers: cases of one kind group."""
    message = re.sub(r"tensor (?!infos)[\w.']+", "tensor T", message.split("; ", maxsplit=1)[0])
    message = re.sub(r"b?'[^']*'", "'…'", message)
    return re.sub(r"\d+", "N", message).strip()


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek2"])
def test_fuzzed_ggufs_run_or_are_refused_in_one_line(lib_dir, tmp_path, preset):
    model = tmp_path / f"{preset}.gguf"
    write_synthetic(preset, model, progress=False)
    log = tmp_path / "outcomes.jsonl"
    env = {**os.environ, "EDGE_PREATTN_LIB": str(lib_dir), "GGML_NO_BACKTRACE": "1"}  # no gdb on abort
    argv = [sys.executable, str(WORKER), str(model), "8", str(CASES_PER_MODEL), str(log)]
    try:
        worker = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
        )
        failure = (
            None
            if worker.returncode == 0
            else f"died with status {worker.returncode}: {worker.stderr[-800:]}"
        )
    except subprocess.TimeoutExpired:
        failure = f"hung for {WORKER_TIMEOUT_S} s"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if failure:
        pytest.fail(f"the fuzz worker {failure}; last case: {lines[-1] if lines else None}")
    outcomes = [line for line in lines if "started" not in line]
    assert len(outcomes) == CASES_PER_MODEL
    for outcome in outcomes:
        if outcome["code"] == 0:
            continue
        err = outcome["stderr"].strip().splitlines()
        assert outcome["code"] == 2 and len(err) == 1 and err[0].startswith("edge-preattn: error: "), outcome
    counts = collections.Counter(outcome_class(outcome) for outcome in outcomes)
    assert counts["ran"] < CASES_PER_MODEL
    for kind, count in counts.most_common():
        record(f"fuzz ({preset} GGUF, seed 8)", "byte flips, bad values, cuts", kind, count)


@pytest.fixture(scope="module")
def traces(llama_lib, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-traces")
    model = root / "tiny.gguf"
    write_synthetic("tiny", model, progress=False)
    prompts = root / "prompts.txt"
    prompts.write_text("def add(a, b):\nThe capital of France is\nimport numpy as np\n")
    collect(
        model,
        prompts,
        root / "traces",
        CollectSettings(max_new_tokens=4, prompts_per_shard=1, n_ctx=64),
        progress=False,
    )
    return root / "traces"


ODD_VALUES = (None, -1, 0, 2**40, 1.5, True, "", "../..", "shard-99999", [], {}, [0, -3], {"name": "x"})


def json_paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON document, as key/index paths."""
    children = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    paths = [prefix] if prefix else []
    for key, child in children:
        paths += json_paths(child, (*prefix, key))
    return paths


def damaged_manifest(original: bytes, rng: np.random.Generator) -> bytes:
    """A cut, a few flipped bytes, or (half the time) one value replaced by an odd one."""
    if rng.random() < 0.5:
        manifest = json.loads(original)
        *parents, last = json_paths(manifest)[int(rng.integers(0, len(json_paths(manifest))))]
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))]
        return json.dumps(manifest).encode()
    data = bytearray(original)
    if rng.random() < 0.3:
        return bytes(data[: int(rng.integers(0, len(data)))])
    for position in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
        data[position] = int(rng.integers(32, 127))
    return bytes(data)


def test_fuzzed_trace_manifests_read_or_are_refused(traces, tmp_path):
    """Damaged manifest.json of a trace folder: TraceSet and its reads give the data or one
    UserError — never another exception, and never a read outside the folder."""
    folder = tmp_path / "traces"
    shutil.copytree(traces, folder)
    original = (traces / "manifest.json").read_bytes()
    rng = np.random.default_rng(5)
    outcomes = collections.Counter()
    for _ in range(300):
        (folder / "manifest.json").write_bytes(damaged_manifest(original, rng))
        try:
            trace_set = TraceSet(folder)
            trace_set.meta()
            for il in trace_set.layers:
                trace_set.layer(il, "ids")
            outcomes["read"] += 1
        except UserError as error:
            assert "\n" not in str(error)
            outcomes[fold(str(error).replace(str(folder), "DIR"))] += 1
    assert sum(outcomes.values()) == 300 and len(outcomes) > 4, outcomes
    for kind, count in outcomes.most_common():
        record("fuzz (traces manifest.json, seed 5)", "byte flips, cuts, odd values", kind, count)


NAN_CASES_PER_MODEL = 100


def non_finite_case(raw: bytes, targets: tuple[list, list], rng: np.random.Generator) -> bytes:
    """raw with one float set to NaN or ±infinity: a metadata value (a third of the cases), a weight
    or a block's scale."""
    metadata, tensors = targets
    chosen = metadata if rng.random() < 1 / 3 else tensors
    _, position, fmt = chosen[int(rng.integers(0, len(chosen)))]
    value = (float("nan"), float("inf"), float("-inf"))[int(rng.integers(0, 3))]
    packed = struct.pack(fmt, value)
    return raw[:position] + packed + raw[position + len(packed) :]


def float_targets(path: Path, rng: np.random.Generator) -> tuple[list, list]:
    """(what, byte offset, struct format) of the model's float metadata, and of a few values in every
    float tensor and a few scales of every block-quantized tensor."""
    reader = gguf.GGUFReader(path)
    floats = {name for name, field in reader.fields.items() if field.types == [gguf.GGUFValueType.FLOAT32]}
    metadata = [(name, at, "<f") for name, at, _ in number_spans(path)[0] if name in floats]
    targets = []
    for tensor in gguf_header.read_header(path).tensors:
        block_bytes = gguf.GGML_QUANT_SIZES[tensor.ggml_type][1]
        for block in rng.integers(0, tensor.n_bytes // block_bytes, size=3):
            at = tensor.data_offset + int(block) * block_bytes
            if tensor.ggml_type in gguf_header._FLOAT_TENSORS:
                fmt = {"<f4": "<f", "<f2": "<e", "<f8": "<d"}[gguf_header._FLOAT_TENSORS[tensor.ggml_type]]
                targets.append((tensor.name, at, fmt))
            elif tensor.ggml_type in gguf_header._BLOCK_SCALES:
                targets.append((tensor.name, at + gguf_header._BLOCK_SCALES[tensor.ggml_type][0], "<e"))
    return metadata, targets


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek2"])
def test_non_finite_metadata_and_weights_are_refused_at_load(tmp_path, preset):
    """llama.cpp runs a model with a NaN epsilon or NaN weights and prints garbage. The tiny models'
    tensors are small enough to be checked whole, so every case must be refused (larger tensors are
    checked at sampled blocks)."""
    model = tmp_path / "model.gguf"
    write_synthetic(preset, model, progress=False)
    raw, rng = model.read_bytes(), np.random.default_rng(11)
    targets = float_targets(model, rng)
    outcomes: collections.Counter = collections.Counter()
    case = tmp_path / "case.gguf"
    for _ in range(NAN_CASES_PER_MODEL):
        case.write_bytes(non_finite_case(raw, targets, rng))
        with pytest.raises(UserError) as refused:
            layout.read_layout(case)
        message = re.sub(r"= -?(nan|inf)\b", "= nan/±inf", str(refused.value).replace(str(case), "FILE"))
        outcomes[fold(message)] += 1
    assert all("not a finite number" in kind or "NaN or infinite" in kind for kind in outcomes), outcomes
    for kind, count in outcomes.items():
        record("NaN and infinite input", f"{preset}: one float set to NaN/±inf (seed 11)", kind, count)
