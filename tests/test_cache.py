"""Expert slot cache: every mode gives stock llama.cpp's exact logits; stats add up; bad calls refused."""

import ctypes
from pathlib import Path

import numpy as np
import pytest

from edge_preattn.errors import UserError
from edge_preattn.model.engine import Engine, EngineConfig, Sampling
from edge_preattn.model.layout import MoeLayout, read_layout
from edge_preattn.model.synth import write_synthetic
from edge_preattn.predictors import baselines
from edge_preattn.runtime.cache import UploadBudget
from edge_preattn.runtime.cache_api import CacheStats, LayerStats, PredictionStats, bind_cache_functions
from edge_preattn.runtime.cache_runtime import CacheRuntime, RandomRanking, record_routing
from edge_preattn.runtime.options import CacheOptions
from edge_preattn.runtime.slots import SlotBank
from edge_preattn.traces.hooks import Hooks

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
N_PREDICT = 16


def host_experts_engine(llama_lib, model, n_ctx=256, context_params_hook=None) -> Engine:
    """Experts in host memory as plain bytes: the placement the cache and stock `-ot exps=CPU` share."""
    return Engine(
        llama_lib,
        EngineConfig.host_experts(model, n_ctx),
        context_params_hook=context_params_hook,
    )


def greedy(engine: Engine, prompt: str = PROMPT, n: int = N_PREDICT) -> tuple[list[int], np.ndarray]:
    logits: list[np.ndarray] = []
    tokens = [t for t, _ in engine.generate(prompt, n, on_logits=logits.append)]
    return tokens, np.stack(logits)


def stock_reference(request, tmp_path_factory, llama_lib) -> tuple[Path, MoeLayout, list[int], np.ndarray]:
    """(path, layout, stock tokens, stock logits) of the model `request.param` names: a synthetic one, or
    the trained fixture "moe-ref-a". What a module's parametrized `model` fixture compares caches with."""
    if request.param == "moe-ref-a":
        path = request.getfixturevalue("moe_ref_a")
    else:
        path = tmp_path_factory.mktemp("model") / f"{request.param}.gguf"
        write_synthetic(request.param, path, progress=False)
    with host_experts_engine(llama_lib, path) as engine:
        tokens, logits = greedy(engine)
    return path, read_layout(path), tokens, logits


@pytest.fixture(scope="module")
def ref(llama_lib, moe_ref_a):
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        tokens, logits = greedy(engine)
    return layout, tokens, logits


def run_mode(llama_lib, model, layout, mode, n_slots, n_predict=N_PREDICT, **options):
    with host_experts_engine(llama_lib, model) as engine:
        if mode == "oracle":
            options["oracle"] = record_routing(engine, PROMPT, n_predict, Sampling())
        with CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=n_slots, mode=mode, **options)
        ) as runtime:
            tokens, logits = greedy(engine, n=n_predict)
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
    assert bank["forced_uploads"] == total.misses  # one token per decode step: an upload per miss
    assert bank["bypassed_layer_graphs"] > 0  # the prompt's graph takes the stock path
    if mode == "oracle":
        assert total.misses == 0
    if n_slots == layout.n_expert:  # the banks were filled when the cache was enabled
        assert total.misses == total.late == 0 and bank["upload_bytes"] == 0
        assert total.hits == layout.n_expert_used * total.tokens
        assert total.tokens == (N_PREDICT - 1) * n_layers + 1  # the prompt: the last layer's output row


def test_lookahead_prefetches_later_layers_and_output_stays(llama_lib, moe_ref_a, ref):
    layout, ref_tokens, ref_logits = ref
    tokens, logits, stats, _ = run_mode(
        llama_lib, moe_ref_a, layout, "exact", 16, predictors=RandomRanking(layout.n_expert), lookahead=2
    )
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    first = min(stats.layers)
    assert stats.layers[first].lookahead_predictions + stats.layers[first].lookahead_superseded == 0
    later = [
        c.lookahead_predictions + c.lookahead_superseded for il, c in stats.layers.items() if il != first
    ]
    assert all(n > 0 for n in later)  # every later layer was looked ahead at, each decode step
    with pytest.raises(ValueError, match="prediction mode"):
        run_mode(llama_lib, moe_ref_a, layout, "lru", 16, lookahead=1)


