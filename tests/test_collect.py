"""Trace collection: right captures, identical on rerun, resumable after an interrupt, refuses bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.traces import collect
from edge_preattn.traces.collect import CollectSettings
from edge_preattn.traces.trace_set import TraceSet, verify_capture

PROMPTS = [
    "Whales are mammals, which means that",
    "def add(a, b):",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "import numpy as np",
    "The capital of France is",
]
SETTINGS = CollectSettings(max_new_tokens=6, prompts_per_shard=2, n_ctx=128)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def all_arrays(directory: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {
        f"{shard['name']}/{p.name}": np.load(p)
        for shard in manifest["shards"]
        for p in sorted((directory / shard["name"]).glob("*.npy"))
    }


def test_collection_is_right_and_counts_add_up(llama_lib, moe_ref_a, prompts_file, tmp_path):
    out = tmp_path / "traces"
    manifest = collect.collect(moe_ref_a, prompts_file, out, SETTINGS, progress=False)
    traces = TraceSet(out)
    meta = traces.meta()
    n = len(meta["tokens"])
    assert (
        manifest["totals"]["tokens"]
        == n
        == manifest["totals"]["prefill_tokens"] + manifest["totals"]["decode_tokens"]
    )
    assert sorted(set(meta["prompt"].tolist())) == list(range(len(PROMPTS)))
    assert (meta["phase"] == collect.PHASE_DECODE).sum() <= len(PROMPTS) * SETTINGS.max_new_tokens
    for shard in manifest["shards"]:
        for name, info in shard["files"].items():
            assert list(np.load(out / shard["name"] / f"{name}.npy").shape) == info["shape"]
    for il in traces.layers:
        assert traces.layer(il, "x_pre").shape == (n, 384) and traces.layer(il, "ids").shape == (n, 8)
        assert traces.x_prev(il).shape == (n, 384)
    assert np.array_equal(traces.x_prev(3), traces.layer(2, "x_router"))
    check = verify_capture(traces, moe_ref_a)
    assert check.pairs == n * 8
    assert check.mismatches == 0 and check.match_rate >= 0.999
    assert check.max_prob_error < 1e-3


def test_rerun_is_identical_and_interrupt_resumes_to_the_same_data(
    llama_lib, moe_ref_a, prompts_file, tmp_path, monkeypatch
):
    complete = tmp_path / "complete"
    collect.collect(moe_ref_a, prompts_file, complete, SETTINGS, progress=False)
    again = tmp_path / "again"
    collect.collect(moe_ref_a, prompts_file, again, SETTINGS, progress=False)
    reference = all_arrays(complete)
    assert all(np.array_equal(reference[key], value) for key, value in all_arrays(again).items())

    interrupted = tmp_path / "interrupted"
    original = collect._PromptRecord.on_routing
    calls = {"n": 0}

    def interrupting(self, routing):
        calls["n"] += 1
        if calls["n"] == 8 * 20:  # somewhere in the second shard
            raise KeyboardInterrupt
        original(self, routing)

    monkeypatch.setattr(collect._PromptRecord, "on_routing", interrupting)
    with pytest.raises(KeyboardInterrupt):
        collect.collect(moe_ref_a, prompts_file, interrupted, SETTINGS, progress=False)
    partial = json.loads((interrupted / "manifest.json").read_text())
    assert 0 < len(partial["shards"]) < 3
    monkeypatch.setattr(collect._PromptRecord, "on_routing", original)
    collect.collect(moe_ref_a, prompts_file, interrupted, SETTINGS, progress=False)
    resumed = all_arrays(interrupted)
    assert resumed.keys() == reference.keys()
    assert all(np.array_equal(reference[key], resumed[key]) for key in reference)


def test_bad_input_is_refused_and_nothing_is_overwritten(llama_lib, moe_ref_a, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        collect.read_prompts(empty)
    with pytest.raises(UserError, match="not found"):
        collect.read_prompts(tmp_path / "missing.txt")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a\\nb"}\n{"text": "c"}\n')
    assert collect.read_prompts(jsonl) == ["a\nb", "c"]

    other = tmp_path / "other"
    other.mkdir()
    manifest = {"fingerprint": "0" * 64, "prompts_sha256": "x", "settings": {}, "shards": []}
    (other / "manifest.json").write_text(json.dumps(manifest))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    code = cli.main(["collect", str(moe_ref_a), "--prompts", str(prompts), "-o", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another model" in err[0]
    assert json.loads((other / "manifest.json").read_text()) == manifest
    assert cli.main(["collect", str(moe_ref_a), "--prompts", str(empty), "-o", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek2"])
def test_capture_matches_the_router_on_synthetic_models(llama_lib, preset, prompts_file, tmp_path):
    """qwen3moe, and deepseek2 with a leading dense layer and shared experts."""
    from edge_preattn.model.synth import write_synthetic

    model = tmp_path / f"{preset}.gguf"
    write_synthetic(preset, model, progress=False)
    out = tmp_path / "traces"
    collect.collect(model, prompts_file, out, SETTINGS, progress=False)
    traces = TraceSet(out)
    layout_moe = json.loads((out / "manifest.json").read_text())["layout"]["moe_layers"]
    assert list(traces.layers) == layout_moe
    check = verify_capture(traces, model)
    assert check.pairs == len(traces.meta()["tokens"]) * len(layout_moe)
    assert check.exact / check.pairs >= 0.999 or check.match_rate_ties_excepted >= 0.999
    assert check.mismatches == 0
    assert check.max_prob_error < 1e-3


def test_a_truncated_shard_is_named_with_the_way_out(llama_lib, moe_ref_a, prompts_file, tmp_path):
    out = tmp_path / "traces"
    collect.collect(moe_ref_a, prompts_file, out, SETTINGS, progress=False)
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][1]["name"]
    victim = shard / "L003.ids.npy"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(UserError, match=r"L003\.ids\.npy is missing or damaged.*rerun collect"):
        TraceSet(out).layer(3, "ids")
    # what the message says to do: drop the shard from the manifest, rerun; that shard alone is redone
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] != shard.name]
    (out / "manifest.json").write_text(json.dumps(manifest))
    collect.collect(moe_ref_a, prompts_file, out, SETTINGS, progress=False)
    reference = tmp_path / "reference"
    collect.collect(moe_ref_a, prompts_file, reference, SETTINGS, progress=False)
    redone = all_arrays(out)
    assert all(np.array_equal(value, redone[key]) for key, value in all_arrays(reference).items())
