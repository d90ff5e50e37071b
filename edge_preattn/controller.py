"""The runtime: hooks → predictor → cache policy → uploads, with per-token statistics.

On a cached layer's pre-attention hook the activation goes to a predictor thread (onnxruntime
releases the GIL) and the hook returns at once, so attention runs while the predicted experts are
uploaded. On the routing hook each selected expert is a hit (resident), late (its prefetch was
still running: we wait) or a miss. A miss is uploaded now, synchronously (`miss="upload"`, the
paper's behaviour), or left to the CPU, which computes it from the host copy while the GPU computes
the resident experts (`"cpu"`), or either, by a cost model of measured upload and CPU times
(`"auto"`). The C side re-checks residency before the expert matmuls and sends every selected
expert to exactly one side, so no decision here can change the output.
"""

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .cache import LayerSlots, UploadBudget
from .calibration import prefetch_counts
from .hooks import Hooks, Routing
from .layout import MoeLayout
from .slots import SlotBank

log = logging.getLogger(__name__)

MODES = ("off", "lru", "top1", "exact", "overprov", "adaptive", "oracle")
PREDICTION_MODES = ("top1", "exact", "overprov", "adaptive")
MISS_POLICIES = ("upload", "cpu", "auto")


@dataclass
class LayerCounters:
    tokens: int = 0  # tokens whose experts this layer read from the bank
    hits: int = 0
    late: int = 0
    misses: int = 0  # uploaded on the miss, synchronously
    cpu: int = 0  # missed and computed on the CPU instead
    deferred_uploads: int = 0  # lru with misses on the CPU: uploaded after the layer, for later tokens
    prefetch_issued: int = 0
    prefetch_wasted: int = 0
    prefetch_dropped: int = 0  # over the bandwidth budget
    stall_s: float = 0.0
    predictor_s: float = 0.0
    predictor_calls: int = 0


@dataclass
class RuntimeStats:
    layers: dict[int, LayerCounters] = field(default_factory=dict)
    cached_tokens: int = 0

    def totals(self) -> LayerCounters:
        total = LayerCounters()
        for counters in self.layers.values():
            for name in total.__dataclass_fields__:
                setattr(total, name, getattr(total, name) + getattr(counters, name))
        return total


class MissCostModel:
    """`--miss auto`: upload a missed expert or compute it on the CPU, whichever costs less now.

    Both costs come from the C side's clocks: seconds per uploaded byte (every upload, prefetches
    included) and seconds from the routing decision to the CPU side's output per CPU-computed expert
    (fixed costs included, so it leans towards uploading when few experts go to the CPU), each an
    exponential moving average over the run. A side not measured for `explore_every` decisions is
    tried once, so an estimate never goes stale while the other one drifts.
    """

    def __init__(self, bytes_per_expert: int, alpha: float = 0.2, explore_every: int = 64) -> None:
        self.bytes_per_expert, self.alpha, self.explore_every = bytes_per_expert, alpha, explore_every
        self.upload_s_per_byte: float | None = None
        self.cpu_s_per_expert: float | None = None
        self.seen = (0, 0, 0, 0)  # upload_ns, upload_bytes, cpu_ns, cpu_timed_experts at the last refresh
        self.since_upload = self.since_cpu = 0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def refresh(self, upload_ns: int, upload_bytes: int, cpu_ns: int, cpu_experts: int) -> None:
        """Fold in what the counters gained since the last call."""
        d_upload_ns, d_bytes, d_cpu_ns, d_experts = (
            now - before
            for now, before in zip((upload_ns, upload_bytes, cpu_ns, cpu_experts), self.seen, strict=True)
        )
        self.seen = (upload_ns, upload_bytes, cpu_ns, cpu_experts)
        if d_bytes > 0:
            self.upload_s_per_byte = self._ema(self.upload_s_per_byte, d_upload_ns * 1e-9 / d_bytes)
            self.since_upload = 0
        if d_experts > 0:
            self.cpu_s_per_expert = self._ema(self.cpu_s_per_expert, d_cpu_ns * 1e-9 / d_experts)
            self.since_cpu = 0

    def upload_is_cheaper(self) -> bool:
        self.since_upload += 1
        self.since_cpu += 1
        if self.upload_s_per_byte is None or self.since_upload > self.explore_every:
            return True
        if self.cpu_s_per_expert is None or self.since_cpu > self.explore_every:
            return False
        return self.upload_s_per_byte * self.bytes_per_expert < self.cpu_s_per_expert


