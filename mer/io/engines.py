"""I/O engines behind ExpertReader: each starts reads into arena memory and reaps completions.

An engine has `start(op, arena, iov, file_off)` (iov: (offset in the arena, bytes) per
destination, filled in order from `file_off`), `flush()`, `reap(block) -> [(op, res)]` (res:
bytes read, or -errno), `close()` and `event_fd`: an eventfd that turns readable when a read
completes (so an actor can wait on it beside its sockets). `Threads` runs os.preadv on a
thread pool (preadv releases the GIL); `Uring` issues io_uring READ (one destination) or READV
requests into arena memory.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from mer.io.arena import Arena

try:
    import liburing
except ImportError:  # pragma: no cover - a dependency, but keep "auto" working without it
    liburing = None


def errno_text(code: int) -> str:
    """The errno name and message of `code`, e.g. EIO (Input/output error)."""
    return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"


def _pread(fd: int, arena: Arena, iov, file_off: int) -> int:
    """os.preadv into arena memory; bytes read, or -errno (the reader retries, not the thread)."""
    with arena.buf as whole:
        views = [whole[at : at + n] for at, n in iov]
        try:
            return os.preadv(fd, views, file_off)
        except OSError as e:
            return -(e.errno or errno.EIO)
        finally:
            for view in views:
                view.release()


class Threads:
    """preadv engine: a thread per in-flight chunk (os.preadv releases the GIL)."""

    def __init__(self, fd: int, depth: int) -> None:
        self._fd = fd
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="mer-io")
        self._futs: dict[Any, int] = {}
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def start(self, op: int, arena: Arena, iov, file_off: int) -> None:
        fut = self._pool.submit(_pread, self._fd, arena, iov, file_off)
        self._futs[fut] = op
        fut.add_done_callback(self._signal)

    def _signal(self, _fut: Any) -> None:
        try:
            os.eventfd_write(self.event_fd, 1)
        except OSError:  # closed meanwhile
            pass

    def flush(self) -> None:
        pass

    def reap(self, block: bool) -> list[tuple[int, int]]:
        done, _ = wait(self._futs, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        return [(self._futs.pop(f), f.result()) for f in done]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self.event_fd)


class Uring:
    """io_uring engine: one READ per chunk straight into arena memory, or one READV for a
    coalesced read.

    The binding takes the destination as a buffer and holds it only for the call that
    prepares the request (it keeps the address in the SQE; an `iovec` keeps addresses too),
    so the arena's mmap is never pinned; the reader keeps the arena open until every started
    read is reaped, and each READV's iovec lives until then.
    """

    def __init__(self, fd: int, depth: int) -> None:
        if liburing is None:
            raise OSError(errno.ENOSYS, "the liburing package is not importable")
        problem = liburing_problem()
        if problem is not None:
            raise OSError(errno.ENOTSUP, problem)
        self._fd = fd
        self._ring = liburing.io_uring()
        liburing.io_uring_queue_init(depth, self._ring)
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        liburing.io_uring_register_eventfd(self._ring, self.event_fd)
        self._cqe = liburing.io_uring_cqe()
        self._iovecs: dict[int, Any] = {}

    def start(self, op: int, arena: Arena, iov, file_off: int) -> None:
        sqe = liburing.io_uring_get_sqe(self._ring)
        with arena.buf as whole:
            views = [whole[at : at + n] for at, n in iov]
            try:
                if len(views) == 1:
                    liburing.io_uring_prep_read(sqe, self._fd, views[0], len(views[0]), file_off)
                else:
                    vec = self._iovecs[op] = liburing.iovec(views)
                    liburing.io_uring_prep_readv(sqe, self._fd, vec, file_off)
            finally:
                for view in views:
                    view.release()
        liburing.io_uring_sqe_set_data64(sqe, op)

    def flush(self) -> None:
        while liburing.io_uring_sq_ready(self._ring):
            try:
                liburing.io_uring_submit(self._ring)
            except (InterruptedError, BlockingIOError):  # transient: try again
                continue

    def reap(self, block: bool) -> list[tuple[int, int]]:
        while block:
            rc = liburing.io_uring_wait_cqe(self._ring, self._cqe)
            if rc == 0:
                break
            if rc != -errno.EINTR:
                raise OSError(-rc, f"io_uring_wait_cqe: {errno_text(-rc)}")
        done = []
        while liburing.io_uring_peek_cqe(self._ring, self._cqe) == 0:
            done.append((self._cqe.user_data, self._cqe.res))
            self._iovecs.pop(self._cqe.user_data, None)
            liburing.io_uring_cqe_seen(self._ring, self._cqe)
        return done

    def close(self) -> None:
        liburing.io_uring_queue_exit(self._ring)
        os.close(self.event_fd)


@functools.cache
def liburing_problem() -> str | None:
    """Why the liburing package cannot run here, or None. Some of its wheels are built for
    newer CPUs than some that run mer (the 2026 ones execute AVX-512 instructions when a ring
    is made, and die of SIGILL without them), and a crash cannot be caught, so a ring is
    made first in a child process, once per process."""
    probe = (
        "import liburing; r = liburing.io_uring(); liburing.io_uring_queue_init(2, r); "
        "liburing.io_uring_queue_exit(r)"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"the liburing probe failed: {err}"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return f"the liburing package dies on this CPU or kernel ({name} when a ring is made)"
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return f"the liburing package cannot make a ring: {last}"
    return None
