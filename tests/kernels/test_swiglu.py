"""mer.kernels.swiglu: one SwiGLU expert against the NumPy reference, and split by slices."""

from __future__ import annotations

import numpy as np
import pytest

from mer.kernels import matmul as mm
from mer.kernels.swiglu import expert_forward, expert_forward_reference

D, I = 96, 160  # model width, intermediate width (both multiples of 32)


def make(kind: str, rows: int, cols: int, rng: np.random.Generator) -> mm.PackedWeight:
    a = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
    if kind == "f32":
        return mm.pack_float(a, "f32")
    if kind == "f16":
        return mm.pack_float(a.astype(np.float16), "f16")
    if kind == "bf16":
        return mm.pack_float((a.view(np.uint32) >> 16).astype(np.uint16), "bf16")
    return mm.quantize(a, kind)


def expert(kinds: tuple[str, str, str], seed: int):
    rng = np.random.default_rng(seed)
    gate, up, down = make(kinds[0], I, D, rng), make(kinds[1], I, D, rng), make(kinds[2], D, I, rng)
    return gate, up, down, rng


KIND_SETS = [(k, k, k) for k in ("f32", "f16", "bf16", "q8_0", "q4_0")] + [("q4_0", "q4_0", "q8_0")]


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "-".join(k))
@pytest.mark.parametrize("n", [1, 5])
def test_matches_reference(kinds, n):
    gate, up, down, rng = expert(kinds, n)
    x = (rng.standard_normal((n, D)) * 2).astype(np.float32)
    y = expert_forward(gate, up, down, x)
    want = expert_forward_reference(gate, up, down, x)
    assert y.shape == (n, D) and y.dtype == np.float32
    assert np.allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kinds", [KIND_SETS[0], KIND_SETS[4]], ids=lambda k: k[0])
@pytest.mark.parametrize("n", [1, 4])
def test_partition_sums_to_full(kinds, n):
    gate, up, down, rng = expert(kinds, 7 + n)
    x = rng.standard_normal((n, D)).astype(np.float32)
    full = expert_forward(gate, up, down, x)
    parts = [(0, 64), (64, 96), (96, 96), (96, 160)]
    total = sum(expert_forward(gate, up, down, x, inter_range=r) for r in parts)
    assert np.allclose(total, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    sliced = expert_forward_reference(gate, up, down, x, inter_range=(64, 96))
    part = expert_forward(gate, up, down, x, inter_range=(64, 96))
    assert np.allclose(part, sliced, rtol=1e-4, atol=1e-4 * np.abs(sliced).max())
    assert not np.allclose(sliced, full)


def clamped_reference(gate, up, down, x, bias, limit):
    """gpt-oss's expert in float64 NumPy: biases, gate clamped above, up to [-limit, limit],
    (up + 1) * g * sigmoid(1.702 g), then down plus its bias."""
    xd = x.astype(np.float64)
    g = xd @ mm.dequantize(gate).astype(np.float64).T + bias[0]
    u = xd @ mm.dequantize(up).astype(np.float64).T + bias[1]
    g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
    h = (u + 1) * g / (1 + np.exp(-1.702 * g))
    return h @ mm.dequantize(down).astype(np.float64).T + bias[2]


@pytest.mark.parametrize("kinds", [KIND_SETS[0], KIND_SETS[3]], ids=lambda k: k[0])
@pytest.mark.parametrize("limit", [0.0, 0.5, 7.0])
def test_biased_and_clamped_expert(kinds, limit):
    """gpt-oss's experts, whole and striped as compute workers run them (activate on a
    slice of the intermediate, the down bias on a slice of the output)."""
    from mer.kernels.swiglu import activate, add_down_bias, run_expert
    from mer.models.weights import ExpertWeights

    gate, up, down, rng = expert(kinds, 11)
    bias = tuple(rng.uniform(-0.3, 0.3, size).astype(np.float32) for size in (I, I, D))
    w = ExpertWeights(gate, up, down, bias, limit)
    x = (rng.standard_normal((3, D)) * 2).astype(np.float32)
    y = run_expert(w, x)
    if limit:
        want = clamped_reference(gate, up, down, x, bias, limit)
    else:  # biases with the plain SwiGLU
        xd = x.astype(np.float64)
        g = xd @ mm.dequantize(gate).astype(np.float64).T + bias[0]
        u = xd @ mm.dequantize(up).astype(np.float64).T + bias[1]
        want = (g / (1 + np.exp(-g)) * u) @ mm.dequantize(down).astype(np.float64).T + bias[2]
    assert np.allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # striped: the intermediate in two slices, the output rows in two
    h = np.empty((3, I), np.float32)
    for a, b in ((0, 64), (64, I)):
        g, u = mm.matmul(gate, x)[:, a:b].copy(), mm.matmul(up, x)[:, a:b].copy()
        activate(w, g, u, a)
        h[:, a:b] = g
    out = mm.matmul(down, h)
    for a, b in ((0, 40), (40, D)):
        add_down_bias(w, out[:, a:b], a)
    assert np.allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_rejects_bad_arguments():
    gate, up, down, rng = expert(("q8_0", "q8_0", "q8_0"), 3)
    x = rng.standard_normal((2, D)).astype(np.float32)
    with pytest.raises(ValueError, match="inter_range"):
        expert_forward(gate, up, down, x, inter_range=(0, 48))
    with pytest.raises(ValueError, match="inter_range"):
        expert_forward(gate, up, down, x, inter_range=(0, 192))
    with pytest.raises(ValueError, match="gate, up"):
        expert_forward(gate, up, gate, x)
    with pytest.raises(ValueError, match="x must"):
        expert_forward(gate, up, down, x.astype(np.float64))
