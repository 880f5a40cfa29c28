"""Causal grouped-query attention of new tokens over a KV cache.

# n = new tokens, H = query heads, G = KV heads (H % G == 0), hd = key head dim,
# vd = value head dim (<= hd), T = cache positions filled (including the new tokens)
Values may be narrower than keys, and may be a view of the keys' first vd values (DeepSeek's
latent attention, where key and value are one cached latent).
Query i sits at absolute position p0 + i and sees keys at positions max(0, p - W + 1)..p,
W being the sliding window (None = unbounded), as transformers masks it.
With attention sinks (gpt-oss) each head's softmax has one more logit, the head's sink, that
weighs no value: it only takes a share of the probability.
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np
from numba import njit, prange

from .matmul import _PAR_MIN_WORK, get_num_threads, thread_policy


@njit(nogil=True, fastmath=True, error_model="numpy", inline="always")
def _job(q, k_cache, v_cache, p0, window, scale, sinks, out, job):  # pragma: no cover
    # One query token and head: causal softmax over its keys, then the weighted values.
    h, hd, vd = q.shape[1], q.shape[2], v_cache.shape[2]
    group = h // k_cache.shape[1]
    t = job // h
    j = job % h
    kv = j // group
    p = p0 + t
    lo = 0 if window <= 0 else max(0, p - window + 1)
    scores = np.empty(p + 1 - lo, np.float32)
    mx = np.float32(-np.inf)
    if sinks.shape[0]:
        mx = sinks[j]
    for s in range(lo, p + 1):
        acc = np.float32(0.0)
        for i in range(hd):
            acc += q[t, j, i] * k_cache[s, kv, i]
        acc *= scale
        scores[s - lo] = acc
        mx = max(mx, acc)
    total = np.float32(0.0)
    if sinks.shape[0]:
        total = np.exp(sinks[j] - mx)
    for s in range(scores.shape[0]):
        scores[s] = np.exp(scores[s] - mx)
        total += scores[s]
    for i in range(vd):
        out[t, j, i] = 0.0
    for s in range(lo, p + 1):
        w = scores[s - lo] / total
        for i in range(vd):
            out[t, j, i] += w * v_cache[s, kv, i]


@njit(cache=True, nogil=True, fastmath=True, parallel=True, error_model="numpy")
def _attention(q, k_cache, v_cache, p0, window, scale, sinks, out):  # pragma: no cover
    # One kernel for any thread count (numba's setting, 1 included: a region of one thread
    # costs ~1 us): a serial copy compiles to different vector code, hence other bits.
    for job in prange(q.shape[0] * q.shape[1]):
        _job(q, k_cache, v_cache, p0, window, scale, sinks, out, job)


def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    p0: int,
    window: int | None = None,
    scale: float | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Attention output float32 [n, H, vd] for queries q [n, H, hd] at positions p0..p0+n-1.

    k_cache: float32 [capacity, G, hd], v_cache [capacity, G, vd], with positions 0..p0+n-1
    filled. Scores are scaled by `scale` (default 1/sqrt(hd)); `sinks` float32 [H]: each
    head's sink logit.
    """
    n, h, hd = q.shape
    if q.dtype != np.float32 or k_cache.dtype != np.float32 or v_cache.dtype != np.float32:
        raise ValueError("attention: q and caches must be float32")
    if (
        k_cache.shape[:2] != v_cache.shape[:2]
        or v_cache.shape[2] > hd
        or k_cache.shape[2] != hd
        or h % k_cache.shape[1]
    ):
        raise ValueError(f"attention: q {q.shape} does not fit cache {k_cache.shape}")
    if p0 + n > k_cache.shape[0]:
        raise ValueError("attention: positions run past the cache capacity")
    if sinks is None:
        sinks = _NO_SINKS
    elif sinks.dtype != np.float32 or sinks.shape != (h,):
        raise ValueError(f"attention: sinks must be float32 [{h}]")
    out = np.empty((n, h, v_cache.shape[2]), np.float32)
    args = (np.ascontiguousarray(q), k_cache, v_cache, p0, window or 0)
    scale = np.float32(1.0 / math.sqrt(hd) if scale is None else scale)
    keys = (p0 + n) if not window else min(p0 + n, window)  # keys each query sees, at most
    work = n * h * keys * hd
    # Jobs are whole (token, head) pairs: any thread count gives the same bits.
    if get_num_threads() == 1 or work < _PAR_MIN_WORK:
        _on_threads(1)
        _attention(*args, scale, sinks, out)
        return out
    policy = thread_policy()
    key = ("attention", h, n.bit_length(), keys.bit_length())
    nt = policy.choose(key)
    _on_threads(nt)
    start = time.perf_counter()
    _attention(*args, scale, sinks, out)
    policy.record(key, nt, work, time.perf_counter() - start)
    return out


_NO_SINKS = np.zeros(0, np.float32)


def _on_threads(nt: int) -> None:
    if numba.get_num_threads() != nt:
        numba.set_num_threads(nt)  # numba's setting is per calling thread


def attention_reference(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    p0: int,
    window: int | None = None,
    scale: float | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    n, h, hd = q.shape
    group = h // k_cache.shape[1]
    scale = 1 / math.sqrt(hd) if scale is None else scale
    out = np.empty((n, h, v_cache.shape[2]), np.float64)
    for t in range(n):
        p = p0 + t
        lo = 0 if not window else max(0, p - window + 1)
        for j in range(h):
            keys = k_cache[lo : p + 1, j // group].astype(np.float64)
            s = keys @ q[t, j].astype(np.float64) * scale
            sink = -np.inf if sinks is None else float(sinks[j])
            top = max(s.max(), sink)
            w = np.exp(s - top)
            total = w.sum() + np.exp(sink - top)
            out[t, j] = (w / total) @ v_cache[lo : p + 1, j // group]
    return out.astype(np.float32)
