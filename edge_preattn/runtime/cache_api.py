"""The expert cache's C API (llama-edge.h, patches 3-19), declared once: its error codes, its counter
structs and every function's argument and return types. SlotBank (slots.py) is the Python side of it.
"""

import ctypes

from ..model.native import NativeApi

LLAMA_EDGE_ERR_STATE, LLAMA_EDGE_ERR_PLACEMENT, LLAMA_EDGE_ERR_ALLOC, LLAMA_EDGE_ERR_BACKEND = (
    -2,
    -3,
    -4,
    -5,
)  # llama-edge.h


class Counters(ctypes.Structure):
    """A C struct of uint64 counters; a subclass lists their names in the C order."""

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name, _ in self._fields_}


def uint64_fields(*names: str) -> list[tuple[str, type]]:
    return [(name, ctypes.c_uint64) for name in names]


class CacheStats(Counters):
    # struct llama_edge_cache_stats
    _fields_ = uint64_fields(
        "uploads",
        "forced_uploads",
        "upload_bytes",
        "cached_layer_runs",
        "bypassed_layer_graphs",
        "bank_bytes",
        "pinned_bytes",
        "quiet_ubatches",
    )


class MissStats(Counters):
    # struct llama_edge_miss_stats (patch 4)
    _fields_ = uint64_fields(
        "cpu_experts", "cpu_rows", "cpu_bytes", "cpu_timed_experts", "cpu_ns", "upload_ns"
    )


class LayerStats(Counters):
    # struct llama_edge_layer_stats (patch 5)
    _fields_ = uint64_fields(
        "runs",
        "tokens",
        "hits",
        "prefetch_hits",
        "late",
        "misses",
        "cpu",
        "prefetch_uploads",
        "prefetch_wasted",
        "prefetch_refused",
        "stall_ns",
    )


class PredictionStats(Counters):
    # struct llama_edge_prediction_stats (patch 11)
    _fields_ = uint64_fields("predictions", "stale")


class EngineStats(Counters):
    # struct llama_edge_engine_stats (patch 13)
    _fields_ = uint64_fields(
        "ubatches",
        "host_syncs",
        "eval_splits",
        "callbacks",
        "native_predictions",
        "native_predict_ns",
        "stale_predictions",
        "sync_upload_ns",
        "async_uploads",
    )


