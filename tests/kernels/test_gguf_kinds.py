"""Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, MXFP4: bit-exact dequantization and matmul vs NumPy."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mer.io.gguf import KINDS as GGUF_KINDS
from mer.io.gguf import GGUFFile
from mer.kernels import matmul as mm
from mer.kernels.matmul import dequantize, from_gguf_blocks, matmul, run_kernel
from mer.kernels.mm_gguf import KINDS, MXFP4

QTYPES = {
    "q4_1": T.Q4_1,
    "q5_0": T.Q5_0,
    "q5_1": T.Q5_1,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
    "mxfp4": T.MXFP4,
}
CLASSES = {k.KIND: k for k in (*KINDS, MXFP4)}
rng = np.random.default_rng(3)


def random_blocks(kind: str, rows: int, cols: int) -> np.ndarray:
    """Random block bytes whose f16 fields are finite, moderate scales (MXFP4: exponents
    around 2^-10, as in real weights)."""
    cls = CLASSES[kind]
    nb = rows * cols // cls.BLOCK
    raw = rng.integers(0, 256, size=(nb, cls.BLOCK_BYTES), dtype=np.uint8)
    if kind == "mxfp4":
        raw[:, 0] = rng.integers(110, 136, nb)
        return raw
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
    cls = CLASSES[kind]
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
    cls = CLASSES[kind]
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
    cls = CLASSES[kind]
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
    cls = CLASSES[kind]
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
    cls = CLASSES[kind]
    w = from_gguf_blocks(random_blocks(kind, 4, 512), kind, 4, 512)
    assert w.gguf_nbytes <= w.nbytes <= 1.03 * w.gguf_nbytes
    assert all(p.flags.c_contiguous for p in w.planes)
    assert cls.BLOCK_BYTES * (512 // cls.BLOCK) * 4 == w.gguf_nbytes


def mxfp4_weight(rows: int, cols: int) -> mm.PackedWeight:
    return from_gguf_blocks(random_blocks("mxfp4", rows, cols), "mxfp4", rows, cols)


def assert_close_to(got, w, x, r0, r1, c0, c1):
    # float32 accumulation error is bounded relative to sum |x| |w|, not to the result itself
    wd = dequantize(w)[r0:r1, c0:c1].astype(np.float64)
    scale = np.abs(x[:, c0:c1]).astype(np.float64) @ np.abs(wd).T + 1e-30
    want = reference(w, x, r0, r1, c0, c1)
    assert np.all(np.abs(got - want) <= 2e-6 * scale), np.max(np.abs(got - want) / scale)


def test_mxfp4_dequantize_every_exponent_and_nibble():
    # every nibble pair under the subnormal (0, 1), smallest normal (2), unit (128) and
    # largest (254, 255: 12 * 2^127 overflows to inf) exponents, and all the others
    exps = np.array([0, 1, 2, 127, 128, 254, 255, *range(256)], np.uint8)
    blocks = np.empty((len(exps), 16, 17), np.uint8)  # 16 blocks hold all 256 byte values
    blocks[:, :, 0] = exps[:, None]
    blocks[:, :, 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rows, cols = len(exps), 16 * 32
    raw = blocks.reshape(-1)
    with np.errstate(over="ignore"):
        got = dequantize(from_gguf_blocks(raw, "mxfp4", rows, cols))
        np.testing.assert_array_equal(got, gguf_dequantize(raw.reshape(rows, -1), T.MXFP4))
        # and from the definition: doubled E2M1 values times 2^(e - 128)
        table = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)
        nib = blocks[:, :, 1:]
        q = np.concatenate([table[nib & 15], table[nib >> 4]], axis=-1).reshape(rows, cols)
        want = (q * np.ldexp(1.0, exps.astype(np.int64) - 128)[:, None]).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got[-1]).any() and (got[0][got[0] != 0] < 1e-37).all()  # both ends reached


@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("cols", [32, 96, 2880])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_mxfp4_matmul_odd_shapes(rows, cols, n):
    w = mxfp4_weight(rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    assert_close_to(matmul(w, x), w, x, 0, rows, 0, cols)
    if cols > 32:  # a sub-range of rows and of whole blocks; the rest of out untouched
        r0, r1, c0, c1 = rows // 3, rows - rows // 4, 32, cols - 32
        out = np.full((n, rows), 7.0, np.float32)
        matmul(w, x, out, row_range=(r0, r1), col_range=(c0, c1))
        assert_close_to(out[:, r0:r1], w, x, r0, r1, c0, c1)
        assert (out[:, :r0] == 7.0).all() and (out[:, r1:] == 7.0).all()


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(mm, "_PAR_MIN_WORK", 0)  # small shapes still take the parallel path
    old = mm.get_num_threads()
    mm.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield
    mm.set_num_threads(old)


@pytest.mark.parametrize("rows,cols", [(37, 2880), (6, 96)])
def test_mxfp4_batch_invariant(rows, cols, threads):
    # a token's row is bit-identical alone and among others, on one thread or several
    w = mxfp4_weight(rows, cols)
    x = rng.standard_normal((7, cols)).astype(np.float32)
    together = matmul(w, x)
    for t in range(len(x)):
        np.testing.assert_array_equal(matmul(w, x[t : t + 1])[0], together[t])
    np.testing.assert_array_equal(matmul(w, x[2:5]), together[2:5])
    assert_close_to(together, w, x, 0, rows, 0, cols)


def test_mxfp4_prefill_tiles():
    # without batch invariance, several tokens run through the dequantized tiles
    w = mxfp4_weight(37, 2880)
    x = rng.standard_normal((9, 2880)).astype(np.float32)
    mm.set_batch_invariant(False)
    try:
        out = np.full((9, 37), 7.0, np.float32)
        matmul(w, x, out, row_range=(2, 35), col_range=(64, 2848))
    finally:
        mm.set_batch_invariant(True)
    assert_close_to(out[:, 2:35], w, x, 2, 35, 64, 2848)
    assert (out[:, :2] == 7.0).all() and (out[:, 35:] == 7.0).all()


@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 96), (37, 2880)])
def test_mxfp4_plane_specs_and_sizes(rows, cols):
    # what a store allocates for a matrix is what packing the GGUF bytes makes
    w = mxfp4_weight(rows, cols)
    assert mm.plane_specs("mxfp4", rows, cols) == [(p.dtype.str, p.shape) for p in w.planes]
    assert mm.row_bytes("mxfp4", cols) == cols // 32 * 17 == w.gguf_nbytes // rows
    assert w.nbytes == w.gguf_nbytes and w.block_size == 32
    assert GGUF_KINDS[T.MXFP4] == "mxfp4"
    with pytest.raises(ValueError, match="multiple"):
        mm.row_bytes("mxfp4", cols + 16)


def test_mxfp4_tensor_of_a_gguf_file(tmp_path):
    # gguf's own quantizer writes the file; the loader names the kind and the bytes pack as is
    a = rng.standard_normal((6, 96)).astype(np.float32)
    blocks = gguf_quantize(a, T.MXFP4)
    writer = GGUFWriter(tmp_path / "w.gguf", "llama")
    writer.add_tensor("w", blocks, raw_shape=blocks.shape, raw_dtype=T.MXFP4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw, kind = GGUFFile(tmp_path / "w.gguf").tensor("w", (6, 96))
    w = from_gguf_blocks(raw.reshape(-1), kind, 6, 96)
    assert kind == "mxfp4"
    np.testing.assert_array_equal(dequantize(w), gguf_dequantize(blocks, T.MXFP4))


PORTABLE = """
import numpy as np
from mer.kernels import mm_sb_ir
from mer.kernels.matmul import dequantize, from_gguf_blocks, matmul
assert not mm_sb_ir.PERM
rng = np.random.default_rng(0)
raw = rng.integers(0, 256, (37, 90, 17), dtype=np.uint8)
raw[:, :, 0] = rng.integers(110, 136, (37, 90))
w = from_gguf_blocks(raw.reshape(-1), "mxfp4", 37, 2880)
x = rng.standard_normal((2, 2880)).astype(np.float32)
want = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
scale = np.abs(x).astype(np.float64) @ np.abs(dequantize(w).astype(np.float64)).T
assert np.all(np.abs(matmul(w, x) - want) <= 2e-6 * scale)
print("ok")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU name")
def test_mxfp4_portable_decode(tmp_path):
    # A pinned CPU (AVX2, no AVX-512) takes the byte-table decode instead of vpermps; its
    # kernels compile into their own cache.
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PORTABLE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
