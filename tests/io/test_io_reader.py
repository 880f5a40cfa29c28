"""ExpertReader: every backend reads the right bytes, fails loudly, and falls back sanely."""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
from pathlib import Path

import liburing
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mer.io.reader as reader_mod
from mer.errors import MerError
from mer.io.arena import ALIGN, Arena
from mer.io.reader import ExpertReader, ExpertReadError

BACKENDS = ["uring", "preadv", "buffered", "auto"]
MiB = 1 << 20


def h(b: bytes) -> int:
    return xxhash.xxh3_64_intdigest(b)


def slot_bytes(arena: Arena, slot: int, n: int) -> bytes:
    with arena.slot_view(slot) as v:
        return bytes(v[:n])


@pytest.fixture(scope="module")
def big(disk_dir: Path, make_file):
    return make_file(disk_dir, 24 * MiB + 1234, seed=1)  # size not a multiple of 4 KiB


@pytest.fixture(scope="module")
def arena():
    with Arena(26 * 8 * MiB, 8 * MiB) as a:
        yield a


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_random_data_into_slots(backend: str, big, arena: Arena) -> None:
    path, data = big
    lengths = [1, 4095, 4096, 4097, 65536, MiB, 3 * MiB + 5, 4 * MiB, 8 * MiB, 7 * MiB + 4095]
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(arena.n_slots - 1):
        n = lengths[i % len(lengths)]
        off = int(rng.integers(0, (len(data) - n) // ALIGN + 1)) * ALIGN
        reqs.append((off, n, arena, i, h(data[off : off + n]) if i % 2 else None, ("t", i)))
    reqs.append((len(data) - 1234, 1234, arena, arena.n_slots - 1, None, ("tail",)))
    with ExpertReader(path, backend=backend, queue_depth=8, chunk_bytes=MiB) as r:
        assert r.backend in ("uring", "preadv") if backend == "auto" else r.backend == backend
        results = r.read_many(reqs[:-1])
        results += r.read_many([reqs[-1]])
        assert r.stats.retries == 0
    assert sorted(x.tag for x in results) == sorted(q[5] for q in reqs)
    by_tag = {q[5]: q for q in reqs}
    for res in results:
        off, n, _, slot, _, _ = by_tag[res.tag]
        assert res.ok and res.attempts == 1 and res.slot == slot
        assert slot_bytes(arena, slot, n) == data[off : off + n], res.tag


class Reversing:
    """Wraps a reader engine so each batch of completions comes back in reverse issue order."""

    def __init__(self, inner) -> None:
        self.inner, self.in_flight = inner, 0

    def start(self, *args) -> None:
        self.in_flight += 1
        self.inner.start(*args)

    def flush(self) -> None:
        self.inner.flush()

    def reap(self, block: bool) -> list[tuple[int, int]]:
        held = []
        while self.in_flight:  # wait for everything in flight, then complete it backwards
            got = self.inner.reap(True)
            self.in_flight -= len(got)
            held += got
        return sorted(held, reverse=True)  # newest issued first

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_out_of_order_completions(backend, big, arena: Arena) -> None:
    # The device here completes in submission order, so reverse completions on purpose.
    path, data = big
    reqs = [
        (i * 3 * MiB, 2 * MiB + i, arena, i, h(data[i * 3 * MiB : i * 3 * MiB + 2 * MiB + i]), i)
        for i in range(8)
    ]
    with ExpertReader(path, backend=backend, queue_depth=5, chunk_bytes=MiB) as r:
        r._engine = Reversing(r._engine)
        tags = [x.tag for x in r.read_many(reqs)]
    assert tags != sorted(tags) and sorted(tags) == list(range(8))
    for off, n, _, slot, _, _ in reqs:
        assert slot_bytes(arena, slot, n) == data[off : off + n]


def test_streaming_submit_and_poll(big, arena: Arena) -> None:
    path, data = big
    with ExpertReader(path, backend="uring", queue_depth=4, chunk_bytes=MiB) as r:
        r.submit(
            [
                (i * 4 * MiB, 4 * MiB, arena, i, h(data[i * 4 * MiB : (i + 1) * 4 * MiB]), i)
                for i in range(6)
            ]
        )
        seen = []
        while r.busy:
            seen += [x.tag for x in r.poll() if x.ok]
        assert sorted(seen) == list(range(6))
        assert r.poll(block=False) == []


def _child_hashes(name: str, slots: list[int], n: int, out: mp.Queue) -> None:
    arena = Arena.attach(name)
    out.put([h(slot_bytes(arena, s, n)) for s in slots])
    arena.close()


@pytest.mark.parametrize("backend", ["uring", "preadv"])
def test_second_process_sees_read_data(backend: str, big, arena: Arena) -> None:
    path, data = big
    n = 2 * MiB + 17
    with ExpertReader(path, backend=backend) as r:
        r.read_many([(i * 2 * MiB, n, arena, i, None, i) for i in range(4)])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child_hashes, args=(arena.name, list(range(4)), n, out))
    proc.start()
    got = out.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert got == [h(data[i * 2 * MiB : i * 2 * MiB + n]) for i in range(4)]


def test_auto_on_tmpfs(tmpfs_dir: Path, make_file, arena: Arena, takes_o_direct) -> None:
    path, data = make_file(tmpfs_dir, 3 * MiB, seed=3)
    with ExpertReader(path) as r:
        r.read_many([(ALIGN, MiB, arena, 0, h(data[ALIGN : ALIGN + MiB]), 0)])
        backend = r.backend
    # Older kernels' tmpfs refuses O_DIRECT (EINVAL): then "auto" must read buffered.
    # Since Linux 6.6 tmpfs accepts O_DIRECT, so a direct backend is right there.
    assert backend == ("uring" if takes_o_direct(tmpfs_dir) else "buffered")
    assert slot_bytes(arena, 0, MiB) == data[ALIGN : ALIGN + MiB]


@pytest.mark.parametrize("where", ["open", "first_read"])
def test_auto_falls_back_to_buffered(where, big, arena, monkeypatch, caplog) -> None:
    path, data = big
    real_open, real_preadv = os.open, os.preadv

    def fake_open(p, flags, *a, **k):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a, **k)

    def fake_preadv(fd, bufs, off, *a):
        if where == "first_read" and fcntl_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, off, *a)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    monkeypatch.setattr(reader_mod, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="mer.io.reader"):
        with ExpertReader(path) as r:
            assert r.backend == "buffered"
            r.read_many([(100, 5000, arena, 0, h(data[100:5100]), 0)])  # unaligned is fine here
    assert slot_bytes(arena, 0, 5000) == data[100:5100]
    lines = [m for m in caplog.messages if m.startswith("event=reader_backend")]
    assert lines == ["event=reader_backend backend=buffered reason=o_direct_refused"]


