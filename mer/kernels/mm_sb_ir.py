# Dimensions: N = rows, K = cols, U = K/32 units of 32 weights per row, u = unit index,
# i = vector lane 0..15.
#
# LLVM IR building blocks (used by the numba intrinsics of mm_sb_dot) for the sub-block kinds
# of mm_gguf. Every kind stores a row as 16 nibble bytes per unit (byte i: weight i low,
# weight 16+i high, GGUF's Q4_1 order), optional high-bit words and per-kind scale planes;
# `unit` decodes one unit to two <16 x float> vectors (weights i and 16+i). The plane tuple's
# dtypes name the kind (SPECS). A kind with a `table` (MXFP4) maps each nibble through 16
# values instead of taking it as the integer itself.
from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32, I8, I32, I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
VF, VI, VB = ir.VectorType(F32, 16), ir.VectorType(I32, 16), ir.VectorType(I8, 16)
ZERO = ir.Constant(VF, [0.0] * 16)
NIBBLES = ir.Constant(VF, [float(i) for i in range(16)])
SIXTEEN = ir.Constant(VF, [16.0] * 16)
# vpermps turns a nibble into its float in one instruction (it reads only the low 4 index
# bits) instead of mask + convert; other targets (or a pinned NUMBA_CPU_NAME) take the
# portable path.
PERM = numba.config.CPU_NAME is None and llvm.get_host_cpu_features().get("avx512f", False)

# MXFP4's nibbles: E2M1 floats, doubled to integers (its scales are halved to match).
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


class Spec(NamedTuple):
    kind: str
    high: int  # high bits per weight, beyond the nibble
    offset: int  # subtracted from q
    spu: int  # scales per unit
    mins: bool  # whether fill writes a min per unit (W = s * q + m), else W = s * q
    table: tuple[int, ...] | None = None  # the value of each nibble, None: the nibble itself


# Plane dtypes -> Spec.
SPECS = {
    ("uint8", "uint16", "uint16"): Spec("q4_1", 0, 0, 1, True),
    ("uint8", "uint32", "uint16"): Spec("q5_0", 1, 0, 1, True),
    ("uint8", "uint32", "uint16", "uint16"): Spec("q5_1", 1, 0, 1, True),
    ("uint8", "uint8", "uint8", "uint16", "uint16"): Spec("q4_k", 0, 0, 1, True),
    ("uint8", "uint32", "uint8", "uint8", "uint16", "uint16"): Spec("q5_k", 1, 0, 1, True),
    ("uint8", "uint32", "int8", "uint16"): Spec("q6_k", 2, 32, 2, False),
    ("uint8", "uint8"): Spec("mxfp4", 0, 0, 1, False, MXFP4_VALUES),
}


def spec_of(planes) -> Spec | None:
    """The SPECS entry of a numba plane-tuple type, None if it is not one."""
    if not isinstance(planes, types.BaseTuple) or not all(
        isinstance(p, types.Array) and p.layout == "C" for p in planes
    ):
        return None
    return SPECS.get(tuple(str(p.dtype) for p in planes))


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def vi(vals) -> ir.Constant:
    return ir.Constant(VI, list(vals))


# Rotations moving the high bits of lane i's weight to bit 4: one vprorvd per vector.
ROT1 = (vi((i - 4) % 32 for i in range(16)), vi((i + 12) % 32 for i in range(16)))
ROT2 = vi((2 * i - 4) % 32 for i in range(16))


class Gen:
    """One builder's helpers: element/vector loads from C-contiguous arrays, splats, calls.
    An array is (data pointer, row width or None for 1-D)."""

    def __init__(self, context, builder):
        self.c, self.b = context, builder

    def arrays(self, tys, vals) -> list[tuple]:
        out = []
        for ty, v in zip(tys, vals, strict=True):
            a = self.c.make_array(ty)(self.c, self.b, v)
            width = cgutils.unpack_tuple(self.b, a.shape)[-1] if ty.ndim > 1 else None
            out.append((a.data, width))
        return out

    def ints(self, sig_args, args) -> list:
        return [self.c.cast(self.b, v, t, types.intp) for v, t in zip(args, sig_args, strict=True)]

    def ptr(self, arr, row, idx, vty=None):
        data, width = arr
        off = idx if width is None else self.b.add(self.b.mul(row, width), idx)
        p = self.b.gep(data, [off])
        return p if vty is None else self.b.bitcast(p, vty.as_pointer())

    def load(self, arr, row, idx, vty=None):
        return self.b.load(self.ptr(arr, row, idx, vty), align=1 if vty else None)

    def splat(self, v, vty=VF):
        one = self.b.insert_element(ir.Constant(vty, None), v, ir.Constant(I32, 0))
        mask = ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count)
        return self.b.shuffle_vector(one, ir.Constant(vty, None), mask)

    def shuffle(self, a, b, idx: list):
        return self.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, len(idx)), idx))

    def call(self, name: str, ty, args: list):
        fnty = ir.FunctionType(ty, [a.type for a in args])
        return self.b.call(cgutils.get_or_insert_function(self.b.module, fnty, name), args)

    def fma(self, a, x, y):
        name = "llvm.fmuladd.v16f32" if a.type == VF else "llvm.fmuladd.f32"
        return self.call(name, a.type, [a, x, y])

    def prefetch(self, data, idx) -> None:
        ptr = self.b.bitcast(self.b.gep(data, [idx]), I8.as_pointer())
        args = [ptr] + [ir.Constant(I32, v) for v in (0, 2, 1)]  # read, keep in L2+, data
        self.call("llvm.prefetch.p0", ir.VoidType(), args)

    def h2f(self, v):
        return self.b.fpext(self.b.bitcast(v, ir.HalfType()), F32)

    def rotr(self, v, amounts):
        return self.call("llvm.fshr.v16i32", VI, [v, v, amounts])


