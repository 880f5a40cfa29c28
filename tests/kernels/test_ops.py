"""RMSNorm, RoPE, attention and the router against their NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mer.kernels.attention import attention, attention_reference
from mer.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from mer.kernels.rope import apply_rope, apply_rope_reference, inv_frequencies, rope_tables
from mer.kernels.router import route, route_reference
from mer.models.args import RopeArgs

rng = np.random.default_rng(7)


def randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n,d", [(1, 1), (3, 33), (17, 100), (5, 4096)])
def test_rmsnorm(n, d):
    x, w = randn(n, d), randn(d)
    np.testing.assert_allclose(
        rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5), rtol=2e-5, atol=1e-6
    )


def test_rmsnorm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        rmsnorm(randn(2, 8), randn(9), 1e-5)
    with pytest.raises(ValueError, match="float32"):
        rmsnorm(randn(2, 8).astype(np.float64), randn(8), 1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("n,h,hd", [(1, 1, 2), (7, 3, 10), (13, 4, 64)])
def test_rope(n, h, hd, interleaved):
    inv = inv_frequencies(RopeArgs(theta=10000.0), hd)
    cos, sin = rope_tables(inv, np.arange(5, 5 + n))
    x = randn(n, h, hd)
    y = x.copy()
    apply_rope(y, cos, sin, interleaved)
    np.testing.assert_allclose(
        y, apply_rope_reference(x, cos, sin, interleaved), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 16},
    ],
)
def test_inverse_frequencies_match_transformers(rope_parameters):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mer.models.args import rope_from_hf

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        max_position_embeddings=1024,
        rope_parameters=rope_parameters,
    )
    kind = rope_parameters["rope_type"]
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
        assert rope_from_hf(config.to_dict()).attention_factor == pytest.approx(factor)
    got = inv_frequencies(rope_from_hf(config.to_dict()), 32)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize(
    "n,p0,h,g,hd", [(1, 0, 1, 1, 4), (1, 30, 8, 2, 16), (9, 4, 6, 3, 7), (20, 0, 4, 4, 32)]
)
def test_attention(n, p0, h, g, hd, window):
    q = randn(n, h, hd)
    k, v = randn(p0 + n + 3, g, hd), randn(p0 + n + 3, g, hd)
    got = attention(q, k, v, p0, window)
    np.testing.assert_allclose(got, attention_reference(q, k, v, p0, window), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_sinks(window):
    """gpt-oss: each head's sink logit joins the softmax and weighs no value, so it takes
    probability from the keys; a very low sink changes nothing."""
    q, k, v = randn(7, 6, 16), randn(12, 2, 16), randn(12, 2, 16)
    sinks = randn(6) * 2
    got = attention(q, k, v, 3, window, sinks=sinks)
    want = attention_reference(q, k, v, 3, window, sinks=sinks)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    plain = attention(q, k, v, 3, window)
    assert not np.allclose(got, plain, atol=1e-3)
    low = attention(q, k, v, 3, window, sinks=np.full(6, -1e4, np.float32))
    np.testing.assert_allclose(low, plain, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="sinks"):
        attention(q, k, v, 3, window, sinks=randn(5))


def test_latent_attention_values_are_a_view_of_the_keys():
    """DeepSeek's absorbed MLA: one cached row per position, values its first 24 values,
    an explicit softmax scale."""
    q, k = randn(5, 4, 32), randn(12, 1, 32)
    got = attention(q, k, k[:, :, :24], 6, None, 0.3)
    assert got.shape == (5, 4, 24)
    np.testing.assert_allclose(
        got, attention_reference(q, k, k[:, :, :24], 6, None, 0.3), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("window", [0, 7])
def test_attention_bits_do_not_depend_on_threads(window):
    """The thread policy may run attention on one thread or all: the bits must not change."""
    import math

    import numba

    from mer.kernels.attention import _attention

    q, k, v, sinks = randn(12, 8, 32), randn(40, 2, 32), randn(40, 2, 32), randn(8)
    scale = np.float32(1 / math.sqrt(32))
    outs = []
    for nt in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(nt)
        outs.append(np.empty_like(q))
        _attention(q, k, v, 20, window, scale, sinks, outs[-1])
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for out in outs[1:]:
        np.testing.assert_array_equal(outs[0], out)


def test_router_survives_nan_scores():
    """Corrupt weights give NaN scores: the router still names valid, distinct experts (the
    NaN flows on to the logits check) instead of an id of -1."""
    idx, _ = route(np.full((3, 8), np.nan, np.float32), 2)
    assert ((idx >= 0) & (idx < 8)).all()
    assert (idx[:, 0] != idx[:, 1]).all()


def test_attention_rejects_overflow():
    with pytest.raises(ValueError, match="capacity"):
        attention(randn(4, 2, 8), randn(4, 1, 8), randn(4, 1, 8), 2)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,e,k", [(1, 2, 1), (9, 8, 2), (33, 5, 3), (4, 64, 6), (3, 128, 8)])
def test_router(n, e, k, normalize):
    logits = randn(n, e) * 3
    idx, w = route(logits, k, normalize)
    ref_idx, ref_w = route_reference(logits, k, normalize)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5)
    if normalize:
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    elif k < e:
        assert (w.sum(-1) < 1.0).all()


@pytest.mark.parametrize(
    "options",
    [
        dict(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2", scale=2.5),
        dict(scoring="sigmoid", normalize=False, n_group=1, topk_group=1, scale=1.5),
        dict(scoring="softmax", normalize=False, n_group=8, topk_group=3, group_score="max"),
        dict(scoring="softmax", normalize=False, n_group=2, topk_group=1, scale=16.0),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_deepseek_routing(options, with_bias):
    """Sigmoid scores, a bias steering the choice only, group-limited choice and a scaled
    weight, against the float64 reference (DeepSeek-V2/V3 as transformers routes)."""
    options = dict(options)
    normalize = options.pop("normalize", True)
    logits = randn(40, 32) * 2
    bias = (randn(32) * 0.3) if with_bias else None
    idx, w = route(logits, 6, normalize, bias=bias, **options)
    ref_idx, ref_w = route_reference(logits, 6, normalize, bias=bias, **options)
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(ref_idx, -1))
    np.testing.assert_allclose(
        np.take_along_axis(w, np.argsort(idx, -1), -1),
        np.take_along_axis(ref_w, np.argsort(ref_idx, -1), -1),
        rtol=1e-5,
    )
    if options.get("n_group", 1) > 1:  # every choice lies in the topk_group kept groups
        size = 32 // options["n_group"]
        assert all(len(set(row // size)) <= options["topk_group"] for row in idx)
    if with_bias:  # the bias moved some choice, yet weights are the unbiased scores
        plain, _ = route(logits, 6, normalize, **options)
        assert (np.sort(plain, -1) != np.sort(idx, -1)).any()


def test_router_rejects_bad_k():
    with pytest.raises(ValueError, match="k=9"):
        route(randn(2, 8), 9)