def fcntl_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_auto_falls_back_to_preadv_without_io_uring(big, arena, monkeypatch, caplog) -> None:
    path, data = big

    def no_uring(*a, **k):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(liburing, "io_uring_queue_init", no_uring)
    monkeypatch.setattr(reader_mod, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="mer.io.reader"):
        with ExpertReader(path) as r:
            assert r.backend == "preadv"
            r.read_many([(0, MiB, arena, 0, h(data[:MiB]), 0)])
    assert (
        "event=reader_backend backend=preadv reason=io_uring_unavailable:ENOSYS" in caplog.messages
    )
    with pytest.raises(ExpertReadError, match="io_uring unavailable"):
        ExpertReader(path, backend="uring")


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_flipped_byte_fails_after_exactly_one_retry(
    backend, disk_dir, make_file, arena, monkeypatch
):
    path, data = make_file(disk_dir, 6 * MiB, seed=4)
    good = h(data[MiB : 5 * MiB])
    with open(path, "r+b") as f:  # flip one byte on disk
        f.seek(3 * MiB + 77)
        f.write(bytes([data[3 * MiB + 77] ^ 0x40]))
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, b, o, *a: calls.append(o) or real(fd, b, o, *a))
    with ExpertReader(path, backend=backend, chunk_bytes=MiB) as r:
        calls.clear()
        [res] = r.read_many([(MiB, 4 * MiB, arena, 0, good, "x")], check=False)
        first_calls = len(calls)
        assert r.stats.attempts == 2 and r.stats.retries == 1 and r.stats.failures == 1
        with pytest.raises(ExpertReadError) as err:
            r.read_many([(MiB, 4 * MiB, arena, 0, good, "y")])
    assert res.attempts == 2 and not res.ok
    if backend != "uring":
        assert first_calls == 2 * 4  # 4 one-MiB chunks, read twice
    for msg in (str(res.error), str(err.value)):
        assert str(path) in msg and f"offset {MiB}" in msg and "checksum mismatch" in msg
        assert "\n" not in msg and isinstance(err.value, MerError)


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_a_range_is_hashed_at_its_first_good_read(backend, disk_dir, make_file, arena) -> None:
    """The store is immutable: a range that read back whole and matched is not hashed again
    (reverify=True hashes every read); a reader that has not read it yet still checks it."""
    path, data = make_file(disk_dir, 4 * MiB, seed=9)
    good = h(data[MiB : 3 * MiB])
    req = (MiB, 2 * MiB, arena, 0, good, "x")
    with (
        ExpertReader(path, backend=backend) as once,
        ExpertReader(path, backend=backend, reverify=True) as every,
    ):
        for _ in range(3):
            assert once.read_many([req])[0].ok and every.read_many([req])[0].ok
        assert once.stats.verified == 1 and every.stats.verified == 3
        assert once.read_into(MiB, 2 * MiB, bytearray(2 * MiB), good) == 2 * MiB
        assert once.stats.verified == 1  # the blocking path shares what was checked
        with open(path, "r+b") as f:  # the file changes under the readers (it must not)
            f.seek(2 * MiB + 5)
            f.write(bytes([data[2 * MiB + 5] ^ 1]))
            f.flush()
            os.fsync(f.fileno())
        [res] = every.read_many([req], check=False)
        assert not res.ok and "checksum mismatch" in str(res.error)
        with ExpertReader(path, backend=backend) as fresh:
            [res] = fresh.read_many([req], check=False)
            assert not res.ok and "checksum mismatch" in str(res.error)


