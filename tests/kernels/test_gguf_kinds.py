"""Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: bit-exact dequantization and matmul vs NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from mer.kernels.matmul import dequantize, from_gguf_blocks, matmul
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
