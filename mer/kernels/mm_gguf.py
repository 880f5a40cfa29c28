# Dimensions: B = blocks, S = sub-block size.
#
# Unpackers of GGUF block types into the sub-block planes of mm_subblock (W = s * q + m).
# Block layouts follow ggml-common.h; s and m are computed in float32 in the same order as
# gguf.quants, so dequantized values are bit-identical to it.
from __future__ import annotations

import numpy as np

from .mm_subblock import SubBlockKind, bits, f16, nibbles

QK_K = 256


class Q4_1(SubBlockKind):
    """32 weights: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m."""

    KIND, BLOCK, BLOCK_BYTES, SUB = "q4_1", 32, 20, 32

    @classmethod
    def unpack(cls, b):
        return nibbles(b[:, 4:], 16).astype(np.int8), f16(b[:, 0:2]), f16(b[:, 2:4])


class Q5_0(SubBlockKind):
    """32 weights: f16 d, 32 high bits, 16 bytes of nibbles; w = d * (q - 16)."""

    KIND, BLOCK, BLOCK_BYTES, SUB, HAS_MIN = "q5_0", 32, 22, 32, False

    @classmethod
    def unpack(cls, b):
        q = (nibbles(b[:, 6:], 16) | (bits(b[:, 2:6], 32) << 4)).astype(np.int8) - np.int8(16)
        return q, f16(b[:, 0:2]), np.zeros((len(b), 1), np.float32)


class Q5_1(SubBlockKind):
    """32 weights: f16 d, f16 m, 32 high bits, 16 bytes of nibbles; w = d * q + m."""

    KIND, BLOCK, BLOCK_BYTES, SUB = "q5_1", 32, 24, 32

    @classmethod
    def unpack(cls, b):
        q = (nibbles(b[:, 8:], 16) | (bits(b[:, 4:8], 32) << 4)).astype(np.int8)
        return q, f16(b[:, 0:2]), f16(b[:, 2:4])


def k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block from its 12 packed bytes."""
    p = packed.reshape(-1, 3, 4)
    lo, hi, mix = p[:, 0], p[:, 1], p[:, 2]
    scales = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return scales, mins


def _k_scales_f32(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc, mn = k_scales(b[:, 4:16])
    d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
    # m is stored negated: s * q + (-dm) equals gguf's s * q - dm exactly
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


class Q4_K(SubBlockKind):
    """256 weights: f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles
    (each 32 bytes hold sub-blocks 2i in low and 2i+1 in high nibbles)."""

    KIND, BLOCK, BLOCK_BYTES, SUB = "q4_k", QK_K, 144, 32

    @classmethod
    def unpack(cls, b):
        s, m = _k_scales_f32(b)
        return nibbles(b[:, 16:], 32).astype(np.int8), s, m


class Q5_K(SubBlockKind):
    """256 weights: f16 d, f16 dmin, 12 bytes of scales/mins, 32 bytes of high bits
    (bit j of byte i is the fifth bit of weight i of sub-block j), 128 bytes of nibbles."""

    KIND, BLOCK, BLOCK_BYTES, SUB = "q5_k", QK_K, 176, 32

    @classmethod
    def unpack(cls, b):
        s, m = _k_scales_f32(b)
        high = (b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = nibbles(b[:, 48:], 32) | (high.reshape(len(b), -1) << 4)
        return q.astype(np.int8), s, m


class Q6_K(SubBlockKind):
    """256 weights: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d;
    w = d * scale * (q - 32) over sub-blocks of 16."""

    KIND, BLOCK, BLOCK_BYTES, SUB, HAS_MIN = "q6_k", QK_K, 210, 16, False

    @classmethod
    def unpack(cls, b):
        n = len(b)
        low = nibbles(b[:, :128], 64).reshape(n, -1, 32)  # 8 runs of 32 weights
        high = (
            b[:, 128:192].reshape(n, 2, 1, 32)
            >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
        ) & 3
        q = (low | (high.reshape(n, -1, 32) << 4)).reshape(n, QK_K).astype(np.int8) - np.int8(32)
        s = f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
        return q, s, np.zeros((n, QK_K // 16), np.float32)


KINDS = (Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
