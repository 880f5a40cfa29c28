# Dimensions: N = output rows, K = input cols, n = tokens, U = K/32 units of 32 weights per row,
# [g0, g1) = the units of the column range, nb = g1 - g0, rb = rows whose scales are expanded
# together, RB x 32 CU = the dequantized tile of the n > SMALL_N path.
#
# Driver shared by the GGUF kinds of mm_gguf (W = s * q + m per sub-block of 32 or 16; MXFP4
# W = s * table[q], no m).
# Layouts and scale expansion (`fill`) are per kind in mm_gguf, the vector loops in mm_sb_dot.
# n <= SMALL_N (decode): expand the scales of rb rows to float32 (one vectorized pass over
# contiguous planes), then decode 4 rows per pass straight from memory: packed nibbles in,
# float32 FMAs on 16 lanes, one merged horizontal sum per pass. n > SMALL_N (prefill):
# dequantize a [RB, COL_CHUNK] tile once and run mm_f32's GEMM tile over all tokens.
# numba caches these per plane-tuple type but notices edits to this file only: after editing
# mm_gguf, mm_sb_ir or mm_sb_dot, delete mer/kernels/__pycache__/mm_subblock.*.
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .mm_f32 import COL_CHUNK, FM, chunk_bounds, gemm_tile, prefetch
from .mm_sb_dot import NROWS, deq, dot4

RB = 16
SCALE_UNITS = 1024
CU = COL_CHUNK // 32
SMALL_N = 1  # measured: from 2 tokens on, the dequantized tile is as fast or faster


def fill(planes, f0, n, s, m):  # pragma: no cover - numba only, per kind in mm_gguf
    """s[:n], m[:n] = float32 scales, mins of flat units f0..f0+n (Q6_K: s[:2n], no m)."""
    raise NotImplementedError


def scales_per_unit(planes):  # pragma: no cover - numba only, per kind in mm_gguf
    raise NotImplementedError


@njit(nogil=True, fastmath=FM, inline="always")
def _scales(planes, a, nr, g0, g1, U, sbm, mbm):
    # Rows a..a+nr into (sb [rb, spu*nb], mb [rb, nb]); whole rows are one contiguous run.
    nb, spu = g1 - g0, scales_per_unit(planes)
    rb = mbm.size // nb
    sb, mb = sbm[: rb * spu * nb].reshape((rb, spu * nb)), mbm.reshape((rb, nb))
    if nb == U:
        fill(planes, a * U, nr * U, sbm, mbm)
    else:
        for i in range(nr):
            fill(planes, (a + i) * U + g0, nb, sb[i], mb[i])
    return sb, mb


