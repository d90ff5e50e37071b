"""Every command meets bad input — model files, predictors, traces, options — with one line that names
the problem and the fix, exit status 2, and nothing written. Each case is noted for the robustness
table (tests/robustness_log.py)."""

import json
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_preattn import cli, onnx_io
from edge_preattn.collect import CollectSettings, collect
from edge_preattn.layout import model_fingerprint
from edge_preattn.predictors import Predictor
from edge_preattn.synth import write_synthetic

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
    "negative norm epsilon (ggml aborts)": "rms_epsilon = -1.0 is not a finite non-negative number",
    "4 heads, 3 KV heads (ggml aborts)": "4 attention heads are not a multiple of 3 KV heads",
    "a dense model (no experts)": "is a dense llama model: no routed experts",
    "dbrx: an architecture llama.cpp runs but this layout does not": "architecture 'dbrx' is not supported",
    "a directory": "is a directory; pass the path of a .gguf model file",
    "missing": "does not exist; pass the path of a .gguf model file",
    "unreadable": "permission denied; check the file's permissions",
}


@pytest.mark.parametrize("kind", list(MODEL_CASES))
@pytest.mark.parametrize("verb", ["inspect", "run", "collect"])
def test_a_bad_model_is_one_line_for_every_command(ws, capsys, monkeypatch, verb, kind):
    model = str(ws.models[kind])
    if kind == "unreadable":

        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr("edge_preattn.layout.open", refuse, raising=False)
    argv = {
        "inspect": ["inspect", model],
        "run": ["run", "-m", model, "-n", "4"],
        "collect": ["collect", model, "--prompts", str(ws.prompts), "-o", str(ws.root / "new-traces")],
    }[verb]
    message = one_line_error(capsys, ws, argv, MODEL_CASES[kind])
    if verb == "run":
        record("bad model", kind, message)


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
        "its directory does not exist",
    ),
    "prediction mode without predictors": (["--mode", "exact"], "--mode exact needs --predictors DIR"),
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
    "--prompts-per-shard 0": (["--prompts-per-shard", "0"], "", "must be at least 1"),
    "-c smaller than -n": (["-c", "10", "-n", "64"], "", "-c 10 leaves no room for a prompt and -n 64"),
    "negative -n": (["-n", "-1"], "", "--max-new-tokens must be 0 or more"),
}


@pytest.mark.parametrize("case", list(COLLECT_CASES))
def test_bad_collect_input_is_one_line(ws, capsys, case):
    extra, kind, fragment = COLLECT_CASES[case]
    (ws.root / "empty.txt").write_text("\n\n")
    (ws.root / "bad.jsonl").write_text('{"prompt": "hello"}\n')
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
    "--json in a missing folder": (["--json", "nowhere/layout.json"], "directory nowhere does not exist"),
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

    from edge_preattn import train
    from edge_preattn.errors import UserError
    from edge_preattn.traces import TraceSet

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
        assert train._load_checkpoint(checkpoint, "cpu") is None  # weights_only: refused, layer retrained
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
    for source in [*root.glob("edge_preattn/*.py"), *root.glob("bench/*.py")]:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert "pickle.load" not in code and "allow_pickle=True" not in code, f"{source}:{number}"
            assert "torch.load(" not in code or "weights_only=True" in code, f"{source}:{number}"
            assert not re.search(r"(?<![\w.])(eval|exec)\(", code), f"{source}:{number}"
