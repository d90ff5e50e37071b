"""One engine's expert cache assembled: slot bank + controller + hooks (`CacheRuntime`), and what a
runtime can be given in place of trained predictors: the recorded routing mode `oracle` prefetches
(`record_routing`) and a ranking that knows nothing (`RandomRanking`, for tests and benchmarks).
Moved unchanged out of controller.py, which keeps the decisions."""

import numpy as np

from ..model.layout import MoeLayout
from ..traces.hooks import Hooks, Routing
from .controller import Controller
from .options import CacheOptions
from .slots import SlotBank


class RandomRanking:
    """A predictor that knows nothing, for tests and benchmarks: the output must not depend on it."""

    def __init__(self, n_expert: int, seed: int = 0) -> None:
        self.n_expert, self.rng = n_expert, np.random.default_rng(seed)

    def scores(self, il: int, x: np.ndarray) -> np.ndarray:
        return self.rng.standard_normal((len(x), self.n_expert)).astype(np.float32)


def record_routing(engine, prompt, n_predict: int, sampling) -> dict[tuple[int, int], np.ndarray]:
    """The routing of a run, per (ubatch, layer): what mode `oracle` prefetches ahead of time."""
    recorded: dict[tuple[int, int], np.ndarray] = {}
    ubatch = [-1]

    def on_pre_attn(il: int, _x: np.ndarray) -> None:
        if il == 0:
            ubatch[0] += 1

    def on_routing(routing: Routing) -> None:
        recorded[(ubatch[0], routing.layer)] = routing.ids.copy()

    with Hooks(engine.api, engine.ctx, on_pre_attn, on_routing):
        for _ in engine.generate(prompt, n_predict, sampling):
            pass
    return recorded


class CacheRuntime:
    """Slot bank + controller + hooks on one engine whose cached layers' experts are in host memory."""

    def __init__(
        self,
        engine,
        layers: tuple[int, ...],
        options: CacheOptions,
        *,
        k: int,
        n_expert: int,
        bytes_per_expert: int,
    ) -> None:
        self.bank = SlotBank(engine.api, engine.ctx, layers, options.n_slots, options.max_batch_tokens)
        self.controller = Controller(
            self.bank, options, k=k, n_expert=n_expert, bytes_per_expert=bytes_per_expert
        )
        if self.controller.miss != "upload":
            self.bank.set_miss_cpu(True)
        # where the host side runs: on a GPU that reads page-locked host memory in place, the GPU (no
        # split between the GPU and the CPU per layer); else the CPU
        self.host_side_mapped = False
        if self.controller.residency == "token":
            self.host_side_mapped = self.bank.set_host_side_mapped(True)
            self.bank.set_token_residency(True)
        # each observed node costs a graph split and a device synchronize: observe only what is used
        # (the router input comes at the routing's own split)
        cross_layer = self.controller.cross_layer
        on_pre_attn = self.controller.on_pre_attn if self.controller.needs_pre_attn_hook else None
        on_routing = self.controller.on_routing if self.controller.needs_routing_hook else None
        on_router_input = self.controller.on_router_input if cross_layer else None
        self.hooks = (
            Hooks(
                engine.api, engine.ctx, on_pre_attn, on_routing, detail=False, on_router_input=on_router_input
            )
            if on_pre_attn or on_routing or on_router_input
            else None
        )
        if self.hooks is not None:
            self.controller.drop_prediction_input = self.hooks.drop_prediction_input

    @classmethod
    def for_layout(cls, engine, layout: MoeLayout, options: CacheOptions) -> "CacheRuntime":
        """Every MoE layer of the model cached, sized from its layout."""
        return cls(
            engine,
            tuple(layer.index for layer in layout.moe_layers),
            options,
            k=layout.n_expert_used,
            n_expert=layout.n_expert,
            bytes_per_expert=max(layer.bytes_per_expert for layer in layout.moe_layers),
        )

    def engine_counters(self) -> dict:
        """The decode thread's costs, per ubatch (a decode step's ubatch is one token; the prompt's
        ubatches count too): host synchronizations the library caused, Python callbacks, predictions
        made natively, stale predictions dropped, and the copy engine's busy time where the host sees it
        (synchronous uploads; uploads queued on a device stream are counted, not timed)."""
        engine = self.bank.engine_stats()
        ubatches = max(1, engine["ubatches"])
        return {
            "ubatches": engine["ubatches"],
            "host_syncs_per_token": round(engine["host_syncs"] / ubatches, 3),
            "eval_splits_per_token": round(engine["eval_splits"] / ubatches, 3),
            "python_callbacks_per_token": round(engine["callbacks"] / ubatches, 3),
            "native_predictions_per_token": round(engine["native_predictions"] / ubatches, 3),
            "native_predictor_ms_per_token": round(engine["native_predict_ns"] * 1e-6 / ubatches, 4),
            "stale_predictions": engine["stale_predictions"],
            "copy_busy_ms_per_token": round(engine["sync_upload_ns"] * 1e-6 / ubatches, 4),
            "async_uploads": engine["async_uploads"],
        }

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
        self.controller.close()

    def __enter__(self) -> "CacheRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
