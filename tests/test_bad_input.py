"""Every command meets bad input — model files, predictors, traces, options — with one line that names
the problem and the fix, exit status 2, and nothing written. Each case is noted for the robustness
table (tests/robustness_log.py)."""

import json
import os
import re
import shutil
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.model.gguf_header import model_fingerprint, read_header
from edge_preattn.model.synth import write_synthetic
from edge_preattn.predictors import onnx_io
from edge_preattn.predictors.networks import Predictor
from edge_preattn.traces.collect import CollectSettings, collect

from . import test_layout as builders
from .gguf_fuzz import number_spans
from .robustness_log import record

PROMPTS = ["def add(a, b):", "The capital of France is", "import numpy as np", "for i in range(10):"]


def patched(raw: bytes, spans: list, name: str, value: bytes) -> bytes:
    """raw with the metadata value `name` (located by number_spans) overwritten."""
    _, position, size = next(span for span in spans if span[0] == name)
    assert len(value) == size
    return raw[:position] + value + raw[position + size :]


def write_predictors(directory: Path, fingerprint: str, n_embd: int, n_expert: int, k: int) -> Path:
    """A one-layer predictor set (random weights) as `edge-preattn train` writes it."""
    import torch

    directory.mkdir(parents=True)
    torch.manual_seed(0)
    model = Predictor(2, n_embd, n_expert, hidden=8).eval()
    entry = onnx_io.export_layer(model, directory, 0, np.zeros((4, n_embd), np.float32))
    fields = {"fingerprint": fingerprint, "n_embd": n_embd, "n_expert": n_expert, "k": k, "input": "x_pre"}
    onnx_io.write_manifest(directory, {**fields, "layers": [0], "predictors": [entry]})
    return directory


def edit_json(path: Path, edit) -> None:
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


