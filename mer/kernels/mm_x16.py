# Dimensions: N = rows (a multiple of 16), K = cols, B = K/32 blocks per row, G = N/16 row
# groups, g = group, l = row in a group (0..15), c = 4-byte chunk of a block, i = byte in a
# chunk, t = token.
#
# GGUF weights against 8-bit activations (act_q8): integer dot products, as
# llama.cpp's CPU backend computes them, in a row-interleaved layout. Sixteen rows are laid
# out together so that one 64-byte load holds 4 bytes of the same block of 16 rows: one
# integer multiply-add of 4 byte products per 32-bit lane (AVX-512 VNNI vpdpbusd; pmaddubsw
# + pmaddwd on AVX2; plain widening arithmetic elsewhere) against the token's 4 activation
# bytes broadcast, and the 16 lanes are the 16 rows' sums: no horizontal sum per block.
# Per block: isum (exact int32) -> float, times f16(d_w) * f16(d_x), into one float
# accumulator per row, blocks in order. A token's row is computed the same way whatever else
# is in the call (batch invariance) and whatever the path (integer sums are exact).
#
# Layouts (planes keep a row-sized first dimension: group g is plane rows 16g..16g+15, read
# flat):
#   "q4_0x16": q uint8 [N, 16B], flat per group [B, 4, 16, 4]: byte (b, c, l, i) = GGUF byte
#              4c+i of block b of row 16g+l (low nibble weight 4c+i, high nibble 16+4c+i);
#              d uint16 [N, B], flat per group [B, 16]: f16 bits of block b of row 16g+l.
#   "q8_0x16": q int8 [N, 32B], flat per group [B, 8, 16, 4]: weight 4c+i of block b of row
#              16g+l; d as above.
#   "q4_1x16": q4_0x16's planes plus m uint16 [N, B] (the mins, flat as d).
#   "mxfp4x16": q as q4_0x16 (each nibble indexes ggml's doubled E2M1 values, looked up by
#              a byte shuffle, plus 12 so that they go in unsigned), e uint8 [N, B] (the E8M0
#              exponents, flat as d).
#   "q5_0x16": q4_0x16's planes plus qh uint8 [N, 4B], flat per group [B, 16, 4]: byte
#              (b, l, i) holds the fifth bits of block b of row 16g+l, bit c that of weight
#              4c+i, bit 4 + c that of weight 16+4c+i.
#   "q5_1x16": q4_1x16's planes plus qh as q5_0x16's.
# All exactly GGUF-sized; the K-quants further down.
from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import act_q8, mm_gguf, mm_q4_0, mm_q8_0
from .mm_sb_ir import I32, MXFP4_VALUES, VF, VI, ZERO, Gen, i64, lookup

I8, I16 = ir.IntType(8), ir.IntType(16)
V64B, V32B = ir.VectorType(I8, 64), ir.VectorType(I8, 32)
GROUP = 16
IZERO = ir.Constant(VI, [0] * 16)
VB16P = ir.VectorType(I8, 16).as_pointer()
V16P = ir.VectorType(I16, 16).as_pointer()


def _bytes(v: int) -> ir.Constant:
    """<64 x i8> of v."""
    return ir.Constant(V64B, [v] * 64)


# CPUs by name (NUMBA_CPU_NAME pins one, as the tests do to force a path) -> integer path.
_VNNI_CPUS = {
    "cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake",
    "rocketlake", "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5",
}  # fmt: skip
_AVX2_CPUS = {
    "haswell", "broadwell", "skylake", "skylake-avx512", "x86-64-v3", "x86-64-v4", "znver1",
    "znver2", "znver3", "alderlake", "raptorlake", "meteorlake", "arrowlake",
}  # fmt: skip


def integer_path() -> str:
    """The integer dot product the kernels compile to on this target: "vnni" (AVX-512 VNNI),
    "avx2" or "portable". Chosen from the CPU numba compiles for (the host's features unless
    NUMBA_CPU_NAME names another CPU)."""
    name = numba.config.CPU_NAME
    if name is None:
        f = llvm.get_host_cpu_features()
        if f.get("avx512vnni", False) and f.get("avx512bw", False):
            return "vnni"
        return "avx2" if f.get("avx2", False) else "portable"
    if name == "host":
        name = llvm.get_host_cpu_name()
    return "vnni" if name in _VNNI_CPUS else "avx2" if name in _AVX2_CPUS else "portable"


PATH = integer_path()


def _halves(gen: Gen, v):
    return gen.shuffle(v, v, list(range(32))), gen.shuffle(v, v, list(range(32, 64)))


