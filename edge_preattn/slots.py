"""The patch's expert slot bank on one llama_context: enable, upload, ask what a slot holds.

The C side guarantees the invariant (every selected expert resident before a cached layer's expert
matmuls; a missing one is uploaded there and counted as forced, or, with misses on the CPU, computed
by the CPU from the host copy), so a wrong decision here costs time, never output.
"""

import ctypes
import logging
import os
from collections.abc import Callable
from typing import TypeVar

from .errors import UserError
from .native import NativeApi

log = logging.getLogger(__name__)
T = TypeVar("T")

LLAMA_EDGE_ERR_PLACEMENT, LLAMA_EDGE_ERR_ALLOC, LLAMA_EDGE_ERR_BACKEND = -3, -4, -5  # llama-edge.h


class CacheStats(ctypes.Structure):
    # struct llama_edge_cache_stats
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "uploads",
            "forced_uploads",
            "upload_bytes",
            "cached_layer_runs",
            "bypassed_layer_runs",
            "bank_bytes",
            "pinned_bytes",
        )
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name, _ in self._fields_}


class MissStats(ctypes.Structure):
    # struct llama_edge_miss_stats (patch 4)
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cpu_experts", "cpu_rows", "cpu_bytes", "cpu_timed_experts", "cpu_ns", "upload_ns")
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name, _ in self._fields_}


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
    if api.patch_version() >= 4:
        # int32_t llama_edge_cache_set_miss_cpu(struct llama_context * ctx, bool enabled);
        lib.llama_edge_cache_set_miss_cpu.restype = ctypes.c_int32
        lib.llama_edge_cache_set_miss_cpu.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        # int32_t llama_edge_cache_get_miss_stats(const struct llama_context * ctx,
        #                                         struct llama_edge_miss_stats * out);
        lib.llama_edge_cache_get_miss_stats.restype = ctypes.c_int32
        lib.llama_edge_cache_get_miss_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(MissStats)]


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
        if api.patch_version() < 3:
            raise UserError(
                "this llama.cpp build has no expert slot cache (patch < 3): run `edge-preattn build`"
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
        status = self.api.lib.llama_edge_cache_upload(self.ctx, il, expert, slot)
        if status != 0:
            raise ValueError(f"upload of expert {expert} to layer {il} slot {slot} refused (status {status})")

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

    def set_miss_cpu(self, enabled: bool) -> None:
        """Selected experts that are not resident are computed by the CPU from the host copy."""
        if self.api.patch_version() < 4:
            raise UserError(
                "this llama.cpp build cannot compute misses on the CPU (patch < 4): run `edge-preattn build`"
            )
        status = self.api.lib.llama_edge_cache_set_miss_cpu(self.ctx, enabled)
        if status == LLAMA_EDGE_ERR_BACKEND:
            raise UserError(
                "--miss cpu needs the cached layers on a CPU or CUDA device (other ggml backends cannot "
                "skip experts in mul_mat_id); use --miss upload"
            )
        if status != 0:
            raise UserError(f"cannot switch CPU compute of misses (status {status})")

    def miss_stats(self) -> MissStats:
        """Counters of CPU-computed experts and the times the controller's cost model reads."""
        out = MissStats()
        if self.api.patch_version() >= 4:
            self.api.lib.llama_edge_cache_get_miss_stats(self.ctx, ctypes.byref(out))
        return out
