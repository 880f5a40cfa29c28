"""Kernel-ready weights of a Llama-family decoder, whatever file they came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mer.io.raw import to_float32
from mer.kernels.matmul import (
    FLOAT_DTYPES,
    PackedWeight,
    activations,
    dequantize_blocks,
    from_gguf_blocks,
    packing,
    requantize,
)


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert. gate, up: [I, D]; down: [D, I]. gpt-oss adds biases (float32 gate
    [I], up [I], down [D]) and clamps its SwiGLU at `limit` (`ModelArgs.swiglu_limit`)."""

    gate: PackedWeight
    up: PackedWeight
    down: PackedWeight
    # arrays: left out of comparison and hashing (the matrices compare by identity)
    bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, compare=False)
    limit: float = 0.0

    @property
    def parts(self) -> tuple[PackedWeight, PackedWeight, PackedWeight]:
        return self.gate, self.up, self.down

    @property
    def gguf_nbytes(self) -> int:
        return sum(w.gguf_nbytes for w in self.parts)


# How a float matrix [rows, cols] lies in a stored 2-D array (`arrange`): "rows" as it is;
# "cols" transposed, [cols, rows]; "even_cols" / "odd_cols" transposed and interleaved with
# another matrix, [cols, 2 * rows] holding it in the even / odd columns (gpt-oss's gate_up).
LAYOUTS = ("rows", "cols", "even_cols", "odd_cols")


def stored_shape(layout: str, rows: int, cols: int) -> tuple[int, int]:
    """The shape of the stored array that holds a [rows, cols] matrix in `layout`."""
    return {"rows": (rows, cols), "cols": (cols, rows)}.get(layout, (cols, 2 * rows))


