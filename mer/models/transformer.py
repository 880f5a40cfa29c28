"""The decoder forward pass shared by Llama, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V2/V3 and gpt-oss.

# n = tokens in this call, D = hidden, H = query heads, G = KV heads, hd = head dim,
# E = experts, A = active experts per token, V = vocabulary
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mer.errors import MerError
from mer.kernels.attention import attention
from mer.kernels.rmsnorm import rmsnorm
from mer.kernels.rope import apply_rope, inv_frequencies, rope_tables
from mer.kernels.router import combine, route
from mer.models.args import ModelArgs
from mer.models.weights import SHARED, ExpertWeights, LayerWeights, MLAWeights, ModelWeights

# DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) use RMSNorm's default epsilon,
# not the model's rms_norm_eps
_LATENT_EPS = 1e-6


class ContextFullError(MerError):
    """A sequence would grow past the model's context (`ModelArgs.max_seq_len`)."""


class NonFiniteError(MerError):
    """A part of the model produced NaN or infinite values: its weights are corrupt.

    `where` names the part ("expert 3 of layer 1"); `part` is its kind: "embeddings",
    "attention", "router", "experts" or "head"."""

    def __init__(self, where: str, part: str) -> None:
        super().__init__(f"{where} produced non-finite values")
        self.where, self.part = where, part


class KVCache:
    """Keys and values of one sequence, float32 [capacity, G, hd] per layer; grows on demand
    (from `capacity` positions, or the whole context if that is smaller).

    With latent attention (MLA) a layer caches one row per position, [capacity, 1, r + R]:
    the normalised latent then the rotated shared key; the values are views of the latent
    (`shared_values`)."""

    def __init__(self, args: ModelArgs, capacity: int = 256) -> None:
        self.args = args
        self.length = 0
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.reserve(min(capacity, args.max_seq_len))

    def reserve(self, needed: int) -> None:
        if needed > self.args.max_seq_len:
            raise ContextFullError(
                f"{needed} tokens do not fit the context of {self.args.max_seq_len} tokens"
            )
        if needed <= self.capacity:
            return
        a = self.args
        capacity = min(a.max_seq_len, max(needed, 2 * self.capacity))
        if self.shared_values:
            shape = (capacity, 1, a.kv_lora_rank + a.head_dim)
        else:
            shape = (capacity, a.n_kv_heads, a.head_dim)
        grown_k = [np.zeros(shape, np.float32) for _ in range(a.n_layers)]
        if self.shared_values:  # the values are views of the keys, copied with them
            grown_v = [k[:, :, : a.kv_lora_rank] for k in grown_k]
            pairs = zip(self.k, grown_k, strict=False)  # empty at first
        else:
            grown_v = [np.zeros(shape, np.float32) for _ in range(a.n_layers)]
            pairs = zip(self.k + self.v, grown_k + grown_v, strict=False)
        for old, new in pairs:
            new[: self.length] = old[: self.length]
        self.k, self.v, self.capacity = grown_k, grown_v, capacity

    @property
    def shared_values(self) -> bool:
        """The values are views of the keys (MLA): only `k` holds data."""
        return self.args.mla


