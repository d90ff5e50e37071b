"""A round of hostile invocations of the `edge-preattn` CLI, built without the project's own
robustness table, to find what still crashes, hangs, answers wrong or touches files it was not told to.

Each case runs `python -m edge_preattn.cli ...` in a subprocess (sequentially, tiny models, short -n,
so that it stays gentle on a shared machine) inside a scratch folder, and is classified:

- ok: exit 0 where success is the right answer (and the named output exists);
- clean-error: exit 2 (or 130/141/143 for signals and broken pipes), exactly one line on stderr
  starting with `edge-preattn`, no traceback;
- BAD: a traceback, death by a signal or an abort, a timeout, exit 0 where the input is wrong, or a
  file created/changed/removed outside the case's named outputs (the scratch folder is snapshot before
  and after every case).

    python bench/hostile_round.py [--scratch DIR] [-o bench/results] [--only CATEGORY]

writes bench/results/hostile-round.json and .md.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGED = REPO / "edge_preattn" / "data" / "edge-moe-default.gguf"
CLI = [sys.executable, "-m", "edge_preattn.cli"]
TIMEOUT_S = 60
CLEAN_ERROR_CODES = {2, 130, 141, 143}
AS_ROOT = os.geteuid() == 0  # permissions do not stop root: those cases may succeed


@dataclass
class Case:
    """One hostile invocation. `expect`: 'error' (only a clean error is right), 'ok' (only success is
    right) or 'any' (either is right). `outputs`: scratch-relative paths the case may create or
    change (a folder covers what is under it). `shell`: run argv through bash (closed/broken pipes).
    `interrupt`: (signal, seconds after start). `http`: a serve case, its raw requests."""

    category: str
    name: str
    argv: list[str]
    expect: str = "error"
    outputs: list[str] = field(default_factory=list)
    shell: str | None = None
    interrupt: tuple[int, float] | None = None
    http: list[bytes] | None = None
    stdout_check: str | None = None  # a substring stdout must hold for an ok outcome


# ---------------------------------------------------------------- fixtures


def cli(*args: str, cwd: Path) -> None:
    subprocess.run([*CLI, *args], cwd=cwd, check=True, capture_output=True, timeout=300)


def make_fixtures(root: Path) -> None:
    """Tiny models, traces, predictors and their corrupted copies, all under root/fx. (Run as root,
    the unreadable file and the read-only folder are readable and writable: those cases then succeed.)"""
    fx = root / "fx"
    if fx.exists():  # a case changed the fixtures: make them again (chmod first, for rmtree)
        os.chmod(fx / "readonly", 0o755)
        shutil.rmtree(fx)
    fx.mkdir(parents=True)
    cli("synth", "--preset", "tiny", "-o", "fx/tiny.gguf", cwd=root)
    cli("synth", "--preset", "tiny", "--seed", "7", "--layers", "2", "-o", "fx/other.gguf", cwd=root)
    prompts = [f"prompt number {i} about the cat and the dog" for i in range(8)]
    (fx / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cli(
        "collect",
        "fx/tiny.gguf",
        "--prompts",
        "fx/prompts.txt",
        "-n",
        "4",
        "-o",
        "fx/traces",
        "-t",
        "1",
        cwd=root,
    )
    cli(
        "collect",
        "fx/other.gguf",
        "--prompts",
        "fx/prompts.txt",
        "-n",
        "4",
        "-o",
        "fx/traces-other",
        "-t",
        "1",
        cwd=root,
    )
    train = ("--epochs", "1", "--hidden", "16", "-t", "1")
    cli("train", "fx/traces", "-o", "fx/preds", *train, cwd=root)
    cli("train", "fx/traces-other", "-o", "fx/preds-other", *train, cwd=root)
    good = (fx / "tiny.gguf").read_bytes()
    rng = random.Random(20)
    (fx / "empty.gguf").write_bytes(b"")
    (fx / "random.gguf").write_bytes(rng.randbytes(4096))
    (fx / "magic-only.gguf").write_bytes(b"GGUF")
    for cut in (8, 24, 100, 1000, len(good) // 2, len(good) - 1):
        (fx / f"trunc-{cut}.gguf").write_bytes(good[:cut])
    for i in range(12):  # bit flips in the header/metadata region
        data = bytearray(good)
        pos = rng.randrange(4, 6000)
        data[pos] ^= 1 << rng.randrange(8)
        (fx / f"flip-{i}.gguf").write_bytes(bytes(data))
    data = bytearray(good)
    data[4:8] = struct.pack("<I", 99)  # unknown version
    (fx / "version99.gguf").write_bytes(bytes(data))
    data = bytearray(good)
    data[8:16] = struct.pack("<Q", 2**63 - 1)  # absurd tensor count
    (fx / "ntensors.gguf").write_bytes(bytes(data))
    data = bytearray(good)
    data[16:24] = struct.pack("<Q", 2**62)  # absurd metadata count
    (fx / "nkv.gguf").write_bytes(bytes(data))
    (fx / "notgguf.onnx").write_bytes(b"NOTONNX" * 100)
    (fx / "dir.gguf").mkdir()
    os.mkfifo(fx / "fifo.gguf")
    os.symlink("loop-b.gguf", fx / "loop-a.gguf")
    os.symlink("loop-a.gguf", fx / "loop-b.gguf")
    os.symlink("missing-target.gguf", fx / "dangling.gguf")
    shutil.copy(fx / "tiny.gguf", fx / "unreadable.gguf")
    os.chmod(fx / "unreadable.gguf", 0)
    (fx / "readonly").mkdir()
    os.chmod(fx / "readonly", 0o555)
    # prompts files
    (fx / "p-empty.txt").write_text("")
    (fx / "p-blank.txt").write_text("\n\n   \n")
    (fx / "p-nul.txt").write_bytes(b"hello\x00world\nsecond\n")
    (fx / "p-badutf8.txt").write_bytes(b"caf\xe9 au lait\n\xff\xfe\xfd\n")
    (fx / "p-random.txt").write_bytes(rng.randbytes(3000))
    (fx / "p-huge.txt").write_text("word " * 20000 + "\n")
    (fx / "p-jsonl-empty.jsonl").write_text('{"text": ""}\n{"text": "fine"}\n')
    (fx / "p-jsonl-null.jsonl").write_text('{"text": null}\n{"text": 3}\n')
    (fx / "p-jsonl-list.jsonl").write_text('{"text": ["a", "b"]}\n')
    (fx / "p-jsonl-notext.jsonl").write_text('{"body": "hello"}\n')
    (fx / "p-jsonl-broken.jsonl").write_text('{"text": "hello"\n{"text": "x"}\n')
    (fx / "p-jsonl-array.jsonl").write_text('["text", "hello"]\n')
    # trace and predictor folders with broken manifests
    for name, mutations in MANIFEST_MUTATIONS.items():
        for (kind, src, manifest), mutate in zip(
            (("traces", "traces", "manifest.json"), ("preds", "preds", "predictors.json")),
            mutations,
            strict=True,
        ):
            dst = fx / f"{kind}-{name}"
            shutil.copytree(fx / src, dst, symlinks=True)
            path = dst / manifest
            text = mutate(path.read_text())
            path.write_text(text)
    shutil.copytree(fx / "preds", fx / "preds-badonnx")
    for onnx in (fx / "preds-badonnx").glob("*.onnx"):
        onnx.write_bytes(b"\x08\x07garbage" * 50)
    shutil.copytree(fx / "preds", fx / "preds-emptydir", ignore=lambda d, names: names)
    shutil.copytree(fx / "traces", fx / "traces-truncshard")
    for shard_file in sorted((fx / "traces-truncshard").rglob("*")):
        if shard_file.is_file() and shard_file.name != "manifest.json" and shard_file.stat().st_size > 64:
            shard_file.write_bytes(shard_file.read_bytes()[: shard_file.stat().st_size // 2])
    # NaN model: overwrite the first F32 router/norm bytes with NaN far into the data region
    data = bytearray(good)
    nan = struct.pack("<f", float("nan"))
    for off in range(len(good) - 40000, len(good) - 4, 4):
        data[off : off + 4] = nan
    (fx / "nan-tail.gguf").write_bytes(bytes(data))


def _json_set(key: str, value: object):
    def mutate(text: str) -> str:
        data = json.loads(text)
        data[key] = value
        return json.dumps(data)

    return mutate


def _json_top(value: object):
    return lambda text: json.dumps(value)


MANIFEST_MUTATIONS = {  # name -> how to break the traces' manifest.json, the predictors' predictors.json
    "notjson": (lambda text: text[: len(text) // 2],) * 2,
    "list": (_json_top([1, 2, 3]),) * 2,
    "string": (_json_top("hello"),) * 2,
    "null": (_json_top(None),) * 2,
    "empty": (lambda text: "",) * 2,
    "format-int": (_json_set("format", 7),) * 2,
    "fingerprint-nan": (_json_set("fingerprint", float("nan")),) * 2,
    "model-int": (_json_set("model", 17),) * 2,
    "shape-str": (_json_set("layout", "x"), _json_set("n_expert", "16")),
    "list-dict": (_json_set("shards", {}), _json_set("predictors", {})),
}


# ---------------------------------------------------------------- cases

BAD_NUMBERS = ["-1", "0", "nan", "inf", "-inf", "abc", "1e30", "99999999999999999999", "0x10", ""]
ALWAYS_BAD = {"nan", "inf", "-inf", "abc", ""}


def numeric_cases() -> list[Case]:
    """Every numeric option of each verb with values that are wrong (nan, text) or at the edges."""
    cases = []
    base = {
        "run": ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-c", "64", "-t", "1"],
        "collect": [
            "collect",
            "fx/tiny.gguf",
            "--prompts",
            "fx/prompts.txt",
            "-n",
            "2",
            "-t",
            "1",
            "-o",
            "out/c",
        ],
        "inspect": ["inspect", "fx/tiny.gguf"],
        "train": ["train", "fx/traces", "-o", "out/t", "--epochs", "1", "--hidden", "8", "-t", "1"],
    }
    options = {
        "run": [
            "-n",
            "-c",
            "-t",
            "--temp",
            "--top-k",
            "--top-p",
            "--min-p",
            "--repeat-penalty",
            "-s",
            "--slots",
            "--extra",
            "--target",
            "--lookahead",
            "--predictor-threads",
            "--bypass-tokens",
            "-ngl",
            "--n-cpu-moe",
        ],
        "collect": ["-n", "--max-samples", "--temp", "--top-p", "-c", "--prompts-per-shard", "--seed"],
        "inspect": ["-c"],
        "train": [
            "--epochs",
            "--hidden",
            "--batch-size",
            "--lr",
            "--weight-decay",
            "--patience",
            "--val-fraction",
            "--max-train-samples",
            "--seed",
        ],
    }
    values = {
        "run": BAD_NUMBERS,
        "collect": ["-1", "0", "nan", "abc", "1e30", "99999999999999999999"],
        "inspect": BAD_NUMBERS,
        "train": ["-1", "0", "nan", "inf", "abc", "1e30"],
    }
    for verb, opts in options.items():
        for opt in opts:
            for value in values[verb]:
                argv = list(base[verb])
                if opt in argv:  # replace the base value
                    argv[argv.index(opt) + 1] = value
                else:
                    argv += [opt, value]
                if (
                    verb in ("run", "collect")
                    and opt in ("-c",)
                    and value in ("1e30", "99999999999999999999")
                ):
                    pass
                expect = "error" if value in ALWAYS_BAD else "any"
                out = ["out"] if verb in ("collect", "train") else []
                cases.append(Case("numbers", f"{verb} {opt} {value!r}", argv, expect, out))
    for verb_argv in (
        ["inspect", "fx/tiny.gguf"],
        ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-t", "1", "--mode", "lru"],
    ):
        for size in [
            "6GiB",
            "6XB",
            "-1GiB",
            "0",
            "nanGiB",
            "1e400GiB",
            "GiB",
            "6 GiB",
            "99999999999PiB",
            "1B",
        ]:
            cases.append(
                Case(
                    "numbers",
                    f"{verb_argv[0]} --vram-budget {size!r}",
                    [*verb_argv, "--vram-budget", size],
                    "ok" if size == "6GiB" else "any",
                )
            )
    for rate in ["12GB/s", "1B/s", "0B/s", "-5GB/s", "nanGB/s", "12XB/s", "fast", "1e30GB/s"]:
        argv = [
            "run",
            "-m",
            "fx/tiny.gguf",
            "-p",
            "hi",
            "-n",
            "2",
            "-t",
            "1",
            "--mode",
            "lru",
            "--bandwidth",
            rate,
        ]
        cases.append(Case("numbers", f"run --bandwidth {rate!r}", argv, "ok" if rate == "12GB/s" else "any"))
    return cases


def path_cases() -> list[Case]:
    """Missing, directory, FIFO, symlink loops, unreadable, read-only folders, outputs onto inputs."""
    cases = []
    bad_models = [
        "fx/missing.gguf",
        "fx/dir.gguf",
        "fx/fifo.gguf",
        "fx/loop-a.gguf",
        "fx/dangling.gguf",
        "fx/prompts.txt",
        *([] if AS_ROOT else ["fx/unreadable.gguf"]),
    ]
    for model in bad_models:
        cases.append(Case("paths", f"inspect {model}", ["inspect", model]))
        cases.append(Case("paths", f"run -m {model}", ["run", "-m", model, "-p", "hi", "-n", "2", "-t", "1"]))
        cases.append(
            Case(
                "paths",
                f"collect {model}",
                ["collect", model, "--prompts", "fx/prompts.txt", "-n", "2", "-t", "1", "-o", "out/c"],
                outputs=["out"],
            )
        )
        cases.append(
            Case(
                "paths",
                f"synth --widen-from {model}",
                ["synth", "--widen-from", model, "-o", "out/w.gguf"],
                outputs=["out"],
            )
        )
        cases.append(
            Case("paths", f"profile {model}", ["profile", model, "-n", "50", "-o", "out"], outputs=["out"])
        )
        cases.append(
            Case(
                "paths",
                f"bench {model}",
                ["bench", model, "--vram-budget", "1MiB", "-n", "2", "--rounds", "1", "-o", "out"],
                outputs=["out"],
            )
        )
    for prompts in ["fx/missing.txt", "fx/dir.gguf", "fx/fifo.gguf", "fx/loop-a.gguf", "fx/dangling.gguf"]:
        cases.append(
            Case(
                "paths",
                f"collect --prompts {prompts}",
                ["collect", "fx/tiny.gguf", "--prompts", prompts, "-n", "2", "-t", "1", "-o", "out/c"],
                outputs=["out"],
            )
        )
    for traces in ["fx/missing", "fx/tiny.gguf", "fx/fifo.gguf", "fx/loop-a.gguf", "fx/readonly", "fx/preds"]:
        cases.append(
            Case(
                "paths",
                f"train {traces}",
                ["train", traces, "-o", "out/t", "--epochs", "1", "-t", "1"],
                outputs=["out"],
            )
        )
        cases.append(
            Case(
                "paths", f"eval {traces} preds", ["eval", traces, "fx/preds", "-o", "out/e"], outputs=["out"]
            )
        )
        cases.append(
            Case(
                "paths",
                f"eval traces {traces}",
                ["eval", "fx/traces", traces, "-o", "out/e"],
                "ok" if traces == "fx/preds" else "error",  # the one right folder here
                outputs=["out"],
            )
        )
        cases.append(
            Case(
                "paths",
                f"run --predictors {traces}",
                [
                    "run",
                    "-m",
                    "fx/tiny.gguf",
                    "-p",
                    "hi",
                    "-n",
                    "2",
                    "-t",
                    "1",
                    "--mode",
                    "top1",
                    "--predictors",
                    traces,
                ],
                "ok" if traces == "fx/preds" else "error",
            )
        )
    # outputs onto bad destinations: (destination, what, expected for a file output, for a folder output)
    destinations = [
        ("fx/readonly/x", "a read-only folder", "any" if AS_ROOT else "error", "any" if AS_ROOT else "error"),
        ("fx/dir.gguf", "a directory", "error", "any"),
        ("fx/fifo.gguf", "a FIFO", "error", "error"),
        ("fx/loop-a.gguf", "a symlink loop", "error", "error"),
        ("fx/missing-dir/deeper/x", "a missing folder", "any", "any"),
        ("fx/tiny.gguf", "an existing file", "any", "error"),
        ("fx/unreadable.gguf", "an unreadable file", "any", "error"),
    ]
    run = ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-t", "1"]
    collect = ["collect", "fx/tiny.gguf", "--prompts", "fx/prompts.txt", "-n", "2", "-t", "1"]
    train = ["train", "fx/traces", "--epochs", "1", "--hidden", "8", "-t", "1"]
    for dest, what, file_expect, dir_expect in destinations:
        allowed = [dest] if "error" not in (file_expect, dir_expect) or AS_ROOT else []
        if dest == "fx/tiny.gguf":
            allowed = [dest]
        for name, argv, expect in (
            ("synth -o", ["synth", "--preset", "tiny", "-o", dest], file_expect),
            ("inspect --json", ["inspect", "fx/preds/../tiny.gguf", "--json", dest], file_expect),
            ("run --stats-json", [*run, "--stats-json", dest], file_expect),
            ("collect -o", [*collect, "-o", dest], dir_expect),
            ("train -o", [*train, "-o", dest], dir_expect),
            ("eval -o", ["eval", "fx/traces", "fx/preds", "-o", dest], dir_expect),
        ):
            cases.append(Case("outputs", f"{name} {what}", argv, expect, allowed))
    cases.append(
        Case(
            "outputs",
            "collect -o the traces of another model",
            [
                "collect",
                "fx/tiny.gguf",
                "--prompts",
                "fx/prompts.txt",
                "-n",
                "2",
                "-t",
                "1",
                "-o",
                "fx/traces-other",
            ],
        )
    )
    cases.append(
        Case(
            "outputs",
            "train -o the traces folder",
            ["train", "fx/traces", "-o", "fx/traces", "--epochs", "1", "--hidden", "8", "-t", "1"],
            "any",  # predictors beside the traces: the folder it was told to write to
            ["fx/traces"],
        )
    )
    cases.append(
        Case(
            "outputs",
            "train -o another model's predictors",
            ["train", "fx/traces", "-o", "fx/preds-other", "--epochs", "1", "--hidden", "8", "-t", "1"],
        )
    )
    cases.append(
        Case(
            "outputs",
            "synth --widen-from X -o X",
            ["synth", "--widen-from", "fx/tiny.gguf", "-o", "fx/tiny.gguf"],
        )
    )
    cases.append(
        Case(
            "outputs", "inspect --json onto the model", ["inspect", "fx/tiny.gguf", "--json", "fx/tiny.gguf"]
        )
    )
    cases.append(
        Case(
            "outputs",
            "run --stats-json onto the model",
            ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-t", "1", "--stats-json", "fx/tiny.gguf"],
        )
    )
    # the good ones, to show the harness accepts success
    cases.append(
        Case(
            "outputs",
            "synth -o a new file",
            ["synth", "--preset", "tiny", "-o", "out/new.gguf"],
            "ok",
            ["out"],
        )
    )
    cases.append(
        Case(
            "outputs",
            "inspect --json a new file",
            ["inspect", "fx/tiny.gguf", "--json", "out/l.json"],
            "ok",
            ["out"],
        )
    )
    cases.append(
        Case(
            "outputs",
            "run --stats-json a new file",
            ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-t", "1", "--stats-json", "out/s.json"],
            "ok",
            ["out"],
        )
    )
    return cases


def file_cases() -> list[Case]:
    """Truncated, bit-flipped, empty, random, NaN-filled GGUFs; bad ONNX; mismatched predictors; broken
    manifests and shards."""
    cases = []
    models = sorted(
        p.name
        for p in (Path("fx")).glob("*.gguf")
        if p.name.startswith(
            ("trunc", "flip", "version", "ntensors", "nkv", "empty", "random", "magic", "nan")
        )
    )
    for model in models:
        expect = "any" if model.startswith("flip") else "error"
        cases.append(Case("files", f"inspect {model}", ["inspect", f"fx/{model}"], expect))
        cases.append(
            Case(
                "files",
                f"run -m {model}",
                ["run", "-m", f"fx/{model}", "-p", "hi", "-n", "2", "-t", "1", "--temp", "0"],
                expect,
            )
        )
    for model in ("fx/notgguf.onnx", "fx/preds/layer-000.onnx"):
        cases.append(Case("files", f"run -m {model}", ["run", "-m", model, "-p", "hi", "-n", "2", "-t", "1"]))
    for mode in ("top1", "exact", "overprov", "adaptive"):
        for preds in ("fx/preds-other", "fx/preds-badonnx", "fx/preds-emptydir"):
            cases.append(
                Case(
                    "files",
                    f"run --mode {mode} --predictors {preds}",
                    [
                        "run",
                        "-m",
                        "fx/tiny.gguf",
                        "-p",
                        "hi",
                        "-n",
                        "2",
                        "-t",
                        "1",
                        "--mode",
                        mode,
                        "--predictors",
                        preds,
                    ],
                )
            )
    for engine in ("native", "onnxruntime"):
        cases.append(
            Case(
                "files",
                f"run --predictor-engine {engine} good preds",
                [
                    "run",
                    "-m",
                    "fx/tiny.gguf",
                    "-p",
                    "hi",
                    "-n",
                    "2",
                    "-t",
                    "1",
                    "--mode",
                    "top1",
                    "--predictors",
                    "fx/preds",
                    "--predictor-engine",
                    engine,
                ],
                "ok",
            )
        )
    for name in MANIFEST_MUTATIONS:
        cases.append(
            Case(
                "files",
                f"train traces-{name}",
                ["train", f"fx/traces-{name}", "-o", "out/t", "--epochs", "1", "--hidden", "8", "-t", "1"],
                outputs=["out"],
            )
        )
        cases.append(
            Case(
                "files",
                f"eval traces-{name}",
                ["eval", f"fx/traces-{name}", "fx/preds", "-o", "out/e"],
                outputs=["out"],
            )
        )
        cases.append(
            Case(
                "files",
                f"eval preds-{name}",
                ["eval", "fx/traces", f"fx/preds-{name}", "-o", "out/e"],
                "any" if name == "model-int" else "error",  # the predictors' model path is a note
                outputs=["out"],
            )
        )
        cases.append(
            Case(
                "files",
                f"run --predictors preds-{name}",
                [
                    "run",
                    "-m",
                    "fx/tiny.gguf",
                    "-p",
                    "hi",
                    "-n",
                    "2",
                    "-t",
                    "1",
                    "--mode",
                    "top1",
                    "--predictors",
                    f"fx/preds-{name}",
                ],
                "any" if name == "model-int" else "error",
            )
        )
    cases.append(
        Case(
            "files",
            "train truncated shards",
            ["train", "fx/traces-truncshard", "-o", "out/t", "--epochs", "1", "--hidden", "8", "-t", "1"],
            outputs=["out"],
        )
    )
    cases.append(
        Case(
            "files",
            "eval truncated shards",
            ["eval", "fx/traces-truncshard", "fx/preds", "-o", "out/e"],
            outputs=["out"],
        )
    )
    cases.append(
        Case(
            "files",
            "eval predictors of another model",
            ["eval", "fx/traces", "fx/preds-other", "-o", "out/e"],
            outputs=["out"],
        )
    )
    cases.append(
        Case(
            "files",
            "eval --heldout of another model",
            ["eval", "fx/traces", "fx/preds", "--heldout", "fx/traces-other", "-o", "out/e"],
            outputs=["out"],
        )
    )
    cases.append(
        Case(
            "files",
            "train --prior with another model",
            ["train", "fx/traces", "-m", "fx/other.gguf", "-o", "out/t", "--epochs", "1", "-t", "1"],
            outputs=["out"],
        )
    )
    cases.append(
        Case(
            "files",
            "eval -m another model",
            ["eval", "fx/traces", "fx/preds", "-m", "fx/other.gguf", "-o", "out/e"],
            outputs=["out"],
        )
    )
    cases.append(
        Case(
            "files",
            "run --mode oracle without a record",
            ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-t", "1", "--mode", "oracle"],
            "any",
        )
    )
    cases.append(
        Case(
            "files",
            "packaged model default run",
            ["run", "-p", "def f(x):", "-n", "2", "-t", "1", "--temp", "0"],
            "ok",
        )
    )
    cases.append(
        Case("files", "packaged model inspect", ["inspect", str(PACKAGED)], "ok", stdout_check="expert")
    )
    cases.append(
        Case(
            "files",
            "packaged model, tiny's predictors",
            ["run", "-p", "hi", "-n", "2", "-t", "1", "--mode", "top1", "--predictors", "fx/preds"],
        )
    )
    cases.append(
        Case(
            "files",
            "tiny model, packaged predictors (default)",
            ["run", "-m", "fx/tiny.gguf", "-p", "hi", "-n", "2", "-t", "1", "--mode", "top1"],
        )
    )
    return cases


def prompt_cases() -> list[Case]:
    """Prompt text and prompt files that are empty, NUL-laden, not UTF-8, huge or of the wrong JSON."""
    cases = []
    run = ["run", "-m", "fx/tiny.gguf", "-n", "2", "-t", "1", "-c", "128"]
    for name, text in {
        "empty": "",
        "space": " ",
        "newlines": "\n\n\n",
        "emoji": "🦀" * 10,
        "control": "\x1b[2J\x07",
        "RTL": "\u202eevil",
        "lone-surrogate": "\udcff",
    }.items():
        expect = "any" if name != "lone-surrogate" else "error"
        if name in ("emoji", "control", "RTL", "newlines", "space"):
            expect = "any"
        cases.append(Case("prompts", f"run -p {name}", [*run, "-p", text], expect))
    cases.append(Case("prompts", "run -p huge (ctx 128)", [*run, "-p", "word " * 5000]))
    cases.append(
        Case(
            "prompts",
            "run -p huge (ctx default)",
            ["run", "-m", "fx/tiny.gguf", "-n", "2", "-t", "1", "-p", "word " * 20000],
            "any",
        )
    )
    for prompts in [
        "p-empty.txt",
        "p-blank.txt",
        "p-nul.txt",
        "p-badutf8.txt",
        "p-random.txt",
        "p-huge.txt",
        "p-jsonl-empty.jsonl",
        "p-jsonl-null.jsonl",
        "p-jsonl-list.jsonl",
        "p-jsonl-notext.jsonl",
        "p-jsonl-broken.jsonl",
        "p-jsonl-array.jsonl",
    ]:
        # a first line not starting with "{" makes the file plain text (documented): the array is a prompt
        expect = "any" if prompts in ("p-huge.txt", "p-jsonl-array.jsonl") else "error"
        cases.append(
            Case(
                "prompts",
                f"collect --prompts {prompts}",
                [
                    "collect",
                    "fx/tiny.gguf",
                    "--prompts",
                    f"fx/{prompts}",
                    "-n",
                    "2",
                    "-t",
                    "1",
                    "-c",
                    "256",
                    "-o",
                    "out/c",
                ],
                expect,
                ["out"],
            )
        )
        cases.append(
            Case(
                "prompts",
                f"bench -p {prompts}",
                [
                    "bench",
                    "fx/tiny.gguf",
                    "--vram-budget",
                    "1MiB",
                    "-p",
                    f"fx/{prompts}",
                    "-n",
                    "2",
                    "--rounds",
                    "1",
                    "--configs",
                    "lru",
                    "-t",
                    "1",
                    "-o",
                    "out",
                ],
                expect,
                ["out"],
            )
        )
    return cases


def verb_cases() -> list[Case]:
    """Every verb once as it should work, plus wrong combinations of options."""
    tiny = "fx/tiny.gguf"
    cases = [
        Case("verbs", "build --list", ["build", "--list"], "ok"),
        Case("verbs", "inspect tiny", ["inspect", tiny], "ok", stdout_check="layer"),
        Case("verbs", "synth tiny", ["synth", "--preset", "tiny", "-o", "out/s.gguf"], "ok", ["out"]),
        Case(
            "verbs",
            "synth --layers 0",
            ["synth", "--preset", "tiny", "--layers", "0", "-o", "out/s.gguf"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "synth --layers -3",
            ["synth", "--preset", "tiny", "--layers", "-3", "-o", "out/s.gguf"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "synth --layers 100000",
            ["synth", "--preset", "tiny", "--layers", "100000", "-o", "out/s.gguf"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "synth --expert-bytes-like 6XB",
            ["synth", "--widen-from", tiny, "--expert-bytes-like", "6XB", "-o", "out/w.gguf"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "synth --expert-bytes-like 1B",
            ["synth", "--widen-from", tiny, "--expert-bytes-like", "1B", "-o", "out/w.gguf"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "synth --seed -1",
            ["synth", "--preset", "tiny", "--seed", "-1", "-o", "out/s.gguf"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "synth --seed 2**70",
            ["synth", "--preset", "tiny", "--seed", str(2**70), "-o", "out/s.gguf"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "collect ok",
            ["collect", tiny, "--prompts", "fx/prompts.txt", "-n", "2", "-t", "1", "-o", "out/c"],
            "ok",
            ["out"],
        ),
        Case(
            "verbs",
            "collect --layers 99",
            [
                "collect",
                tiny,
                "--prompts",
                "fx/prompts.txt",
                "-n",
                "2",
                "-t",
                "1",
                "--layers",
                "99",
                "-o",
                "out/c",
            ],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "collect --layers 3-1",
            [
                "collect",
                tiny,
                "--prompts",
                "fx/prompts.txt",
                "-n",
                "2",
                "-t",
                "1",
                "--layers",
                "3-1",
                "-o",
                "out/c",
            ],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "collect --layers x",
            [
                "collect",
                tiny,
                "--prompts",
                "fx/prompts.txt",
                "-n",
                "2",
                "-t",
                "1",
                "--layers",
                "x",
                "-o",
                "out/c",
            ],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "train --layers 99",
            ["train", "fx/traces", "--layers", "99", "-o", "out/t", "--epochs", "1", "-t", "1"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "train --loss bogus",
            ["train", "fx/traces", "--loss", "bogus", "-o", "out/t", "-t", "1"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "train --loss rank+",
            ["train", "fx/traces", "--loss", "rank+", "-o", "out/t", "-t", "1"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "train --features bogus",
            ["train", "fx/traces", "--features", "bogus", "-o", "out/t", "-t", "1"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "train --device cuda",
            ["train", "fx/traces", "--device", "cuda", "-o", "out/t", "--epochs", "1", "-t", "1"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "train --device bogus",
            ["train", "fx/traces", "--device", "bogus", "-o", "out/t", "-t", "1"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "train --int8 --fp16 ok",
            [
                "train",
                "fx/traces",
                "--int8",
                "--fp16",
                "-o",
                "out/t",
                "--epochs",
                "1",
                "--hidden",
                "8",
                "-t",
                "1",
            ],
            "ok",
            ["out"],
        ),
        Case(
            "verbs",
            "train -m missing",
            ["train", "fx/traces", "-m", "fx/missing.gguf", "-o", "out/t", "-t", "1"],
            "error",
            ["out"],
        ),
        Case("verbs", "eval ok", ["eval", "fx/traces", "fx/preds", "-o", "out/e"], "ok", ["out"]),
        Case(
            "verbs",
            "eval --int8 without int8",
            ["eval", "fx/traces", "fx/preds", "--int8", "-o", "out/e"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "eval --name ../escape",
            ["eval", "fx/traces", "fx/preds", "--name", "../escape", "-o", "out/e"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "eval --name a/b",
            ["eval", "fx/traces", "fx/preds", "--name", "a/b", "-o", "out/e"],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "eval --cross-layer with x_pre preds",
            ["eval", "fx/traces", "fx/preds", "--cross-layer", "fx/preds", "-o", "out/e"],
            "any",
            ["out"],
        ),
        Case("verbs", "run ok", ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1"], "ok"),
        Case(
            "verbs",
            "run --mode lru --slots 1 (< k)",
            ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "--mode", "lru", "--slots", "1"],
            "any",
        ),
        Case(
            "verbs",
            "run --mode top1 without predictors (tiny)",
            ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "--mode", "exact"],
            "error",
        ),
        Case(
            "verbs",
            "run -ot garbage",
            ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "-ot", "garbage"],
        ),
        Case("verbs", "run -ot [=CPU", ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "-ot", "[=CPU"]),
        Case(
            "verbs",
            "run -ot exps=MARS",
            ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "-ot", "exps=MARS"],
        ),
        Case(
            "verbs",
            "run --preset cuda-hopper without CUDA",
            ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "--preset", "cuda-hopper"],
        ),
        Case(
            "verbs", "run --stock ok", ["run", "-m", tiny, "-p", "hi", "-n", "2", "-t", "1", "--stock"], "any"
        ),
        Case("verbs", "run -n 0", ["run", "-m", tiny, "-p", "hi", "-n", "0", "-t", "1"], "any"),
        Case(
            "verbs",
            "bench lru",
            [
                "bench",
                tiny,
                "--vram-budget",
                "1MiB",
                "-n",
                "2",
                "--rounds",
                "1",
                "--configs",
                "lru",
                "-t",
                "1",
                "-o",
                "out",
            ],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "bench --configs bogus",
            [
                "bench",
                tiny,
                "--vram-budget",
                "1MiB",
                "-n",
                "2",
                "--rounds",
                "1",
                "--configs",
                "bogus",
                "-o",
                "out",
            ],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "bench --vram-budget ,,",
            ["bench", tiny, "--vram-budget", ",,", "-n", "2", "-o", "out"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "bench --emulate bogus",
            ["bench", tiny, "--vram-budget", "1MiB", "--emulate", "bogus", "-o", "out"],
            "error",
            ["out"],
        ),
        Case(
            "verbs",
            "bench --run-timeout 0",
            [
                "bench",
                tiny,
                "--vram-budget",
                "1MiB",
                "-n",
                "2",
                "--rounds",
                "1",
                "--configs",
                "lru",
                "--run-timeout",
                "0",
                "-o",
                "out",
            ],
            "any",
            ["out"],
        ),
        Case(
            "verbs",
            "bench --stock-lib missing",
            [
                "bench",
                tiny,
                "--vram-budget",
                "1MiB",
                "-n",
                "2",
                "--rounds",
                "1",
                "--stock-lib",
                "fx/missing",
                "-o",
                "out",
            ],
            "error",
            ["out"],
        ),
        Case("verbs", "profile -n 10 (< 50)", ["profile", tiny, "-n", "10", "-o", "out"], "error", ["out"]),
        Case(
            "verbs",
            "profile --samples 0",
            ["profile", tiny, "-n", "50", "--samples", "0", "-o", "out"],
            "any",
            ["out"],
        ),
        Case("verbs", "profile -o a file", ["profile", tiny, "-n", "50", "-o", "fx/prompts.txt"], "error"),
        Case("verbs", "no verb", [], "error"),
        Case("verbs", "unknown verb", ["frobnicate"], "error"),
        Case("verbs", "unknown option", ["run", "--frobnicate"], "error"),
        Case("verbs", "--version", ["--version"], "ok"),
    ]
    return cases


def stream_cases() -> list[Case]:
    """Closed and broken standard streams."""
    run = "python -m edge_preattn.cli run -m fx/tiny.gguf -p hi -n 8 -t 1"
    cases = []
    for verb_line, name in (
        (run, "run"),
        ("python -m edge_preattn.cli inspect fx/tiny.gguf", "inspect"),
        ("python -m edge_preattn.cli build --list", "build --list"),
        ("python -m edge_preattn.cli --help", "--help"),
    ):
        cases.append(Case("streams", f"{name} >&-", [], "any", shell=f"{verb_line} >&-"))
        cases.append(Case("streams", f"{name} 2>&-", [], "any", shell=f"{verb_line} 2>&-"))
        cases.append(Case("streams", f"{name} <&- >&- 2>&-", [], "any", shell=f"{verb_line} <&- >&- 2>&-"))
        cases.append(
            Case(
                "streams",
                f"{name} | head -c 3",
                [],
                "any",
                shell=f"set -o pipefail; {verb_line} | head -c 3 >/dev/null",
            )
        )
        cases.append(
            Case(
                "streams",
                f"{name} | true (reader gone)",
                [],
                "any",
                shell=f"set -o pipefail; {verb_line} | (exec 0<&-; sleep 0.05)",
            )
        )
    cases.append(Case("streams", "run >/dev/full", [], "any", shell=f"{run} >/dev/full"))
    cases.append(
        Case(
            "streams",
            "inspect >/dev/full",
            [],
            "any",
            shell="python -m edge_preattn.cli inspect fx/tiny.gguf >/dev/full",
        )
    )
    return cases


def signal_cases() -> list[Case]:
    """SIGINT and SIGTERM in the middle of long work: 130 / 143 and no traceback."""
    cases = []
    long_run = [
        "run",
        "-p",
        "def fibonacci(n):",
        "-n",
        "1000",
        "-c",
        "1024",
        "-t",
        "1",
        "--temp",
        "0",
    ]  # ~4 s
    for sig in (signal.SIGINT, signal.SIGTERM):
        for delay in (0.5, 2.0):
            cases.append(
                Case("signals", f"run {sig.name} at {delay}s", long_run, "error", interrupt=(sig, delay))
            )
            cases.append(
                Case(
                    "signals",
                    f"run --mode lru {sig.name} at {delay}s",
                    [*long_run, "--mode", "lru"],
                    "error",
                    interrupt=(sig, delay),
                )
            )
            cases.append(
                Case(
                    "signals",
                    f"run --mode top1 {sig.name} at {delay}s",
                    [*long_run, "--mode", "top1"],
                    "error",
                    interrupt=(sig, delay),
                )
            )
        cases.append(
            Case(
                "signals",
                f"collect {sig.name}",
                [
                    "collect",
                    str(PACKAGED),
                    "--prompts",
                    "fx/prompts.txt",
                    "-n",
                    "500",
                    "-c",
                    "1024",
                    "-t",
                    "1",
                    "-o",
                    "out/c",
                ],
                "error",
                ["out"],
                interrupt=(sig, 2.5),
            )
        )
        cases.append(
            Case(
                "signals",
                f"train {sig.name}",
                ["train", "fx/traces", "-o", "out/t", "--epochs", "500", "--patience", "500", "-t", "1"],
                "error",
                ["out"],
                interrupt=(sig, 4.0),
            )
        )
        cases.append(
            Case(
                "signals",
                f"bench {sig.name}",
                [
                    "bench",
                    str(PACKAGED),
                    "--vram-budget",
                    "1MiB",
                    "-n",
                    "1000",
                    "--rounds",
                    "1",
                    "-c",
                    "1024",
                    "--configs",
                    "lru",
                    "-t",
                    "1",
                    "-o",
                    "out",
                ],
                "error",
                ["out"],
                interrupt=(sig, 4.0),
            )
        )
        cases.append(
            Case(
                "signals",
                f"serve {sig.name}",
                ["serve", "-m", "fx/tiny.gguf", "--port", "0", "-t", "1"],
                "error",
                interrupt=(sig, 3.0),
            )
        )
    return cases


def post(body: bytes, path: str = "/v1/completions", length: int | None = None) -> bytes:
    """A raw POST, its Content-Length right unless `length` gives a wrong one."""
    size = len(body) if length is None else length
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + body


def serve_cases() -> list[Case]:
    """Malformed HTTP to a running `serve` (port 0), then SIGINT: the server must answer or refuse each
    request, answer a good one after it, and stop cleanly."""
    requests = {
        "GET /": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "no HTTP at all": b"GARBAGE\r\n\r\n",
        "binary bytes": b"\x00\x01\x02\x03" * 64,
        "body not JSON": post(b"{bad}"),
        "Content-Length -1": post(b"", length=-1),
        "Content-Length 1e11": post(b"{}", length=99999999999),
        "body shorter than its length": post(b'{"pro', length=10),
        "chunked garbage": b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "JSON array": post(b"[]"),
        "prompt a number": post(b'{"prompt": 17}'),
        "prompt empty": post(b'{"prompt": ""}'),
        "prompt invalid UTF-8": post(b'{"prompt": "\xff\xfe"}'),
        "max_tokens -5": post(b'{"prompt": "hi", "max_tokens": -5}'),
        "max_tokens 1e9": post(b'{"prompt": "hi", "max_tokens": 1e9}'),
        "max_tokens a string": post(b'{"prompt": "hi", "max_tokens": "2"}'),
        "temperature a string": post(b'{"prompt": "hi", "temperature": "hot"}'),
        "temperature NaN": post(b'{"prompt": "hi", "temperature": NaN, "max_tokens": 2}'),
        "stream 3": post(b'{"prompt": "hi", "max_tokens": 2, "stream": 3}'),
        "chat messages 5": post(b'{"messages": 5}', path="/v1/chat/completions"),
        "a good request": post(b'{"prompt": "hi", "max_tokens": 2}'),
    }
    argv = ["serve", "-m", "fx/tiny.gguf", "--port", "0", "-t", "1", "-n", "2"]
    return [Case("serve", f"serve: {name}", argv, "error", http=[raw]) for name, raw in requests.items()]


# ---------------------------------------------------------------- running and judging


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with what would show a change: type, size, mtime, mode."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            rel = str(path.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            seen[rel] = (
                kind,
                st.st_size if stat.S_ISREG(kind) else 0,
                st.st_mtime_ns if stat.S_ISREG(kind) else 0,
                stat.S_IMODE(st.st_mode),
            )
    return seen


def changed_outside(before: dict, after: dict, outputs: list[str]) -> list[str]:
    def allowed(rel: str) -> bool:
        # an output, what is under it, or a folder made on the way to it
        return any(rel == out or rel.startswith(out + "/") or out.startswith(rel + "/") for out in outputs)

    changed = [
        rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel) and not allowed(rel)
    ]
    return sorted(changed)


def serve_port(proc: subprocess.Popen, deadline: float) -> int | None:
    """The port from serve's 'listening on http://HOST:PORT/v1' line (read from its stderr)."""
    line_buf = b""
    while time.monotonic() < deadline:
        chunk = proc.stderr.readline()
        if not chunk:
            return None
        line_buf += chunk
        if b"listening on http://" in chunk:
            return int(chunk.split(b"http://")[1].split(b"/")[0].rsplit(b":", 1)[1])
    return None


