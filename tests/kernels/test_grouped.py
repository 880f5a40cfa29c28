"""Many experts in one call (mer.kernels.grouped): bit-identical to running them one by one."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from mer.kernels import grouped
from mer.kernels import matmul as mm
from mer.kernels.swiglu import run_expert
from mer.models.weights import ExpertWeights
from tests.kernels.test_q8_activations import BLOCK, activations_rng, blocks

DIM, INTER = 512, 96  # both multiples of 256 (K-quants' blocks) and of 16 rows


def packed(kind: str, rows: int, cols: int, rng, mode: str = "q8") -> mm.PackedWeight:
    raw = blocks(kind, rng.standard_normal((rows, cols)).astype(np.float32))
    return mm.from_gguf_blocks(raw.reshape(-1), kind, rows, cols, activations=mode)


def experts(n: int, kinds: tuple[str, str], rng, biased: bool = False, mode: str = "q8"):
    out = []
    for _ in range(n):
        inter = INTER if BLOCK.get(kinds[1], 32) == 32 else 256
        bias = None
        if biased:
            bias = tuple(
                rng.standard_normal(size).astype(np.float32) for size in (inter, inter, DIM)
            )
        out.append(
            ExpertWeights(
                packed(kinds[0], inter, DIM, rng, mode),
                packed(kinds[0], inter, DIM, rng, mode),
                packed(kinds[1], DIM, inter, rng, mode),
                bias=bias,
                limit=7.0 if biased else 0.0,
            )
        )
    return out


@pytest.mark.parametrize(
    ("kinds", "biased"),
    [
        (("q4_0", "q4_0"), False),
        (("q8_0", "q4_1"), False),
        (("q5_0", "q5_1"), False),
        (("q4_k", "q6_k"), False),
        (("q5_k", "q8_0"), False),
        (("mxfp4", "mxfp4"), True),  # gpt-oss: biases and a clamped SwiGLU
    ],
)
def test_bit_identical_to_one_by_one(kinds, biased):
    rng = np.random.default_rng(5)
    ex = experts(5, kinds, rng, biased)
    assert grouped.applies(ex)
    sizes = [1, 3, 1, 6, 2]  # an expert's tokens, as a batch routes them
    xs = [activations_rng(rng, n, DIM) * np.float32(0.002) for n in sizes]  # scales < f16 max
    want = [run_expert(e, x) for e, x in zip(ex, xs, strict=True)]
    threads = mm.get_num_threads()
    try:
        for nt in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            mm.set_num_threads(nt, adaptive=False)
            got = grouped.run_experts(ex, xs)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
    finally:
        mm.set_num_threads(threads)
    # one expert alone, and a token alone: the same rows
    np.testing.assert_array_equal(grouped.run_experts(ex[3:4], xs[3:4])[0], want[3])
    np.testing.assert_array_equal(grouped.run_experts(ex[1:2], [xs[1][1:2]])[0], want[1][1:2])


def test_which_experts_go_together():
    rng = np.random.default_rng(6)
    q4 = experts(2, ("q4_0", "q4_0"), rng)
    assert not grouped.applies([]) and not grouped.applies(q4[:1])  # too few to gain
    assert not grouped.applies(experts(2, ("q4_0", "q4_0"), rng, mode="f32"))  # float kernels
    assert not grouped.applies([q4[0], *experts(1, ("q8_0", "q4_0"), rng)])  # another kind
    mixed = ExpertWeights(q4[0].gate, packed("q8_0", INTER, DIM, rng), q4[0].down)
    assert not grouped.applies([mixed, mixed])  # gate and up of two kinds


def test_products_of_one_input_together():
    rng = np.random.default_rng(7)
    x = activations_rng(rng, 3, DIM)
    ws = [packed("q4_k", rows, DIM, rng) for rows in (64, 16, 16, 32)]  # query, key, value...
    pairs = [(w, x) for w in ws]
    assert grouped.fusable(pairs)
    for got, w in zip(grouped.run_products(pairs), ws, strict=True):
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, mm.matmul(w, x))
    assert not grouped.fusable(pairs[:3])  # too few to gain
    assert not grouped.fusable([*pairs[:3], (ws[3], x.copy())])  # two inputs, two heights
    # one weight per input (DeepSeek's per-head products): each input's own rows
    heads = [packed("q4_k", 32, DIM, rng) for _ in range(4)]
    inputs = [activations_rng(rng, n, DIM) for n in (2, 1, 3, 2)]
    pairs = list(zip(heads, inputs, strict=True))
    assert grouped.fusable(pairs)
    for got, (w, x1) in zip(grouped.run_products(pairs), pairs, strict=True):
        np.testing.assert_array_equal(got, mm.matmul(w, x1))
    assert not grouped.fusable([*pairs[:3], (packed("q8_0", 16, DIM, rng), x)])
    assert not grouped.fusable([(packed("q4_0", 16, DIM, rng, "f32"), x)] * 4)


def test_addresses_are_this_process_own():
    import pickle

    w = packed("q4_0", 16, DIM, np.random.default_rng(8))
    assert w.addresses == tuple(p.ctypes.data for p in w.planes)
    copy = pickle.loads(pickle.dumps(w))
    assert copy.addresses == tuple(p.ctypes.data for p in copy.planes) != w.addresses
