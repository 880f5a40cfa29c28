# Dimensions: N = output rows, K = input cols, n = tokens, B = K/32 blocks per row,
# j = position inside a block (0..31), b = block index, nb = blocks in the column range.
#
# GGUF Q8_0 block (34 bytes): f16 scale d, then 32 int8 quants; W[r, 32b+j] = d[r,b] * q[r,b,j].
# Layout "q8_0": planes (q int8 [N, 32, B], d uint16 [N, B] = raw f16 scale bits), exactly
# GGUF-sized. Quants are stored j-major inside each row, and the activations are transposed to
# match once per call (xt[j, b] = x[32b+j], K floats). The decode loop then runs over b, 16
# blocks per vector lane: contiguous bytes, one scale per lane, no per-block horizontal sum.
# n <= SMALL_N, or whenever batch invariance is asked for: decode each row pair once per token
# straight from memory (with software prefetch), every token summed in the same order;
# else (n > SMALL_N): dequantize [ROW_GROUP, 32*cb] tiles and run the float32 GEMM tile.
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .mm_f32 import (
    COL_CHUNK,
    FM,
    PF_MIN_BYTES,
    PF_ROWS,
    ROW_GROUP,
    SMALL_N,
    chunk_bounds,
    gemm_tile,
    prefetch,
)
from .mm_half import h2f

KIND = "q8_0"
BLOCK = 32
BLOCK_BYTES = 34
CHUNK_BLOCKS = COL_CHUNK // 32
CHUNK = 32  # blocks per matvec step (measured: 32 beats 16 and 64 here)


@njit(cache=True, nogil=True)
def transpose_x(x, xoff, b0, b1, cb):
    """Activations for blocks [b0, b1) as [n, 32*nb], in chunks of cb blocks each laid out
    [32, blocks in chunk], i.e. the order in which the kernels walk the weights."""
    n = x.shape[0]
    xt = np.empty((n, 32 * (b1 - b0)), np.float32)
    for t in range(n):
        for bs in range(b0, b1, cb):
            m = min(cb, b1 - bs)
            base = 32 * (bs - b0)
            for j in range(32):
                for i in range(m):
                    xt[t, base + j * m + i] = x[t, 32 * (bs + i) + j - xoff]
    return xt


@njit(inline="always")
def _quad(qq, xt, j, b):
    return (
        np.float32(qq[j, b]) * xt[j, b]
        + np.float32(qq[j + 1, b]) * xt[j + 1, b]
        + np.float32(qq[j + 2, b]) * xt[j + 2, b]
        + np.float32(qq[j + 3, b]) * xt[j + 3, b]
    )


@njit(inline="always")
def _block(qq, xt, b):
    # The 32 positions written out: the loop over b is then the innermost one and LLVM
    # vectorizes it, 16 blocks per register, with one scale multiply per block.
    t0 = _quad(qq, xt, 0, b) + _quad(qq, xt, 4, b)
    t1 = _quad(qq, xt, 8, b) + _quad(qq, xt, 12, b)
    t2 = _quad(qq, xt, 16, b) + _quad(qq, xt, 20, b)
    t3 = _quad(qq, xt, 24, b) + _quad(qq, xt, 28, b)
    return (t0 + t1) + (t2 + t3)


@njit(inline="always")
def _dot2(qa, qb, da, db, x, c, m):
    # Rows a and b over blocks c..c+m of the range; unsigned b: no negative-index wraparound
    # code, so LLVM vectorizes the loop.
    a0 = a1 = np.float32(0.0)
    for i in range(m):
        b = np.uint64(c + i)
        a0 += h2f(da[b]) * _block(qa, x, b)
        a1 += h2f(db[b]) * _block(qb, x, b)
    return a0, a1


@njit(cache=True, nogil=True, fastmath=FM)
def _matvec(q, d, xt, out, r0, r1, b0, b1, ooff):
    # xt: [n, 32, nb]. Two rows per pass; each row pair is read from memory once (with
    # prefetch) and decoded once per token. Every token's sum runs over the same chunks in
    # the same order, so a token's result does not depend on the others in the call.
    n, nb = xt.shape[0], b1 - b0
    flat = q.reshape(-1)
    B = q.shape[2]
    big = flat.size > PF_MIN_BYTES  # smaller matrices are likely cached: skip the prefetches
    acc = np.empty((n, 2), np.float32)
    for r in range(r0, r1, 2):
        ra, rb = r, min(r + 1, r1 - 1)
        qa, qb = q[ra, :, b0:b1], q[rb, :, b0:b1]
        da, db = d[ra, b0:b1], d[rb, b0:b1]
        pf = max(0, min(r + PF_ROWS, q.shape[0] - 2)) * 32 * B + b0
        acc[:] = 0.0
        for c in range(0, nb, CHUNK):
            if big and c % 64 == 0:  # rows pf, pf+1: one line per position covers 64 blocks
                for j in range(64):
                    prefetch(flat, pf + j * B + c)
            m = min(CHUNK, nb - c)
            for t in range(n):
                u0, u1 = _dot2(qa, qb, da, db, xt[t], c, m)
                acc[t, 0] += u0
                acc[t, 1] += u1
        for t in range(n):
            out[t, ra - ooff] = acc[t, 0]
            out[t, rb - ooff] = acc[t, 1]  # rb == ra on an odd tail: the same value again


@njit(inline="always")
def _deq_row(src, dr, dst, m):
    # src: [32, m] int8, dr: [m] f16 scales -> dst: [32 * m] floats laid out [32, m].
    for j in range(32):
        s, o = src[j], dst[j * m : (j + 1) * m]
        for b in range(m):
            o[b] = h2f(dr[b]) * np.float32(s[b])


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
    """GGUF Q8_0 bytes of a [rows, cols] matrix -> planes (q [N, 32, B], d [N, B])."""
    blk = raw.reshape(rows, cols // 32, 34)
    d = np.ascontiguousarray(blk[:, :, :2]).view(np.uint16).reshape(rows, cols // 32)
    q = np.ascontiguousarray(blk[:, :, 2:].transpose(0, 2, 1)).view(np.int8)
    return q, d


def dequantize(planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    """Planes -> float32 [N, K]; the same float32 products as gguf.quants.dequantize."""
    q, d = planes
    scale = d.view(np.float16).astype(np.float32)[:, None, :]
    return (q.astype(np.float32) * scale).transpose(0, 2, 1).reshape(rows, cols)


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


def run_blocks(rows, par, planes, x, out, r0, r1, c0, c1, xoff, ooff, nt, per_token) -> None:
    """`run` for a kind stored as (quants, f16 scales) in blocks of 32 with activations
    transposed by `transpose_x` (Q8_0, Q4_0); `rows`/`par` are its serial/parallel kernels."""
    q, d = planes
    b0, b1 = c0 // 32, c1 // 32
    # The layout choice travels as an argument: numba's cache would not see an edited constant
    # in another module, and kernel and activations must agree on it.
    cb = 0 if per_token or x.shape[0] <= SMALL_N else CHUNK_BLOCKS
    xt = transpose_x(x, xoff, b0, b1, cb if cb else b1 - b0)
    if nt == 1:
        rows(q, d, xt, out, r0, r1, b0, b1, ooff, cb)
    else:
        par(q, d, xt, out, r0, r1, b0, b1, ooff, cb, nt)
