# Dimensions: E = experts in the call, T = tokens of all of them together, D = model width,
# I = an expert's intermediate width, U = units of work (an item's group of 16 rows).
#
# Many products of one layer in one kernel call, for the row-interleaved integer kinds
# (mm_x16). Four or more products of one kind and width, of one input or of several inputs
# against weights of one shape (DeepSeek's per-head products), share one activation
# quantization and one call (run_products). In a mixture-of-experts layer (run_experts) the
# tokens routed to each expert are laid one after another and their activations quantized
# once (gate and up share them; down's are every expert's SwiGLU outputs, quantized
# together); one parallel call runs every expert's gate and up rows, another every expert's
# down rows. Per expert and product, separate calls cost a numba dispatch, a thread launch
# and an activation quantization each: on a Qwen3-shaped layer (8 experts of 768 x 2048 per
# token) that overhead is as large as the weights' own reading.
#
# Each token's row is computed by the same _dot16 as mm_x16's own calls with the same
# quantized activations (quantization is per token), so the outputs are bit-identical to
# running the experts one by one, and a token's row does not depend on its batch.
#
# The experts' weights are separate arrays (a layer's GGUF tensor repacked, or a store's):
# the kernel takes the first one's planes as the template of their types and every item's
# plane addresses, and views each item's planes in place (_rebase).
from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core import cgutils
from numba.extending import intrinsic

from . import matmul as mm
from .mm_x16 import GROUP, _dot16
from .swiglu import activate, add_down_bias


@intrinsic
def _rebase(typingctx, planes, addrs, i):
    """The plane tuple `planes` with each array's data at addrs[i, k] instead (same shapes
    and strides), owning nothing."""
    sig = planes(planes, addrs, i)

    def codegen(context, builder, sig, args):
        tup, arr, idx = args
        a = context.make_array(sig.args[1])(context, builder, arr)
        width = cgutils.unpack_tuple(builder, a.shape)[1]
        row = builder.mul(context.cast(builder, idx, sig.args[2], sig.args[1].dtype), width)
        out = tup
        for k, ty in enumerate(sig.args[0]):
            plane = context.make_array(ty)(context, builder, builder.extract_value(tup, k))
            at = builder.load(builder.gep(a.data, [builder.add(row, row.type(k))]))
            plane.data = builder.inttoptr(at, plane.data.type)
            plane.meminfo = cgutils.get_null_value(plane.meminfo.type)
            plane.parent = cgutils.get_null_value(plane.parent.type)
            out = builder.insert_value(out, plane._getvalue(), k)
        return out

    return sig, codegen


@njit(cache=True, nogil=True)
def _units(planes, addrs, xq, xd, xs, xm, tok0, tok1, col0, first, out, b1, u0, u1):
    # units u0..u1: item i's groups are units first[i].., items in order
    tmp = np.empty(GROUP, np.float32)
    i = 0
    for u in range(u0, u1):
        while i + 1 < len(first) and u >= first[i + 1]:
            i += 1
        g = u - first[i]
        p = _rebase(planes, addrs, i)
        c = col0[i] + GROUP * g
        for t in range(tok0[i], tok1[i]):  # the group's weights stay in L1/L2 for each token
            _dot16(p, xq, xd, xs, xm, t, 0, b1, g, tmp)
            for r in range(GROUP):
                out[t, c + r] = tmp[r]


@njit(cache=True, nogil=True, parallel=True)
def _units_par(planes, addrs, xq, xd, xs, xm, tok0, tok1, col0, first, out, b1, units, nt):
    for c in prange(nt):
        u0, u1 = units * c // nt, units * (c + 1) // nt
        _units(planes, addrs, xq, xd, xs, xm, tok0, tok1, col0, first, out, b1, u0, u1)


