"""ThreadPolicy: each call's thread count from measured cost, driven with synthetic timings."""

from __future__ import annotations

import pytest

from mer.kernels.threads import ThreadPolicy

KEY = ("q4_0", 4096, 4096, 1)


def drive(policy: ThreadPolicy, cost: dict[int, float], calls: int, key=KEY) -> list[int]:
    """`calls` calls of `key` where a call on c threads takes cost[c] seconds per unit."""
    used = []
    for _ in range(calls):
        c = policy.choose(key)
        policy.record(key, c, 1000.0, cost[c] * 1000.0)
        used.append(c)
    return used


def test_idle_machine_uses_every_thread():
    policy = ThreadPolicy(2)
    used = drive(policy, {1: 2e-9, 2: 1.1e-9}, 2000)
    assert policy.choices() == {KEY: 2}
    assert used.count(1) <= 30  # the first measurement and a few probes


def test_busy_machine_falls_back_to_one_thread_and_probes_within_budget():
    policy = ThreadPolicy(2, probe_budget=0.01)
    cost = {1: 2e-9, 2: 100 * 2e-9}  # a parallel call waits for a descheduled thread
    used = drive(policy, cost, 100_000)
    assert policy.choices() == {KEY: 1}
    time_spent = sum(cost[c] for c in used)
    assert time_spent <= 1.03 * len(used) * cost[1]  # probes cost little


def test_recovers_when_the_load_goes():
    policy = ThreadPolicy(2)
    drive(policy, {1: 2e-9, 2: 50e-9}, 20_000)
    assert policy.choices() == {KEY: 1}
    used = drive(policy, {1: 2e-9, 2: 1.1e-9}, 40_000)
    assert policy.choices() == {KEY: 2}
    assert used[-1000:].count(2) >= 990


def test_a_lucky_probe_does_not_stick():
    """Under load most parallel calls are slow, some fast: one fast probe is tried, found
    out by the next slow call, and the old choice stands."""
    policy = ThreadPolicy(2)
    drive(policy, {1: 2e-9, 2: 50e-9}, 5000)
    state = policy._keys[KEY]
    interval = state.interval
    state.calls = state.interval  # the next call is a probe...
    drive(policy, {1: 2e-9, 2: 1e-9}, 1)  # ...that happens to be fast
    assert policy.choices() == {KEY: 2}
    drive(policy, {1: 2e-9, 2: 50e-9}, 1)  # the next parallel call is slow again
    assert policy.choices() == {KEY: 1}
    assert state.interval >= interval  # counted as a confirmation


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_fixed_and_single_thread(threads):
    assert set(drive(ThreadPolicy(threads, adaptive=False), {1: 1.0, threads: 9.0}, 50)) == {
        threads
    }
    if threads == 8:
        policy = ThreadPolicy(8)
        assert policy.candidates == [1, 4, 8]
        drive(policy, {1: 8e-9, 4: 2e-9, 8: 3e-9}, 3000)
        assert policy.choices() == {KEY: 4}


def test_named_candidates_place_work():
    """The compute board's placement: 1 = the engine's own threads, 2 = the workers."""
    policy = ThreadPolicy(2, candidates=(1, 2))
    assert policy.candidates == [1, 2]
    used = drive(policy, {1: 1e-9, 2: 1.5e-9}, 1000)  # a round costs more than it saves
    assert policy.choices() == {KEY: 1} and used.count(2) <= 30
    fixed = ThreadPolicy(2, adaptive=False, candidates=(1, 2))
    assert set(drive(fixed, {1: 1e-9, 2: 9e-9}, 50)) == {2}


def test_keys_are_independent():
    policy = ThreadPolicy(2)
    drive(policy, {1: 2e-9, 2: 1e-9}, 500, key="big")
    drive(policy, {1: 2e-9, 2: 9e-9}, 500, key="small")
    assert policy.choices() == {"big": 2, "small": 1}


def test_model_bits_do_not_depend_on_thread_choices(monkeypatch):
    """Whatever counts the policy gives (here: alternating on every call, the worst case),
    a model's logits are bit-identical to one thread's."""
    import numba
    import numpy as np

    import mer
    from mer.kernels import matmul
    from mer.models.sources import bundled_models

    path = bundled_models()[0].path
    if path is None or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs the bundled model and two cores")
    model = mer.load_model(path)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again.")
    try:
        matmul.set_num_threads(1)
        ref = model.logits(ids), model.logits(ids[:6], chunk_size=1)
        matmul.set_num_threads(2, adaptive=False)
        fixed = model.logits(ids), model.logits(ids[:6], chunk_size=1)
        matmul.set_num_threads(2)
        flips = iter(range(1 << 30))
        monkeypatch.setattr(ThreadPolicy, "choose", lambda self, key: 1 + next(flips) % 2)
        alternating = model.logits(ids), model.logits(ids[:6], chunk_size=1)
    finally:
        matmul.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for got in (fixed, alternating):
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(a, b)
