# Dimensions: N = output rows, K = input cols, n = tokens.
# Layout "f16": one plane, the row-major uint16 [N, K] holding raw IEEE half bits (zero-copy).
#
# numba has no float16 type, so `h2f` is an LLVM intrinsic: bitcast i16 -> half, fpext -> float.
# LLVM lowers the vectorized form to vcvtph2ps, which is exact (subnormals, inf, nan included).
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .mm_f32 import COL_CHUNK, FM, ROW_GROUP, chunk_bounds, gemm_tile

KIND = "f16"
BLOCK = 1
BLOCK_BYTES = 2


@intrinsic
def h2f(typingctx, h):
    """float32 value of the IEEE half whose bits are the uint16 `h`."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


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
            a0 += h2f(wa[k]) * xv
            a1 += h2f(wb[k]) * xv
            a2 += h2f(wc[k]) * xv
            a3 += h2f(wd[k]) * xv
        out[0, r - ooff] = a0
        out[0, ra - ooff] = a1
        out[0, rb - ooff] = a2
        out[0, rc - ooff] = a3


@njit(cache=True, nogil=True, fastmath=FM)
def _rows(w, x, out, r0, r1, c0, c1, xoff, ooff):
    if x.shape[0] == 1:
        _matvec(w, x, out, r0, r1, c0, c1, xoff, ooff)
        return
    # n > 1: convert a [ROW_GROUP, COL_CHUNK] tile once, reuse it for every token.
    S = np.empty((ROW_GROUP, COL_CHUNK), np.float32)
    for g in range(r0, r1, ROW_GROUP):
        nr = min(ROW_GROUP, r1 - g)
        for c in range(c0, c1, COL_CHUNK):
            L = min(COL_CHUNK, c1 - c)
            for i in range(nr):
                src = w[g + i, c : c + L]
                dst = S[i]
                for k in range(L):
                    dst[k] = h2f(src[k])
            gemm_tile(S, 0, 0, nr, x, c - xoff, L, out, g - ooff, c == c0)


@njit(cache=True, nogil=True, parallel=True)
def _par(w, x, out, r0, r1, c0, c1, xoff, ooff, nt):
    for c in prange(nt):
        a, b = chunk_bounds(r0, r1, c, nt)
        if b > a:
            _rows(w, x, out, a, b, c0, c1, xoff, ooff)


def from_raw(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """GGUF bytes -> planes (a zero-copy view when raw is contiguous)."""
    return (raw.view(np.uint16).reshape(rows, cols),)


def from_array(arr: np.ndarray) -> tuple[np.ndarray, ...]:
    """float16 [N, K] -> planes; copies only if arr is not C-contiguous."""
    return (np.ascontiguousarray(arr).view(np.uint16),)


def dequantize(planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    """Planes -> float32 [N, K] (NumPy reference)."""
    return planes[0].view(np.float16).astype(np.float32)


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
) -> None:
    """out[:, r0-ooff:r1-ooff] = x[:, c0-xoff:c1-xoff] @ W[r0:r1, c0:c1].T on nt threads."""
    if nt == 1:
        _rows(planes[0], x, out, r0, r1, c0, c1, xoff, ooff)
    else:
        _par(planes[0], x, out, r0, r1, c0, c1, xoff, ooff, nt)
