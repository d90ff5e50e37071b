"""Expert slot cache: every mode gives stock llama.cpp's exact logits; stats add up; bad calls refused."""

import ctypes

import numpy as np
import pytest

from edge_preattn.cache import LayerSlots, UploadBudget
from edge_preattn.controller import CacheRuntime, RandomRanking, record_routing
from edge_preattn.engine import Engine, EngineConfig, Sampling, expert_overrides
from edge_preattn.errors import UserError
from edge_preattn.layout import read_layout
from edge_preattn.slots import CacheStats, SlotBank, bind_cache_functions

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
N_PREDICT = 16


def host_experts_engine(llama_lib, model, n_ctx=256, context_params_hook=None) -> Engine:
    """Experts in host memory as plain bytes: the placement the cache and stock `-ot exps=CPU` share."""
    return Engine(
        llama_lib,
        EngineConfig(str(model), n_ctx=n_ctx, use_extra_bufts=False, overrides=expert_overrides(None)),
        context_params_hook=context_params_hook,
    )


def greedy(engine: Engine, prompt: str = PROMPT, n: int = N_PREDICT) -> tuple[list[int], np.ndarray]:
    logits: list[np.ndarray] = []
    tokens = [t for t, _ in engine.generate(prompt, n, on_logits=logits.append)]
    return tokens, np.stack(logits)


@pytest.fixture(scope="module")
def ref(llama_lib, moe_ref_a):
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        tokens, logits = greedy(engine)
    return layout, tokens, logits


def run_mode(llama_lib, model, layout, mode, n_slots, **options):
    with host_experts_engine(llama_lib, model) as engine:
        if mode == "oracle":
            options["oracle"] = record_routing(engine, PROMPT, N_PREDICT, Sampling())
        with CacheRuntime.for_layout(engine, layout, n_slots=n_slots, mode=mode, **options) as runtime:
            tokens, logits = greedy(engine)
            return tokens, logits, runtime.controller.stats, runtime.bank.stats()


@pytest.mark.parametrize("mode", ["lru", "top1", "exact", "overprov", "oracle"])
@pytest.mark.parametrize("n_slots", [8, 16, 64])  # k (every token evicts), 2k, E (all resident)
def test_every_mode_is_bit_identical_to_stock(llama_lib, moe_ref_a, ref, mode, n_slots):
    layout, ref_tokens, ref_logits = ref
    options = (
        {"predictors": RandomRanking(layout.n_expert), "extra": 4}
        if mode in ("top1", "exact", "overprov")
        else {}
    )
    tokens, logits, stats, bank = run_mode(llama_lib, moe_ref_a, layout, mode, n_slots, **options)
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)
    total = stats.totals()
    n_layers = len(layout.moe_layers)
    for counters in stats.layers.values():
        assert counters.hits + counters.late + counters.misses == layout.n_expert_used * counters.tokens
    assert stats.cached_tokens == N_PREDICT - 1  # every decode step; the prompt bypassed the cache
    assert bank["forced_uploads"] == 0  # the controller kept every selected expert resident itself
    assert bank["bypassed_layer_runs"] > 0
    if mode == "oracle":
        assert total.misses == 0
    if n_slots == 64 and mode == "lru":
        assert total.misses <= 64 * n_layers  # after warm-up everything stays


@pytest.mark.parametrize("mode", ["exact", "adaptive"])
def test_a_starved_budget_drops_every_prefetch_and_output_stays(llama_lib, moe_ref_a, ref, mode):
    layout, ref_tokens, ref_logits = ref
    tokens, logits, stats, _ = run_mode(
        llama_lib,
        moe_ref_a,
        layout,
        mode,
        8,
        predictors=RandomRanking(layout.n_expert),
        bandwidth_bytes_per_s=1.0,
    )
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    total = stats.totals()
    assert total.prefetch_issued == 0 and total.prefetch_dropped > 0


def test_a_broken_predictor_is_switched_off_and_output_stays(llama_lib, moe_ref_a, ref):
    layout, ref_tokens, ref_logits = ref

    class Garbage:
        def scores(self, il, x):
            return np.full((len(x), 3), np.nan, np.float32)

    tokens, logits, stats, _ = run_mode(llama_lib, moe_ref_a, layout, "exact", 16, predictors=Garbage())
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert stats.totals().prefetch_issued == 0


