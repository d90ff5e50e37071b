"""Regressions of bench/hostile_round.py's findings: each input that once gave a traceback or a hang
now ends in one `edge-preattn: error:` line (exit 2), or in the right result."""

import json
import os
import signal
import subprocess
import sys

import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.files import output_folder
from edge_preattn.model.synth import write_synthetic
from edge_preattn.traces.collect import FORMAT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("edge-preattn")]
    assert len(lines) == 1, err
    return lines[0]


def test_negative_seeds_are_refused(tmp_path, capsys):
    assert cli.main(["synth", "--preset", "tiny", "--seed", "-1", "-o", str(tmp_path / "t.gguf")]) == 2
    assert "--seed" in one_error_line(capsys)
    assert not (tmp_path / "t.gguf").exists()
    assert cli.main(["train", str(tmp_path), "--seed", "-1", "-o", str(tmp_path / "p")]) == 2
    assert "--seed" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_widen_from_a_path_that_is_not_a_model(tmp_path, capsys, kind):
    source = tmp_path / "source.gguf"
    if kind == "directory":
        source.mkdir()
    elif kind == "fifo":
        os.mkfifo(source)  # gguf-py's reader would block on it forever
    rc = cli.main(["synth", "--widen-from", str(source), "-o", str(tmp_path / "wide.gguf")])
    assert rc == 2
    assert "source.gguf" in one_error_line(capsys)
    assert not (tmp_path / "wide.gguf").exists()


def test_huge_n_cpu_moe_means_every_layer(lib_dir, tiny, capsys):
    """One override pattern per layer: 2**63 layers once built a list until the machine gave up."""
    rc = cli.main(
        ["run", "-m", str(tiny), "-p", "hi", "-n", "2", "-t", "1", "--temp", "0", "--n-cpu-moe", str(2**63)]
    )
    assert rc == 0
    assert "Traceback" not in capsys.readouterr().err


def test_training_that_diverges_says_so(lib_dir, tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i} about cats\n" for i in range(6)))
    traces = tmp_path / "traces"
    collect_args = [str(tiny), "--prompts", str(prompts), "-n", "2", "-t", "1", "-o", str(traces)]
    assert cli.main(["collect", *collect_args]) == 0
    capsys.readouterr()
    rc = cli.main(
        [
            "train",
            str(traces),
            "--lr",
            "1e30",
            "--epochs",
            "1",
            "--hidden",
            "8",
            "-t",
            "1",
            "-o",
            str(tmp_path / "preds"),
        ]
    )
    assert rc == 2
    assert "diverged" in one_error_line(capsys)


def test_outputs_onto_a_symlink_loop(tmp_path, capsys):
    """pathlib's resolve() raised RuntimeError on a loop, and mkdir a FileExistsError."""
    loop = tmp_path / "a"
    os.symlink(tmp_path / "b", loop)
    os.symlink(loop, tmp_path / "b")
    assert cli.main(["synth", "--preset", "tiny", "-o", str(loop)]) == 2
    assert "symbolic links" in one_error_line(capsys)
    with pytest.raises(UserError, match="not a folder"):
        output_folder(loop)


def test_widen_onto_a_fifo_or_a_link_loop(tiny, tmp_path, capsys):
    """widen wrote through its own temporary name: a FIFO or a link loop was replaced by the model."""
    fifo, loop = tmp_path / "fifo", tmp_path / "a"
    os.mkfifo(fifo)
    os.symlink(tmp_path / "b", loop)
    os.symlink(loop, tmp_path / "b")
    for output in (fifo, loop):
        assert cli.main(["synth", "--widen-from", str(tiny), "-o", str(output)]) == 2
        one_error_line(capsys)
    assert fifo.is_fifo() and loop.is_symlink()


def test_traces_whose_model_is_not_a_path(tmp_path, capsys):
    """A manifest whose 'model' was a number reached os.fspath in train and eval (a TypeError)."""
    from edge_preattn.traces.trace_set import TraceSet

    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "model": 17,
                "fingerprint": "f",
                "layout": {
                    "n_embd": 8,
                    "n_expert": 4,
                    "n_expert_used": 2,
                    "gating": "softmax",
                    "moe_layers": [0],
                },
                "settings": {},
                "shards": [{"name": "shard-00000"}],
            }
        )
    )
    with pytest.raises(UserError, match="'model'"):
        TraceSet(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(UserError, match="is not an edge-preattn-traces"):
        TraceSet(tmp_path)


def test_sigterm_stops_run_like_ctrl_c(lib_dir):
    """SIGTERM (`timeout`, `kill`) killed `run` by the signal; now it stops at a token boundary with 143."""
    argv = ["run", "-p", "def fibonacci(n):", "-n", "1000", "-c", "1024", "-t", "1", "--temp", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_preattn.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, EDGE_PREATTN_LIB=str(lib_dir)),
    )
    proc.stdout.read(1)  # the first generated text: decoding has begun
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    text = err.decode()
    assert proc.returncode == 143, text
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1] == "edge-preattn: terminated"


def test_a_full_stdout_is_one_line(tiny):
    """`inspect m.gguf >/dev/full`: ENOSPC on stdout was a traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "edge_preattn.cli", "inspect", str(tiny)],
            stdout=full,
            stderr=subprocess.PIPE,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.startswith("edge-preattn: error: cannot write the output")


def test_widen_from_a_file_that_is_not_gguf(tmp_path, capsys):
    source = tmp_path / "prompts.txt"
    source.write_text("hello world\n" * 10)
    assert cli.main(["synth", "--widen-from", str(source), "-o", str(tmp_path / "wide.gguf")]) == 2
    assert "is not a GGUF file" in one_error_line(capsys)
