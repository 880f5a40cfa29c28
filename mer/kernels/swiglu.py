# Dimensions: n = tokens, D = model width, I = expert intermediate width, [i0, i1) = this
# worker's slice of I.
#
# One SwiGLU expert (Mixtral / Llama FFN): y = down[:, i0:i1] @ (silu(gate[i0:i1] @ x.T) *
# (up[i0:i1] @ x.T)). Summing the partial outputs over a partition of I gives the full expert,
# so workers can split an expert by intermediate columns. Each weight byte is read once.
from __future__ import annotations

import numpy as np
from numba import njit

from .matmul import PackedWeight, _check_x, dequantize, run_kernel


@njit(cache=True, nogil=True, error_model="numpy")
def _silu_mul(g, u):
    # silu(z) = z / (1 + exp(-z)) in float32; exp overflow gives z/inf = -0, the right limit.
    one = np.float32(1.0)
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            z = g[t, i]
            g[t, i] = z / (one + np.exp(-z)) * u[t, i]


# gpt-oss's SwiGLU: the gate clamped above at `limit`, up to [-limit, limit];
# out = (up + 1) * gate * sigmoid(ALPHA * gate), in float32 as transformers computes it
ALPHA = 1.702


@njit(cache=True, nogil=True, error_model="numpy")
def _clamped_glu(g, u, gb, ub, limit):
    one, alpha = np.float32(1.0), np.float32(ALPHA)
    lim = np.float32(limit)
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            z = min(g[t, i] + gb[i], lim)
            v = min(max(u[t, i] + ub[i], -lim), lim)
            g[t, i] = (v + one) * (z * (one / (one + np.exp(-(z * alpha)))))


@njit(cache=True, nogil=True, error_model="numpy")
def _biased_silu_mul(g, u, gb, ub):
    one = np.float32(1.0)
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            z = g[t, i] + gb[i]
            g[t, i] = z / (one + np.exp(-z)) * (u[t, i] + ub[i])


def activate(expert, g: np.ndarray, u: np.ndarray, i0: int) -> None:
    """g <- the expert's activation of gate outputs g and up outputs u [n, i1 - i0], the
    columns i0.. of its intermediate: its biases added first, if it has them (gpt-oss)."""
    if expert.bias is None and not expert.limit:
        _silu_mul(g, u)
        return
    width = g.shape[1]
    if expert.bias is None:
        gb = ub = np.zeros(width, np.float32)
    else:
        gb, ub = expert.bias[0][i0 : i0 + width], expert.bias[1][i0 : i0 + width]
    if expert.limit:
        _clamped_glu(g, u, gb, ub, expert.limit)
    else:
        _biased_silu_mul(g, u, gb, ub)


def add_down_bias(expert, y: np.ndarray, r0: int = 0) -> None:
    """y [n, r1 - r0] += the expert's down-projection bias over output rows r0.. (if any)."""
    if expert.bias is not None:
        y += expert.bias[2][r0 : r0 + y.shape[1]]


def _check(gate: PackedWeight, up: PackedWeight, down: PackedWeight, x, inter_range):
    d_model, inter = gate.cols, gate.rows
    if (up.rows, up.cols) != (inter, d_model) or (down.rows, down.cols) != (d_model, inter):
        raise ValueError(
            "expert_forward: need gate, up [I, D] and down [D, I], got "
            f"gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, down {down.rows}x{down.cols}"
        )
    _check_x(x, d_model, "expert_forward")
    i0, i1 = (0, inter) if inter_range is None else (int(inter_range[0]), int(inter_range[1]))
    bs = down.block_size
    if not 0 <= i0 <= i1 <= inter or i0 % bs or i1 % bs:
        raise ValueError(
            f"expert_forward: inter_range={inter_range} must lie in [0, {inter}] "
            f"on multiples of the down block size {bs}"
        )
    return i0, i1


def expert_forward(
    gate: PackedWeight,
    up: PackedWeight,
    down: PackedWeight,
    x: np.ndarray,
    inter_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Partial SwiGLU expert output float32 [n, D] for intermediate slice inter_range.

    gate, up: [I, D]; down: [D, I]; x: float32 [n, D] C-contiguous. inter_range (i0, i1)
    must be multiples of down.block_size (default: all of I).
    """
    return _forward(gate, up, down, x, inter_range, None)


def run_expert(expert, x: np.ndarray) -> np.ndarray:
    """The whole output float32 [n, D] of ExpertWeights `expert` (biases and clamp included)
    for x float32 [n, D]."""
    return _forward(expert.gate, expert.up, expert.down, x, None, expert)


def _forward(gate, up, down, x, inter_range, expert) -> np.ndarray:
    i0, i1 = _check(gate, up, down, x, inter_range)
    n = x.shape[0]
    g = np.empty((n, i1 - i0), np.float32)
    u = np.empty((n, i1 - i0), np.float32)
    run_kernel(gate, x, g, i0, i1, 0, gate.cols, 0, i0)
    run_kernel(up, x, u, i0, i1, 0, up.cols, 0, i0)
    if expert is None:
        _silu_mul(g, u)
    else:
        activate(expert, g, u, i0)
    y = np.empty((n, down.rows), np.float32)
    # h = g holds columns i0..i1 of the intermediate activations: offset it by i0.
    run_kernel(down, g, y, 0, down.rows, i0, i1, i0, 0)
    if expert is not None:
        add_down_bias(expert, y)
    return y


def expert_forward_reference(
    gate: PackedWeight,
    up: PackedWeight,
    down: PackedWeight,
    x: np.ndarray,
    inter_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Same as expert_forward, in float64 NumPy on dequantized weights; returns float32."""
    i0, i1 = _check(gate, up, down, x, inter_range)
    xd = x.astype(np.float64)
    g = xd @ dequantize(gate)[i0:i1].astype(np.float64).T
    u = xd @ dequantize(up)[i0:i1].astype(np.float64).T
    with np.errstate(over="ignore"):
        h = g / (1.0 + np.exp(-g)) * u
    return (h @ dequantize(down)[:, i0:i1].astype(np.float64).T).astype(np.float32)
