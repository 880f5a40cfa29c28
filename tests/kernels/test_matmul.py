"""mer.kernels.matmul: every weight kind against a float64 NumPy reference, exact dequantization
against gguf, zero-copy packing, and the wrapper's argument checks."""

from __future__ import annotations

import gguf
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mer.kernels import matmul as mm

KINDS = ["f32", "f16", "bf16", "q8_0", "q4_0"]
QKINDS = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}
GGUF_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, **QKINDS}
SENTINEL = np.float32(-12345.0)


def make_weight(kind: str, rows: int, cols: int, rng: np.random.Generator) -> mm.PackedWeight:
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "f32":
        return mm.pack_float(a, "f32")
    if kind == "f16":
        return mm.pack_float(a.astype(np.float16), "f16")
    if kind == "bf16":
        return mm.pack_float((a.view(np.uint32) >> 16).astype(np.uint16), "bf16")
    return mm.quantize(a, kind)


def reference(w: mm.PackedWeight, x: np.ndarray, rr, cr) -> np.ndarray:
    wd = mm.dequantize(w).astype(np.float64)[rr[0] : rr[1], cr[0] : cr[1]]
    return x[:, cr[0] : cr[1]].astype(np.float64) @ wd.T


def assert_close(got, w, x, rr, cr):
    want = reference(w, x, rr, cr)
    # float32 accumulation error is bounded relative to sum |x| |w|, not to the result itself.
    wd = np.abs(mm.dequantize(w).astype(np.float64)[rr[0] : rr[1], cr[0] : cr[1]])
    scale = np.abs(x[:, cr[0] : cr[1]]).astype(np.float64) @ wd.T + 1e-30
    assert np.all(np.abs(got - want) <= 2e-6 * scale + 1e-6 * np.abs(want)), (
        f"max rel err {np.max(np.abs(got - want) / scale):.3g}"
    )


def shapes(kind: str) -> list[tuple[int, int]]:
    # Odd row counts (tails of the 2- and 4-row passes and of the 16-row tiles); columns that
    # are no multiple of the vector width, and past one n>1 column tile (1024) with a ragged end.
    if kind in QKINDS:
        return [(13, 96), (7, 160), (37, 1120)]
    return [(13, 33), (7, 100), (37, 1100)]


CASES = [(k, rows, cols) for k in KINDS for rows, cols in shapes(k)]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(mm, "_PAR_MIN_WORK", 0)  # small test shapes still take the parallel path
    old = mm.get_num_threads()
    mm.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    mm.set_num_threads(old)


