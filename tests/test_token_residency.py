"""`--residency token` (patch 18): residency decided between tokens from a routing log the graph writes on
the device. Output stays stock's bit for bit, lru keeps exactly what lru at routing keeps, the oracle
misses nothing, and a decoded token costs two host synchronizations and no graph split."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.model.engine import Sampling
from edge_preattn.runtime.cache_api import LLAMA_EDGE_ERR_BACKEND, LLAMA_EDGE_ERR_STATE
from edge_preattn.runtime.cache_runtime import CacheRuntime, RandomRanking, record_routing
from edge_preattn.runtime.options import CacheOptions

from .test_cache import N_PREDICT, PROMPT, greedy, host_experts_engine, stock_reference
from .test_native_predictor import export_predictors


@pytest.fixture(scope="module", params=["tiny", "moe-ref-a"])
def model(request, tmp_path_factory, llama_lib):
    return stock_reference(request, tmp_path_factory, llama_lib)


def run_cached(llama_lib, path, layout, mode, n_slots, residency, tmp_path):
    """Greedy tokens, logits, the controller's per-layer counters, the bank's and the engine's stats."""
    with host_experts_engine(llama_lib, path) as engine:
        options = {}
        if mode == "oracle":
            options["oracle"] = record_routing(engine, PROMPT, N_PREDICT, Sampling())
        if mode == "exact":
            options["predictors"] = export_predictors(layout, tmp_path / "predictors")
        miss = "cpu" if residency == "token" else "upload"
        with CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(n_slots=n_slots, mode=mode, miss=miss, residency=residency, **options),
        ) as runtime:
            assert runtime.hooks is None  # nothing for Python per token
            engine_before = runtime.bank.engine_stats()
            tokens, logits = greedy(engine)
            stats, bank = runtime.controller.stats, runtime.bank.stats()
            engine_stats = runtime.bank.engine_stats()
            engine_stats = {key: engine_stats[key] - engine_before[key] for key in engine_stats}
    return tokens, logits, stats, bank, engine_stats


@pytest.mark.parametrize("mode", ["lru", "oracle", "exact"])
@pytest.mark.parametrize("slots_per_k", [1, 2])
def test_token_residency_is_bit_identical_to_stock(llama_lib, model, mode, slots_per_k, tmp_path):
    path, layout, ref_tokens, ref_logits = model
    k = layout.n_expert_used
    tokens, logits, stats, bank, engine = run_cached(
        llama_lib, path, layout, mode, k * slots_per_k, "token", tmp_path
    )
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)
    assert stats.cached_tokens == N_PREDICT - 1  # every decode step; the prompt bypassed the cache
    for counters in stats.layers.values():
        # each selected expert read from the bank or computed by the host side, once
        assert counters.hits + counters.cpu == k * counters.tokens
        assert counters.late == counters.misses == 0
    total = stats.totals()
    # what the host side computed is uploaded after its token (unless the layer's slots hold only
    # experts that token selected)
    assert 0 < bank["forced_uploads"] <= total.cpu or mode == "oracle"
    if mode == "oracle":  # the coming run's experts are uploaded before it: nothing left to the host side
        assert total.cpu == 0 and total.prefetch_issued > 0
    decoded_ubatches = N_PREDICT - 1
    if mode in (
        "lru",
        "oracle",
    ):  # no eval callback at all: the scheduler's synchronization and the log's read
        assert engine["eval_splits"] == 0
        assert engine["host_syncs"] <= 2 * engine["ubatches"] + 2  # + the last token, accounted at the end
    assert engine["callbacks"] == 0
    assert engine["ubatches"] >= decoded_ubatches


@pytest.mark.parametrize("slots_per_k", [1, 2])
def test_lru_between_tokens_keeps_what_lru_at_routing_keeps(llama_lib, model, slots_per_k, tmp_path):
    """The same victims, decided after the token instead of at its routing: the same hits per layer,
    and each routing-time miss becomes one host-side expert row."""
    path, layout, *_ = model
    n_slots = layout.n_expert_used * slots_per_k
    routing = run_cached(llama_lib, path, layout, "lru", n_slots, "routing", tmp_path)[2]
    token = run_cached(llama_lib, path, layout, "lru", n_slots, "token", tmp_path)[2]
    for il, at_routing in routing.layers.items():
        between = token.layers[il]
        assert between.tokens == at_routing.tokens
        assert between.hits == at_routing.hits
        assert between.cpu == at_routing.misses
        assert between.misses == 0


