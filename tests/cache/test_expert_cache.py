"""ExpertCache: leases, dedup, pinning, prefetch admission, and the eviction policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mer.cache.expert_cache import CacheFullError, ExpertCache, Status
from mer.cache.trace import simulate_belady, simulate_lru, simulate_mer


class ProbeCache(ExpertCache):
    """Checks, at the moment of every eviction, that the victim was evictable and that it
    was the lowest-scoring evictable expert (against a brute-force scan of every resident),
    and that the cached per-layer orders agree with fresh estimates."""

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
            pinned = self.pinned()
            assert entry.leases == 0, f"evicted leased {key}"
            assert entry.ready, f"evicted loading {key}"
            assert key not in pinned, f"evicted pinned {key}"
            if self._for_score is not None:
                assert self.score(key) < self._for_score, f"evicted hotter {key}"
            evictable = [
                (self.score(k), -e.last_use, k)
                for k, e in self._entries.items()
                if e.ready and not e.leases and k not in pinned
            ]
            assert min(evictable)[2] == key, f"evicted {key}, not the lowest {min(evictable)}"
            for layer, order in self._order.items():  # the per-layer orders are up to date
                assert sorted(order) == order and len(order) == len(self._by_layer[layer])
                for p, neg_use, e in order:
                    assert p == self.need_probability((layer, e)), f"stale p of {(layer, e)}"
                    assert neg_use == -self._entries[(layer, e)].last_use
        super()._drop(key)


def run(cache, keys, complete=True):
    """Acquire, complete and release each key in turn."""
    for key in keys:
        status, _ = cache.acquire(key)
        if complete and status is Status.MISS:
            cache.complete(key)
        cache.release(key)


KEYS = st.tuples(st.integers(0, 2), st.integers(0, 5))


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = ProbeCache(5, pin_budget=2, pin_min_share=0.3, visit_decay=0.7)
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
        elif status is Status.PENDING:
            assert key in self.loading
        else:
            assert key not in self.loading
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
        resident = key in self.cache.resident()
        slot = self.cache.prefetch(key, need)
        if slot is not None:
            assert not resident
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
    def pins_are_the_hottest_ready_experts(self):
        pinned = self.cache.pinned()
        assert len(pinned) <= self.cache.pin_budget
        assert all(self.cache.is_ready(k) for k in pinned)
        assert all(self.cache.share(k) >= self.cache.pin_min_share for k in pinned)
        others = [
            self.cache.share(k)
            for k in self.cache.resident()
            if self.cache.is_ready(k) and k not in pinned
        ]
        if others and max(others) >= self.cache.pin_min_share:
            assert len(pinned) == self.cache.pin_budget
            assert max(others) <= min(self.cache.share(k) for k in pinned)

    @invariant()
    def scores_follow_the_formula(self):
        span = self.cache.n_layers
        for key in self.cache.resident():
            p, d = self.cache.need_probability(key), self.cache.distance(key)
            assert 0.0 <= p <= 1.0 and 0 <= d <= span
            score = self.cache.score(key)
            if d:
                assert score == p / (d + span)
            else:  # the layer being served, not acquired: now or at its next visit
                stale = self.cache._stale_probability(key) / (2 * span)
                assert stale <= score <= max(p / span, stale)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("seed", range(6))
def test_victims_match_a_brute_force_scan(seed):
    """Layer-cyclic visits with leases held through each visit, failed reads, hints,
    read-aheads and expert ids appearing over time: at every eviction ProbeCache checks the
    victim against a full scan."""
    rng = random.Random(seed)
    layers, experts = 5, 6
    cache = ProbeCache(9, pin_budget=seed % 3, pin_min_share=0.4, n_layers=layers)
    for step in range(120):
        for layer in range(layers):
            seen = min(experts, 3 + (step + layer) // 20)  # new ids change a layer's priors
            chosen = rng.sample(range(seen), rng.choice([1, 2, 2, 3]))
            leased = []
            for e in chosen:
                status, _ = cache.acquire((layer, e))
                if status is Status.MISS:
                    cache.complete((layer, e), ok=rng.random() > 0.05)
                if cache.slot_of((layer, e)) is not None:
                    leased.append((layer, e))
                if rng.random() < 0.3 and leased:  # computed: released early
                    cache.release(leased.pop(0))
            for key in leased:
                cache.release(key)
            nxt = (layer + 1) % layers
            if rng.random() < 0.5:
                cache.hint({(nxt, e): rng.random() for e in rng.sample(range(experts), 2)})
            if rng.random() < 0.5:
                key = (nxt, rng.randrange(experts))
                if cache.prefetch(key, rng.random()) is not None:
                    cache.complete(key)
    assert cache.stats.evictions > 300


def test_probability_estimates_follow_the_counts():
    # layer 0 uses {0}, {0}, {1}, {0} (layer 1 in between ends each visit); no decay
    cache = ExpertCache(8, n_layers=2, visit_decay=1.0, prior_weight=4.0)
    for experts in ([0], [0], [1], [0]):
        run(cache, [(0, e) for e in experts] + [(1, 5)])
    # w = 4 visits; u: 3 for expert 0, 1 for expert 1 (sum 4); n: 2 and 1 (sum 3); m: 1 and 0
    # E = 2, q = 4 / 8; A = (1 + q) / (3 + 1); B = (4 - 1 + q) / (8 - 3 + 1)
    a_pool, b_pool = 1.5 / 4, 3.5 / 6
    p0 = (1 + 4 * a_pool) / (2 + 4)  # expert 0 was used at the last visit
    p1 = (1 - 0 + 4 * b_pool) / (4 - 1 + 4)  # expert 1 was not
    assert cache.need_probability((0, 0)) == pytest.approx(p0) == pytest.approx(0.4166667)
    assert cache.need_probability((0, 1)) == pytest.approx(p1) == pytest.approx(0.4761905)
    assert cache.share((0, 0)) == pytest.approx(0.75) and cache.share((0, 1)) == 0.25
    # layer 1 is being served (its expert 5 acquired, d = L): layer 0 comes next, d = 1
    assert cache.distance((0, 0)) == 1
    assert cache.distance((1, 5)) == 2 and cache.distance((1, 3)) == 0
    assert cache.score((0, 0)) == pytest.approx(p0 / (1 + 2))
    # a hint overrides the estimate until layer 0's next visit ends
    cache.hint({(0, 1): 0.9})
    assert cache.need_probability((0, 1)) == pytest.approx(0.9)
    run(cache, [(0, 0), (1, 5)])
    assert cache.need_probability((0, 1)) < 0.9


def test_on_a_fixed_cycle_it_is_belady():
    # one expert per layer, the same every step: MIN keeps C - 1 of them, LRU none
    seq = [(layer, 0) for _ in range(30) for layer in range(4)]
    for capacity in (2, 3):
        assert simulate_lru(seq, capacity) == 0.0
        assert simulate_mer(seq, capacity, pin_fraction=0.0) == simulate_belady(seq, capacity)
    assert simulate_mer(seq, 3) == pytest.approx(0.65)


def test_the_next_layers_experts_outlive_the_one_just_used():
    cache = ExpertCache(3, n_layers=3)
    for _ in range(3):
        run(cache, [(0, 0), (1, 0), (2, 0)])
    # layer 0 now takes a second expert: LRU would evict (1, 0), needed next; MIN evicts
    # (0, 0), just used and needed last (each was used at every visit: p = 1)
    run(cache, [(0, 0), (0, 1)])
    assert [cache.distance(k) for k in [(0, 0), (1, 0), (2, 0)]] == [3, 1, 2]
    assert cache.slot_of((0, 0)) is None
    assert cache.slot_of((1, 0)) is not None and cache.slot_of((2, 0)) is not None


def test_the_layer_being_served_keeps_what_it_may_still_need():
    cache = ExpertCache(5, n_layers=3, visit_decay=1.0)
    for step in range(4):  # layer 0 uses experts 0 and 1, layer 2 a new expert each step
        run(cache, [(0, 0), (0, 1), (1, 0), (2, 4 + step)])
    cache.hint({(0, 2): 0.2})  # its p when acquired: 0.2
    cache.acquire((0, 2))  # one of layer 0's two acquired: 0 or 1 may still come
    assert cache.slot_of((2, 7)) is None  # layer 2's one-off went instead
    still = (2 - 1) / (2 - 0.2)  # (k - |V|) / (k - sum of p over V), k = 2
    p0 = cache.need_probability((0, 0))
    # w = 4 visits; expert 0: u = 4, n = m = 3; sums 8, 6, 6 over E = 3 experts (2 seen)
    q = 8 / (3 * 4)
    assert p0 == pytest.approx((3 + 4 * (6 + q) / (6 + 1)) / (3 + 4))
    assert cache.score((0, 0)) == pytest.approx(p0 * still / 3)
    cache.hint({})
    assert cache.score((0, 0)) > cache.score((2, 4))
    cache.complete((0, 2))
    cache.release((0, 2))
    run(cache, [(0, 3)])  # two acquired: the visit is complete, 0 and 1 wait for the next
    assert cache.slot_of((2, 4)) is None
    assert cache.score((0, 0)) == cache._stale_probability((0, 0)) / (2 * 3)
    assert cache.score((0, 0)) < min(cache.score((0, 3)), cache.score((1, 0)))
    run(cache, [(1, 0), (1, 5)])  # the next miss takes one of them; on a tie the later used
    assert cache.slot_of((0, 1)) is None
    assert all(cache.slot_of(k) is not None for k in [(0, 0), (0, 2), (0, 3), (1, 0)])


def test_beats_lru_on_layer_cyclic_routing():
    rng = random.Random(0)
    layers, experts = 16, 8
    weights = [[rng.random() ** 3 for _ in range(experts)] for _ in range(layers)]
    seq, previous = [], None
    for _ in range(150):
        step = []
        for layer in range(layers):
            if previous and rng.random() < 0.3:
                chosen = previous[layer]
            else:
                chosen = sorted(set(rng.choices(range(experts), weights[layer], k=2)))
            step.append(chosen)
            seq += [(layer, e) for e in chosen]
        previous = step
    lru = {slots: simulate_lru(seq, slots) for slots in (13, 32, 64)}
    ours = {slots: simulate_mer(seq, slots) for slots in (13, 32, 64)}
    assert lru[13] == 0.0 and ours[13] > 0.2  # LRU thrashes when the cycle does not fit
    assert ours[32] > lru[32] + 0.01 and ours[64] > lru[64] + 0.02
    assert all(ours[s] <= simulate_belady(seq, s) for s in ours)


def test_ties_go_to_the_most_recently_used():
    cache = ExpertCache(2)
    run(cache, [(0, 0), (0, 1)])
    run(cache, [(1, 0)])  # layer 0's visit ends: p is the same for both, so is d
    assert cache.score((0, 0)) == cache.score((0, 1))
    assert cache.slot_of((0, 0)) is not None and cache.slot_of((0, 1)) is None


def test_a_refused_acquire_stays_in_its_visit():
    cache = ExpertCache(2, n_layers=2, visit_decay=1.0)
    cache.acquire((0, 0))
    cache.complete((0, 0))
    cache.acquire((0, 1))
    cache.complete((0, 1))
    with pytest.raises(CacheFullError):
        cache.acquire((0, 2))
    cache.release((0, 0))
    assert cache.acquire((0, 2))[0] is Status.MISS  # the same visit: (0, 0) was evicted
    cache.complete((0, 2))
    cache.release((0, 1))
    cache.release((0, 2))
    run(cache, [(1, 0)])
    # one visit used experts 0, 1 and 2 (two visits would give (0, 2) a share of 1/2)
    assert [cache.share((0, e)) for e in range(3)] == [1.0, 1.0, 1.0]


def test_hot_expert_is_pinned_then_released_when_cold():
    cache = ExpertCache(3, pin_budget=1, pin_min_share=0.5, n_layers=2, visit_decay=0.8)
    for step in range(5):
        run(cache, [(0, 0), (1, step)])  # layer 1 never uses an expert twice
    assert cache.share((0, 0)) == pytest.approx(1.0)
    assert cache.pinned() == {(0, 0)}
    cache.hint({(0, 0): 0.0})  # the predictors say it is not needed: the lowest score
    run(cache, [(1, 5), (1, 6)])  # two more misses in a full cache
    assert cache.score((0, 0)) == 0.0
    assert cache.slot_of((0, 0)) is not None, "pinned expert evicted"
    shares = []
    for i in range(3):  # layer 0 now uses expert 1: (0, 0) cools
        run(cache, [(0, 1), (1, 7 + i)])
        shares.append(cache.share((0, 0)))
        if shares[-1] >= 0.5:
            assert (0, 0) in cache.pinned() and cache.slot_of((0, 0)) is not None
    assert shares == pytest.approx([2.68928 / 3.68928, 2.151424 / 3.951424, 1.7211392 / 4.1611392])
    assert (0, 0) not in cache.pinned() and cache.slot_of((0, 0)) is not None
    cache.hint({(0, 0): 0.0})  # the same advice now evicts it
    run(cache, [(1, 20)])
    assert cache.slot_of((0, 0)) is None


def test_prefetch_never_evicts_hotter_and_is_promoted_when_used():
    cache = ExpertCache(1, n_layers=2)
    run(cache, [(0, 0), (1, 0), (0, 0)])  # (1, 0) evicted (0, 0) and back: layer 0 serving
    assert cache.resident() == [(0, 0)]
    p = cache.need_probability((0, 0))
    assert p == pytest.approx(1.0)  # every visit of layer 0 used it
    # (0, 0): 1 / (2 + 2) = 0.25; (1, 1) would score 0.5 / (1 + 2) < 0.25: kept
    assert cache.prefetch((1, 1), need=0.5) is None
    run(cache, [(1, 0)])  # layer 1's visit: (1, 0) replaces (0, 0); layer 0 is next
    assert cache.prefetch((0, 3), need=0.05) is None  # 0.05 / 3 < 1 / 4
    slot = cache.prefetch((0, 0), need=0.9)  # 0.9 / 3 > 1 / 4: (1, 0) goes
    assert slot is not None and cache.stats.prefetches == 1
    assert cache.slot_of((1, 0)) is None
    cache.complete((0, 0))
    status, same = cache.acquire((0, 0))
    assert (status, same) == (Status.HIT, slot)
    assert cache.stats.prefetch_used == 1 and cache.stats.prefetch_wasted == 0


def test_full_cache_of_leases_refuses():
    cache = ExpertCache(2)
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    with pytest.raises(CacheFullError):
        cache.acquire((0, 2))


def test_a_read_in_flight_is_not_a_hit():
    """An acquire that finds the expert's read still in flight waits for it: it counts as an
    in-flight hit, apart from ready hits, and not in the hit rate."""
    cache = ExpertCache(4, pin_budget=0, n_layers=2)
    slot = cache.prefetch((1, 0), 0.9)
    assert slot is not None
    status, _ = cache.acquire((1, 0))  # read-ahead issued, not complete
    assert status is Status.PENDING
    cache.complete((1, 0))
    cache.release((1, 0))
    run(cache, [(0, 0)])  # a miss
    run(cache, [(1, 0)])  # a ready hit
    s = cache.stats
    assert (s.hits, s.pending_hits, s.misses, s.acquires) == (1, 1, 1, 3)
    assert s.hit_rate == pytest.approx(1 / 3) and s.pending_rate == pytest.approx(1 / 3)
    assert s.pending_by_layer == {1: 1} and s.hits_by_layer == {1: 1}
