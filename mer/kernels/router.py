"""The softmax top-k router: softmax over expert logits, keep the k largest, and (Mixtral,
Qwen3-MoE with `norm_topk_prob`) renormalise them to sum to 1, or (OLMoE) keep them as they are.

# n = tokens, E = experts, A = active experts per token (top-k)
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def _route(logits, k, normalize, idx, weights):  # pragma: no cover - compiled
    n, e = logits.shape
    probs = np.empty(e, np.float32)
    for t in range(n):
        mx = logits[t, 0]
        for j in range(1, e):
            mx = max(mx, logits[t, j])
        total = np.float32(0.0)
        for j in range(e):
            probs[j] = np.exp(logits[t, j] - mx)
            total += probs[j]
        for j in range(e):
            probs[j] /= total
        # selection by repeated max: E is small; ties go to the lower expert id
        kept = np.float32(0.0)
        for a in range(k):
            best = -1
            for j in range(e):
                if probs[j] >= 0 and (best < 0 or probs[j] > probs[best]):
                    best = j
            if best < 0:  # NaN scores (corrupt weights): any unchosen id, the NaN flows on
                for j in range(e):
                    if probs[j] != -1.0:
                        best = j
                        break
            idx[t, a] = best
            weights[t, a] = probs[best]
            kept += probs[best]
            probs[best] = -1.0
        if normalize:
            for a in range(k):
                weights[t, a] /= kept


def route(logits: np.ndarray, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids int64 [n, A] (by falling weight) and their weights float32 [n, A]:
    renormalised over the k chosen (`normalize`), or their softmax over all experts."""
    if logits.dtype != np.float32 or logits.ndim != 2:
        raise ValueError("route: logits must be float32 [n, E]")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"route: k={k} outside 1..{logits.shape[1]}")
    n = logits.shape[0]
    idx = np.empty((n, k), np.int64)
    weights = np.empty((n, k), np.float32)
    _route(np.ascontiguousarray(logits), k, normalize, idx, weights)
    return idx, weights


def route_reference(
    logits: np.ndarray, k: int, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, idx, -1)
    if normalize:
        top = top / top.sum(-1, keepdims=True)
    return idx, top.astype(np.float32)
