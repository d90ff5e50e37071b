"""Ctrl-C and crashes during `collect` and `train`: the work done is kept, the command says how to go
on (one line, exit 130), and the same command finishes with what an uninterrupted run gives."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli, collect, train
from edge_preattn.synth import write_synthetic

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
def trained(inputs, tmp_path_factory):
    _, _, traces = inputs
    out = tmp_path_factory.mktemp("trained") / "predictors"
    assert cli.main(["train", str(traces), "-o", str(out), *TRAIN_FLAGS]) == 0
    return json.loads((out / "predictors.json").read_text())


def validation(manifest: dict) -> list:
    return [entry["validation"]["recall_at_k_per_epoch"] for entry in manifest["predictors"]]


def test_ctrl_c_in_train_resumes_from_the_last_epoch_and_skips_done_layers(
    inputs, trained, tmp_path, capsys, monkeypatch
):
    _, _, traces = inputs
    out = tmp_path / "predictors"
    argv = ["train", str(traces), "-o", str(out), *TRAIN_FLAGS]
    interrupted_once(monkeypatch, train, "_save", after_calls=4)  # layer 1's 2nd epoch: 0 is done
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
    real_save = train._save
    monkeypatch.setattr(train, "fit_layer", counting_fit)
    monkeypatch.setattr(train, "_save", lambda path, state: saves.append(path.name) or real_save(path, state))
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
