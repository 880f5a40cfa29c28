"""Kernel-ready weights of a Llama-family decoder, whatever file they came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mer.io.raw import to_float32
from mer.kernels.matmul import PackedWeight, dequantize, from_gguf_blocks, requantize


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert. gate, up: [I, D]; down: [D, I]."""

    gate: PackedWeight
    up: PackedWeight
    down: PackedWeight

    @property
    def parts(self) -> tuple[PackedWeight, PackedWeight, PackedWeight]:
        return self.gate, self.up, self.down

    @property
    def gguf_nbytes(self) -> int:
        return sum(w.gguf_nbytes for w in self.parts)


@dataclass(frozen=True)
class MatrixSpec:
    """Where one expert matrix lies in a model file, and how to make it kernel-ready: its bytes
    are GGUF blocks or a row-major float matrix of `kind`; `quant` quantizes it on packing."""

    file: Path
    offset: int
    nbytes: int
    kind: str
    rows: int
    cols: int
    quant: str | None = None

    def pack(self, raw: np.ndarray) -> PackedWeight:
        """A PackedWeight from this matrix's bytes `raw` (uint8); float kinds stay views."""
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
        return dequantize(from_gguf_blocks(rows, self.kind, len(ids), self.dim))


@dataclass(frozen=True)
class ModelWeights:
    embed: Embedding
    layers: Sequence[LayerWeights]
    norm: np.ndarray  # float32 [D]
    lm_head: PackedWeight  # [V, D]