def matrix_shape(layout: str, stored: tuple[int, ...]) -> tuple[int, int]:
    """[rows, cols] of the matrix that a stored array of shape `stored` holds in `layout`
    (the inverse of stored_shape)."""
    rows, cols = stored
    if layout == "rows":
        return rows, cols
    return (cols, rows) if layout == "cols" else (cols // 2, rows)


def arrange(stored: np.ndarray, layout: str) -> np.ndarray:
    """The matrix [rows, cols], C-contiguous, held by 2-D array `stored` in `layout`."""
    if layout == "rows":
        return np.ascontiguousarray(stored)
    if layout == "cols":
        return np.ascontiguousarray(stored.T)
    return np.ascontiguousarray(stored[:, layout == "odd_cols" :: 2].T)


# MXFP4 as OpenAI publishes it (gpt-oss's safetensors): per row, blocks [nb, 16] of nibbles
# (byte j: weight 2j low, 2j + 1 high) and one E8M0 exponent per block in a tensor apart; the
# rows of a matrix are all of them ("rows") or, for gate and up stored interleaved, the even
# or odd ones ("even_rows", "odd_rows").
MXFP4_LAYOUTS = ("rows", "even_rows", "odd_rows")


def mxfp4_rows(stored: np.ndarray, layout: str) -> np.ndarray:
    """The rows of `stored` (first axis) that hold a matrix in MXFP4 `layout`."""
    return stored if layout == "rows" else stored[layout == "odd_rows" :: 2]


def openai_mxfp4(blocks: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """GGUF MXFP4 blocks uint8 [R, nb * 17] of OpenAI's packing: blocks uint8 [R, nb, 16],
    exponents uint8 [R, nb]. The values and exponents mean the same in both (ggml's table is
    OpenAI's E2M1 values doubled, its scale 2^(e - 128) half of 2^(e - 127)); only the
    nibble order differs (GGUF: byte i holds weight i low and weight 16 + i high)."""
    r, nb = exponents.shape
    nib = np.empty((r, nb, 32), np.uint8)
    nib[..., 0::2] = blocks & 0x0F
    nib[..., 1::2] = blocks >> 4
    out = np.empty((r, nb, 17), np.uint8)
    out[..., 0] = exponents
    out[..., 1:] = nib[..., :16] | (nib[..., 16:] << 4)
    return out.reshape(r, nb * 17)


@dataclass(frozen=True)
class MatrixSpec:
    """Where one expert matrix lies in a model file, and how to make it kernel-ready: its bytes
    are GGUF blocks or a float matrix of `kind` stored in `layout` (LAYOUTS); `quant`
    quantizes it on packing."""

    file: Path
    offset: int
    nbytes: int
    kind: str
    rows: int
    cols: int
    quant: str | None = None
    layout: str = "rows"
    # OpenAI's MXFP4 (kind "mxfp4"): the bytes are the stored rows' nibble blocks, and these
    # are their exponents (a view of the file's, read on packing)
    exponents: np.ndarray | None = field(default=None, compare=False)
    # the activations mode it is packed for: the one in force where the model was opened
    activations: str = field(default_factory=activations, compare=False)

    def pack(self, raw: np.ndarray) -> PackedWeight:
        """A PackedWeight from this matrix's bytes `raw` (uint8); float kinds in "rows" layout
        stay views."""
        with packing(self.activations):
            return self._pack(raw)

    def _pack(self, raw: np.ndarray) -> PackedWeight:
        if self.exponents is not None:
            blocks = raw.reshape(-1, self.cols // 32, 16)
            rows = mxfp4_rows(blocks, self.layout), mxfp4_rows(self.exponents, self.layout)
            raw = openai_mxfp4(*rows).reshape(-1)
        elif self.layout != "rows":
            shape = stored_shape(self.layout, self.rows, self.cols)
            stored = raw.view(FLOAT_DTYPES[self.kind]).reshape(shape)
            raw = arrange(stored, self.layout).view(np.uint8).reshape(-1)
        return requantize(from_gguf_blocks(raw, self.kind, self.rows, self.cols), self.quant)


ExpertSpec = tuple[MatrixSpec, MatrixSpec, MatrixSpec]  # gate, up, down of one expert on disk


SHARED = -1  # the expert id that names a layer's shared FFN (LayerWeights.shared)


@dataclass(frozen=True)
class MLAWeights:
    """DeepSeek's latent attention beside LayerWeights.wq (q_proj, or q_b_proj after wq_a)
    and wo. r = kv_lora_rank, R = rotary head dim, N = qk_nope_head_dim, Vh = v_head_dim,
    Q = q_lora_rank. kv_b_proj is kept split per head and absorbed: w_kb[h] maps a query
    head's non-rotary part into the latent space, w_vb[h] the attended latent out of it."""

    wkv_a: PackedWeight  # [r + R, D]: the latent and the shared rotary key
    kv_a_norm: np.ndarray  # float32 [r]
    w_kb: Sequence[PackedWeight]  # H x [r, N]: head h's key rows of kv_b_proj, transposed
    w_vb: Sequence[PackedWeight]  # H x [Vh, r]: head h's value rows of kv_b_proj
    wq_a: PackedWeight | None = None  # [Q, D] when the queries are compressed too
    q_a_norm: np.ndarray | None = None  # float32 [Q]

    def matrices(self) -> list[PackedWeight]:
        return [m for m in (self.wq_a, self.wkv_a) if m is not None] + [*self.w_kb, *self.w_vb]


@dataclass(frozen=True)
class ExpertBiases:
    """The biases of every expert of a layer (gpt-oss), kept resident whether the experts are
    or not: gate, up float32 [E, I], down [E, D]; `limit` is the clamp of their SwiGLU."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    limit: float

    def attach(self, e: int, expert: ExpertWeights) -> ExpertWeights:
        """Expert e's weights with its biases and clamp."""
        bias = (self.gate[e], self.up[e], self.down[e])
        return replace(expert, bias=bias, limit=self.limit)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # float32 [D]
    wq: PackedWeight  # [H*hd, D] (MLA: [H*(N+R), D] or [H*(N+R), Q])
    wk: PackedWeight | None  # [G*hd, D]; None with MLA
    wv: PackedWeight | None  # [G*hd, D]; None with MLA
    wo: PackedWeight  # [D, H*hd] (MLA: [D, H*Vh])
    ffn_norm: np.ndarray  # float32 [D]
    # float32 [E, D]; None for a dense FFN (one expert in `experts`, always chosen, or with
    # experts empty the `shared` FFN alone: DeepSeek's first layers)
    router: np.ndarray | None
    # resident experts, or where each lies on disk when they are streamed through the cache
    experts: Sequence[ExpertWeights] | Sequence[ExpertSpec]
    q_norm: np.ndarray | None = None  # float32 [hd] or [H*hd] (ModelArgs.qk_norm)
    k_norm: np.ndarray | None = None  # float32 [hd] or [G*hd]
    mla: MLAWeights | None = None
    # an FFN every token goes through, always resident: DeepSeek's shared experts (as one
    # expert of their summed width) or a dense layer's FFN in an MoE model
    shared: ExpertWeights | None = None
    router_bias: np.ndarray | None = None  # float32 [E]: added to scores for the choice only
    shared_gate: np.ndarray | None = None  # float32 [D]: the shared FFN's gate (Qwen2-MoE)
    bq: np.ndarray | None = None  # float32 [H*hd]: projection biases (ModelArgs.qkv_bias)
    bk: np.ndarray | None = None  # float32 [G*hd]
    bv: np.ndarray | None = None  # float32 [G*hd]
    bo: np.ndarray | None = None  # float32 [D]: the output projection's bias (gpt-oss)
    sinks: np.ndarray | None = None  # float32 [H]: attention sink logits (gpt-oss)
    router_logit_bias: np.ndarray | None = None  # float32 [E]: added to the router's logits
    expert_biases: ExpertBiases | None = None  # gpt-oss

    def expert(self, e: int, expert: ExpertWeights) -> ExpertWeights:
        """Expert e as the kernels run it: `expert` (resident, or a view of a cache slot) with
        the layer's resident per-expert extras attached."""
        return expert if self.expert_biases is None else self.expert_biases.attach(e, expert)

    def matrices(self) -> list[PackedWeight]:
        """Every non-expert matrix of the layer, in a fixed order."""
        out = [m for m in (self.wq, self.wk, self.wv, self.wo) if m is not None]
        if self.mla is not None:
            out += self.mla.matrices()
        return out


class Embedding:
    """Token embedding table [V, D]: float rows are converted on lookup, quantized rows
    are dequantized on lookup, so the table itself stays in the file's encoding."""

    def __init__(self, raw: np.ndarray, kind: str, vocab_size: int, dim: int) -> None:
        self.raw, self.kind, self.vocab_size, self.dim = raw, kind, vocab_size, dim

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, D] rows for token ids [n]."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
        rows = np.ascontiguousarray(self.raw[ids])
        if self.kind in ("f32", "f16", "bf16"):
            return to_float32(rows, self.kind)
        return dequantize_blocks(rows, self.kind, len(ids), self.dim)


@dataclass(frozen=True)
class ModelWeights:
    embed: Embedding
    layers: Sequence[LayerWeights]
    norm: np.ndarray  # float32 [D]
    lm_head: PackedWeight  # [V, D]