def _dot4(gen: Gen, acc, w, a, signed: bool):
    """acc + per 32-bit lane l: sum_i w[4l+i] * a[4l+i] (w u8, or s8 when `signed`; a s8),
    except on VNNI with signed weights, where w is read as w + 128 (the caller subtracts
    128 * sum(a) per block)."""
    b = gen.b
    if PATH == "vnni":
        if signed:
            w = b.xor(w, ir.Constant(V64B, [128] * 64))
        args = [acc, b.bitcast(w, VI), b.bitcast(a, VI)]
        return gen.call("llvm.x86.avx512.vpdpbusd.512", VI, args)
    if PATH == "avx2":
        ones = ir.Constant(ir.VectorType(I16, 16), [1] * 16)
        parts = []
        for wh, ah in zip(_halves(gen, w), _halves(gen, a), strict=True):
            if signed:  # |w| * (a with w's sign): pmaddubsw wants unsigned weights
                ah = gen.call("llvm.x86.avx2.psign.b", V32B, [ah, wh])
                wh = gen.call("llvm.abs.v32i8", V32B, [wh, ir.Constant(ir.IntType(1), 0)])
            p16 = gen.call("llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(I16, 16), [wh, ah])
            parts.append(gen.call("llvm.x86.avx2.pmadd.wd", ir.VectorType(I32, 8), [p16, ones]))
        return b.add(acc, gen.shuffle(parts[0], parts[1], list(range(16))))
    v64 = ir.VectorType(I32, 64)
    p = b.mul(b.sext(w, v64) if signed else b.zext(w, v64), b.sext(a, v64))
    s = [gen.shuffle(p, p, [4 * lane + i for lane in range(16)]) for i in range(4)]
    return b.add(acc, b.add(b.add(s[0], s[1]), b.add(s[2], s[3])))


def _halves_to_float(gen: Gen, h):
    """<16 x i16> f16 bits -> <16 x float>: fpext where the CPU converts halves (F16C), else
    by the bits (LLVM would call a runtime helper that numba does not link)."""
    b = gen.b
    if PATH != "portable":
        return b.fpext(b.bitcast(h, ir.VectorType(ir.HalfType(), 16)), VF)
    v = b.zext(h, VI)
    sign = b.shl(b.and_(v, _vi(0x8000)), _vi(16))
    em = b.and_(v, _vi(0x7FFF))
    # exponent and mantissa moved into float position, then scaled by 2^112: exact for
    # normal and subnormal halves; inf and nan keep an all-ones exponent
    f = b.fmul(b.bitcast(b.shl(em, _vi(13)), VF), ir.Constant(VF, [2.0**112] * 16))
    special = b.or_(b.shl(em, _vi(13)), _vi(0x7F800000))
    bits = b.select(b.icmp_unsigned(">=", em, _vi(0x7C00)), special, b.bitcast(f, VI))
    return b.bitcast(b.or_(bits, sign), VF)


def _load_halves(gen: Gen, plane, at):
    """<16 x float> of the 16 f16 values at plane[at]."""
    b = gen.b
    return _halves_to_float(gen, b.load(b.bitcast(b.gep(plane, [at]), V16P), align=1))


def _vi(v: int):
    return ir.Constant(VI, [v] * 16)


def _splat4(gen: Gen, data, idx):
    """The 4 activation bytes at data[idx] broadcast to 64 bytes."""
    b = gen.b
    word = b.load(b.bitcast(b.gep(data, [idx]), I32.as_pointer()), align=1)
    return b.bitcast(gen.splat(word, VI), V64B)


class _Layout(NamedTuple):
    q4: bool  # nibbles (else signed bytes)
    mins: bool  # a min per block (Q4_1: W = d * q + m)
    table: bool = False  # MXFP4: nibbles index a table; E8M0 scales
    high: bool = False  # Q5_0/Q5_1: a last plane of fifth bits


# MXFP4's nibbles (doubled E2M1 values, mm_sb_ir) plus 12, so that they go in unsigned
MXFP4_UNSIGNED = [v + 12 for v in MXFP4_VALUES]


def _layout_of(planes) -> _Layout | None:
    """The layout a numba plane-tuple type holds (module docstring), None if none."""
    if not isinstance(planes, types.BaseTuple) or len(planes) not in (2, 3, 4):
        return None
    dtypes = tuple(str(p.dtype) for p in planes)
    return {
        ("uint8", "uint16"): _Layout(True, False),
        ("int8", "uint16"): _Layout(False, False),
        ("uint8", "uint16", "uint16"): _Layout(True, True),
        ("uint8", "uint8"): _Layout(True, False, True),
        ("uint8", "uint16", "uint8"): _Layout(True, False, high=True),
        ("uint8", "uint16", "uint16", "uint8"): _Layout(True, True, high=True),
    }.get(dtypes)


def _lut(gen: Gen, idx):
    """<64 x i8> MXFP4_UNSIGNED[idx] for nibbles idx: one byte shuffle per 16 (pshufb)."""
    if PATH == "vnni":  # AVX-512BW
        table = ir.Constant(V64B, MXFP4_UNSIGNED * 4)
        return gen.call("llvm.x86.avx512.pshuf.b.512", V64B, [table, idx])
    if PATH == "avx2":
        table = ir.Constant(V32B, MXFP4_UNSIGNED * 2)
        lo, hi = (gen.call("llvm.x86.avx2.pshuf.b", V32B, [table, h]) for h in _halves(gen, idx))
        return gen.shuffle(lo, hi, list(range(64)))
    table = ir.Constant(ir.VectorType(I8, 16), MXFP4_UNSIGNED)
    parts = [
        lookup(gen, table, gen.shuffle(idx, idx, list(range(16 * k, 16 * k + 16))))
        for k in range(4)
    ]
    pairs = [
        gen.shuffle(parts[0], parts[1], list(range(32))),
        gen.shuffle(parts[2], parts[3], list(range(32))),
    ]
    return gen.shuffle(pairs[0], pairs[1], list(range(64)))


def _e8m0_half(gen: Gen, e):
    """<16 x i8> E8M0 bytes -> <16 x float> 2^(e-128), built from the bits as ggml does."""
    b = gen.b
    v = b.zext(e, VI)
    sub = b.shl(_vi(0x00200000), v)  # e < 2: subnormal
    normal = b.shl(b.sub(v, _vi(1)), _vi(23))
    return b.bitcast(b.select(b.icmp_unsigned("<", v, _vi(2)), sub, normal), VF)


def _codegen(lay: _Layout):
    chunks = 4 if lay.q4 else 8  # 4-byte chunks per block per row
    block_bytes = GROUP * 4 * chunks
    # the correction each block's integer sum needs: Q4_0's nibbles are read unsigned
    # (- 8 * sum(a)), Q5_0's 5-bit values too (- 16 * sum(a)); Q8_0 on VNNI is read offset by
    # 128; Q4_1's and Q5_1's values are their q; MXFP4's table values are offset by 12
    if lay.q4:
        offset = 0 if lay.mins else 12 if lay.table else 16 if lay.high else 8
    else:
        offset = 128 if PATH == "vnni" else 0

    def codegen(context, builder, sig, args):
        gen, b = Gen(context, builder), builder
        p = gen.arrays(sig.args[0], cgutils.unpack_tuple(b, args[0]))
        (q, qw), (d, dw) = p[0], p[1]
        (xq, xw), (xd, xdw), (xs, _), (xm, _), (out, _) = gen.arrays(
            [sig.args[i] for i in (1, 2, 3, 4, 9)], [args[i] for i in (1, 2, 3, 4, 9)]
        )
        t, b0, b1, g = gen.ints(sig.args[5:9], args[5:9])
        qbase = b.mul(b.mul(g, i64(GROUP)), qw)
        dbase = b.mul(b.mul(g, i64(GROUP)), dw)
        if lay.high:
            hb, hw = p[-1]
            hbase = b.mul(b.mul(g, i64(GROUP)), hw)
        xrow, xdrow = b.mul(t, xw), b.mul(t, xdw)
        acc = cgutils.alloca_once_value(b, ZERO)
        low, four = _bytes(15), _bytes(4)
        with cgutils.for_range(b, b.sub(b1, b0)) as loop:
            j = loop.index  # block b0 + j; activations are indexed from b0
            wbase = b.add(qbase, b.mul(b.add(b0, j), i64(block_bytes)))
            abase = b.add(xrow, b.mul(j, i64(32)))
            if lay.high:  # the block's fifth bits: one byte per row and i
                hptr = b.gep(hb, [b.add(hbase, b.mul(b.add(b0, j), i64(GROUP * 4)))])
                h = b.load(b.bitcast(hptr, V64B.as_pointer()), align=1)
            s0, s1 = IZERO, IZERO
            for c in range(chunks):
                wptr = b.gep(q, [b.add(wbase, i64(64 * c))])
                w = b.load(b.bitcast(wptr, V64B.as_pointer()), align=1)
                a = _splat4(gen, xq, b.add(abase, i64(4 * c)))
                if lay.q4:  # low nibbles: weights 4c.., high: 16 + 4c..
                    lo, hi = b.and_(w, low), b.lshr(w, four)
                    if lay.table:
                        lo, hi = _lut(gen, lo), _lut(gen, hi)
                    if lay.high:
                        for n in (0, 1):
                            top = b.shl(b.and_(b.lshr(h, _bytes(4 * n + c)), _bytes(1)), four)
                            lo, hi = (b.or_(lo, top), hi) if n == 0 else (lo, b.or_(hi, top))
                    s0 = _dot4(gen, s0, lo, a, False)
                    a_hi = _splat4(gen, xq, b.add(abase, i64(16 + 4 * c)))
                    s1 = _dot4(gen, s1, hi, a_hi, False)
                elif c % 2 == 0:
                    s0 = _dot4(gen, s0, w, a, True)
                else:
                    s1 = _dot4(gen, s1, w, a, True)
            isum = b.add(s0, s1)
            at = b.add(xdrow, j)
            if offset:
                corr = b.mul(gen.load((xs, None), None, at), ir.Constant(I32, offset))
                isum = b.sub(isum, gen.splat(corr, VI))
            doff = b.add(dbase, b.mul(b.add(b0, j), i64(GROUP)))
            dx = gen.splat(gen.load((xd, None), None, at))
            if lay.table:  # ggml: f16(d_x) * e8m0_half(e)
                ev = b.load(b.bitcast(b.gep(d, [doff]), VB16P), align=1)
                scale = b.fmul(dx, _e8m0_half(gen, ev))
            else:
                scale = b.fmul(_load_halves(gen, d, doff), dx)
            v = gen.fma(b.sitofp(isum, VF), scale, b.load(acc))
            if lay.mins:  # + m * s, s = d_x * sum(a) as ggml's Q8_1 keeps it
                xm_t = gen.splat(gen.load((xm, None), None, at))
                v = gen.fma(_load_halves(gen, p[2][0], doff), xm_t, v)
            b.store(v, acc)
        b.store(b.load(acc), b.bitcast(out, VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


K_PLANES = ("uint8", "uint8", "uint8", "uint16", "uint16")  # q4_kx16
K5_PLANES = ("uint8", "uint8", "uint8", "uint8", "uint16", "uint16")  # q5_kx16
AHEAD = 8  # super-blocks the Q4_K/Q5_K kernel prefetches its nibbles ahead (16 KiB a group)


def _codegen_qk(high: bool):
    """Q4_K (Q5_K with `high`: a plane of fifth bits) against Q8_K."""

    def codegen(context, builder, sig, args):
        # Per super-block s of 256: four 32-byte runs of nibbles (sub-blocks 2k low, 2k + 1
        # high), each read as 8 chunks of 4 bytes x 16 rows (Q5_K: the fifth bits of weight
        # 4c+i of every sub-block in one byte, bit j for sub-block j); the exact sums of a
        # sub-block are weighted by its 6-bit scale (integers), the mins by the activations'
        # sums of 32, then acc += d_x d_w * isc - d_x dmin_w * imn, as ggml's Q4_K x Q8_K.
        gen, b = Gen(context, builder), builder
        planes = gen.arrays(sig.args[0], cgutils.unpack_tuple(b, args[0]))
        (q, qw), *rest = planes
        (hb, hw), rest = (rest[0], rest[1:]) if high else ((None, None), rest)
        (sc, scw), (mn, _), (d, dw), (dm, _) = rest
        (xq, xw), (xd, xdw), (xs, xsw), (out, _) = gen.arrays(
            [sig.args[i] for i in (1, 2, 3, 9)], [args[i] for i in (1, 2, 3, 9)]
        )
        t, b0, b1, g = gen.ints(sig.args[5:9], args[5:9])
        g16 = b.mul(g, i64(GROUP))
        qbase, sbase, dbase = b.mul(g16, qw), b.mul(g16, scw), b.mul(g16, dw)
        hbase = b.mul(g16, hw) if high else None
        acc = cgutils.alloca_once_value(b, ZERO)

        def lanes(plane, at):  # 16 unsigned bytes -> <16 x i32>
            return b.zext(b.load(b.bitcast(b.gep(plane, [at]), VB16P), align=1), VI)

        def load64(plane, at):
            return b.load(b.bitcast(b.gep(plane, [at]), V64B.as_pointer()), align=1)

        with cgutils.for_range(b, b.sub(b1, b0)) as loop:
            j = loop.index  # super-block b0 + j; activations are indexed from b0
            sb = b.add(b0, j)
            wbase = b.add(qbase, b.mul(sb, i64(GROUP * 128)))
            abase = b.add(b.mul(t, xw), b.mul(j, i64(256)))
            sub_base = b.add(sbase, b.mul(sb, i64(GROUP * 8)))
            xs_base = b.add(b.mul(t, xsw), b.mul(j, i64(16)))
            # the nibbles AHEAD super-blocks on: the kernel computes faster than memory
            # delivers, and the hardware's prefetch alone kept too few of its lines in
            # flight (1.07-1.33x with this; design.md)
            for o in range(0, GROUP * 128, 64):
                gen.prefetch(q, b.add(wbase, i64(GROUP * 128 * AHEAD + o)))
            isc, imn = IZERO, IZERO
            for k in range(4):
                s_lo, s_hi = IZERO, IZERO
                for c in range(8):
                    w = load64(q, b.add(wbase, i64(512 * k + 64 * c)))
                    lo, hi = b.and_(w, _bytes(15)), b.lshr(w, _bytes(4))
                    if high:
                        h = load64(hb, b.add(hbase, b.add(b.mul(sb, i64(GROUP * 32)), i64(64 * c))))
                        for n in (0, 1):
                            top = b.shl(b.and_(b.lshr(h, _bytes(2 * k + n)), _bytes(1)), _bytes(4))
                            lo, hi = (b.or_(lo, top), hi) if n == 0 else (lo, b.or_(hi, top))
                    a_lo = _splat4(gen, xq, b.add(abase, i64(64 * k + 4 * c)))
                    a_hi = _splat4(gen, xq, b.add(abase, i64(64 * k + 32 + 4 * c)))
                    s_lo = _dot4(gen, s_lo, lo, a_lo, False)
                    s_hi = _dot4(gen, s_hi, hi, a_hi, False)
                for sub, part in ((2 * k, s_lo), (2 * k + 1, s_hi)):
                    at = b.add(sub_base, i64(GROUP * sub))
                    isc = b.add(isc, b.mul(part, lanes(sc, at)))
                    halves = [
                        gen.load((xs, None), None, b.add(xs_base, i64(2 * sub + h))) for h in (0, 1)
                    ]
                    xsum = b.add(*halves)  # the sub-block's 32 from two sums of 16
                    imn = b.add(imn, b.mul(lanes(mn, at), gen.splat(xsum, VI)))
            doff = b.add(dbase, b.mul(sb, i64(GROUP)))
            dwv = _load_halves(gen, d, doff)
            dmv = _load_halves(gen, dm, doff)
            dx = gen.splat(gen.load((xd, None), None, b.add(b.mul(t, xdw), j)))
            v = gen.fma(b.sitofp(isc, VF), b.fmul(dx, dwv), b.load(acc))
            v = gen.fma(b.sitofp(imn, VF), b.fneg(b.fmul(dx, dmv)), v)
            b.store(v, acc)
        b.store(b.load(acc), b.bitcast(out, VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


Q6K_PLANES = ("uint8", "uint8", "int8", "uint16")  # q6_kx16


def _codegen_q6k(context, builder, sig, args):
    # Per super-block of 256: four runs of 64 weights (sub-blocks 2k low nibbles, 2k + 1
    # high), their 2 high bits from a plane shared by two runs; sums of 16 weights weighted
    # by their int8 scales; q is read unsigned (0..63) and the - 32 comes back as
    # 32 * sum(scale * sum of 16 activations); acc += d_x d_w * isum, as ggml's Q6_K x Q8_K.
    gen, b = Gen(context, builder), builder
    (q, qw), (hb, hw), (sc, scw), (d, dw) = gen.arrays(
        sig.args[0], cgutils.unpack_tuple(b, args[0])
    )
    (xq, xw), (xd, xdw), (xs, xsw), (out, _) = gen.arrays(
        [sig.args[i] for i in (1, 2, 3, 9)], [args[i] for i in (1, 2, 3, 9)]
    )
    t, b0, b1, g = gen.ints(sig.args[5:9], args[5:9])
    g16 = b.mul(g, i64(GROUP))
    qbase, hbase = b.mul(g16, qw), b.mul(g16, hw)
    sbase, dbase = b.mul(g16, scw), b.mul(g16, dw)
    acc = cgutils.alloca_once_value(b, ZERO)

    with cgutils.for_range(b, b.sub(b1, b0)) as loop:
        j = loop.index
        sb = b.add(b0, j)
        wbase = b.add(qbase, b.mul(sb, i64(GROUP * 128)))
        hbase_s = b.add(hbase, b.mul(sb, i64(GROUP * 64)))
        abase = b.add(b.mul(t, xw), b.mul(j, i64(256)))
        sc_base = b.add(sbase, b.mul(sb, i64(GROUP * 16)))
        xs_base = b.add(b.mul(t, xsw), b.mul(j, i64(16)))
        isc, ioff = IZERO, IZERO
        for k in range(4):
            parts = [IZERO] * 4  # groups of 16: low sub-block's two, then the high one's
            shift = 4 * (k % 2)
            for c in range(8):
                wptr = b.gep(q, [b.add(wbase, i64(512 * k + 64 * c))])
                w = b.load(b.bitcast(wptr, V64B.as_pointer()), align=1)
                hptr = b.gep(hb, [b.add(hbase_s, i64(512 * (k // 2) + 64 * c))])
                h = b.load(b.bitcast(hptr, V64B.as_pointer()), align=1)
                top_lo = b.shl(b.and_(b.lshr(h, _bytes(shift)), _bytes(3)), _bytes(4))
                top_hi = b.shl(b.and_(b.lshr(h, _bytes(shift + 2)), _bytes(3)), _bytes(4))
                lo = b.or_(b.and_(w, _bytes(15)), top_lo)
                hi = b.or_(b.lshr(w, _bytes(4)), top_hi)
                a_lo = _splat4(gen, xq, b.add(abase, i64(64 * k + 4 * c)))
                a_hi = _splat4(gen, xq, b.add(abase, i64(64 * k + 32 + 4 * c)))
                half = c // 4
                parts[half] = _dot4(gen, parts[half], lo, a_lo, False)
                parts[2 + half] = _dot4(gen, parts[2 + half], hi, a_hi, False)
            for n, part in enumerate(parts):
                grp = 4 * k + n
                scp = b.bitcast(b.gep(sc, [b.add(sc_base, i64(GROUP * grp))]), VB16P)
                scv = b.sext(b.load(scp, align=1), VI)
                isc = b.add(isc, b.mul(part, scv))
                xsum = gen.load((xs, None), None, b.add(xs_base, i64(grp)))
                ioff = b.add(ioff, b.mul(scv, gen.splat(xsum, VI)))
        isum = b.sub(isc, b.mul(ioff, ir.Constant(VI, [32] * 16)))
        doff = b.add(dbase, b.mul(sb, i64(GROUP)))
        dwv = _load_halves(gen, d, doff)
        dx = gen.splat(gen.load((xd, None), None, b.add(b.mul(t, xdw), j)))
        b.store(gen.fma(b.sitofp(isum, VF), b.fmul(dx, dwv), b.load(acc)), acc)
    b.store(b.load(acc), b.bitcast(out, VF.as_pointer()), align=4)
    return context.get_dummy_value()


@intrinsic
def _dot16(typingctx, planes, xq, xd, xs, xm, t, b0, b1, g, out):
    """out[l] = sum over blocks b in [b0, b1) of f16(d[16g+l, b]) * xd[t, b - b0] * (integer
    dot of block b of row 16g+l with xq[t, 32(b - b0):+32]) (+ f16(m[16g+l, b]) * xm[t,
    b - b0] with mins), l < 16; K-quants: blocks are super-blocks of 256 (_codegen_qk,
    _codegen_q6k)."""
    sig = types.void(planes, xq, xd, xs, xm, t, b0, b1, g, out)
    dtypes = tuple(str(p.dtype) for p in planes) if isinstance(planes, types.BaseTuple) else ()
    if dtypes in (K_PLANES, K5_PLANES, Q6K_PLANES):
        codegen = _codegen_q6k if dtypes == Q6K_PLANES else _codegen_qk(dtypes == K5_PLANES)
        return sig, codegen
    lay = _layout_of(planes)
    return None if lay is None else (sig, _codegen(lay))


@njit(cache=True, nogil=True)
def _rows(planes, xq, xd, xs, xm, out, r0, r1, b0, b1, ooff):
    tmp = np.empty(GROUP, np.float32)
    for g in range(r0 // GROUP, (r1 + GROUP - 1) // GROUP):
        lo, hi = max(GROUP * g, r0), min(GROUP * g + GROUP, r1)
        for t in range(xq.shape[0]):  # the group's weights stay in L1/L2 for the next token
            _dot16(planes, xq, xd, xs, xm, t, b0, b1, g, tmp)
            for r in range(lo, hi):
                out[t, r - ooff] = tmp[r - GROUP * g]


@njit(cache=True, nogil=True, parallel=True)
def _par(planes, xq, xd, xs, xm, out, r0, r1, b0, b1, ooff, nt):
    g0, g1 = r0 // GROUP, (r1 + GROUP - 1) // GROUP
    for c in prange(nt):
        a = g0 + (g1 - g0) * c // nt
        e = g0 + (g1 - g0) * (c + 1) // nt
        if e > a:
            _rows(planes, xq, xd, xs, xm, out, max(GROUP * a, r0), min(GROUP * e, r1), b0, b1, ooff)


class _Interleaved:
    """A weight kind of this module (module docstring): `base` is the plain kind of the same
    GGUF blocks (for dequantize), `header` the bytes of f16 scales ahead of a block's quants."""

    BLOCK = 32

    def __init__(self, base, q4: bool, mins: bool, e8m0: bool = False, high: bool = False):
        self.base, self.q4, self.mins, self.e8m0, self.high = base, q4, mins, e8m0, high
        self.KIND = base.KIND + "x16"
        self.BLOCK_BYTES = base.BLOCK_BYTES
        self.scales = 1 if e8m0 else 4 if mins else 2  # bytes of scales ahead of the quants
        self.header = self.scales + 4 * high  # Q5_0/Q5_1: then a u32 of fifth bits
        self.chunks = 4 if q4 else 8

    def from_raw(self, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        """GGUF bytes of a [rows, cols] matrix (rows a multiple of 16) -> planes."""
        if rows % GROUP:
            raise ValueError(f"{self.KIND} needs rows in multiples of {GROUP}, got {rows}")
        B, G, c, h = cols // 32, rows // GROUP, self.chunks, self.header
        blk = raw.reshape(G, GROUP, B, self.BLOCK_BYTES)
        qs = blk[..., h:].reshape(G, GROUP, B, c, 4).transpose(0, 2, 3, 1, 4)
        q = np.ascontiguousarray(qs).reshape(rows, -1)
        if not self.q4:
            q = q.view(np.int8)
        if self.e8m0:
            e = np.ascontiguousarray(blk[..., 0].transpose(0, 2, 1)).reshape(rows, B)
            return q, e
        halves = np.ascontiguousarray(blk[..., : self.scales]).view(np.uint16)  # [G, 16, B, .]
        scales = [
            np.ascontiguousarray(halves[..., k].transpose(0, 2, 1)).reshape(rows, B)
            for k in range(self.scales // 2)
        ]
        if not self.high:
            return (q, *scales)
        # bit j of the u32 is weight j's fifth bit: regroup as (i, half, c) bits, one byte per i
        bits = np.unpackbits(blk[..., self.scales : h], axis=-1, bitorder="little")
        bits = bits.reshape(G, GROUP, B, 2, 4, 4).transpose(0, 1, 2, 5, 3, 4)
        qh = np.packbits(bits.reshape(G, GROUP, B, 4, 8), axis=-1, bitorder="little")[..., 0]
        return (q, *scales, np.ascontiguousarray(qh.transpose(0, 2, 1, 3)).reshape(rows, -1))

    def to_raw(self, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        """The inverse of from_raw: GGUF bytes [rows * blocks * block bytes]."""
        q, *scales = planes
        B, G, c, h = cols // 32, rows // GROUP, self.chunks, self.header
        raw = np.empty((G, GROUP, B, self.BLOCK_BYTES), np.uint8)
        if self.high:
            *scales, qh = scales
            qh = qh.reshape(G, B, GROUP, 4, 1).transpose(0, 2, 1, 3, 4)  # [G, 16, B, i, 1]
            bits = np.unpackbits(qh, axis=-1, bitorder="little").reshape(G, GROUP, B, 4, 2, 4)
            bits = np.ascontiguousarray(bits.transpose(0, 1, 2, 4, 5, 3))
            words = bits.reshape(G, GROUP, B, 32)
            raw[..., self.scales : h] = np.packbits(words, axis=-1, bitorder="little")
        size = 1 if self.e8m0 else 2
        for k, sc in enumerate(scales):
            sg = np.ascontiguousarray(sc.reshape(G, B, GROUP).transpose(0, 2, 1))
            raw[..., size * k : size * k + size] = sg.view(np.uint8).reshape(G, GROUP, B, size)
        qs = q.view(np.uint8).reshape(G, B, c, GROUP, 4).transpose(0, 3, 1, 2, 4)
        raw[..., h:] = qs.reshape(G, GROUP, B, 4 * c)
        return raw.reshape(-1)

    def dequantize(self, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        raw = self.to_raw(planes, rows, cols)
        return self.base.dequantize(self.base.from_raw(raw, rows, cols), rows, cols)

    @staticmethod
    def quantize(x: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, ...]:
        """Columns c0..c1 of x float32 [n, K] as the activations this kind's kernel takes:
        ggml's Q8_0 (Q8_1's block sums for the kinds with mins): (xq, xd, xs, xm)."""
        return act_q8.quantize(x, c0, c1)

    def run(self, planes, x, out, r0, r1, c0, c1, xoff, ooff, nt, per_token=False) -> None:
        """out[:, r0-ooff:r1-ooff] = q8(x[:, c0-xoff:c1-xoff]) . W[r0:r1, c0:c1] on nt
        threads; every token the same way whatever the batch (`per_token` is always so)."""
        xq, xd, xs, xm = self.quantize(x, c0 - xoff, c1 - xoff)
        b0, b1 = c0 // self.BLOCK, c1 // self.BLOCK
        if nt == 1:
            _rows(planes, xq, xd, xs, xm, out, r0, r1, b0, b1, ooff)
        else:
            _par(planes, xq, xd, xs, xm, out, r0, r1, b0, b1, ooff, nt)


def k_scale_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 packed bytes of Q4_K/Q5_K's eight 6-bit scales and mins (mm_gguf.k_scales's
    inverse): [..., 8] each -> [..., 12]."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    hi = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    mix = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([lo, hi, mix], axis=-1).astype(np.uint8)


class _InterleavedK:
    """Q4_K (and Q5_K, `high`) against Q8_K activations: planes q uint8 [N, 128S] (flat per
    group [S, 4, 8, 16, 4]: byte 4c+i of the k-th 32-byte run of super-block s, row 16g+l);
    Q5_K: qh uint8 [N, 32S] (flat [S, 8, 16, 4]: GGUF's fifth-bit byte of weight 4c+i, bit j
    for sub-block j); sc and mn uint8 [N, 8S] (flat [S, 8, 16]: the 6-bit scale and min of
    each sub-block), d and dmin uint16 [N, S] (flat [S, 16]); 4 bytes per 256 weights more
    than GGUF (the scales unpacked, as the float kernels' planes hold them)."""

    BLOCK = 256

    def __init__(self, base, high: bool) -> None:
        self.base, self.high = base, high
        self.KIND, self.BLOCK_BYTES = base.KIND + "x16", base.BLOCK_BYTES

    def from_raw(self, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        if rows % GROUP:
            raise ValueError(f"{self.KIND} needs rows in multiples of {GROUP}, got {rows}")
        S, G = cols // 256, rows // GROUP
        blk = raw.reshape(G, GROUP, S, self.BLOCK_BYTES)

        def grouped(a: np.ndarray) -> np.ndarray:  # [G, 16, S, ...] -> [N, S * ...] by group
            order = (0, 2, *range(3, a.ndim - 1), 1, a.ndim - 1)
            return np.ascontiguousarray(a.transpose(order)).reshape(rows, -1)

        halves = np.ascontiguousarray(blk[..., :4]).view(np.uint16)  # [G, 16, S, 2]
        sc, mn = mm_gguf.k_scales(blk[..., 4:16])  # [G, 16, S, 8]
        q = grouped(blk[..., -128:].reshape(G, GROUP, S, 4, 8, 4))
        high = (grouped(blk[..., 16:48].reshape(G, GROUP, S, 8, 4)),) if self.high else ()
        d, dmin = (grouped(halves[..., k : k + 1]) for k in (0, 1))
        return (q, *high, grouped(sc[..., None]), grouped(mn[..., None]), d, dmin)

    def to_raw(self, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        """The inverse of from_raw: GGUF bytes [rows * super-blocks * block bytes]."""
        q, *high, sc, mn, d, dmin = planes
        S, G = cols // 256, rows // GROUP

        def rowwise(a: np.ndarray, *inner: int) -> np.ndarray:  # [G, 16, S, *inner]
            a = a.reshape(G, S, *inner[:-1], GROUP, inner[-1])
            order = (0, a.ndim - 2, 1, *range(2, a.ndim - 2), a.ndim - 1)
            return a.transpose(order)

        raw = np.empty((G, GROUP, S, self.BLOCK_BYTES), np.uint8)
        raw[..., 0:2] = rowwise(d, 1).copy().view(np.uint8).reshape(G, GROUP, S, 2)
        raw[..., 2:4] = rowwise(dmin, 1).copy().view(np.uint8).reshape(G, GROUP, S, 2)
        scales = rowwise(sc, 8, 1)[..., 0]
        mins = rowwise(mn, 8, 1)[..., 0]
        raw[..., 4:16] = k_scale_bytes(scales, mins)
        if high:
            raw[..., 16:48] = rowwise(high[0], 8, 4).reshape(G, GROUP, S, 32)
        raw[..., -128:] = rowwise(q, 4, 8, 4).reshape(G, GROUP, S, 128)
        return raw.reshape(-1)

    def dequantize(self, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        raw = self.to_raw(planes, rows, cols)
        return self.base.dequantize(self.base.from_raw(raw, rows, cols), rows, cols)

    @staticmethod
    def quantize(x: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, ...]:
        """As _Interleaved.quantize, as ggml's Q8_K: (xq, xd, xs, xd) (no mins to pair)."""
        xq, xd, xs = act_q8.quantize_k(x, c0, c1)
        return xq, xd, xs, xd

    run = _Interleaved.run


def _q6_values(blk: np.ndarray) -> np.ndarray:
    """GGUF Q6_K blocks [..., 210] -> their 6-bit q (0..63) [..., 256], in weight order."""
    ql, qh = blk[..., :128], blk[..., 128:192]
    out = []
    for n in (0, 1):
        lo, hi = ql[..., 64 * n : 64 * n + 64], qh[..., 32 * n : 32 * n + 32]
        for m, (src, shift) in enumerate(((0, 0), (32, 0), (0, 4), (32, 4))):
            nib = (lo[..., src : src + 32] >> shift) & 15
            out.append(nib | (((hi >> (2 * m)) & 3) << 4))
    return np.concatenate(out, axis=-1)


def _q6_blocks(v: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The inverse of _q6_values, with the int8 scales [..., 16] and f16 bits d [...]."""
    blk = np.empty((*v.shape[:-1], 210), np.uint8)
    for n in (0, 1):
        part = v[..., 128 * n : 128 * n + 128].reshape(*v.shape[:-1], 4, 32)
        blk[..., 64 * n : 64 * n + 32] = (part[..., 0, :] & 15) | ((part[..., 2, :] & 15) << 4)
        blk[..., 64 * n + 32 : 64 * n + 64] = (part[..., 1, :] & 15) | ((part[..., 3, :] & 15) << 4)
        top = sum(((part[..., m, :] >> 4) & 3) << (2 * m) for m in range(4))
        blk[..., 128 + 32 * n : 160 + 32 * n] = top
    blk[..., 192:208] = scales.view(np.uint8)
    blk[..., 208:210] = d[..., None].view(np.uint8)
    return blk


class _InterleavedQ6K:
    """Q6_K against Q8_K activations: planes nib uint8 [N, 128S] (flat per group [S, 4, 8,
    16, 4]: low 4 bits of weights 64k+4c+i | of 64k+32+4c+i << 4), hb uint8 [N, 64S] (flat
    [S, 2, 8, 16, 4]: the top 2 bits of weights 128k+32m+4c+i at bits 2m), sc int8 [N, 16S]
    (flat [S, 16, 16]: the scale of each 16 weights), d uint16 [N, S] (flat [S, 16]):
    exactly GGUF-sized."""

    KIND, BLOCK, BLOCK_BYTES = "q6_kx16", 256, 210
    base = mm_gguf.Q6_K

    def from_raw(self, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        if rows % GROUP:
            raise ValueError(f"{self.KIND} needs rows in multiples of {GROUP}, got {rows}")
        S, G = cols // 256, rows // GROUP
        blk = raw.reshape(G, GROUP, S, 210)
        v = _q6_values(blk)  # [G, 16, S, 256]
        runs = v.reshape(G, GROUP, S, 4, 2, 8, 4)
        nib = (runs[..., 0, :, :] & 15) | ((runs[..., 1, :, :] & 15) << 4)  # [G, 16, S, 4, 8, 4]
        tops = ((v >> 4) & 3).reshape(G, GROUP, S, 2, 4, 8, 4)
        hb = sum(tops[..., m, :, :] << (2 * m) for m in range(4)).astype(np.uint8)

        def grouped(a: np.ndarray) -> np.ndarray:  # [G, 16, S, ...] -> [N, ...] by group
            order = (0, 2, *range(3, a.ndim - 1), 1, a.ndim - 1)
            return np.ascontiguousarray(a.transpose(order)).reshape(rows, -1)

        scales = np.ascontiguousarray(blk[..., 192:208]).view(np.int8)  # [G, 16, S, 16]
        d = np.ascontiguousarray(blk[..., 208:210]).view(np.uint16)[..., 0]  # [G, 16, S]
        sc_planes = np.ascontiguousarray(scales.transpose(0, 2, 3, 1)).reshape(rows, -1)
        d_plane = np.ascontiguousarray(d.transpose(0, 2, 1)).reshape(rows, -1)
        return grouped(nib), grouped(hb), sc_planes, d_plane

    def to_raw(self, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        nib, hb, sc, d = planes
        S, G = cols // 256, rows // GROUP
        nib = nib.reshape(G, S, 4, 8, GROUP, 4).transpose(0, 4, 1, 2, 3, 5)  # [G, 16, S, 4, 8, 4]
        hb = hb.reshape(G, S, 2, 8, GROUP, 4).transpose(0, 4, 1, 2, 3, 5)  # [G, 16, S, 2, 8, 4]
        low = np.stack([nib & 15, nib >> 4], axis=4)  # [G, 16, S, 4, 2, 8, 4]
        top = np.stack([(hb >> (2 * m)) & 3 for m in range(4)], axis=4)  # [G, 16, S, 2, 4, 8, 4]
        v = low.reshape(G, GROUP, S, 256) | (top.reshape(G, GROUP, S, 256) << 4)
        scales = sc.reshape(G, S, 16, GROUP).transpose(0, 3, 1, 2)
        dd = d.reshape(G, S, GROUP).transpose(0, 2, 1)
        return _q6_blocks(v, np.ascontiguousarray(scales), np.ascontiguousarray(dd)).reshape(-1)

    def dequantize(self, planes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
        raw = self.to_raw(planes, rows, cols)
        return self.base.dequantize(self.base.from_raw(raw, rows, cols), rows, cols)

    quantize, run = staticmethod(_InterleavedK.quantize), _Interleaved.run


Q4_0X16 = _Interleaved(mm_q4_0, True, False)
Q8_0X16 = _Interleaved(mm_q8_0, False, False)
Q4_1X16 = _Interleaved(mm_gguf.Q4_1, True, True)
MXFP4X16 = _Interleaved(mm_gguf.MXFP4, True, False, e8m0=True)
Q5_0X16 = _Interleaved(mm_gguf.Q5_0, True, False, high=True)
Q5_1X16 = _Interleaved(mm_gguf.Q5_1, True, True, high=True)
Q4_KX16 = _InterleavedK(mm_gguf.Q4_K, False)
Q5_KX16 = _InterleavedK(mm_gguf.Q5_K, True)
Q6_KX16 = _InterleavedQ6K()
KINDS = (Q4_0X16, Q8_0X16, Q4_1X16, Q5_0X16, Q5_1X16, MXFP4X16, Q4_KX16, Q5_KX16, Q6_KX16)
