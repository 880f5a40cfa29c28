"""ExpertCache invariants: leases, dedup, pinning and prefetch admission."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mer.cache.expert_cache import CacheFullError, ExpertCache, Status


class ProbeCache(ExpertCache):
    """Checks, at the moment of every eviction, that the victim was evictable."""

    def _take_slot(self, for_score):
        self._for_score = for_score
        self._evicting = True
        try:
            return super()._take_slot(for_score)
        finally:
            self._evicting = False

    def _drop(self, key):
        if getattr(self, "_evicting", False):
            entry = self._entries[key]
            assert entry.leases == 0, f"evicted leased {key}"
            assert entry.ready, f"evicted loading {key}"
            assert key not in self.pinned(), f"evicted pinned {key}"
            assert self.score(key) < self._for_score, f"evicted hotter {key}"
        super()._drop(key)


KEYS = st.tuples(st.integers(0, 2), st.integers(0, 5))


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = ProbeCache(5, pin_budget=2, pin_min_freq=2.0, decay=0.9)
        self.leases: dict[tuple[int, int], int] = {}
        self.leased_slot: dict[tuple[int, int], int] = {}
        self.loading: set[tuple[int, int]] = set()

    @rule(key=KEYS)
    def acquire(self, key):
        try:
            status, slot = self.cache.acquire(key)
        except CacheFullError:
            pinned = self.cache.pinned()
            for k in self.cache.resident():
                assert self.cache.leases(k) > 0 or not self.cache.is_ready(k) or k in pinned
            return
        if status is Status.MISS:
            assert key not in self.loading, "second read issued for an expert in flight"
            self.loading.add(key)
        if key in self.leased_slot:
            assert self.leased_slot[key] == slot
        self.leases[key] = self.leases.get(key, 0) + 1
        self.leased_slot[key] = slot

    @precondition(lambda self: self.loading)
    @rule(data=st.data(), ok=st.booleans())
    def complete(self, data, ok):
        key = data.draw(st.sampled_from(sorted(self.loading)))
        self.loading.discard(key)
        self.cache.complete(key, ok)
        if not ok:  # every waiter is told; their leases end with the slot
            self.leases.pop(key, None)
            self.leased_slot.pop(key, None)

    @precondition(lambda self: any(k not in self.loading for k in self.leases))
    @rule(data=st.data())
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(k for k in self.leases if k not in self.loading)))
        self.cache.release(key)
        self.leases[key] -= 1
        if not self.leases[key]:
            del self.leases[key], self.leased_slot[key]

    @rule(key=KEYS, need=st.floats(0, 1))
    def prefetch(self, key, need):
        slot = self.cache.prefetch(key, need)
        if slot is not None:
            self.loading.add(key)

    @rule(needs=st.dictionaries(KEYS, st.floats(0, 1), max_size=4))
    def hint(self, needs):
        self.cache.hint(needs)

    @invariant()
    def leased_experts_stay_put(self):
        for key, slot in self.leased_slot.items():
            assert self.cache.slot_of(key) == slot
            assert self.cache.leases(key) == self.leases[key]

    @invariant()
    def slots_are_distinct_and_bounded(self):
        slots = [self.cache.slot_of(k) for k in self.cache.resident()]
        assert len(slots) == len(set(slots)) <= self.cache.n_slots
        assert set(slots).isdisjoint(self.cache._free)
        assert len(slots) + len(self.cache._free) == self.cache.n_slots

    @invariant()
    def pins_within_budget(self):
        pinned = self.cache.pinned()
        assert len(pinned) <= self.cache.pin_budget
        assert all(self.cache.freq(k) >= self.cache.pin_min_freq for k in pinned)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_lru_order_without_pins():
    cache = ExpertCache(2, freq_weight=0.0)
    for key in [(0, 0), (0, 1)]:
        cache.acquire(key)
        cache.complete(key)
        cache.release(key)
    cache.acquire((0, 0))
    cache.release((0, 0))
    status, _ = cache.acquire((0, 2))  # evicts (0, 1), the least recently used
    assert status is Status.MISS
    assert cache.slot_of((0, 1)) is None and cache.slot_of((0, 0)) is not None


def test_hot_expert_is_pinned_then_released_when_cold():
    cache = ExpertCache(3, pin_budget=1, pin_min_freq=3.0, decay=0.95, freq_weight=0.0)
    for _ in range(5):
        cache.acquire((0, 0))
        cache.complete((0, 0)) if not cache.is_ready((0, 0)) else None
        cache.release((0, 0))
    assert cache.pinned() == {(0, 0)}
    for e in range(1, 12):  # a long run of other experts cools (0, 0) down
        status, _ = cache.acquire((1, e))
        cache.complete((1, e))
        cache.release((1, e))
        if e < 8:  # still warm: 4.5 * 0.95**8 > 3
            assert cache.slot_of((0, 0)) is not None, "pinned expert evicted"
    assert (0, 0) not in cache.pinned()
    assert cache.slot_of((0, 0)) is None


def test_prefetch_never_evicts_hotter_and_is_promoted_when_used():
    cache = ExpertCache(1, freq_weight=0.0)
    cache.acquire((0, 0))
    cache.complete((0, 0))
    cache.release((0, 0))
    assert cache.prefetch((0, 1), need=0.1) is None  # (0, 0) was just used: hotter
    cache.now += 1000  # long ago now
    slot = cache.prefetch((0, 1), need=0.9)
    assert slot is not None
    cache.complete((0, 1))
    status, same = cache.acquire((0, 1))
    assert (status, same) == (Status.HIT, slot)
    assert cache.stats.prefetch_used == 1


def test_full_cache_of_leases_refuses():
    cache = ExpertCache(2)
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    with pytest.raises(CacheFullError):
        cache.acquire((0, 2))
