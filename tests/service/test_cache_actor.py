"""The cache and io actors' cores, socket-free: a real store, a real arena, real readers; the
messages between them passed by hand, as the shells would."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from mer.actors.cache import ENGINE, CacheCore
from mer.actors.io import IoCore
from mer.cache.slots import SlotTable
from mer.cache.tier import CacheTier
from mer.io.arena import ALIGN, Arena
from mer.io.reader import ExpertReader
from mer.protocol import (
    Acquire,
    CacheQuery,
    CacheReport,
    Granted,
    Hello,
    Message,
    Read,
    ReadDone,
    Release,
)
from mer.store.load import load_store


def msg(body, sender: str = "engine.0", incarnation: str = "0000000e") -> Message:
    return Message(body.KIND, sender, incarnation, 1, None, body)


class Rig:
    """A cache core and one io core on `slots` slots of `store`'s experts."""

    def __init__(self, store: Path, tmp: Path, slots: int, arena: Arena | None = None) -> None:
        _, _, _, self.source = load_store(store, stream=True, verify=False)
        capacity = self.source.n_layers * self.source.n_experts
        slot = self.source.slot_bytes
        self.arena = arena or Arena(ALIGN + slots * slot, slot, capacity_slots=capacity)
        self.table = SlotTable(tmp / "slots", capacity)
        self.tier = CacheTier(self.source, slots, pin_fraction=0.0)
        self.core = CacheCore(self.tier, self.table, ios=1)
        self.readers = [ExpertReader(p, backend="buffered") for p in self.source.files]
        self.io = IoCore(self.source, self.readers, self.arena)
        self.granted: list[Granted] = []
        self.vacated: list[int] = []

    def send(self, body, sender="engine.0", incarnation="0000000e") -> None:
        """Deliver `body` to the cache, and everything that follows to whom it is for, until
        nothing moves; Granted bodies for the engine are kept in `granted`."""
        pending = [(sender, incarnation, body)]
        deadline = time.monotonic() + 10
        while (pending or self.io.busy) and time.monotonic() < deadline:
            if not pending:
                pending = [("io.0", "00000001", b) for b in self.io.poll()]
                continue
            who, inc, b = pending.pop(0)
            for peer, out in self.core.handle(who.encode(), msg(b, who, inc)):
                if peer == ENGINE or isinstance(out, CacheReport):
                    self.granted.append(out)
                else:
                    assert peer == b"io.0"
                    pending += [("io.0", "00000001", r) for r in self.io.handle(out)]
            self.vacated += self.core.sync_table()

    def expert_bytes(self, key) -> bytes:
        seg = self.source.segments(key)
        data = b""
        for s in seg:
            with open(self.source.files[s.file], "rb") as fh:
                fh.seek(s.offset)
                data += fh.read(s.length)
        return data

    def slot_bytes(self, slot: int, n: int) -> bytes:
        return bytes(self.arena.slot_view(slot)[:n])

    def close(self) -> None:
        for r in self.readers:
            r.close()


@pytest.fixture
def rig(small_store, tmp_path):
    r = Rig(small_store, tmp_path, slots=6)
    r.send(Hello("io"), "io.0", "00000001")
    yield r
    r.close()
    r.table.close()
    r.arena.close()
    r.arena.unlink()


def test_acquire_reads_once_grants_and_releases(rig):
    rig.send(Acquire(1, 0, [0, 3]))
    assert sorted((g.expert, g.error) for g in rig.granted) == [(0, None), (3, None)]
    for g in rig.granted:  # the slot holds the expert's bytes from disk
        want = rig.expert_bytes((0, g.expert))
        assert rig.slot_bytes(g.slot, len(want)) == want
    assert rig.tier.stats.demand_reads == 2 and rig.tier.cache.leases((0, 0)) == 1
    rig.send(Release(1, [[0, 0], [0, 3]]))
    assert rig.tier.cache.leases((0, 0)) == 0 and not rig.core.leased
    rig.granted.clear()
    rig.send(Acquire(2, 0, [3]))  # ready now: granted at once, nothing read
    assert [(g.ticket, g.expert) for g in rig.granted] == [(2, 3)]
    assert rig.tier.stats.demand_reads == 2


def test_acquire_is_idempotent_and_stale_releases_are_ignored(rig):
    rig.send(Acquire(1, 1, [2]))
    rig.send(Acquire(1, 1, [2]))  # a resend: granted again, leased once
    assert [g.expert for g in rig.granted] == [2, 2]
    assert rig.tier.cache.leases((1, 2)) == 1 and rig.tier.stats.demand_reads == 1
    rig.send(Release(9, [[1, 2]]))  # another ticket's release
    assert rig.tier.cache.leases((1, 2)) == 1
    rig.send(Release(1, [[1, 2]]))
    rig.send(Release(1, [[1, 2]]))
    assert rig.tier.cache.leases((1, 2)) == 0


def test_a_full_cache_queues_acquires_until_releases(rig):
    rig.send(Acquire(1, 0, list(range(6))))
    assert len(rig.granted) == 6
    rig.granted.clear()
    rig.send(Acquire(2, 1, [0, 1]))  # every slot leased
    assert rig.granted == [] and len(rig.core.queued) == 2
    rig.send(Release(1, [[0, 0]]))
    assert [g.expert for g in rig.granted] == [0]
    rig.send(Release(1, [[0, 1], [0, 2]]))
    assert sorted(g.expert for g in rig.granted) == [0, 1] and not rig.core.queued


def test_a_new_engine_incarnation_reclaims_leases(rig):
    rig.send(Acquire(1, 0, [0, 1]))
    assert rig.tier.cache.leases((0, 0)) == 1
    rig.send(Acquire(1, 2, [5]), incarnation="0000000f")  # the engine restarted
    assert rig.tier.cache.leases((0, 0)) == 0 and rig.tier.cache.leases((2, 5)) == 1
    assert set(rig.core.leased) == {(2, 5)} and rig.table.engine == "0000000f"