def test_c_api_refuses_bad_arguments(llama_lib, moe_ref_a):
    with host_experts_engine(llama_lib, moe_ref_a, n_ctx=64) as engine:
        lib = engine.api.lib
        bind_cache_functions(engine.api)
        assert lib.llama_edge_cache_upload(engine.ctx, 0, 0, 0) == -2  # not enabled yet
        assert lib.llama_edge_cache_get_stats(engine.ctx, ctypes.byref(CacheStats())) == -2
        with pytest.raises(UserError, match="--slots"):
            SlotBank(engine.api, engine.ctx, (0,), n_slots=4)  # fewer slots than k = 8
        bank = SlotBank(engine.api, engine.ctx, (0, 1), n_slots=8)
        assert lib.llama_edge_cache_enable(engine.ctx, (ctypes.c_int32 * 1)(2), 1, 8, 32) == -2  # twice
        for il, expert, slot in [(5, 0, 0), (0, 64, 0), (0, -1, 0), (0, 0, 8), (0, 0, -1)]:
            assert lib.llama_edge_cache_upload(engine.ctx, il, expert, slot) == -1
        assert lib.llama_edge_cache_upload(None, 0, 0, 0) == -1
        bank.upload(0, 5, 3)
        assert bank.slot_expert(0, 3) == 5 and bank.slot_expert(0, 2) == -1
        assert bank.stats()["uploads"] == 1


def test_layer_slots_evict_least_recently_used_and_protect_the_needed():
    slots = LayerSlots(3)
    for expert, slot in [(10, 0), (11, 1), (12, 2)]:
        slots.assign(expert, slot)
    slots.touch([10])
    assert slots.victim(protect=set()) == 1  # 11 is least recently used
    assert slots.victim(protect={11}) == 2
    assert slots.victim(protect={10, 11, 12}) is None
    lfu = LayerSlots(2, eviction="lfu")
    lfu.assign(1, 0)
    lfu.assign(2, 1)
    lfu.touch([1, 1, 2])
    assert lfu.victim(protect=set()) == 1


def test_upload_budget_is_a_token_bucket():
    assert UploadBudget(None).try_take(10**12)
    budget = UploadBudget(1000.0, burst_s=1.0)  # 1000 bytes of burst
    assert budget.try_take(900) and not budget.try_take(200)


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek2"])
@pytest.mark.parametrize("mode", ["lru", "exact", "oracle"])
def test_synthetic_models_are_bit_identical_in_every_mode(llama_lib, tmp_path, preset, mode):
    from edge_preattn.synth import write_synthetic

    model = tmp_path / f"{preset}.gguf"
    write_synthetic(preset, model, progress=False)
    layout = read_layout(model)
    with host_experts_engine(llama_lib, model) as engine:
        ref_tokens, ref_logits = greedy(engine)
    options = {"predictors": RandomRanking(layout.n_expert)} if mode == "exact" else {}
    tokens, logits, stats, bank = run_mode(llama_lib, model, layout, mode, layout.n_expert_used, **options)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert bank["forced_uploads"] == 0
    for counters in stats.layers.values():
        assert counters.hits + counters.late + counters.misses == layout.n_expert_used * counters.tokens


def test_decode_graphs_read_the_slot_bank(llama_lib, lib_dir, moe_ref_a):
    """Guards against a cache that counts hits while every graph still reads the host experts."""
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    names: set[str] = set()

    @llama_lib.ggml_backend_sched_eval_callback
    def record_names(tensor, ask, _user_data):
        if ask:
            names.add(ggml.ggml_get_name(tensor).decode())
        return False

    def set_cb(params):
        params.cb_eval = record_names

    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a, n_ctx=128, context_params_hook=set_cb) as engine:
        list(engine.generate(PROMPT, 2))  # a graph built before the cache exists must not be reused
        assert "ffn_moe_topk-0" in names and not any(name.startswith("ffn_moe_slots-") for name in names)
        with CacheRuntime.for_layout(engine, layout, n_slots=8, mode="lru"):
            names.clear()
            list(engine.generate(PROMPT, 3))
    assert {f"ffn_moe_slots-{layer.index}" for layer in layout.moe_layers} <= names