def broken_disk(*args) -> int:
    raise OSError(errno.EIO, "Input/output error")


def test_transient_eio_is_retried(big, arena, monkeypatch) -> None:
    path, data = big
    real, failed = os.preadv, []

    def flaky(fd, bufs, off, *a):
        if off == 2 * MiB and not failed:
            failed.append(off)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, off, *a)

    with ExpertReader(path, backend="preadv") as r:
        monkeypatch.setattr(os, "preadv", flaky)
        [res] = r.read_many([(2 * MiB, MiB, arena, 0, None, 0)])
        assert res.ok and res.attempts == 2 and failed == [2 * MiB]
        failed.clear()
        monkeypatch.setattr(os, "preadv", broken_disk)
        with pytest.raises(ExpertReadError, match=r"offset 0: EIO \(Input/output error\), after 2"):
            r.read_many([(0, MiB, arena, 0, None, 0)])


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_read_past_end_of_file_is_an_error(backend, big, arena) -> None:
    path, data = big
    end = len(data) // ALIGN * ALIGN
    with ExpertReader(path, backend=backend) as r:
        with pytest.raises(ExpertReadError, match=f"offset {end}: short read"):
            r.read_many([(end, 2 * MiB, arena, 0, None, 0)])
        [res] = r.read_many([(end + 4 * MiB, ALIGN, arena, 0, None, 0)], check=False)
        assert "short read (0 of 4096" in str(res.error) and res.attempts == 2
        with pytest.raises(ExpertReadError, match="short read"):
            r.read_into(len(data) - 10, 11, bytearray(11))


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_read_into_any_alignment(backend, big) -> None:
    path, data = big
    with ExpertReader(path, backend=backend) as r:
        for off, n in [(0, 1), (12345, 100_000), (4096, 8192), (len(data) - 7, 7)]:
            buf = bytearray(n + 3)
            assert r.read_into(off, n, buf, expected=h(data[off : off + n])) == n
            assert bytes(buf[:n]) == data[off : off + n]
        arr = np.zeros(1000, np.float32)
        r.read_into(999, 4000, arr)
        assert arr.tobytes() == data[999:4999]


