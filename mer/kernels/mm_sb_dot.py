# Dimensions: U = units of 32 weights per row, [g0, g1) = units of the column range,
# j = u - g0, k = row slot in the scale buffers sb [rb, nb or 2nb], mb [rb, nb], t = token.
#
# The two loops of the sub-block kinds as numba intrinsics (mm_sb_ir has the pieces).
# numba's autovectorizer would need a horizontal sum per 32-weight unit, so the loops are
# written with explicit vector types: lanes run over a unit's weights, one accumulator per
# row stays in a register across the row, and the four rows of a pass share one merged
# horizontal sum at the end. The scales come pre-expanded to float32 (mm_gguf.fill), one
# broadcast load per unit; min terms are m * (sum of the unit's x), one scalar FMA per unit.
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .mm_sb_ir import F32, VF, ZERO, Gen, Spec, i64, spec_of, unit

NROWS = 4  # rows per pass: they share every x load and the loop overhead
# The dot loop prefetches one line per unit, at least a pass and PF_AHEAD bytes ahead in the
# nibble plane, i.e. a pass's worth of lines per pass: decode walks many short rows, on which
# the hardware prefetcher ramps up too late (4 KB ~ DRAM latency x bandwidth, with margin).
PF_AHEAD = 4096


def _scales(gen: Gen, spec: Spec, sb, mb, k, j) -> tuple:
    """(s for lanes 0-15, s for lanes 16-31, m) of unit j; Q6_K has two scales and no m,
    MXFP4 one scale and no m."""
    b = gen.b
    if spec.spu == 1:
        s = gen.load(sb, k, j)
        return s, s, gen.load(mb, k, j) if spec.mins else None
    j2 = b.mul(j, i64(2))
    return gen.load(sb, k, j2), gen.load(sb, k, b.add(j2, i64(1))), None


