"""mer's forward pass against transformers' float32 forward on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import mer
from mer.sampling import SamplingParams
from tests.support.hf_models import (
    CONFIGS,
    build_model,
    dequantize_experts,
    hf_greedy,
    hf_logits,
    rel_err,
    save_model,
)

PROMPT_LENGTHS = (1, 7, 300)


def prompt(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed + n).integers(3, 512, size=n).tolist()


# the "-gguf" configs (added by the GGUF fixtures) are checked against transformers there
@pytest.fixture(scope="module", params=sorted(n for n in CONFIGS if not n.endswith("-gguf")))
def pair(request, tmp_path_factory):
    """(transformers model in float32, mer model) on the same float32 weights."""
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    # One config is saved in small shards, so the sharded index path is exercised too.
    shard = "60KB" if name == "mixtral-base" else None
    hf = build_model(name)
    save_model(hf, directory, "f32", max_shard_size=shard)
    return hf, mer.load_model(directory)


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_prefill_logits_match(pair, n):
    hf, model = pair
    ids = prompt(n)
    assert rel_err(model.logits(ids), hf_logits(hf, ids)) <= 1e-4


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_incremental_decode_matches(pair, n):
    hf, model = pair
    ids = prompt(n)
    ref = hf_logits(hf, ids)
    assert rel_err(model.logits(ids, chunk_size=1), ref) <= 1e-4
    if n > 7:
        assert rel_err(model.logits(ids, chunk_size=37), ref) <= 1e-4


def test_greedy_tokens_identical(pair):
    hf, model = pair
    ids = prompt(7)
    expected = hf_greedy(hf, ids, 48)
    got = list(model.generate(ids, SamplingParams(temperature=0.0), 48, stop_ids=frozenset()))
    assert got == expected


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("name", ["mixtral-base", "llama-tied-headdim"])
def test_half_precision_checkpoints(tmp_path, name, dtype):
    hf = build_model(name)
    save_model(hf, tmp_path, dtype)  # hf now holds the rounded weights, in float32
    model = mer.load_model(tmp_path)
    assert model.weights.layers[0].wq.kind == dtype
    for n in (7, 300):
        ids = prompt(n)
        assert rel_err(model.logits(ids), hf_logits(hf, ids)) <= 1e-4


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["mixtral-base", "mixtral-mqa-window", "llama-llama3rope"])
def test_quantized_experts(tmp_path, name, quant):
    hf = build_model(name)
    save_model(hf, tmp_path, "bf16" if name == "mixtral-base" else "f32")
    model = mer.load_model(tmp_path, quant=quant, activations="f32")
    assert model.weights.layers[0].experts[0].gate.kind == quant
    dequantize_experts(hf, quant)
    # Teacher-forced over transformers' own greedy continuation.
    ids = prompt(40) + hf_greedy(hf, prompt(40), 160)
    ref = hf_logits(hf, ids)
    got = model.logits(ids)
    # Activations stay float32 in mer, so only summation order differs from transformers.
    assert rel_err(got, ref) <= 1e-3
    agreement = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert agreement >= 0.99