def test_token_residency_needs_the_host_side_and_no_python_predictor(llama_lib, model, tmp_path):
    path, layout, *_ = model
    k = layout.n_expert_used
    with host_experts_engine(llama_lib, path) as engine, pytest.raises(ValueError, match="miss must be cpu"):
        CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=k, mode="lru", residency="token"))
    # a context each: a cache is enabled once
    with host_experts_engine(llama_lib, path) as engine, pytest.raises(UserError, match="own predictor"):
        CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(
                n_slots=k,
                mode="exact",
                miss="cpu",
                residency="token",
                predictors=RandomRanking(layout.n_expert),
            ),
        )
    with (
        host_experts_engine(llama_lib, path) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=k, mode="lru", miss="cpu", residency="token")
        ) as runtime,
    ):
        lib = runtime.bank.api.lib
        # the host side stays while residency is decided between tokens
        assert lib.llama_edge_cache_set_miss_cpu(engine.ctx, False) == LLAMA_EDGE_ERR_STATE
        assert lib.llama_edge_cache_set_token_residency(engine.ctx, False) == 0
        assert lib.llama_edge_cache_set_miss_cpu(engine.ctx, False) == 0
        assert lib.llama_edge_cache_set_token_residency(engine.ctx, True) == LLAMA_EDGE_ERR_STATE
        assert lib.llama_edge_cache_set_miss_cpu(engine.ctx, True) == 0
        assert lib.llama_edge_cache_set_token_residency(engine.ctx, True) == 0
        assert lib.llama_edge_cache_set_token_residency(None, True) != 0
        # the host side on the device needs a device that reads page-locked host memory in place: not the
        # CPU, where the host side already is the CPU's own (patch 19)
        assert not runtime.host_side_mapped
        assert lib.llama_edge_cache_set_host_side_mapped(engine.ctx, True) == LLAMA_EDGE_ERR_BACKEND
        assert lib.llama_edge_cache_set_host_side_mapped(None, True) != 0
        assert lib.llama_edge_cache_set_token_residency(engine.ctx, False) == 0
        assert lib.llama_edge_cache_set_miss_cpu(engine.ctx, False) == 0
        assert (
            lib.llama_edge_cache_set_host_side_mapped(engine.ctx, True) == LLAMA_EDGE_ERR_STATE
        )  # no host side


def test_run_refuses_token_residency_with_miss_auto_in_one_line():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_preattn.cli",
            "run",
            "--mode",
            "lru",
            "--residency",
            "token",
            "--miss",
            "auto",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "edge-preattn: error: --residency token needs a cache --mode, and computes misses by the host side: "
        "no --miss auto"
    ]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--mode", "lru"], "needs a prediction mode with a fixed number of experts"),
        (
            ["--mode", "adaptive", "--residency", "token"],
            "needs a prediction mode with a fixed number of experts",
        ),
        (["--mode", "exact"], "and --residency token"),
        (["--mode", "exact", "--residency", "token", "--lookahead", "1"], "drop --lookahead"),
    ],
)
def test_run_refuses_predictors_on_the_gpu_where_they_cannot_run_in_one_line(options, reason):
    """Patch 23's predictors in the graph: a fixed top-k, residency between tokens, no lookahead."""
    command = [sys.executable, "-m", "edge_preattn.cli", "run", "--predictor-device", "gpu", *options]
    command += ["--predictors", str(Path(cli.__file__).parent / "onnx_models" / "edge-moe-default")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("edge-preattn: error: --predictor-device gpu")
        and reason in lines[0]
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--mode", "exact"],  # the loop on the decode thread keeps float32
        ["--mode", "lru", "--predictor-threads", "2"],  # no predictor
        ["--mode", "exact", "--predictor-threads", "2", "--predictor-engine", "onnxruntime"],
    ],
)
def test_run_refuses_fp16_predictors_that_are_not_graphs_in_one_line(options):
    """Patch 25: float16 matrices are for the library's predictors as ggml graphs (on the GPU or threads)."""
    command = [sys.executable, "-m", "edge_preattn.cli", "run", "--predictor-fp16", *options]
    command += ["--predictors", str(Path(cli.__file__).parent / "onnx_models" / "edge-moe-default")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("edge-preattn: error: --predictor-fp16 is for the library's")