@pytest.fixture(scope="module")
def ws(llama_lib, tmp_path_factory) -> SimpleNamespace:
    """A workspace holding every bad input beside good ones; tests check that nothing in it changes."""
    root = tmp_path_factory.mktemp("bad-input")
    good = root / "tiny.gguf"
    write_synthetic("tiny", good, progress=False)
    raw = good.read_bytes()
    metadata, tensor_infos, _ = number_spans(good)
    models = {}

    def model(kind: str, data: bytes) -> None:
        path = root / "models" / f"{len(models):02d}.gguf"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        models[kind] = path

    model("not a GGUF (a text file)", b"these are my notes, not a model\n")
    model("empty file", b"")
    model("wrong magic", b"GGUX" + raw[4:])
    model("GGUF version 1", raw[:4] + struct.pack("<I", 1) + raw[8:])
    model("big-endian GGUF", raw[:4] + struct.pack(">I", 3) + raw[8:])
    model("cut in the header", raw[:20])
    model("cut in the KV metadata", raw[:200])
    model("cut in the tensor infos", raw[: tensor_infos[len(tensor_infos) // 2][1]])
    model("cut in the tensor data", raw[: len(raw) - 1000])
    token = raw.index(b"<0x34>")
    model("a vocabulary token repeated (llama.cpp aborts)", raw[:token] + b"<0x33>" + raw[token + 6 :])
    token = raw.index(b"<0x35>")  # one bit flipped: gguf-py's reader (widen) raised UnicodeDecodeError
    model("a vocabulary token that is not UTF-8", raw[:token] + b"<\xb0x35>" + raw[token + 6 :])
    eps = "qwen3moe.attention.layer_norm_rms_epsilon"
    model("negative norm epsilon (ggml aborts)", patched(raw, metadata, eps, struct.pack("<f", -1.0)))
    kv_heads = "qwen3moe.attention.head_count_kv"
    model("4 heads, 3 KV heads (ggml aborts)", patched(raw, metadata, kv_heads, struct.pack("<I", 3)))
    dense = builders._dense_llama().write(root / "models" / "dense.gguf")
    models["a dense model (no experts)"] = dense
    dbrx = builders.Gguf("dbrx").hp(block_count=1, embedding_length=64, expert_count=4, expert_used_count=2)
    dbrx.tensor("blk.0.ffn_gate_inp.weight", builders.F32, 64, 4)
    dbrx.tensor("blk.0.ffn_up_exps.weight", builders.F16, 64, 32, 4)
    dbrx.tensor("blk.0.ffn_down_exps.weight", builders.F16, 32, 64, 4)
    models["dbrx: an architecture llama.cpp runs but this layout does not"] = dbrx.write(
        root / "models" / "dbrx.gguf"
    )
    models["a directory"] = root / "models"
    models["missing"] = root / "models" / "nope.gguf"
    models["unreadable"] = good  # the test makes reading it fail with EACCES (root reads anything)
    models["a FIFO (inspect and run used to hang)"] = root / "models" / "fifo.gguf"
    os.mkfifo(models["a FIFO (inspect and run used to hang)"])
    nan, inf = float("nan"), float("inf")
    model("NaN norm epsilon", patched(raw, metadata, eps, struct.pack("<f", nan)))
    rope = "qwen3moe.rope.freq_base"
    model("infinite rope frequency base", patched(raw, metadata, rope, struct.pack("<f", inf)))
    tensors = {t.name: t for t in read_header(good).tensors}
    at = tensors["blk.1.attn_norm.weight"].data_offset + 4 * 5  # its 6th float32
    model("a NaN in a norm weight (F32)", raw[:at] + struct.pack("<f", nan) + raw[at + 4 :])
    at = tensors["blk.0.attn_q.weight"].data_offset + 34 * 3  # the float16 scale of its 4th block
    model("an infinite Q8_0 block scale", raw[:at] + struct.pack("<e", -inf) + raw[at + 2 :])

    fingerprint = model_fingerprint(good)
    predictors = root / "predictors"
    sets = {"good": write_predictors(predictors / "good", fingerprint, 128, 16, 4)}
    sets["other model"] = shutil.copytree(sets["good"], predictors / "other")
    edit_json(sets["other model"] / "predictors.json", lambda m: m.update(fingerprint="0" * 64))
    sets["changed ONNX"] = shutil.copytree(sets["good"], predictors / "changed")
    with (sets["changed ONNX"] / "layer-000.onnx").open("ab") as file:
        file.write(b"\0")
    sets["d = 64 for a d = 128 model"] = write_predictors(predictors / "d64", fingerprint, 64, 16, 4)
    sets["a path outside the folder"] = shutil.copytree(sets["good"], predictors / "escaping")
    shutil.copy(sets["good"] / "layer-000.onnx", predictors / "outside.onnx")
    edit_json(
        sets["a path outside the folder"] / "predictors.json",
        lambda m: m["predictors"][0].update(file="../outside.onnx"),
    )
    sets["no manifest"] = predictors / "empty"
    sets["no manifest"].mkdir()

    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    traces = root / "traces" / "good"
    collect(
        good,
        prompts,
        traces,
        CollectSettings(max_new_tokens=4, prompts_per_shard=2, n_ctx=128),
        progress=False,
    )
    return SimpleNamespace(
        root=root,
        good=good,
        models=models,
        sets=sets,
        prompts=prompts,
        traces=traces,
        fingerprint=fingerprint,
    )


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in root.rglob("*")}


def one_line_error(capsys, ws, argv: list[str], fragment: str) -> str:
    """Run the command; it must exit 2 with one line containing `fragment`, and leave `ws` as it was."""
    before = snapshot(ws.root)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # usage mistakes: argparse exits itself
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.match(r"edge-preattn( \w+)?: error: ", lines[0]), (
        code,
        lines,
    )
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(ws.root) == before  # nothing written, nothing created
    return lines[0].partition("error: ")[2]


MODEL_CASES = {
    "not a GGUF (a text file)": "is not a GGUF file (it starts with",
    "empty file": "is not a GGUF file (only 0 bytes)",
    "wrong magic": "is not a GGUF file (it starts with b'GGUX')",
    "GGUF version 1": "is GGUF version 1; llama.cpp reads little-endian GGUF v2/v3",
    "big-endian GGUF": "is a big-endian GGUF",
    "cut in the header": "is truncated or corrupt in its header",
    "cut in the KV metadata": "is truncated or corrupt in its KV metadata",
    "cut in the tensor infos": "is truncated or corrupt in its tensor infos",
    "cut in the tensor data": "is truncated: tensor",
    "a vocabulary token repeated (llama.cpp aborts)": "repeats the token b'<0x33>'",
    "a vocabulary token that is not UTF-8": "tokenizer.ggml.tokens[",
    "negative norm epsilon (ggml aborts)": "rms_epsilon = -1.0 is not a finite non-negative number",
    "4 heads, 3 KV heads (ggml aborts)": "4 attention heads are not a multiple of 3 KV heads",
    "a dense model (no experts)": "is a dense llama model: no routed experts",
    "dbrx: an architecture llama.cpp runs but this layout does not": "architecture 'dbrx' is not supported",
    "a directory": "is a directory; pass the path of a .gguf model file",
    "missing": "does not exist; pass the path of a .gguf model file",
    "unreadable": "permission denied; check the file's permissions",
    "a FIFO (inspect and run used to hang)": "is a FIFO (named pipe), not a regular file",
}
NAN_MODEL_CASES = {  # llama.cpp runs these and prints garbage
    "NaN norm epsilon": "layer_norm_rms_epsilon = nan is not a finite number",
    "infinite rope frequency base": "rope.freq_base = inf is not a finite number",
    "a NaN in a norm weight (F32)": "tensor blk.1.attn_norm.weight holds NaN or infinite values",
    "an infinite Q8_0 block scale": "tensor blk.0.attn_q.weight holds NaN or infinite values",
}
MODEL_CASES.update(NAN_MODEL_CASES)
WIDEN_PATH_CASES = {  # widen checks its input path as every output does (files.regular_input)
    "a directory": "is a directory, not a regular file",
    "missing": "not found",
}


@pytest.mark.parametrize("kind", list(MODEL_CASES))
@pytest.mark.parametrize("verb", ["inspect", "run", "collect", "widen"])
def test_a_bad_model_is_one_line_for_every_command(ws, capsys, monkeypatch, verb, kind):
    model = str(ws.models[kind])
    if kind == "unreadable":

        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr("edge_preattn.model.gguf_header.open", refuse, raising=False)
    argv = {
        "inspect": ["inspect", model],
        "run": ["run", "-m", model, "-n", "4"],
        "collect": ["collect", model, "--prompts", str(ws.prompts), "-o", str(ws.root / "new-traces")],
        "widen": ["synth", "--widen-from", model, "-o", str(ws.root / "new-wide.gguf")],
    }[verb]
    fragment = WIDEN_PATH_CASES.get(kind, MODEL_CASES[kind]) if verb == "widen" else MODEL_CASES[kind]
    message = one_line_error(capsys, ws, argv, fragment)
    if verb == "run":
        record("NaN and infinite input" if kind in NAN_MODEL_CASES else "bad model", kind, message)


RUN_CASES = {
    "-n 0": (["-n", "0"], "-n must be at least 1"),
    "empty prompt": (["-p", "   "], "the prompt is empty"),
    "-c above the model's context": (["-c", "100000"], "exceeds the 2048 tokens"),
    "negative -c": (["-c", "-1"], "-c -1 is negative"),
    "unknown mode": (["--mode", "fastest"], "argument --mode: invalid choice: 'fastest'"),
    "-n not a number": (["-n", "many"], "argument -n/--n-predict: invalid int value"),
    "--slots below k": (["--mode", "lru", "--slots", "2"], "--slots 2 must be between the router's k = 4"),
    "VRAM budget below k experts per layer": (
        ["--mode", "lru", "--vram-budget", "1MiB"],
        "raise --vram-budget",
    ),
    "VRAM budget not a size": (["--mode", "lru", "--vram-budget", "lots"], "cannot read size 'lots'"),
    "zero bandwidth": (["--mode", "lru", "--bandwidth", "0GB/s"], "cannot read rate '0GB/s'"),
    "negative bandwidth": (["--mode", "lru", "--bandwidth=-1GB/s"], "cannot read rate '-1GB/s'"),
    "bandwidth without /s": (["--mode", "lru", "--bandwidth", "12GB"], "cannot read rate '12GB'"),
    "negative --extra": (["--mode", "lru", "--extra", "-1"], "--extra must be 0 or more"),
    "--target 0": (["--mode", "lru", "--target", "0"], "--target is an expected recall"),
    "--stats-json in a missing folder": (
        ["--stats-json", "nowhere/stats.json"],
        "its folder nowhere does not exist",
    ),
    "prediction mode without predictors": (["--mode", "exact"], "--mode exact needs --predictors DIR"),
    "-p with bytes that are not UTF-8 (a traceback)": (["-p", "abc\udcff"], "is not UTF-8 text"),
}
PREDICTOR_CASES = {
    "no manifest": "has no predictors.json: train predictors",
    "other model": "holds predictors of another model (fingerprint 0000000000000000",
    "changed ONNX": "does not match its sha256 in predictors.json (changed or damaged): retrain",
    "d = 64 for a d = 128 model": "predictors for d = 64, E = 16, layers [0], but tiny.gguf has d = 128,",
    "a path outside the folder": "names a file outside its folder ('../outside.onnx'): refusing to load",
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_run_options_are_one_line(ws, capsys, case):
    extra, fragment = RUN_CASES[case]
    record(
        "bad option (run)", case, one_line_error(capsys, ws, ["run", "-m", str(ws.good), *extra], fragment)
    )


@pytest.mark.parametrize("case", list(PREDICTOR_CASES))
def test_bad_predictors_are_one_line(ws, capsys, case):
    argv = ["run", "-m", str(ws.good), "--mode", "exact", "--predictors", str(ws.sets[case])]
    record("bad predictors", case, one_line_error(capsys, ws, argv, PREDICTOR_CASES[case]))


def test_good_predictors_run(ws, capsys):
    """The control: the untouched set loads and runs (layers it lacks just load on demand)."""
    argv = ["run", "-m", str(ws.good), "--mode", "exact", "--predictors", str(ws.sets["good"]), "-n", "4"]
    assert cli.main(argv) == 0


def collect_case(ws, name: str) -> Path:
    """A folder for one collect case, made before the snapshot."""
    folder = ws.root / "collect-cases" / name
    if name == "a file":
        folder.parent.mkdir(exist_ok=True)
        folder.write_text("not a folder")
    elif name == "unrelated files":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "notes.txt").write_text("mine")
    elif name == "another model's traces":
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"fingerprint": "0" * 64, "prompts_sha256": "x", "settings": {}, "shards": []}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif name == "a damaged manifest":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text('{"fingerprint": ')
    return folder


COLLECT_CASES = {
    "prompts file missing": (["--prompts", "{root}/nope.txt"], "prompts file", "not found"),
    "prompts file empty": (
        ["--prompts", "{root}/empty.txt"],
        "prompts file",
        "is empty: give one prompt per line",
    ),
    "prompts JSONL without text": (
        ["--prompts", "{root}/bad.jsonl"],
        "prompts file",
        "is not a JSON object with a 'text'",
    ),
    "-o is a file": (["-o", "a file"], "folder", "is a file: give a folder for the traces"),
    "-o holds unrelated files": (
        ["-o", "unrelated files"],
        "folder",
        "is not empty and has no manifest.json",
    ),
    "-o holds another model's traces": (
        ["-o", "another model's traces"],
        "folder",
        "holds traces of another model",
    ),
    "-o holds a damaged manifest": (
        ["-o", "a damaged manifest"],
        "folder",
        "is damaged (not a manifest written",
    ),
    "--layers not MoE layers": (["--layers", "9"], "", "--layers [9] are not MoE layers of tiny.gguf"),
    "--layers unreadable": (["--layers", "two"], "", "cannot read --layers 'two'"),
    "--layers 3-1 (recorded no layer)": (["--layers", "3-1"], "", "cannot read --layers '3-1'"),
    "--prompts-per-shard 0": (["--prompts-per-shard", "0"], "", "must be at least 1"),
    "-c smaller than -n": (["-c", "10", "-n", "64"], "", "-c 10 leaves no room for a prompt and -n 64"),
    "negative -n": (["-n", "-1"], "", "--max-new-tokens must be 0 or more"),
    "JSONL with an empty text (llama.cpp aborted)": (
        ["--prompts", "{root}/empty-text.jsonl"],
        "",
        "empty-text.jsonl:2: 'text' is empty",
    ),
    "JSONL text null (became the prompt 'None')": (
        ["--prompts", "{root}/null-text.jsonl"],
        "",
        "null-text.jsonl:1: 'text' is NoneType, not a string",
    ),
    "JSONL text a number": (["--prompts", "{root}/number.jsonl"], "", "'text' is int, not a string"),
    "invalid UTF-8 in line 2": (["--prompts", "{root}/latin1.txt"], "", "latin1.txt:2 is not UTF-8"),
    "random bytes (became thousands of prompts)": (["--prompts", "{root}/random.bin"], "", "is not"),
    "NUL bytes": (["--prompts", "{root}/nul.txt"], "", "is not text (it holds NUL bytes)"),
    "a FIFO": (["--prompts", "{root}/prompts.fifo"], "", "is a FIFO (named pipe), not a regular file"),
    "a directory": (["--prompts", "{root}"], "", "is a directory, not a regular file"),
}
PROMPT_FILES = {
    "empty-text.jsonl": b'{"text": "fine"}\n{"text": ""}\n',
    "null-text.jsonl": b'{"text": null}\n',
    "number.jsonl": b'{"text": 42}\n',
    "latin1.txt": "first prompt\nsecond, caf\u00e9\n".encode("latin-1"),
    "random.bin": np.random.default_rng(20).integers(1, 256, 4096, dtype=np.uint8).tobytes(),
    "nul.txt": b"one\0two\n",
}


@pytest.mark.parametrize("case", list(COLLECT_CASES))
def test_bad_collect_input_is_one_line(ws, capsys, case):
    extra, kind, fragment = COLLECT_CASES[case]
    (ws.root / "empty.txt").write_text("\n\n")
    (ws.root / "bad.jsonl").write_text('{"prompt": "hello"}\n')
    for name, data in PROMPT_FILES.items():
        (ws.root / name).write_bytes(data)
    if not (ws.root / "prompts.fifo").exists():
        os.mkfifo(ws.root / "prompts.fifo")
    argv = ["collect", str(ws.good), "--prompts", str(ws.prompts), "-o", str(ws.root / "new-traces")]
    extra = [e.format(root=ws.root) for e in extra]
    if kind == "folder":
        extra = ["-o", str(collect_case(ws, extra[1]))]
    record("bad input (collect)", case, one_line_error(capsys, ws, [*argv, *extra], fragment))


def traces_case(ws, name: str) -> Path:
    """A copy of the good traces, damaged one way, made before the snapshot."""
    folder = ws.root / "traces" / name
    if folder.exists():
        return folder
    shutil.copytree(ws.traces, folder)
    manifest = folder / "manifest.json"
    if name == "no manifest":
        manifest.unlink()
    elif name == "manifest not JSON":
        manifest.write_text("{")
    elif name == "a shard name leaving the folder":
        edit_json(manifest, lambda m: m["shards"][0].update(name="../../models"))
    elif name == "a shard cut short":
        victim = folder / "shard-00001" / "tokens.npy"
        victim.write_bytes(victim.read_bytes()[:90])
    elif name == "layout missing":
        edit_json(manifest, lambda m: m.pop("layout"))
    return folder


TRAIN_CASES = {
    "traces without manifest": ("no manifest", [], "has no manifest.json: is it a folder written by"),
    "traces manifest not JSON": ("manifest not JSON", [], "is not valid JSON: collect the traces again"),
    "traces manifest without layout": ("layout missing", [], "settings or shard list is damaged"),
    "shard name leaving the folder": ("a shard name leaving the folder", [], "a shard name is damaged"),
    "shard truncated by a crash": ("a shard cut short", [], "tokens.npy is missing or damaged"),
    "-o is a file": (None, ["-o", "{root}/prompts.txt"], "is a file: give a folder for the predictors"),
    "--epochs 0": (None, ["--epochs", "0"], "--epochs and --hidden must be at least 1"),
    "--val-fraction 1.5": (None, ["--val-fraction", "1.5"], "--val-fraction must lie between 0 and 1"),
    "--layers not collected": (None, ["--layers", "9"], "layers [9] are not in the traces"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_input_is_one_line(ws, capsys, case):
    damage, extra, fragment = TRAIN_CASES[case]
    traces = traces_case(ws, damage) if damage else ws.traces
    argv = ["train", str(traces), "-o", str(ws.root / "new-predictors"), "--epochs", "1", "--hidden", "8"]
    argv += [e.format(root=ws.root) for e in extra]
    record("bad input (train)", case, one_line_error(capsys, ws, argv, fragment))


def test_train_refuses_another_runs_checkpoints(ws, capsys):
    out = ws.root / "other-run"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "settings.json").write_text('{"fingerprint": "another"}')
    argv = ["train", str(ws.traces), "-o", str(out), "--epochs", "1", "--hidden", "8"]
    message = one_line_error(capsys, ws, argv, "holds checkpoints of another run")
    record("bad input (train)", "-o holds another run's checkpoints", message)


INSPECT_CASES = {
    "VRAM budget below k experts per layer": (["--vram-budget", "1MiB"], "raise --vram-budget to at least"),
    "-c 0 with a budget": (["--vram-budget", "8GiB", "-c", "0"], "context size 0 must be positive"),
    "--json in a missing folder": (["--json", "nowhere/layout.json"], "its folder nowhere does not exist"),
}


@pytest.mark.parametrize("case", list(INSPECT_CASES))
def test_bad_inspect_options_are_one_line(ws, capsys, case):
    extra, fragment = INSPECT_CASES[case]
    record(
        "bad option (inspect)", case, one_line_error(capsys, ws, ["inspect", str(ws.good), *extra], fragment)
    )


class Payload:
    """Unpickling this creates a file: proof of execution if the file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_in_traces_and_checkpoints_are_never_executed(ws, tmp_path, caplog):
    import torch

    from edge_preattn.errors import UserError
    from edge_preattn.predictors import fit
    from edge_preattn.traces.trace_set import TraceSet

    marker = tmp_path / "executed"
    traces = shutil.copytree(ws.traces, tmp_path / "traces")
    np.save(
        traces / "shard-00000" / "L000.ids.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True
    )
    with pytest.raises(UserError, match=r"L000\.ids\.npy is missing or damaged") as refused:
        TraceSet(traces).layer(0, "ids")
    checkpoint = tmp_path / "layer-000.pt"
    torch.save({"epoch": Payload(marker)}, checkpoint)
    with caplog.at_level("WARNING", logger="edge_preattn"):
        assert fit._load_checkpoint(checkpoint, "cpu") is None  # weights_only: refused, layer retrained
    assert not marker.exists()
    record("untrusted input", "a pickle (object array) in a trace shard", str(refused.value))
    record(
        "untrusted input",
        "a pickle in a training checkpoint",
        f"not run; warning: {caplog.records[-1].getMessage()[:120]}",
    )


def test_no_code_path_unpickles_user_files():
    """What users pass is data: no pickle.load, allow_pickle=True, or torch.load without weights_only."""
    root = Path(__file__).resolve().parents[1]
    for source in [*root.glob("edge_preattn/**/*.py"), *root.glob("bench/*.py")]:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert "pickle.load" not in code and "allow_pickle=True" not in code, f"{source}:{number}"
            assert "torch.load(" not in code or "weights_only=True" in code, f"{source}:{number}"
            # eval/exec of a string literal only (cli.py clears a CPython mark so): never of data
            assert not re.search(r"(?<![\w.])(eval|exec)\((?!\"[^\"]*\"\))", code), f"{source}:{number}"


NUMERIC_CASES = {  # (verb, flags, fragment): NaN passed every range check after it; others hung or died
    "run --temp nan": ("run", ["--temp", "nan"], "--temp is nan: give a finite number"),
    "run --temp inf": ("run", ["--temp", "inf"], "--temp is inf: give a finite number"),
    "run --top-p 2": ("run", ["--top-p", "2"], "--top-p 2.0 must be in (0, 1]"),
    "run --target nan": ("run", ["--mode", "lru", "--target", "nan"], "--target is nan"),
    "run --bandwidth 1B/s (hung)": ("run", ["--mode", "lru", "--bandwidth", "1B/s"], "is below 1MB/s"),
    "run --bandwidth 999kB/s": ("run", ["--mode", "lru", "--bandwidth", "999kB/s"], "is below 1MB/s"),
    "run -t 10000 (libgomp died)": ("run", ["-t", "10000"], "-t 10000 is outside 1.."),
    "run -t -5": ("run", ["-t", "-5"], "-t -5 is outside 1.."),
    "run --n-cpu-moe -3 (was ignored)": ("run", ["--n-cpu-moe", "-3"], "--n-cpu-moe -3 is negative"),
    "collect -t 10000": ("collect", ["-t", "10000"], "-t 10000 is outside 1.."),
    "collect --temp nan": ("collect", ["--temp", "nan"], "--temp is nan"),
    "collect --temp -1": ("collect", ["--temp", "-1"], "--temp must be 0 or more"),
    "collect --top-p 0": ("collect", ["--top-p", "0"], "--top-p lie in (0, 1]"),
    "train --lr nan": ("train", ["--lr", "nan"], "--lr is nan: give a finite number"),
    "train --lr 0": ("train", ["--lr", "0"], "--lr must be above 0"),
    "train --weight-decay -inf": ("train", ["--weight-decay=-inf"], "--weight-decay is -inf"),
    "train --val-fraction nan": ("train", ["--val-fraction", "nan"], "--val-fraction is nan"),
    "train --hidden 1000000000": ("train", ["--hidden", "1000000000"], "--hidden 1000000000 is above"),
    "train --max-train-samples 0 (was ignored)": (
        "train",
        ["--max-train-samples", "0"],
        "must be at least 1",
    ),
    "train --patience 0": ("train", ["--patience", "0"], "--patience and --max-train-samples must be"),
    "train --device tpu": ("train", ["--device", "tpu"], "--device 'tpu' is not a torch device"),
    "train --device cuda without CUDA": ("train", ["--device", "cuda"], "torch sees no CUDA GPU"),
}


@pytest.mark.parametrize("case", list(NUMERIC_CASES))
def test_numeric_options_are_range_checked(ws, capsys, case):
    verb, extra, fragment = NUMERIC_CASES[case]
    if case == "train --device cuda without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    argv = {
        "run": ["run", "-m", str(ws.good), "-n", "4"],
        "collect": ["collect", str(ws.good), "--prompts", str(ws.prompts), "-o", str(ws.root / "new")],
        "train": ["train", str(ws.traces), "-o", str(ws.root / "new"), "--epochs", "1", "--hidden", "8"],
    }[verb]
    if case == "train --hidden 1000000000":
        argv = argv[:-2]
    record("numeric option", case, one_line_error(capsys, ws, [*argv, *extra], fragment))


def destination(ws, kind: str) -> Path:
    """An existing non-regular file in the workspace (made before its snapshot, which then proves
    that it is still what it was)."""
    folder = ws.root / "destinations"
    folder.mkdir(exist_ok=True)
    path = folder / kind.replace(" ", "-")
    if kind == "a FIFO" and not path.exists():
        os.mkfifo(path)
    elif kind == "a socket" and not path.exists():
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
    elif kind == "a directory":
        path.mkdir(exist_ok=True)
    elif kind == "a link to a FIFO" and not path.is_symlink():
        path.symlink_to(destination(ws, "a FIFO"))
    return path


DESTINATIONS = ("a FIFO", "a socket", "a directory", "a link to a FIFO")
WRITERS = {
    "run --stats-json": lambda ws, out: ["run", "-m", str(ws.good), "-n", "2", "--stats-json", out],
    "inspect --json": lambda ws, out: ["inspect", str(ws.good), "--json", out],
    "synth -o": lambda ws, out: ["synth", "--preset", "tiny", "--layers", "1", "-o", out],
}


@pytest.mark.parametrize("kind", DESTINATIONS)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_outputs_never_replace_what_is_not_a_regular_file(ws, capsys, writer, kind):
    """The atomic rename would replace a device or FIFO with a file (`--stats-json /dev/null` as
    root): refused before any work, and the FIFO, socket or folder stays as it was."""
    out = destination(ws, kind)
    shown = {"a directory": "a directory", "a socket": "a socket"}.get(kind, "a FIFO (named pipe)")
    message = one_line_error(capsys, ws, WRITERS[writer](ws, str(out)), f"it is {shown}, not a regular file")
    record("output destination", f"{writer} to {kind}", message)


@pytest.mark.parametrize("verb", ["collect", "train"])
def test_an_output_folder_that_is_a_fifo_is_refused(ws, capsys, verb):
    out = str(destination(ws, "a FIFO"))
    argv = {
        "collect": ["collect", str(ws.good), "--prompts", str(ws.prompts), "-o", out],
        "train": ["train", str(ws.traces), "-o", out, "--epochs", "1", "--hidden", "8"],
    }[verb]
    message = one_line_error(capsys, ws, argv, "is a FIFO (named pipe): give a folder")
    record("output destination", f"{verb} -o to a FIFO", message)


@pytest.mark.parametrize("writer", ["run --stats-json", "inspect --json"])
def test_an_output_that_is_the_input_model_is_refused(ws, capsys, writer):
    """`inspect m.gguf --json m.gguf` replaced the model with its layout; the snapshot proves the
    model is untouched."""
    message = one_line_error(capsys, ws, WRITERS[writer](ws, str(ws.good)), "it is the input")
    record("output destination", f"{writer} naming the model itself", message)


def test_regular_outputs_are_replaced_and_links_written_through(ws, tmp_path):
    """The control: an existing file is replaced whole; a link to a file keeps being a link."""
    existing = tmp_path / "stats.json"
    existing.write_text("old")
    target = tmp_path / "layout.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert cli.main(["run", "-m", str(ws.good), "-n", "2", "--stats-json", str(existing)]) == 0
    assert cli.main(["inspect", str(ws.good), "--json", str(link)]) == 0
    assert json.loads(existing.read_text())["generated_tokens"] == 2
    assert link.is_symlink() and "layout" in json.loads(target.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout.json", "link.json", "stats.json"]
    record("output destination", "an existing file; a link to a file", "replaced whole; the link kept")


def matmul_onnx(n_embd: int, n_expert: int, weights: np.ndarray, external: Path | None = None) -> bytes:
    """A predictor graph by hand: scores = x @ weights; with `external`, its weights in that file."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["scores"])],
        "predictor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n_tokens", n_embd])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n_tokens", n_expert])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_io.OPSET)])
    model.ir_version = 8
    if external is not None:
        onnx.external_data_helper.convert_model_to_external_data(
            model, location=external.name, size_threshold=0
        )
        onnx.save_model(model, str(external.with_suffix(".onnx")))
        return external.with_suffix(".onnx").read_bytes()
    return model.SerializeToString()


