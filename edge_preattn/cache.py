"""Slot-cache policy: which expert sits in which slot, what to evict, and how many bytes may move.

Pure bookkeeping, no native calls: the controller asks it and then performs the uploads. It mirrors
the C side's residency (slot -> expert) exactly, because every upload goes through the controller;
the C side's forced uploads (a selected expert the policy failed to make resident) are counted
there and show up in the statistics as a bug to fix, not as wrong output.
"""

import threading
import time
from collections import OrderedDict

EVICTION_POLICIES = ("lru", "lfu")


class LayerSlots:
    """Residency of one layer's slots, with recency and frequency for eviction."""

    def __init__(self, n_slots: int, eviction: str = "lru") -> None:
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}")
        self.n_slots = n_slots
        self.eviction = eviction
        self.expert_in: list[int] = [-1] * n_slots  # slot -> expert (-1: empty)
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.recency: OrderedDict[int, None] = OrderedDict((s, None) for s in range(n_slots))  # LRU first
        self.uses: dict[int, int] = {}  # expert -> times selected (LFU)

    def resident(self, expert: int) -> bool:
        return expert in self.slot_of

    def victim(self, protect: set[int]) -> int | None:
        """The slot to overwrite: empty first, then LRU (or LFU) among slots not holding `protect`."""
        candidates = [s for s in self.recency if self.expert_in[s] not in protect]
        if not candidates:
            return None
        empty = [s for s in candidates if self.expert_in[s] < 0]
        if empty:
            return empty[0]
        if self.eviction == "lfu":
            return min(candidates, key=lambda s: self.uses.get(self.expert_in[s], 0))
        return candidates[0]

    def assign(self, expert: int, slot: int) -> None:
        old = self.expert_in[slot]
        if old >= 0:
            del self.slot_of[old]
        self.expert_in[slot] = expert
        self.slot_of[expert] = slot
        self.recency.move_to_end(slot)

    def touch(self, experts) -> None:
        """The router selected these: most recently used, one more use each."""
        for expert in experts:
            slot = self.slot_of.get(expert)
            if slot is not None:
                self.recency.move_to_end(slot)
            self.uses[expert] = self.uses.get(expert, 0) + 1


class UploadBudget:
    """A token bucket over wall time: how a slow bus (edge devices) is modelled on a fast machine.

    `bytes_per_s` None means unlimited. The bucket holds at most `burst_s` seconds of bandwidth.
    """

    def __init__(self, bytes_per_s: float | None, burst_s: float = 0.005) -> None:
        self.bytes_per_s = bytes_per_s
        self.capacity = None if bytes_per_s is None else bytes_per_s * burst_s
        self.level = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def try_take(self, n_bytes: int) -> bool:
        if self.bytes_per_s is None:
            return True
        with self.lock:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.updated) * self.bytes_per_s)
            self.updated = now
            if n_bytes > self.level:
                return False
            self.level -= n_bytes
            return True
