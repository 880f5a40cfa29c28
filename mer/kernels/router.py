"""The top-k router: softmax over expert logits, keep the k largest, and (Mixtral, Qwen3-MoE
with `norm_topk_prob`) renormalise them to sum to 1, or (OLMoE) keep them as they are; and
DeepSeek's variants: sigmoid scores with a bias that steers the choice only, group-limited
choice, and a scaling factor on the kept weights.

# n = tokens, E = experts, A = active experts per token (top-k)
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def _route(
    logits, k, normalize, sigmoid, bias, n_group, topk_group, top2, scale, idx, weights
):  # pragma: no cover - compiled
    n, e = logits.shape
    size = e // n_group
    probs = np.empty(e, np.float32)
    choice = np.empty(e, np.float32)
    group = np.empty(n_group, np.float32)
    kept_group = np.empty(n_group, np.bool_)
    for t in range(n):
        if sigmoid:
            for j in range(e):
                probs[j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[t, j]))
        else:
            mx = logits[t, 0]
            for j in range(1, e):
                mx = max(mx, logits[t, j])
            total = np.float32(0.0)
            for j in range(e):
                probs[j] = np.exp(logits[t, j] - mx)
                total += probs[j]
            for j in range(e):
                probs[j] /= total
        # the choice ranks probs + bias (the bias never enters the weights); -1 marks taken
        for j in range(e):
            choice[j] = probs[j] + bias[j] if bias.shape[0] else probs[j]
        if n_group > 1:
            for g in range(n_group):
                first = -np.inf
                second = -np.inf
                for j in range(g * size, (g + 1) * size):
                    if choice[j] > first:
                        second = first
                        first = choice[j]
                    elif choice[j] > second:
                        second = choice[j]
                group[g] = first + second if top2 else first
            for g in range(n_group):
                kept_group[g] = False
            for _ in range(topk_group):  # the best groups; ties go to the lower group id
                best = -1
                for g in range(n_group):
                    if not kept_group[g] and (best < 0 or group[g] > group[best]):
                        best = g
                kept_group[best] = True
            for g in range(n_group):
                if not kept_group[g]:
                    for j in range(g * size, (g + 1) * size):
                        choice[j] = -np.inf
        # selection by repeated max: E is small; ties go to the lower expert id
        kept = np.float32(0.0)
        for a in range(k):
            best = -1
            for j in range(e):
                if choice[j] > -np.inf and (best < 0 or choice[j] > choice[best]):
                    best = j
            if best < 0:  # NaN scores (corrupt weights): any unchosen id, the NaN flows on
                for j in range(e):
                    if choice[j] != -np.inf:
                        best = j
                        break
                if best < 0:
                    best = a
            idx[t, a] = best
            weights[t, a] = probs[best]
            kept += probs[best]
            choice[best] = -np.inf
        if normalize:
            if sigmoid:
                kept += np.float32(1e-20)
            for a in range(k):
                weights[t, a] /= kept
        if scale != 1.0:
            for a in range(k):
                weights[t, a] *= scale


def route(
    logits: np.ndarray,
    k: int,
    normalize: bool = True,
    *,
    scoring: str = "softmax",
    bias: np.ndarray | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids int64 [n, A] (by falling score) and their weights float32 [n, A].

    Scores are the softmax over all experts, or each expert's sigmoid (`scoring`); the k
    best of `scores + bias` are chosen, from the `topk_group` best of `n_group` groups of
    adjacent experts when n_group > 1 (a group ranked by its best score, or its two best
    summed: `group_score` "max" | "top2"); their weights are their scores, renormalised to
    sum to 1 (`normalize`), times `scale`."""
    if logits.dtype != np.float32 or logits.ndim != 2:
        raise ValueError("route: logits must be float32 [n, E]")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"route: k={k} outside 1..{logits.shape[1]}")
    if n_group < 1 or logits.shape[1] % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"route: {n_group} groups, {topk_group} kept, do not fit the experts")
    n = logits.shape[0]
    idx = np.empty((n, k), np.int64)
    weights = np.empty((n, k), np.float32)
    bias = np.zeros(0, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    _route(
        np.ascontiguousarray(logits),
        k,
        normalize,
        scoring == "sigmoid",
        bias,
        n_group,
        topk_group,
        group_score == "top2",
        np.float32(scale),
        idx,
        weights,
    )
    return idx, weights


def route_reference(
    logits: np.ndarray,
    k: int,
    normalize: bool = True,
    *,
    scoring: str = "softmax",
    bias: np.ndarray | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    x = logits.astype(np.float64)
    if scoring == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-x))
    else:
        probs = np.exp(x - x.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    choice = probs + (0.0 if bias is None else bias.astype(np.float64))
    if n_group > 1:
        grouped = np.sort(choice.reshape(len(x), n_group, -1), axis=-1)
        scores = grouped[..., -2:].sum(-1) if group_score == "top2" else grouped[..., -1]
        best = np.argsort(-scores, axis=-1, kind="stable")[:, :topk_group]
        allowed = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(allowed, best, True, -1)
        choice = np.where(np.repeat(allowed, x.shape[1] // n_group, -1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, idx, -1)
    if normalize:
        top = top / top.sum(-1, keepdims=True)
    return idx, (top * scale).astype(np.float32)


@njit(cache=True, nogil=True)
def combine(out, tok, w, y):
    """out[tok[r]] += w[r] * y[r] for r in order (float32: each token's experts summed in the
    order of their rows)."""
    for r in range(len(tok)):
        t, wr = tok[r], w[r]
        for j in range(y.shape[1]):
            out[t, j] += wr * y[r, j]
