"""Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: bit-exact dequantization and matmul vs NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from mer.kernels.matmul import dequantize, from_gguf_blocks, matmul, run_kernel
from mer.kernels.mm_gguf import KINDS

QTYPES = {
    "q4_1": T.Q4_1,
    "q5_0": T.Q5_0,
    "q5_1": T.Q5_1,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
}
rng = np.random.default_rng(3)


def random_blocks(kind: str, rows: int, cols: int) -> np.ndarray:
    """Random block bytes whose f16 fields are finite, moderate scales."""
    cls = next(k for k in KINDS if k.KIND == kind)
    nb = rows * cols // cls.BLOCK
    raw = rng.integers(0, 256, size=(nb, cls.BLOCK_BYTES), dtype=np.uint8)
    f16_offsets = {
        "q4_1": (0, 2),
        "q5_0": (0,),
        "q5_1": (0, 2),
        "q4_k": (0, 2),
        "q5_k": (0, 2),
        "q6_k": (208,),
    }[kind]
    for off in f16_offsets:
        raw[:, off : off + 2] = (
            (rng.standard_normal(nb) * 0.05).astype(np.float16).view(np.uint8).reshape(nb, 2)
        )
    return raw


@pytest.mark.parametrize("kind", sorted(QTYPES))
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_dequantize_bit_identical(kind, rows):
    cls = next(k for k in KINDS if k.KIND == kind)
    cols = cls.BLOCK * 3
    raw = random_blocks(kind, rows, cols)
    expected = gguf_dequantize(raw.reshape(rows, -1), QTYPES[kind])
    got = dequantize(from_gguf_blocks(raw, kind, rows, cols))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", sorted(QTYPES))
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("rows", [5, 66])
def test_matmul_matches_reference(kind, n, rows):
    cls = next(k for k in KINDS if k.KIND == kind)
    cols = cls.BLOCK * 2
    w = from_gguf_blocks(random_blocks(kind, rows, cols), kind, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
    np.testing.assert_allclose(matmul(w, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # a row range and the second column block only; other columns stay untouched
    out = np.full((n, rows), 7.0, np.float32)
    matmul(w, x, out, row_range=(1, rows - 1), col_range=(cls.BLOCK, cols))
    part = x[:, cls.BLOCK :].astype(np.float64) @ dequantize(w)[1 : rows - 1, cls.BLOCK :].T
    np.testing.assert_allclose(
        out[:, 1 : rows - 1], part, rtol=1e-4, atol=1e-4 * np.abs(part).max()
    )
    assert (out[:, 0] == 7.0).all() and (out[:, -1] == 7.0).all()


def test_misaligned_columns_rejected():
    w = from_gguf_blocks(random_blocks("q4_k", 2, 256), "q4_k", 2, 256)
    with pytest.raises(ValueError, match="multiples"):
        matmul(w, np.zeros((1, 256), np.float32), col_range=(0, 32))


def reference(w, x, r0, r1, c0, c1):
    """float64 x[:, c0:c1] @ W[r0:r1, c0:c1].T from the bit-exact dequantization."""
    return x[:, c0:c1].astype(np.float64) @ dequantize(w)[r0:r1, c0:c1].astype(np.float64).T


@pytest.mark.parametrize("kind", sorted(QTYPES))
@pytest.mark.parametrize("n", [1, 3, 17, 300])
def test_matmul_row_and_col_ranges(kind, n):
    # odd row counts and ranges exercise the clamped tail rows of the 4-row passes; a partial
    # column range takes the per-row scale expansion; n = 300 the dequantized-tile path
    cls = next(k for k in KINDS if k.KIND == kind)
    rows, cols = 37, cls.BLOCK * (3 if cls.BLOCK == 256 else 24)
    w = from_gguf_blocks(random_blocks(kind, rows, cols), kind, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    for (r0, r1), (c0, c1) in [
        ((0, rows), (0, cols)),
        ((3, rows - 2), (cls.BLOCK, cols - cls.BLOCK)),
        ((5, 6), (0, cls.BLOCK)),
        ((0, rows), (cols - cls.BLOCK, cols)),
    ]:
        out = np.full((n, rows), 7.0, np.float32)
        matmul(w, x, out, row_range=(r0, r1), col_range=(c0, c1))
        ref = reference(w, x, r0, r1, c0, c1)
        np.testing.assert_allclose(out[:, r0:r1], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert (out[:, :r0] == 7.0).all() and (out[:, r1:] == 7.0).all()


@pytest.mark.parametrize("kind", sorted(QTYPES))
@pytest.mark.parametrize("n", [1, 17])
def test_run_kernel_offsets(kind, n):
    # x holding only columns c0.. and out only rows r0..r1 (as expert_forward slices them)
    cls = next(k for k in KINDS if k.KIND == kind)
    rows, cols = 40, cls.BLOCK * 4
    w = from_gguf_blocks(random_blocks(kind, rows, cols), kind, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    r0, r1, c0, c1 = 6, 29, cls.BLOCK, 3 * cls.BLOCK
    out = np.zeros((n, r1 - r0), np.float32)
    run_kernel(w, np.ascontiguousarray(x[:, c0:]), out, r0, r1, c0, c1, c0, r0)
    ref = reference(w, x, r0, r1, c0, c1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("kind", sorted(QTYPES))
def test_planes_stay_gguf_sized(kind):
    # the kernels read packed planes: within 3% of the GGUF bytes (K-quants unpack 6-bit scales)
    cls = next(k for k in KINDS if k.KIND == kind)
    w = from_gguf_blocks(random_blocks(kind, 4, 512), kind, 4, 512)
    assert w.gguf_nbytes <= w.nbytes <= 1.03 * w.gguf_nbytes
    assert all(p.flags.c_contiguous for p in w.planes)
    assert cls.BLOCK_BYTES * (512 // cls.BLOCK) * 4 == w.gguf_nbytes
