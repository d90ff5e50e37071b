"""The patch's expert slot bank on one llama_context: enable, prefetch, per-layer counters.

The C side guarantees the invariant (every selected expert resident before a cached layer's expert
matmuls; a missing one is uploaded there into the eviction policy's victim, or, with misses on the
CPU, computed by the CPU from the host copy), so a wrong decision here costs time, never output.
"""

import ctypes
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ..errors import UserError
from ..model.native import NativeApi
from ..predictors.predictor_weights import ACTIVATIONS, MlpWeights
from .cache_api import (
    LLAMA_EDGE_ERR_ALLOC,
    LLAMA_EDGE_ERR_BACKEND,
    LLAMA_EDGE_ERR_PLACEMENT,
    LLAMA_EDGE_ERR_STATE,
    CacheStats,
    EngineStats,
    LayerStats,
    MissStats,
    PredictionStats,
    bind_cache_functions,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def _ok(status: int, refused: str) -> None:
    """A library call's status: 0, or a ValueError saying what it refused (a caller's bug, not a user's)."""
    if status != 0:
        raise ValueError(f"{refused} (status {status})")


class SlotAllocationError(UserError):
    """The device could not allocate the slot banks (out of memory); fewer slots may still fit."""


def shrink_until_allocated(
    open_cache: Callable[[int], T], n_slots: int, min_slots: int
) -> tuple[T | None, int]:
    """`open_cache(n)` for n = n_slots, then fewer (halving the excess over min_slots, down to
    min_slots = the router's k) while the device runs out of memory; (None, 0) when even k fails,
    and the caller runs with stock placement. One warning says what was given up."""
    tried = n_slots
    while True:
        try:
            opened = open_cache(tried)
        except SlotAllocationError:
            if tried <= min_slots:
                log.warning(
                    "the device could not allocate even %d expert slots per layer (the router's k): "
                    "running with stock placement (mode off) instead",
                    min_slots,
                )
                return None, 0
            tried = min_slots + (tried - min_slots) // 2
            continue
        if tried < n_slots:
            log.warning(
                "the device could not allocate %d expert slots per layer: running with %d", n_slots, tried
            )
        return opened, tried


class SlotBank:
    """Slot banks of `layers` with `n_slots` experts each, on the context's devices."""

    def __init__(
        self, api: NativeApi, ctx, layers: tuple[int, ...], n_slots: int, max_batch_tokens: int = 32
    ):
        if api.patch_version() < 17:
            raise UserError(
                "this llama.cpp build predates history inputs in predictors (patch < 17): "
                "run `edge-preattn build`"
            )
        bind_cache_functions(api)
        self.api, self.ctx = api, ctx
        self.layers, self.n_slots, self.max_batch_tokens = tuple(layers), n_slots, max_batch_tokens
        # lets ggml-cuda page-lock the mmap'd experts (read only) for uploads at pinned bandwidth
        os.environ.setdefault("GGML_CUDA_REGISTER_HOST", "1")
        array = (ctypes.c_int32 * len(self.layers))(*self.layers)
        status = api.lib.llama_edge_cache_enable(ctx, array, len(self.layers), n_slots, max_batch_tokens)
        if status == LLAMA_EDGE_ERR_PLACEMENT:
            raise UserError(
                "the cached layers' experts are not in plain host memory: load them on the CPU "
                "without repacking (edge-preattn does this itself; check your -ot overrides)"
            )
        if status == LLAMA_EDGE_ERR_ALLOC:
            raise SlotAllocationError(
                f"the device could not allocate {n_slots} expert slots for {len(self.layers)} layers: "
                "lower --slots or --vram-budget"
            )
        if status != 0:
            raise UserError(
                f"cannot enable the expert cache (status {status}): --slots must be between the "
                "model's experts per token and its experts per layer"
            )

    def upload(self, il: int, expert: int, slot: int) -> None:
        _ok(
            self.api.lib.llama_edge_cache_upload(self.ctx, il, expert, slot),
            f"upload of expert {expert} to layer {il} slot {slot} refused",
        )

    def prefetch(self, il: int, experts: list[int], max_uploads: int, on_miss: bool = False) -> int:
        """Upload up to `max_uploads` of `experts` that are not resident (victims by the eviction
        policy, never one of `experts`); a prefetch stops once the layer has been routed. How many."""
        array = (ctypes.c_int32 * len(experts))(*experts)
        uploaded = self.api.lib.llama_edge_cache_prefetch(
            self.ctx, il, array, len(experts), max_uploads, on_miss
        )
        if uploaded < 0:
            raise ValueError(f"prefetch of experts {experts} into layer {il} refused (status {uploaded})")
        return uploaded

    def ubatch(self) -> int:
        """The serial of the ubatch being computed: a prediction made now is for this one."""
        return int(self.api.lib.llama_edge_cache_ubatch(self.ctx))

    def predict(self, il: int, ubatch: int, experts: list[int], max_uploads: int) -> int:
        """Layer il's predicted experts for `ubatch`: pending (no prefetch evicts them) until the layer's
        routing there, and up to `max_uploads` uploaded; dropped whole once that routing has happened
        or the ubatch is past (counted as stale). How many were uploaded."""
        array = (ctypes.c_int32 * len(experts))(*experts)
        uploaded = self.api.lib.llama_edge_cache_predict(
            self.ctx, il, ubatch, array, len(experts), max_uploads
        )
        if uploaded < 0:
            raise ValueError(f"prediction {experts} for layer {il} refused (status {uploaded})")
        return uploaded

    def set_oracle(self, il: int, runs: list[np.ndarray]) -> None:
        """The true routing of layer il in each of its coming runs ([n_tokens, k] ids each): the layer
        then evicts by Belady and prefetches each run's experts itself, at its pre-attention."""
        k = runs[0].shape[1] if runs else 1
        ids = np.ascontiguousarray(np.concatenate(runs) if runs else np.zeros((0, k)), np.int32)
        n_rows = np.array([len(run) for run in runs], np.int32)
        _ok(
            self.api.lib.llama_edge_cache_set_oracle(
                self.ctx,
                il,
                ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                n_rows.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                len(runs),
                k,
            ),
            f"the oracle's routing of layer {il} was refused",
        )

    def set_predictor(
        self, il: int, mlp: MlpWeights, n_candidates: int, temperature: float = 1.0, target: float = 0.0
    ) -> None:
        """Layer il predicts its experts in the library, at its pre-attention output, and prefetches
        the `n_candidates` best per token (with `target` > 0: adaptive, as `calibration.prefetch_counts`)."""

        def pointer(array: np.ndarray):
            return array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

        n_hidden, n_expert = mlp.w1.shape[0], mlp.w2.shape[0]
        # W1's columns that read x; those of the history inputs go to set_predictor_history
        n_embd = mlp.n_embd
        w1 = np.ascontiguousarray(mlp.w1[:, :n_embd])
        _ok(
            self.api.lib.llama_edge_predictor_set(
                self.ctx,
                il,
                n_embd,
                n_hidden,
                n_expert,
                ACTIVATIONS[mlp.activation],
                pointer(w1),
                pointer(mlp.b1),
                pointer(mlp.w2),
                pointer(mlp.b2),
                n_candidates,
                temperature,
                target,
            ),
            f"the library refused layer {il}'s predictor",
        )

    def set_predictor_prior(self, il: int, prior_w: np.ndarray | None) -> None:
        """Layer il's predictor (set first) adds prior_w [n_expert, n_embd] · x to its scores, on the raw
        activation: the router prior of a residual predictor, its scale folded in (None removes it)."""
        if prior_w is None:
            status = self.api.lib.llama_edge_predictor_set_prior(self.ctx, il, None, 0, 0)
        else:
            prior_w = np.ascontiguousarray(prior_w, np.float32)
            pointer = prior_w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = self.api.lib.llama_edge_predictor_set_prior(self.ctx, il, pointer, *prior_w.shape)
        _ok(status, f"the library refused layer {il}'s router prior")

    def set_predictor_history(self, il: int, mlp: MlpWeights, prev_layer: int) -> None:
        """Layer il's predictor (set first, with its prior) also reads the history inputs of its graph,
        which the library feeds: this token's router probabilities at `prev_layer` (-1: zeros, the first
        MoE layer) and the previous token's at il (patch 17), and the previous token's pre-attention state
        at il (prev-x, patch 22), and the previous token's router input at il (prev-router, patch 26, in the
        model's graph only)."""
        columns = {f: mlp.history_columns(f) for f in mlp.history}  # [n_hidden, n_expert or n_embd] each

        def pointer(feature: str):
            found = columns.get(feature)
            return None if found is None else found.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

        n_hidden, n_expert = mlp.w1.shape[0], mlp.w2.shape[0]
        _ok(
            self.api.lib.llama_edge_predictor_set_history(
                self.ctx,
                il,
                pointer("prev-layer"),
                prev_layer,
                pointer("prev-token"),
                n_hidden,
                n_expert,
                pointer("prev-x"),
                mlp.n_embd,
                pointer("prev-router"),
            ),
            f"the library refused layer {il}'s history inputs",
        )

    def last_prediction(self, il: int, n_input: int, n_expert: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The last row layer il's predictor evaluated in the library: (its input [n_input]: x, then the
        history inputs it read; its scores [n_expert]), or None before its first prediction."""
        row, scores = np.zeros(n_input, np.float32), np.zeros(n_expert, np.float32)
        floats = ctypes.POINTER(ctypes.c_float)
        status = self.api.lib.llama_edge_predictor_get_last(
            self.ctx, il, row.ctypes.data_as(floats), n_input, scores.ctypes.data_as(floats), n_expert
        )
        if status == LLAMA_EDGE_ERR_STATE:
            return None
        if status != 0:
            raise ValueError(f"layer {il}'s last prediction has other sizes (status {status})")
        return row, scores

    def set_predictor_threads(self, n_threads: int) -> None:
        """Predictors set from now on run as ggml graphs on a CPU backend with a pool of `n_threads`
        threads (0: the plain loop on the decode thread)."""
        _ok(
            self.api.lib.llama_edge_predictor_set_threads(self.ctx, n_threads),
            f"cannot evaluate predictors with {n_threads} threads",
        )

    def set_predictor_in_graph(self, enabled: bool) -> None:
        """Predictors set from now on are nodes of the model's graph on the cached layers' device (patch 23):
        on a GPU the device itself decides and copies each prediction's prefetch, no host synchronization
        per layer; on the CPU their top-k is read at its node and uploaded as a native prediction."""
        _ok(
            self.api.lib.llama_edge_predictor_set_in_graph(self.ctx, enabled),
            "cannot place predictors in the model's graph once predictors are set",
        )

    def set_predictor_fp16(self, enabled: bool) -> None:
        """Graph predictors set from now on hold their matrices in float16 (patch 25): half the bytes in the
        device memory the expert slots share."""
        _ok(
            self.api.lib.llama_edge_predictor_set_fp16(self.ctx, enabled),
            "cannot change the predictors' weight type once predictors are set",
        )

    def set_predictor_source(self, il: int, source: int) -> None:
        """Layer il's predictor reads cached layer `source`'s pre-attention output (patch 24, a predictor
        trained with `train --lead`): its prediction and uploads start at that layer's attention."""
        _ok(
            self.api.lib.llama_edge_predictor_set_source(self.ctx, il, source),
            f"cannot make layer {il}'s predictor read layer {source}'s activation",
        )

    def set_lookahead(self, depth: int) -> None:
        """A layer's pre-attention output also feeds the predictors of the next `depth` cached layers."""
        _ok(
            self.api.lib.llama_edge_predictor_set_lookahead(self.ctx, depth),
            f"cannot set a lookahead of {depth}",
        )

    def set_eviction(self, policy: int) -> None:
        """LLAMA_EDGE_EVICT_LRU (0) or _LFU (1): the victims of misses and prefetches."""
        _ok(
            self.api.lib.llama_edge_cache_set_eviction(self.ctx, policy),
            f"cannot set eviction policy {policy}",
        )

    def set_bus_rate(self, bytes_per_s: float | None) -> None:
        """Every upload, prefetch or miss, then takes bytes / rate on one modelled bus (None: the
        machine's own link), so a fast machine measures what a slow one would."""
        _ok(
            self.api.lib.llama_edge_cache_set_bus_rate(self.ctx, bytes_per_s or 0.0),
            f"cannot set a bus rate of {bytes_per_s} bytes/s",
        )

    def layer_stats(self, il: int) -> dict[str, int]:
        out = LayerStats()
        _ok(
            self.api.lib.llama_edge_cache_get_layer_stats(self.ctx, il, ctypes.byref(out)),
            f"no statistics for layer {il}",
        )
        return out.as_dict()

    def prediction_stats(self, il: int) -> dict[str, int]:
        """Predictions of layer il taken, and those dropped whole as stale."""
        out = PredictionStats()
        _ok(
            self.api.lib.llama_edge_cache_get_prediction_stats(self.ctx, il, ctypes.byref(out)),
            f"no prediction statistics for layer {il}",
        )
        return out.as_dict()

    def slot_expert(self, il: int, slot: int) -> int:
        """The expert a slot holds (-1: empty)."""
        value = self.api.lib.llama_edge_cache_slot_expert(self.ctx, il, slot)
        if value < -1:
            raise ValueError(f"layer {il} slot {slot}: status {value}")
        return value

    def stats(self) -> dict[str, int]:
        out = CacheStats()
        self.api.lib.llama_edge_cache_get_stats(self.ctx, ctypes.byref(out))
        return out.as_dict()

    def set_copy_queue(self, enabled: bool) -> bool:
        """Prefetch uploads on a second stream of the device, each slot with an event the routing's
        compute stream waits for (the host does not). False where the device has no asynchronous
        copies or events (the CPU): uploads stay synchronous."""
        status = self.api.lib.llama_edge_cache_set_copy_queue(self.ctx, enabled)
        if status == LLAMA_EDGE_ERR_BACKEND:
            return False
        if status != 0:
            raise UserError(
                f"cannot start the copy queue (status {status}): the device could not make its stream "
                "or events; run without --copy-queue"
            )
        return True

    def engine_stats(self) -> dict[str, int]:
        """What the decode thread spent on the library: host synchronizations, callbacks, predictions."""
        out = EngineStats()
        self.api.lib.llama_edge_get_engine_stats(self.ctx, ctypes.byref(out))
        return out.as_dict()

    def set_miss_cpu(self, enabled: bool) -> None:
        """Selected experts that are not resident are computed by the CPU from the host copy."""
        status = self.api.lib.llama_edge_cache_set_miss_cpu(self.ctx, enabled)
        if status == LLAMA_EDGE_ERR_BACKEND:
            raise UserError(
                "--miss cpu needs the cached layers on a CPU or CUDA device (other ggml backends cannot "
                "skip experts in mul_mat_id); use --miss upload"
            )
        if status != 0:
            raise UserError(f"cannot switch CPU compute of misses (status {status})")

    def set_token_residency(self, enabled: bool) -> None:
        """Residency decided between ubatches: no routing observed, the graph logs it on the device and
        the library reads the log once per ubatch (needs the host side: `set_miss_cpu(True)` first)."""
        status = self.api.lib.llama_edge_cache_set_token_residency(self.ctx, enabled)
        if status == LLAMA_EDGE_ERR_PLACEMENT:
            raise UserError(
                "--residency token needs every cached layer on one device; use --residency routing"
            )
        if status != 0:
            raise UserError(f"cannot switch the residency rule (status {status})")

    def set_host_side_mapped(self, enabled: bool) -> bool:
        """The host side's experts computed by the GPU from page-locked host memory, read in place over
        the bus, instead of by the CPU. False where the device cannot (the CPU, or an unpinned host copy)."""
        status = self.api.lib.llama_edge_cache_set_host_side_mapped(self.ctx, enabled)
        if status in (LLAMA_EDGE_ERR_BACKEND, LLAMA_EDGE_ERR_PLACEMENT):
            return False
        if status != 0:
            raise UserError(f"cannot place the host side on the device (status {status})")
        return True

    def miss_stats(self) -> MissStats:
        """Counters of CPU-computed experts and the times the controller's cost model reads."""
        out = MissStats()
        self.api.lib.llama_edge_cache_get_miss_stats(self.ctx, ctypes.byref(out))
        return out