def hand_made_set(directory: Path, ws, model: bytes, validation: list[int]) -> Path:
    """A one-layer set around an ONNX file, with the manifest train writes (its sha256 correct)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "layer-000.onnx").write_bytes(model)
    entry = {"layer": 0, "file": "layer-000.onnx", "sha256": onnx_io.sha256_bytes(model)}
    fields = {"fingerprint": ws.fingerprint, "n_embd": 128, "n_expert": 16, "k": 4, "input": "x_pre"}
    onnx_io.write_manifest(
        directory,
        {**fields, "arch": 2, "layers": [0], "validation_prompts": validation, "predictors": [entry]},
    )
    return directory


def test_onnx_external_data_is_refused(ws, capsys, tmp_path):
    """onnxruntime would open the weights file relative to the current directory: outside the folder
    and outside the manifest's sha256. The weights file here is real and loadable."""
    weights = np.random.default_rng(0).standard_normal((128, 16))
    model = matmul_onnx(128, 16, weights, external=tmp_path / "weights.bin")
    predictors = hand_made_set(ws.root / "predictors" / "external", ws, model, [3])
    argv = ["run", "-m", str(ws.good), "-n", "2", "--mode", "exact", "--predictors", str(predictors)]
    message = one_line_error(capsys, ws, argv, "keeps weights in a separate file (ONNX external data)")
    record("external data", "an ONNX predictor with external weights (run)", message)
    argv = ["eval", str(ws.traces), str(predictors), "-o", str(tmp_path / "out")]
    message = one_line_error(capsys, ws, argv, "keeps weights in a separate file (ONNX external data)")
    record("external data", "an ONNX predictor with external weights (eval)", message)


