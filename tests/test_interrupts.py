"""Ctrl-C and crashes during `collect` and `train`: the work done is kept, the command says how to go
on (one line, exit 130), and the same command finishes with what an uninterrupted run gives."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.model.synth import write_synthetic
from edge_preattn.predictors import fit, train
from edge_preattn.runtime import run
from edge_preattn.traces import collect

from .robustness_log import record

PROMPTS = [
    "def add(a, b):",
    "The capital of France is",
    "import numpy as np",
    "for i in range(10):",
    "Explain why the sky is blue.",
]
COLLECT_FLAGS = ["-n", "4", "--prompts-per-shard", "2", "-c", "128", "--seed", "3"]
TRAIN_FLAGS = [
    "--epochs",
    "3",
    "--hidden",
    "16",
    "--batch-size",
    "16",
    "--val-fraction",
    "0.4",
    "--device",
    "cpu",
]
INTERRUPTED = "edge-preattn: interrupted; rerun the same command to resume"


@pytest.fixture(scope="module")
def inputs(llama_lib, tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    model = root / "tiny.gguf"
    write_synthetic("tiny", model, progress=False)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    reference = root / "reference"
    assert (
        cli.main(["collect", str(model), "--prompts", str(prompts), "-o", str(reference), *COLLECT_FLAGS])
        == 0
    )
    return model, prompts, reference


def arrays(directory: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {
        f"{shard['name']}/{path.name}": np.load(path)
        for shard in manifest["shards"]
        for path in sorted((directory / shard["name"]).glob("*.npy"))
    }


def same_arrays(a: Path, b: Path) -> bool:
    left, right = arrays(a), arrays(b)
    return left.keys() == right.keys() and all(np.array_equal(left[key], right[key]) for key in left)


def interrupt_message(capsys) -> str:
    """The last line on stderr (above it only the progress bar), which must say how to go on."""
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err
    return INTERRUPTED


def interrupted_once(monkeypatch, module, name: str, after_calls: int) -> None:
    """Ctrl-C (KeyboardInterrupt) raised from inside `module.name` on its call number after_calls + 1."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            monkeypatch.setattr(module, name, real)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_ctrl_c_in_collect_keeps_finished_shards_and_the_rerun_completes(
    inputs, tmp_path, capsys, monkeypatch
):
    model, prompts, reference = inputs
    out = tmp_path / "traces"
    argv = ["collect", str(model), "--prompts", str(prompts), "-o", str(out), *COLLECT_FLAGS]
    interrupted_once(monkeypatch, collect.Collector, "run_prompt", after_calls=3)  # inside shard 2 of 3
    assert cli.main(argv) == 130
    err = interrupt_message(capsys)
    partial = json.loads((out / "manifest.json").read_text())
    assert [shard["name"] for shard in partial["shards"]] == ["shard-00000"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000"]  # no half shard
    assert cli.main(argv) == 0
    assert same_arrays(out, reference)
    record("Ctrl-C", "collect, inside its 2nd of 3 shards", f"{err} (exit 130); rerun: identical traces")


def test_ctrl_c_while_a_shard_is_written_leaves_no_half_shard(inputs, tmp_path, capsys, monkeypatch):
    model, prompts, reference = inputs
    out = tmp_path / "traces"
    argv = ["collect", str(model), "--prompts", str(prompts), "-o", str(out), *COLLECT_FLAGS]
    per_shard = len(list((reference / "shard-00000").glob("*.npy")))
    interrupted_once(monkeypatch, collect.np, "save", after_calls=per_shard + per_shard // 2)  # in shard 2
    assert cli.main(argv) == 130
    interrupt_message(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000"]
    assert cli.main(argv) == 0
    assert same_arrays(out, reference)
    record(
        "Ctrl-C", "collect, while a shard's files are written", f"{INTERRUPTED} (exit 130); rerun: identical"
    )


def test_a_shard_damaged_by_a_crash_is_redone_by_the_same_command(inputs, tmp_path, caplog):
    model, prompts, reference = inputs
    out = tmp_path / "traces"
    argv = ["collect", str(model), "--prompts", str(prompts), "-o", str(out), *COLLECT_FLAGS]
    assert cli.main(argv) == 0
    victim = out / "shard-00001" / "L002.x_pre.npy"
    victim.write_bytes(victim.read_bytes()[:200])  # what a power cut can leave (no fsync)
    with caplog.at_level(logging.WARNING, logger="edge_preattn"):
        assert cli.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        len(warnings) == 1
        and "shard-00001 is damaged" in warnings[0]
        and "collecting it again" in warnings[0]
    )
    assert same_arrays(out, reference)
    record(
        "bad input (collect)",
        "a shard truncated by a crash, then collect rerun",
        f"redone; warning: {warnings[0]}",
    )


@pytest.fixture(scope="module")
def trained_folder(inputs, tmp_path_factory) -> Path:
    _, _, traces = inputs
    out = tmp_path_factory.mktemp("trained") / "predictors"
    assert cli.main(["train", str(traces), "-o", str(out), *TRAIN_FLAGS]) == 0
    return out


@pytest.fixture(scope="module")
def trained(trained_folder):
    return json.loads((trained_folder / "predictors.json").read_text())


def validation(manifest: dict) -> list:
    return [entry["validation"]["recall_at_k_per_epoch"] for entry in manifest["predictors"]]


def test_ctrl_c_in_train_resumes_from_the_last_epoch_and_skips_done_layers(
    inputs, trained, tmp_path, capsys, monkeypatch
):
    _, _, traces = inputs
    out = tmp_path / "predictors"
    argv = ["train", str(traces), "-o", str(out), *TRAIN_FLAGS]
    interrupted_once(monkeypatch, fit, "_save", after_calls=4)  # layer 1's 2nd epoch: 0 is done
    assert cli.main(argv) == 130
    interrupt_message(capsys)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "layer-000.pt",
        "layer-001.pt",
        "settings.json",
    ]
    fitted = []
    real_fit = train.fit_layer

    def counting_fit(il, *args, **kwargs):
        model, history = real_fit(il, *args, **kwargs)
        fitted.append(il)
        return model, history

    saves = []
    real_save = fit._save
    monkeypatch.setattr(train, "fit_layer", counting_fit)
    monkeypatch.setattr(fit, "_save", lambda path, state: saves.append(path.name) or real_save(path, state))
    assert cli.main(argv) == 0
    assert "layer-000.pt" not in saves  # finished layers are reloaded, not trained again
    assert saves[:2] == ["layer-001.pt", "layer-001.pt"]  # layer 1: epochs 2 and 3 only
    resumed = json.loads((out / "predictors.json").read_text())
    assert validation(resumed) == validation(trained)  # the same numbers as an uninterrupted run
    record(
        "Ctrl-C", "train, in layer 1's 2nd epoch", f"{INTERRUPTED} (exit 130); rerun: identical validation"
    )


def test_a_damaged_checkpoint_retrains_only_its_layer(inputs, trained, tmp_path, caplog):
    _, _, traces = inputs
    out = tmp_path / "predictors"
    argv = ["train", str(traces), "-o", str(out), *TRAIN_FLAGS]
    assert cli.main(argv) == 0
    checkpoint = out / "checkpoints" / "layer-002.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    with caplog.at_level(logging.WARNING, logger="edge_preattn"):
        assert cli.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "layer-002.pt is damaged" in warnings[0]
    assert validation(json.loads((out / "predictors.json").read_text())) == validation(trained)
    record(
        "bad input (train)",
        "a checkpoint cut short, then train rerun",
        f"layer retrained; warning: {warnings[0][:160]}",
    )


def cli_process(*argv: str, **popen) -> subprocess.Popen:
    """`edge-preattn ARGV` in its own process (the library the tests built: EDGE_PREATTN_LIB)."""
    command = [sys.executable, "-m", "edge_preattn.cli", *argv]
    return subprocess.Popen(command, stderr=subprocess.PIPE, **popen)


def interrupt_when(process: subprocess.Popen, ready, signum: int = signal.SIGINT) -> str:
    """SIGINT (what Ctrl-C sends), or `signum`, once `ready()` holds; then the process's stderr. Fails,
    never hangs, if the process ignores it."""
    deadline = time.monotonic() + 120
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "it ended before it could be interrupted"
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{signal.Signals(signum).name} did not stop it within 60 s") from None
    return err.decode(errors="replace")


def generating(process: subprocess.Popen):
    """A `ready` for interrupt_when: `run` (stdout piped) has streamed a few tokens past its prompt."""
    os.set_blocking(process.stdout.fileno(), False)
    text = bytearray()

    def ready() -> bool:
        text.extend(process.stdout.read() or b"")
        return len(text) > len(run.DEFAULT_PROMPT) + 8

    return ready


def assert_clean_interrupt(process: subprocess.Popen, err: str, last_line: str) -> None:
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == last_line, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("mode", ["off", "lru", "top1", "exact", "overprov", "adaptive"])
def test_ctrl_c_stops_run_in_every_mode(lib_dir, mode):
    """In prediction modes the KeyboardInterrupt used to land in a ctypes callback, which swallowed it:
    the run generated all its tokens and exited 0. The packaged model, -n near its whole context."""
    if not run.DEFAULT_MODEL.is_file():
        pytest.skip("the packaged model is absent")
    process = cli_process("run", "--mode", mode, "-n", "1000", "-c", "1024", stdout=subprocess.PIPE)
    err = interrupt_when(process, generating(process))
    assert_clean_interrupt(process, err, "edge-preattn: interrupted")
    assert "prefill" not in err  # stopped before the end of its run (the summary comes last)
    record("signals", f"SIGINT (Ctrl-C) during run --mode {mode}", "edge-preattn: interrupted (exit 130)")


def test_sigterm_stops_run_in_a_background_job_that_ignores_sigint(lib_dir):
    """`edge-preattn run ... &` in a script starts with SIGINT ignored. SIGTERM was turned into a SIGINT
    sent to itself, which was then ignored too: `kill` did nothing and the run finished with exit 0."""
    if not run.DEFAULT_MODEL.is_file():
        pytest.skip("the packaged model is absent")
    process = cli_process(
        "run",
        "--mode",
        "top1",
        "-n",
        "1000",
        "-c",
        "1024",
        stdout=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what `cmd &` in a script does
    )
    err = interrupt_when(process, generating(process), signal.SIGTERM)
    assert process.returncode == cli.EXIT_TERMINATED, err
    assert err.split() == ["edge-preattn:", "terminated"], err
    record(
        "signals",
        "SIGTERM to run in a background job (SIGINT ignored)",
        "edge-preattn: terminated (exit 143)",
    )


def test_ctrl_c_stops_collect_and_the_same_command_resumes(lib_dir, inputs, tmp_path):
    """A real SIGINT, wherever it lands (most often inside a hook): no 'captured N rows for N + 1
    tokens' traceback, no half shard, and the rerun gives the traces of an uninterrupted run."""
    model, _, _ = inputs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{p} {i}" for i in range(4) for p in PROMPTS) + "\n")
    flags = ["--prompts", str(prompts), "-n", "12", "--prompts-per-shard", "2", "-c", "128", "--seed", "3"]
    reference, out = tmp_path / "reference", tmp_path / "traces"
    assert cli.main(["collect", str(model), "-o", str(reference), *flags]) == 0
    process = cli_process("collect", str(model), "-o", str(out), *flags, stdout=subprocess.DEVNULL)
    err = interrupt_when(process, (out / "manifest.json").exists)
    assert_clean_interrupt(process, err, INTERRUPTED)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert cli.main(["collect", str(model), "-o", str(out), *flags]) == 0
    assert same_arrays(out, reference)
    record("signals", "SIGINT (Ctrl-C) during collect", f"{INTERRUPTED} (exit 130); rerun: identical traces")


@pytest.mark.parametrize("verb", ["run", "inspect"])
def test_a_closed_stdout_ends_quietly(lib_dir, inputs, verb):
    """`edge-preattn run | head -c 20`: the reader is gone; the command stops without a traceback,
    with the status a shell gives a tool that SIGPIPE stopped."""
    model, _, _ = inputs
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has already gone
    argv = ["run", "-m", str(model), "-n", "16"] if verb == "run" else ["inspect", str(model)]
    process = cli_process(*argv, stdout=write_end)
    os.close(write_end)
    _, err = process.communicate(timeout=120)
    err = err.decode(errors="replace")
    assert process.returncode == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
    record("signals", f"{verb} with a closed stdout (| head)", f"quiet; exit {process.returncode}")


def test_a_closed_stdout_descriptor_is_not_reused(lib_dir, inputs):
    """`edge-preattn run >&-`: Python had no sys.stdout to write the text to (a traceback), and the
    next file opened would have taken descriptor 1. The run completes, its summary on stderr."""
    model, _, _ = inputs
    process = cli_process("run", "-m", str(model), "-n", "4", preexec_fn=lambda: os.close(1))
    _, err = process.communicate(timeout=120)
    err = err.decode(errors="replace")
    assert process.returncode == 0 and "prefill" in err and "Traceback" not in err, err
    record(
        "output destination",
        "run with stdout closed (>&-)",
        "ran; text discarded, summary on stderr (exit 0)",
    )


# A process that sends itself SIGNAL on entering MODULE.NAME (a step of the setup) the first time, then
# lets the step run; that call prints STEP_DONE when it returns. The signal comes at that point every time.
SIGNAL_DURING_STEP = """
import os, signal, sys
import edge_preattn.{module} as target
from edge_preattn import cli
real, sent = target.{name}, []
def signalled(*args, **kwargs):
    if sent:
        return real(*args, **kwargs)
    sent.append(True)
    os.kill(os.getpid(), signal.{signal})
    result = real(*args, **kwargs)
    print("STEP_DONE", file=sys.stderr, flush=True)
    return result
target.{name} = signalled
sys.argv[0] = "edge-preattn"
sys.exit(cli.main())
"""


def signal_during_step(signal_name: str, module: str, name: str, argv: list[str]) -> tuple[str, str]:
    """Run `edge-preattn ARGV` with SIGNAL_DURING_STEP; check it waited for the step and ended as that
    signal should, in one line; return its stdout and that line."""
    script = SIGNAL_DURING_STEP.format(module=module, name=name, signal=signal_name)
    process = subprocess.run(
        [sys.executable, "-c", script, *argv], check=False, capture_output=True, text=True, timeout=120
    )
    expected = 143 if signal_name == "SIGTERM" else 130
    message = "edge-preattn: terminated" if signal_name == "SIGTERM" else "edge-preattn: interrupted"
    assert process.returncode == expected, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip() and "%|" not in line]  # no bar
    assert lines[0] == "STEP_DONE" and lines[-1].startswith(message), process.stderr
    assert len(lines) == 2 or (len(lines) == 3 and lines[1].startswith("collecting")), process.stderr
    return process.stdout, f"{lines[-1]} (exit {expected})"