def expert_bytes(layout) -> int:
    return max(layer.bytes_per_expert for layer in layout.moe_layers)


@pytest.mark.parametrize("mode", ["exact", "adaptive"])
def test_a_starved_budget_drops_every_prefetch_and_output_stays(llama_lib, moe_ref_a, ref, mode):
    layout, ref_tokens, ref_logits = ref
    # the bucket holds 5 ms of bandwidth, less than one expert: no prefetch fits; each miss takes
    # 5.4 ms on the modelled bus, so few tokens
    n = 3
    tokens, logits, stats, _ = run_mode(
        llama_lib,
        moe_ref_a,
        layout,
        mode,
        16,
        n_predict=n,
        predictors=RandomRanking(layout.n_expert),
        bandwidth_bytes_per_s=expert_bytes(layout) * 185.0,
    )
    assert tokens == ref_tokens[:n] and np.array_equal(logits, ref_logits[:n])
    total = stats.totals()
    assert total.prefetch_issued == 0 and total.prefetch_dropped > 0


def test_the_modelled_bus_makes_every_upload_wait_and_output_stays(llama_lib, moe_ref_a, ref):
    """--bandwidth slows the misses too: a routing waits until the bus has carried its experts, and a
    prefetched expert still on the bus is late, not a prefetch hit."""
    layout, ref_tokens, ref_logits = ref
    n, rate = 3, expert_bytes(layout) * 2000.0  # 0.5 ms per expert
    for mode in ("lru", "oracle"):
        tokens, logits, stats, _ = run_mode(
            llama_lib, moe_ref_a, layout, mode, 16, n_predict=n, bandwidth_bytes_per_s=rate
        )
        assert tokens == ref_tokens[:n] and np.array_equal(logits, ref_logits[:n])
        total = stats.totals()
        assert total.hits + total.late + total.misses == layout.n_expert_used * total.tokens
        if mode == "lru":
            # only misses use the bus, and each routing waits for its own: at least their bus time
            assert total.misses > 0
            assert total.stall_s >= total.misses * expert_bytes(layout) / rate * 0.999
        else:
            # oracle's uploads are queued right before the routing: still on the bus when it comes
            assert total.late > 0 and total.prefetch_hits < total.prefetch_issued


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
        assert lib.llama_edge_cache_set_bus_rate(engine.ctx, 1e9) == -2
        assert lib.llama_edge_cache_get_stats(engine.ctx, ctypes.byref(CacheStats())) == -2
        with pytest.raises(UserError, match="--slots"):
            SlotBank(engine.api, engine.ctx, (0,), n_slots=4)  # fewer slots than k = 8
        bank = SlotBank(engine.api, engine.ctx, (0, 1), n_slots=8)
        assert lib.llama_edge_cache_enable(engine.ctx, (ctypes.c_int32 * 1)(2), 1, 8, 32) == -2  # twice
        for il, expert, slot in [(5, 0, 0), (0, 64, 0), (0, -1, 0), (0, 0, 8), (0, 0, -1)]:
            assert lib.llama_edge_cache_upload(engine.ctx, il, expert, slot) == -1
        assert lib.llama_edge_cache_upload(None, 0, 0, 0) == -1
        experts = (ctypes.c_int32 * 2)(1, 64)
        assert lib.llama_edge_cache_prefetch(engine.ctx, 0, experts, 2, 1, False) == -1  # 64 out of range
        assert lib.llama_edge_cache_prefetch(engine.ctx, 5, experts, 1, 1, False) == -1  # not cached
        assert lib.llama_edge_cache_prefetch(engine.ctx, 0, None, 1, 1, False) == -1
        assert lib.llama_edge_cache_prefetch(engine.ctx, 0, experts, 1, -1, False) == -1
        assert lib.llama_edge_cache_set_eviction(engine.ctx, 2) == -1
        assert lib.llama_edge_cache_ubatch(None) == -1 and lib.llama_edge_cache_ubatch(engine.ctx) == -1
        bad = [(0, -1, 1, experts), (5, 0, 1, experts), (0, 0, 2, experts), (0, 0, 1, None)]
        for il, ubatch, n, array in bad:
            assert lib.llama_edge_cache_predict(engine.ctx, il, ubatch, array, n, 1) == -1
        rows = (ctypes.c_int32 * 2)(1, 1)
        for il, array, n_rows, n_runs, k in [
            (0, experts, rows, 2, 1),  # 64 is out of range
            (5, experts, rows, 1, 1),  # not cached
            (0, experts, None, 1, 1),
            (0, experts, rows, 1, 0),
            (0, experts, (ctypes.c_int32 * 1)(0), 1, 1),  # a run of no rows
            (0, None, rows, 1, 1),
        ]:
            assert lib.llama_edge_cache_set_oracle(engine.ctx, il, array, n_rows, n_runs, k) == -1
        assert lib.llama_edge_cache_set_oracle(engine.ctx, 0, experts, rows, 1, 1) == 0
        assert lib.llama_edge_cache_set_oracle(engine.ctx, 0, None, None, 0, 0) == 0  # removed
        assert lib.llama_edge_cache_get_prediction_stats(engine.ctx, 5, ctypes.byref(PredictionStats())) == -1
        assert lib.llama_edge_cache_get_prediction_stats(engine.ctx, 0, None) == -1
        for rate in (-1.0, float("nan"), float("inf")):
            assert lib.llama_edge_cache_set_bus_rate(engine.ctx, rate) == -1
        assert lib.llama_edge_cache_set_bus_rate(None, 1e9) == -1
        assert lib.llama_edge_cache_get_layer_stats(engine.ctx, 5, ctypes.byref(LayerStats())) == -1
        assert lib.llama_edge_cache_get_layer_stats(engine.ctx, 0, None) == -1
        bank.upload(0, 5, 3)
        assert bank.slot_expert(0, 3) == 5 and bank.slot_expert(0, 2) == -1
        assert bank.stats()["uploads"] == 1


