"""Compile every kernel a model runs before it runs.

numba compiles a kernel on its first call for each new combination of argument types (dtype,
dimensions, layout, read-only or not), or loads it from its on-disk cache (`cache=True`). The
first call of a fresh install takes seconds per kernel, and would otherwise land inside the
first tokens' timings. `warm_up` calls each kernel once on tiny inputs made with the model's
own weight arrays (so the types match exactly: a memory-mapped plane is read-only, a slot's
is not), on one thread and on all of them, for one token and for a prefill-sized batch.

# n = tokens, D = hidden, H = query heads, G = KV heads, hd = head dim
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mer.kernels import grouped
from mer.kernels.attention import attention
from mer.kernels.matmul import _KINDS, PackedWeight, batch_invariant, get_num_threads
from mer.kernels.mm_f32 import SMALL_N
from mer.kernels.rmsnorm import rmsnorm
from mer.kernels.rope import apply_rope, rope_tables
from mer.kernels.router import combine, route
from mer.kernels.swiglu import _silu_mul, activate
from mer.models.args import ModelArgs
from mer.models.weights import ExpertWeights, ModelWeights

_BATCH = max(SMALL_N, 4) + 4  # a token count that takes every kernel's prefill path


def _signature(w: PackedWeight) -> tuple:
    flags = tuple((p.dtype.str, p.ndim, p.flags.c_contiguous, p.flags.writeable) for p in w.planes)
    return w.kind, flags


def _matrices(weights: ModelWeights, experts: Iterable[ExpertWeights]) -> list[PackedWeight]:
    mats = [weights.lm_head]
    for layer in weights.layers:
        mats += layer.matrices()
        mats += [m for e in layer.experts if isinstance(e, ExpertWeights) for m in e.parts]
        mats += list(layer.shared.parts) if layer.shared is not None else []
    mats += [m for e in experts for m in e.parts]
    return mats


def warm_up(
    args: ModelArgs,
    weights: ModelWeights,
    experts: Sequence[ExpertWeights] | None = None,
    matrices_only: bool = False,
) -> None:
    """Run every kernel of the model once on tiny inputs. `experts`: streamed experts' weights
    (of each block-type mix), which the layers do not hold. `matrices_only`: the products and
    the expert activation alone (what a compute worker runs)."""
    threads = sorted({1, get_num_threads()})
    seen: set[tuple] = set()
    for w in _matrices(weights, experts or ()):
        if (sig := _signature(w)) in seen:
            continue
        seen.add(sig)
        kernel = _KINDS[w.kind]
        for n in (1, _BATCH):
            x = np.zeros((n, w.cols), np.float32)
            out = np.zeros((n, w.rows), np.float32)
            for nt in threads:
                rows = min(w.rows, 2 * nt)
                kernel.run(w.planes, x, out, 0, rows, 0, w.cols, 0, 0, nt, batch_invariant())
                if grouped.fusable([(w, x)] * grouped.FUSE_MIN):  # products run together
                    head = PackedWeight(w.kind, 16, w.cols, tuple(p[:16] for p in w.planes))
                    grouped.run_products([(head, x)] * grouped.FUSE_MIN, threads=nt)
    if not matrices_only:  # resident experts run together (mer.kernels.grouped)
        kinds: set[tuple] = set()
        for layer in weights.layers:
            for i, e in enumerate(layer.experts):
                e = layer.expert(i, e) if isinstance(e, ExpertWeights) else None
                key = e and (_signature(e.gate), _signature(e.down), e.bias is None, e.limit)
                if e is None or key in kinds or not grouped.applies([e, e]):
                    continue
                kinds.add(key)
                for n in (1, _BATCH):
                    x = np.zeros((n, e.gate.cols), np.float32)
                    for nt in threads:
                        grouped.run_grouped([e], x, [0], [n], threads=nt)
    for n in (1, _BATCH):
        _silu_mul(np.zeros((n, 4), np.float32), np.zeros((n, 4), np.float32))
        if args.expert_bias:  # gpt-oss's biased, clamped SwiGLU
            zero = np.zeros(4, np.float32)
            g, u = np.zeros((n, 4), np.float32), np.zeros((n, 4), np.float32)
            activate(
                ExpertWeights(None, None, None, (zero, zero, zero), args.swiglu_limit), g, u, 0
            )
        if matrices_only:
            continue
        h = np.zeros((n, args.dim), np.float32)
        for layer in weights.layers[:1]:
            rmsnorm(h, layer.attn_norm, args.norm_eps)
            rmsnorm(h, layer.ffn_norm, args.norm_eps)
        if args.is_moe:
            chosen, w = route(np.zeros((n, args.n_experts), np.float32), args.n_experts_per_tok)
            tok = np.arange(chosen.size) // chosen.shape[1]  # as the layers sort their pairs
            combine(h.copy(), tok, w.ravel(), h[tok])
        rmsnorm(h, weights.norm, args.norm_eps)
        cos, sin = rope_tables(np.ones(args.head_dim // 2, np.float32), np.arange(n))
        if args.mla:  # one cached latent + rotary key: the values are a view of the keys
            width = args.kv_lora_rank + args.head_dim
            q = np.zeros((n, args.n_heads, width), np.float32)
            k = np.zeros((n, 1, width), np.float32)
            attention(q, k, k[:, :, : args.kv_lora_rank], 0, None, args.attention_scale)
            q = np.zeros((n, args.n_heads, args.head_dim), np.float32)
        else:
            q = np.zeros((n, args.n_heads, args.head_dim), np.float32)
            k = np.zeros((n, args.n_kv_heads, args.head_dim), np.float32)
            attention(q, k, k.copy(), 0, args.sliding_window)
        apply_rope(q, cos, sin, args.rope.interleaved)
    if not matrices_only:
        weights.embed.lookup(np.zeros(1, np.int64))
