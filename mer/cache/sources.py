"""Where streamed experts come from: which byte ranges to read into a slot, and how to turn
the slot's bytes into kernel-ready weights.

Two sources exist: `FileExperts` reads experts straight from the model's own files (GGUF or
safetensors), as aligned supersets of each matrix's bytes, and repacks quantized blocks on
every use; a mer store (`mer.store`) lays each expert out as one blob in the kernels' own
layout, so its weights are zero-copy views of the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mer.io.arena import ALIGN, round_up
from mer.models.weights import ExpertSpec, ExpertWeights

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Segment:
    """One read of an expert: `length` bytes at `offset` of files[file], landing `into` bytes
    into the slot; `expected` is the xxh3_64 of those bytes when the source knows it."""

    file: int
    offset: int
    length: int
    into: int
    expected: int | None = None


class ExpertSource(Protocol):
    files: Sequence[Path]
    slot_bytes: int  # the most slot bytes any expert needs (a multiple of 4096)
    n_layers: int
    n_experts: int  # per layer (at most: dense layers of an MoE model have none)

    def keys(self) -> Sequence[ExpertKey]:
        """Every (layer, expert) the source holds."""
        ...

    def segments(self, key: ExpertKey) -> Sequence[Segment]: ...

    def decode(self, key: ExpertKey, slot: np.ndarray) -> ExpertWeights: ...

    def kinds(self, key: ExpertKey) -> tuple[str, str, str]:
        """The block types of the expert's gate, up and down matrices."""
        ...


class FileExperts:
    """Experts read from the model's own files. Each matrix's bytes are read as the smallest
    4 KiB-aligned range around them (O_DIRECT reads whole pages), one segment per matrix."""

    def __init__(self, layers: Sequence[Sequence[ExpertSpec]]) -> None:
        self.files: list[Path] = sorted({m.file for specs in layers for s in specs for m in s})
        index = {f: i for i, f in enumerate(self.files)}
        self.n_layers = len(layers)
        self.n_experts = max(len(specs) for specs in layers)
        self._specs = {(li, e): s for li, specs in enumerate(layers) for e, s in enumerate(specs)}
        self._segments: dict[ExpertKey, tuple[Segment, ...]] = {}
        for key, spec in self._specs.items():
            into, segs = 0, []
            for m in spec:
                start = m.offset - m.offset % ALIGN
                length = m.offset + m.nbytes - start
                segs.append(Segment(index[m.file], start, length, into))
                into += round_up(length)
            self._segments[key] = tuple(segs)
        self.slot_bytes = max(s[-1].into + round_up(s[-1].length) for s in self._segments.values())

    def keys(self) -> Sequence[ExpertKey]:
        return list(self._specs)

    def segments(self, key: ExpertKey) -> Sequence[Segment]:
        return self._segments[key]

    def kinds(self, key: ExpertKey) -> tuple[str, str, str]:
        gate, up, down = (m.quant or m.kind for m in self._specs[key])  # kinds after packing
        return gate, up, down

    def decode(self, key: ExpertKey, slot: np.ndarray) -> ExpertWeights:
        parts = []
        for m, seg in zip(self._specs[key], self._segments[key], strict=True):
            begin = seg.into + m.offset - seg.offset
            parts.append(m.pack(slot[begin : begin + m.nbytes]))
        return ExpertWeights(*parts)
