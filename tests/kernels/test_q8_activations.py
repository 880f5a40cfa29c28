"""8-bit activations: ggml's activation quantization, the row-interleaved integer kernels
(VNNI, AVX2 and portable paths) against NumPy and against ggml's own dot products."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from mer.kernels import act_q8, mm_x16
from mer.kernels import matmul as mm
from mer.kernels.quantize import quantize_blocks

KINDS = {
    "q4_0": mm_x16.Q4_0X16,
    "q8_0": mm_x16.Q8_0X16,
    "q4_1": mm_x16.Q4_1X16,
    "q5_0": mm_x16.Q5_0X16,
    "q5_1": mm_x16.Q5_1X16,
    "mxfp4": mm_x16.MXFP4X16,
    "q4_k": mm_x16.Q4_KX16,
    "q5_k": mm_x16.Q5_KX16,
    "q6_k": mm_x16.Q6_KX16,
}
BLOCK = {"q4_k": 256, "q5_k": 256, "q6_k": 256}  # columns per block (32 for the others)
X86 = platform.machine() in ("x86_64", "AMD64")


def q4_1_blocks(w: np.ndarray) -> np.ndarray:
    """GGUF Q4_1 bytes [N, B, 20] of float32 w (min/max per block, as ggml's reference)."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    lo, hi = b.min(-1), b.max(-1)
    d = ((hi - lo) / 15).astype(np.float16)
    m = lo.astype(np.float16)
    step = np.where(d == 0, 1, d.astype(np.float32))[..., None]
    q = np.clip(np.round((b - m.astype(np.float32)[..., None]) / step), 0, 15).astype(np.uint8)
    raw = np.empty((n, k // 32, 20), np.uint8)
    raw[..., 0:2] = d[..., None].view(np.uint8)
    raw[..., 2:4] = m[..., None].view(np.uint8)
    raw[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return raw


RANDOM = {  # block types drawn as random bytes: (block bytes, offsets of f16 fields)
    "q4_k": (144, (0, 2)),
    "q5_k": (176, (0, 2)),
    "q6_k": (210, (208,)),
    "q5_0": (22, (0,)),
    "q5_1": (24, (0, 2)),
}


def k_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K, Q5_K, Q6_K, Q5_0 or Q5_1 bytes [N, B, block bytes] with moderate finite f16
    fields."""
    size, halves_at = RANDOM[kind]
    raw = rng.integers(0, 256, size=(rows, cols // BLOCK.get(kind, 32), size), dtype=np.uint8)
    for off in halves_at:
        halves = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
        raw[..., off : off + 2] = halves[..., None].view(np.uint8)
    return raw


def blocks(kind: str, w: np.ndarray) -> np.ndarray:
    """GGUF bytes [N, B, block bytes] of w (K-quants: random blocks of w's shape); Q8_0
    weights include -128 as a file may."""
    if kind in RANDOM:
        return k_blocks(kind, *w.shape, np.random.default_rng(int(abs(w[0, 0]) * 1e6)))
    if kind == "q4_1":
        return q4_1_blocks(w)
    if kind == "mxfp4":  # random nibbles, exponents around 2^-10 (and a few subnormal ones)
        rng = np.random.default_rng(int(abs(w[0, 0]) * 1e6))
        raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // 32, 17), dtype=np.uint8)
        raw[..., 0] = rng.integers(110, 136, raw.shape[:2])
        raw[0, :, 0] = np.arange(raw.shape[1]) % 3  # e = 0, 1, 2
        return raw
    raw = quantize_blocks(w, kind).reshape(w.shape[0], w.shape[1] // 32, -1)
    if kind == "q8_0":
        raw[0, 0, 2] = 128  # int8 -128
    return raw


def reference(kind: str, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64 [n, N]: ggml's arithmetic per block, summed exactly: f16(d_w) f16(d_x) isum
    (+ f16(m_w) * Q8_1's f16(s_x) for Q4_1 and Q5_1), with the activations quantized by
    act_q8."""
    if kind in ("q4_k", "q5_k"):
        return reference_q4_k(raw, x)
    if kind == "q6_k":
        return reference_q6_k(raw, x)
    n_rows, nb = raw.shape[:2]
    xq, xd, _, xm = act_q8.quantize(x, 0, 32 * nb)
    h = {"q4_1": 4, "mxfp4": 1, "q5_0": 6, "q5_1": 8}.get(kind, 2)
    if kind == "mxfp4":  # 2^(e - 128): the table's values are doubled
        d = 2.0 ** (raw[..., 0].astype(np.float64) - 128)
    else:
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if kind == "q8_0":
        q = raw[..., 2:].view(np.int8).astype(np.int64)
    else:
        qs = raw[..., h:]
        q = np.concatenate([qs & 15, qs >> 4], -1).astype(np.int64) - (8 if kind == "q4_0" else 0)
        if kind in ("q5_0", "q5_1"):  # bit j of the u32 before the nibbles: weight j's fifth
            qh = raw[..., h - 4 : h].copy().view(np.uint32).astype(np.int64)  # [N, B, 1]
            q = q | (((qh >> np.arange(32)) & 1) << 4)
            q = q - (16 if kind == "q5_0" else 0)
        if kind == "mxfp4":
            q = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12])[q]
    isum = np.einsum("rbj,tbj->trb", q, xq.reshape(len(x), nb, 32).astype(np.int64))
    out = isum * d[None] * xd[:, None, :].astype(np.float64)
    if kind in ("q4_1", "q5_1"):
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        out = out + m[None] * xm[:, None, :].astype(np.float64)
    return out.sum(-1)


def reference_q4_k(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's Q4_K (Q5_K) x Q8_K per super-block: d_x d_w sum_j sc_j isum_j - d_x dmin_w sum_j
    mn_j bsum_j, exact integers, float64 sums."""
    from mer.kernels.mm_gguf import k_scales

    n_rows, S = raw.shape[:2]
    xq, xd, xs = act_q8.quantize_k(x, 0, 256 * S)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    dmin = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    sc, mn = (a.astype(np.int64) for a in k_scales(raw[..., 4:16]))  # [N, S, 8]
    qs = raw[..., -128:].reshape(n_rows, S, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    q = (qs & 15).reshape(n_rows, S, 8, 32).astype(np.int64)
    if raw.shape[-1] == 176:  # Q5_K: bit j of byte i is the fifth bit of weight i of sub-block j
        qh = raw[..., 16:48].astype(np.int64)  # [N, S, 32]
        q = q | (((qh[:, :, None, :] >> np.arange(8)[:, None]) & 1) << 4)
    a = xq.reshape(len(x), S, 8, 32).astype(np.int64)
    isum = np.einsum("rsuj,tsuj->trsu", q, a)
    sumi = (isum * sc[None]).sum(-1)
    summ = (mn[None] * xs.reshape(len(x), 1, S, 8, 2).sum(-1)).sum(-1)
    dx = xd.astype(np.float64)[:, None, :]
    return (dx * d[None] * sumi - dx * dmin[None] * summ).sum(-1)


def reference_q6_k(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's Q6_K x Q8_K: d_x d_w sum over groups of 16 of scale * sum (q - 32) a, q as
    dequantize_row_q6_K reads it, exact integers, float64 sums."""
    n_rows, S = raw.shape[:2]
    xq, xd, _ = act_q8.quantize_k(x, 0, 256 * S)
    ql, qh = raw[..., :128].astype(np.int64), raw[..., 128:192].astype(np.int64)
    q = np.zeros((n_rows, S, 256), np.int64)
    for n in (0, 1):
        for l in range(32):
            a, b2, h = ql[..., 64 * n + l], ql[..., 64 * n + l + 32], qh[..., 32 * n + l]
            q[..., 128 * n + l] = (a & 15) | ((h & 3) << 4)
            q[..., 128 * n + l + 32] = (b2 & 15) | (((h >> 2) & 3) << 4)
            q[..., 128 * n + l + 64] = (a >> 4) | (((h >> 4) & 3) << 4)
            q[..., 128 * n + l + 96] = (b2 >> 4) | (((h >> 6) & 3) << 4)
    sc = raw[..., 192:208].copy().view(np.int8).astype(np.int64)  # [N, S, 16]
    d = raw[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float64)
    a = xq.reshape(len(x), S, 16, 16).astype(np.int64)
    isum = np.einsum("rsgj,tsgj->trsg", (q - 32).reshape(n_rows, S, 16, 16), a)
    sumi = (isum * sc[None]).sum(-1)
    return (xd.astype(np.float64)[:, None, :] * d[None] * sumi).sum(-1)


def ggml_cpu() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    return lib


def ggml_blocks(
    lib: ctypes.CDLL, name: str, x: np.ndarray, size: int, block: int = 32
) -> np.ndarray:
    out = np.zeros((x.shape[1] // block) * size, np.uint8)
    fn = getattr(lib, name)
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), x.shape[1])
    return out.reshape(-1, size)


def activations_rng(rng, n: int, k: int) -> np.ndarray:
    x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 30, (n, 1))).astype(np.float32)
    x[0, :32] = 0.0  # a zero block: d = 0, every q = 0
    if k < 96:
        return x
    x[-1, 32:64] = np.arange(32, dtype=np.float32) - 15.5  # amax 16.5: x * 127/16.5 has ties?
    x[-1, 64:96] = np.where(np.arange(32) % 2, 2.5, -127.0)  # amax 127: 2.5 is a tie, to 2
    return x


@pytest.mark.skipif(not X86, reason="ggml's x86 quantizer is the reference")
def test_activation_quantization_bit_identical_to_ggml():
    lib = ggml_cpu()
    rng = np.random.default_rng(0)
    x = activations_rng(rng, 4, 32 * 37)
    for t in range(len(x)):
        row = np.ascontiguousarray(x[t : t + 1])
        want = ggml_blocks(lib, "quantize_row_q8_0", row, 34)
        np.testing.assert_array_equal(act_q8.blocks(row).reshape(-1, 34), want)
        q8_1 = ggml_blocks(lib, "quantize_row_q8_1", row, 36)
        xq, xd, xs, xm = act_q8.quantize(row, 0, row.shape[1])
        np.testing.assert_array_equal(q8_1[:, 4:].view(np.int8), xq.reshape(-1, 32))
        np.testing.assert_array_equal(q8_1[:, :2].copy().view(np.float16)[:, 0], xd[0])
        np.testing.assert_array_equal(q8_1[:, 2:4].copy().view(np.float16)[:, 0], xm[0])
        np.testing.assert_array_equal(xs[0], xq.reshape(-1, 32).astype(np.int32).sum(-1))
    assert act_q8.blocks(x[-1:])[0, 2, 2 + 1] == 2  # the tie went to even
    # Q8_K (the K-quants' activations): 256 per block, float32 d, sums of 16
    xk = activations_rng(rng, 3, 256 * 5)
    xk[1, 256:512] = -xk[1, 256:512].max()  # every value of one block ties for largest
    for t in range(len(xk)):
        row = np.ascontiguousarray(xk[t : t + 1])
        want = ggml_blocks(lib, "quantize_row_q8_K", row, 292, 256)
        xq, xd, xs = act_q8.quantize_k(row, 0, row.shape[1])
        np.testing.assert_array_equal(want[:, :4].copy().view(np.float32)[:, 0], xd[0])
        np.testing.assert_array_equal(want[:, 4:260].view(np.int8), xq.reshape(-1, 256))
        bsums = want[:, 260:].copy().view(np.int16).astype(np.int32)
        np.testing.assert_array_equal(bsums.reshape(-1), xs[0])


@pytest.mark.skipif(not X86, reason="ggml's x86 dot products are the reference")
@pytest.mark.parametrize("kind", KINDS)
def test_dot_products_equal_ggml(kind):
    lib = ggml_cpu()
    rng = np.random.default_rng(1)
    n_rows, k = 32, BLOCK.get(kind, 32) * 19
    raw = blocks(kind, rng.standard_normal((n_rows, k)).astype(np.float32))
    x = activations_rng(rng, 1, k)
    pair = {"q4_1": ("q8_1", 36), "q5_1": ("q8_1", 36)}.get(
        kind, ("q8_K", 292) if "_k" in kind else ("q8_0", 34)
    )
    y = ggml_blocks(lib, f"quantize_row_{pair[0]}", x, pair[1], BLOCK.get(kind, 32))
    dot = getattr(lib, f"ggml_vec_dot_{kind.replace('_k', '_K')}_{pair[0]}")
    want = np.zeros(n_rows, np.float32)
    for r in range(n_rows):
        s = ctypes.c_float()
        row = np.ascontiguousarray(raw[r])
        dot(k, ctypes.byref(s), 0, row.ctypes.data_as(ctypes.c_void_p), 0,
            y.ctypes.data_as(ctypes.c_void_p), 0, 1)  # fmt: skip
        want[r] = s.value
    w = mm.from_gguf_blocks(raw.reshape(-1), kind, n_rows, k, activations="q8")
    assert w.kind == kind + "x16"
    got = mm.matmul(w, x)[0]
    # the same products; only the float summation order differs
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


CHECK = """
import numpy as np
from mer.kernels import mm_x16
from mer.kernels import matmul as mm
from tests.kernels.test_q8_activations import BLOCK, KINDS, activations_rng, blocks, reference

print(mm_x16.PATH)
rng = np.random.default_rng(2)
for kind in KINDS:
    bk = BLOCK.get(kind, 32)
    for n_rows, nb in ((16, 1), (48, 3), (32, 17), (64, 40))[: 3 if bk > 32 else 4]:
        raw = blocks(kind, rng.standard_normal((n_rows, bk * nb)).astype(np.float32))
        w = mm.from_gguf_blocks(raw.reshape(-1), kind, n_rows, bk * nb, activations="q8")
        x = activations_rng(rng, 3, bk * nb)
        want = reference(kind, raw, x)
        scale = 2e-6 * np.abs(want).max() + 1e-30
        got = mm.matmul(w, x)
        assert np.abs(got - want).max() <= scale, (kind, n_rows, nb, np.abs(got - want).max())
        # a row range and a column range cut through groups and blocks
        if nb > 1:
            r0, r1, c0 = 5, n_rows - 3, bk
            part = mm.matmul(w, x, row_range=(r0, r1), col_range=(c0, bk * nb))
            sub = reference(kind, raw[r0:r1, 1:], np.ascontiguousarray(x[:, c0:]))
            assert np.abs(part[:, r0:r1] - sub).max() <= scale
            assert not part[:, :r0].any() and not part[:, r1:].any()
print("ok")
"""


def run_check(env_extra: dict[str, str], tmp_path) -> str:
    env = {**os.environ, **env_extra, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHECK)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "ok", proc.stderr[-3000:]
    return proc.stdout.split()[0]


def test_integer_kernels_against_numpy_on_this_cpu():
    exec(compile(textwrap.dedent(CHECK), "check", "exec"), {})


@pytest.mark.skipif(not X86, reason="x86 CPU names")
@pytest.mark.parametrize(("cpu", "path"), [("haswell", "avx2"), ("generic", "portable")])
def test_forced_paths(cpu, path, tmp_path):
    # A pinned CPU compiles its own kernels (numba keys its cache by CPU) and takes its path.
    assert run_check({"NUMBA_CPU_NAME": cpu}, tmp_path) == path


def test_this_cpu_path():
    feats = __import__("llvmlite.binding", fromlist=["x"]).get_host_cpu_features()
    if numba.config.CPU_NAME is None and feats.get("avx512vnni") and feats.get("avx512bw"):
        assert mm_x16.PATH == "vnni"


@pytest.mark.parametrize("kind", KINDS)
def test_batch_invariance(kind):
    # each token alone, or among others, on one thread or two: the same bits
    rng = np.random.default_rng(3)
    k = BLOCK.get(kind, 32) * 9
    raw = blocks(kind, rng.standard_normal((96, k)).astype(np.float32))
    w = mm.from_gguf_blocks(raw.reshape(-1), kind, 96, k, activations="q8")
    x = activations_rng(rng, 7, k)
    threads = mm.get_num_threads()
    try:
        outs = []
        for nt in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            mm.set_num_threads(nt, adaptive=False)
            outs.append(mm.matmul(w, x))
            outs += [np.concatenate([mm.matmul(w, x[t : t + 1]) for t in range(len(x))])]
    finally:
        mm.set_num_threads(threads)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("kind", KINDS)
def test_packing(kind):
    rng = np.random.default_rng(4)
    k = 3 * BLOCK.get(kind, 32)
    raw = blocks(kind, rng.standard_normal((48, k)).astype(np.float32)).reshape(-1)
    plain = mm.from_gguf_blocks(raw, kind, 48, k)
    assert plain.kind == kind  # packing is for f32 unless a block says otherwise
    w = mm.from_gguf_blocks(raw, kind, 48, k, activations="q8")
    assert w.gguf_nbytes == plain.gguf_nbytes
    assert w.nbytes == plain.nbytes  # GGUF-sized (K-quants: scales unpacked, as the plain kind)
    np.testing.assert_array_equal(KINDS[kind].to_raw(w.planes, 48, k), raw)
    np.testing.assert_array_equal(mm.dequantize(w), mm.dequantize(plain))
    assert [(p.dtype.str, p.shape) for p in w.planes] == [
        (dtype, shape) for dtype, shape in mm.plane_specs(w.kind, 48, k)
    ]
    assert mm.requantize(w, kind) is w
    # rows that are not whole groups keep the plain kind (float activations)
    odd = np.ascontiguousarray(raw[: 40 * len(raw) // 48])
    assert mm.from_gguf_blocks(odd, kind, 40, k, activations="q8").kind == kind
    with pytest.raises(ValueError, match="multiple of 16"):
        mm.plane_specs(w.kind, 40, k)
    with mm.packing("q8"):
        assert mm.from_gguf_blocks(raw, kind, 48, k).kind == w.kind
    assert mm.activations() == "f32"


def test_unknown_mode():
    with pytest.raises(ValueError, match="activations must be one of f32, q8"):
        with mm.packing("int4"):
            pass