class Controller:
    """Decides uploads for one engine's slot bank; `on_pre_attn`/`on_routing` are the hook handlers."""

    def __init__(
        self,
        bank: SlotBank,
        *,
        k: int,
        n_expert: int,
        bytes_per_expert: int,
        mode: str = "lru",
        predictors=None,
        extra: int = 0,
        target: float = 0.95,
        bandwidth_bytes_per_s: float | None = None,
        eviction: str = "lru",
        oracle: dict[tuple[int, int], np.ndarray] | None = None,
        miss: str = "upload",
    ) -> None:
        if mode not in MODES or mode == "off":
            raise ValueError(f"controller mode must be one of {MODES[1:]}")
        if miss not in MISS_POLICIES:
            raise ValueError(f"miss must be one of {MISS_POLICIES}")
        if mode in PREDICTION_MODES and predictors is None:
            raise ValueError(f"mode {mode} needs predictors")
        if mode == "oracle" and oracle is None:
            raise ValueError("mode oracle needs a recorded routing")
        self.bank, self.k, self.n_expert, self.bytes_per_expert, self.mode = (
            bank,
            k,
            n_expert,
            bytes_per_expert,
            mode,
        )
        self.predictors, self.oracle, self.miss = predictors, oracle, miss
        self.cost = MissCostModel(bytes_per_expert) if miss == "auto" else None
        # lru with misses on the CPU: the missed experts, uploaded once their layer is done
        self.deferred: list[tuple[int, list[int]]] = []
        self.deferring: dict[int, concurrent.futures.Future] = {}
        self.n_candidates = {
            "top1": 1,
            "exact": k,
            "overprov": k + extra,
            "oracle": k,
            "adaptive": n_expert,
        }.get(mode, 0)
        # adaptive: per token, the fewest experts whose calibrated share reaches `target` (eval --calibrate)
        self.target = target
        calibrated = (getattr(predictors, "manifest", None) or {}).get("calibration", {})
        self.temperatures = {int(il): float(entry["temperature"]) for il, entry in calibrated.items()}
        self.budget = UploadBudget(bandwidth_bytes_per_s)
        self.slots = {il: LayerSlots(bank.n_slots, eviction) for il in bank.layers}
        self.locks = {il: threading.Lock() for il in bank.layers}
        self.stats = RuntimeStats(layers={il: LayerCounters() for il in bank.layers})
        self.first_layer, self.last_layer = min(bank.layers), max(bank.layers)
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.prefetched: dict[int, set[int]] = {il: set() for il in bank.layers}
        self.disabled: set[int] = set()  # layers whose predictor failed
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.ubatch = -1

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _cached(self, il: int, n_tokens: int) -> bool:
        """The C side's rule for a ubatch reading the bank (else it took the stock path)."""
        return (
            il in self.slots
            and n_tokens <= self.bank.max_batch_tokens
            and n_tokens * self.k <= self.bank.n_slots
        )

    # -- pre-attention: start the prefetch and return -------------------------------------------------

    def on_pre_attn(self, il: int, x: np.ndarray) -> None:
        if il == 0:
            self.ubatch += 1
        if self.mode == "lru" or il in self.disabled or il not in self.slots:
            return
        if self.mode == "oracle":
            truth = self.oracle.get((self.ubatch, il))
            if truth is not None and self._cached(il, len(truth)):
                experts = list(dict.fromkeys(truth.ravel().tolist()))
                self.pending[il] = self.executor.submit(self._prefetch, il, experts)
            return
        # x: [n_tokens, n_embd]. The model's last layer runs its FFN only on the rows it outputs
        # (the last one, in plain generation), so a prefill may still reach the bank there.
        if self._cached(il, len(x)):
            rows = x
        elif il == self.last_layer and self._cached(il, 1):
            rows = x[-1:]
        else:
            return
        self.pending[il] = self.executor.submit(
            self._predict_and_prefetch, il, np.array(rows, dtype=np.float32)
        )

    def _predict_and_prefetch(self, il: int, x: np.ndarray) -> None:
        counters = self.stats.layers[il]
        started = time.perf_counter()
        scores = self.predictors.scores(il, x)  # [n_tokens, n_expert]
        counters.predictor_s += time.perf_counter() - started
        counters.predictor_calls += 1
        if scores.shape != (len(x), self.n_expert):
            raise ValueError(f"predictor gave scores of shape {scores.shape}, not {(len(x), self.n_expert)}")
        if not np.isfinite(scores).all():
            raise ValueError("predictor gave scores that are not finite (NaN or infinite)")
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.n_candidates]  # [n_tokens, n]
        if self.mode == "adaptive":
            counts = prefetch_counts(
                scores, self.k, self.temperatures.get(il, 1.0), self.target
            )  # [n_tokens]
            keep = np.arange(order.shape[1])[None, :] < counts[:, None]
            order = np.where(keep, order, -1)
        candidates = [
            e for e in dict.fromkeys(order.T.ravel().tolist()) if e >= 0
        ]  # best of every token first
        self._prefetch(il, candidates)

    def _prefetch(self, il: int, candidates: list[int]) -> None:
        slots, counters = self.slots[il], self.stats.layers[il]
        protect = set(candidates)
        with self.locks[il]:
            for expert in candidates:
                if slots.resident(expert):
                    continue
                victim = slots.victim(protect)
                if victim is None:
                    break
                if not self.budget.try_take(self.bytes_per_expert):
                    counters.prefetch_dropped += 1
                    break
                self.bank.upload(il, expert, victim)
                slots.assign(expert, victim)
                self.prefetched[il].add(expert)
                counters.prefetch_issued += 1

    # -- routing: make the selected experts resident --------------------------------------------------

    def _upload_on_miss(self) -> bool:
        if self.miss == "auto":
            miss_stats = self.bank.miss_stats()
            self.cost.refresh(
                miss_stats.upload_ns,
                self.bank.stats()["upload_bytes"],
                miss_stats.cpu_ns,
                miss_stats.cpu_timed_experts,
            )
            return self.cost.upload_is_cheaper()
        return self.miss == "upload"

    def _defer_upload(self, il: int, experts: list[int]) -> None:
        """Upload `experts` of layer il in the background, never evicting the ones its ubatch uses."""
        slots, counters = self.slots[il], self.stats.layers[il]
        protect = set(experts)
        with self.locks[il]:
            for expert in experts:
                victim = slots.victim(protect)
                if victim is None or slots.resident(expert):
                    continue
                if not self.budget.try_take(self.bytes_per_expert):
                    counters.prefetch_dropped += 1
                    break
                self.bank.upload(il, expert, victim)
                slots.assign(expert, victim)
                counters.deferred_uploads += 1

    def on_routing(self, routing: Routing) -> None:
        il = routing.layer
        n_tokens = len(routing.ids)
        # the layers whose misses were deferred have run their experts by now
        for layer, experts in self.deferred:
            self.deferring[layer] = self.executor.submit(self._defer_upload, layer, experts)
        self.deferred.clear()
        if not self._cached(il, n_tokens):
            return
        previous = self.deferring.pop(il, None)
        if previous is not None:
            previous.result()  # residency settles before this ubatch's decisions
        counters, slots = self.stats.layers[il], self.slots[il]
        if il == self.first_layer:
            self.stats.cached_tokens += n_tokens
        counters.tokens += n_tokens
        waited = False
        future = self.pending.pop(il, None)
        if future is not None:
            started = time.perf_counter()
            waited = not future.done()
            try:
                future.result()
            except Exception as error:
                self.disabled.add(il)
                log.warning("predictor for layer %d failed (%r): prediction is off for that layer", il, error)
            counters.stall_s += time.perf_counter() - started if waited else 0.0
        ids = routing.ids.astype(np.int64)  # [n_tokens, k]
        experts, rows = np.unique(ids, return_counts=True)
        selected = set(experts.tolist())
        on_cpu = []
        with self.locks[il]:
            for expert, count in zip(experts.tolist(), rows.tolist(), strict=True):
                if slots.resident(expert):
                    if waited and expert in self.prefetched[il]:
                        counters.late += count
                    else:
                        counters.hits += count
                    continue
                if self.miss != "upload" and not self._upload_on_miss():
                    counters.cpu += count  # the C side sends it to the CPU: it is not resident
                    on_cpu.append(expert)
                    continue
                started = time.perf_counter()
                victim = slots.victim(selected)
                self.bank.upload(il, expert, victim)
                slots.assign(expert, victim)
                counters.stall_s += time.perf_counter() - started
                counters.misses += count
            counters.prefetch_wasted += len(self.prefetched[il] - selected)
            self.prefetched[il].clear()
            slots.touch(ids.ravel().tolist())
        if on_cpu and self.mode == "lru":
            self.deferred.append((il, on_cpu))  # lru has no other way to fill the cache


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
        *,
        n_slots: int,
        max_batch_tokens: int = 32,
        **controller_options,
    ) -> None:
        self.bank = SlotBank(engine.api, engine.ctx, layers, n_slots, max_batch_tokens)
        self.controller = Controller(self.bank, **controller_options)
        if self.controller.miss != "upload":
            self.bank.set_miss_cpu(True)
        # lru needs no activation; the controller needs only the router's ids (fewer graph splits)
        on_pre_attn = None if self.controller.mode == "lru" else self.controller.on_pre_attn
        self.hooks = Hooks(engine.api, engine.ctx, on_pre_attn, self.controller.on_routing, detail=False)

    @classmethod
    def for_layout(
        cls,
        engine,
        layout: MoeLayout,
        *,
        n_slots: int,
        mode: str,
        max_batch_tokens: int = 32,
        **controller_options,
    ) -> "CacheRuntime":
        """Every MoE layer of the model cached, sized from its layout."""
        return cls(
            engine,
            tuple(layer.index for layer in layout.moe_layers),
            n_slots=n_slots,
            max_batch_tokens=max_batch_tokens,
            mode=mode,
            k=layout.n_expert_used,
            n_expert=layout.n_expert,
            bytes_per_expert=max(layer.bytes_per_expert for layer in layout.moe_layers),
            **controller_options,
        )

    def close(self) -> None:
        self.hooks.close()
        self.controller.close()

    def __enter__(self) -> "CacheRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
