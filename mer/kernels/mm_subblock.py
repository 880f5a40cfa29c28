# Dimensions: N = output rows, K = input cols, n = tokens, S = sub-block size (16 or 32),
# G = K / S sub-blocks per row.
#
# One kernel for the GGUF block types whose weights are W = s * q + m per sub-block:
# Q4_1, Q5_0, Q5_1 (S = 32, one sub-block per block) and Q4_K, Q5_K (S = 32), Q6_K (S = 16)
# whose 256-weight super-blocks carry 6- or 8-bit sub-block scales. At load each block is
# unpacked to planes (q int8 [N, K], s float32 [N, G], m float32 [N, G]) with s and m
# computed exactly as gguf.quants computes them, so dequantize is bit-identical. One byte per
# weight costs more memory than the packed nibbles but lets the inner loop be a plain
# int8 -> float32 multiply-add that LLVM vectorizes, with no bit fiddling per weight.
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, fastmath=True)
def _rows(q, s, m, x, xsum, out, r0, r1, c0, c1, xoff, ooff, sub, has_min):  # pragma: no cover
    # n = 1: one pass over the row, sub-block sums scaled once each.
    g0, g1 = c0 // sub, c1 // sub
    for r in range(r0, r1):
        total = np.float32(0.0)
        for g in range(g0, g1):
            base = g * sub
            acc = np.float32(0.0)
            for k in range(sub):
                acc += np.float32(q[r, base + k]) * x[0, base + k - xoff]
            total += s[r, g] * acc
            if has_min:
                total += m[r, g] * xsum[0, g - g0]
        out[0, r - ooff] = total


@njit(cache=True, nogil=True, fastmath=True)
def _rows_batch(q, s, m, x, out, r0, r1, c0, c1, xoff, ooff, sub, has_min):  # pragma: no cover
    # n > 1: dequantize each row once into a float buffer, then plain dot products per token.
    n = x.shape[0]
    w = np.empty(c1 - c0, np.float32)
    for r in range(r0, r1):
        for g in range(c0 // sub, c1 // sub):
            sc = s[r, g]
            mn = m[r, g] if has_min else np.float32(0.0)
            for k in range(g * sub, (g + 1) * sub):
                w[k - c0] = sc * np.float32(q[r, k]) + mn
        for t in range(n):
            acc = np.float32(0.0)
            for k in range(c1 - c0):
                acc += w[k] * x[t, k + c0 - xoff]
            out[t, r - ooff] = acc


@njit(cache=True, nogil=True, fastmath=True, parallel=True)
def _run(q, s, m, x, out, r0, r1, c0, c1, xoff, ooff, sub, has_min, chunks):  # pragma: no cover
    n = x.shape[0]
    g0, g1 = c0 // sub, c1 // sub
    step = (r1 - r0 + chunks - 1) // chunks
    if n > 1:
        for c in prange(chunks):
            a = r0 + c * step
            b = min(r1, a + step)
            if a < b:
                _rows_batch(q, s, m, x, out, a, b, c0, c1, xoff, ooff, sub, has_min)
        return
    # Per sub-block sums of x serve the min term of every row.
    xsum = np.zeros((n, g1 - g0), np.float32)
    for t in range(n):
        for g in range(g0, g1):
            acc = np.float32(0.0)
            for k in range(g * sub, (g + 1) * sub):
                acc += x[t, k - xoff]
            xsum[t, g - g0] = acc
    for c in prange(chunks):
        a = r0 + c * step
        b = min(r1, a + step)
        if a < b:
            _rows(q, s, m, x, xsum, out, a, b, c0, c1, xoff, ooff, sub, has_min)


class SubBlockKind:
    """A GGUF block type run through the sub-block kernel; subclasses define `unpack`."""

    KIND = ""
    BLOCK = 32  # weights per GGUF block (the column granularity)
    BLOCK_BYTES = 0
    SUB = 32  # weights sharing one (s, m)
    HAS_MIN = True

    @classmethod
    def unpack(cls, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [B, BLOCK_BYTES] -> q int8 [B, BLOCK]; s, m float32 [B, BLOCK / SUB]."""
        raise NotImplementedError

    @classmethod
    def from_raw(cls, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        q, s, m = cls.unpack(raw.reshape(-1, cls.BLOCK_BYTES))
        return (
            np.ascontiguousarray(q.reshape(rows, cols)),
            np.ascontiguousarray(s.reshape(rows, cols // cls.SUB)),
            np.ascontiguousarray(m.reshape(rows, cols // cls.SUB)),
        )

    @classmethod
    def dequantize(cls, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        q, s, m = planes
        w = np.repeat(s, cls.SUB, axis=1) * q.astype(np.float32)
        if cls.HAS_MIN:
            w = w + np.repeat(m, cls.SUB, axis=1)
        return w

    @classmethod
    def run(cls, planes, x, out, r0, r1, c0, c1, xoff, ooff, nt) -> None:
        q, s, m = planes
        chunks = max(1, min(nt * 4, r1 - r0))
        _run(q, s, m, x, out, r0, r1, c0, c1, xoff, ooff, cls.SUB, cls.HAS_MIN, chunks)


def f16(raw: np.ndarray) -> np.ndarray:
    """float32 [nblocks, 1] from two little-endian bytes per block."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Low nibbles of `width` bytes, then their high nibbles: [..., width] -> [..., 2 * width]."""
    qs = qs.reshape(qs.shape[0], -1, width)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Bit i of a little-endian uint32 per block, i < count: [nblocks, 4] -> [nblocks, count]."""
    word = np.ascontiguousarray(packed).view(np.uint32)
    return ((word >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)
