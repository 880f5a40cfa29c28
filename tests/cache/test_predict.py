"""The predictors: Markov chains over expert sets, and the next-layer gate lookahead."""

from __future__ import annotations

import numpy as np
import pytest

from mer.cache.predict import MarkovPredictor, PredictorStats, next_layer_gate
from mer.kernels.router import route, route_reference

A, B, C = [0, 1], [2, 3], [4, 5]


def feed(predictor, layer, sets, times=1):
    for _ in range(times):
        for experts in sets:
            predictor.observe(layer, experts)


def test_stats_arithmetic():
    stats = PredictorStats()
    assert (stats.precision, stats.recall) == (0.0, 0.0)
    stats.update({1, 2, 3}, {2, 3, 4})
    stats.update(set(), [5])
    stats.update([7], [7])
    assert (stats.predicted, stats.correct, stats.actual, stats.steps) == (4, 3, 5, 3)
    assert stats.precision == pytest.approx(3 / 4)
    assert stats.recall == pytest.approx(3 / 5)


def test_learns_a_period_three_sequence():
    markov = MarkovPredictor(2, 8)
    feed(markov, 0, [A, B, C], times=3)
    # warm-up, prediction by prediction: nothing; freq {0,1}; freq {0..3} (p = 1/2);
    # nothing (1/3 each); freq {0,1} (2/4); nothing; nothing (states seen once are not
    # trusted); then (A,) seen twice -> B; (A, B) seen twice -> C
    assert (markov.stats.predicted, markov.stats.correct, markov.stats.actual) == (12, 4, 18)
    assert markov.predict(0) == {0: 1.0, 1: 1.0}
    markov.stats = PredictorStats()
    feed(markov, 0, [A, B, C], times=5)
    assert (markov.stats.predicted, markov.stats.correct, markov.stats.actual) == (30, 30, 30)
    assert markov.stats.precision == markov.stats.recall == 1.0
    assert markov.layer_stats[0].steps == 24 and 1 not in markov.layer_stats


def test_second_order_tells_apart_what_first_order_cannot():
    # A B A C ...: after A comes B or C, but after (B, A) always C and after (C, A) always B
    results = {}
    for order in (1, 2):
        markov = MarkovPredictor(1, 8, order=order)
        feed(markov, 0, [A, B, A, C], times=4)
        markov.stats = PredictorStats()
        feed(markov, 0, [A, B, A, C], times=5)
        s = markov.stats
        results[order] = (s.predicted, s.correct, s.actual)
    # order 1 after A: B and C both (p = 1/2) when their counts are even, else the wrong one
    assert results[1] == (50, 30, 40)
    assert results[2] == (40, 40, 40)


def test_backs_off_on_unseen_states():
    markov = MarkovPredictor(1, 8)
    feed(markov, 0, [A, B], times=3)
    assert markov.predict(0) == {0: 1.0, 1: 1.0}  # (A, B) -> A, seen twice
    markov.observe(0, C)  # a set never seen: (B, C) and (C,) are unknown
    assert markov.predict(0) == pytest.approx(
        {0: 3 / 7, 1: 3 / 7, 2: 3 / 7, 3: 3 / 7, 4: 1 / 7, 5: 1 / 7}
    )  # the layer's overall frequency
    markov.observe(0, A)  # (C, A) is unknown but (A,) was followed by B three times
    assert markov.predict(0) == {2: 1.0, 3: 1.0}


def test_order_zero_is_the_frequency_and_layers_are_separate():
    markov = MarkovPredictor(2, 8, order=0, threshold=0.6)
    feed(markov, 0, [A, A, B])
    feed(markov, 1, [C])
    assert markov.predict(0) == pytest.approx({0: 2 / 3, 1: 2 / 3, 2: 1 / 3, 3: 1 / 3})
    assert markov.predicted_set(0) == {0, 1}
    assert markov.predict(1) == {4: 1.0, 5: 1.0}
    assert markov.layer_stats[0].steps == 3 and markov.layer_stats[1].steps == 1
    assert markov.stats.steps == 4


def test_memory_stays_bounded():
    rng = np.random.default_rng(0)
    markov = MarkovPredictor(1, 128, max_states=16)
    for _ in range(400):
        markov.observe(0, rng.choice(128, size=8, replace=False))
    assert markov.n_states(0) == 2 * 16  # 16 contexts per order, the oldest evicted
    assert all(0 < p <= 1 for p in markov.predict(0).values())


def test_rejects_unknown_layers_and_experts():
    markov = MarkovPredictor(2, 8)
    with pytest.raises(ValueError):
        markov.observe(2, [0])
    with pytest.raises(ValueError):
        markov.observe(0, [8])
    with pytest.raises(ValueError):
        markov.predict(-1)


def test_gate_lookahead_on_a_hand_made_router():
    router = np.eye(4, dtype=np.float32) * 2.0  # expert j reads feature j
    h = np.array([[4, 3, 0, 0], [0, 3, 4, 0], [0, 0, 1, 5]], dtype=np.float32)
    gate = next_layer_gate(h, router, k=2)  # top-2: {0, 1}, {1, 2}, {2, 3}
    assert gate == pytest.approx({0: 1 / 3, 1: 2 / 3, 2: 2 / 3, 3: 1 / 3})
    assert next_layer_gate(h[1], router, k=1) == {2: 1.0}


def test_gate_lookahead_with_the_same_router_reproduces_route():
    rng = np.random.default_rng(3)
    n, dim, n_experts, k = 7, 32, 8, 2
    h = rng.standard_normal((n, dim)).astype(np.float32)
    router = rng.standard_normal((n_experts, dim)).astype(np.float32)
    idx, _ = route(h @ router.T, k)
    ref, _ = route_reference(h @ router.T, k)
    assert np.array_equal(idx, ref)
    gate = next_layer_gate(h, router, k)
    expected = {int(e): float(np.sum(idx == e)) / n for e in np.unique(idx)}
    assert gate == expected
    assert all(0.0 < p <= 1.0 for p in gate.values())
    assert sum(gate.values()) == pytest.approx(k)  # each token picks k experts
    for t in range(n):  # one token: exactly route()'s choice, each with probability 1
        assert next_layer_gate(h[t : t + 1], router, k) == {int(e): 1.0 for e in idx[t]}
