"""Arena: aligned slots, zero-copy views, attach by name from another process."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from mer.errors import MerError
from mer.io.arena import ALIGN, Arena


def test_slots_are_aligned_and_sized() -> None:
    with Arena(10 << 20, 5000) as arena:
        assert arena.slot_size == 8192
        assert arena.n_slots == ((10 << 20) - ALIGN) // 8192
        assert arena.address % ALIGN == 0
        for i in (0, 1, arena.n_slots - 1):
            assert arena.slot_offset(i) % ALIGN == 0
            with arena.slot_view(i) as view:
                assert len(view) == arena.slot_size
        with pytest.raises(IndexError):
            arena.slot_offset(arena.n_slots)


def test_slot_array_is_zero_copy() -> None:
    with Arena(1 << 20, 4096) as arena:
        a = arena.slot_array(3, np.float32, 16, offset=64)
        a[:] = np.arange(16)
        with arena.slot_view(3) as view:
            assert np.frombuffer(view[64 : 64 + 64], np.float32).tolist() == list(range(16))
        with arena.slot_view(2) as view:
            assert not any(view)
        with pytest.raises(IndexError):
            arena.slot_array(0, np.float32, 1025)
        del a


def test_bad_budget_is_a_mer_error() -> None:
    with pytest.raises(MerError, match="holds no"):
        Arena(8192, 1 << 20)
    with pytest.raises(MerError, match="cannot (reserve|create)"):  # more than /dev/shm holds
        Arena(1 << 42, 1 << 30)


def _child_sum(name: str, slot: int, out: mp.Queue) -> None:
    arena = Arena.attach(name)
    a = arena.slot_array(slot, np.uint8, arena.slot_size)
    out.put((arena.n_slots, arena.slot_size, int(a.sum(dtype=np.int64))))
    a[:] = 1  # prove writes go both ways (tests only: normally only the reader writes slots)
    del a
    arena.close()


def test_attach_from_another_process() -> None:
    with Arena(1 << 20, 8192) as arena:
        arena.slot_array(5, np.uint8, 8192)[:] = 3
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=_child_sum, args=(arena.name, 5, out))
        proc.start()
        got = out.get(timeout=60)
        proc.join(60)
        assert proc.exitcode == 0
        assert got == (arena.n_slots, 8192, 3 * 8192)
        assert int(arena.slot_array(5, np.uint8, 8192).sum()) == 8192
        # The child closing its mapping must not have removed the segment.
        Arena.attach(arena.name).close()


def test_attach_rejects_foreign_memory() -> None:
    from multiprocessing.shared_memory import SharedMemory

    shm = SharedMemory(create=True, size=8192)
    try:
        with pytest.raises(MerError, match="not a mer arena"):
            Arena.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()
