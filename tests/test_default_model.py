"""The packaged default model: it and its shipped predictors load and belong together, prediction never
changes its greedy tokens, `run` with no model uses them, and a built wheel and sdist carry them."""

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.model.engine import Engine, EngineConfig, expert_overrides
from edge_preattn.model.layout import read_layout
from edge_preattn.predictors import features
from edge_preattn.predictors.onnx_io import MANIFEST, load_predictor_set
from edge_preattn.runtime.cache_runtime import CacheRuntime
from edge_preattn.runtime.options import CacheOptions
from edge_preattn.runtime.run import DEFAULT_MODEL, DEFAULT_PREDICTORS, PACKAGE_DIR

REPO = Path(__file__).resolve().parents[1]
CARD = DEFAULT_MODEL.with_suffix(".md")
PROMPT = "import numpy as np\n"
N_PREDICT = 12


def packaged_files() -> list[str]:
    """Every shipped file, relative to the package folder's parent (as wheels and sdists name them)."""
    files = [DEFAULT_MODEL, CARD, *sorted(DEFAULT_PREDICTORS.iterdir())]
    return [str(f.relative_to(PACKAGE_DIR.parent)) for f in files]


def test_model_matches_its_card():
    digest = hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()
    assert digest in CARD.read_text(), "the model card names another sha256 than the shipped GGUF's"
    assert DEFAULT_MODEL.stat().st_size <= 20_000_000
    layout = read_layout(DEFAULT_MODEL)
    assert (layout.arch, layout.n_expert_used) == ("qwen3moe", 4)


def test_predictors_load_for_the_packaged_model():
    layout = read_layout(DEFAULT_MODEL)
    manifest = json.loads((DEFAULT_PREDICTORS / MANIFEST).read_text())
    assert manifest["fingerprint"] == layout.fingerprint
    predictors = load_predictor_set(DEFAULT_PREDICTORS, fingerprint=layout.fingerprint)
    x = np.random.default_rng(0).standard_normal((3, layout.n_embd)).astype(np.float32)  # [n, d]
    uniform = np.full((3, layout.n_expert), 1 / layout.n_expert, np.float32)  # [n, E] router probabilities
    previous_x = np.concatenate([np.zeros_like(x[:1]), x[:-1]])  # [n, d] prev-x: the row before, zeros first
    history = {"prev-x": previous_x}  # the other history inputs read router probabilities
    extra = {features.input_name(f): history.get(f, uniform) for f in predictors.features}
    for layer in layout.moe_layers:
        assert predictors.scores(layer.index, x, extra).shape == (3, layout.n_expert)


def greedy_tokens(llama_lib, mode: str) -> tuple[list[int], int]:
    """Tokens of a short greedy run, and the prefetch hits it had (0 without the cache)."""
    layout = read_layout(DEFAULT_MODEL)
    cached = mode != "off"
    config = EngineConfig(
        str(DEFAULT_MODEL),
        n_ctx=256,
        use_extra_bufts=not cached,
        overrides=expert_overrides(None) if cached else (),
    )
    with Engine(llama_lib, config) as engine:
        if not cached:
            return [t for t, _ in engine.generate(PROMPT, N_PREDICT)], 0
        predictors = (
            load_predictor_set(DEFAULT_PREDICTORS, fingerprint=layout.fingerprint) if mode == "top1" else None
        )
        n_slots = layout.n_expert // 4
        with CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=n_slots, mode=mode, predictors=predictors)
        ) as rt:
            tokens = [t for t, _ in engine.generate(PROMPT, N_PREDICT)]
            return tokens, rt.controller.stats.totals().hits


def test_prediction_never_changes_the_tokens(llama_lib):
    off, _ = greedy_tokens(llama_lib, "off")
    lru, _ = greedy_tokens(llama_lib, "lru")
    top1, top1_hits = greedy_tokens(llama_lib, "top1")
    assert len(off) == N_PREDICT
    assert lru == off and top1 == off
    assert top1_hits > 0


def test_run_without_a_model_prefetches_with_the_packaged_predictors(llama_lib, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    assert cli.main(["run", "-n", "8", "--seed", "1", "--stats-json", str(stats_file)]) == 0  # sampled
    stats = json.loads(stats_file.read_text())
    assert stats["model"] == str(DEFAULT_MODEL)
    assert stats["mode"] == "top1" and stats["slots"] == 8 and stats["prefetch_issued"] > 0
    assert "prefetches issued" in capsys.readouterr().err


def test_the_packaged_predictors_run_in_the_library(llama_lib, tmp_path, caplog):
    """The shipped predictors (residuals on the router prior) are read and evaluated by the library
    itself: no onnxruntime fallback, and not one Python callback per token."""
    stats_file = tmp_path / "stats.json"
    assert cli.main(["run", "--temp", "0", "-n", "16", "--stats-json", str(stats_file)]) == 0
    stats = json.loads(stats_file.read_text())
    assert "onnxruntime" not in caplog.text
    assert stats["python_callbacks_per_token"] == 0 and stats["native_predictions_per_token"] > 0


def test_wheel_and_sdist_carry_the_model_and_predictors(tmp_path):
    """Built offline with setuptools' own PEP 517 hooks, from a copy, so the repo gets no build output."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "edge_preattn", source / "edge_preattn", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "dist"
    built = {}
    for hook in ("build_wheel", "build_sdist"):  # one process per hook, as PEP 517 frontends do
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))",
                str(out),
            ],
            cwd=source,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        built[hook] = done.stdout.splitlines()[-1]
    wheel_name, sdist_name = built["build_wheel"], built["build_sdist"]
    with zipfile.ZipFile(out / wheel_name) as wheel:
        in_wheel = set(wheel.namelist())
    with tarfile.open(out / sdist_name) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in packaged_files():
        assert name in in_wheel, f"{name} is not in the wheel"
        assert name in in_sdist, f"{name} is not in the sdist"