@pytest.mark.parametrize(
    "signal_name, module, name",
    [
        ("SIGINT", "cli", "build_parser"),  # imports every verb module: numpy's init, for one
        ("SIGTERM", "predictors.onnx_io", "load_predictor_set"),  # onnxruntime and onnx imports, sessions
        ("SIGINT", "model.native", "load_llama"),
        ("SIGTERM", "runtime.run", "shrink_until_allocated"),  # the cache: slots, native predictor, hooks
    ],
)
def test_a_signal_during_run_setup_waits_for_the_step_and_stops_in_one_line(
    lib_dir, signal_name, module, name
):
    """A signal in the first second of `run --mode top1` used to land inside a library's import or
    initialization: onnx's module init aborted the process (a C++ terminate), onnxruntime's and
    numpy's turned it into an ImportError ("not a loadable ONNX model"), and once it segfaulted. Now
    every setup step finishes, and the run stops before generating, in one line."""
    if not run.DEFAULT_MODEL.is_file():
        pytest.skip("the packaged model is absent")
    argv = ["run", "--mode", "top1", "-n", "8", "-p", "def fibonacci(n):"]
    out, outcome = signal_during_step(signal_name, module, name, argv)
    assert out == ""  # stopped before the prompt was echoed
    record("signals", f"{signal_name} inside run --mode top1's {name}", outcome)


