# Dimensions: N = rows, K = cols, B = K/32 blocks per row, j = position in a block (0..31).
#
# float32 -> GGUF Q8_0 / Q4_0 blocks with llama.cpp's rounding rules (as in ggml-quants.c and
# gguf.quants), so the bytes match gguf.quants.quantize exactly:
#   Q8_0: d = amax/127, id = 1/d (0 if d == 0), q = round-half-away-from-zero(x*id).
#   Q4_0: m = the signed value of largest magnitude (first one on ties), d = m/-8,
#         id = 1/d (0 if d == 0), q = min(15, trunc(x*id + 8.5)); byte j = q[j] | q[j+16] << 4.
# All of it in float32 without fastmath (every rounding step matters). The scale is computed
# here as float32; NumPy's astype(float16) then rounds it exactly like gguf does.
from __future__ import annotations

import numpy as np
from numba import njit

_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


@njit(cache=True, nogil=True)
def _q8_0(a, d, q):
    n, k = a.shape
    f0 = np.float32(0.0)
    f1 = np.float32(1.0)
    half = np.float32(0.5)
    for r in range(n):
        for b in range(k // 32):
            amax = f0
            for j in range(32):
                amax = max(amax, abs(a[r, 32 * b + j]))
            s = amax / np.float32(127.0)
            inv = f1 / s if s != f0 else f0
            d[r, b] = s
            for j in range(32):
                v = a[r, 32 * b + j] * inv
                m = abs(v)
                iq = np.int32(m)  # trunc = floor for m >= 0, and m - iq is exact
                if m - np.float32(iq) >= half:  # round half away from zero
                    iq += 1
                q[r, b, j] = np.int8(-iq if v < f0 else iq)


@njit(cache=True, nogil=True)
def _q4_0(a, d, q):
    n, k = a.shape
    f0 = np.float32(0.0)
    f1 = np.float32(1.0)
    for r in range(n):
        for b in range(k // 32):
            best = f0
            mx = a[r, 32 * b]
            for j in range(32):
                v = a[r, 32 * b + j]
                if abs(v) > best:
                    best = abs(v)
                    mx = v
            s = mx / np.float32(-8.0)
            inv = f1 / s if s != f0 else f0
            d[r, b] = s
            for j in range(16):
                lo = np.trunc(a[r, 32 * b + j] * inv + np.float32(8.5))
                hi = np.trunc(a[r, 32 * b + j + 16] * inv + np.float32(8.5))
                q[r, b, j] = np.uint8(min(np.int32(lo), 15) | (min(np.int32(hi), 15) << 4))


def quantize_blocks(arr: np.ndarray, kind: str) -> np.ndarray:
    """float32 [N, K] -> uint8 [N, K/32*blockbytes] GGUF blocks of `kind` ("q8_0" or "q4_0").

    Byte-identical to gguf.quants.quantize(arr, GGMLQuantizationType.Q8_0 / Q4_0).
    """
    if kind not in _BLOCK_BYTES:
        raise ValueError(f"quantize_blocks: unknown kind {kind!r}, expected 'q8_0' or 'q4_0'")
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[1] % 32 != 0:
        raise ValueError(
            f"quantize_blocks: need a 2-D [N, K] array with K a multiple of 32, got shape {a.shape}"
        )
    a = np.ascontiguousarray(a, dtype=np.float32)
    n, k = a.shape
    d = np.empty((n, k // 32), np.float32)
    if kind == "q8_0":
        q = np.empty((n, k // 32, 32), np.int8)
        _q8_0(a, d, q)
    else:
        q = np.empty((n, k // 32, 16), np.uint8)
        _q4_0(a, d, q)
    out = np.empty((n, k // 32, _BLOCK_BYTES[kind]), np.uint8)
    with np.errstate(over="ignore"):  # |d| > 65504 becomes an inf scale, as in gguf
        d16 = d.astype(np.float16)
    out[:, :, :2] = d16.view(np.uint8).reshape(n, k // 32, 2)
    out[:, :, 2:] = q.view(np.uint8)
    return out.reshape(n, -1)
