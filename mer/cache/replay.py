"""Replaying a recorded routing trace through the cache and the read-ahead, in simulated time.

A forward pass with streamed experts is, for the cache, a sequence of layer visits: the
visit's experts are acquired (hits ready at once, misses read), read-ahead for the next layer
is considered (`mer.cache.readahead`, with the trace's recorded gate-lookahead predictions and
their running precision by rank), the layer computes once its experts are there, and the next
visit begins. `replay` plays that out against one disk (reads in submission order at
`read_bytes_per_s`) and a CPU that takes `layer_s` per layer visit, with the same
`ExpertCache` and admission rule the streamer uses; so the read-ahead's bytes and time can be
compared with none at all, deterministically, on real routing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mer.cache.expert_cache import CacheFullError, ExpertCache, ExpertKey, Status
from mer.cache.readahead import Candidate, GateCalibration, WasteBudget, admit
from mer.cache.trace import RoutingTrace


@dataclass
class ReplayResult:
    bytes_read: int = 0
    time_s: float = 0.0
    stall_s: float = 0.0
    prefetches: int = 0
    prefetch_used: int = 0
    misses: int = 0
    hits: int = 0
    inflight_hits: int = 0

    @property
    def precision(self) -> float:
        return self.prefetch_used / self.prefetches if self.prefetches else 0.0


def replay(
    trace: RoutingTrace,
    slots: int,
    expert_bytes: int,
    read_bytes_per_s: float,
    layer_s: float,
    *,
    read_ahead: bool = True,
    k: int = 2,
    pin_fraction: float = 0.25,
    queue_depth: int = 16,
) -> ReplayResult:
    """Play `trace` through a cache of `slots` experts of `expert_bytes` each (module
    docstring); `k` experts per token, as the gate predictions were ranked."""
    pins = min(slots - 1, int(slots * pin_fraction))
    cache = ExpertCache(slots, pin_budget=pins, n_layers=trace.n_layers)
    calibration = GateCalibration(k)
    budget = WasteBudget()
    result = ReplayResult()
    disk_free = 0.0  # when the disk finishes what it has been given
    flights: dict[ExpertKey, float] = {}  # key -> completion time
    now = 0.0
    t_read = expert_bytes / read_bytes_per_s

    def read(key: ExpertKey) -> float:
        nonlocal disk_free
        budget.earn()
        disk_free = max(disk_free, now) + t_read
        flights[key] = disk_free
        result.bytes_read += expert_bytes
        return disk_free

    for step, gates in zip(trace.steps, trace.gates, strict=True):
        for layer, used in enumerate(step):
            for key in [key for key, done in flights.items() if done <= now]:
                cache.complete(key)
                del flights[key]
            predicted = {e: r for e, r in gates[layer]} if gates[layer] else None
            if predicted is not None:
                calibration.update(predicted, used)
            ready = now
            leased = []
            for e in used:
                key = (layer, e)
                while True:
                    try:
                        status, _ = cache.acquire(key)
                        break
                    except CacheFullError:  # every slot busy: wait for the next read
                        first = min(flights, key=flights.__getitem__)
                        now = max(now, flights.pop(first))
                        cache.complete(first)
                leased.append(key)
                if status is Status.HIT:
                    result.hits += 1
                elif status is Status.PENDING:
                    result.inflight_hits += 1
                    ready = max(ready, flights[key])
                else:
                    result.misses += 1
                    ready = max(ready, read(key))
            nxt = gates[layer + 1] if layer + 1 < len(step) else []
            hint = {(layer + 1, e): calibration.probability(r) for e, r in nxt}
            cache.hint(hint)
            if read_ahead and hint:
                candidates = [Candidate(key, p, expert_bytes) for key, p in hint.items()]
                for c in admit(candidates, layer_s, read_bytes_per_s, budget):
                    if len(flights) >= queue_depth:
                        break
                    if cache.prefetch(c.key, c.p) is not None:
                        result.prefetches += 1
                        read(c.key)
            result.stall_s += ready - now
            now = ready + layer_s
            for key in leased:
                if key in flights and flights[key] <= now:
                    cache.complete(key)
                    del flights[key]
                cache.release(key)
    result.prefetch_used = cache.stats.prefetch_used
    result.time_s = max(now, disk_free)
    return result