class Transformer:
    """Runs tokens through the decoder, appending their keys and values to a KVCache."""

    def __init__(self, args: ModelArgs, weights: ModelWeights) -> None:
        self.args = args
        self.weights = weights
        self.inv_freq = inv_frequencies(args.rope, args.head_dim)
        # observer(layer, chosen, h): each MoE layer's expert ids int64 [n, A] and the
        # normalised hidden state float32 [n, D] its router saw
        self.routing_observer: Callable[[int, np.ndarray, np.ndarray], None] | None = None
        self.streamer = None  # an ExpertStreamer when experts are streamed from disk, or None
        # called after each layer of a step (the engine actor's heartbeat: a long prefill
        # step is work, not a hang)
        self.on_layer: Callable[[], None] | None = None
        # where products run: this process (default) or compute workers (mer.compute)
        from mer.compute.executor import LocalExecutor

        self.executor = LocalExecutor()

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Logits float32 [n, V] (or [1, V] for the last token only) for tokens [n].

        Raises NonFiniteError naming the first part of the model that produced NaN or
        infinite values, if the logits are not all finite (corrupt weights)."""
        return self.step([(np.asarray(tokens, dtype=np.int64), cache)], all_logits)[0]

    def step(
        self, batch: list[tuple[np.ndarray, KVCache]], all_logits: bool = False
    ) -> list[np.ndarray]:
        """One forward pass over the tokens of several sequences at once: for each (tokens
        [n_i], its KV cache) the logits float32 [n_i, V] of every token (`all_logits`) or
        [1, V] of its last. Every matmul, router and expert runs on all the tokens together,
        each expert once for all the tokens routed to it; attention runs per sequence over
        its own cache. A token's logits do not depend on what else is in the batch.

        Raises NonFiniteError as `forward` does."""
        batch = [(np.asarray(t, dtype=np.int64), cache) for t, cache in batch]
        starts = [cache.length for _, cache in batch]
        logits = self._run(batch, all_logits, check=False)
        if not all(np.isfinite(part).all() for part in logits):
            # Rare and fatal: run the same tokens again, checking after every part.
            for (_, cache), p0 in zip(batch, starts, strict=True):
                cache.length = p0
            self._run(batch, all_logits, check=True)  # raises where it starts
            raise NonFiniteError("the output head", "head")
        return logits

    def _run(
        self, batch: list[tuple[np.ndarray, KVCache]], all_logits: bool, check: bool
    ) -> list[np.ndarray]:
        args = self.args
        if not batch or any(len(tokens) == 0 for tokens, _ in batch):
            raise ValueError("forward: no tokens")
        spans, at = [], 0  # each sequence's rows in the flat batch
        for tokens, cache in batch:
            cache.reserve(cache.length + len(tokens))
            spans.append((at, at + len(tokens)))
            at += len(tokens)
        positions = np.concatenate([np.arange(c.length, c.length + len(t)) for t, c in batch])
        cos, sin = rope_tables(self.inv_freq, positions, args.rope.attention_factor)
        x = self.weights.embed.lookup(np.concatenate([t for t, _ in batch]))
        _check(check, x, "the token embeddings", "embeddings")
        caches = [cache for _, cache in batch]
        for index, layer in enumerate(self.weights.layers):
            h = rmsnorm(x, layer.attn_norm, args.norm_eps)
            x = x + self._attention(layer, h, caches, spans, index, cos, sin)
            _check(check, x, f"the attention of layer {index}", "attention")
            x = x + self._ffn(index, layer, rmsnorm(x, layer.ffn_norm, args.norm_eps), check)
            _check(check, x, f"the feed-forward of layer {index}", "experts")
            if self.on_layer is not None:
                self.on_layer()
        for tokens, cache in batch:
            cache.length += len(tokens)
        rows = [np.arange(a, b) if all_logits else np.array([b - 1]) for a, b in spans]
        picked = np.concatenate(rows)
        h = rmsnorm(np.ascontiguousarray(x[picked]), self.weights.norm, args.norm_eps)
        (logits,) = self.executor.products([(self.weights.lm_head, h)])
        bounds = np.cumsum([0] + [len(r) for r in rows])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _attention(
        self,
        layer: LayerWeights,
        h: np.ndarray,
        caches: list[KVCache],
        spans: list[tuple[int, int]],
        index: int,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        args = self.args
        n = h.shape[0]
        if layer.mla is not None:
            return self._latent_attention(layer, layer.mla, h, caches, spans, index, cos, sin)
        q, k, v = self.executor.products([(layer.wq, h), (layer.wk, h), (layer.wv, h)])
        if layer.bq is not None:
            q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
        if args.qk_norm == "full":  # over the whole projection (OLMoE)
            q = rmsnorm(q, layer.q_norm, args.norm_eps)
            k = rmsnorm(k, layer.k_norm, args.norm_eps)
        elif args.qk_norm == "head":  # each head over its own dimensions (Qwen3)
            hd = args.head_dim
            q = rmsnorm(q.reshape(-1, hd), layer.q_norm, args.norm_eps)
            k = rmsnorm(k.reshape(-1, hd), layer.k_norm, args.norm_eps)
        q = q.reshape(n, args.n_heads, args.head_dim)
        k = k.reshape(n, args.n_kv_heads, args.head_dim)
        v = v.reshape(n, args.n_kv_heads, args.head_dim)
        apply_rope(q, cos, sin, args.rope.interleaved)
        apply_rope(k, cos, sin, args.rope.interleaved)
        out = np.empty_like(q)
        for cache, (a, b) in zip(caches, spans, strict=True):
            p0 = cache.length
            cache.k[index][p0 : p0 + b - a] = k[a:b]
            cache.v[index][p0 : p0 + b - a] = v[a:b]
            out[a:b] = attention(
                q[a:b], cache.k[index], cache.v[index], p0, args.window(index), sinks=layer.sinks
            )
        (projected,) = self.executor.products([(layer.wo, out.reshape(n, -1))])
        return projected if layer.bo is None else projected + layer.bo

    def _latent_attention(
        self,
        layer: LayerWeights,
        mla: MLAWeights,
        h: np.ndarray,
        caches: list[KVCache],
        spans: list[tuple[int, int]],
        index: int,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        """DeepSeek's multi-head latent attention, absorbed: each query head's non-rotary part
        is mapped into the latent space (w_kb), so every head attends over the one cached row
        per position [latent | rotary key] with the latent as its values, and the attended
        latent is mapped out per head (w_vb). Equal to expanding keys and values per head."""
        a = self.args
        n, r, nope = h.shape[0], a.kv_lora_rank, a.qk_nope_head_dim
        if mla.wq_a is None:
            q, kv = self.executor.products([(layer.wq, h), (mla.wkv_a, h)])
        else:
            qa, kv = self.executor.products([(mla.wq_a, h), (mla.wkv_a, h)])
            (q,) = self.executor.products([(layer.wq, rmsnorm(qa, mla.q_a_norm, _LATENT_EPS))])
        q = q.reshape(n, a.n_heads, a.q_head_dim)
        q_rot = np.ascontiguousarray(q[:, :, nope:])
        k_rot = np.ascontiguousarray(kv[:, None, r:])
        apply_rope(q_rot, cos, sin, a.rope.interleaved)
        apply_rope(k_rot, cos, sin, a.rope.interleaved)
        query = np.empty((n, a.n_heads, r + a.head_dim), np.float32)
        absorbed = self.executor.products(
            [(mla.w_kb[j], np.ascontiguousarray(q[:, j, :nope])) for j in range(a.n_heads)]
        )
        for j, part in enumerate(absorbed):
            query[:, j, :r] = part
        query[:, :, r:] = q_rot
        latent = rmsnorm(np.ascontiguousarray(kv[:, :r]), mla.kv_a_norm, _LATENT_EPS)
        out = np.empty((n, a.n_heads, r), np.float32)
        for cache, (s0, s1) in zip(caches, spans, strict=True):
            p0 = cache.length
            rows = cache.k[index][p0 : p0 + s1 - s0, 0]
            rows[:, :r] = latent[s0:s1]
            rows[:, r:] = k_rot[s0:s1, 0]
            keys = cache.k[index]
            out[s0:s1] = attention(query[s0:s1], keys, keys[:, :, :r], p0, None, a.attention_scale)
        values = self.executor.products(
            [(mla.w_vb[j], np.ascontiguousarray(out[:, j])) for j in range(a.n_heads)]
        )
        (projected,) = self.executor.products([(layer.wo, np.concatenate(values, axis=1))])
        return projected

    def _ffn(self, index: int, layer: LayerWeights, h: np.ndarray, check: bool) -> np.ndarray:
        shared = None
        if layer.shared is not None:
            shared = self.executor.expert(layer.shared, h, (index, SHARED, -1))
            if layer.shared_gate is not None:  # Qwen2-MoE: scaled per token by a sigmoid gate
                gate = router_logits(h, layer.shared_gate[None, :])
                shared = shared * (np.float32(1.0) / (np.float32(1.0) + np.exp(-gate)))
            if layer.router is None:  # a dense layer of an MoE model: `shared` is its FFN
                return shared
        a = self.args
        if layer.router is None:  # a dense FFN: one expert, always chosen
            if self.streamer is None:
                return self.executor.expert(layer.expert(0, layer.experts[0]), h, (index, 0, -1))
            chosen = np.zeros((h.shape[0], 1), np.int64)
            weights = np.ones((h.shape[0], 1), np.float32)
        else:
            scores = router_logits(h, layer.router)
            if layer.router_logit_bias is not None:
                scores += layer.router_logit_bias
            _check(check, scores, f"the router of layer {index}", "router")
            chosen, weights = route(
                scores,
                a.n_experts_per_tok,
                a.norm_topk_prob,
                scoring=a.scoring,
                bias=layer.router_bias,
                n_group=a.n_group,
                topk_group=a.topk_group,
                group_score=a.group_score,
                scale=a.routed_scale,
            )
        # the (token, expert) pairs by expert, tokens ascending in each: expert e's tokens are
        # rows a..b of x (span[e])
        flat = chosen.ravel()
        order = np.argsort(flat, kind="stable")
        tok = order // chosen.shape[1]
        found, first, count = np.unique(flat[order], return_index=True, return_counts=True)
        ids = found.tolist()
        ends = first + count
        span = dict(zip(ids, zip(first.tolist(), ends.tolist(), strict=True), strict=True))
        if self.routing_observer is not None and layer.router is not None:
            self.routing_observer(index, chosen, h)
        x = h[tok]

        def checked(e: int, y: np.ndarray) -> None:
            if layer.router is not None:
                _check(check, y, f"expert {e} of layer {index}", "experts")

        if self.streamer is None:  # every expert resident: all of them in one call
            experts = [layer.expert(e, layer.experts[e]) for e in ids]
            refs = [(index, e, -1) for e in ids]
            y = self.executor.experts(experts, x, first, ends, refs)
            if check:
                for e in ids:
                    checked(e, y[span[e][0] : span[e][1]])
        else:
            y = np.empty_like(x)

            def compute(e: int, expert: ExpertWeights, slot: int = -1) -> None:
                a, b = span[e]
                part = self.executor.expert(layer.expert(e, expert), x[a:b], (index, e, slot))
                checked(e, part)
                y[a:b] = part

            layers = self.weights.layers
            following = layers[index + 1].router if index + 1 < len(layers) else None
            self.streamer.observe(index, ids, h.shape[0])
            self.streamer.run(index, ids, compute, self.streamer.predict_next(index, h, following))
        if layer.router is None:
            return y
        # Each token's outputs are summed in expert order whatever order they were computed
        # in, so the result does not depend on which experts were resident.
        out = np.zeros_like(h)
        combine(out, tok, weights.ravel()[order], y)
        return out if shared is None else out + shared


def router_logits(h: np.ndarray, router: np.ndarray) -> np.ndarray:
    """float32 [n, E] router logits, row by row: a BLAS matrix product picks its summation
    order by the number of rows, and a token's routing must not depend on its batch."""
    out = np.empty((h.shape[0], router.shape[0]), np.float32)
    for t in range(h.shape[0]):
        np.dot(router, h[t], out=out[t])
    return out


def _check(enabled: bool, values: np.ndarray, where: str, part: str) -> None:
    if enabled and not np.isfinite(values).all():
        raise NonFiniteError(where, part)