def test_the_library_evicts_exactly_like_the_lru_baseline(llama_lib, moe_ref_a):
    """The native policy's hits per decode token equal `baselines.lru_simulate` on the same routing."""
    layout, n_slots, n_predict = read_layout(moe_ref_a), 16, 24
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        recorded = record_routing(engine, PROMPT, n_predict, Sampling())
        with CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=n_slots, mode="lru")) as runtime:
            list(engine.generate(PROMPT, n_predict))
            stats = runtime.controller.stats
    for layer in layout.moe_layers:
        decode = bank_runs(recorded, layer.index, layout.n_expert_used, n_slots)
        hits, _ = baselines.lru_simulate(decode, np.zeros(len(decode)), n_slots)
        counters = stats.layers[layer.index]
        assert counters.tokens == len(decode)
        assert counters.hits == int(hits.sum())  # same victims, so the same hits token after token
        assert counters.misses == layout.n_expert_used * len(decode) - int(hits.sum())


def bank_runs(recorded, il: int, k: int, n_slots: int) -> np.ndarray:
    """The routings of layer il that read its bank, rows in order: every decode step, and the prompt's
    one output row in the last layer."""
    return np.concatenate(
        [ids for (_, layer), ids in sorted(recorded.items()) if layer == il and len(ids) * k <= n_slots]
    )


def test_belady_simulation_is_optimal_on_a_known_sequence():
    # capacity 2: after (0, 1), token (2) evicts 1 (next used at row 4) rather than 0 (row 3)
    ids = np.array([[0], [1], [2], [0], [1], [2]])
    hits, _ = baselines.belady_simulate(ids, np.zeros(6), 2)
    assert hits.tolist() == [0, 0, 0, 1, 0, 1]
    lru_hits, _ = baselines.lru_simulate(ids, np.zeros(6), 2)
    assert lru_hits.sum() == 0 < hits.sum()
    # a new prompt starts empty; with carry it does not
    assert baselines.belady_simulate(ids, np.array([0, 0, 0, 1, 1, 1]), 2)[0].tolist() == [0] * 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from edge_preattn.model.synth import write_synthetic

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


