"""The runtime: hooks → predictor → cache policy → uploads, with per-token statistics.

Pre-attention predictors the library can read (the exported MLPs of `train`, router prior and all) are
handed to it, and it
evaluates them itself at each cached layer's pre-attention output, on the decode thread, and
prefetches what they name (`--lookahead D`: layers l..l+D from layer l's activation); `oracle` gives it
the recorded routing instead. Then a decode token calls no Python at all. Otherwise (onnxruntime:
another graph, int8, `--predictor-engine onnxruntime`, or a test's stand-in), on a cached layer's
pre-attention hook the activation goes to a predictor thread (onnxruntime releases the GIL) and the
hook returns at once, so attention runs while the predicted experts are uploaded; each prediction
names the ubatch it was made for, and the library drops it if it arrives after its layer's routing.
Cross-layer predictors (trained on `x_prev`, the previous layer's router input) are fed instead at
each cached layer's routing, which splits the graph anyway, and predict the next layer: a
whole layer ahead, and no pre-attention split. The router does not wait for the prediction: a
prefetch that has not landed when the layer is routed stops there (the library refuses uploads into
a bank that expert matmuls may be reading), and what it missed is a miss. A miss is uploaded at
routing into the eviction policy's victim (`miss="upload"`, the paper's behaviour, applied by the
library itself), or left to the CPU, which computes it from the host copy while the GPU computes the
resident experts (`"cpu"`), or either, by a cost model of measured upload and CPU times (`"auto"`).
The C side checks residency before the expert matmuls and sends every selected expert to exactly one
side, so no decision here can change the output.
"""

import concurrent.futures
import dataclasses
import logging
import threading
import time

import numpy as np

from ..errors import UserError
from ..predictors.calibration import prefetch_counts
from ..predictors.predictor_weights import GRAPH_FEATURES
from ..traces.hooks import Routing
from .cache import EVICTION_POLICIES, MissCostModel, UploadBudget
from .options import PREDICTION_MODES, CacheOptions
from .prefetch_worker import PrefetchWorker
from .slots import SlotBank
from .stats import LayerCounters, RuntimeStats

log = logging.getLogger(__name__)

# prediction modes give up when predicted uploads keep arriving after the router (a fast GPU): checked
# every LATE_CHECK_UBATCHES ubatches, over at least LATE_CHECK_MIN predicted experts that were not
# resident, when at least LATE_SHARE of them were refused as late (H200, packaged model: 0.83-0.84;
# this 2-core CPU: about 0.02)
LATE_CHECK_UBATCHES, LATE_CHECK_MIN, LATE_SHARE = 32, 64, 0.5
# ... or when there is nothing left to prefetch: fewer than IDLE_SHARE non-resident experts per prediction
# (everything predicted is resident already, e.g. slots = E after warm-up)
IDLE_SHARE = 0.01
WAIT_LIMIT_S = 5.0  # the longest the router waits for a prediction (--wait-prefetch, deferred uploads)
CLOSE_WAIT_S = 2.0  # the longest closing waits for the prefetch thread


