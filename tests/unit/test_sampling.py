"""Sampling: greedy, seeding, the kept sets of top-k/top-p/min-p, penalties and temperature."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mer.sampling import Sampler, SamplingParams, apply_penalties, sampling_probs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_support(logits: np.ndarray, p: SamplingParams) -> set[int]:
    """The ids that may be drawn, computed the slow obvious way."""
    probs = _softmax(np.asarray(logits, dtype=np.float64) / p.temperature)
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    if p.top_k:
        order = order[: p.top_k]
        mass = np.zeros_like(probs)
        mass[order] = probs[order]
        probs = mass / mass.sum()
    if p.top_p < 1.0:
        total, kept = 0.0, []
        for i in order:
            kept.append(i)
            total += probs[i]
            if total >= p.top_p:
                break
        order = kept
    keep = set(order)
    if p.min_p:
        best = max(probs[i] for i in keep)
        keep = {i for i in keep if probs[i] >= p.min_p * best}
    return keep


def _logits(seed: int, n: int = 64, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0))
    for seed in range(20):
        logits = _logits(seed)
        assert sampler.sample(logits, []) == int(np.argmax(logits))
    tied = np.array([0.0, 5.0, 1.0, 5.0], dtype=np.float32)
    assert sampler.sample(tied, []) == 1


def test_same_seed_same_tokens_and_caller_logits_untouched() -> None:
    logits = [_logits(s) for s in range(50)]
    params = SamplingParams(temperature=1.3, top_p=0.95, repetition_penalty=1.2, seed=1234)
    copies = [x.copy() for x in logits]

    def run(p: SamplingParams) -> list[int]:
        sampler, history = Sampler(p), [3, 4]
        for x in logits:
            history.append(sampler.sample(x, history))
        return history

    assert run(params) == run(params)
    assert run(params) != run(SamplingParams(temperature=1.3, top_p=0.95, seed=99))
    assert all(np.array_equal(a, b) for a, b in zip(logits, copies, strict=True))


def test_top_k_one_is_greedy() -> None:
    greedy = Sampler(SamplingParams(temperature=0.0))
    top1 = Sampler(SamplingParams(temperature=0.7, top_k=1, seed=3))
    for seed in range(30):
        x = np.round(_logits(seed), 1)  # rounding makes ties likely
        assert top1.sample(x, [1, 2]) == greedy.sample(x, [1, 2])


CASES = [
    SamplingParams(top_k=5),
    SamplingParams(top_k=17, temperature=0.5),
    SamplingParams(top_p=0.5),
    SamplingParams(top_p=0.9, temperature=2.0),
    SamplingParams(min_p=0.1),
    SamplingParams(min_p=0.5, temperature=0.8),
    SamplingParams(top_k=10, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("params", CASES)
def test_kept_set_matches_reference_and_draws_stay_inside(params: SamplingParams) -> None:
    for seed in range(5):
        logits = _logits(seed)
        expected = reference_support(logits, params)
        probs = sampling_probs(logits, params)
        assert set(np.flatnonzero(probs)) == expected
        assert probs.sum() == pytest.approx(1.0)
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}))
        drawn = {sampler.sample(logits, []) for _ in range(1500)}
        assert drawn <= expected
        if len(expected) <= 5:  # small sets: every kept id should show up
            assert drawn == expected


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    logits=arrays(
        np.float32, st.integers(1, 40), elements=st.sampled_from([-2.0, 0.0, 0.5, 1.0, 3.0])
    ),
    top_k=st.integers(0, 45),
    top_p=st.sampled_from([0.1, 0.3, 0.6, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.2, 0.9, 1.0]),  # 1.0: ties at the max stay
)
def test_kept_set_property(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> None:
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
    assert set(np.flatnonzero(sampling_probs(logits, params))) == reference_support(logits, params)


@pytest.mark.parametrize("shape", ["flat", "peaked"])
def test_top_p_large_vocab(shape: str) -> None:
    # 5000 ids: the fast path (top 1024 first) and the wider search must match the reference.
    rng = np.random.default_rng(0)
    scale = 0.1 if shape == "flat" else 4.0
    logits = (rng.standard_normal(5000) * scale).astype(np.float32)
    params = SamplingParams(top_p=0.9)
    assert set(np.flatnonzero(sampling_probs(logits, params))) == reference_support(logits, params)


def test_repetition_penalty_matches_transformers() -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(7, n=100)
    history = [3, 3, 10, 55, 99, 0, 10, 42]
    for penalty in (0.7, 1.0, 1.3, 2.5):
        ours = apply_penalties(logits, history, SamplingParams(repetition_penalty=penalty))
        ref = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([history]), torch.tensor(logits)[None, :].clone()
        )[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(
        apply_penalties(logits, history, SamplingParams(repetition_penalty=1.3)), logits
    )


def test_presence_and_frequency_penalties() -> None:
    logits = np.array([1.0, 2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [1, 1, 1, 2, 4], params)
    expected = logits - np.array([0, 0.5 + 3 * 0.25, 0.5 + 0.25, 0, 0.5 + 0.25])
    np.testing.assert_allclose(out, expected)
    # Negative penalties encourage repetition; penalties change greedy choices.
    assert Sampler(SamplingParams(temperature=0, presence_penalty=5.0)).sample(logits, [4]) == 1
    with pytest.raises(ValueError):
        apply_penalties(logits, [5], params)  # id outside the vocabulary


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_distribution(temperature: float) -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=temperature, seed=42))
    counts = np.bincount([sampler.sample(logits, []) for _ in range(8000)], minlength=5)
    # 4 degrees of freedom: chi2 > 25 has p < 1e-4; the seed makes the test deterministic anyway.
    assert _chi_square(counts, _softmax(logits / temperature)) < 25
    other = 1.0 if temperature != 1.0 else 2.0
    assert _chi_square(counts, _softmax(logits / other)) > 100  # the test can tell them apart


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("presence_penalty", float("inf")),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0.0),
        ("seed", -1),
        ("seed", 1.5),
    ],
)
def test_invalid_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_logits() -> None:
    sampler = Sampler(SamplingParams(seed=0))
    with pytest.raises(ValueError):
        sampler.sample(np.full(4, -np.inf, dtype=np.float32), [])
    with pytest.raises(ValueError):
        sampler.sample(np.array([0.0, np.nan], dtype=np.float32), [])
    masked = np.array([-np.inf, 1.0, -np.inf], dtype=np.float32)
    assert {sampler.sample(masked, []) for _ in range(20)} == {1}