@pytest.mark.parametrize(
    ("model_name", "slots_per_k"), [("moe_ref_a", 1), ("moe_ref_a", 2), ("tiny_model", 1)]
)
def test_the_library_oracle_evicts_exactly_like_belady(llama_lib, request, model_name, slots_per_k):
    """oracle prefetches each run's true experts into Belady's victims: its uploads per layer are
    `baselines.belady_simulate`'s misses, token after token, and never more than lru's."""
    model = request.getfixturevalue(model_name)
    layout, n_predict = read_layout(model), 24
    k = layout.n_expert_used
    n_slots = k * slots_per_k
    by_mode, recorded = {}, {}
    for mode in ("lru", "oracle"):  # one cache per context: a context each
        with host_experts_engine(llama_lib, model) as engine:
            if mode == "oracle":
                recorded = record_routing(engine, PROMPT, n_predict, Sampling())
            options = {"oracle": recorded} if mode == "oracle" else {}
            with CacheRuntime.for_layout(
                engine, layout, CacheOptions(n_slots=n_slots, mode=mode, **options)
            ) as runtime:
                list(engine.generate(PROMPT, n_predict))
                by_mode[mode] = runtime.controller.stats
                assert runtime.hooks is None  # no Python on the way: the library prefetches itself
    for layer in layout.moe_layers:
        runs = bank_runs(recorded, layer.index, k, n_slots)
        hits, _ = baselines.belady_simulate(runs, np.zeros(len(runs)), n_slots)
        oracle, lru = by_mode["oracle"].layers[layer.index], by_mode["lru"].layers[layer.index]
        assert oracle.tokens == len(runs) and oracle.misses == 0
        assert oracle.hits - oracle.prefetch_hits == int(hits.sum())  # resident without an upload
        assert oracle.prefetch_issued == k * len(runs) - int(hits.sum())
        assert oracle.prefetch_issued <= lru.misses


def test_prefetches_protect_their_experts_and_stop_once_the_layer_is_routed(llama_lib, moe_ref_a):
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        bank = SlotBank(engine.api, engine.ctx, (0,), n_slots=8)
        assert bank.prefetch(0, list(range(12)), 20) == 8  # 8 slots: the rest have no victim among the 12
        assert {bank.slot_expert(0, slot) for slot in range(8)} == set(range(8))
        assert bank.prefetch(0, [3, 40], 1) == 1  # 3 is resident: one upload, and 3 stays
        held = {bank.slot_expert(0, slot) for slot in range(8)}
        assert 3 in held and 40 in held
        list(engine.generate(PROMPT, 2))  # the last decode step routed layer 0: its bank may be in use
        held = {bank.slot_expert(0, slot) for slot in range(8)}
        missing = next(e for e in range(layout.n_expert) if e not in held)
        assert bank.prefetch(0, [missing], 1) == 0
        assert bank.layer_stats(0)["prefetch_refused"] == 1
        assert bank.prefetch(0, [missing], 1, on_miss=True) == 1  # the routing's own uploads are not


