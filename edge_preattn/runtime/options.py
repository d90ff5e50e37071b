"""What one expert cache is asked to do (`CacheOptions`), checked once when it is made.

The options travel as one frozen object from whoever chose them (`run`'s flags, a benchmark's
configuration, a test) to the controller, so no layer in between re-checks or drops one. What the model
fixes (k, experts per layer, bytes per expert) is not here: `CacheRuntime.for_layout` reads it from the
layout. Checks that need the predictors' own files or the device (can the library evaluate these
predictors, which history inputs do they read) stay with the controller, which has them.
"""

import dataclasses

import numpy as np

from .cache import EVICTION_POLICIES

MODES = ("off", "lru", "top1", "exact", "overprov", "adaptive", "oracle")
PREDICTION_MODES = ("top1", "exact", "overprov", "adaptive")
MISS_POLICIES = ("upload", "cpu", "auto")
# when residency is decided: at each cached layer's routing (a graph split and a host synchronization per
# layer), or between tokens from a routing log the graph writes on the device (patch 18)
RESIDENCIES = ("routing", "token")
PREDICTOR_ENGINES = ("native", "onnxruntime")  # who evaluates pre-attention predictors
# where the library's predictors run: on the host (a loop or a CPU graph, the decode thread waiting at each
# layer's pre-attention output), or as nodes of the model's graph on the cached layers' device (patch 23)
PREDICTOR_DEVICES = ("cpu", "gpu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheOptions:
    """One expert cache's run options; `mode` and `n_slots` have no default, every other field is what
    `edge-preattn run` uses without its flag. Mode "off" (stock placement) has no cache, so no options."""

    mode: str  # one of MODES but "off"
    n_slots: int  # expert slots per cached layer (the slot bank refuses fewer than k or more than E)
    max_batch_tokens: int = 32  # larger ubatches (prefill) take the stock path (--bypass-tokens)
    predictors: object | None = None  # a predictor set, or anything with `scores(il, x)`
    extra: int = 0  # overprov: experts beyond k to prefetch
    target: float = 0.95  # adaptive: the expected recall each token's prefetch aims at
    bandwidth_bytes_per_s: float | None = None  # a modelled bus for every upload; None: the real one
    eviction: str = "lru"  # a key of EVICTION_POLICIES
    oracle: dict[tuple[int, int], np.ndarray] | None = None  # mode oracle: the recorded routing
    miss: str = "upload"  # one of MISS_POLICIES
    wait_for_prefetch: bool = False  # the router waits for each layer's prediction and prefetch
    lookahead: int = 0  # prediction modes: also predict the next N cached layers at each pre-attention
    late_fallback: bool = True  # prediction switches off when its uploads keep arriving too late
    predictor_engine: str = "native"  # one of PREDICTOR_ENGINES
    predictor_threads: int = 0  # the library's predictors as ggml graphs with N CPU threads; 0: a loop
    predictor_device: str = "cpu"  # one of PREDICTOR_DEVICES
    predictor_fp16: bool = False  # graph predictors' matrices in float16 (patch 25)
    copy_queue: bool = False  # prefetches on a second device stream, where the device has events
    residency: str = "routing"  # one of RESIDENCIES

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.mode == "off":
            raise ValueError(f"controller mode must be one of {MODES[1:]}")
        if self.miss not in MISS_POLICIES:
            raise ValueError(f"miss must be one of {MISS_POLICIES}")
        if self.mode in PREDICTION_MODES and self.predictors is None:
            raise ValueError(f"mode {self.mode} needs predictors")
        if self.mode == "oracle" and self.oracle is None:
            raise ValueError("mode oracle needs a recorded routing")
        if self.residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {RESIDENCIES}")
        if self.residency == "token" and self.miss != "cpu":
            raise ValueError("residency token computes misses by the host side: miss must be cpu")
        if self.predictor_engine not in PREDICTOR_ENGINES:
            raise ValueError(f"predictor_engine must be one of {PREDICTOR_ENGINES}")
        if self.predictor_device not in PREDICTOR_DEVICES:
            raise ValueError(f"predictor_device must be one of {PREDICTOR_DEVICES}")
        if self.predictor_device == "gpu" and (
            self.residency != "token"
            or self.predictor_engine != "native"
            or self.mode == "adaptive"
            or self.lookahead
        ):
            raise ValueError(
                "predictor_device gpu needs residency token, the native predictor engine, a fixed number of "
                "candidates (not adaptive) and no lookahead"
            )
        as_graph = self.predictor_device == "gpu" or self.predictor_threads > 0
        if self.predictor_fp16 and (self.predictor_engine != "native" or not as_graph):
            raise ValueError("predictor_fp16 needs the native predictors as graphs (device gpu, threads > 0)")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {tuple(EVICTION_POLICIES)}")
        if self.lookahead and self.mode not in PREDICTION_MODES:
            raise ValueError(f"lookahead needs a prediction mode ({PREDICTION_MODES}), not {self.mode}")