class Controller:
    """Decides uploads for one engine's slot bank; `on_pre_attn`/`on_routing` are the hook handlers.

    The routing-time rule for a miss under `miss="upload"` (upload into the eviction policy's victim)
    is a standing rule the library applies itself: Python code at every layer of every token would
    cost more than most uploads. The routing hook is installed only when this controller has a
    decision to make there (see `needs_routing_hook`).
    """

    def __init__(
        self, bank: SlotBank, options: CacheOptions, *, k: int, n_expert: int, bytes_per_expert: int
    ) -> None:
        """`options` were checked when made; k, n_expert and bytes_per_expert are the model's."""
        mode, predictors, lookahead = options.mode, options.predictors, options.lookahead
        self.bank, self.k, self.n_expert, self.bytes_per_expert = bank, k, n_expert, bytes_per_expert
        self.mode, self.predictors = mode, predictors
        self.miss, self.residency = options.miss, options.residency
        # routing waits for the layer's prediction and prefetch: slower, but what is resident at
        # routing no longer depends on thread timing (what the predictor achieves given the time)
        self.wait_for_prefetch = options.wait_for_prefetch
        self.cost = MissCostModel(bytes_per_expert) if self.miss == "auto" else None
        # lru with misses on the CPU: the layers' selected experts, uploaded once their layer is done
        self.deferred: list[tuple[int, list[int]]] = []
        self.deferring: dict[int, concurrent.futures.Future] = {}
        self.n_candidates = {
            "top1": 1,
            "exact": k,
            "overprov": k + options.extra,
            "adaptive": n_expert,
        }.get(mode, 0)
        # adaptive: per token, the fewest experts whose calibrated share reaches `target` (eval --calibrate)
        self.target = options.target
        manifest = getattr(predictors, "manifest", None) or {}
        calibrated = manifest.get("calibration", {})
        self.temperatures = {int(il): float(entry["temperature"]) for il, entry in calibrated.items()}
        # the bucket decides which predicted uploads are issued; the library's modelled bus, shared
        # with the misses, decides when each upload lands
        self.budget = UploadBudget(options.bandwidth_bytes_per_s)
        bank.set_bus_rate(options.bandwidth_bytes_per_s)
        bank.set_eviction(EVICTION_POLICIES[options.eviction])
        # prefetches on their own stream, which the routing's compute stream waits for per slot (the
        # device's own prefetches, with the predictors on it, go there too)
        wants_queue = options.copy_queue or options.predictor_device == "gpu"
        self.copy_queue = wants_queue and bank.set_copy_queue(True)
        if wants_queue and not self.copy_queue:
            log.info("this device has no asynchronous copies or events: uploads stay synchronous")
        self.python = {il: LayerCounters() for il in bank.layers}  # what only this side counts
        self.first_layer, self.last_layer = min(bank.layers), max(bank.layers)
        self.pending: dict[int, concurrent.futures.Future] = {}
        # predictors trained on x_prev read a layer's router input and predict the next layer
        self.cross_layer = mode in PREDICTION_MODES and manifest.get("input", "x_pre") == "x_prev"
        # lookahead: at a layer's pre-attention hook, also predict the next `lookahead` cached layers
        if lookahead and self.cross_layer:
            raise ValueError("lookahead needs pre-attention predictors; cross-layer ones already look ahead")
        # history inputs (train --features): fed by the library's own predictor only (patches 17, 22),
        # the router input in the model's graph only (patch 26: the host does not observe it)
        features = tuple(getattr(predictors, "features", ()) or ()) if mode in PREDICTION_MODES else ()
        graph_only = [f for f in features if f in GRAPH_FEATURES]
        if graph_only and options.predictor_device != "gpu":
            raise UserError(
                f"these predictors read {', '.join(graph_only)}, a history input the library feeds in the "
                "model's graph only: add --predictor-device gpu (on a CPU build too)"
            )
        # train --lead: each layer's predictor reads an earlier layer's activation (patch 24)
        self.lead = lead = getattr(predictors, "lead", 0) if mode in PREDICTION_MODES else 0
        if lead and lookahead:
            raise UserError(
                f"--lookahead with predictors trained with --lead {lead}: they predict layers ahead "
                "already; drop --lookahead"
            )
        if features and lookahead:
            raise UserError(
                f"--lookahead with predictors that read history inputs ({', '.join(features)}): a later "
                "layer's previous-layer routing is not known yet when it would be predicted; drop --lookahead"
            )
        # pre-attention predictors the library can evaluate itself: no Python per token
        self.native = (
            mode in PREDICTION_MODES
            and not self.cross_layer
            and options.predictor_engine == "native"
            and self._predict_natively(options)
        )
        self.in_graph = self.native and options.predictor_device == "gpu"  # nodes of the model's graph
        if lead and not self.native:
            raise UserError(
                f"these predictors were trained with --lead {lead}: only the library's own predictor feeds "
                "them an earlier layer's activation (pre-attention, fp32, --predictor-engine native); run "
                "them that way, or train without --lead"
            )
        if self.residency == "token" and mode in PREDICTION_MODES and not self.native:
            raise UserError(
                "--residency token works with the library's own predictor (--predictor-engine native, "
                "pre-attention fp32 predictors): these need Python at every layer; use --residency routing"
            )
        if features and not self.native:
            raise UserError(
                f"these predictors read history inputs ({', '.join(features)}), which only the library's own "
                "predictor feeds (pre-attention, fp32, --predictor-engine native): run them that way, or "
                "train predictors without --features"
            )
        # late predictions cost a graph split per layer and save nothing: switch prediction off (lru)
        # (the library's own predictions are made on the decode thread, before the routing: never late)
        self.late_fallback = (
            options.late_fallback
            and mode in PREDICTION_MODES
            and not self.wait_for_prefetch
            and not self.native
        )
        self.prediction_off_at: int | None = None  # the ubatch where that happened
        self.late_seen = (0, 0, 0)  # prefetched experts refused as late, uploaded; predictions: last check
        self.drop_prediction_input = None  # set by CacheRuntime: removes the hook that feeds predictors
        order = sorted(bank.layers)
        self.ahead = {il: order[i + 1 : i + 1 + lookahead] for i, il in enumerate(order)}
        self.epoch = dict.fromkeys(bank.layers, 0)  # own predictions submitted, per layer
        self.disabled: set[int] = set()  # layers whose predictor failed
        self.worker = PrefetchWorker(max_backlog=2 * (1 + lookahead) * len(bank.layers))
        if mode == "oracle":
            self._give_oracle(options.oracle)
        # native calls from the worker stop once closed: the context may be freed after close()
        self.native_lock, self.closed = threading.Lock(), False
        self.ubatch = -1

    def _give_oracle(self, recorded: dict[tuple[int, int], np.ndarray]) -> None:
        """Each layer's true routing of the runs that will read its bank, in order, to the library:
        it prefetches them itself at each pre-attention and evicts by Belady (no Python per token)."""
        for il in self.bank.layers:
            runs = [ids for (_, layer), ids in sorted(recorded.items()) if layer == il]
            runs = [ids for ids in runs if self._cached(il, len(ids))]
            self.bank.set_oracle(il, runs)

    def _predict_natively(self, options: CacheOptions) -> bool:
        """Hand every cached layer's predictor to the library, if it can evaluate them (else one warning,
        and onnxruntime predicts, on the prefetch thread): as a plain loop on the decode thread, or with
        `predictor_threads` > 0 as ggml graphs on a CPU backend with that many threads (SIMD, in
        parallel), or with `predictor_device` gpu as nodes of the model's graph on the cached layers'
        device; graphs with float16 matrices with `predictor_fp16`."""
        from ..predictors.predictor_weights import Unsupported, read_predictor_set

        if getattr(self.predictors, "directory", None) is None:
            return False  # not an exported predictor set (a test's stand-in): Python only
        try:
            weights = read_predictor_set(self.predictors)
        except (Unsupported, ImportError) as why:
            log.warning("the predictors run in onnxruntime, not in the library: %s", why)
            return False
        self.bank.set_predictor_threads(options.predictor_threads)
        self.bank.set_predictor_in_graph(options.predictor_device == "gpu")
        self.bank.set_predictor_fp16(options.predictor_fp16)
        order = sorted(self.bank.layers)  # history's previous MoE layer: every MoE layer is cached in `run`
        for il in self.bank.layers:
            if il in weights:
                adaptive = self.mode == "adaptive"
                self.bank.set_predictor(
                    il,
                    weights[il],
                    min(self.n_candidates, self.n_expert),
                    temperature=self.temperatures.get(il, 1.0),
                    target=self.target if adaptive else 0.0,
                )
                if weights[il].prior_w is not None:  # a residual on the router (train --prior)
                    self.bank.set_predictor_prior(il, weights[il].prior_w)
                if weights[il].history:  # train --features prev-layer,prev-token
                    position = order.index(il)
                    self.bank.set_predictor_history(il, weights[il], order[position - 1] if position else -1)
                source = getattr(self.predictors, "sources", {}).get(il, il)
                if source != il:  # train --lead: an earlier layer's activation
                    if source not in self.bank.layers:
                        raise UserError(
                            f"layer {il}'s predictor reads layer {source}'s activation (train --lead), "
                            "which is not a cached layer: cache it too, or train without --lead"
                        )
                    self.bank.set_predictor_source(il, source)
        self.bank.set_lookahead(options.lookahead)
        return True

    @property
    def needs_pre_attn_hook(self) -> bool:
        """The Python predictor reads the pre-attention activation (the library's own predictor and
        the oracle's prefetch need no hook)."""
        return self.mode in PREDICTION_MODES and not self.cross_layer and not self.native

    @property
    def needs_routing_hook(self) -> bool:
        """Decisions the library cannot make alone: the cost model (`auto`), lru's deferred uploads
        with misses on the CPU, and waiting for a prediction made in Python. Misses on the CPU in the
        other modes need nothing here: the library leaves every non-resident expert to the CPU."""
        if self.residency == "token":
            return False  # the library accounts and uploads from its routing log
        return (
            self.miss == "auto"
            or (self.miss == "cpu" and self.mode == "lru")
            or (self.wait_for_prefetch and not self.native)
        )

    def close(self) -> None:
        with self.native_lock:
            self.closed = True
        if not self.worker.close(CLOSE_WAIT_S):
            log.warning(
                "the prefetch thread is still busy after %g s (a predictor that does not return?): "
                "left behind; it makes no more uploads",
                CLOSE_WAIT_S,
            )

    def _cached(self, il: int, n_tokens: int) -> bool:
        """The C side's rule for a ubatch reading the bank (else it took the stock path)."""
        return (
            il in self.python
            and n_tokens <= self.bank.max_batch_tokens
            and n_tokens * self.k <= self.bank.n_slots
        )

    @property
    def stats(self) -> RuntimeStats:
        """The library's per-layer counts, with what only the controller knows."""
        layers = {}
        for il, mine in self.python.items():
            native = self.bank.layer_stats(il)
            layers[il] = dataclasses.replace(
                mine,
                tokens=native["tokens"],
                hits=native["hits"] + native["prefetch_hits"],
                late=native["late"],
                misses=native["misses"],
                cpu=native["cpu"],
                prefetch_issued=native["prefetch_uploads"],
                prefetch_hits=native["prefetch_hits"],
                prefetch_wasted=native["prefetch_wasted"],
                prefetch_late=native["prefetch_refused"],
                prediction_stale=self.bank.prediction_stats(il)["stale"],
                stall_s=mine.stall_s + native["stall_ns"] * 1e-9,
            )
        return RuntimeStats(layers=layers, cached_tokens=layers[self.first_layer].tokens)

    # -- pre-attention: start the prefetch and return -------------------------------------------------

    def on_pre_attn(self, il: int, x: np.ndarray) -> None:
        self.ubatch = self.bank.ubatch()  # what this activation's predictions are for
        if il == self.first_layer:
            self._check_lateness()
        if il in self.disabled or il not in self.python or self.prediction_off_at is not None:
            return
        # x: [n_tokens, n_embd]. The model's last layer runs its FFN only on the rows it outputs
        # (the last one, in plain generation), so a prefill may still reach the bank there.
        self.epoch[il] += 1  # a lookahead for this layer still queued is superseded
        if self._cached(il, len(x)):
            rows = np.array(x, dtype=np.float32)
        elif il == self.last_layer and self._cached(il, 1):
            rows = np.array(x[-1:], dtype=np.float32)
        else:
            return
        self.pending[il] = self._submit(il, self._predict_and_prefetch, il, rows, self.ubatch)
        for target in self.ahead[il]:
            if target not in self.disabled and self._cached(target, len(rows)):
                self._submit(target, self._look_ahead, target, rows, self.epoch[target], self.ubatch)

    def on_router_input(self, il: int, x: np.ndarray) -> None:
        """Cross-layer: layer il has been routed; its router input is the next layer's x_prev."""
        self.ubatch = self.bank.ubatch()
        if il == self.first_layer:
            self._check_lateness()
        target = il + 1  # x_prev is the router input of the layer right before
        if (
            target not in self.python
            or target in self.disabled
            or self.prediction_off_at is not None
            or not self._cached(target, len(x))
        ):
            return
        self.pending[target] = self._submit(
            target, self._predict_and_prefetch, target, np.array(x, dtype=np.float32), self.ubatch
        )

    def _check_lateness(self) -> None:
        """Every LATE_CHECK_UBATCHES: is prediction worth its graph split per layer? Not when most
        predicted uploads come after the router, nor when nothing predicted needs an upload.
        Called at the first cached layer of every ubatch; acts only at the checks."""
        if not self.late_fallback or self.ubatch % LATE_CHECK_UBATCHES:
            return
        totals = [self.bank.layer_stats(il) for il in self.python]
        refused = sum(t["prefetch_refused"] for t in totals)
        uploaded = sum(t["prefetch_uploads"] for t in totals)
        calls = sum(c.predictor_calls for c in self.python.values())
        late, in_time, predictions = (
            now - before for now, before in zip((refused, uploaded, calls), self.late_seen, strict=True)
        )
        self.late_seen = (refused, uploaded, calls)
        if late + in_time >= LATE_CHECK_MIN and late >= LATE_SHARE * (late + in_time):
            reason = (
                f"{late} of the last {late + in_time} predicted uploads came after the router had chosen "
                "(the device computes a layer faster than the predictor answers)"
            )
        elif predictions >= LATE_CHECK_MIN and late + in_time < IDLE_SHARE * predictions:
            reason = f"the last {predictions} predictions found their experts resident already"
        else:
            return
        self.prediction_off_at = self.ubatch
        log.warning("%s: prediction is off, the cache runs as lru", reason)
        if self.drop_prediction_input is not None:
            self.drop_prediction_input()

    def _look_ahead(self, il: int, x: np.ndarray, epoch: int, ubatch: int) -> None:
        """Layer il's experts predicted from an earlier layer's activation, by il's own predictor
        (bench/results/lookahead/ measures what that loses), unless il's own prediction came first."""
        if self.epoch[il] != epoch:
            self.python[il].lookahead_superseded += 1
            return
        self.python[il].lookahead_predictions += 1
        self._predict_and_prefetch(il, x, ubatch)

    def _submit(self, il: int, work, *args) -> concurrent.futures.Future | None:
        """Run on the prefetch thread; a failure (predictor or upload) switches the layer's prediction
        off with one warning, since nobody may be waiting for the result. None: the thread is too far
        behind (a slow or stuck predictor), and this work is skipped."""

        def guarded() -> None:
            if il in self.disabled:  # queued before an earlier failure switched the layer off
                return
            try:
                work(*args)
            except Exception as error:
                if il not in self.disabled:  # later work for the layer may be queued already: warn once
                    self.disabled.add(il)
                    log.warning(
                        "prefetch for layer %d failed (%r): prediction is off for that layer", il, error
                    )

        future = self.worker.submit(guarded)
        if future is None:
            self.python[il].backlog_dropped += 1
        return future

    def _predict_and_prefetch(self, il: int, x: np.ndarray, ubatch: int) -> None:
        counters = self.python[il]
        started = time.perf_counter()
        try:
            scores = self.predictors.scores(il, x)  # [n_tokens, n_expert]
        finally:
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
        self._prefetch(il, candidates, ubatch)

    def _prefetch(self, il: int, candidates: list[int], ubatch: int | None = None) -> int:
        """Upload the candidates that are not resident, within the bandwidth budget: how many. With
        `ubatch`, they are that ubatch's prediction (pending until the layer's routing; dropped if late)."""
        allowed = self.budget.grant(len(candidates), self.bytes_per_expert)
        if allowed < len(candidates):
            self.python[il].prefetch_dropped += 1
        with self.native_lock:
            if self.closed:
                uploaded = 0
            elif ubatch is None:
                uploaded = self.bank.prefetch(il, candidates, allowed)
            else:
                uploaded = self.bank.predict(il, ubatch, candidates, allowed)
        self.budget.refund((allowed - uploaded) * self.bytes_per_expert)
        return uploaded

    def _defer_upload(self, il: int, experts: list[int]) -> None:
        """lru with misses on the CPU: upload a layer's selected experts once its matmuls are done."""
        self.python[il].deferred_uploads += self._prefetch(il, experts)

    # -- routing: decisions the library cannot make alone -------------------------------------------

    def _upload_on_miss(self) -> bool:
        """With misses on the CPU (`cpu`, `auto`): upload this routing's misses instead?"""
        if self.miss == "auto":
            miss_stats = self.bank.miss_stats()
            self.cost.refresh(
                miss_stats.upload_ns,
                self.bank.stats()["upload_bytes"],
                miss_stats.cpu_ns,
                miss_stats.cpu_timed_experts,
            )
            return self.cost.upload_is_cheaper()
        return False  # "cpu"

    def on_routing(self, routing: Routing) -> None:
        il = routing.layer
        n_tokens = len(routing.ids)
        # the layers whose selected experts were deferred have run their experts by now
        for layer, experts in self.deferred:
            self.deferring[layer] = self._submit(layer, self._defer_upload, layer, experts)
        self.deferred.clear()
        if not self._cached(il, n_tokens):
            return
        started = time.perf_counter()
        for future in (
            self.deferring.pop(il, None),
            self.pending.pop(il, None) if self.wait_for_prefetch else None,
        ):
            try:  # residency settles before this ubatch's decisions (failures were reported already)
                if future is not None:
                    future.result(timeout=WAIT_LIMIT_S)
            except concurrent.futures.TimeoutError:
                if il not in self.disabled:
                    self.disabled.add(il)
                    log.warning(
                        "prefetch for layer %d took over %.0f s: prediction is off for that layer",
                        il,
                        WAIT_LIMIT_S,
                    )
        self.python[il].stall_s += time.perf_counter() - started
        if self.miss == "upload":  # the library uploads misses itself
            return
        selected = list(dict.fromkeys(routing.ids.ravel().tolist()))
        if self._upload_on_miss():
            # the library counts these as misses; the rest of the misses go to the CPU
            self.bank.prefetch(il, selected, len(selected), on_miss=True)
        elif self.mode == "lru":
            self.deferred.append((il, selected))  # lru has no other way to fill the cache
