"""`--miss cpu|auto`: misses computed on the CPU give stock llama.cpp's exact logits; stats add up."""

import ctypes

import numpy as np
import pytest

from edge_preattn.model.synth import write_synthetic
from edge_preattn.runtime.cache import MissCostModel
from edge_preattn.runtime.cache_api import MissStats, bind_cache_functions
from edge_preattn.runtime.cache_runtime import CacheRuntime, RandomRanking
from edge_preattn.runtime.options import CacheOptions
from edge_preattn.runtime.slots import SlotBank

from .test_cache import N_PREDICT, PROMPT, greedy, host_experts_engine, stock_reference
from .test_native_predictor import export_predictors


@pytest.fixture(scope="module", params=["tiny", "tiny-deepseek2", "moe-ref-a"])
def model(request, tmp_path_factory, llama_lib):
    return stock_reference(request, tmp_path_factory, llama_lib)


@pytest.mark.parametrize("miss", ["cpu", "auto"])
@pytest.mark.parametrize("mode", ["lru", "top1", "exact", "exact-native"])
@pytest.mark.parametrize("slots", ["k", "E"])
def test_misses_on_the_cpu_are_bit_identical_to_stock(llama_lib, model, mode, miss, slots, tmp_path):
    path, layout, ref_tokens, ref_logits = model
    n_slots = layout.n_expert_used if slots == "k" else layout.n_expert
    options = {"predictors": RandomRanking(layout.n_expert)} if mode != "lru" else {}
    native = mode == "exact-native"
    if native:  # exported predictors, evaluated by the library
        mode, options = "exact", {"predictors": export_predictors(layout, tmp_path / "predictors")}
    with (
        host_experts_engine(llama_lib, path) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=n_slots, mode=mode, miss=miss, **options)
        ) as runtime,
    ):
        assert runtime.controller.native == native
        if native and miss == "cpu":  # nothing is left for Python: no callback at all
            assert runtime.hooks is None
        tokens, logits = greedy(engine)
        stats, bank, miss_stats = runtime.controller.stats, runtime.bank.stats(), runtime.bank.miss_stats()
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)
    assert stats.cached_tokens == N_PREDICT - 1
    for counters in stats.layers.values():
        # every selected expert is a hit, late, computed on the CPU, or uploaded on the miss: once
        total = counters.hits + counters.late + counters.cpu + counters.misses
        assert total == layout.n_expert_used * counters.tokens
    total = stats.totals()
    assert bank["forced_uploads"] == 0
    assert miss_stats.cpu_rows == total.cpu  # the C side computed on the CPU what the controller left there
    assert miss_stats.cpu_bytes == miss_stats.cpu_experts * layout.moe_layers[0].bytes_per_expert
    if slots == "E":  # the banks were filled when the cache was enabled: nothing is ever missed
        assert total.cpu == total.misses == total.late == 0 and bank["upload_bytes"] == 0
    elif miss == "cpu":
        assert total.misses == 0 and total.cpu > 0
        assert miss_stats.cpu_timed_experts == miss_stats.cpu_experts  # every CPU run was timed
    else:
        # each side is measured before the model chooses: uploads at routing, or the prefetches'
        assert total.cpu > 0 and (total.misses > 0 or total.prefetch_issued > 0)
        assert miss_stats.upload_ns > 0 and miss_stats.cpu_timed_experts > 0


