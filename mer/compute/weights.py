"""Weights by name, the same in the engine and in every compute worker: a mer store's dense
matrices (memory-mapped: one copy in the page cache however many processes map them) and its
experts, resident (views of the mapped experts file) or in an arena slot (views of the slot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mer.io.arena import Arena
from mer.kernels.matmul import PackedWeight
from mer.models.weights import SHARED, ExpertWeights, ModelWeights


def dense_matrices(weights: ModelWeights) -> list[PackedWeight]:
    """The dense matrices in index order: lm_head, then each layer's (LayerWeights.matrices)."""
    out = [weights.lm_head]
    for layer in weights.layers:
        out += layer.matrices()
    return out


class WeightTable:
    """Index <-> dense matrix, and (layer, expert, slot) -> expert weights."""

    def __init__(self, weights: ModelWeights, experts, arena: Arena | None = None) -> None:
        self.dense = dense_matrices(weights)
        self._index = {id(w): i for i, w in enumerate(self.dense)}
        self.layers = weights.layers
        self.source = experts  # the store's StoreExperts
        self.arena = arena
        self._base = None if arena is None else np.frombuffer(arena.buf, dtype=np.uint8)
        self._decoded: dict[tuple[int, int, int], ExpertWeights] = {}

    def index(self, w: PackedWeight) -> int | None:
        return self._index.get(id(w))

    def expert(self, layer: int, e: int, slot: int) -> ExpertWeights:
        """Expert e of `layer`: resident when slot < 0, else the views of arena slot `slot`."""
        if e == SHARED:
            return self.layers[layer].shared
        if slot < 0:
            return self.layers[layer].expert(e, self.layers[layer].experts[e])
        key = (layer, e, slot)
        held = self._decoded.get(key)
        if held is None:
            if len(self._decoded) > 4096:
                self._decoded.clear()
            size = self.arena.slot_size
            held = self.source.decode((layer, e), self._base[slot * size : (slot + 1) * size])
            self._decoded[key] = held
        return self.layers[layer].expert(e, held)

    def forget_slot(self, slot: int) -> None:
        """A slot now holds another expert: drop views made of it."""
        for key in [k for k in self._decoded if k[2] == slot]:
            del self._decoded[key]

    def attach_arena(self, name: str | None) -> None:
        if self.arena is not None and self.arena.name == name:
            return
        self._decoded.clear()
        self._base = None
        if self.arena is not None:
            self.arena.close()
        self.arena = Arena.attach(name) if name else None
        self._base = None if self.arena is None else np.frombuffer(self.arena.buf, dtype=np.uint8)


def open_store_table(root: Path, stream: bool) -> tuple[object, WeightTable]:
    """(args, table) of the store in `root`: dense weights mapped; experts resident unless
    `stream` (then they come from an arena)."""
    from mer.store.load import load_store

    args, weights, _, experts = load_store(root, stream=stream, verify=False)
    return args, WeightTable(weights, experts)
