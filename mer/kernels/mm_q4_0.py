# Dimensions: N = output rows, K = input cols, n = tokens, B = K/32 blocks per row,
# j = byte position inside a block (0..15), b = block index, nb = blocks in the column range.
#
# GGUF Q4_0 block (18 bytes): f16 scale d, then 16 bytes; byte j holds element j in its low
# nibble and element j+16 in its high nibble; W[r, 32b+j] = d * (nibble - 8).
# Layout "q4_0": planes (q uint8 [N, 16, B], d uint16 [N, B] = raw f16 scale bits), exactly
# GGUF-sized. Bytes are stored j-major inside each row, as in mm_q8_0 (same activation
# transpose, same two paths); xt rows j and j+16 pair with the low and high nibbles.
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .mm_f32 import (
    COL_CHUNK,
    FM,
    PF_MIN_BYTES,
    PF_ROWS,
    ROW_GROUP,
    chunk_bounds,
    gemm_tile,
    prefetch,
)
from .mm_half import h2f
from .mm_q8_0 import run_blocks

KIND = "q4_0"
BLOCK = 32
BLOCK_BYTES = 18
CHUNK_BLOCKS = COL_CHUNK // 32
CHUNK = 64  # blocks per matvec step: 64 bytes (one line) per byte position


def _nibble(high: bool):
    # numba widens integer arithmetic to int64, which would make LLVM convert 64-bit lanes;
    # as an intrinsic the nibble math stays on bytes: (v & 15) or (v >> 4), then u8 -> f32.
    @intrinsic
    def nib(typingctx, v):
        if v != types.uint8:
            return None

        def codegen(context, builder, signature, args):
            i8 = ir.IntType(8)
            if high:
                t = builder.lshr(args[0], ir.Constant(i8, 4))
            else:
                t = builder.and_(args[0], ir.Constant(i8, 15))
            return builder.uitofp(t, ir.FloatType())

        return types.float32(types.uint8), codegen

    return nib


lo4 = _nibble(False)
hi4 = _nibble(True)


@njit(inline="always")
def _pair(qq, xt, j, b):
    v = qq[j, b]
    return lo4(v) * xt[j, b] + hi4(v) * xt[j + 16, b]


@njit(inline="always")
def _block(qq, xt, b):
    # The 16 byte positions written out: the loop over b is then the innermost one and LLVM
    # vectorizes it, 16 blocks per register, with one scale multiply per block.
    t0 = _pair(qq, xt, 0, b) + _pair(qq, xt, 1, b) + _pair(qq, xt, 2, b) + _pair(qq, xt, 3, b)
    t1 = _pair(qq, xt, 4, b) + _pair(qq, xt, 5, b) + _pair(qq, xt, 6, b) + _pair(qq, xt, 7, b)
    t2 = _pair(qq, xt, 8, b) + _pair(qq, xt, 9, b) + _pair(qq, xt, 10, b) + _pair(qq, xt, 11, b)
    t3 = _pair(qq, xt, 12, b) + _pair(qq, xt, 13, b) + _pair(qq, xt, 14, b) + _pair(qq, xt, 15, b)
    return (t0 + t1) + (t2 + t3)


@njit(inline="always")
def _dot2(qa, qb, da, db, x, xs, c, m):
    # Rows a and b over blocks c..c+m of the range; unsigned b: no negative-index wraparound
    # code, so LLVM vectorizes the loop.
    a0 = a1 = np.float32(0.0)
    for i in range(m):
        b = np.uint64(c + i)
        a0 += h2f(da[b]) * (_block(qa, x, b) - xs[b])
        a1 += h2f(db[b]) * (_block(qb, x, b) - xs[b])
    return a0, a1


