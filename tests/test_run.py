"""`edge-preattn run`: bad options are one-line errors; a cached run writes its statistics; sampling
picks tokens like llama.cpp's CLI without changing what the cache computes."""

import json
import re

import pytest

from edge_preattn import cli
from edge_preattn.model.native import NativeApi
from edge_preattn.model.synth import write_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("edge-preattn: error:"), err
    return err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-n", "0"], "-n must be at least 1"),
        (["-p", "   "], "prompt is empty"),
        (["--mode", "lru", "--slots", "2"], "--slots 2 must be between"),
        (["--mode", "lru", "--vram-budget", "1MiB"], "raise --vram-budget"),
        (["--mode", "lru", "--bandwidth", "12GB"], "cannot read rate"),
        (["--mode", "top1"], "needs --predictors"),
        (["-c", "100000"], "exceeds the"),
        (["--temp", "-1"], "--temp -1.0 must be 0 or more"),
        (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--min-p", "nan"], "--min-p is nan: give a finite number"),
        (["--seed", "-2"], "--seed -2 must be -1 (random)"),
    ],
)
def test_bad_options_are_one_line_errors(llama_lib, tiny, capsys, extra, message):
    assert message in one_line_error(capsys, ["run", "-m", str(tiny), *extra])


def test_predictors_of_another_model_are_refused(llama_lib, tiny, tmp_path, capsys):
    manifest = {"format": "edge-preattn-predictors/1", "fingerprint": "0" * 64, "predictors": []}
    (tmp_path / "predictors.json").write_text(json.dumps(manifest))
    error = one_line_error(capsys, ["run", "-m", str(tiny), "--mode", "exact", "--predictors", str(tmp_path)])
    assert "fingerprint" in error or "another model" in error


def test_cached_run_writes_statistics(llama_lib, tiny, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    assert (
        cli.main(
            [
                "run",
                "-m",
                str(tiny),
                "-n",
                "12",
                "--temp",
                "0",
                "--mode",
                "lru",
                "--slots",
                "4",
                "--stats-json",
                str(stats_file),
            ]
        )
        == 0
    )
    stats = json.loads(stats_file.read_text())
    assert stats["mode"] == "lru" and stats["slots"] == 4 and stats["generated_tokens"] == 12
    assert 0 <= stats["hit_rate"] <= 1
    # the library uploads each miss itself (one token per ubatch: one upload per miss)
    assert stats["forced_uploads"] == round(stats["misses_per_token"] * stats["cached_tokens"]) > 0
    # k = 4 experts in each of 4 layers per token (+ the prompt's last row, which the last layer caches)
    per_token = stats["hits_per_token"] + stats["late_per_token"] + stats["misses_per_token"]
    assert 16 - 0.002 <= per_token <= 16 + 4 / 11 + 0.002  # values are rounded to 3 decimals
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
    err = capsys.readouterr().err
    assert "hit rate" in err
    # the summary says what an upload is on this build: a memory copy without a GPU
    assert stats["uploads_are_memory_copies"] == (not NativeApi(llama_lib).gpus())
    memcpy = "CPU build: the slot banks are in RAM and an upload is a memory copy"
    assert (memcpy in err) == stats["uploads_are_memory_copies"] and "pageable memory" not in err


def test_usage_mistakes_are_one_line_too(capsys):
    for argv in (["run", "--mode", "bogus"], ["frobnicate"], ["run", "-n", "many"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "error:" in err[0] and "--help" in err[0]


def test_a_run_with_a_slot_for_every_expert_runs_as_stock(llama_lib, tiny, tmp_path, capsys):
    """slots = E: every expert resident from the start; no upload, every ubatch computed unobserved."""
    stats_file = tmp_path / "stats.json"
    argv = ["run", "-m", str(tiny), "-n", "12", "--temp", "0", "--mode", "lru", "--slots", "16"]  # E = 16
    argv += ["--stats-json", str(stats_file)]
    assert cli.main(argv) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["quiet_ubatches"] == 12  # the prompt's ubatch and 11 decode steps
    assert stats["hit_rate"] == 1 and stats["bytes_uploaded_per_token"] == 0 and stats["forced_uploads"] == 0
    assert "12 ubatches with every expert resident ran as stock" in capsys.readouterr().err


def generated(capsys, argv: list[str]) -> tuple[str, str]:
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_random_seed_is_printed_and_repeats_the_run(llama_lib, tiny, capsys):
    argv = ["run", "-m", str(tiny), "-n", "12"]  # llama.cpp's defaults: temp 0.8, a random seed
    text, err = generated(capsys, argv)
    seed = re.search(r"temp 0.8, top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1, seed (\d+)", err)
    assert seed, err
    assert generated(capsys, [*argv, "--seed", seed[1]])[0] == text


def test_sampling_only_picks_tokens_the_cache_does_not_change_them(llama_lib, tiny, capsys):
    """The same seed gives the same text with stock placement and with a small cache (4 of 16 slots):
    the cache leaves the logits as they are, so the sampler draws the same tokens."""
    sampled = ["--seed", "7", "--temp", "1.5", "--top-k", "0", "--min-p", "0"]  # a wide distribution
    stock, _ = generated(capsys, ["run", "-m", str(tiny), "-n", "24", *sampled])
    cached, err = generated(
        capsys, ["run", "-m", str(tiny), "-n", "24", *sampled, "--mode", "lru", "--slots", "4"]
    )
    assert cached == stock and "seed 7" in err and "misses uploaded" in err
    greedy, err = generated(capsys, ["run", "-m", str(tiny), "-n", "24", "--temp", "0"])
    assert greedy != stock and "greedy" in err  # the seed and temperature did change the text


def test_the_repeat_penalty_changes_a_greedy_run(llama_lib, tiny, capsys):
    greedy, _ = generated(capsys, ["run", "-m", str(tiny), "-n", "24", "--temp", "0"])
    penalized, _ = generated(
        capsys, ["run", "-m", str(tiny), "-n", "24", "--temp", "0", "--repeat-penalty", "5"]
    )
    assert penalized != greedy