@pytest.mark.parametrize("kind,rows,cols", CASES)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_matches_reference_full(kind, rows, cols, n, threads):
    rng = np.random.default_rng([rows, cols, n])
    w = make_weight(kind, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    out = mm.matmul(w, x)
    assert out.shape == (n, rows) and out.dtype == np.float32
    assert_close(out, w, x, (0, rows), (0, cols))


@pytest.mark.parametrize("kind,rows,cols", CASES)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_row_and_col_ranges(kind, rows, cols, n, threads):
    rng = np.random.default_rng([rows, cols, n, 1])
    w = make_weight(kind, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    bs = w.block_size
    rr = (2, rows - 3)
    cr = (bs, cols - bs) if bs > 1 else (1, cols - 5)
    out = np.full((n, rows), SENTINEL, np.float32)
    assert mm.matmul(w, x, out=out, row_range=rr, col_range=cr) is out
    assert_close(out[:, rr[0] : rr[1]], w, x, rr, cr)
    assert np.all(out[:, : rr[0]] == SENTINEL) and np.all(out[:, rr[1] :] == SENTINEL)


@pytest.mark.parametrize("kind", KINDS)
def test_single_row_and_empty_ranges(kind):
    rng = np.random.default_rng(5)
    w = make_weight(kind, 9, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out = np.full((2, 9), SENTINEL, np.float32)
    mm.matmul(w, x, out=out, row_range=(4, 5), col_range=(32, 64))
    assert_close(out[:, 4:5], w, x, (4, 5), (32, 64))
    mm.matmul(w, x, out=out, row_range=(6, 6))
    mm.matmul(w, x, out=out, row_range=(7, 8), col_range=(32, 32))
    assert np.all(out[:, 7] == 0) and np.all(out[:, [0, 1, 2, 3, 5, 6, 8]] == SENTINEL)


@pytest.mark.parametrize("kind", KINDS)
def test_threads_give_identical_results(kind, monkeypatch):
    monkeypatch.setattr(mm, "_PAR_MIN_WORK", 0)
    rng = np.random.default_rng(11)
    w = make_weight(kind, 45, 256, rng)
    old = mm.get_num_threads()
    for n in (1, 5):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        mm.set_num_threads(1)
        a = mm.matmul(w, x, row_range=(3, 44))
        mm.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b = mm.matmul(w, x, row_range=(3, 44))
        assert np.array_equal(a, b)
    mm.set_num_threads(old)


@pytest.mark.parametrize("kind", list(QKINDS))
def test_dequantize_exact_from_quantize(kind):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((11, 160)) * rng.uniform(0.01, 100, (11, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(a, QKINDS[kind])
    w = mm.quantize(a, kind)
    assert np.array_equal(mm.dequantize(w), gguf.quants.dequantize(blocks, QKINDS[kind]))
    assert w.nbytes == w.gguf_nbytes == blocks.nbytes


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_exact_from_random_blocks(kind):
    rng = np.random.default_rng(3)
    rows, cols = 6, 96
    w0 = make_weight(kind, rows, cols, rng)
    raw = rng.integers(0, 256, w0.gguf_nbytes, dtype=np.uint8)
    if kind in QKINDS:
        # Random quants, random finite f16 scales (normal and subnormal).
        per = mm._KINDS[kind].BLOCK_BYTES
        blk = raw.reshape(-1, per)
        scales = (rng.standard_normal(len(blk)) * 10.0 ** rng.integers(-7, 3, len(blk))).astype(
            np.float16
        )
        blk[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    elif kind in ("f16", "bf16"):
        raw.view(np.uint16)[:] &= 0xBFFF  # top exponent bit off: |w| < 2, subnormals kept
    else:
        raw = rng.standard_normal(rows * cols).astype(np.float32).view(np.uint8)
    w = mm.from_gguf_blocks(raw, kind, rows, cols)
    want = gguf.quants.dequantize(raw.reshape(rows, -1), GGUF_TYPES[kind])
    assert np.array_equal(mm.dequantize(w), want.reshape(rows, cols))
    x = rng.standard_normal((2, cols)).astype(np.float32)
    assert_close(mm.matmul(w, x), w, x, (0, rows), (0, cols))


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
def test_float_packing_is_zero_copy(kind, tmp_path):
    dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind]
    mmap = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=dtype, shape=(8, 40))
    mmap[:] = np.arange(320).reshape(8, 40).astype(dtype)
    w = mm.pack_float(mmap, kind)
    assert all(np.shares_memory(p, mmap) for p in w.planes)
    assert w.nbytes == w.gguf_nbytes == mmap.nbytes and w.block_size == 1
    raw = np.asarray(mmap).reshape(-1).view(np.uint8)
    assert np.shares_memory(mm.from_gguf_blocks(raw, kind, 8, 40).planes[0], mmap)


def test_sizes_of_quantized_kinds():
    rng = np.random.default_rng(4)
    for kind, per in (("q8_0", 34), ("q4_0", 18)):
        w = make_weight(kind, 5, 128, rng)
        assert w.gguf_nbytes == 5 * 4 * per and w.block_size == 32 and w.nbytes == w.gguf_nbytes


def test_wrapper_rejects_bad_arguments():
    rng = np.random.default_rng(6)
    w = make_weight("q4_0", 8, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    bad_x = [
        x.astype(np.float64),
        np.asfortranarray(rng.standard_normal((3, 64)).astype(np.float32)),
        rng.standard_normal((2, 128)).astype(np.float32)[:, ::2],
        x[:, :32],
        x[0],
        np.zeros((0, 64), np.float32),
    ]
    for b in bad_x:
        with pytest.raises(ValueError, match="x must"):
            mm.matmul(w, b)
    for out in (np.zeros((2, 8)), np.zeros((2, 9), np.float32), np.zeros((8, 2), np.float32).T):
        with pytest.raises(ValueError, match="out must"):
            mm.matmul(w, x, out=out)
    for cr in ((0, 48), (16, 64), (0, 96)):
        with pytest.raises(ValueError, match="col_range"):
            mm.matmul(w, x, col_range=cr)
    for rr in ((0, 9), (5, 4), (-1, 3)):
        with pytest.raises(ValueError, match="row_range"):
            mm.matmul(w, x, row_range=rr)
    with pytest.raises(ValueError, match="shape"):
        mm.quantize(rng.standard_normal((4, 40)).astype(np.float32), "q8_0")
    with pytest.raises(ValueError, match="kind"):
        mm.quantize(x, "q5_0")
    with pytest.raises(ValueError, match="float16"):
        mm.pack_float(x, "f16")
    with pytest.raises(ValueError, match="bytes"):
        mm.from_gguf_blocks(np.zeros(10, np.uint8), "q8_0", 1, 32)
    with pytest.raises(ValueError):
        mm.set_num_threads(0)