def _run(weights: list, q: tuple, tok0, tok1, col0, out, work: int, threads=None) -> None:
    """out[tok0[i]:tok1[i], col0[i]:+rows_i] = activations q (quantized, of every token)
    against weights[i], for weights of one kind and width; `work`: the multiply-adds; on
    `threads` if given, else as the thread policy says."""
    w0 = weights[0]
    addrs = np.array([w.addresses for w in weights], np.int64)
    groups = [w.rows // GROUP for w in weights]
    units = sum(groups)
    first = np.cumsum([0, *groups[:-1]])
    xq, xd, xs, xm = q
    b1 = w0.cols // w0.block_size
    args = (w0.planes, addrs, xq, xd, xs, xm, tok0, tok1, col0, first, out, b1)

    def call(nt: int) -> None:
        if nt == 1:
            _units(*args, 0, units)
        else:
            _units_par(*args, units, nt)

    if threads is not None:
        call(threads)
    else:
        key = ("grouped", w0.kind, w0.cols, units.bit_length(), len(xq).bit_length())
        mm.run_policed(key, work, call)


def _quantize(kind: str, x: np.ndarray) -> tuple:
    return mm._kind(kind).quantize(x, 0, x.shape[1])


def applies(experts: list) -> bool:
    """Whether run_experts can take these experts together: more than one (one expert's
    separate calls cost no more), integer kinds, gate and up of one kind, every expert of
    the first one's kinds and shapes."""
    if len(experts) < 2:
        return False
    f = experts[0]
    kinds = (f.gate.kind, f.up.kind, f.down.kind)
    if kinds[0] not in mm._PLAIN or kinds[1] != kinds[0] or kinds[2] not in mm._PLAIN:
        return False
    shape = (f.gate.rows, f.gate.cols, f.up.rows, f.down.rows, f.down.cols)
    return all(
        (e.gate.kind, e.up.kind, e.down.kind) == kinds
        and (e.gate.rows, e.gate.cols, e.up.rows, e.down.rows, e.down.cols) == shape
        for e in experts
    )


def run_experts(experts: list, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Each expert's whole output float32 [n_i, D] for its tokens xs[i] float32 [n_i, D]
    (ExpertWeights, biases and clamp included), bit-identical to swiglu.run_expert of each;
    the experts must be ones `applies` takes."""
    ends = np.cumsum([len(x) for x in xs], dtype=np.int64)
    starts = ends - np.array([len(x) for x in xs], np.int64)
    y = run_grouped(experts, np.concatenate(xs), starts, ends)
    return [y[a:b] for a, b in zip(starts, ends, strict=True)]


def run_grouped(experts: list, x: np.ndarray, starts, ends, threads=None) -> np.ndarray:
    """The outputs float32 [R, D] of experts[i] for their tokens, rows starts[i]..ends[i] of
    x float32 [R, D] C-contiguous, as run_experts (`threads`: as _run)."""
    f = experts[0]
    inter, dim = f.gate.rows, f.gate.cols
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    # one call for every gate and up: columns 0.. of gu the gates, inter.. the ups
    gu = np.empty((len(x), 2 * inter), np.float32)
    pairs = [w for e in experts for w in (e.gate, e.up)]
    col0 = np.array([0, inter] * len(experts), np.int64)
    work = 2 * inter * dim * len(x)  # each token: its expert's gate and up
    q = _quantize(f.gate.kind, x)
    _run(pairs, q, starts.repeat(2), ends.repeat(2), col0, gu, work, threads)
    g, u = gu[:, :inter], gu[:, inter:]
    if f.bias is None and not f.limit:
        activate(f, g, u, 0)
    else:
        for e, a, b in zip(experts, starts, ends, strict=True):
            activate(e, g[a:b], u[a:b], 0)
    y = np.empty((len(x), dim), np.float32)
    q = _quantize(f.down.kind, np.ascontiguousarray(g))
    col0 = np.zeros(len(experts), np.int64)
    _run([e.down for e in experts], q, starts, ends, col0, y, inter * dim * len(x), threads)
    if f.bias is not None:
        for e, a, b in zip(experts, starts, ends, strict=True):
            add_down_bias(e, y[a:b])
    return y


# Fewer products than this run as separate calls: a grouped call's own bookkeeping costs about
# what two or three separate calls' dispatch and quantization cost (SmolLM2's query, key and
# value products measure no faster together).
FUSE_MIN = 4


def fusable(pairs: list[tuple[mm.PackedWeight, np.ndarray]]) -> bool:
    """Whether run_products can take these (weight, x) products together: FUSE_MIN or more, the
    weights of one integer kind and width, and either every x the same array or every
    weight of the same height (DeepSeek's per-head products, say)."""
    if len(pairs) < FUSE_MIN:
        return False
    w0, x0 = pairs[0]
    if w0.kind not in mm._PLAIN or any(w.kind != w0.kind or w.cols != w0.cols for w, _ in pairs):
        return False
    return all(x is x0 for _, x in pairs) or all(w.rows == w0.rows for w, _ in pairs)


def run_products(pairs: list[tuple[mm.PackedWeight, np.ndarray]], threads=None) -> list:
    """x @ W.T of each pair ones `fusable` takes, the activations quantized once and every
    product in one call; bit-identical to matmul of each (`threads`: as _run). One input
    (a layer's query, key and value products): its tokens against every weight, side by
    side in the output's columns. Several: each input's tokens, laid one after another,
    against its own weight."""
    weights = [w for w, _ in pairs]
    for w, x in pairs:
        mm._check_x(x, w.cols, "products")
    n = len(weights)
    x = pairs[0][1]
    if all(p[1] is x for p in pairs):
        rows = np.array([w.rows for w in weights], np.int64)
        col0 = np.cumsum(rows) - rows
        out = np.empty((len(x), int(rows.sum())), np.float32)
        tok0, tok1 = np.zeros(n, np.int64), np.full(n, len(x), np.int64)
        work = weights[0].cols * out.size
        _run(weights, _quantize(weights[0].kind, x), tok0, tok1, col0, out, work, threads)
        return [np.ascontiguousarray(out[:, a : a + r]) for a, r in zip(col0, rows, strict=True)]
    tok1 = np.cumsum([len(p[1]) for p in pairs], dtype=np.int64)
    tok0 = tok1 - np.array([len(p[1]) for p in pairs], np.int64)
    xs = np.concatenate([p[1] for p in pairs])
    out = np.empty((len(xs), weights[0].rows), np.float32)
    q, col0 = _quantize(weights[0].kind, xs), np.zeros(n, np.int64)
    _run(weights, q, tok0, tok1, col0, out, weights[0].cols * out.size, threads)
    return [out[a:b] for a, b in zip(tok0, tok1, strict=True)]