def lookup(gen: Gen, table: ir.Constant, idx) -> ir.Value:
    """<16 x i8> table[idx[i]] (lanes of idx < 16), written lane by lane: the shape LLVM turns
    into one variable byte shuffle (pshufb, tbl) on targets that have one."""
    b, out = gen.b, ir.Constant(VB, None)
    for i in range(16):
        lane = ir.Constant(I32, i)
        out = b.insert_element(out, b.extract_element(table, b.extract_element(idx, lane)), lane)
    return out


def _table_unit(gen: Gen, table: tuple, raw) -> tuple:
    # vpermps reads only the low 4 index bits, so a float table turns each nibble into its
    # value in one instruction, as for the integer kinds; elsewhere the lookup runs on the
    # bytes themselves (16 per shuffle), then sign-extends and converts.
    b = gen.b
    if PERM:
        v = b.zext(raw, VI)
        ftable, perm = ir.Constant(VF, [float(t) for t in table]), "llvm.x86.avx512.permvar.sf.512"
        return tuple(gen.call(perm, VF, [ftable, q]) for q in (v, b.lshr(v, vi([4] * 16))))
    btable = ir.Constant(VB, list(table))
    lo = b.and_(raw, ir.Constant(VB, [15] * 16))
    hi = b.lshr(raw, ir.Constant(VB, [4] * 16))
    return b.sitofp(lookup(gen, btable, lo), VF), b.sitofp(lookup(gen, btable, hi), VF)


def unit(gen: Gen, spec: Spec, p: list, r, u) -> tuple:
    """Weights of unit u of row r, before scaling, as two <16 x float> (lanes i and 16+i)."""
    b, high, offset = gen.b, spec.high, spec.offset
    raw = gen.load(p[0], r, b.mul(u, i64(16)), VB)
    if spec.table is not None:
        return _table_unit(gen, spec.table, raw)
    v = b.zext(raw, VI)
    hi = b.lshr(v, vi([4] * 16))
    if high < 2 and PERM:
        perm = "llvm.x86.avx512.permvar.sf.512"
        lo, hi = gen.call(perm, VF, [NIBBLES, v]), gen.call(perm, VF, [NIBBLES, hi])
        if high == 1:  # the fifth bits as lane masks (a kmov each): +16 where set
            h = gen.load(p[1], r, u)
            for k, word in enumerate((h, b.lshr(h, ir.Constant(I32, 16)))):
                mask = b.bitcast(b.trunc(word, ir.IntType(16)), ir.VectorType(ir.IntType(1), 16))
                if k == 0:
                    lo = b.select(mask, b.fadd(lo, SIXTEEN), lo)
                else:
                    hi = b.select(mask, b.fadd(hi, SIXTEEN), hi)
        return lo, hi
    lo = b.and_(v, vi([15] * 16))
    if high == 1:  # one u32 per unit, bit i = fifth bit of weight i
        h = gen.splat(gen.load(p[1], r, u), VI)
        lo = b.or_(lo, b.and_(gen.rotr(h, ROT1[0]), vi([16] * 16)))
        hi = b.or_(hi, b.and_(gen.rotr(h, ROT1[1]), vi([16] * 16)))
    elif high == 2:  # two u32 per unit, bits 2i, 2i+1 = bits 4, 5 of weight i (then 16+i)
        u2 = b.mul(u, i64(2))
        h0, h1 = (gen.splat(gen.load(p[1], r, b.add(u2, i64(w))), VI) for w in (0, 1))
        lo = b.or_(lo, b.and_(gen.rotr(h0, ROT2), vi([48] * 16)))
        hi = b.or_(hi, b.and_(gen.rotr(h1, ROT2), vi([48] * 16)))
    if offset:
        lo, hi = b.sub(lo, vi([offset] * 16)), b.sub(hi, vi([offset] * 16))
    return b.sitofp(lo, VF), b.sitofp(hi, VF)


def _make_expand(per: int):
    vq, vf = ir.VectorType(I8, per), ir.VectorType(F32, per)

    @intrinsic
    def expand(typingctx, d, sc, f0, n, out, sign):
        """out[i] = sign * d[(f0 + i) / per] * sc[f0 + i] for i < n (1-D arrays, f0 and n
        multiples of per): K-quant scales, one f16 per run of `per` small integers."""

        def codegen(context, builder, sig, args):
            gen, b = Gen(context, builder), builder
            dd, ss, oo = gen.arrays([sig.args[i] for i in (0, 1, 4)], [args[i] for i in (0, 1, 4)])
            f0, n = gen.ints(sig.args[2:4], args[2:4])
            convert = b.sitofp if sig.args[1].dtype.signed else b.uitofp
            with cgutils.for_range(b, b.sdiv(n, i64(per))) as loop:
                dv = gen.h2f(gen.load(dd, None, b.add(b.sdiv(f0, i64(per)), loop.index)))
                off = b.mul(loop.index, i64(per))
                q = convert(gen.load(ss, None, b.add(f0, off), vq), vf)
                w = b.fmul(gen.splat(b.fmul(args[5], dv), vf), q)
                b.store(w, gen.ptr(oo, None, off, vf), align=4)
            return context.get_dummy_value()

        return types.void(d, sc, f0, n, out, types.float32), codegen

    return expand


expand8, expand16 = _make_expand(8), _make_expand(16)