def test_pending_predictions_are_no_victims_and_late_ones_are_dropped(llama_lib, moe_ref_a):
    """A prediction's experts stay until its layer is routed (no later prefetch evicts them), and a
    prediction for a layer already routed, or for a past ubatch, is dropped whole (counted)."""
    seen: list[tuple[int, int, int]] = []  # (ubatch, first upload count, second)
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        bank = SlotBank(engine.api, engine.ctx, (0,), n_slots=8)

        def on_pre_attn(il: int, x: np.ndarray) -> None:
            if il == 0 and len(x) == 1:  # a decode step, before layer 0's routing
                ubatch = bank.ubatch()
                first = [e for e in range(64) if e not in resident()][:8]
                other = [e for e in range(64) if e not in first][:8]
                seen.append((ubatch, bank.predict(0, ubatch, first, 8), bank.predict(0, ubatch, other, 8)))

        def resident() -> set[int]:
            return {bank.slot_expert(0, slot) for slot in range(8)}

        with Hooks(engine.api, engine.ctx, on_pre_attn):
            list(engine.generate(PROMPT, 3))
        ubatch = bank.ubatch()
        assert [u for u, _, _ in seen] == [ubatch - 1, ubatch]  # the prompt's ubatch, then 2 decode steps
        # the first prediction filled all 8 slots; the second found only pending experts to evict
        assert all(first == 8 and second == 0 for _, first, second in seen)
        taken, stale = bank.prediction_stats(0).values()
        assert taken == 2 * len(seen)
        assert bank.predict(0, ubatch, [1, 2], 2) == 0  # layer 0 was routed in this ubatch
        assert bank.predict(0, ubatch - 1, [1, 2], 2) == 0  # a past ubatch
        assert bank.prediction_stats(0) == {"predictions": taken, "stale": stale + 2}


def test_upload_budget_is_a_token_bucket():
    assert UploadBudget(None).grant(10**6, 10**6) == 10**6
    budget = UploadBudget(1000.0, burst_s=1.0)  # 1000 bytes of burst
    assert budget.grant(5, 300) == 3 and budget.grant(1, 200) == 0
    budget.refund(300)  # one granted upload was not needed
    assert budget.grant(1, 300) == 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek2"])
@pytest.mark.parametrize("mode", ["lru", "exact", "oracle"])
def test_synthetic_models_are_bit_identical_in_every_mode(llama_lib, tmp_path, preset, mode):
    from edge_preattn.model.synth import write_synthetic

    model = tmp_path / f"{preset}.gguf"
    write_synthetic(preset, model, progress=False)
    layout = read_layout(model)
    with host_experts_engine(llama_lib, model) as engine:
        ref_tokens, ref_logits = greedy(engine)
    options = {"predictors": RandomRanking(layout.n_expert)} if mode == "exact" else {}
    tokens, logits, stats, bank = run_mode(llama_lib, model, layout, mode, layout.n_expert_used, **options)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert bank["forced_uploads"] == stats.totals().misses
    for counters in stats.layers.values():
        assert counters.hits + counters.late + counters.misses == layout.n_expert_used * counters.tokens


def node_name_recorder(llama_lib, lib_dir):
    """A caller's own cb_eval that records the name of every node the scheduler asks about: the names
    seen, and the context-parameters hook that installs it."""
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
        params.cb_eval = record_names  # the hook's closure keeps the ctypes callback alive

    return names, set_cb


def test_decode_graphs_read_the_slot_bank(llama_lib, lib_dir, moe_ref_a):
    """Guards against a cache that counts hits while every graph still reads the host experts."""
    names, set_cb = node_name_recorder(llama_lib, lib_dir)
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a, n_ctx=128, context_params_hook=set_cb) as engine:
        list(engine.generate(PROMPT, 2))  # a graph built before the cache exists must not be reused
        assert "ffn_moe_topk-0" in names and not any(name.startswith("ffn_moe_slots-") for name in names)
        with CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=8, mode="lru")):
            names.clear()
            list(engine.generate(PROMPT, 3))
    assert {f"ffn_moe_slots-{layer.index}" for layer in layout.moe_layers} <= names


