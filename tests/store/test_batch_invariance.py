"""Batch invariance: a sequence's logits and tokens are bit-identical whether it runs alone or
beside others, and however its prefill is chunked; a tiny Mixtral streamed through a cache of
25% of its experts, and the bundled SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

import mer
from mer.engine.engine import Engine
from mer.engine.scheduler import SchedulerConfig
from mer.models.sources import bundled_models
from mer.sampling import SamplingParams

TOKENS = 10


def prompts(vocab: int) -> list[list[int]]:
    """8 prompts of different lengths, from 2 to 61 tokens."""
    rng = np.random.default_rng(5)
    return [rng.integers(3, vocab, size=n).tolist() for n in (2, 61, 7, 33, 3, 18, 45, 11)]


def params(i: int) -> SamplingParams:
    # half greedy, half sampled with their own seeds
    return SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.9, seed=i)


def alone(model, prompt: list[int], i: int) -> tuple[list[int], list[np.ndarray]]:
    engine = Engine(model, keep_logits=True)
    seq = engine.submit(prompt, params(i), TOKENS, stop_ids=frozenset())
    for _ in engine.run():
        pass
    return seq.output_ids, seq.logits


def together(model, batch: list[list[int]], config: SchedulerConfig) -> list:
    engine = Engine(model, config, keep_logits=True)
    seqs = [engine.submit(p, params(i), TOKENS, stop_ids=frozenset()) for i, p in enumerate(batch)]
    steps = 0
    for _ in engine.run():
        steps += 1
    return [(s.output_ids, s.logits) for s in seqs]


def assert_invariant(model) -> None:
    batch = prompts(model.args.vocab_size)
    expected = [alone(model, p, i) for i, p in enumerate(batch)]
    for config in (
        SchedulerConfig(),  # all prefills at once, then decoding together
        SchedulerConfig(max_batch_tokens=24, prefill_chunk=5),  # long prompts chunked
        SchedulerConfig(max_seqs=3),  # sequences joining as others finish
    ):
        got = together(model, batch, config)
        for (tokens, logits), (ref_tokens, ref_logits) in zip(got, expected, strict=True):
            assert tokens == ref_tokens
            assert len(logits) == len(ref_logits)
            for a, b in zip(logits, ref_logits, strict=True):
                np.testing.assert_array_equal(a, b)


def test_streamed_mixtral_at_a_quarter_cache(q4_store):
    import json

    manifest = json.loads((q4_store / "manifest.json").read_text())
    slot = max(e["length"] for e in manifest["experts"]["entries"])
    n_experts = len(manifest["experts"]["entries"])
    with mer.load_model(q4_store, cache_bytes=slot * max(3, n_experts // 4)) as model:
        assert model.streamer is not None
        assert_invariant(model)


def test_bundled_model():
    path = bundled_models()[0].path
    if path is None:
        pytest.skip("the bundled model is not installed")
    assert_invariant(mer.load_model(path))


@pytest.mark.parametrize("name", ["deepseek3-base", "qwen2moe-base", "gptoss-base"])
def test_newer_architectures(name, tmp_path):
    """DeepSeek-V3 (latent attention, its per-head products; group-limited sigmoid routing;
    shared experts), Qwen2-MoE (a gated shared expert, projection biases) and gpt-oss (sinks,
    sliding and full layers, biased experts with a clamped SwiGLU)."""
    from tests.support.hf_models import build_model, save_model

    path = save_model(build_model(name, n_layers=2, seed=6), tmp_path / name, "f32")
    assert_invariant(mer.load_model(path))
