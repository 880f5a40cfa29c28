"""The decoder forward pass shared by Llama and Mixtral.

# n = tokens in this call, D = hidden, H = query heads, G = KV heads, hd = head dim,
# E = experts, A = active experts per token, V = vocabulary
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mer.errors import MerError
from mer.kernels.attention import attention
from mer.kernels.matmul import matmul
from mer.kernels.rmsnorm import rmsnorm
from mer.kernels.rope import apply_rope, inv_frequencies, rope_tables
from mer.kernels.router import route
from mer.kernels.swiglu import expert_forward
from mer.models.args import ModelArgs
from mer.models.weights import ExpertWeights, LayerWeights, ModelWeights


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
    (from `capacity` positions, or the whole context if that is smaller)."""

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
        capacity = min(self.args.max_seq_len, max(needed, 2 * self.capacity))
        shape = (capacity, self.args.n_kv_heads, self.args.head_dim)
        grown_k = [np.zeros(shape, np.float32) for _ in range(self.args.n_layers)]
        grown_v = [np.zeros(shape, np.float32) for _ in range(self.args.n_layers)]
        for old, new in zip(self.k + self.v, grown_k + grown_v, strict=False):  # empty at first
            new[: self.length] = old[: self.length]
        self.k, self.v, self.capacity = grown_k, grown_v, capacity


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

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Logits float32 [n, V] (or [1, V] for the last token only) for tokens [n].

        Raises NonFiniteError naming the first part of the model that produced NaN or
        infinite values, if the logits are not all finite (corrupt weights)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        p0 = cache.length
        logits = self._run(tokens, cache, all_logits, check=False)
        if not np.isfinite(logits).all():
            # Rare and fatal: run the same tokens again, checking after every part.
            cache.length = p0
            self._run(tokens, cache, all_logits, check=True)  # raises where it starts
            raise NonFiniteError("the output head", "head")
        return logits

    def _run(self, tokens: np.ndarray, cache: KVCache, all_logits: bool, check: bool) -> np.ndarray:
        args = self.args
        n, p0 = len(tokens), cache.length
        if n == 0:
            raise ValueError("forward: no tokens")
        cache.reserve(p0 + n)
        cos, sin = rope_tables(self.inv_freq, np.arange(p0, p0 + n))
        x = self.weights.embed.lookup(tokens)
        _check(check, x, "the token embeddings", "embeddings")
        for index, layer in enumerate(self.weights.layers):
            x = x + self._attention(
                layer, rmsnorm(x, layer.attn_norm, args.norm_eps), cache, index, cos, sin
            )
            _check(check, x, f"the attention of layer {index}", "attention")
            x = x + self._ffn(index, layer, rmsnorm(x, layer.ffn_norm, args.norm_eps), check)
            _check(check, x, f"the feed-forward of layer {index}", "experts")
        cache.length = p0 + n
        if not all_logits:
            x = x[-1:]
        return matmul(self.weights.lm_head, rmsnorm(x, self.weights.norm, args.norm_eps))

    def _attention(
        self,
        layer: LayerWeights,
        h: np.ndarray,
        cache: KVCache,
        index: int,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        args = self.args
        n, p0 = h.shape[0], cache.length
        q = matmul(layer.wq, h).reshape(n, args.n_heads, args.head_dim)
        k = matmul(layer.wk, h).reshape(n, args.n_kv_heads, args.head_dim)
        v = matmul(layer.wv, h).reshape(n, args.n_kv_heads, args.head_dim)
        apply_rope(q, cos, sin, args.rope.interleaved)
        apply_rope(k, cos, sin, args.rope.interleaved)
        cache.k[index][p0 : p0 + n] = k
        cache.v[index][p0 : p0 + n] = v
        out = attention(q, cache.k[index], cache.v[index], p0, args.sliding_window)
        return matmul(layer.wo, out.reshape(n, args.n_heads * args.head_dim))

    def _ffn(self, index: int, layer: LayerWeights, h: np.ndarray, check: bool) -> np.ndarray:
        if layer.router is None:  # a dense FFN: one expert, always chosen
            chosen = np.zeros((h.shape[0], 1), np.int64)
            weights = np.ones((h.shape[0], 1), np.float32)
        else:
            scores = h @ layer.router.T
            _check(check, scores, f"the router of layer {index}", "router")
            chosen, weights = route(scores, self.args.n_experts_per_tok)  # [n, A]
        ids = np.unique(chosen).tolist()
        if self.routing_observer is not None and layer.router is not None:
            self.routing_observer(index, chosen, h)
        outputs: dict[int, np.ndarray] = {}

        def compute(e: int, expert: ExpertWeights) -> None:
            rows, _ = np.nonzero(chosen == e)  # each token picks an expert at most once
            x = np.ascontiguousarray(h[rows])
            outputs[e] = expert_forward(expert.gate, expert.up, expert.down, x)
            if layer.router is not None:
                _check(check, outputs[e], f"expert {e} of layer {index}", "experts")

        if self.streamer is None:
            for e in ids:
                compute(e, layer.experts[e])
        else:
            layers = self.weights.layers
            following = layers[index + 1].router if index + 1 < len(layers) else None
            self.streamer.observe(index, ids, h.shape[0])
            self.streamer.run(index, ids, compute, self.streamer.predict_next(index, h, following))
        if layer.router is None:
            return outputs[0]
        # Outputs are summed in expert order whatever order they were computed in, so the
        # result does not depend on which experts were resident.
        out = np.zeros_like(h)
        for e in ids:
            rows, slots = np.nonzero(chosen == e)
            out[rows] += weights[rows, slots][:, None] * outputs[e]
        return out


def _check(enabled: bool, values: np.ndarray, where: str, part: str) -> None:
    if enabled and not np.isfinite(values).all():
        raise NonFiniteError(where, part)