def test_a_full_bank_reads_no_map_and_cb_eval_still_sees_every_node(llama_lib, lib_dir, moe_ref_a, ref):
    """slots = E: the graph reads the bank without the expert->slot map (no `ffn_moe_slots` node), and a
    caller's own cb_eval keeps the scheduler asking about every node (no quiet ubatch); output stays."""
    names, set_cb = node_name_recorder(llama_lib, lib_dir)
    layout, ref_tokens, ref_logits = ref
    with (
        host_experts_engine(llama_lib, moe_ref_a, context_params_hook=set_cb) as engine,
        CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=layout.n_expert, mode="lru")) as runtime,
    ):
        tokens, logits = greedy(engine)
        quiet = runtime.bank.stats()["quiet_ubatches"]
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert quiet == 0
    assert {f"ffn_moe_ids-{layer.index}" for layer in layout.moe_layers} <= names
    assert not any(name.startswith("ffn_moe_slots-") for name in names)


def two_sequence_logits(engine, first: list[int], second: list[int]) -> np.ndarray:
    """Both sequences decoded side by side, one token of each per ubatch: [steps, 2, n_vocab]."""
    llama_cpp, rows = engine.llama_cpp, []
    for pos, pair in enumerate(zip(first, second, strict=False)):
        batch = llama_cpp.llama_batch_init(2, 0, 1)
        try:
            for i, token in enumerate(pair):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, 1
                batch.seq_id[i][0] = i
            batch.n_tokens = 2
            assert llama_cpp.llama_decode(engine.ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        rows.append(
            [
                np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(engine.ctx, i), shape=(engine.n_vocab,)
                ).copy()
                for i in range(2)
            ]
        )
    return np.array(rows)


def test_two_sequences_in_one_ubatch_are_bit_identical(llama_lib, moe_ref_a):
    """Two tokens of different sequences share a ubatch (2 × k = 16 slots): overlapping expert
    choices are uploaded once, distinct ones each get a slot, and both rows equal stock's."""
    layout = read_layout(moe_ref_a)

    def two_sequences(params):
        params.n_seq_max = 2

    with host_experts_engine(llama_lib, moe_ref_a, context_params_hook=two_sequences) as engine:
        first, second = engine.tokenize(PROMPT), engine.tokenize("import numpy as np\nx = np.arange(10)\n")
        ref = two_sequence_logits(engine, first, second)
    with (
        host_experts_engine(llama_lib, moe_ref_a, context_params_hook=two_sequences) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=2 * layout.n_expert_used, mode="lru")
        ) as runtime,
    ):
        got = two_sequence_logits(engine, first, second)
        stats = runtime.controller.stats
    assert np.array_equal(got, ref)
    assert stats.cached_tokens == 2 * len(ref)  # every ubatch read the bank
    total = stats.totals()
    assert total.hits + total.late + total.misses == layout.n_expert_used * stats.cached_tokens * len(
        stats.layers
    )


def test_a_context_shift_is_bit_identical(llama_lib, moe_ref_a):
    """Drop the oldest positions and shift the rest back (what a full context does), then go on."""
    layout = read_layout(moe_ref_a)

    def shifted_run(engine) -> np.ndarray:
        llama_cpp, memory = engine.llama_cpp, engine.llama_cpp.llama_get_memory(engine.ctx)
        engine.reset()
        engine.decode(engine.tokenize(PROMPT))
        logits = []
        for step in range(12):
            if step == 6:  # forget positions [4, 12) and move the later ones 8 places back
                assert llama_cpp.llama_memory_seq_rm(memory, 0, 4, 12)
                llama_cpp.llama_memory_seq_add(memory, 0, 12, -1, -8)
                engine.n_past -= 8
            token = int(np.argmax(engine.last_logits()))
            engine.decode([token])
            logits.append(engine.last_logits())
        return np.stack(logits)

    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        ref = shifted_run(engine)
    with (
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=layout.n_expert_used, mode="lru")),
    ):
        got = shifted_run(engine)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("keep", [False, True])
