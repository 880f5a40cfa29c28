"""Rotary position embeddings (RoPE), with linear, Llama-3 and YaRN frequency scaling.

# n = tokens, H = heads, hd = head dim, F = hd / 2 frequencies
Two layouts of the rotated pairs: halves (x[i], x[i + F]) as Hugging Face checkpoints use,
or adjacent (x[2i], x[2i + 1]) as GGUF llama files use after llama.cpp's permutation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from mer.models.args import RopeArgs


def inv_frequencies(rope: RopeArgs, head_dim: int) -> np.ndarray:
    """float32 [F] inverse frequencies, computed in float32 as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.scaling == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.scaling == "llama3":
        inv = _llama3_scale(inv, rope)
    elif rope.scaling == "yarn":
        inv = _yarn_scale(inv, rope, head_dim)
    if rope.freq_factors is not None:
        inv = inv / np.asarray(rope.freq_factors, dtype=np.float32)
    return inv.astype(np.float32)


def _llama3_scale(inv: np.ndarray, rope: RopeArgs) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_ctx = rope.original_max_position_embeddings
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(rope.factor), inv)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_scale(inv: np.ndarray, rope: RopeArgs, head_dim: int) -> np.ndarray:
    # YaRN: frequencies that turn fewer than beta_slow times over the original context are
    # interpolated (divided by `factor`), those turning more than beta_fast times kept, and
    # the band between blended along a linear ramp over the frequency index.
    def correction_dim(rotations: float) -> float:
        old = rope.original_max_position_embeddings
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    keep = np.float32(1.0) - np.clip(ramp, 0, 1).astype(np.float32)
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    interpolated = np.float32(1.0) / (np.float32(rope.factor) * np.float32(rope.theta) ** exponents)
    return interpolated * (np.float32(1.0) - keep) + inv * keep


def rope_tables(
    inv_freq: np.ndarray, positions: np.ndarray, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [n, F], for integer positions [n], multiplied by `scale` (YaRN's
    attention factor)."""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    if scale != 1.0:
        cos, sin = cos * np.float32(scale), sin * np.float32(scale)
    return cos, sin


@njit(cache=True, nogil=True, fastmath=True)
def _rope(x, cos, sin, interleaved):  # pragma: no cover - compiled
    n, h, hd = x.shape
    f = hd // 2
    for t in range(n):
        for j in range(h):
            for i in range(f):
                a_i = 2 * i if interleaved else i
                b_i = 2 * i + 1 if interleaved else i + f
                a = x[t, j, a_i]
                b = x[t, j, b_i]
                x[t, j, a_i] = a * cos[t, i] - b * sin[t, i]
                x[t, j, b_i] = b * cos[t, i] + a * sin[t, i]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = False) -> None:
    """Rotate `x` [n, H, hd] float32 in place by the angles whose cos/sin [n, hd/2] are given."""
    if x.dtype != np.float32 or x.ndim != 3 or not x.flags.c_contiguous:
        raise ValueError("apply_rope: x must be a C-contiguous float32 [n, H, hd] array")
    if cos.shape != (x.shape[0], x.shape[2] // 2) or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: tables {cos.shape} do not fit x {x.shape}")
    _rope(x, cos, sin, interleaved)


def apply_rope_reference(
    x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = False
) -> np.ndarray:
    x64 = x.astype(np.float64)
    f = x.shape[2] // 2
    if interleaved:
        a, b = x64[..., 0::2], x64[..., 1::2]
    else:
        a, b = x64[..., :f], x64[..., f:]
    c, s = cos[:, None, :], sin[:, None, :]
    ra, rb = a * c - b * s, b * c + a * s
    out = np.empty_like(x64)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :f], out[..., f:] = ra, rb
    return out.astype(np.float32)
