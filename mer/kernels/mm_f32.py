# Dimensions: N = output rows, K = input cols, n = tokens, L = length of one dot product.
# Layout "f32": one plane, the row-major float32 matrix [N, K] itself (zero-copy from a memmap).
#
# This file also holds what every kind shares: the fastmath flag set, the row-chunk
# splitter for threads, and the n>1 GEMM tile that works on float32 rows already in cache.
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

KIND = "f32"
BLOCK = 1  # column granularity
BLOCK_BYTES = 4  # GGUF bytes per block

# Reassociation lets LLVM vectorize the float32 reductions; we leave out nnan/ninf/afn so
# inf/nan weights or activations keep IEEE behaviour.
FM = {"reassoc", "contract", "nsz", "arcp"}
ROW_GROUP = 16  # rows dequantized together on the n>1 path
COL_CHUNK = 1024  # columns per cache tile on the n>1 path (a multiple of 32)
PF_ROWS = 8  # software prefetch distance, in rows, of the quantized matvec kernels
PF_MIN_BYTES = 1 << 22  # ... used only for matrices bigger than this
SMALL_N = 4  # quantized kinds: up to this many tokens, decode per token instead of a tile


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the cache line holding arr.flat[idx] into cache (arr C-contiguous; never faults).

    The quantized kernels walk each row in many short strided runs, which the hardware
    prefetchers follow poorly; prefetching rows ahead lifts single-thread DRAM throughput ~1.5x.
    """
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [i]), i8p)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, locality 2 (keep in L2 and up), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@njit(cache=True, nogil=True)
def chunk_bounds(r0: int, r1: int, c: int, nt: int) -> tuple[int, int]:
    """Rows of thread chunk c out of nt, starting on multiples of 4 after r0."""
    quads = (r1 - r0 + 3) // 4
    a = r0 + 4 * (quads * c // nt)
    b = r0 + 4 * (quads * (c + 1) // nt)
    return min(a, r1), min(b, r1)


@njit(cache=True, nogil=True, fastmath=FM)
def gemm_tile(S, sr, sc, nr, X, xc, L, out, oc, first):
    """out[t, oc+i] (+)= sum_k S[sr+i, sc+k] * X[t, xc+k] for i < nr, every token t, k < L.

    4 rows x 2 tokens per pass keeps 8 vector accumulators in registers; tail rows and
    tokens are clamped duplicates whose results are not written twice.
    """
    n = X.shape[0]
    for i in range(0, nr, 4):
        w0 = S[sr + i, sc : sc + L]
        w1 = S[sr + min(i + 1, nr - 1), sc : sc + L]
        w2 = S[sr + min(i + 2, nr - 1), sc : sc + L]
        w3 = S[sr + min(i + 3, nr - 1), sc : sc + L]
        for t in range(0, n, 2):
            u = min(t + 1, n - 1)
            xa = X[t, xc : xc + L]
            xb = X[u, xc : xc + L]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for k in range(L):
                p = xa[k]
                q = xb[k]
                a0 += w0[k] * p
                a1 += w1[k] * p
                a2 += w2[k] * p
                a3 += w3[k] * p
                b0 += w0[k] * q
                b1 += w1[k] * q
                b2 += w2[k] * q
                b3 += w3[k] * q
            for s in range(2 if u > t else 1):
                tt = t + s
                v = (a0, a1, a2, a3) if s == 0 else (b0, b1, b2, b3)
                for j in range(min(4, nr - i)):
                    if first:
                        out[tt, oc + i + j] = v[j]
                    else:
                        out[tt, oc + i + j] += v[j]


@njit(cache=True, nogil=True, fastmath=FM)
def _matvec(w, x, out, r0, r1, c0, c1, xoff, ooff):
    # 4 rows per pass share each x load; a clamped duplicate row covers the tail.
    x0 = x[0, c0 - xoff : c1 - xoff]
    for r in range(r0, r1, 4):
        ra, rb, rc = min(r + 1, r1 - 1), min(r + 2, r1 - 1), min(r + 3, r1 - 1)
        wa, wb, wc, wd = w[r, c0:c1], w[ra, c0:c1], w[rb, c0:c1], w[rc, c0:c1]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(c1 - c0):
            xv = x0[k]
            a0 += wa[k] * xv
            a1 += wb[k] * xv
            a2 += wc[k] * xv
            a3 += wd[k] * xv
        out[0, r - ooff] = a0
        out[0, ra - ooff] = a1
        out[0, rb - ooff] = a2
        out[0, rc - ooff] = a3


@njit(cache=True, nogil=True, fastmath=FM)
def _rows(w, x, out, r0, r1, c0, c1, xoff, ooff, per_token):
    if x.shape[0] == 1 or per_token:  # each token alone: its result cannot depend on others
        for t in range(x.shape[0]):
            _matvec(w, x[t : t + 1], out[t : t + 1], r0, r1, c0, c1, xoff, ooff)
        return
    # n > 1: the weights are already float32, so tile them straight from the matrix.
    for g in range(r0, r1, ROW_GROUP):
        nr = min(ROW_GROUP, r1 - g)
        for c in range(c0, c1, COL_CHUNK):
            L = min(COL_CHUNK, c1 - c)
            gemm_tile(w, g, c, nr, x, c - xoff, L, out, g - ooff, c == c0)


@njit(cache=True, nogil=True, parallel=True)
def _par(w, x, out, r0, r1, c0, c1, xoff, ooff, nt, per_token):
    for c in prange(nt):
        a, b = chunk_bounds(r0, r1, c, nt)
        if b > a:
            _rows(w, x, out, a, b, c0, c1, xoff, ooff, per_token)


def from_raw(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """GGUF bytes -> planes (a zero-copy view when raw is contiguous)."""
    return (raw.view(np.float32).reshape(rows, cols),)


def from_array(arr: np.ndarray) -> tuple[np.ndarray, ...]:
    """float32 [N, K] -> planes; copies only if arr is not C-contiguous."""
    return (np.ascontiguousarray(arr, dtype=np.float32),)


def dequantize(planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    """Planes -> float32 [N, K] (NumPy reference)."""
    return np.array(planes[0], dtype=np.float32)


def run(
    planes: tuple[np.ndarray, ...],
    x: np.ndarray,
    out: np.ndarray,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    xoff: int,
    ooff: int,
    nt: int,
    per_token: bool = False,
) -> None:
    """out[:, r0-ooff:r1-ooff] = x[:, c0-xoff:c1-xoff] @ W[r0:r1, c0:c1].T on nt threads;
    `per_token`: the per-token path whatever the token count (batch invariance)."""
    if nt == 1:
        _rows(planes[0], x, out, r0, r1, c0, c1, xoff, ooff, per_token)
    else:
        _par(planes[0], x, out, r0, r1, c0, c1, xoff, ooff, nt, per_token)
