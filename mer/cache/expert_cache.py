"""The RAM tier's bookkeeping: which expert sits in which arena slot, who is using it, and
what to evict. Socket-free and I/O-free: it tells its caller which reads to issue, so the
cache actor is a thin shell around it and tests drive it directly.

Eviction is Belady's MIN with estimated next uses. A forward step visits the MoE layers in
order 0..L-1, so recency misleads: the least recently used experts are the next layers',
needed soonest. For a resident expert x of layer l, with c the layer being served:

    d(x) = (l - c) mod L        layer visits until x's next chance of use (L if l = c and
                                this visit already acquired x)
    p(x) = probability that x is used at that chance (below)

    score(x) = p / (d + L)      evict the lowest; on a tie the most recently used first

the chance of a hit per layer visit of slot time, counting the d visits until the chance
plus one cycle L (a replacement loaded now waits a full cycle for its own first chance).
With p = 1 for all it evicts the largest d, MIN's farthest next use. An expert of the layer
being served that its visit has not acquired (yet) has two possible next chances, and
takes the better one:

    score(x) = max(p * s / L, b / 2L)      now, if the visit still needs it, or at the
                                           layer's next visit if this one does not use it
    s = (k - |V|) / (k - sum of p over V)  how much of the visit is still to come (at most
                                           1; 0 once |V| >= k): V the experts acquired so
                                           far, k the layer's mean visit size (sum u / w)
    b = p(x) given x unused at this visit

Evicting the largest expected next-use distance d + L(1 - p)/p instead measured up to 0.04
lower hit rates on bench/cache.py's Mixtral-like workloads. L is `n_layers` or the highest
layer seen + 1.

p(x) is the predictors' `need` for x when `hint` (or `prefetch`) gave one: it stands for
the next visit of x's layer and is dropped when that visit ends. Otherwise it is a
per-expert first-order Markov estimate from the layer's finished visits, each count decayed
by g = visit_decay per visit of the layer:

    p = (m + a A) / (n + a)            if x was used at its layer's last visit
    p = (u - m + a B) / (w - n + a)    if not

    w: visits;  u: visits that used x;  n: visits that followed a visit using x;
    m: those of the n that used x again;  a = prior_weight;
    A = (sum m + q) / (sum n + 1),  B = (sum u - sum m + q) / (E w - sum n + 1): the same
    ratios pooled over the layer's E experts (E = highest expert id seen + 1), with
    q = sum u / (E w) the layer's mean share;  p = 0.5 before the layer's first visit ends.

During a visit of layer c its experts acquired so far count as used at the last visit. A
visit ends when an acquire names another layer, or an expert the visit already acquired.

Pinning: the `pin_budget` ready experts of highest share u / w (the decayed fraction of their
layer's visits that used them), among those with share >= pin_min_share, are never evicted;
as an expert cools its share decays and its pin goes to a hotter one. Leased slots (in use
by a computation) and loading ones are never evicted; a read is issued once per expert
however many acquire it while it is in flight. A prefetch of x with probability `need` is
scored with p = need and evicts only an expert scoring lower.

Cost: each layer keeps its resident experts ordered by p, re-sorted only after one of its
visits or a hint naming it; an eviction takes the first evictable expert of each layer's
order (two for the layer being served, plus its experts used at the last visit or hinted):
O(layers + experts of a visit) per miss, O(resident) at worst (most leased or pinned).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from enum import Enum

ExpertKey = tuple[int, int]  # (layer, expert)
_UNSEEN_P = 0.5  # p of an expert of a layer with no finished visit


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
    rank: tuple[float, int, int] | None = None  # (p, -last_use, expert) in its layer's order


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
    pending_by_layer: dict[int, int] = field(default_factory=dict)
    misses_by_layer: dict[int, int] = field(default_factory=dict)
    found_by_expert: dict[ExpertKey, int] = field(default_factory=dict)  # hits + pending hits
    misses_by_expert: dict[ExpertKey, int] = field(default_factory=dict)

    @property
    def acquires(self) -> int:
        return self.hits + self.pending_hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Share of acquires that found the expert ready (a read still in flight is not a hit)."""
        return self.hits / self.acquires if self.acquires else 0.0

    @property
    def pending_rate(self) -> float:
        """Share of acquires that found a read of the expert in flight (read ahead)."""
        return self.pending_hits / self.acquires if self.acquires else 0.0


