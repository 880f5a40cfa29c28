"""`mer synth`: a synthetic Mixture-of-Experts model of any Mixtral-family shape, as a GGUF
file that llama.cpp loads, with the bundled model's real vocabulary.

# L = layers, E = experts, K = experts per token, D = hidden, F = expert FFN, H = query
# heads, G = KV heads, hd = D / H, V = vocabulary

Weights are random: each matrix's entries have standard deviation gain / sqrt(fan-in).
Quantized tensors are random block bytes whose scales set that deviation, each block's scale
with a random sign so that the block formats' uneven value ranges (Q4_0: -8..7) add no bias;
tensors that need exact values are made as floats and quantized with llama.cpp's rounding.
Tensors are made and written one at a time, so memory stays near the largest tensor (one
layer's stacked experts) and tens of GB take minutes.

The residual stream. One hidden coordinate, the *channel* (index 0), holds sqrt(D) in every
token's embedding, and no sublayer writes to it (those rows of the attention output and of
every expert's down projection are zero). RMSNorm still normalises: the channel adds 1 to the
mean square it divides by, and the norm weights, set from the variance each layer is
planned to see, give every sublayer an input of unit variance and read the channel as 8. So
each layer's contribution is fixed by its gains and does not feed back on itself: the rest of
the stream starts at variance 1 and grows to about 2 + t / (1 - t) at any depth (a layer's
attention and experts add 1 / L each, scaled as below), and nothing explodes or vanishes.

Routing. Real routers are not uniform: some experts are more popular per layer, and
consecutive tokens tend to reuse experts (Mixtral's paper: the same first choice 14-28% of
the time against 12.5% at random). Routers have no bias in this format, so the channel
carries two knobs:

- `skew` s: router row e of layer l reads the channel with weight s z[l, e] / 8, z ~ N(0, 1)
  drawn per layer: a logit bias of s z[l, e] against logits of standard deviation 1, so each
  layer has its own popular experts. s = 0 gives every expert the same popularity.
- `stickiness` t in [0, 0.95]: attention queries and keys read the channel, so every head
  scores keys by distance alone (through RoPE: a sum of cosines over the rotary frequencies,
  which falls off about as ln distance, so weights go as (distance + 1)^-RECENCY), plus a
  little content noise. Attention then passes a recency-weighted mean of recent tokens'
  values, a part of the hidden state shared by neighbouring tokens. Layer 0's attention
  makes that part a share t of the stream (the embeddings are the other 1 - t), and every
  later attention adds t / (1 - t) as much as the experts do, which keeps the share at every
  depth. Neighbouring tokens route alike more often as t grows; t = 0 routes each token on
  its own.

Measured (32 layers, 8 experts, top-2, D = 512, 384 tokens of text; the first-choice repeat
rate between consecutive tokens, random 12.5%, and the most popular expert's share of tokens,
uniform 25%, both averaged over layers and about even across depth):

    skew  stickiness   repeat   top share
    0     0            0.13     0.35
    0     0.5          0.24     0.44
    0     0.9          0.50     0.59
    0.3   0.3          0.21     0.45      (the defaults)
    1.0   0.3          0.36     0.68
    2     0            0.53     0.85

`mer synth` prints, after writing, the per-layer expert histogram and how often consecutive
tokens share their first choice, measured by running the model on a fixed text; docs/design.md
lists what the knobs give.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from mer.errors import MerError
from mer.kernels.quantize import quantize_blocks

CHANNEL = 0  # the hidden coordinate that carries the constant (see the module docstring)
CHANNEL_READ = 8.0  # the channel as every sublayer reads it
RECENCY = 1.0  # attention weight ~ (distance + 1)^-RECENCY
ROUTER_STD = 1.0  # standard deviation of router logits (before the skew's bias)


@dataclass(frozen=True)
class Latent:
    """DeepSeek's parts (llama.cpp's deepseek2): multi-head latent attention with KV rank
    `kv_rank` (queries compressed to `q_rank` when > 0), query heads of `nope` + `rope`
    dimensions and value heads of `v`; `shared` experts of the routed experts' width that every
    token goes through; the first `dense` layers with one dense FFN `dense_ffn` wide."""

    kv_rank: int = 512
    q_rank: int = 0
    nope: int = 128
    rope: int = 64
    v: int = 128
    shared: int = 2
    dense: int = 1
    dense_ffn: int = 10944


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    experts: int = 8
    top_k: int = 2
    dim: int = 4096
    ffn: int = 14336
    heads: int = 32
    kv_heads: int = 8
    context: int = 4096
    rope_theta: float = 1e6
    latent: Latent | None = None  # DeepSeek-shaped (deepseek2) when set

    def __post_init__(self) -> None:
        for name in ("layers", "experts", "top_k", "dim", "ffn", "heads", "kv_heads", "context"):
            if getattr(self, name) < 1:
                raise MerError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.top_k <= self.experts:
            raise MerError("--top-k must not exceed --experts")
        if self.latent is not None:
            if self.latent.dense >= self.layers:
                raise MerError("--layers must exceed the shape's dense first layers")
        elif self.dim % self.heads or self.heads % self.kv_heads or (self.dim // self.heads) % 2:
            raise MerError("--dim must split into --heads even-sized heads, in whole KV groups")

    @property
    def head_dim(self) -> int:
        """The rotary dimensions of a head (DeepSeek: its rotary part)."""
        return self.latent.rope if self.latent else self.dim // self.heads

    @property
    def arch(self) -> str:
        return "deepseek2" if self.latent else "llama"

    @property
    def slug(self) -> str:
        """A file name for models of this shape: readable, and distinct for distinct shapes."""
        tag = zlib.crc32(repr(self).encode()) & 0xFFFF
        return f"{self.arch}-{self.layers}l-{self.experts}x{self.ffn}-{self.dim}-{tag:04x}"


SHAPES: dict[str, Shape] = {
    "mixtral-8x7b": Shape(),
    "mixtral-4l": Shape(layers=4),  # four layers at Mixtral-8x7B's width: ~3-6 GB
    # Qwen3-30B-A3B's experts (128 per layer, top-8, 2048 wide, 768-wide FFN) on a plain
    # attention (synthetic heads split the hidden size: 32 x 64, where Qwen3's are 32 x 128)
    "qwen3-30b-a3b": Shape(
        layers=48, experts=128, top_k=8, dim=2048, ffn=768, heads=32, kv_heads=4, context=4096
    ),
    "qwen3-30b-a3b-4l": Shape(
        layers=4, experts=128, top_k=8, dim=2048, ffn=768, heads=32, kv_heads=4, context=4096
    ),
    # DeepSeek-V2-Lite (15.7B): latent attention (KV rank 512, no query compression, 16 heads
    # of 128 + 64), 64 experts of 1408 top-6, 2 shared experts, a dense first layer
    "deepseek-v2-lite": Shape(
        layers=27,
        experts=64,
        top_k=6,
        dim=2048,
        ffn=1408,
        heads=16,
        kv_heads=1,
        context=4096,
        rope_theta=10000.0,
        latent=Latent(),
    ),
    "small": Shape(layers=8, experts=8, dim=512, ffn=1024, heads=8, kv_heads=2, context=2048),
    "tiny": Shape(layers=2, experts=4, dim=256, ffn=512, heads=4, kv_heads=2, context=512),
    "tiny-deepseek": Shape(
        layers=3,
        experts=8,
        top_k=2,
        dim=256,
        ffn=256,
        heads=4,
        kv_heads=1,
        context=512,
        rope_theta=10000.0,
        latent=Latent(kv_rank=128, q_rank=96, nope=32, rope=32, v=64, shared=1, dense_ffn=512),
    ),
}
SHAPES["deepseek-v2-lite-4l"] = replace(SHAPES["deepseek-v2-lite"], layers=4)

# Block type per tensor class for each quantization.
QUANTS: dict[str, dict[str, Q]] = {
    "q4_0": {
        "experts": Q.Q4_0,
        "down": Q.Q4_0,
        "qk": Q.Q4_0,
        "v": Q.Q4_0,
        "o": Q.Q4_0,
        "embed": Q.Q4_0,
        "output": Q.Q6_K,
    },
    "q8_0": {
        "experts": Q.Q8_0,
        "down": Q.Q8_0,
        "qk": Q.Q8_0,
        "v": Q.Q8_0,
        "o": Q.Q8_0,
        "embed": Q.Q8_0,
        "output": Q.Q8_0,
    },
    # Q4_K_M-style: K-quants where nothing needs exact values; Q8_0 where structure does
    "q4_k_m": {
        "experts": Q.Q4_K,
        "down": Q.Q6_K,
        "qk": Q.Q8_0,
        "v": Q.Q8_0,
        "o": Q.Q4_K,
        "embed": Q.Q8_0,
        "output": Q.Q6_K,
    },
}
_FLOAT_QUANTS = {Q.Q4_0: "q4_0", Q.Q8_0: "q8_0"}  # kinds mer quantizes from floats


@dataclass(frozen=True)
class Knobs:
    skew: float = 0.3
    stickiness: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.skew) or self.skew < 0:
            raise MerError("--skew must be a finite number >= 0")
        if not 0 <= self.stickiness <= 0.95:
            raise MerError("--stickiness must be in [0, 0.95]")


# -- random blocks -------------------------------------------------------------------------
# Byte layouts (ggml-common.h): where each block keeps its f16 scale(s).
_SCALES = {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def _block_bytes(qtype: Q) -> tuple[int, int]:
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    return size, nbytes


@functools.cache
def _unit_std(qtype: Q) -> float:
    """Standard deviation of the values of random blocks whose scale is 1 (Q4_K: with the
    mins' scale 7.5 times the scale, which centres them)."""
    rng = np.random.default_rng(12345)
    blocks = _random_blocks(qtype, 64, _block_bytes(qtype)[0] * 8, 1.0, rng, unit=True)
    values = gguf.quants.dequantize(blocks, qtype)
    return float(values.std())


def _random_blocks(
    qtype: Q,
    rows: int,
    cols: int,
    std: float,
    rng: np.random.Generator,
    zero_rows: tuple[int, ...] = (),
    unit: bool = False,
) -> np.ndarray:
    """uint8 [rows, cols / block * block bytes]: random blocks whose values have standard
    deviation `std`, each block's scale of random sign; rows in `zero_rows` are all zero."""
    size, nbytes = _block_bytes(qtype)
    n_blocks = rows * (cols // size)
    raw = np.frombuffer(rng.bytes(n_blocks * nbytes), np.uint8).reshape(n_blocks, nbytes).copy()
    scale = 1.0 if unit else std / _unit_std(qtype)
    signs = np.where(rng.integers(0, 2, n_blocks, dtype=np.uint8) == 1, -1.0, 1.0)
    d = (scale * signs).astype(np.float16).reshape(rows, -1)
    if zero_rows:
        d[list(zero_rows)] = 0
    d = d.reshape(-1)
    offsets = _SCALES[qtype]
    raw[:, offsets[0] : offsets[0] + 2] = d.view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q4_K:  # dmin = 7.5 d: the mins cancel the nibbles' mean
        dmin = (d.astype(np.float32) * 7.5).astype(np.float16)
        raw[:, offsets[1] : offsets[1] + 2] = dmin.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _quantized(values: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [rows, cols] -> GGUF blocks of `qtype` (Q4_0 or Q8_0), rows in chunks."""
    kind = _FLOAT_QUANTS[qtype]
    rows = values.shape[0]
    step = max(1, (1 << 22) // values.shape[1])
    return np.concatenate(
        [quantize_blocks(values[i : i + step], kind) for i in range(0, rows, step)], axis=0
    )


# -- the model's tensors ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # row-major (numpy order), element counts
    qtype: Q
    make: Callable[[], np.ndarray]  # the raw data: float32 for F32, uint8 blocks otherwise

    @property
    def nbytes(self) -> int:
        if self.qtype == Q.F32:
            return 4 * math.prod(self.shape)
        size, nbytes = _block_bytes(self.qtype)
        return math.prod(self.shape[:-1]) * (self.shape[-1] // size) * nbytes


def _recency_weights(shape: Shape, a: float, length: int = 512) -> np.ndarray:
    """Attention weights over distances 0..length-1 when queries and keys are (a, 0) in every
    rotated pair: softmax of a^2 * sum_i cos(theta_i * distance) / sqrt(hd)."""
    hd = shape.head_dim
    theta = shape.rope_theta ** (-np.arange(0, hd, 2) / hd)
    scores = a * a * np.cos(np.outer(np.arange(length), theta)).sum(1) / math.sqrt(hd)
    w = np.exp(scores - scores.max())
    return w / w.sum()


def _qk_amplitude(shape: Shape) -> float:
    """a such that attention weights fall off as (distance + 1)^-RECENCY (module docstring):
    sum_i cos(theta_i x) ~ (hd / 2)(1 - ln x / ln base) for rotary base `base`."""
    return math.sqrt(
        RECENCY * math.sqrt(shape.head_dim) * math.log(shape.rope_theta) / (shape.head_dim / 2)
    )


@dataclass(frozen=True)
class _Plan:
    """The variance of the hidden state (beyond the channel) that each layer's attention and
    experts see, and what each adds to it."""

    attn_in: list[float]
    attn_added: list[float]
    ffn_in: list[float]
    ffn_added: list[float]
    final: float


def _variance_plan(shape: Shape, t: float) -> _Plan:
    """Embeddings bring 1 - t and layer 0's attention t; then every expert layer adds 1 / L
    and every later attention t / (1 - t) of that, which keeps the neighbours' part at about
    its share t at every depth (the experts' part being each token's own)."""
    plan = _Plan([], [], [], [], 0.0)
    v, expert = 1.0 - t, 1.0 / shape.layers
    for layer in range(shape.layers):
        added = t if layer == 0 else expert * t / (1.0 - t)
        plan.attn_in.append(v)
        plan.attn_added.append(added)
        v += added
        plan.ffn_in.append(v)
        plan.ffn_added.append(expert)
        v += expert
    return _Plan(plan.attn_in, plan.attn_added, plan.ffn_in, plan.ffn_added, v)


@functools.cache
def _silu_square(v: float) -> float:
    """E[silu(g)^2] / v for g ~ N(0, v) (Gauss-Hermite quadrature): 0.36 for v = 1."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    g = x * math.sqrt(v)
    silu = g / (1 + np.exp(-g))
    return float((w * silu * silu).sum() / w.sum()) / v


def _tensors(shape: Shape, quant: str, knobs: Knobs, vocab: int) -> Iterator[_Tensor]:
    types = QUANTS[quant]
    s, k = shape, knobs
    d, f, e, hd = s.dim, s.ffn, s.experts, s.head_dim
    big_a = math.sqrt(d)  # adds 1 to the mean square RMSNorm divides by

    def rng(*parts: object) -> np.random.Generator:
        # Each tensor has its own stream: any tensor can be made alone, in any order.
        return np.random.default_rng([k.seed, zlib.crc32(repr(parts).encode())])

    a = _qk_amplitude(s)
    plan = _variance_plan(s, k.stickiness)
    # sum of squared attention weights at a typical position: how much a weighted mean
    # of independent values shrinks their variance
    mean_square = float((_recency_weights(s, a, 128) ** 2).sum())

    def attn_gain(layer: int) -> float:
        # Every sublayer sees unit variance (the norm weights below). Layer 0's values, from
        # the embeddings, are independent across tokens; later ones carry the neighbours'
        # part (share t), which the mean keeps whole.
        kept = mean_square if layer == 0 else k.stickiness + (1 - k.stickiness) * mean_square
        return math.sqrt(plan.attn_added[layer] / kept)

    # an expert's activations silu(g) * u, g and u of unit variance, have variance S(1); its
    # output joins the others chosen with weights summing to 1 (squares summing to ~1/K)
    down_gain = math.sqrt(plan.ffn_added[0] * s.top_k / _silu_square(1.0))

    def embed() -> np.ndarray:
        values = rng("embed").standard_normal((vocab, d), dtype=np.float32)
        values *= math.sqrt(plan.attn_in[0])
        values[:, CHANNEL] = big_a
        return _quantized(values, types["embed"])

    def norm(v: float) -> Callable[[], np.ndarray]:
        # RMSNorm divides by sqrt(1 + v) (the channel's square is D): weights that give the
        # rest unit variance and read the channel as CHANNEL_READ
        def make() -> np.ndarray:
            w = np.full(d, math.sqrt((1 + v) / v), np.float32)
            w[CHANNEL] = CHANNEL_READ * math.sqrt(1 + v) / big_a
            return w

        return make

    def llama_attention(layer: int, p: str) -> Iterator[_Tensor]:
        def qk(rows: int, which: str, layer=layer) -> Callable[[], np.ndarray]:
            def make() -> np.ndarray:
                w = rng(layer, which).standard_normal((rows, d), dtype=np.float32)
                w *= 0.1 / math.sqrt(d)  # content noise in the scores
                w[0::2, CHANNEL] = a / CHANNEL_READ  # (a, 0) in every rotated pair
                return _quantized(w, types["qk"])

            return make

        yield _Tensor(p + "attn_q.weight", (s.heads * hd, d), types["qk"], qk(s.heads * hd, "q"))
        yield _Tensor(
            p + "attn_k.weight", (s.kv_heads * hd, d), types["qk"], qk(s.kv_heads * hd, "k")
        )

        def values(layer=layer) -> np.ndarray:
            # Content only: a value read from the channel would be the same for every token,
            # a bias on every router instead of a part shared by neighbouring tokens.
            w = rng(layer, "v").standard_normal((s.kv_heads * hd, d), dtype=np.float32)
            w /= math.sqrt(d)
            w[:, CHANNEL] = 0.0
            return _quantized(w, types["v"])

        yield _Tensor(p + "attn_v.weight", (s.kv_heads * hd, d), types["v"], values)
        std = attn_gain(layer) / math.sqrt(s.heads * hd)
        yield blocks(
            p + "attn_output.weight", d, s.heads * hd, "o", std, layer, "o", zero=(CHANNEL,)
        )

    def blocks(name: str, rows: int, cols: int, kind: str, std: float, *key, zero=()):
        def make() -> np.ndarray:
            return _random_blocks(types[kind], rows, cols, std, rng(*key), zero_rows=zero)

        return _Tensor(name, (rows, cols), types[kind], make)

    def latent_attention(layer: int, p: str) -> Iterator[_Tensor]:
        # DeepSeek's latent attention on content alone: the queries' and keys' weights are
        # small, so each head spreads its attention over the past (the channel is not read:
        # stickiness does not apply), and the output adds what the plan says at unit weights.
        m, h = s.latent, s.heads
        qd = h * (m.nope + m.rope)
        ones = lambda n: lambda: np.ones(n, np.float32)  # noqa: E731
        if m.q_rank:
            yield blocks(p + "attn_q_a.weight", m.q_rank, d, "qk", d**-0.5, layer, "q_a")
            yield _Tensor(p + "attn_q_a_norm.weight", (m.q_rank,), Q.F32, ones(m.q_rank))
            yield blocks(p + "attn_q_b.weight", qd, m.q_rank, "qk", 0.1 / m.q_rank**0.5, layer, "q")
        else:
            yield blocks(p + "attn_q.weight", qd, d, "qk", 0.1 / d**0.5, layer, "q")
        kv = m.kv_rank + m.rope
        yield blocks(
            p + "attn_kv_a_mqa.weight", kv, d, "qk", d**-0.5, layer, "kv_a", zero=(CHANNEL,)
        )
        yield _Tensor(p + "attn_kv_a_norm.weight", (m.kv_rank,), Q.F32, ones(m.kv_rank))

        def per_head(which: str, rows: int, cols: int, std: float, layer=layer):
            def make() -> np.ndarray:
                return np.stack(
                    [
                        _random_blocks(types["v"], rows, cols, std, rng(layer, which, j))
                        for j in range(h)
                    ]
                )

            return _Tensor(p + f"attn_{which}.weight", (h, rows, cols), types["v"], make)

        yield per_head("k_b", m.kv_rank, m.nope, 0.1 / m.nope**0.5)
        yield per_head("v_b", m.v, m.kv_rank, m.kv_rank**-0.5)
        yield blocks(
            p + "attn_output.weight",
            d,
            h * m.v,
            "o",
            math.sqrt(plan.attn_added[layer]) / math.sqrt(h * m.v),
            layer,
            "o",
            zero=(CHANNEL,),
        )

    def dense_ffn(layer: int, p: str, suffix: str, width: int, gain: float) -> Iterator[_Tensor]:
        """One SwiGLU FFN `width` wide (a dense layer's, or the shared experts')."""
        yield blocks(
            f"{p}ffn_gate{suffix}.weight", width, d, "experts", d**-0.5, layer, "g" + suffix
        )
        yield blocks(f"{p}ffn_up{suffix}.weight", width, d, "experts", d**-0.5, layer, "u" + suffix)
        yield blocks(
            f"{p}ffn_down{suffix}.weight",
            d,
            width,
            "down",
            gain / math.sqrt(width),
            layer,
            "d" + suffix,
            zero=(CHANNEL,),
        )

    yield _Tensor("token_embd.weight", (vocab, d), types["embed"], embed)
    for layer in range(s.layers):
        p = f"blk.{layer}."
        yield _Tensor(p + "attn_norm.weight", (d,), Q.F32, norm(plan.attn_in[layer]))

        if s.latent is None:
            yield from llama_attention(layer, p)
        else:
            yield from latent_attention(layer, p)
        yield _Tensor(p + "ffn_norm.weight", (d,), Q.F32, norm(plan.ffn_in[layer]))
        if s.latent is not None and layer < s.latent.dense:
            # one FFN instead of the experts, as much output as the chosen experts give
            yield from dense_ffn(layer, p, "", s.latent.dense_ffn, down_gain / math.sqrt(s.top_k))
            continue
        if s.latent is not None and s.latent.shared:
            width = s.latent.shared * f
            yield from dense_ffn(layer, p, "_shexp", width, down_gain / math.sqrt(s.top_k))

        def router(layer=layer) -> np.ndarray:
            g = rng(layer, "router")
            w = g.standard_normal((e, d), dtype=np.float32) * (ROUTER_STD / math.sqrt(d))
            w[:, CHANNEL] = k.skew * g.standard_normal(e).astype(np.float32) / CHANNEL_READ
            return w

        yield _Tensor(p + "ffn_gate_inp.weight", (e, d), Q.F32, router)
        for name, rows, cols, kind, gain in (
            ("ffn_gate_exps", f, d, "experts", 1.0),
            ("ffn_up_exps", f, d, "experts", 1.0),
            ("ffn_down_exps", d, f, "down", down_gain),
        ):
            zero = (CHANNEL,) if name == "ffn_down_exps" else ()

            def experts(
                layer=layer, name=name, rows=rows, cols=cols, kind=kind, gain=gain, zero=zero
            ):
                scale = gain / math.sqrt(cols)
                return np.stack(
                    [
                        _random_blocks(
                            types[kind], rows, cols, scale, rng(layer, name, x), zero_rows=zero
                        )
                        for x in range(e)
                    ]
                )

            yield _Tensor(p + name + ".weight", (e, rows, cols), types[kind], experts)
    yield _Tensor("output_norm.weight", (d,), Q.F32, norm(plan.final))
    yield _Tensor(
        "output.weight",
        (vocab, d),
        types["output"],
        lambda: _random_blocks(types["output"], vocab, d, 1 / math.sqrt(d), rng("output")),
    )


# -- writing ---------------------------------------------------------------------------------
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


def _vocabulary(source: Path) -> tuple[dict[str, tuple], int]:
    """The tokenizer metadata of GGUF file `source` ({key: (value, types)}) and its size."""
    reader = gguf.GGUFReader(source)
    fields = {
        k: (reader.fields[k].contents(), reader.fields[k].types)
        for k in _TOKENIZER_KEYS
        if k in reader.fields
    }
    return fields, len(fields["tokenizer.ggml.tokens"][0])


def synth_size(shape: Shape, quant: str, vocabulary_from: Path) -> int:
    """Bytes of tensor data the model will have, with the vocabulary of GGUF file
    `vocabulary_from`."""
    _, vocab = _vocabulary(vocabulary_from)
    return sum(t.nbytes for t in _tensors(shape, quant, Knobs(), vocab))


def write_gguf(
    path: Path,
    shape: Shape,
    quant: str,
    knobs: Knobs,
    vocabulary_from: Path,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the model to GGUF file `path` (tensor by tensor); returns its tensor bytes.
    `progress(n)` is called with each tensor's byte count once it is written."""
    if quant not in QUANTS:
        raise MerError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    vocab_fields, vocab = _vocabulary(vocabulary_from)
    tensors = list(_tensors(shape, quant, knobs, vocab))
    arch = shape.arch
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"mer synth {shape.layers}x{shape.experts} {quant}")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    m = shape.latent
    if m is None:
        writer.add_feed_forward_length(shape.ffn)
        writer.add_head_count_kv(shape.kv_heads)
    else:  # as llama.cpp's converter writes DeepSeek: one KV head of latent + rotary key
        writer.add_feed_forward_length(m.dense_ffn)
        writer.add_expert_feed_forward_length(shape.ffn)
        writer.add_head_count_kv(1)
        writer.add_key_length(m.kv_rank + m.rope)
        writer.add_value_length(m.kv_rank)
        writer.add_uint32(f"{arch}.attention.key_length_mla", m.nope + m.rope)
        writer.add_uint32(f"{arch}.attention.value_length_mla", m.v)
        writer.add_kv_lora_rank(m.kv_rank)
        writer.add_q_lora_rank(m.q_rank)
        writer.add_leading_dense_block_count(m.dense)
        writer.add_expert_shared_count(m.shared)
        writer.add_expert_weights_scale(1.0)
        writer.add_expert_weights_norm(True)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(shape.experts)
    writer.add_expert_used_count(shape.top_k)
    writer.add_vocab_size(vocab)
    writer.add_uint32("mer.synth.seed", knobs.seed)
    writer.add_float32("mer.synth.skew", knobs.skew)
    writer.add_float32("mer.synth.stickiness", knobs.stickiness)
    for key, (value, types) in vocab_fields.items():
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            writer.add_key_value(key, value, types[0])
    for t in tensors:
        dtype = np.float32 if t.qtype == Q.F32 else np.uint8
        byte_shape = (
            t.shape if t.qtype == Q.F32 else (*t.shape[:-1], t.nbytes // math.prod(t.shape[:-1]))
        )
        raw = None if t.qtype == Q.F32 else t.qtype
        writer.add_tensor_info(t.name, byte_shape, np.dtype(dtype), t.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for t in tensors:
        data = t.make()
        assert data.nbytes == t.nbytes, (t.name, data.nbytes, t.nbytes)
        writer.write_tensor_data(data)
        total += t.nbytes
        if progress is not None:
            progress(t.nbytes)
        del data
    writer.close()
    return total


SAMPLE_TEXT = (
    "The river ran quietly past the old mill, and the miller's children watched the water "
    "turn the great wooden wheel. Every morning they counted the boats, and their mother "
    "baked bread while their father mended nets and told stories about the sea. In the city "
    "the trains were always late; people waited on the platform with coffee in their hands, "
    "reading the news and checking the time. A model with many experts routes each token to a "
    "few of them and adds their weighted outputs, so only those experts' weights must be read "
    "for that token. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b "
    "= b, a + b\n    return a\nNumbers matter too: 1, 2, 3, 10, 42, 100 and 2024 appear in many "
    "texts, together with symbols such as %, & and #. What is the weather like today? It is "
    "sunny and warm, with a light wind from the west, and tomorrow there may be rain."
)


def measure_routing(model, tokens: int = 256):
    """RoutingStats of `model` (a loaded mer Model) over a prefill of `tokens` tokens of
    SAMPLE_TEXT (repeated as needed)."""
    from mer.cache.trace import RoutingStats

    ids = model.tokenizer.encode(SAMPLE_TEXT)
    while len(ids) < tokens:
        ids += model.tokenizer.encode(" " + SAMPLE_TEXT)
    stats = RoutingStats(model.args.n_layers, model.args.n_experts)
    model.transformer.routing_observer = stats.observe
    try:
        model.logits(ids[: min(tokens, model.args.max_seq_len)])
    finally:
        model.transformer.routing_observer = None
    return stats
