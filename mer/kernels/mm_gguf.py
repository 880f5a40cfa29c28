# Dimensions: B = GGUF blocks per row, U = units of 32 weights per row, S = 256-weight
# super-blocks per row (K-quants), f = flat unit index r * U + u.
#
# GGUF block types whose weights are W = s * q + m per sub-block (MXFP4: W = s * table[q]),
# repacked into the plane layouts that mm_sb_ir decodes. Every kind keeps its quants packed:
# 16 nibble bytes per unit (byte i = weight i | weight 16+i << 4, GGUF's Q4_1 order; the
# K-quants are reordered into it), plus high bits as u32 words per unit, plus the scales in
# their GGUF width, so the planes stay about GGUF-sized (decode streams them from DRAM).
# `parts` rebuilds integer q and float32 s, m in the same order as gguf.quants, so dequantize
# is bit-identical; `fill` (numba) expands the scales of a run of units to float32 for the
# kernels.
from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from .mm_f32 import FM
from .mm_half import h2f
from .mm_sb_ir import MXFP4_VALUES, expand8, expand16, spec_of
from .mm_subblock import SubBlockKind, fill, half, high_bits, nibble_bytes, scales_per_unit

QK_K = 256


class Q4_1(SubBlockKind):
    """32 weights: f16 d, f16 m, 16 nibble bytes; w = d * q + m.
    Planes: nib u8 [N, 16U], d u16 [N, U], m u16 [N, U] (exactly GGUF-sized)."""

    KIND, BLOCK, BLOCK_BYTES = "q4_1", 32, 20

    @classmethod
    def pack(cls, b: np.ndarray) -> tuple[np.ndarray, ...]:
        return b[:, :, 4:].reshape(len(b), -1), half(b, 0), half(b, 2)

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        nib, d, m = planes
        return cls.q(nib), f32(d), f32(m)


class Q5_0(SubBlockKind):
    """32 weights: f16 d, u32 of fifth bits, 16 nibble bytes; w = d * (q - 16).
    Planes: nib u8 [N, 16U], qh u32 [N, U], d u16 [N, U]."""

    KIND, BLOCK, BLOCK_BYTES = "q5_0", 32, 22

    @classmethod
    def pack(cls, b: np.ndarray) -> tuple[np.ndarray, ...]:
        qh = np.ascontiguousarray(b[:, :, 2:6]).view(np.uint32)[..., 0]
        return b[:, :, 6:].reshape(len(b), -1), qh, half(b, 0)

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        nib, qh, d = planes
        return cls.q(nib, qh).astype(np.int8) - np.int8(16), f32(d), None


class Q5_1(SubBlockKind):
    """32 weights: f16 d, f16 m, u32 of fifth bits, 16 nibble bytes; w = d * q + m.
    Planes: nib u8 [N, 16U], qh u32 [N, U], d u16 [N, U], m u16 [N, U]."""

    KIND, BLOCK, BLOCK_BYTES = "q5_1", 32, 24

    @classmethod
    def pack(cls, b: np.ndarray) -> tuple[np.ndarray, ...]:
        qh = np.ascontiguousarray(b[:, :, 4:8]).view(np.uint32)[..., 0]
        return b[:, :, 8:].reshape(len(b), -1), qh, half(b, 0), half(b, 2)

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        nib, qh, d, m = planes
        return cls.q(nib, qh), f32(d), f32(m)