def test_bad_requests_are_mer_errors(big, arena) -> None:
    path, _ = big
    with ExpertReader(path, backend="preadv") as r:
        with pytest.raises(ExpertReadError, match="not 4096-aligned"):
            r.submit([(100, 10, arena, 0, None, 0)])
        with pytest.raises(ExpertReadError, match="does not fit slot"):
            r.submit([(0, arena.slot_size + 1, arena, 0, None, 0)])
        assert not r.busy
    with pytest.raises(ExpertReadError, match="cannot open: ENOENT"):
        ExpertReader(path.with_suffix(".missing"))
    with pytest.raises(MerError, match="backend"):
        ExpertReader(path, backend="mmap")


@pytest.fixture(scope="module")
def small(disk_dir: Path, make_file):
    return make_file(disk_dir, 3 * MiB + 100, seed=9)


@pytest.fixture(scope="module")
def readers(small):
    rs = {
        b: ExpertReader(small[0], backend=b, queue_depth=4, chunk_bytes=256 << 10)
        for b in BACKENDS[:3]
    }
    yield rs
    for r in rs.values():
        r.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    backend=st.sampled_from(BACKENDS[:3]),
    batch=st.lists(
        st.tuples(st.integers(0, 800), st.integers(1, MiB + 5000), st.booleans()),
        min_size=1,
        max_size=12,
    ),
)
def test_random_batches(backend, batch, small, readers, arena) -> None:
    _, data = small
    r = readers[backend]
    reqs = []
    for i, (block, n, check) in enumerate(batch):
        off = block * ALIGN
        expected = h(data[off : off + n]) if check and off + n <= len(data) else None
        reqs.append((off, n, arena, i, expected, i))
    results = r.read_many(reqs, check=False)
    assert sorted(x.tag for x in results) == list(range(len(reqs)))
    for res in results:
        off, n = reqs[res.tag][:2]
        if off + n <= len(data):
            assert res.ok, res.error
            assert slot_bytes(arena, res.slot, n) == data[off : off + n]
        else:
            assert not res.ok and "short read" in str(res.error) and res.attempts == 2


def test_uring_errno_is_reported_and_retried(big, arena, monkeypatch) -> None:
    path, data = big
    with ExpertReader(path, backend="uring") as r:
        # An unaligned buffer under O_DIRECT: the kernel answers EINVAL in the CQE.
        r._engine.start(99, arena, ((1, ALIGN),), 0)
        r._engine.flush()
        assert r._engine.reap(True) == [(99, -errno.EINVAL)]
        real, hits = r._engine.reap, []

        def first_fails(block: bool) -> list[tuple[int, int]]:
            done = real(block)
            if done and not hits:
                hits.append(done[0])
                done[0] = (done[0][0], -errno.EIO)
            return done

        monkeypatch.setattr(r._engine, "reap", first_fails)
        [res] = r.read_many([(0, 3 * MiB, arena, 0, h(data[: 3 * MiB]), 0)])
        assert res.ok and res.attempts == 2 and len(hits) == 1
        assert slot_bytes(arena, 0, 3 * MiB) == data[: 3 * MiB]


@pytest.mark.parametrize("backend", ["uring", "preadv", "buffered"])
def test_segments_land_inside_one_slot(backend: str, big, arena: Arena) -> None:
    """Several reads into one slot at 4 KiB-aligned offsets (`into`), as a GGUF expert's
    gate, up and down matrices are read; a segment that would overflow the slot is refused."""
    path, data = big
    parts = [(8 * ALIGN, 5000, 0), (100 * ALIGN, 3 * ALIGN, 2 * ALIGN), (ALIGN, 70000, 5 * ALIGN)]
    with ExpertReader(path, backend=backend) as r:
        results = r.read_many(
            [
                reader_mod.ReadRequest(off, n, arena, 1, h(data[off : off + n]), i, into)
                for i, (off, n, into) in enumerate(parts)
            ]
        )
        assert all(x.ok for x in results)
        with arena.slot_view(1) as view:
            for off, n, into in parts:
                assert bytes(view[into : into + n]) == data[off : off + n]
        with pytest.raises(ExpertReadError, match="does not fit"):
            r.submit([reader_mod.ReadRequest(0, ALIGN, arena, 1, None, "x", arena.slot_size)])
        if r.direct:
            with pytest.raises(ExpertReadError, match="aligned"):
                r.submit([reader_mod.ReadRequest(0, ALIGN, arena, 1, None, "x", 100)])


