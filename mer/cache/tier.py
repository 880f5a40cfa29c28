"""The RAM tier without sockets or files: leases, reads in flight, read-ahead admission, stats.

`CacheTier` wraps the cache policy (`ExpertCache`) with what happens around it: an acquire
that misses becomes a `ReadOrder` (an expert into a slot: the source's segments); a read
that finishes (`read_done`) makes the expert ready, or, if it failed, reports the error to
whoever waits for it; read-ahead candidates are admitted by `mer.cache.readahead.admit` at
the read speed the tier measures. It never reads a byte itself: its user issues the orders
and reports back. Two users exist: `ExpertStreamer` (in-process: the readers are its own)
and the cache actor (`mer.actors.cache`: the readers are io actors).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mer.cache.expert_cache import CacheFullError, ExpertCache, ExpertKey, Status
from mer.cache.readahead import Candidate, WasteBudget, admit
from mer.cache.sources import ExpertSource, Segment

logger = logging.getLogger(__name__)
_LATENCIES = 4096  # cold-read latencies kept for percentiles
PER_EXPERT_MAX = 16  # telemetry counts each expert's lookups for models with this many at most


@dataclass(frozen=True)
class ReadOrder:
    """Read expert `key` into arena slot `slot`: its `segments` of the source's files."""

    key: ExpertKey
    slot: int
    segments: Sequence[Segment]


@dataclass
class _Flight:
    """An expert being read."""

    key: ExpertKey
    slot: int
    nbytes: int
    started: float
    demand: bool  # somebody waits for it (a read-ahead becomes demand when acquired)
    cold: bool  # issued on demand: its latency is a cold read's
    acquired: float | None = None  # when a read-ahead in flight was acquired


@dataclass
class TierStats:
    demand_reads: int = 0
    prefetch_reads: int = 0
    bytes_read: int = 0
    read_busy_s: float = 0.0  # wall time with at least one read in flight
    inflight_wait_s: float = 0.0  # time from acquiring a read-ahead in flight to its arrival
    cold_read_ms: deque = field(default_factory=lambda: deque(maxlen=_LATENCIES))

    @property
    def read_speed(self) -> float:
        """Bytes per second while reads were in flight (0 before the first read)."""
        return self.bytes_read / self.read_busy_s if self.read_busy_s else 0.0


MAX_READS = 16  # expert reads in flight at most for read-ahead to be admitted (per reader)


