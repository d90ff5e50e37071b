"""Slot-cache policy knobs: the eviction policies, how many bytes prefetches may move, and whether a
miss is uploaded or computed on the CPU (`--miss auto`, `MissCostModel`, moved here from controller.py).

Residency itself lives in the library (one source of truth, read and written under the layer's lock
by the routing and by prefetch threads); the controller chooses the policy, and this module holds
the budget that decides which predicted uploads are issued on a slow bus. How long each upload takes
on that bus, misses included, the library models itself (`SlotBank.set_bus_rate`).
"""

import threading
import time

EVICTION_POLICIES = {"lru": 0, "lfu": 1}  # LLAMA_EDGE_EVICT_LRU / _LFU in llama-edge.h


class UploadBudget:
    """A token bucket over wall time: prefetches stay within a slow bus's (edge devices') bandwidth.

    `bytes_per_s` None means unlimited. The bucket holds at most `burst_s` seconds of bandwidth.
    """

    def __init__(self, bytes_per_s: float | None, burst_s: float = 0.005) -> None:
        self.bytes_per_s = bytes_per_s
        self.capacity = None if bytes_per_s is None else bytes_per_s * burst_s
        self.level = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def grant(self, n_units: int, unit_bytes: int) -> int:
        """Take the bytes of as many of `n_units` uploads as the bucket holds now: how many."""
        if self.bytes_per_s is None:
            return n_units
        with self.lock:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.updated) * self.bytes_per_s)
            self.updated = now
            granted = min(n_units, int(self.level // unit_bytes))
            self.level -= granted * unit_bytes
            return granted

    def refund(self, n_bytes: int) -> None:
        """Return bytes granted but not used (the expert was resident already)."""
        if self.bytes_per_s is None or n_bytes <= 0:
            return
        with self.lock:
            self.level = min(self.capacity, self.level + n_bytes)


class MissCostModel:
    """`--miss auto`: upload a layer's missed experts or compute them on the CPU, whichever costs less now.

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
