# Dimensions: n = tokens, K = columns quantized, B = K/32 blocks, j = position in a block.
#
# Activations -> Q8_0 blocks as ggml's CPU backend quantizes them for its integer dot
# products (quantize_row_q8_0 of ggml-cpu on x86 with AVX/AVX2, which is what llama.cpp runs
# here): per block of 32, amax = max |x|, d = amax / 127 stored as f16, and
# q = round-half-to-even(x * (127 / amax)) (0 when amax is 0). Note the multiplier is
# 127 / amax, not 1 / f16(d), and ties go to even: that is not gguf.quants' Q8_0 (the
# reference quantizer rounds half away from zero with 1 / d), so weights and activations
# quantize differently in ggml, and mer follows each.
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _quantize(x, c0, xq, xd, xs, xm):
    n, K = xq.shape
    f0 = np.float32(0.0)
    for t in range(n):
        for b in range(K // 32):
            base = c0 + 32 * b
            amax = f0
            for j in range(32):
                amax = max(amax, abs(x[t, base + j]))
            xd[t, b] = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != f0 else f0
            s = 0
            for j in range(32):
                q = np.int32(np.rint(x[t, base + j] * inv))  # half to even, as _mm256_round_ps
                xq[t, 32 * b + j] = q
                s += q
            xs[t, b] = s
            xm[t, b] = xd[t, b] * np.float32(s)  # Q8_1's s, before its f16 rounding


def quantize(x: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, ...]:
    """Columns [c0, c1) of float32 x [n, *] (c1 - c0 a multiple of 32) as Q8_0/Q8_1 blocks:
    (q int8 [n, K], d float32 [n, B] holding the f16 scale's value, s int32 [n, B] = the sum
    of each block's q, m float32 [n, B] = Q8_1's f16 d * s, with d before rounding). Each
    token's row is quantized on its own."""
    n, K = x.shape[0], c1 - c0
    xq = np.empty((n, K), np.int8)
    xd = np.empty((n, K // 32), np.float32)
    xs = np.empty((n, K // 32), np.int32)
    xm = np.empty((n, K // 32), np.float32)
    _quantize(x, c0, xq, xd, xs, xm)
    half = np.float16
    return xq, xd.astype(half).astype(np.float32), xs, xm.astype(half).astype(np.float32)


@njit(cache=True, nogil=True)
def _quantize_k(x, c0, xq, xd, xs):
    n, K = xq.shape
    f0 = np.float32(0.0)
    for t in range(n):
        for s in range(K // 256):
            base = c0 + 256 * s
            amax = f0
            big = f0  # the value of largest magnitude, the first one on ties
            for j in range(256):
                a = abs(x[t, base + j])
                if a > amax:
                    amax = a
                    big = x[t, base + j]
            if amax == f0:
                xd[t, s] = f0
                for j in range(256):
                    xq[t, 256 * s + j] = 0
            else:
                iscale = np.float32(-127.0) / big
                for j in range(256):
                    q = np.int32(np.rint(iscale * x[t, base + j]))  # nearest_int: half to even
                    xq[t, 256 * s + j] = min(127, q)
                xd[t, s] = np.float32(1.0) / iscale
            for u in range(16):
                acc = 0
                for j in range(16):
                    acc += xq[t, 256 * s + 16 * u + j]
                xs[t, 16 * s + u] = acc


def quantize_k(x: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, ...]:
    """Columns [c0, c1) of float32 x [n, *] (c1 - c0 a multiple of 256) as ggml's Q8_K, the
    activations of the K-quants (quantize_row_q8_K_ref, which ggml's CPU backend runs on
    x86): per 256, the value of largest magnitude m, q = min(127, round-half-even(x * -127 /
    m)), d = 1 / (-127 / m) as float32. Returns (q int8 [n, K], d float32 [n, K/256],
    s int32 [n, K/16] = the sum of each run of 16 q, ggml's bsums)."""
    n, K = x.shape[0], c1 - c0
    xq = np.empty((n, K), np.int8)
    xd = np.empty((n, K // 256), np.float32)
    xs = np.empty((n, K // 16), np.int32)
    _quantize_k(x, c0, xq, xd, xs)
    return xq, xd, xs


def blocks(x: np.ndarray) -> np.ndarray:
    """float32 [n, K] -> GGUF Q8_0 bytes [n, K/32, 34], as ggml's CPU backend writes them."""
    xq, xd, _, _ = quantize(np.ascontiguousarray(x, np.float32), 0, x.shape[1])
    n, B = xd.shape
    out = np.empty((n, B, 34), np.uint8)
    out[:, :, :2] = xd.astype(np.float16).view(np.uint8).reshape(n, B, 2)
    out[:, :, 2:] = xq.view(np.uint8).reshape(n, B, 32)
    return out