def test_prediction_switches_off_when_predictions_come_late(llama_lib, moe_ref_a, caplog, monkeypatch, keep):
    """Every check finds "too late" (the share is lowered to 0 here; a fast GPU reaches it by itself):
    the pre-attention hook goes at the first check, the rest runs as lru, the output never changes."""
    import logging

    from edge_preattn.runtime import controller

    monkeypatch.setattr(controller, "LATE_SHARE", 0.0)
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        ref = greedy(engine, n=48)
    with (
        caplog.at_level(logging.WARNING, logger="edge_preattn"),
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(
                n_slots=16, mode="exact", predictors=RandomRanking(layout.n_expert), late_fallback=not keep
            ),
        ) as runtime,
    ):
        tokens, logits = greedy(engine, n=48)
        calls = runtime.hooks.stats().pre_attn_calls
        off_at = runtime.controller.prediction_off_at
    assert tokens == ref[0] and np.array_equal(logits, ref[1])
    if keep:
        assert off_at is None and calls == 48 * layout.n_layer  # every ubatch, every layer
    else:
        assert off_at == controller.LATE_CHECK_UBATCHES  # the first check with enough predictions
        assert calls == off_at * layout.n_layer + 1  # none after the switch (at the first layer)
        assert any("prediction is off" in r.getMessage() for r in caplog.records)


def test_bypassed_ubatches_are_not_observed(llama_lib, moe_ref_a):
    """A prompt ubatch that takes the stock path runs without a graph split at the router: on CUDA a
    split at ffn_moe_topk cuts the fused top-k/weights kernel that stock all-on-GPU runs, and the
    routing weights round differently (moe-ref-a, bench/results/exactness-cuda/README.md)."""
    layout = read_layout(moe_ref_a)
    with (
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=16, mode="lru", miss="cpu")) as runtime,
    ):
        list(engine.generate(PROMPT, 4))  # the prompt bypasses every layer but the last (one row)
        observed = runtime.hooks.stats().routing_calls
        runs = sum(runtime.bank.layer_stats(layer.index)["runs"] for layer in layout.moe_layers)
    assert observed == runs == 3 * len(layout.moe_layers) + 1


def test_prediction_switches_off_when_every_predicted_expert_is_resident(llama_lib, moe_ref_a, caplog):
    """slots = E: after warm-up nothing is left to prefetch, and the graph split per layer buys nothing.
    (With misses on the CPU the library keeps observing every layer, so the controller has to notice.)"""
    import logging

    from edge_preattn.runtime import controller

    layout = read_layout(moe_ref_a)
    with (
        caplog.at_level(logging.WARNING, logger="edge_preattn"),
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(
                n_slots=layout.n_expert, mode="exact", predictors=RandomRanking(layout.n_expert), miss="cpu"
            ),
        ) as runtime,
    ):
        list(engine.generate(PROMPT, 100))
        off_at = runtime.controller.prediction_off_at
    assert off_at is not None and off_at % controller.LATE_CHECK_UBATCHES == 0
    assert any("resident already" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["lru", "exact"])
def test_full_banks_are_never_observed(llama_lib, moe_ref_a, ref, mode):
    """slots = E: the banks are filled when the cache is enabled, so every layer is settled from the first
    ubatch and nothing is observed: no pre-attention output, no routing, every ubatch computed without
    the eval callback (quiet). The tokens still count, as hits, and the logits stay."""
    layout, ref_tokens, ref_logits = ref
    options = {"predictors": RandomRanking(layout.n_expert)} if mode == "exact" else {}
    with (
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=layout.n_expert, mode=mode, **options)
        ) as runtime,
    ):
        tokens, logits = greedy(engine)
        stats, bank = runtime.controller.stats, runtime.bank.stats()
        pre_attn_calls = runtime.hooks.stats().pre_attn_calls if runtime.hooks else 0
        stall_ns = sum(runtime.bank.layer_stats(layer.index)["stall_ns"] for layer in layout.moe_layers)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert pre_attn_calls == 0 and stall_ns == 0
    assert bank["quiet_ubatches"] == N_PREDICT  # the prompt's ubatch and every decode step
    assert bank["upload_bytes"] == 0 and bank["forced_uploads"] == 0
    total = stats.totals()
    # the prompt bypasses every bank but the last layer's (its one output row)
    assert total.tokens == (N_PREDICT - 1) * len(layout.moe_layers) + 1
    assert total.hits == layout.n_expert_used * total.tokens and total.misses == total.late == 0