class CacheFullError(RuntimeError):
    """Every slot is leased, pinned or loading: the caller must release leases first."""


class _LayerStats:
    """Decayed counts over one layer's finished visits (see the module docstring)."""

    __slots__ = ("visits", "w", "u", "n", "m", "experts", "last", "n_experts", "hot")

    def __init__(self) -> None:
        self.visits = 0  # finished visits
        self.w = 0.0  # decayed visit count
        self.u = self.n = self.m = 0.0  # the layer's totals of the per-expert counts
        self.experts: dict[int, list[float]] = {}  # e -> [u, n, m, as of visit]
        self.last: frozenset[int] = frozenset()  # experts the last finished visit used
        self.n_experts = 0  # highest expert id seen + 1
        self.hot: dict[int, float] = {}  # experts whose share is at least the pin floor

    def finish(self, used: set[int], g: float, floor: float) -> None:
        prev = self.last
        both = used & prev
        self.visits += 1
        self.w = self.w * g + 1.0
        self.u = self.u * g + len(used)
        self.n = self.n * g + len(prev)
        self.m = self.m * g + len(both)
        for e in used | prev:
            rec = self.experts.get(e)
            if rec is None:
                rec = self.experts[e] = [0.0, 0.0, 0.0, self.visits]
            f = g ** (self.visits - rec[3])
            rec[0] = rec[0] * f + (e in used)
            rec[1] = rec[1] * f + (e in prev)
            rec[2] = rec[2] * f + (e in both)
            rec[3] = self.visits
        self.last = frozenset(used)
        if used:
            self.n_experts = max(self.n_experts, max(used) + 1)
        # a share only falls while unused: the hot ones were hot before or used now
        hot = {}
        for e in self.hot.keys() | used:
            share = self.share(e, g)
            if share >= floor:
                hot[e] = share
        self.hot = hot

    def share(self, e: int, g: float) -> float:
        rec = self.experts.get(e)
        if rec is None or not self.w:
            return 0.0
        return rec[0] * g ** (self.visits - rec[3]) / self.w

    def prob(self, e: int, used_last: bool, g: float, a: float) -> float:
        if not self.w:
            return _UNSEEN_P
        width = self.w * max(self.n_experts, 1)
        q = self.u / width  # the layer's mean share, a prior for the pooled ratios
        rec = self.experts.get(e)
        u = n = m = 0.0
        if rec is not None:
            f = g ** (self.visits - rec[3])
            u, n, m = rec[0] * f, rec[1] * f, rec[2] * f
        if used_last:
            pooled = (self.m + q) / (self.n + 1.0)
            p = (m + a * pooled) / (n + a)
        else:
            pooled = (self.u - self.m + q) / (width - self.n + 1.0)
            p = (u - m + a * pooled) / (self.w - n + a)
        return min(1.0, max(0.0, p))


