"""Slot-cache policy knobs: the eviction policies and how many bytes prefetches may move.

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
