"""Read expert weights from a model file into arena slots, many reads in flight.

Backends: "uring" (io_uring READ/READV on an O_DIRECT fd), "preadv" (os.preadv on an O_DIRECT
fd from a pool of `queue_depth` threads) and "buffered" (the same on a plain fd, through the
page cache). "auto" takes the first that works for the file and logs the choice once.

Coalescing: requests submitted together whose byte ranges follow each other in the file (a
store lays a layer's experts end to end) become one vectored read scattering into their
slots — one request to the disk instead of several, which matters when experts are a few MB
and a token needs hundreds of them. Each request is still verified on its own and reported on
its own; a merged read that fails is retried as separate reads.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import xxhash

from mer.errors import MerError
from mer.io.arena import ALIGN, Arena, round_up
from mer.io.engines import Threads, Uring, errno_text

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "uring", "preadv", "buffered")
_LOGGED: set[tuple[str, str]] = set()
_MAX_IOV = 64  # requests in one coalesced read


class ExpertReadError(MerError):
    """Expert bytes could not be read (errno, short read, checksum mismatch), even on retry."""


class ReadRequest(NamedTuple):
    """Read `length` bytes at file `offset` into `arena` slot `slot`, starting `into` bytes into
    the slot (a multiple of 4096 under O_DIRECT); `tag` comes back as is."""

    offset: int
    length: int
    arena: Arena
    slot: int
    expected: int | None = None  # xxh3_64 integer digest of the `length` bytes, or None
    tag: Any = None
    into: int = 0


@dataclass(slots=True)
class ReadResult:
    """One finished request. `error` is None when the slot holds the (verified) bytes."""

    tag: Any
    slot: int
    offset: int
    length: int
    attempts: int
    error: ExpertReadError | None = None

    @property
    def ok(self) -> bool:
        """True when the read succeeded."""
        return self.error is None


@dataclass(slots=True)
class ReaderStats:
    """Counters since the reader opened; `attempts` counts every issue of a request;
    `merged` the requests read by another's read (coalescing); `reads` the reads issued;
    `verified` the requests checked against their digest (a range's first read, or every
    read with `reverify`)."""

    requests: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    bytes_read: int = 0
    merged: int = 0
    reads: int = 0
    verified: int = 0  # requests whose bytes were hashed and matched


Iov = tuple[tuple[int, int], ...]  # (offset in arena.buf, bytes) per destination


@dataclass(slots=True, eq=False)
class _Job:
    reqs: list[ReadRequest]  # one, or several file-adjacent ones read together
    chunks: list[tuple[Iov, int, int]]  # (destinations, file offset, bytes needed)
    attempt: int = 1
    next: int = 0
    outstanding: int = 0
    got: int = 0  # bytes of the request read so far (this attempt)
    short: bool = False
    cause: str | None = None  # errno text of a failed chunk


# Reads of 8 MiB, up to 32 in flight: a layer's demand reads (one or two Mixtral experts of
# ~100 MB) reach the disk as a dozen or more requests at once. A virtio disk delivers more
# with more requests in flight: 16 MiB chunks at depth 16 streamed a Mixtral-shaped model at
# a 25% cache 12-33% slower (docs/design.md, "Read sizes").
CHUNK_BYTES = 8 << 20
QUEUE_DEPTH = 32


def _short(got: int, want: int) -> str:
    return f"short read ({got} of {want} bytes, past end of file?)"


class ExpertReader:
    """Reads byte ranges of one file into arena slots, up to `queue_depth` chunks in flight.

    `backend` is "auto", "uring", "preadv" or "buffered"; `reader.backend` tells which one runs.
    O_DIRECT backends need 4 KiB-aligned file offsets and read whole 4 KiB pages, so a slot must
    hold `length` rounded up to 4 KiB. Reads longer than `chunk_bytes` are split into several
    chunks. With `verify`, a request's `expected` xxh3_64 digest is checked over its `length`
    bytes the first time that range reads back whole; later reads of it are checked again only
    with `reverify` (the file is immutable: corrupt bytes on disk fail at their first read,
    and a disk that cannot read a range answers with an errno; hashing every read costs a
    fifth of a streamed Mixtral's decode). An errno, a short read or a mismatch is retried
    once; a second failure gives an ExpertReadError, never a success with wrong bytes. Not
    thread-safe: use one reader per thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        queue_depth: int = QUEUE_DEPTH,
        backend: str = "auto",
        verify: bool = True,
        reverify: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
        coalesce: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise MerError(f"reader backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if queue_depth < 1 or chunk_bytes < ALIGN or chunk_bytes % ALIGN:
            raise MerError(f"bad reader settings: queue_depth={queue_depth} chunk={chunk_bytes}")
        self.path = os.fspath(path)
        self.queue_depth = queue_depth
        self.verify = verify
        self.reverify = reverify
        self._verified: set[tuple[int, int, int]] = set()  # (offset, length, digest) seen good
        self.coalesce = coalesce
        self.stats = ReaderStats()
        self._chunk = chunk_bytes
        self._pending: deque[_Job] = deque()
        self._ops: dict[int, tuple[_Job, int]] = {}
        self._results: list[ReadResult] = []
        self._next_op = 0
        self._closed = False
        self._fd = -1
        try:
            self.backend, reason = self._open(backend)
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            raise
        self.direct = self.backend != "buffered"
        if (self.backend, reason) not in _LOGGED:
            _LOGGED.add((self.backend, reason))
            logger.info("event=reader_backend backend=%s reason=%s", self.backend, reason)

    def _open(self, want: str) -> tuple[str, str]:
        """Open the fd and engine for `want`; returns (backend, reason)."""
        reason = "requested"
        if want != "buffered":
            try:
                self._fd = self._open_fd(os.O_DIRECT)
                with mmap.mmap(-1, ALIGN) as page:  # page aligned, as O_DIRECT needs
                    os.preadv(self._fd, [page], 0)  # tmpfs & co. may refuse only here
            except OSError as e:
                if want != "auto" or e.errno != errno.EINVAL:
                    raise self._error(
                        0, ALIGN, f"O_DIRECT refused: {errno_text(e.errno or 0)}"
                    ) from e
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                want, reason = "buffered", "o_direct_refused"
        if want == "buffered":
            self._fd = self._open_fd(0)
            self._engine: Threads | Uring = Threads(self._fd, self.queue_depth)
            return "buffered", reason
        if want != "preadv":
            try:
                self._engine = Uring(self._fd, self.queue_depth)
                self._check_uring()
                return "uring", reason if want == "uring" else "io_uring_ok"
            except OSError as e:
                if want == "uring":
                    raise self._error(0, ALIGN, f"io_uring unavailable: {e}") from e
                reason = f"io_uring_unavailable:{errno.errorcode.get(e.errno or 0, 'error')}"
        self._engine = Threads(self._fd, self.queue_depth)
        return "preadv", reason

    def _open_fd(self, flags: int) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | flags)
        except OSError as e:
            if flags and e.errno == errno.EINVAL:
                raise  # O_DIRECT refused by the filesystem: "auto" falls back
            raise self._error(0, 0, f"cannot open: {errno_text(e.errno or 0)}") from e

    def _check_uring(self) -> None:
        """Read the first page with io_uring and with preadv; they must agree."""
        try:
            with Arena(2 * ALIGN, ALIGN) as scratch, mmap.mmap(-1, ALIGN) as page:
                n = os.preadv(self._fd, [page], 0)
                self._engine.start(0, scratch, ((0, ALIGN),), 0)
                self._engine.flush()
                [(_, res)] = self._engine.reap(True)
                with scratch.slot_view(0) as got:
                    if res != n or got[:n] != page[:n]:
                        raise OSError(errno.EIO, f"io_uring self-test got {res} bytes, wrong")
        except BaseException:
            self._engine.close()
            raise

    def _error(self, offset: int, length: int, cause: str) -> ExpertReadError:
        return ExpertReadError(f"{self.path}: read of {length} bytes at offset {offset}: {cause}")

    def fileno(self) -> int:
        """An eventfd that turns readable when a read completes (read it to clear it)."""
        return self._engine.event_fd

    @property
    def busy(self) -> bool:
        """True while submitted requests have not all finished."""
        return bool(self._ops or self._pending)

    def submit(self, requests: Iterable[ReadRequest | tuple]) -> None:
        """Queue requests (offset, length, arena, slot, expected, tag, into); I/O starts now.
        File-adjacent requests among them are read together (module docstring)."""
        reqs = [ReadRequest(*r) for r in requests]
        for r in reqs:  # validate all before queueing any
            self._check(r)
        groups = self._groups(reqs) if self.coalesce and len(reqs) > 1 else [[r] for r in reqs]
        self._pending.extend(self._job(group) for group in groups)
        self.stats.requests += len(reqs)
        self.stats.merged += len(reqs) - len(groups)
        self._pump()

    def _span(self, r: ReadRequest) -> int:
        """Bytes the read of `r` moves (whole pages under O_DIRECT)."""
        return round_up(r.length) if self.direct else r.length

    def _check(self, r: ReadRequest) -> None:
        if r.length <= 0 or r.offset < 0:
            raise self._error(r.offset, r.length, "need a positive length and offset >= 0")
        if self.direct and (r.offset % ALIGN or r.into % ALIGN):
            raise self._error(r.offset, r.length, f"offset not {ALIGN}-aligned, O_DIRECT needs it")
        span = self._span(r)
        if not 0 <= r.slot < r.arena.n_slots or not 0 <= r.into <= r.arena.slot_size - span:
            raise self._error(r.offset, r.length, f"does not fit slot {r.slot} of the arena")

    def _groups(self, reqs: list[ReadRequest]) -> list[list[ReadRequest]]:
        """`reqs` as runs that follow each other in the file, each run at most one chunk of
        bytes and _MAX_IOV requests, in the order of each run's first request."""
        order = sorted(range(len(reqs)), key=lambda i: reqs[i].offset)
        runs: list[list[int]] = []
        end = -1
        for i in order:
            r = reqs[i]
            run = runs[-1] if runs else None
            if (
                run is not None
                and r.offset == end
                and r.arena is reqs[run[0]].arena
                and len(run) < _MAX_IOV
                and end + self._span(r) - reqs[run[0]].offset <= self._chunk
            ):
                run.append(i)
            else:
                runs.append([i])
            end = r.offset + self._span(r)
        runs.sort(key=min)
        return [[reqs[i] for i in run] for run in runs]

    def _job(self, reqs: list[ReadRequest]) -> _Job:
        if len(reqs) > 1:  # one vectored read, one destination per request
            iov = tuple((r.arena.slot_offset(r.slot) + r.into, self._span(r)) for r in reqs)
            need = sum(self._span(r) for r in reqs[:-1]) + reqs[-1].length
            return _Job(reqs, [(iov, reqs[0].offset, need)])
        (r,) = reqs
        span, step = self._span(r), self._chunk
        base = r.arena.slot_offset(r.slot) + r.into
        chunks = [
            (((base + p, min(step, span - p)),), r.offset + p, max(0, min(step, r.length - p)))
            for p in range(0, span, step)
        ]
        return _Job(reqs, chunks)

    def _pump(self) -> None:
        issued = False
        while self._pending and len(self._ops) < self.queue_depth and not self._closed:
            job = self._pending[0]
            if job.next == 0:
                self.stats.attempts += len(job.reqs)
            iov, file_off, need = job.chunks[job.next]
            op, self._next_op = self._next_op, self._next_op + 1
            self._ops[op] = (job, need)
            self.stats.reads += 1
            self._engine.start(op, job.reqs[0].arena, iov, file_off)
            job.next += 1
            job.outstanding += 1
            issued = True
            if job.next == len(job.chunks):
                self._pending.popleft()
        if issued:
            self._engine.flush()

    def poll(self, block: bool = True) -> list[ReadResult]:
        """Results finished since the last call, in completion order; waits for one if `block`."""
        self._pump()
        if self._ops:
            self._complete(self._engine.reap(False))
        while block and not self._results and self._ops:
            self._complete(self._engine.reap(True))
        out, self._results = self._results, []
        return out

    def _complete(self, done: list[tuple[int, int]]) -> None:
        for op, res in done:
            job, need = self._ops.pop(op)
            job.outstanding -= 1
            if res < 0:
                job.cause = job.cause or errno_text(-res)
            else:
                job.got += min(res, need)
                job.short |= res < need
                self.stats.bytes_read += res
            if job.outstanding == 0 and job.next == len(job.chunks):
                self._finish(job)
        self._pump()

    def _finish(self, job: _Job) -> None:
        if job.cause is None and job.short:
            job.cause = _short(job.got, sum(r.length for r in job.reqs))
        retry = []
        for r in job.reqs:
            cause = job.cause
            if cause is None:
                with r.arena.slot_view(r.slot) as view, view[r.into : r.into + r.length] as data:
                    cause = self._mismatch(data, r.offset, r.expected)
            if cause is not None and job.attempt == 1 and not self._closed:
                retry.append(r)  # alone: a merged read that failed is retried request by request
                continue
            err = None
            if cause is not None:
                self.stats.failures += 1
                err = self._error(r.offset, r.length, f"{cause}, after {job.attempt} attempts")
            self._results.append(ReadResult(r.tag, r.slot, r.offset, r.length, job.attempt, err))
        for r in reversed(retry):  # retries go first: someone is waiting on these slots
            self.stats.retries += 1
            again = self._job([r])
            again.attempt = 2
            self._pending.appendleft(again)

    def read_many(
        self, requests: Iterable[ReadRequest | tuple], *, check: bool = True
    ) -> list[ReadResult]:
        """Submit `requests`, wait for everything outstanding, return results (completion order).

        With `check`, raises the first ExpertReadError once all reads have finished.
        """
        self.submit(requests)
        out: list[ReadResult] = []
        while self.busy or self._results:
            out += self.poll()
        bad = next((r.error for r in out if r.error is not None), None)
        if check and bad is not None:
            raise bad
        return out

    def read_into(self, offset: int, length: int, out: Any, expected: int | None = None) -> int:
        """Blocking read of `length` bytes at any `offset` into the writable buffer `out`.

        Goes through a page-aligned bounce buffer, so offset, length and `out` need no alignment.
        Retries once like `submit`; returns `length` or raises ExpertReadError.
        """
        with memoryview(out).cast("B") as dst:
            if length <= 0 or offset < 0 or len(dst) < length:
                raise self._error(offset, length, f"bad range for a {len(dst)}-byte buffer")
            start = offset - offset % ALIGN
            skip, span = offset - start, round_up(offset + length) - start
            for attempt in (1, 2):
                self.stats.attempts += 1
                with mmap.mmap(-1, span) as page:
                    try:
                        n = os.preadv(self._fd, [page], start) - skip
                        cause = None if n >= length else _short(max(n, 0), length)
                    except OSError as e:
                        cause = errno_text(e.errno or errno.EIO)
                    if cause is None:
                        with memoryview(page) as src:
                            dst[:length] = src[skip : skip + length]
                cause = cause or self._mismatch(dst[:length], offset, expected)
                if cause is None:
                    self.stats.bytes_read += length
                    return length
                self.stats.retries += attempt == 1
        self.stats.failures += 1
        raise self._error(offset, length, f"{cause}, after 2 attempts")

    def _mismatch(self, data: memoryview, offset: int, expected: int | None) -> str | None:
        """Why `data`, read from `offset`, fails verification, or None."""
        if not self.verify or expected is None:
            return None
        seen = (offset, len(data), expected)
        if seen in self._verified and not self.reverify:
            return None
        got = xxhash.xxh3_64_intdigest(data)
        if got == expected:
            self.stats.verified += 1
            self._verified.add(seen)
            return None
        return f"checksum mismatch (xxh3_64 {got:#018x}, expected {expected:#018x})"

    def close(self) -> None:
        """Wait for reads in flight (the kernel may still be writing slots), then release all."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        while self._ops:
            self._complete(self._engine.reap(True))
        self._engine.close()
        os.close(self._fd)

    def __enter__(self) -> ExpertReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