def test_reads_of_a_dead_io_incarnation_are_given_out_again(rig):
    out = rig.core.handle(b"engine.0", msg(Acquire(1, 3, [4])))
    reads = [b for _, b in out if isinstance(b, Read)]
    assert len(reads) == 1  # the io dies before it reads; a new incarnation says hello
    again = rig.core.handle(b"io.0", msg(Hello("io"), "io.0", "00000002"))
    assert [(b.layer, b.expert, b.slot) for _, b in again] == [(3, 4, reads[0].slot)]
    done = rig.core.handle(b"io.0", msg(ReadDone(3, 4, reads[0].slot), "io.0", "00000002"))
    assert [(type(b), b.expert) for _, b in done] == [(Granted, 4)]
    # the old incarnation's report, arriving late, changes nothing
    assert rig.core.handle(b"io.0", msg(ReadDone(3, 4, reads[0].slot), "io.0", "00000001")) == []


def test_a_failed_read_is_reported_and_leaves_nothing(rig):
    out = rig.core.handle(b"engine.0", msg(Acquire(1, 3, [1])))
    (read,) = [b for _, b in out if isinstance(b, Read)]
    back = rig.core.handle(b"io.0", msg(ReadDone(3, 1, read.slot, "EIO"), "io.0", "00000001"))
    assert [(b.expert, b.error) for _, b in back] == [(1, "EIO")]
    assert rig.tier.cache.slot_of((3, 1)) is None and (3, 1) not in rig.core.leased


def test_a_restarted_cache_keeps_what_was_ready_and_holds_what_was_loading(
    rig, small_store, tmp_path
):
    rig.send(Acquire(1, 0, [0, 1]))
    rig.send(Release(1, [[0, 0]]))  # (0, 1) stays leased
    slot_of = {g.expert: g.slot for g in rig.granted}
    loading = rig.core.handle(b"engine.0", msg(Acquire(2, 4, [7])))  # read never answered
    (read,) = [b for _, b in loading if isinstance(b, Read)]
    rig.core.sync_table()
    again = Rig(small_store, tmp_path, slots=6, arena=rig.arena)
    try:
        cache = again.tier.cache
        assert cache.slot_of((0, 0)) == slot_of[0] and cache.is_ready((0, 0))
        assert cache.leases((0, 1)) == 1 and again.core.leased == {(0, 1): 1}
        assert again.core.held == [read.slot] and read.slot not in cache._free
        again.send(Acquire(3, 0, [0]))  # a hit: nothing read
        assert [g.slot for g in again.granted] == [slot_of[0]]
        assert again.tier.stats.demand_reads == 0
        again.send(Hello("io"), "io.0", "00000003")  # every io answered: the slot is free
        assert again.core.held == [] and read.slot in cache._free
        again.send(Release(1, [[0, 1]]))  # the lease survived the restart, and goes now
        assert cache.leases((0, 1)) == 0
    finally:
        again.close()


def test_the_budget_shrinks_and_grows_live(rig):
    rig.send(Acquire(1, 0, list(range(6))))
    rig.send(Release(1, [[0, e] for e in range(3)]))  # 3, 4, 5 stay leased
    old, new = rig.core.resize(2)
    assert (old, new) == (6, 2)
    vacated = rig.vacated + rig.core.sync_table()
    high = [g.slot for g in rig.granted if g.slot >= 2]
    cache = rig.tier.cache
    leased_high = [s for s in high if cache.leases(cache.key_at(s))]
    assert sorted(vacated) == sorted(set(high) - set(leased_high))
    rig.vacated = vacated
    rig.send(Release(1, [[0, e] for e in range(3, 6)]))  # released: now they go too
    assert sorted(rig.vacated) == sorted(high)
    assert all(s < 2 for s in (cache.slot_of(k) for k in cache.resident()))
    rig.core.resize(6)
    rig.arena.reserve(2, 6)
    rig.granted.clear()
    rig.send(Acquire(2, 5, list(range(6))))
    assert len(rig.granted) == 6 and len({g.slot for g in rig.granted}) == 6


def test_telemetry_answers(rig):
    rig.send(Acquire(1, 0, [0]))
    rig.send(CacheQuery())
    (report,) = [b for b in rig.granted if isinstance(b, CacheReport)]
    assert report.figures["misses"] == 1 and report.figures["bytes_read"] > 0


def test_io_answers_the_cache_hello_once_its_reads_landed(rig):
    out = rig.io.handle(Read(0, 0, 0))
    assert out == [] and rig.io.busy
    assert rig.io.handle(Hello("cache")) == []  # a read still in flight: wait
    seen = []
    deadline = time.monotonic() + 10
    while not any(isinstance(b, Hello) for b in seen) and time.monotonic() < deadline:
        seen += rig.io.poll()
    assert [type(b) for b in seen] == [ReadDone, Hello]
    assert rig.io.handle(Read(0, 0, 10**6))[0].error  # a slot out of the arena: an error


def test_arena_discard_gives_memory_back(tmp_path):
    with Arena(ALIGN + 4 * ALIGN * 16, ALIGN * 16, capacity_slots=64) as arena:
        assert arena.n_slots == 64
        arena.slot_array(1, np.uint8, 16)[:] = 7
        arena.discard(1, 2)
        assert not arena.slot_array(1, np.uint8, 16).any()
        arena.reserve(4, 8)
        arena.slot_array(7, np.uint8, 16)[:] = 3
        assert arena.slot_array(7, np.uint8, 1)[0] == 3