def bind_cache_functions(api: NativeApi) -> None:
    lib = api.lib
    # int32_t llama_edge_cache_enable(struct llama_context * ctx, const int32_t * layers, int32_t n_layers,
    #                                 int32_t n_slots, int32_t max_batch_tokens);
    lib.llama_edge_cache_enable.restype = ctypes.c_int32
    lib.llama_edge_cache_enable.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    # int32_t llama_edge_cache_upload(struct llama_context * ctx, int32_t il, int32_t expert, int32_t slot);
    lib.llama_edge_cache_upload.restype = ctypes.c_int32
    lib.llama_edge_cache_upload.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    # int32_t llama_edge_cache_slot_expert(const struct llama_context * ctx, int32_t il, int32_t slot);
    lib.llama_edge_cache_slot_expert.restype = ctypes.c_int32
    lib.llama_edge_cache_slot_expert.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    # int32_t llama_edge_cache_get_stats(const struct llama_context * ctx,
    #                                    struct llama_edge_cache_stats * out);
    lib.llama_edge_cache_get_stats.restype = ctypes.c_int32
    lib.llama_edge_cache_get_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(CacheStats)]
    # int32_t llama_edge_cache_set_miss_cpu(struct llama_context * ctx, bool enabled);
    lib.llama_edge_cache_set_miss_cpu.restype = ctypes.c_int32
    lib.llama_edge_cache_set_miss_cpu.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    # int32_t llama_edge_cache_get_miss_stats(const struct llama_context * ctx,
    #                                         struct llama_edge_miss_stats * out);
    lib.llama_edge_cache_get_miss_stats.restype = ctypes.c_int32
    lib.llama_edge_cache_get_miss_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(MissStats)]
    # int32_t llama_edge_cache_set_eviction(struct llama_context * ctx, int32_t policy);
    lib.llama_edge_cache_set_eviction.restype = ctypes.c_int32
    lib.llama_edge_cache_set_eviction.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    # int32_t llama_edge_cache_set_bus_rate(struct llama_context * ctx, double bytes_per_s);
    lib.llama_edge_cache_set_bus_rate.restype = ctypes.c_int32
    lib.llama_edge_cache_set_bus_rate.argtypes = [ctypes.c_void_p, ctypes.c_double]
    # int32_t llama_edge_cache_prefetch(struct llama_context * ctx, int32_t il, const int32_t * experts,
    #                                   int32_t n_experts, int32_t max_uploads, bool on_miss);
    lib.llama_edge_cache_prefetch.restype = ctypes.c_int32
    lib.llama_edge_cache_prefetch.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_bool,
    ]
    # int32_t llama_edge_cache_get_layer_stats(const struct llama_context * ctx, int32_t il,
    #                                          struct llama_edge_layer_stats * out);
    lib.llama_edge_cache_get_layer_stats.restype = ctypes.c_int32
    lib.llama_edge_cache_get_layer_stats.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(LayerStats),
    ]
    # int64_t llama_edge_cache_ubatch(const struct llama_context * ctx);
    lib.llama_edge_cache_ubatch.restype = ctypes.c_int64
    lib.llama_edge_cache_ubatch.argtypes = [ctypes.c_void_p]
    # int32_t llama_edge_cache_predict(struct llama_context * ctx, int32_t il, int64_t ubatch,
    #                                  const int32_t * experts, int32_t n_experts, int32_t max_uploads);
    lib.llama_edge_cache_predict.restype = ctypes.c_int32
    lib.llama_edge_cache_predict.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    # int32_t llama_edge_cache_get_prediction_stats(const struct llama_context * ctx, int32_t il,
    #                                               struct llama_edge_prediction_stats * out);
    lib.llama_edge_cache_get_prediction_stats.restype = ctypes.c_int32
    lib.llama_edge_cache_get_prediction_stats.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(PredictionStats),
    ]
    # int32_t llama_edge_cache_set_oracle(struct llama_context * ctx, int32_t il, const int32_t * ids,
    #                                     const int32_t * n_rows, int32_t n_runs, int32_t k);
    lib.llama_edge_cache_set_oracle.restype = ctypes.c_int32
    lib.llama_edge_cache_set_oracle.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    floats = ctypes.POINTER(ctypes.c_float)
    # int32_t llama_edge_predictor_set(struct llama_context * ctx, int32_t il, int32_t n_embd,
    #     int32_t n_hidden, int32_t n_expert, int32_t activation, const float * w1, const float * b1,
    #     const float * w2, const float * b2, int32_t n_candidates, float temperature, float target);
    lib.llama_edge_predictor_set.restype = ctypes.c_int32
    lib.llama_edge_predictor_set.argtypes = [
        ctypes.c_void_p,
        *[ctypes.c_int32] * 5,
        *[floats] * 4,
        ctypes.c_int32,
        ctypes.c_float,
        ctypes.c_float,
    ]
    # int32_t llama_edge_get_engine_stats(const struct llama_context * ctx,
    #                                     struct llama_edge_engine_stats * out);
    lib.llama_edge_get_engine_stats.restype = ctypes.c_int32
    lib.llama_edge_get_engine_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(EngineStats)]
    # int32_t llama_edge_predictor_set_threads(struct llama_context * ctx, int32_t n_threads);
    lib.llama_edge_predictor_set_threads.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_threads.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    # int32_t llama_edge_cache_set_copy_queue(struct llama_context * ctx, bool enabled);
    lib.llama_edge_cache_set_copy_queue.restype = ctypes.c_int32
    lib.llama_edge_cache_set_copy_queue.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    # int32_t llama_edge_cache_set_token_residency(struct llama_context * ctx, bool enabled);
    lib.llama_edge_cache_set_token_residency.restype = ctypes.c_int32
    lib.llama_edge_cache_set_token_residency.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    # int32_t llama_edge_cache_set_host_side_mapped(struct llama_context * ctx, bool enabled);
    lib.llama_edge_cache_set_host_side_mapped.restype = ctypes.c_int32
    lib.llama_edge_cache_set_host_side_mapped.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    # int32_t llama_edge_predictor_set_lookahead(struct llama_context * ctx, int32_t depth);
    lib.llama_edge_predictor_set_lookahead.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_lookahead.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    # int32_t llama_edge_predictor_set_prior(struct llama_context * ctx, int32_t il, const float * prior_w,
    #                                        int32_t n_expert, int32_t n_embd);
    lib.llama_edge_predictor_set_prior.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_prior.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        floats,
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    # int32_t llama_edge_predictor_set_history(struct llama_context * ctx, int32_t il, const float * w_layer,
    #     int32_t prev_layer, const float * w_token, int32_t n_hidden, int32_t n_expert, const float * w_x,
    #     int32_t n_embd, const float * w_router);
    lib.llama_edge_predictor_set_history.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_history.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        floats,
        ctypes.c_int32,
        floats,
        ctypes.c_int32,
        ctypes.c_int32,
        floats,
        ctypes.c_int32,
        floats,
    ]
    # int32_t llama_edge_predictor_set_in_graph(struct llama_context * ctx, bool enabled);
    lib.llama_edge_predictor_set_in_graph.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_in_graph.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    # int32_t llama_edge_predictor_set_source(struct llama_context * ctx, int32_t il, int32_t source);
    lib.llama_edge_predictor_set_source.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_source.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    # int32_t llama_edge_predictor_set_fp16(struct llama_context * ctx, bool enabled);
    lib.llama_edge_predictor_set_fp16.restype = ctypes.c_int32
    lib.llama_edge_predictor_set_fp16.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    # int32_t llama_edge_predictor_get_last(const struct llama_context * ctx, int32_t il, float * input,
    #     int32_t n_input, float * scores, int32_t n_scores);
    lib.llama_edge_predictor_get_last.restype = ctypes.c_int32
    lib.llama_edge_predictor_get_last.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        floats,
        ctypes.c_int32,
        floats,
        ctypes.c_int32,
    ]