def k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K super-blocks from their 12 packed bytes."""
    p = packed.reshape(*packed.shape[:-1], 3, 4)
    lo, hi, mix = p[..., 0, :], p[..., 1, :], p[..., 2, :]
    scales = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return scales, mins


class Q4_K(SubBlockKind):
    """256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 nibble bytes (each 32
    hold sub-blocks 2i low, 2i+1 high); w = (d * sc) * q - dmin * mn.
    Planes: nib u8 [N, 16U], sc u8 [N, U], mn u8 [N, U], d u16 [N, S], dmin u16 [N, S]."""

    KIND, BLOCK, BLOCK_BYTES = "q4_k", QK_K, 144
    HIGH = None  # bytes of the fifth bits (Q5_K)

    @classmethod
    def pack(cls, b: np.ndarray) -> tuple[np.ndarray, ...]:
        n = len(b)
        qs = b[:, :, -128:].reshape(n, -1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
        w = qs & 15  # [N, S, 4, 2, 32]: sub-block 2i + half, weight
        if cls.HIGH is not None:
            h = b[:, :, cls.HIGH : cls.HIGH + 32].reshape(n, -1, 1, 32)
            h = (h >> np.arange(8, dtype=np.uint8)[:, None]) & 1
            w = w | (h.reshape(w.shape) << 4)
        sc, mn = k_scales(b[:, :, 4:16])
        w = w.reshape(n, -1, 32)
        planes = [nibble_bytes(w), sc.reshape(n, -1), mn.reshape(n, -1), half(b, 0), half(b, 2)]
        if cls.HIGH is not None:
            planes.insert(1, high_bits(w, 1))
        return tuple(planes)

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        nib, qh, (sc, mn, d, dmin) = planes[0], planes[1:-4], planes[-4:]
        s = np.repeat(f32(d), 8, axis=1) * sc.astype(np.float32)
        m = -(np.repeat(f32(dmin), 8, axis=1) * mn.astype(np.float32))
        return cls.q(nib, *qh), s, m  # s * q + (-dm) is exactly gguf's s * q - dm


class Q5_K(Q4_K):
    """Q4_K plus 32 bytes of fifth bits (bit j of byte i: weight i of sub-block j).
    Planes: nib u8 [N, 16U], qh u32 [N, U], sc, mn u8 [N, U], d, dmin u16 [N, S]."""

    KIND, BLOCK, BLOCK_BYTES, HIGH = "q5_k", QK_K, 176, 16


class Q6_K(SubBlockKind):
    """256 weights: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d;
    w = (d * scale) * (q - 32) over sub-blocks of 16.
    Planes: nib u8 [N, 16U], qh u32 [N, 2U] (2 bits per weight), sc i8 [N, 2U], d u16 [N, S]."""

    KIND, BLOCK, BLOCK_BYTES = "q6_k", QK_K, 210

    @classmethod
    def pack(cls, b: np.ndarray) -> tuple[np.ndarray, ...]:
        n = len(b)
        low = b[:, :, :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]
        high = (
            b[:, :, 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
        )
        w = (low & 15).reshape(n, -1, 8, 32) | ((high & 3).reshape(n, -1, 8, 32) << 4)
        w = w.reshape(n, -1, 32)
        sc = np.ascontiguousarray(b[:, :, 192:208]).view(np.int8).reshape(n, -1)
        return nibble_bytes(w), high_bits(w.reshape(n, -1, 16), 2), sc, half(b, 208)

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        nib, qh, sc, d = planes
        s = np.repeat(f32(d), 16, axis=1) * sc.astype(np.float32)
        return cls.q(nib, qh).astype(np.int8) - np.int8(32), s, None


class MXFP4(SubBlockKind):
    """32 weights: u8 E8M0 exponent e, 16 nibble bytes; w = d * MXFP4_VALUES[q], d = 2^(e-128)
    (ggml's e8m0_to_fp32_half: the values are doubled E2M1 floats, so d is half the scale).
    Planes: nib u8 [N, 16U], e u8 [N, U] (exactly GGUF-sized)."""

    KIND, BLOCK, BLOCK_BYTES = "mxfp4", 32, 17

    @classmethod
    def pack(cls, b: np.ndarray) -> tuple[np.ndarray, ...]:
        return b[:, :, 1:].reshape(len(b), -1), b[:, :, 0]

    @classmethod
    def parts(cls, planes: tuple[np.ndarray, ...]) -> tuple:
        nib, e = planes
        return np.array(MXFP4_VALUES, np.int8)[cls.q(nib)], e8m0_half(e), None


# The integer kinds; MXFP4, with its one-byte scales, is registered beside them.
KINDS = (Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """float32 2^(e-128) of E8M0 bytes, built from its bits as ggml does (e < 2: subnormal)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.view(np.float32)


def f32(h: np.ndarray) -> np.ndarray:
    """float32 values of raw f16 bits."""
    return h.view(np.float16).astype(np.float32)


@njit(nogil=True, inline="always")
def flat(a):
    return a.reshape(a.size)


@njit(nogil=True, fastmath=FM, inline="always")
def _halves(d, f0, n, out):  # out[i] = d[f0 + i] as float32
    src = d[f0 : f0 + n]
    for i in range(n):
        out[np.uint64(i)] = h2f(src[np.uint64(i)])  # unsigned: no wraparound code, vectorizes


@njit(nogil=True, inline="always")
def _e8m0(e, f0, n, out):  # out[i] = 2^(e[f0 + i] - 128), as e8m0_half
    src, bits = e[f0 : f0 + n], out[:n].view(np.uint32)
    for i in range(n):
        v = np.uint32(src[np.uint64(i)])
        sub = np.uint32(0x00200000) << (v & np.uint32(1))  # masked: no over-wide shift
        bits[np.uint64(i)] = sub if v < 2 else (v - np.uint32(1)) << np.uint32(23)


@overload(scales_per_unit)
def _spu(planes):
    spu = spec_of(planes).spu
    return lambda planes: spu


@overload(fill, jit_options={"fastmath": FM})
def _fill(planes, f0, n, s, m):
    kind = spec_of(planes).kind
    one, neg = np.float32(1.0), np.float32(-1.0)

    def f16_scales(planes, f0, n, s, m):
        _halves(flat(planes[-2]), f0, n, s)
        _halves(flat(planes[-1]), f0, n, m)

    def q5_0(planes, f0, n, s, m):
        _halves(flat(planes[-1]), f0, n, s)
        for i in range(n):
            m[np.uint64(i)] = np.float32(-16.0) * s[np.uint64(i)]

    def k_quant(planes, f0, n, s, m):
        expand8(flat(planes[-2]), flat(planes[-4]), f0, n, s, one)
        expand8(flat(planes[-1]), flat(planes[-3]), f0, n, m, neg)

    def q6_k(planes, f0, n, s, m):  # two scales per unit
        expand16(flat(planes[3]), flat(planes[2]), 2 * f0, 2 * n, s, one)

    def mxfp4(planes, f0, n, s, m):  # no mins
        _e8m0(flat(planes[1]), f0, n, s)

    kinds = {"q4_1": f16_scales, "q5_1": f16_scales, "q5_0": q5_0, "q6_k": q6_k, "mxfp4": mxfp4}
    return kinds.get(kind, k_quant)