def send_raw(port: int, body: bytes) -> str:
    """One raw request; what came back (the status line), or what went wrong on the client's side."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            reply = sock.recv(200)
            return reply.split(b"\r\n", 1)[0].decode("latin-1") or "(closed)"
    except OSError as error:
        return f"(client: {error})"


def health(port: int) -> str:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"prompt": "hi", "max_tokens": 2}),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except OSError as error:
        return f"(client: {error})"


def run_case(case: Case, root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_PREATTN_HOSTILE="1")
    out_dir = root / "out"  # a fresh, empty folder for every case's own outputs
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    before = snapshot(root)
    start = time.monotonic()
    notes = []
    if case.shell is not None:
        proc = subprocess.Popen(
            ["bash", "-c", case.shell],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    else:
        proc = subprocess.Popen(  # argv stays under the kernel's 128 KiB per argument
            [*CLI, *case.argv],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    timed_out = False
    stderr_head = b""
    try:
        if case.http is not None:
            port = serve_port(proc, time.monotonic() + TIMEOUT_S)
            if port is None:
                notes.append("serve printed no port")
            else:
                for body in case.http:
                    notes.append(f"reply: {send_raw(port, body)}")
                notes.append(f"then a good request: {health(port)}")
            proc.send_signal(signal.SIGINT)
        elif case.interrupt is not None:
            sig, delay = case.interrupt
            time.sleep(delay)
            if proc.poll() is not None:
                notes.append("finished before the signal")
            else:
                proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        stderr = stderr_head + stderr
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    elapsed_s = time.monotonic() - start
    after = snapshot(root)
    changed = changed_outside(before, after, case.outputs)
    if any(rel.startswith("fx") for rel in changed):  # later cases must see the same inputs
        make_fixtures(root)
    rc = proc.returncode
    text = stderr.decode("utf-8", "replace")
    outcome, why = judge(case, rc, stdout, text, timed_out=timed_out, changed=changed, notes=notes)
    return {
        "category": case.category,
        "name": case.name,
        "command": case.shell or " ".join(["edge-preattn", *map(_quote, case.argv)]),
        "expect": case.expect,
        "rc": rc,
        "outcome": outcome,
        "why": why,
        "seconds": round(elapsed_s, 2),
        "stderr_tail": _tail(text),
        "notes": notes,
    }


def _quote(arg: str) -> str:
    shown = arg if len(arg) < 80 else arg[:40] + f"...({len(arg)} chars)"
    return (
        json.dumps(shown)
        if (not shown or any(c in shown for c in " \"'\\\x00\n") or not shown.isprintable())
        else shown
    )


def _tail(text: str) -> str:
    lines = [line.split("\r")[-1] for line in text.strip().splitlines()]
    return "\n".join(lines[-6:])[-1500:]


def judge(
    case: Case, rc: int, stdout: bytes, stderr: str, *, timed_out: bool, changed: list[str], notes: list[str]
) -> tuple[str, str]:
    if timed_out:
        return "BAD", f"no exit within {TIMEOUT_S} s"
    if "Traceback" in stderr or "Exception ignored" in stderr:
        return "BAD", "traceback"
    if rc < 0 or rc in (134, 139, 137) or (rc > 128 and rc not in CLEAN_ERROR_CODES):
        return "BAD", f"died by signal / abort (rc {rc})"
    if changed:
        return "BAD", "touched files outside its named outputs: " + ", ".join(changed[:5])
    if case.http is not None:
        if any("(client" in n for n in notes[-1:]) or not notes[-1].endswith("200"):
            return "BAD", "server did not answer a good request after the bad one"
        if rc not in (0, 130):
            return "BAD", f"server stopped with rc {rc}"
        return "clean-error", "answered or refused; stayed up; stopped on SIGINT"
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    ours = [line for line in lines if line.startswith("edge-preattn")]
    if rc == 0:
        if case.interrupt is not None and "finished before the signal" not in notes:
            return "BAD", "exit 0 after a signal (ignored)"
        if case.expect == "error" and "finished before the signal" not in notes:
            return "BAD", "exit 0 on an input that should be refused (silently wrong)"
        if case.stdout_check and case.stdout_check not in stdout.decode("utf-8", "replace"):
            return "BAD", f"exit 0 without {case.stdout_check!r} in stdout"
        return "ok", ""
    if rc in CLEAN_ERROR_CODES:
        if case.interrupt is not None:
            want = 130 if case.interrupt[0] == signal.SIGINT else 143
            if rc != want and "finished before the signal" not in notes:
                return "BAD", f"rc {rc} after {case.interrupt[0].name}, want {want}"
        if case.shell is not None and rc in (141, 130, 143):
            return "clean-error", ""
        if case.shell is not None and "2>&-" in case.shell:
            return "clean-error", "stderr closed"
        if len(ours) != 1:
            return "BAD", f"{len(ours)} lines starting edge-preattn on stderr (want 1)"
        if case.expect == "ok":
            return "BAD", "refused a valid input"
        return "clean-error", ""
    return "BAD", f"unexpected exit status {rc}"


def all_cases() -> list[Case]:
    return [
        *verb_cases(),
        *numeric_cases(),
        *path_cases(),
        *file_cases(),
        *prompt_cases(),
        *stream_cases(),
        *serve_cases(),
        *signal_cases(),
    ]


def write_results(results: list[dict], out_dir: Path, started: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        counts.setdefault(r["category"], {"ok": 0, "clean-error": 0, "BAD": 0})[r["outcome"]] += 1
    total = {k: sum(c[k] for c in counts.values()) for k in ("ok", "clean-error", "BAD")}
    (out_dir / "hostile-round.json").write_text(
        json.dumps(
            {
                "started_utc": started,
                "cases": len(results),
                "counts": counts,
                "total": total,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    lines = [
        "# Hostile round",
        "",
        f"`python bench/hostile_round.py` ({started}, CPU build, sequential, {len(results)} cases built "
        "independently of bench/robustness_table.py). ok: exit 0 where success is right; clean-error: exit "
        "2/130/141/143 with one `edge-preattn` line and no traceback; BAD: traceback, signal death, hang, "
        "exit 0 on a wrong input, or a file touched outside the named outputs.",
        "",
        "| category | cases | ok | clean-error | BAD |",
        "|---|---|---|---|---|",
    ]
    for cat, c in counts.items():
        lines.append(f"| {cat} | {sum(c.values())} | {c['ok']} | {c['clean-error']} | {c['BAD']} |")
    lines.append(f"| **all** | {len(results)} | {total['ok']} | {total['clean-error']} | {total['BAD']} |")
    lines += ["", "## BAD cases", ""]
    bad = [r for r in results if r["outcome"] == "BAD"]
    if not bad:
        lines.append("None.")
    for r in bad:
        lines += [
            f"### {r['category']}: {r['name']}",
            "",
            f"- command: `{r['command'][:300]}`",
            f"- exit {r['rc']}; {r['why']}",
            *(f"- {n}" for n in r["notes"][:5]),
            "",
            "```",
            r["stderr_tail"] or "(empty stderr)",
            "```",
            "",
        ]
    (out_dir / "hostile-round.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--only", help="run only this category")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # started with `&`, SIGINT is ignored: children too
    root = (args.scratch or Path(tempfile.mkdtemp(prefix="hostile-"))).resolve()
    args.output = args.output.resolve()  # before the chdir below
    if not (root / "fx").exists():
        make_fixtures(root)
    os.chdir(root)  # file_cases globs fx/
    cases = [c for c in all_cases() if args.only in (None, c.category)]
    print(f"{len(cases)} cases in {root}", file=sys.stderr)
    results = []
    for i, case in enumerate(cases):
        result = run_case(case, root)
        results.append(result)
        flag = "" if result["outcome"] != "BAD" else f"  <-- {result['why']}"
        print(
            f"[{i + 1}/{len(cases)}] {result['outcome']:11} {case.category}: {case.name[:70]}{flag}",
            file=sys.stderr,
            flush=True,
        )
    write_results(results, args.output, started)
    bad = sum(r["outcome"] == "BAD" for r in results)
    print(f"{len(results)} cases, {bad} BAD; wrote {args.output}/hostile-round.json/.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
