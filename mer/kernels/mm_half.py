# Dimensions: N = output rows, K = input cols, n = tokens.
# Kinds "f16" and "bf16": one plane, the row-major uint16 [N, K] holding the raw 16-bit floats
# (zero-copy). numba has no 16-bit float type, so conversions are LLVM intrinsics:
# - `h2f`: bitcast i16 -> half, fpext -> float; vectorized it becomes vcvtph2ps, exact for
#   every bit pattern (subnormals, inf, nan);
# - `bf2f`: bfloat16 is the top half of a float32: zext, shift left 16, bitcast.
# Both kinds share the kernels; which conversion travels as the argument `bf` (a runtime
# flag that LLVM hoists out of the loops), so numba's cache never serves a stale choice.
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .mm_f32 import COL_CHUNK, FM, ROW_GROUP, chunk_bounds, gemm_tile


@intrinsic
def h2f(typingctx, h):
    """float32 value of the IEEE half whose bits are the uint16 `h`."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def bf2f(typingctx, h):
    """float32 value of the bfloat16 whose bits are the uint16 `h`."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(inline="always")
def to_f32(h, bf):
    return bf2f(h) if bf else h2f(h)


@njit(cache=True, nogil=True, fastmath=FM)
def _matvec(w, x, out, r0, r1, c0, c1, xoff, ooff, bf):
    # 4 rows per pass share each x load; a clamped duplicate row covers the tail.
    x0 = x[0, c0 - xoff : c1 - xoff]
    for r in range(r0, r1, 4):
        ra, rb, rc = min(r + 1, r1 - 1), min(r + 2, r1 - 1), min(r + 3, r1 - 1)
        wa, wb, wc, wd = w[r, c0:c1], w[ra, c0:c1], w[rb, c0:c1], w[rc, c0:c1]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(c1 - c0):
            xv = x0[k]
            a0 += to_f32(wa[k], bf) * xv
            a1 += to_f32(wb[k], bf) * xv
            a2 += to_f32(wc[k], bf) * xv
            a3 += to_f32(wd[k], bf) * xv
        out[0, r - ooff] = a0
        out[0, ra - ooff] = a1
        out[0, rb - ooff] = a2
        out[0, rc - ooff] = a3


@njit(cache=True, nogil=True, fastmath=FM)
def _rows(w, x, out, r0, r1, c0, c1, xoff, ooff, bf, per_token):
    if x.shape[0] == 1 or per_token:  # each token alone: its result cannot depend on others
        for t in range(x.shape[0]):
            _matvec(w, x[t : t + 1], out[t : t + 1], r0, r1, c0, c1, xoff, ooff, bf)
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
                    dst[k] = to_f32(src[k], bf)
            gemm_tile(S, 0, 0, nr, x, c - xoff, L, out, g - ooff, c == c0)


@njit(cache=True, nogil=True, parallel=True)
def _par(w, x, out, r0, r1, c0, c1, xoff, ooff, nt, bf, per_token):
    for c in prange(nt):
        a, b = chunk_bounds(r0, r1, c, nt)
        if b > a:
            _rows(w, x, out, a, b, c0, c1, xoff, ooff, bf, per_token)


class _Half:
    """A 16-bit float kind; the subclasses differ only in the bit format."""

    KIND = ""
    BLOCK = 1
    BLOCK_BYTES = 2
    IS_BF16 = False

    @staticmethod
    def from_raw(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        """GGUF bytes -> planes (a zero-copy view when raw is contiguous)."""
        return (raw.view(np.uint16).reshape(rows, cols),)

    @classmethod
    def run(cls, planes, x, out, r0, r1, c0, c1, xoff, ooff, nt, per_token=False) -> None:
        """out[:, r0-ooff:r1-ooff] = x[:, c0-xoff:c1-xoff] @ W[r0:r1, c0:c1].T on nt threads;
        `per_token`: the per-token path whatever the token count (batch invariance)."""
        if nt == 1:
            _rows(planes[0], x, out, r0, r1, c0, c1, xoff, ooff, cls.IS_BF16, per_token)
        else:
            _par(planes[0], x, out, r0, r1, c0, c1, xoff, ooff, nt, cls.IS_BF16, per_token)


class F16(_Half):
    KIND = "f16"

    @staticmethod
    def from_array(arr: np.ndarray) -> tuple[np.ndarray, ...]:
        """float16 [N, K] -> planes; copies only if arr is not C-contiguous."""
        return (np.ascontiguousarray(arr).view(np.uint16),)

    @staticmethod
    def dequantize(planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        """Planes -> float32 [N, K] (NumPy reference)."""
        return planes[0].view(np.float16).astype(np.float32)


class BF16(_Half):
    KIND = "bf16"
    IS_BF16 = True

    @staticmethod
    def from_array(arr: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint16 [N, K] of bfloat16 bits -> planes; copies only if arr is not C-contiguous."""
        return (np.ascontiguousarray(arr, dtype=np.uint16),)

    @staticmethod
    def dequantize(planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        """Planes -> float32 [N, K] (NumPy reference)."""
        return (planes[0].astype(np.uint32) << 16).view(np.float32)