@njit(nogil=True, inline="always")
def _warm(p, r0, nbytes):
    # Put the first lines of rows r0.. on their way from DRAM: the kernels' own prefetch
    # runs ahead only once a pass is under way.
    flat = p.reshape(p.size)
    start = r0 * p.shape[1]
    for o in range(0, nbytes // p.itemsize, 64 // p.itemsize):
        prefetch(flat, min(start + o, p.size - 1))


@njit(cache=True, nogil=True, fastmath=FM)
def _matvec(planes, x, out, r0, r1, g0, g1, xoff, ooff, U):
    n, nb = x.shape[0], g1 - g0
    _warm(planes[0], r0, 4096)
    _warm(planes[1], r0, 512)
    _warm(planes[-1], r0, 512)
    xs = np.empty((n, nb), np.float32)  # unit sums of x, for the min terms
    for t in range(n):
        for j in range(nb):
            c = 32 * (g0 + j) - xoff
            xs[t, j] = np.sum(x[t, c : c + 32])
    # Scales of rb rows at a time: ~SCALE_UNITS per block amortizes the per-block work and
    # keeps the buffers in L1.
    rb = max(NROWS, min(64, SCALE_UNITS // nb // NROWS * NROWS))
    sbm = np.empty(rb * 2 * nb, np.float32)
    mbm = np.empty(rb * nb, np.float32)
    for a in range(r0, r1, rb):
        nr = min(rb, r1 - a)
        sb, mb = _scales(planes, a, nr, g0, g1, U, sbm, mbm)
        for i in range(0, nr, NROWS):
            last = min(NROWS, nr - i) - 1
            for t in range(n):
                v = dot4(planes, x, xs, sb, mb, t, g0, g1, xoff, a + i, i, last)
                for q in range(last + 1):
                    out[t, a + i + q - ooff] = v[q]


@njit(cache=True, nogil=True, fastmath=FM)
def _gemm(planes, x, out, r0, r1, g0, g1, xoff, ooff, U):
    nb = g1 - g0
    sbm = np.empty(RB * 2 * nb, np.float32)
    mbm = np.empty(RB * nb, np.float32)
    S = np.empty((RB, 32 * CU), np.float32)
    for a in range(r0, r1, RB):
        nr = min(RB, r1 - a)
        sb, mb = _scales(planes, a, nr, g0, g1, U, sbm, mbm)
        for us in range(g0, g1, CU):
            m = min(CU, g1 - us)
            for i in range(nr):
                deq(planes, sb, mb, a + i, i, g0, us, us + m, S[i])
            gemm_tile(S, 0, 0, nr, x, 32 * us - xoff, 32 * m, out, a - ooff, us == g0)


@njit(cache=True, nogil=True)
def _rows(planes, x, out, r0, r1, g0, g1, xoff, ooff, U, per_token):
    # _matvec runs each token through the same decode: batch-invariant; _gemm is not.
    if per_token or x.shape[0] <= SMALL_N:
        _matvec(planes, x, out, r0, r1, g0, g1, xoff, ooff, U)
    else:
        _gemm(planes, x, out, r0, r1, g0, g1, xoff, ooff, U)


@njit(cache=True, nogil=True, parallel=True)
def _par(planes, x, out, r0, r1, g0, g1, xoff, ooff, U, nt, per_token):
    for c in prange(nt):
        a, b = chunk_bounds(r0, r1, c, nt)
        if b > a:
            _rows(planes, x, out, a, b, g0, g1, xoff, ooff, U, per_token)


class SubBlockKind:
    """A GGUF block type run through the sub-block kernels; subclasses define pack and parts."""

    KIND = ""
    BLOCK = 32  # weights per GGUF block (the column granularity)
    BLOCK_BYTES = 0

    @classmethod
    def pack(cls, blocks: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [N, B, BLOCK_BYTES] -> planes (see the kind's docstring)."""
        raise NotImplementedError

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        """Planes -> (q [N, K] integers, s float32 [N, K/SUB], m like s or None), SUB = 32 or 16."""
        raise NotImplementedError

    @staticmethod
    def q(nib: np.ndarray, qh: np.ndarray | None = None) -> np.ndarray:
        """uint8 [N, K] quants from the nibble plane and the high-bit words."""
        v = nib.reshape(len(nib), -1, 16)
        w = np.concatenate([v & 15, v >> 4], axis=-1)  # [N, U, 32]
        if qh is not None:
            bits = 1 if qh.shape[1] == w.shape[1] else 2
            h = qh.reshape(len(w), -1, 1) >> (bits * np.arange(32 // bits, dtype=np.uint32))
            w = w | ((h & ((1 << bits) - 1)).astype(np.uint8).reshape(w.shape) << 4)
        return w.reshape(len(nib), -1)

    @classmethod
    def from_raw(cls, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        """GGUF block bytes of a [rows, cols] matrix -> contiguous planes."""
        blocks = raw.reshape(rows, cols // cls.BLOCK, cls.BLOCK_BYTES)
        return tuple(np.ascontiguousarray(p) for p in cls.pack(blocks))

    @classmethod
    def dequantize(cls, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        """float32 [rows, cols], bit-identical to gguf.quants.dequantize."""
        q, s, m = cls.parts(planes)
        sub = cols // s.shape[1]
        w = np.repeat(s, sub, axis=1) * q.astype(np.float32)
        return w if m is None else w + np.repeat(m, sub, axis=1)

    @classmethod
    def run(
        cls,
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
        args = (planes, x, out, r0, r1, c0 // 32, c1 // 32, xoff, ooff, planes[0].shape[1] // 16)
        if nt == 1:
            _rows(*args, per_token)
        else:
            _par(*args, nt, per_token)


def half(blocks: np.ndarray, off: int) -> np.ndarray:
    """uint16 [N, B]: the f16 field at byte `off` of every block."""
    return np.ascontiguousarray(blocks[:, :, off : off + 2]).view(np.uint16)[..., 0]


def nibble_bytes(w: np.ndarray) -> np.ndarray:
    """[N, U, 32] weights -> uint8 [N, 16U]: byte i = w[i] & 15 | (w[16 + i] & 15) << 4."""
    return ((w[..., :16] & 15) | ((w[..., 16:] & 15) << 4)).reshape(len(w), -1)


def high_bits(w: np.ndarray, bits: int) -> np.ndarray:
    """[N, V, L] weights -> uint32 [N, V]: bits 4.. of weight i at bit bits * i."""
    h = ((w >> 4) & ((1 << bits) - 1)).astype(np.uint32)
    return (h << (bits * np.arange(w.shape[-1], dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
