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
    def gguf_nbytes(self) -> int:
        return self.gate.gguf_nbytes + self.up.gguf_nbytes + self.down.gguf_nbytes


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


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # float32 [D]
    wq: PackedWeight  # [H*hd, D]
    wk: PackedWeight  # [G*hd, D]
    wv: PackedWeight  # [G*hd, D]
    wo: PackedWeight  # [D, H*hd]
    ffn_norm: np.ndarray  # float32 [D]
    router: np.ndarray | None  # float32 [E, D]; None for a dense FFN (one expert, always chosen)
    # resident experts, or where each lies on disk when they are streamed through the cache
    experts: Sequence[ExpertWeights] | Sequence[ExpertSpec]
    q_norm: np.ndarray | None = None  # float32 [hd] or [H*hd] (ModelArgs.qk_norm)
    k_norm: np.ndarray | None = None  # float32 [hd] or [G*hd]


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
