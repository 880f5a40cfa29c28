"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, in float32 as transformers computes it.

# n = tokens, D = hidden size
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _rmsnorm(x, w, eps, out):  # pragma: no cover - compiled
    n, d = x.shape
    for t in range(n):
        acc = np.float32(0.0)
        for i in range(d):
            acc += x[t, i] * x[t, i]
        scale = np.float32(1.0) / np.sqrt(acc / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = w[i] * (x[t, i] * scale)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Normalise each row of `x` [n, D] float32 and scale by `w` [D] float32."""
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError("rmsnorm: x and w must be float32")
    if x.ndim != 2 or w.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm: shapes {x.shape} and {w.shape} do not fit")
    out = np.empty_like(x)
    _rmsnorm(np.ascontiguousarray(x), w, eps, out)
    return out


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps))).astype(np.float32)
