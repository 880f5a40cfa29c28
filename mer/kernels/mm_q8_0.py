# Dimensions: N = output rows, K = input cols, n = tokens, B = K/32 blocks per row,
# j = position inside a block (0..31), b = block index, nb = blocks in the column range.
#
# GGUF Q8_0 block (34 bytes): f16 scale d, then 32 int8 quants; W[r, 32b+j] = d[r,b] * q[r,b,j].
# Layout "q8_0": planes (q int8 [N, 32, B], d uint16 [N, B] = raw f16 scale bits).
# Quants are stored j-major inside each row, so the inner loop runs over b: contiguous bytes,
# one scale per vector lane, no per-block horizontal sum. Activations are transposed to match
# once per call (xt[j, b] = x[32b+j]), which costs K floats. Scales stay f16 (so the planes are
# exactly GGUF-sized) and are widened per row quad into a small float32 scratch.
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .mm_f16 import h2f
from .mm_f32 import (
    COL_CHUNK,
    FM,
    PF_ROWS,
    ROW_GROUP,
    SMALL_N,
    chunk_bounds,
    gemm_tile,
    prefetch,
)

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


@njit(cache=True, nogil=True, fastmath=FM)
def _matvec(q, d, xt, out, r0, r1, b0, b1, ooff):
    # xt: [n, 32, nb], n <= SMALL_N: each row pair is read from memory once and decoded per token.
    n, nb = xt.shape[0], b1 - b0
    flat = q.reshape(-1)
    B = q.shape[2]
    for r in range(r0, r1, 2):
        ra, rb = r, min(r + 1, r1 - 1)
        qa, qb = q[ra, :, b0:b1], q[rb, :, b0:b1]
        da, db = d[ra, b0:b1], d[rb, b0:b1]
        pf = max(0, min(r + PF_ROWS, q.shape[0] - 2)) * 32 * B + b0
        out[:, ra - ooff] = 0.0
        out[:, rb - ooff] = 0.0
        for c in range(0, nb, CHUNK):
            for j in range(64):  # the same chunk of rows pf, pf+1: one run per position
                prefetch(flat, pf + j * B + c)
            for t in range(n):
                x = xt[t]
                a0 = a1 = np.float32(0.0)
                for i in range(min(CHUNK, nb - c)):
                    b = np.uint64(c + i)  # unsigned: no negative-index wraparound, so it vectorizes
                    a0 += h2f(da[b]) * _block(qa, x, b)
                    a1 += h2f(db[b]) * _block(qb, x, b)
                out[t, ra - ooff] += a0
                if rb != ra:
                    out[t, rb - ooff] += a1


@njit(inline="always")
def _deq_row(src, dr, dst, m):
    # src: [32, m] int8, dr: [m] f16 scales -> dst: [32 * m] floats laid out [32, m].
    for j in range(32):
        s, o = src[j], dst[j * m : (j + 1) * m]
        for b in range(m):
            o[b] = h2f(dr[b]) * np.float32(s[b])


@njit(cache=True, nogil=True, fastmath=FM)
def _gemm(q, d, xt, out, r0, r1, b0, b1, ooff):
    # Dequantize a [ROW_GROUP, 32*CHUNK_BLOCKS] tile once (in xt's order), reuse it for all tokens.
    S = np.empty((ROW_GROUP, 32 * CHUNK_BLOCKS), np.float32)
    for g in range(r0, r1, ROW_GROUP):
        nr = min(ROW_GROUP, r1 - g)
        for bs in range(b0, b1, CHUNK_BLOCKS):
            m = min(CHUNK_BLOCKS, b1 - bs)
            for i in range(nr):
                src, dr = q[g + i, :, bs : bs + m], d[g + i, bs : bs + m]
                _deq_row(src, dr, S[i], m)
            gemm_tile(S, 0, 0, nr, xt, 32 * (bs - b0), 32 * m, out, g - ooff, bs == b0)


@njit(cache=True, nogil=True, fastmath=FM)
def _rows(q, d, xt, out, r0, r1, b0, b1, ooff):
    n = xt.shape[0]
    if n <= SMALL_N:
        _matvec(q, d, xt.reshape((n, 32, b1 - b0)), out, r0, r1, b0, b1, ooff)
    else:
        _gemm(q, d, xt, out, r0, r1, b0, b1, ooff)


@njit(cache=True, nogil=True, parallel=True)
def _par(q, d, xt, out, r0, r1, b0, b1, ooff, nt):
    for c in prange(nt):
        a, b = chunk_bounds(r0, r1, c, nt)
        if b > a:
            _rows(q, d, xt, out, a, b, b0, b1, ooff)


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


def run(planes, x, out, r0, r1, c0, c1, xoff, ooff, nt) -> None:
    """out[:, r0-ooff:r1-ooff] = x[:, c0-xoff:c1-xoff] @ W[r0:r1, c0:c1].T on nt threads."""
    q, d = planes
    b0, b1 = c0 // 32, c1 // 32
    xt = transpose_x(x, xoff, b0, b1, b1 - b0 if x.shape[0] <= SMALL_N else CHUNK_BLOCKS)
    if nt == 1:
        _rows(q, d, xt, out, r0, r1, b0, b1, ooff)
    else:
        _par(q, d, xt, out, r0, r1, b0, b1, ooff, nt)