class CacheTier:
    """`n_slots` slots of `source`'s experts (module docstring). `max_reads`: read-ahead is
    admitted only while fewer reads than this are in flight."""

    def __init__(
        self,
        source: ExpertSource,
        n_slots: int,
        *,
        prefetch: bool = True,
        pin_fraction: float = 0.25,
        max_reads: int = MAX_READS,
    ) -> None:
        self.source = source
        pin = min(int(n_slots * pin_fraction), n_slots - 1)
        self.cache = ExpertCache(n_slots, pin_budget=pin, n_layers=source.n_layers)
        self.prefetch_enabled = prefetch
        self.max_reads = max_reads
        self.stats = TierStats()
        self.budget = WasteBudget()
        self.flights: dict[ExpertKey, _Flight] = {}
        self.orders: list[ReadOrder] = []  # reads to issue: the user takes them
        self._busy_since: float | None = None

    @property
    def busy(self) -> bool:
        """Reads are in flight."""
        return bool(self.flights)

    def take_orders(self) -> list[ReadOrder]:
        orders, self.orders = self.orders, []
        return orders

    def nbytes(self, key: ExpertKey) -> int:
        return sum(seg.length for seg in self.source.segments(key))

    # -- leases ---------------------------------------------------------------------------
    def acquire(self, key: ExpertKey) -> tuple[Status, int] | None:
        """Lease `key`: (HIT, slot) when ready; (MISS, slot) when a read was ordered for it
        and (PENDING, slot) when one was in flight, both ready at their `read_done`; None
        when every slot is leased, pinned or loading (release some, then ask again)."""
        try:
            status, slot = self.cache.acquire(key)
        except CacheFullError:
            return None
        if status is Status.MISS:
            self._order(key, slot, demand=True)
        elif status is Status.PENDING:  # a read-ahead in flight: now somebody waits for it
            flight = self.flights[key]
            flight.demand = True
            flight.acquired = time.perf_counter()
        return status, slot

    def release(self, key: ExpertKey) -> None:
        self.cache.release(key)

    # -- reads ----------------------------------------------------------------------------
    def read_ahead(
        self, candidates: list[Candidate], hint: dict[ExpertKey, float], window_s: float
    ) -> None:
        """Order the reads of the `candidates` worth reading ahead in an idle window of
        `window_s` (`mer.cache.readahead`); `hint` is passed on to the eviction score."""
        if not self.prefetch_enabled or not candidates:
            return
        self.cache.hint(hint)
        speed = self.stats.read_speed
        if not speed:  # no read speed measured yet
            return
        for c in admit(candidates, window_s, speed, self.budget):
            if len(self.flights) >= self.max_reads:
                break
            slot = self.cache.prefetch(c.key, c.p)
            if slot is not None:
                self._order(c.key, slot, demand=False)

    def _order(self, key: ExpertKey, slot: int, demand: bool) -> None:
        segments = self.source.segments(key)
        now = time.perf_counter()
        if not self.flights:
            self._busy_since = now
        nbytes = sum(s.length for s in segments)
        self.flights[key] = _Flight(key, slot, nbytes, now, demand, demand)
        self.budget.earn()
        if demand:
            self.stats.demand_reads += 1
        else:
            self.stats.prefetch_reads += 1
        self.orders.append(ReadOrder(key, slot, segments))

    def read_done(self, key: ExpertKey, error: Exception | None = None) -> bool:
        """The read of `key` finished (`error` if it failed). True when somebody waits for
        the expert (so a failure is theirs to report); a failed read-ahead is only logged.
        Every lease of a failed expert is gone with it."""
        flight = self.flights.pop(key)
        now = time.perf_counter()
        if not self.flights and self._busy_since is not None:
            self.stats.read_busy_s += now - self._busy_since
            self._busy_since = None
        if error is not None:
            self.cache.complete(key, ok=False)
            if not flight.demand:
                logger.warning("event=prefetch_failed expert=%s error=%s", key, error)
            return flight.demand
        self.stats.bytes_read += flight.nbytes
        if flight.cold:
            self.stats.cold_read_ms.append((now - flight.started) * 1e3)
        if flight.acquired is not None:
            self.stats.inflight_wait_s += now - flight.acquired
        self.cache.complete(key, ok=True)
        return flight.demand

    # -- telemetry ------------------------------------------------------------------------
    def telemetry(self, tokens: int) -> dict:
        """The tier's figures over `tokens` tokens (README: "What --stats reports")."""
        c, s = self.cache.stats, self.stats
        lat = np.array(s.cold_read_ms) if s.cold_read_ms else np.zeros(1)
        layers = sorted(set(c.hits_by_layer) | set(c.pending_by_layer) | set(c.misses_by_layer))
        reads = s.demand_reads + s.prefetch_reads
        return {
            "slots": self.cache.n_slots,
            "slot_bytes": self.source.slot_bytes,
            "acquires": c.acquires,
            "hits": c.hits,
            "inflight_hits": c.pending_hits,
            "misses": c.misses,
            "hit_rate": c.hit_rate,
            "inflight_hit_rate": c.pending_rate,
            "miss_rate": c.misses / c.acquires if c.acquires else 0.0,
            "inflight_wait_s": s.inflight_wait_s,
            "per_layer": {
                layer: {
                    "hits": c.hits_by_layer.get(layer, 0),
                    "inflight_hits": c.pending_by_layer.get(layer, 0),
                    "misses": c.misses_by_layer.get(layer, 0),
                }
                for layer in layers
            },
            "per_expert": _per_expert(c),
            "resident": len(self.cache.resident()),
            "demand_reads": s.demand_reads,
            "prefetch_reads": s.prefetch_reads,
            "bytes_read": s.bytes_read,
            "bytes_per_token": s.bytes_read / tokens if tokens else 0.0,
            "read_gbps": s.read_speed / 1e9,
            "read_busy_s": s.read_busy_s,
            "cold_read_ms_p50": float(np.percentile(lat, 50)),
            "cold_read_ms_p99": float(np.percentile(lat, 99)),
            "prefetches": c.prefetches,
            "prefetch_used": c.prefetch_used,
            "prefetch_precision": c.prefetch_used / c.prefetches if c.prefetches else 0.0,
            "prefetch_recall": c.prefetch_used / max(c.prefetch_used + c.misses, 1),
            "prefetch_wasted_bytes": c.prefetch_wasted * s.bytes_read // max(reads, 1),
        }


def _per_expert(c) -> dict:
    """{layer: {expert: [found, misses]}} where no layer has more than PER_EXPERT_MAX experts
    (a dashboard's heatmap); {} for models with more."""
    keys = set(c.found_by_expert) | set(c.misses_by_expert)
    if not keys or max(e for _, e in keys) >= PER_EXPERT_MAX:
        return {}
    out: dict = {}
    for key in sorted(keys):
        out.setdefault(key[0], {})[key[1]] = [
            c.found_by_expert.get(key, 0),
            c.misses_by_expert.get(key, 0),
        ]
    return out