def test_a_signal_while_eval_creates_a_predictor_session_waits_for_it(inputs, trained_folder, tmp_path):
    """The predictor loader holds signals itself, for every command that loads predictors (eval here,
    with no setup of its own held around it): the session is made, then eval stops in one line."""
    _, _, traces = inputs
    argv = ["eval", str(traces), str(trained_folder), "-o", str(tmp_path / "eval")]
    _, outcome = signal_during_step("SIGTERM", "predictors.onnx_io", "_session", argv)
    record("signals", "SIGTERM while eval creates an onnxruntime session", outcome)


def test_ctrl_c_while_a_model_header_is_checked_is_not_a_buffer_error(inputs, monkeypatch, capsys):
    """Ctrl-C inside the GGUF reader's check of tensor values: a numpy view of the file's map was
    alive in the traceback, so closing the map raised BufferError in the KeyboardInterrupt's place."""
    model, _, _ = inputs
    interrupted_once(monkeypatch, np, "isfinite", after_calls=3)
    assert cli.main(["inspect", str(model)]) == 130
    err = capsys.readouterr().err
    assert err.split() == ["edge-preattn:", "interrupted"] and "BufferError" not in err, err
    record("signals", "Ctrl-C while inspect checks a tensor's values", "edge-preattn: interrupted (exit 130)")


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_inside_code_made_by_exec_still_exits_130_or_143(tmp_path, signal_name):
    """A signal landing in code that exec() runs from a string (a dataclass or namedtuple being made,
    e.g. in torch's import) made `python -m edge_preattn.cli` die by SIGINT after its one line:
    status -2, where a SIGTERM should give 143. Here the signal comes inside such code, every time."""
    (tmp_path / "signalled_cli.py").write_text(
        "import sys\n"
        "from edge_preattn import cli\n"
        "from edge_preattn.model import layout\n"
        "real = layout.read_layout\n"
        "def read_layout(path):\n"
        f"    exec('import os, signal; os.kill(os.getpid(), signal.{signal_name}); made = 1')\n"
        "    return real(path)\n"
        "layout.read_layout = read_layout\n"
        "sys.argv[0] = 'edge-preattn'\n"
        "sys.exit(cli.main())\n"
    )
    model = Path(run.DEFAULT_MODEL)
    if not model.is_file():
        pytest.skip("the packaged model is absent")
    process = subprocess.run(
        [sys.executable, "-m", "signalled_cli", "inspect", str(model)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    terminated = signal_name == "SIGTERM"
    assert process.returncode == (cli.EXIT_TERMINATED if terminated else 130), process.stderr
    assert process.stderr.split() == ["edge-preattn:", "terminated" if terminated else "interrupted"]