@pytest.mark.parametrize("miss", ["cpu", "auto"])
def test_multi_token_ubatches_are_bit_identical(llama_lib, model, miss):
    """Several tokens per ubatch, each with its own mix of resident and CPU-computed experts."""
    path, layout, _, _ = model
    # one slot short of E (a full bank is filled when enabled: nothing would go to the CPU), and as many
    # tokens per ubatch as n_tokens * k <= slots allows
    n_slots = layout.n_expert - 1
    per_ubatch = n_slots // layout.n_expert_used

    def all_logits(engine) -> np.ndarray:
        tokens = engine.tokenize(PROMPT * 2)
        rows = []
        for start in range(0, len(tokens), per_ubatch):
            chunk = tokens[start : start + per_ubatch]
            engine.decode(chunk, all_logits=True)
            for i in range(len(chunk)):
                pointer = engine.llama_cpp.llama_get_logits_ith(engine.ctx, i)
                rows.append(np.ctypeslib.as_array(pointer, shape=(engine.n_vocab,)).copy())
        return np.stack(rows)

    with host_experts_engine(llama_lib, path) as engine:
        ref = all_logits(engine)
    with (
        host_experts_engine(llama_lib, path) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=n_slots, mode="lru", miss=miss, max_batch_tokens=per_ubatch)
        ) as runtime,
    ):
        logits = all_logits(engine)
        stats, miss_stats = runtime.controller.stats, runtime.bank.miss_stats()
    assert np.array_equal(logits, ref)
    assert stats.cached_tokens == len(ref)  # every ubatch read the bank
    assert miss_stats.cpu_rows > miss_stats.cpu_experts > 0  # experts shared by tokens, computed once


def test_c_api_refuses_bad_arguments(llama_lib, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    with host_experts_engine(llama_lib, path, n_ctx=64) as engine:
        lib = engine.api.lib
        bind_cache_functions(engine.api)
        assert lib.llama_edge_cache_set_miss_cpu(engine.ctx, True) == -2  # no cache yet
        assert lib.llama_edge_cache_get_miss_stats(engine.ctx, ctypes.byref(MissStats())) == -2
        assert lib.llama_edge_cache_set_miss_cpu(None, True) == -1
        bank = SlotBank(engine.api, engine.ctx, (0, 1), n_slots=4)
        assert lib.llama_edge_cache_get_miss_stats(engine.ctx, None) == -1
        assert lib.llama_edge_cache_get_miss_stats(None, ctypes.byref(MissStats())) == -1
        bank.set_miss_cpu(True)
        bank.set_miss_cpu(False)
        assert bank.miss_stats().cpu_experts == 0


def test_cost_model_measures_both_sides_then_picks_the_cheaper():
    cost = MissCostModel(bytes_per_expert=1000, explore_every=4)
    assert cost.upload_is_cheaper()  # nothing measured: measure the upload first
    cost.refresh(upload_ns=1_000_000, upload_bytes=1000, cpu_ns=0, cpu_experts=0)  # 1 ms per expert
    assert not cost.upload_is_cheaper()  # then the CPU
    cost.refresh(upload_ns=1_000_000, upload_bytes=1000, cpu_ns=100_000, cpu_experts=1)  # 0.1 ms
    assert [cost.upload_is_cheaper() for _ in range(4)] == [False] * 3 + [True]  # re-measures the upload
    cost.refresh(upload_ns=1_010_000, upload_bytes=2000, cpu_ns=100_000, cpu_experts=1)  # 10 µs now
    assert cost.upload_s_per_byte < 1e-6  # the average moved towards the new measurement


def test_run_reports_cpu_computed_experts(llama_lib, tmp_path, capsys):
    import json

    from edge_preattn import cli

    path = tmp_path / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    stats_file = tmp_path / "stats.json"
    argv = ["run", "-m", str(path), "-n", "12", "--temp", "0", "--mode", "lru", "--slots", "4"]
    argv += ["--miss", "cpu"]
    assert cli.main([*argv, "--stats-json", str(stats_file)]) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["miss_policy"] == "cpu" and stats["misses_per_token"] == 0 and stats["cpu_per_token"] > 0
    per_token = stats["hits_per_token"] + stats["late_per_token"] + stats["cpu_per_token"]
    assert 16 - 0.002 <= per_token <= 16 + 4 / 11 + 0.002  # k = 4 in 4 layers (see test_run)
    assert "on the CPU" in capsys.readouterr().err
    assert cli.main(["run", "-m", str(path), "--miss", "cpu"]) == 2  # no cache, nothing to miss
    assert "--miss cpu needs the expert cache" in capsys.readouterr().err
