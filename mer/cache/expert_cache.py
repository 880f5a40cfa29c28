"""The RAM tier's bookkeeping: which expert sits in which arena slot, who is using it, and
what to evict. Socket-free and I/O-free: it tells its caller which reads to issue, so the
cache actor is a thin shell around it and tests drive it directly.

Eviction score of a resident expert (lowest goes first), the three-signal controller:

    score = exp(-(now - last_use) / recency_tau) + freq_weight * freq + need_weight * need

- recency: 1 just after use, decaying with the number of accesses since (`now` counts them);
- freq: an exponentially decayed access count, freq <- freq * decay^(now - t) + 1 on use;
- need: the predictors' latest probability that the expert is needed soon (0 if none).

Pinning: the `pin_budget` resident experts of highest decayed frequency, among those with
freq >= pin_min_freq, are never evicted; as an expert cools its frequency decays and its pin
goes to a hotter one. Leased slots (in use by a computation) are never evicted; a read is
issued once per expert however many acquire it while it is in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

ExpertKey = tuple[int, int]  # (layer, expert)


class Status(Enum):
    HIT = "hit"  # resident and ready
    PENDING = "pending"  # a read is in flight; wait for complete()
    MISS = "miss"  # a slot was assigned; the caller must read the expert into it


@dataclass
class _Entry:
    key: ExpertKey
    slot: int
    ready: bool = False
    leases: int = 0
    last_use: int = 0
    prefetched: bool = False  # read ahead of demand, not used yet


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    pending_hits: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    evictions: int = 0
    hits_by_layer: dict[int, int] = field(default_factory=dict)
    misses_by_layer: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.pending_hits + self.misses
        return (self.hits + self.pending_hits) / total if total else 0.0


class CacheFullError(RuntimeError):
    """Every slot is leased, pinned or loading: the caller must release leases first."""


class ExpertCache:
    """Slots of the RAM tier and the policy that fills and empties them."""

    def __init__(
        self,
        n_slots: int,
        *,
        pin_budget: int = 0,
        pin_min_freq: float = 4.0,
        decay: float = 0.999,
        recency_tau: float = 64.0,
        freq_weight: float = 0.05,
        need_weight: float = 1.0,
    ) -> None:
        if n_slots < 1:
            raise ValueError("n_slots must be at least 1")
        if not 0 <= pin_budget < n_slots:
            raise ValueError("pin_budget must be between 0 and n_slots - 1")
        self.n_slots = n_slots
        self.pin_budget = pin_budget
        self.pin_min_freq = pin_min_freq
        self.decay = decay
        self.recency_tau = recency_tau
        self.freq_weight = freq_weight
        self.need_weight = need_weight
        self.now = 0
        self.stats = CacheStats()
        self._entries: dict[ExpertKey, _Entry] = {}
        self._free = list(range(n_slots - 1, -1, -1))
        self._freq: dict[ExpertKey, tuple[float, int]] = {}  # key -> (freq, as of tick)
        self._need: dict[ExpertKey, float] = {}

    # -- queries -------------------------------------------------------------------------
    def slot_of(self, key: ExpertKey) -> int | None:
        entry = self._entries.get(key)
        return entry.slot if entry else None

    def is_ready(self, key: ExpertKey) -> bool:
        entry = self._entries.get(key)
        return bool(entry and entry.ready)

    def leases(self, key: ExpertKey) -> int:
        entry = self._entries.get(key)
        return entry.leases if entry else 0

    def resident(self) -> list[ExpertKey]:
        return list(self._entries)

    def freq(self, key: ExpertKey) -> float:
        value, since = self._freq.get(key, (0.0, self.now))
        return value * self.decay ** (self.now - since)

    def pinned(self) -> set[ExpertKey]:
        """Resident experts that are currently pinned."""
        if not self.pin_budget:
            return set()
        hot = [(self.freq(k), k) for k, e in self._entries.items() if e.ready]
        hot = [(f, k) for f, k in hot if f >= self.pin_min_freq]
        hot.sort(key=lambda fk: (-fk[0], fk[1]))
        return {k for _, k in hot[: self.pin_budget]}

    def score(self, key: ExpertKey) -> float:
        entry = self._entries.get(key)
        recency = math.exp(-(self.now - entry.last_use) / self.recency_tau) if entry else 0.0
        return (
            recency
            + self.freq_weight * self.freq(key)
            + self.need_weight * self._need.get(key, 0.0)
        )

    # -- demand path ---------------------------------------------------------------------
    def acquire(self, key: ExpertKey) -> tuple[Status, int]:
        """Lease `key` for a computation: its slot and whether it is ready, loading, or must
        be read by the caller (then call complete()). Raises CacheFullError if no slot can
        be freed."""
        self.now += 1
        self._bump_freq(key)
        layer = key[0]
        entry = self._entries.get(key)
        if entry is not None:
            entry.leases += 1
            entry.last_use = self.now
            if entry.prefetched:
                entry.prefetched = False
                self.stats.prefetch_used += 1
            if entry.ready:
                self.stats.hits += 1
                self.stats.hits_by_layer[layer] = self.stats.hits_by_layer.get(layer, 0) + 1
                return Status.HIT, entry.slot
            self.stats.pending_hits += 1
            return Status.PENDING, entry.slot
        slot = self._take_slot(for_score=math.inf)
        if slot is None:
            raise CacheFullError("every expert slot is leased, pinned or loading")
        self._entries[key] = _Entry(key, slot, leases=1, last_use=self.now)
        self.stats.misses += 1
        self.stats.misses_by_layer[layer] = self.stats.misses_by_layer.get(layer, 0) + 1
        return Status.MISS, slot

    def complete(self, key: ExpertKey, ok: bool = True) -> None:
        """The read of `key` finished. On failure the slot is freed (leases included: every
        waiter gets the error from the caller)."""
        entry = self._entries[key]
        if ok:
            entry.ready = True
        else:
            self._drop(key)

    def release(self, key: ExpertKey) -> None:
        entry = self._entries[key]
        if entry.leases <= 0:
            raise ValueError(f"release of {key} without a lease")
        entry.leases -= 1

    # -- prediction and prefetch -----------------------------------------------------------
    def hint(self, needs: dict[ExpertKey, float]) -> None:
        """The predictors' current probabilities that experts are needed soon."""
        self._need = dict(needs)

    def prefetch(self, key: ExpertKey, need: float) -> int | None:
        """Admit a read-ahead of `key` (needed with probability `need`) if a slot is free or
        the victim scores lower than the prefetch would: leased, pinned, loading and hotter
        experts are never evicted for it. Returns the slot to read into, or None."""
        if key in self._entries:
            return None
        prefetch_score = self.need_weight * need + self.freq_weight * self.freq(key)
        slot = self._take_slot(for_score=prefetch_score)
        if slot is None:
            return None
        self._entries[key] = _Entry(key, slot, last_use=self.now, prefetched=True)
        self.stats.prefetches += 1
        return slot

    # -- internals -------------------------------------------------------------------------
    def _bump_freq(self, key: ExpertKey) -> None:
        self._freq[key] = (self.freq(key) + 1.0, self.now)

    def _take_slot(self, for_score: float) -> int | None:
        if self._free:
            return self._free.pop()
        pinned = self.pinned()
        victims = [
            (self.score(k), e.last_use, k)
            for k, e in self._entries.items()
            if e.ready and e.leases == 0 and k not in pinned
        ]
        if not victims:
            return None
        score, _, victim = min(victims)
        if score >= for_score:
            return None
        entry = self._entries[victim]
        if entry.prefetched:
            self.stats.prefetch_wasted += 1
        self.stats.evictions += 1
        self._drop(victim)
        return self._free.pop()

    def _drop(self, key: ExpertKey) -> None:
        entry = self._entries.pop(key)
        self._free.append(entry.slot)