def adjacent(data: bytes, arena: Arena, start: int, lengths: list[int], slots: list[int], direct):
    """Requests for consecutive ranges from `start` (each padded to whole pages under
    O_DIRECT, as a store pads its experts), into `slots`."""
    reqs, off = [], start
    for i, (n, slot) in enumerate(zip(lengths, slots, strict=True)):
        reqs.append((off, n, arena, slot, h(data[off : off + n]), ("e", i)))
        off += -(-n // ALIGN) * ALIGN if direct else n
    return reqs


@pytest.mark.parametrize("backend", BACKENDS[:3])
@pytest.mark.parametrize("coalesce", [True, False])
def test_adjacent_requests_are_read_together(backend, coalesce, big, arena) -> None:
    """A layer's misses lying end to end in the file: one vectored read scattering into
    their slots (any order, not adjacent), each request verified and reported on its own."""
    path, data = big
    lengths = [3 * MiB + 5, 4096, 2 * MiB, 777, MiB]
    slots = [7, 2, 11, 0, 5]
    with ExpertReader(path, backend=backend, coalesce=coalesce) as r:
        reqs = adjacent(data, arena, 2 * MiB, lengths, slots, r.direct)
        far = (20 * MiB, 4096, arena, 3, h(data[20 * MiB : 20 * MiB + 4096]), ("far",))
        results = r.read_many(list(reversed(reqs)) + [far])
        assert r.stats.requests == 6 and r.stats.merged == (4 if coalesce else 0)
        assert r.stats.reads == (2 if coalesce else 6)
    assert sorted(res.tag for res in results) == sorted(q[5] for q in [*reqs, far])
    for q in [*reqs, far]:
        off, n, _, slot, _, _ = q
        assert slot_bytes(arena, slot, n) == data[off : off + n]
    assert all(res.ok and res.attempts == 1 for res in results)


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_a_bad_member_of_a_merged_read_is_retried_alone(backend, big, arena) -> None:
    """One request of a merged read fails its checksum: it alone is retried and fails;
    the others are done on the first attempt. A merged read that runs past the end of the
    file is retried request by request: those inside the file succeed."""
    path, data = big
    with ExpertReader(path, backend=backend) as r:
        reqs = adjacent(data, arena, 0, [MiB, MiB, MiB], [1, 2, 3], r.direct)
        bad = (*reqs[1][:4], reqs[1][4] ^ 1, reqs[1][5])
        results = {res.tag: res for res in r.read_many([reqs[0], bad, reqs[2]], check=False)}
        assert [results[q[5]].attempts for q in reqs] == [1, 2, 1]
        assert results[reqs[0][5]].ok and results[reqs[2][5]].ok
        assert "checksum mismatch" in str(results[reqs[1][5]].error)
        assert r.stats.retries == 1 and r.stats.failures == 1
        end = len(data) - len(data) % ALIGN  # the last whole page boundary
        tail = adjacent(data, arena, end - 2 * ALIGN, [ALIGN, ALIGN, ALIGN], [4, 5, 6], True)
        tail[2] = (end, 3 * ALIGN, arena, 6, None, ("e", 2))  # runs past the end
        results = {res.tag: res for res in r.read_many(tail, check=False)}
    assert results[("e", 0)].ok and results[("e", 1)].ok
    assert not results[("e", 2)].ok and "short read" in str(results[("e", 2)].error)
    assert results[("e", 0)].attempts == 2 and results[("e", 2)].attempts == 2