class ExpertCache:
    """Slots of the RAM tier and the policy that fills and empties them."""

    def __init__(
        self,
        n_slots: int,
        *,
        pin_budget: int = 0,
        pin_min_share: float = 0.5,
        n_layers: int | None = None,
        visit_decay: float = 0.99,
        prior_weight: float = 4.0,
    ) -> None:
        if n_slots < 1:
            raise ValueError("n_slots must be at least 1")
        if not 0 <= pin_budget < n_slots:
            raise ValueError("pin_budget must be between 0 and n_slots - 1")
        if not 0.0 < visit_decay <= 1.0:
            raise ValueError("visit_decay must be in (0, 1]")
        if prior_weight <= 0:
            raise ValueError("prior_weight must be positive")
        self.n_slots = n_slots
        self.pin_budget = pin_budget
        self.pin_min_share = pin_min_share
        self.visit_decay = visit_decay
        self.prior_weight = prior_weight
        self.n_layers = max(0, n_layers or 0)  # grows with the highest layer seen
        self.now = 0
        self.stats = CacheStats()
        self._entries: dict[ExpertKey, _Entry] = {}
        self._by_layer: dict[int, dict[int, _Entry]] = {}  # resident entries per layer
        self._order: dict[int, list[tuple[float, int, int]]] = {}  # layer -> (p, -last_use, e)
        self._free = list(range(n_slots - 1, -1, -1))
        self._at: dict[int, ExpertKey] = {}  # slot -> the expert in it
        self.vacated: list[int] = []  # slots beyond a shrunk budget that emptied (resize)
        self._need: dict[ExpertKey, float] = {}
        self._layers: dict[int, _LayerStats] = {}
        self._current: int | None = None  # the layer being served
        self._visit: set[int] = set()  # experts its current visit acquired
        self._visit_p = 0.0  # the sum of their p when acquired
        self._pins: set[ExpertKey] | None = None  # pinned(), until a share or residency changes

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

    def key_at(self, slot: int) -> ExpertKey | None:
        """The expert in `slot` (ready or loading), or None."""
        return self._at.get(slot)

    # -- changes of budget and restarts ------------------------------------------------------
    def resize(self, n_slots: int, pin_budget: int | None = None) -> None:
        """Use slots 0..n_slots-1 from now on (and pin up to `pin_budget` experts). Growing
        adds free slots; shrinking evicts what sits beyond the new end now, or, if it is
        leased or loading, as soon as it is released and evicted: each slot beyond the end
        that empties is listed in `vacated` (its memory can go)."""
        if n_slots < 1:
            raise ValueError("n_slots must be at least 1")
        old, self.n_slots = self.n_slots, n_slots
        if pin_budget is not None:
            self.pin_budget = pin_budget
        self.pin_budget = min(self.pin_budget, n_slots - 1)
        self._pins = None
        if n_slots > old:
            taken = set(self._at)
            self._free[:0] = [s for s in range(n_slots - 1, old - 1, -1) if s not in taken]
            return
        gone = [s for s in self._free if s >= n_slots]
        self._free = [s for s in self._free if s < n_slots]
        self.vacated += gone
        for slot in sorted(s for s in self._at if s >= n_slots):
            entry = self._entries[self._at[slot]]
            if entry.ready and not entry.leases:
                self._drop(entry.key)

    def restore(self, key: ExpertKey, slot: int, leases: int = 0) -> None:
        """After a restart: `key` is ready in `slot` (taken from the free slots) with
        `leases` leases."""
        self._free.remove(slot)
        self._see(*key)
        self._add(_Entry(key, slot, ready=True, leases=leases))

    def hold(self, slot: int) -> None:
        """After a restart: keep `slot` out of use until `unhold` (a read into it may still
        be landing)."""
        self._free.remove(slot)

    def unhold(self, slot: int) -> None:
        if slot < self.n_slots:
            self._free.append(slot)
        else:
            self.vacated.append(slot)

    def reclaim_leases(self) -> int:
        """Forget every lease (their holder is gone); how many there were."""
        n = 0
        for entry in self._entries.values():
            n += entry.leases
            entry.leases = 0
        self._evict_beyond_end()
        return n

    def _evict_beyond_end(self) -> None:
        for slot in [s for s in self._at if s >= self.n_slots]:
            entry = self._entries[self._at[slot]]
            if entry.ready and not entry.leases:
                self._drop(entry.key)

    def share(self, key: ExpertKey) -> float:
        """The decayed fraction of its layer's finished visits that used `key`."""
        stats = self._layers.get(key[0])
        return stats.share(key[1], self.visit_decay) if stats else 0.0

    def pinned(self) -> set[ExpertKey]:
        """Resident experts that are currently pinned."""
        return set(self._pinned())

    def _pinned(self) -> set[ExpertKey]:
        if not self.pin_budget:
            return set()
        if self._pins is None:
            hot = []
            for layer, stats in self._layers.items():
                for e, share in stats.hot.items():
                    entry = self._entries.get((layer, e))
                    if entry is not None and entry.ready:
                        hot.append((-share, (layer, e)))
            self._pins = {k for _, k in heapq.nsmallest(self.pin_budget, hot)}
        return self._pins

    def need_probability(self, key: ExpertKey) -> float:
        """p(key): the probability that `key` is used at its layer's next visit."""
        layer, e = key
        need = self._need.get(key)
        if need is not None:
            return need
        stats = self._layers.get(layer)
        if stats is None:
            return _UNSEEN_P
        used = e in stats.last or (layer == self._current and e in self._visit)
        return stats.prob(e, used, self.visit_decay, self.prior_weight)

    def distance(self, key: ExpertKey) -> int:
        """d: layer visits until `key` may next be used (0 or L for the layer being served:
        L for the experts its visit already acquired, 0 for the others)."""
        layer, expert = key
        n = max(self.n_layers, 1)
        if layer == self._current:
            return n if expert in self._visit else 0
        current = -1 if self._current is None else self._current
        return (layer - current) % n or n

    def score(self, key: ExpertKey) -> float:
        """The chance of a hit at the expert's next chance per layer visit of slot time,
        p / (d + L): the lowest-scoring evictable expert is evicted first."""
        return self._score(key, self.need_probability(key))

    def _score(self, key: ExpertKey, p: float) -> float:
        layer, expert = key
        span = max(self.n_layers, 1)
        if layer != self._current or expert in self._visit:
            return p / (self.distance(key) + span)
        # the layer being served, not acquired (yet): now, if the visit still needs it, or at
        # the layer's next visit, then unused at this one (p = b)
        chance_now = p * self._still_needed()
        return max(chance_now / span, self._stale_probability(key) / (span + span))

    def _still_needed(self) -> float:
        """How much of the current visit is still to come: (k - |V|) / (k - sum of p over V),
        k the layer's mean visit size and V the experts acquired so far."""
        stats = self._layers.get(self._current)
        if stats is None or not stats.w:
            return 1.0
        mean = stats.u / stats.w
        left = mean - len(self._visit)
        return min(1.0, left / max(mean - self._visit_p, 1e-9)) if left > 0 else 0.0

    def _stale_probability(self, key: ExpertKey) -> float:
        """b: p of `key` at its layer's next visit if the current one does not use it."""
        stats = self._layers.get(key[0])
        if stats is None:
            return _UNSEEN_P
        return stats.prob(key[1], False, self.visit_decay, self.prior_weight)

    # -- demand path ---------------------------------------------------------------------
    def acquire(self, key: ExpertKey) -> tuple[Status, int]:
        """Lease `key` for a computation: its slot and whether it is ready, loading, or must
        be read by the caller (then call complete()). Raises CacheFullError if no slot can
        be freed."""
        self.now += 1
        layer, expert = key
        self._see(layer, expert)
        if layer != self._current or expert in self._visit:
            self._end_visit()
            self._current = layer
        p = self.need_probability(key)  # before it joins the visit
        self._visit_p += p
        self._visit.add(expert)
        entry = self._entries.get(key)
        if entry is not None:
            entry.leases += 1
            entry.last_use = self.now
            self._rerank(entry)
            if entry.prefetched:
                entry.prefetched = False
                self.stats.prefetch_used += 1
            found = self.stats.found_by_expert
            found[key] = found.get(key, 0) + 1
            if entry.ready:
                self.stats.hits += 1
                self.stats.hits_by_layer[layer] = self.stats.hits_by_layer.get(layer, 0) + 1
                return Status.HIT, entry.slot
            self.stats.pending_hits += 1
            self.stats.pending_by_layer[layer] = self.stats.pending_by_layer.get(layer, 0) + 1
            return Status.PENDING, entry.slot
        slot = self._take_slot(for_score=None)
        if slot is None:
            self._visit.discard(expert)  # not acquired after all: a retry stays in the visit
            self._visit_p -= p
            raise CacheFullError("every expert slot is leased, pinned or loading")
        self._add(_Entry(key, slot, leases=1, last_use=self.now))
        self.stats.misses += 1
        self.stats.misses_by_layer[layer] = self.stats.misses_by_layer.get(layer, 0) + 1
        self.stats.misses_by_expert[key] = self.stats.misses_by_expert.get(key, 0) + 1
        return Status.MISS, slot

    def complete(self, key: ExpertKey, ok: bool = True) -> None:
        """The read of `key` finished. On failure the slot is freed (leases included: every
        waiter gets the error from the caller)."""
        entry = self._entries[key]
        if ok:
            if not entry.ready:
                entry.ready = True
                if key[1] in self._layers[key[0]].hot:
                    self._pins = None
            if entry.slot >= self.n_slots and not entry.leases:
                self._drop(key)  # beyond a shrunk budget: its slot goes
        else:
            self._drop(key)

    def release(self, key: ExpertKey) -> None:
        entry = self._entries[key]
        if entry.leases <= 0:
            raise ValueError(f"release of {key} without a lease")
        entry.leases -= 1
        if entry.slot >= self.n_slots and not entry.leases and entry.ready:
            self._drop(key)  # beyond a shrunk budget: its slot goes

    # -- prediction and prefetch -----------------------------------------------------------
    def hint(self, needs: dict[ExpertKey, float]) -> None:
        """The predictors' current probabilities that experts are used at their layer's next
        visit; they replace the previous hint and override the cache's own estimate."""
        old, self._need = self._need, {k: min(1.0, max(0.0, float(p))) for k, p in needs.items()}
        for layer, expert in self._need:
            self._see(layer, expert)
        for layer in {k[0] for k in old} | {k[0] for k in self._need}:
            self._order.pop(layer, None)

    def prefetch(self, key: ExpertKey, need: float) -> int | None:
        """Admit a read-ahead of `key` (used at its layer's next visit with probability
        `need`) if a slot is free or the victim scores lower than the prefetch would: leased,
        pinned, loading and higher-scoring experts are never evicted for it. Returns the slot
        to read into, or None."""
        if key in self._entries:
            return None
        need = min(1.0, max(0.0, float(need)))
        self._see(*key)
        slot = self._take_slot(for_score=self._score(key, need))
        if slot is None:
            return None
        self._need[key] = need
        self._add(_Entry(key, slot, last_use=self.now, prefetched=True))
        self.stats.prefetches += 1
        return slot

    # -- internals -------------------------------------------------------------------------
    def _see(self, layer: int, expert: int) -> None:
        if layer >= self.n_layers:
            self.n_layers = layer + 1
        stats = self._layers.get(layer)
        if stats is None:
            stats = self._layers[layer] = _LayerStats()
        if expert >= stats.n_experts:  # the layer's pooled priors change
            stats.n_experts = expert + 1
            self._order.pop(layer, None)

    def _end_visit(self) -> None:
        layer = self._current
        if layer is None:
            return
        self._layers[layer].finish(self._visit, self.visit_decay, self.pin_min_share)
        self._pins = None
        self._visit = set()
        self._visit_p = 0.0
        if any(k[0] == layer for k in self._need):
            self._need = {k: p for k, p in self._need.items() if k[0] != layer}
        self._order.pop(layer, None)

    def _victim(self) -> tuple[float, int, ExpertKey] | None:
        """(score, -last_use, key) of the lowest-scoring evictable expert. Within a layer the
        score rises with p, so each layer's order by p gives its candidate: the first
        evictable one. The layer being served gives one for the experts its visit acquired
        and one for the others, and its experts whose p is not their b (used at the last
        visit, or hinted) are scored one by one."""
        span = max(self.n_layers, 1)
        current = -1 if self._current is None else self._current
        pins = self._pinned()
        best = None
        for layer, entries in self._by_layer.items():
            order = self._order.get(layer)
            if order is None:
                for e, entry in entries.items():
                    entry.rank = (self.need_probability((layer, e)), -entry.last_use, e)
                order = self._order[layer] = sorted(entry.rank for entry in entries.values())
            if layer == current:
                candidate = self._victim_served(layer, entries, order, pins)
                if candidate is not None and (best is None or candidate < best):
                    best = candidate
                continue
            scale = ((layer - current) % span or span) + span
            for p, neg_use, e in order:
                entry = entries[e]
                if entry.ready and not entry.leases and (layer, e) not in pins:
                    candidate = (p / scale, neg_use, (layer, e))
                    if best is None or candidate < best:
                        best = candidate
                    break
        return best

    def _victim_served(self, layer, entries, order, pins) -> tuple[float, int, ExpertKey] | None:
        visit = self._visit
        last = self._layers[layer].last
        exact = {e for e in last if e in entries and e not in visit}
        exact.update(k[1] for k in self._need if k[0] == layer and k[1] in entries)
        exact -= visit
        best = None
        for e in exact:
            entry = entries[e]
            if entry.ready and not entry.leases and (layer, e) not in pins:
                candidate = (self.score((layer, e)), -entry.last_use, (layer, e))
                if best is None or candidate < best:
                    best = candidate
        # the first evictable of each group in p order; stop once both are settled
        left = {True: sum(e in entries for e in visit)}
        left[False] = len(entries) - left[True] - len(exact)
        for _, neg_use, e in order:
            if not left[True] and not left[False]:
                break
            if e in exact:
                continue
            group = e in visit
            if not left[group]:
                continue
            left[group] -= 1
            entry = entries[e]
            if entry.ready and not entry.leases and (layer, e) not in pins:
                left[group] = 0
                candidate = (self.score((layer, e)), neg_use, (layer, e))
                if best is None or candidate < best:
                    best = candidate
        return best

    def _take_slot(self, for_score: float | None) -> int | None:
        """A free slot, or one freed by evicting the lowest-scoring evictable expert if it
        scores below `for_score` (None: whatever it scores)."""
        if self._free:
            return self._free.pop()
        best = self._victim()
        if best is None or (for_score is not None and best[0] >= for_score):
            return None
        victim = best[2]
        entry = self._entries[victim]
        if entry.prefetched:
            self.stats.prefetch_wasted += 1
        self.stats.evictions += 1
        self._drop(victim)
        return self._free.pop() if self._free else None  # (a slot beyond a shrunk end goes)

    def _rerank(self, entry: _Entry) -> None:
        """Move `entry` to its place in its layer's order after its p or last use changed."""
        order = self._order.get(entry.key[0])
        if order is None:
            return
        if entry.rank is not None:
            del order[bisect.bisect_left(order, entry.rank)]
        entry.rank = (self.need_probability(entry.key), -entry.last_use, entry.key[1])
        bisect.insort(order, entry.rank)

    def _add(self, entry: _Entry) -> None:
        layer, expert = entry.key
        self._entries[entry.key] = entry
        self._at[entry.slot] = entry.key
        self._by_layer.setdefault(layer, {})[expert] = entry
        self._rerank(entry)

    def _drop(self, key: ExpertKey) -> None:
        entry = self._entries.pop(key)
        layer, expert = key
        if self._pins and key in self._pins:
            self._pins = None
        del self._by_layer[layer][expert]
        if not self._by_layer[layer]:
            del self._by_layer[layer]
            self._order.pop(layer, None)
        else:
            order = self._order.get(layer)
            if order is not None and entry.rank is not None:
                del order[bisect.bisect_left(order, entry.rank)]
        entry.rank = None
        del self._at[entry.slot]
        if entry.slot < self.n_slots:
            self._free.append(entry.slot)
        else:
            self.vacated.append(entry.slot)