def test_a_full_bank_holds_expert_e_in_slot_e(llama_lib, moe_ref_a):
    """slots = E: the graph reads the bank without a map, so an upload may not move an expert."""
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a, n_ctx=64) as engine:
        bank = SlotBank(engine.api, engine.ctx, (0,), n_slots=layout.n_expert)
        assert [bank.slot_expert(0, slot) for slot in range(layout.n_expert)] == list(range(layout.n_expert))
        with pytest.raises(ValueError, match="refused"):
            bank.upload(0, 5, 3)
        bank.upload(0, 5, 5)  # the same place: allowed (a reload)
        assert bank.slot_expert(0, 3) == 3 and bank.slot_expert(0, 5) == 5


def test_a_routing_hook_keeps_full_banks_observed(llama_lib, moe_ref_a, ref):
    """A caller that asked to see every routing sees it even when nothing needs an upload."""
    layout, ref_tokens, ref_logits = ref
    with (
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=layout.n_expert, mode="lru", wait_for_prefetch=True)
        ) as runtime,
    ):
        tokens, logits = greedy(engine)
        routings, bank = runtime.hooks.stats().routing_calls, runtime.bank.stats()
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert bank["quiet_ubatches"] == 0 and routings == (N_PREDICT - 1) * len(layout.moe_layers) + 1


class CrossLayerRanking(RandomRanking):
    """Random rankings from "predictors trained on x_prev": the runtime feeds them router inputs."""

    def __init__(self, n_expert: int) -> None:
        super().__init__(n_expert)
        self.manifest = {"input": "x_prev"}
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def scores(self, il: int, x: np.ndarray) -> np.ndarray:
        self.calls.append((il, x.shape))
        return super().scores(il, x)


@pytest.mark.parametrize("mode", ["top1", "exact"])
def test_cross_layer_predictors_read_the_router_input_and_output_stays(llama_lib, moe_ref_a, ref, mode):
    """Cross-layer predictors get each cached layer's router input at its routing (no pre-attention
    split) and predict the next layer, a whole layer before it is routed."""
    layout, ref_tokens, ref_logits = ref
    predictors = CrossLayerRanking(layout.n_expert)
    with (
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=16, mode=mode, predictors=predictors, late_fallback=False)
        ) as runtime,
    ):
        tokens, logits = greedy(engine)
        pre_attn_calls = runtime.hooks.stats().pre_attn_calls
        runtime.controller.worker.close(5.0)  # every queued prediction made
        total = runtime.controller.stats.totals()
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert pre_attn_calls == 0
    layers = [layer.index for layer in layout.moe_layers]
    # decode steps read the bank (one row each); the first layer has no layer before it to predict from
    assert {il for il, _ in predictors.calls} == set(layers[1:])
    assert {shape for _, shape in predictors.calls} == {(1, layout.n_embd)}
    assert total.prefetch_issued > 0
    with pytest.raises(ValueError, match="cross-layer"):
        run_mode(llama_lib, moe_ref_a, layout, "exact", 16, predictors=predictors, lookahead=1)


def test_cross_layer_prediction_switches_off_like_pre_attention(llama_lib, moe_ref_a, monkeypatch):
    """The late check drops the router-input hook too: no predictions after the switch."""
    from edge_preattn.runtime import controller

    monkeypatch.setattr(controller, "LATE_SHARE", 0.0)
    layout = read_layout(moe_ref_a)
    predictors = CrossLayerRanking(layout.n_expert)
    with (
        host_experts_engine(llama_lib, moe_ref_a) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=16, mode="exact", predictors=predictors)
        ) as runtime,
    ):
        list(engine.generate(PROMPT, 48))
        off_at = runtime.controller.prediction_off_at
        dropped = runtime.hooks.on_router_input is None
    assert off_at == controller.LATE_CHECK_UBATCHES and dropped
    assert len(predictors.calls) <= off_at * (len(layout.moe_layers) - 1)