def _hsums(gen: Gen, vs: list) -> list:
    """Lane sums of 2^k <16 x float>: pairs merge into vectors of half-size groups (one add
    serves two rows), then the last vector halves its groups down to one lane each."""
    b, w = gen.b, 16
    while len(vs) > 1:
        g, h = 16 // w, w // 2
        lo = [q * w + i + o for o in (0, 16) for q in range(g) for i in range(h)]
        hi = [i + h for i in lo]
        pairs = zip(vs[::2], vs[1::2], strict=True)
        vs = [b.fadd(gen.shuffle(x, y, lo), gen.shuffle(x, y, hi)) for x, y in pairs]
        w = h
    (v,), n = vs, 16
    while w > 1:
        h = w // 2
        lo = [q * w + i for q in range(n // w) for i in range(h)]
        v = b.fadd(gen.shuffle(v, v, lo), gen.shuffle(v, v, [i + h for i in lo]))
        n, w = n // 2, h
    return [b.extract_element(v, ir.Constant(ir.IntType(32), i)) for i in range(n)]


def _dot_codegen(spec: Spec):
    def codegen(context, builder, sig, args):
        gen, b = Gen(context, builder), builder
        p = gen.arrays(sig.args[0], cgutils.unpack_tuple(b, args[0]))
        x, xs, sb, mb = gen.arrays(sig.args[1:5], args[1:5])
        t, g0, g1, xoff, r, k, last = gen.ints(sig.args[5:], args[5:])
        # rows r + q, q < NROWS, clamped to r + last: a short tail repeats its last row
        offs = [i64(0)] + [
            b.select(b.icmp_signed(">", i64(q), last), last, i64(q)) for q in (1, 2, 3)
        ]
        rows, slots = [b.add(r, o) for o in offs], [b.add(k, o) for o in offs]
        acc = [cgutils.alloca_once_value(b, ZERO) for _ in rows]
        accm = [cgutils.alloca_once_value(b, ir.Constant(F32, 0.0)) for _ in rows]
        data, width = p[0]
        start = b.add(b.mul(r, width), b.mul(g0, i64(16)))
        ahead = b.mul(width, i64(NROWS))
        ahead = b.select(b.icmp_signed(">", ahead, i64(PF_AHEAD)), ahead, i64(PF_AHEAD))
        with cgutils.for_range(b, b.sub(g1, g0)) as loop:
            j = loop.index
            u = b.add(g0, j)
            gen.prefetch(data, b.add(b.add(start, ahead), b.mul(j, i64(64))))
            col = b.sub(b.mul(u, i64(32)), xoff)
            xlo, xhi = gen.load(x, t, col, VF), gen.load(x, t, b.add(col, i64(16)), VF)
            xsum = gen.load(xs, t, j)
            for row, slot, a, am in zip(rows, slots, acc, accm, strict=True):
                qlo, qhi = unit(gen, spec, p, row, u)
                s0, s1, m = _scales(gen, spec, sb, mb, slot, j)
                if s0 is s1:
                    v = gen.fma(gen.splat(s0), gen.fma(qhi, xhi, b.fmul(qlo, xlo)), b.load(a))
                else:
                    v = gen.fma(gen.splat(s0), b.fmul(qlo, xlo), b.load(a))
                    v = gen.fma(gen.splat(s1), b.fmul(qhi, xhi), v)
                b.store(v, a)
                if m is not None:
                    b.store(gen.fma(m, xsum, b.load(am)), am)
        sums = _hsums(gen, [b.load(a) for a in acc])
        sums = [b.fadd(v, b.load(am)) for v, am in zip(sums, accm, strict=True)]
        return context.make_tuple(b, sig.return_type, sums)

    return codegen


@intrinsic
def dot4(typingctx, planes, x, xs, sb, mb, t, g0, g1, xoff, r, k, last):
    """For rows r + q (scale slot k + q), q <= last < 4: sum over units u in [g0, g1) of
    s * (q[row, u] . x[t, 32u - xoff : +32]) + m * xs[t, u - g0], s, m from sb, mb at u - g0
    (xs = unit sums of x). Returns 4 float32; rows past `last` repeat row r + last."""
    spec = spec_of(planes)
    if spec is None:
        return None
    sig = types.UniTuple(types.float32, NROWS)(planes, x, xs, sb, mb, t, g0, g1, xoff, r, k, last)
    return sig, _dot_codegen(spec)


@intrinsic
def deq(typingctx, planes, sb, mb, r, k, ub, u0, u1, dst):
    """dst[32 (u - u0) + i] = s * q[r, u, i] + m for units u in [u0, u1), s, m from slot k of
    sb, mb at u - ub; dst 1-D float32 (the row tile of the n > 1 path)."""
    spec = spec_of(planes)
    if spec is None:
        return None

    def codegen(context, builder, sig, args):
        gen, b = Gen(context, builder), builder
        p = gen.arrays(sig.args[0], cgutils.unpack_tuple(b, args[0]))
        sb, mb, out = gen.arrays(sig.args[1:3] + sig.args[8:], args[1:3] + args[8:])
        r, k, ub, u0, u1 = gen.ints(sig.args[3:8], args[3:8])
        with cgutils.for_range(b, b.sub(u1, u0)) as loop:
            u = b.add(u0, loop.index)
            qlo, qhi = unit(gen, spec, p, r, u)
            s0, s1, m = _scales(gen, spec, sb, mb, k, b.sub(u, ub))
            mv = ZERO if m is None else gen.splat(m)
            col = b.mul(loop.index, i64(32))
            b.store(gen.fma(gen.splat(s0), qlo, mv), gen.ptr(out, None, col, VF), align=4)
            hi_ptr = gen.ptr(out, None, b.add(col, i64(16)), VF)
            b.store(gen.fma(gen.splat(s1), qhi, mv), hi_ptr, align=4)
        return context.get_dummy_value()

    return types.void(planes, sb, mb, r, k, ub, u0, u1, dst), codegen