EVAL_CASES = {
    "-o is a FIFO (a traceback)": (["-o", "{fifo}"], "is a FIFO (named pipe): give a folder for the reports"),
    "--name with a slash": (["--name", "../x"], "--name '../x' must be a plain name"),
    "--name empty": (["--name", ""], "--name '' must be a plain name"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval_options_are_one_line(ws, capsys, case):
    extra, fragment = EVAL_CASES[case]
    argv = ["eval", str(ws.traces), str(ws.sets["good"]), "-o", str(ws.root / "reports")]
    argv += [e.format(fifo=destination(ws, "a FIFO")) for e in extra]
    record("bad input (eval)", case, one_line_error(capsys, ws, argv, fragment))


def test_eval_refuses_nan_scores_and_says_which_validation_prompts_it_lacks(ws, capsys, caplog, tmp_path):
    nan_set = hand_made_set(
        ws.root / "predictors" / "nan", ws, matmul_onnx(128, 16, np.full((128, 16), np.nan)), [3]
    )
    argv = ["eval", str(ws.traces), str(nan_set), "-o", str(tmp_path / "out")]
    message = one_line_error(capsys, ws, argv, "layer 0's predictor gives NaN or infinite scores; retrain")
    record("NaN and infinite input", "eval of a predictor whose scores are all NaN (was scored)", message)
    weights = np.random.default_rng(1).standard_normal((128, 16))
    good_set = hand_made_set(tmp_path / "partial", ws, matmul_onnx(128, 16, weights), [3, 7, 9])
    with caplog.at_level("WARNING", logger="edge_preattn"):
        assert (
            cli.main(["eval", str(ws.traces), str(good_set), "-o", str(tmp_path / "out"), "--name", "t"]) == 0
        )
    payload = json.loads((tmp_path / "out" / "accuracy-t.json").read_text())
    assert payload["heldout_prompts"] == [3]
    warning = next(r.getMessage() for r in caplog.records if r.levelno == 30)
    assert "2 of the 3 validation prompts are not in" in warning and "[7, 9]" in warning
    record("bad input (eval)", "validation prompts not in the traces (were counted)", f"warning: {warning}")