@njit(cache=True, nogil=True, fastmath=FM)
def _matvec(q, d, xt, out, r0, r1, b0, b1, ooff):
    # xt: [n, 32, nb]. Two rows per pass; each row pair is read from memory once (with
    # prefetch) and decoded once per token. Every token's sum runs over the same chunks in
    # the same order, so a token's result does not depend on the others in the call.
    # Nibbles are used unsigned; the -8 comes back as 8 * sum_j x per block.
    n, nb = xt.shape[0], b1 - b0
    xs = np.zeros((n, nb), np.float32)
    for t in range(n):
        for j in range(32):
            xj, st = xt[t, j], xs[t]
            for b in range(nb):
                st[b] += np.float32(8.0) * xj[b]
    flat = q.reshape(-1)
    B = q.shape[2]
    big = flat.size > PF_MIN_BYTES  # smaller matrices are likely cached: skip the prefetches
    acc = np.empty((n, 2), np.float32)
    for r in range(r0, r1, 2):
        ra, rb = r, min(r + 1, r1 - 1)
        qa, qb = q[ra, :, b0:b1], q[rb, :, b0:b1]
        da, db = d[ra, b0:b1], d[rb, b0:b1]
        pf = max(0, min(r + PF_ROWS, q.shape[0] - 2)) * 16 * B + b0
        acc[:] = 0.0
        for c in range(0, nb, CHUNK):
            if big:  # rows pf, pf+1: one line per byte position covers the chunk
                for j in range(32):
                    prefetch(flat, pf + j * B + c)
            m = min(CHUNK, nb - c)
            for t in range(n):
                u0, u1 = _dot2(qa, qb, da, db, xt[t], xs[t], c, m)
                acc[t, 0] += u0
                acc[t, 1] += u1
        for t in range(n):
            out[t, ra - ooff] = acc[t, 0]
            out[t, rb - ooff] = acc[t, 1]  # rb == ra on an odd tail: the same value again


@njit(inline="always")
def _deq_row(src, dr, dst, m):
    # src: [16, m] bytes, dr: [m] f16 scales -> dst: [32 * m] floats laid out [32, m].
    for j in range(16):
        s, lo, hi = src[j], dst[j * m : (j + 1) * m], dst[(j + 16) * m : (j + 17) * m]
        for b in range(m):
            w = h2f(dr[b])
            lo[b] = w * (lo4(s[b]) - np.float32(8.0))
            hi[b] = w * (hi4(s[b]) - np.float32(8.0))


@njit(cache=True, nogil=True, fastmath=FM)
def _gemm(q, d, xt, out, r0, r1, b0, b1, ooff, cb):
    # Dequantize a [ROW_GROUP, 32*cb] tile once (in xt's order), reuse it for all tokens.
    S = np.empty((ROW_GROUP, 32 * cb), np.float32)
    for g in range(r0, r1, ROW_GROUP):
        nr = min(ROW_GROUP, r1 - g)
        for bs in range(b0, b1, cb):
            m = min(cb, b1 - bs)
            for i in range(nr):
                src, dr = q[g + i, :, bs : bs + m], d[g + i, bs : bs + m]
                if m == CHUNK_BLOCKS:  # a constant trip count: one full-width vector, no tail
                    _deq_row(src, dr, S[i], CHUNK_BLOCKS)
                else:
                    _deq_row(src, dr, S[i], m)
            gemm_tile(S, 0, 0, nr, xt, 32 * (bs - b0), 32 * m, out, g - ooff, bs == b0)


@njit(cache=True, nogil=True, fastmath=FM)
def _rows(q, d, xt, out, r0, r1, b0, b1, ooff, cb):
    # cb == 0: xt is [n, 32, nb] for the per-token decode; else [n, 32*nb] in chunks of cb blocks.
    if cb == 0:
        _matvec(q, d, xt.reshape((xt.shape[0], 32, b1 - b0)), out, r0, r1, b0, b1, ooff)
    else:
        _gemm(q, d, xt, out, r0, r1, b0, b1, ooff, cb)


@njit(cache=True, nogil=True, parallel=True)
def _par(q, d, xt, out, r0, r1, b0, b1, ooff, cb, nt):
    for c in prange(nt):
        a, b = chunk_bounds(r0, r1, c, nt)
        if b > a:
            _rows(q, d, xt, out, a, b, b0, b1, ooff, cb)


def from_raw(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """GGUF Q4_0 bytes of a [rows, cols] matrix -> planes (q [N, 16, B], d [N, B])."""
    blk = raw.reshape(rows, cols // 32, 18)
    d = np.ascontiguousarray(blk[:, :, :2]).view(np.uint16).reshape(rows, cols // 32)
    q = np.ascontiguousarray(blk[:, :, 2:].transpose(0, 2, 1))
    return q, d


def dequantize(planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    """Planes -> float32 [N, K]; the same float32 products as gguf.quants.dequantize."""
    q, d = planes
    scale = d.view(np.float16).astype(np.float32)[:, None, :]
    lo = ((q & 15).astype(np.int8) - 8).astype(np.float32) * scale
    hi = ((q >> 4).astype(np.int8) - 8).astype(np.float32) * scale
    return np.concatenate([lo, hi], axis=1).transpose(0, 2, 1).reshape(rows, cols)


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
    run_blocks(_rows, _par, planes, x, out, r0, r1, c0, c1, xoff, ooff, nt, per_token)
