"""What the arena's slots hold, kept where a restarted cache actor finds it.

The cache actor's policy state lives in its memory and dies with it; the arena (shared
memory) does not. So that a new cache actor can re-attach the arena instead of re-reading
it, every change of a slot's content or leases is written through to `SlotTable`, a small
memory-mapped file in the service's runtime directory: per slot the expert, its state, its
leases and the ticket they were granted under, plus the engine incarnation holding them.
A row is written before the read it announces is sent, so a slot that an io actor may still
be writing into is never taken for free after a restart: it shows as loading, and the new
cache keeps it out of use until every io actor has said its old reads are done.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mer.errors import MerError

FREE, LOADING, READY = 0, 1, 2
_MAGIC = 0x4D4552534C4F5453  # "MERSLOTS"
_HEADER = 4  # int64s: magic, capacity, engine incarnation, slots in use
_COLUMNS = 5  # layer, expert, state, leases, ticket


class SlotTable:
    """Rows of `capacity` slots in the file at `path` (module docstring)."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = Path(path)
        size = 8 * (_HEADER + capacity * _COLUMNS)
        fresh = not self.path.exists() or self.path.stat().st_size != size
        if fresh:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.truncate(size)
            os.replace(tmp, self.path)
        self._map = np.memmap(self.path, dtype=np.int64, mode="r+", shape=(size // 8,))
        self.header = self._map[:_HEADER]
        self.rows = self._map[_HEADER:].reshape(capacity, _COLUMNS)
        if fresh or self.header[0] != _MAGIC or self.header[1] != capacity:
            self.rows[:] = 0
            self.header[:] = (_MAGIC, capacity, 0, 0)
            self.restored = False
        else:
            self.restored = True

    @property
    def capacity(self) -> int:
        return int(self.header[1])

    @property
    def engine(self) -> str:
        """The engine incarnation the leases belong to ('' before any)."""
        v = int(self.header[2])
        return f"{v:08x}" if v else ""

    @engine.setter
    def engine(self, incarnation: str) -> None:
        try:
            self.header[2] = int(incarnation, 16) if incarnation else 0
        except ValueError as err:
            raise MerError(f"engine incarnation {incarnation!r} is not hexadecimal") from err

    @property
    def in_use(self) -> int:
        """Slots the cache budget allows."""
        return int(self.header[3])

    @in_use.setter
    def in_use(self, n: int) -> None:
        self.header[3] = n

    def write(self, slot: int, key, state: int, leases: int = 0, ticket: int = 0) -> None:
        layer, expert = key if key is not None else (-1, -1)
        self.rows[slot] = (layer, expert, state, leases, ticket)

    def entries(self) -> list[tuple[int, tuple[int, int], int, int, int]]:
        """(slot, key, state, leases, ticket) of every slot not free."""
        out = []
        for slot in np.flatnonzero(self.rows[:, 2] != FREE).tolist():
            layer, expert, state, leases, ticket = (int(v) for v in self.rows[slot])
            out.append((slot, (layer, expert), state, leases, ticket))
        return out

    def close(self) -> None:
        self._map.flush()
        del self.header, self.rows, self._map
