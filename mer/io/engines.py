"""I/O engines behind ExpertReader: each starts reads into arena memory and reaps completions.

An engine has `start(op, arena, buf_off, n, file_off)`, `flush()`, `reap(block) -> [(op, res)]`
(res: bytes read, or -errno), `close()` and `event_fd`: an eventfd that turns readable when a
read completes (so an actor can wait on it beside its sockets). `Threads` runs os.preadv on a
thread pool (preadv releases the GIL); `Uring` issues io_uring READV requests whose iovecs
point at arena memory.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import struct
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from mer.io.arena import Arena

try:
    import liburing
except ImportError:  # pragma: no cover - a dependency, but keep "auto" working without it
    liburing = None

_HEAD = object.__basicsize__  # PyObject header that precedes liburing.Iovec's {len, iovec*}


def errno_text(code: int) -> str:
    """The errno name and message of `code`, e.g. EIO (Input/output error)."""
    return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"


def _pread(fd: int, arena: Arena, buf_off: int, n: int, file_off: int) -> int:
    """os.preadv into arena memory; bytes read, or -errno (the reader retries, not the thread)."""
    with arena.buf as whole, whole[buf_off : buf_off + n] as view:
        try:
            return os.preadv(fd, [view], file_off)
        except OSError as e:
            return -(e.errno or errno.EIO)


class Threads:
    """preadv engine: a thread per in-flight chunk (os.preadv releases the GIL)."""

    def __init__(self, fd: int, depth: int) -> None:
        self._fd = fd
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="mer-io")
        self._futs: dict[Any, int] = {}
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def start(self, op: int, arena: Arena, buf_off: int, n: int, file_off: int) -> None:
        fut = self._pool.submit(_pread, self._fd, arena, buf_off, n, file_off)
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
    """io_uring engine: one READV per chunk, its iovec pointed straight at arena memory.

    liburing.Iovec holds a buffer export on any memoryview it is given and never releases it,
    which would pin the arena's mmap forever. So a pool of one-entry Iovecs is made once from
    throwaway bytearrays and their iovec (base, len) is rewritten in place before each read; the
    layout is checked against a known buffer first.
    """

    def __init__(self, fd: int, depth: int) -> None:
        if liburing is None:
            raise OSError(errno.ENOSYS, "the liburing package is not importable")
        problem = liburing_problem()
        if problem is not None:
            raise OSError(errno.ENOTSUP, problem)
        if not _iovec_layout_ok():
            raise OSError(errno.ENOTSUP, "unexpected liburing.Iovec memory layout")
        self._fd = fd
        self._ring = liburing.Ring()
        liburing.io_uring_queue_init(depth, self._ring)
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        liburing.io_uring_register_eventfd(self._ring, self.event_fd)
        self._cqe = liburing.Cqe()
        self._free = [_one_iovec() for _ in range(depth)]
        self._busy: dict[int, tuple[Any, Any]] = {}

    def start(self, op: int, arena: Arena, buf_off: int, n: int, file_off: int) -> None:
        iov, entry = item = self._free.pop()
        entry[0], entry[1] = arena.address + buf_off, n
        sqe = liburing.io_uring_get_sqe(self._ring)
        liburing.io_uring_prep_readv(sqe, self._fd, iov, file_off)
        liburing.io_uring_sqe_set_data64(sqe, op)
        self._busy[op] = item

    def flush(self) -> None:
        while liburing.io_uring_sq_ready(self._ring):
            try:
                liburing.io_uring_submit(self._ring)
            except (InterruptedError, BlockingIOError):  # transient: try again
                continue

    def reap(self, block: bool) -> list[tuple[int, int]]:
        while block:
            try:
                liburing.io_uring_wait_cqe(self._ring, self._cqe)
                break
            except InterruptedError:
                continue
        done = []
        for _ in liburing.CqeIter(self._ring, self._cqe):
            cqe = self._cqe[0]
            try:
                res = cqe.res
            except OSError as e:  # the binding raises for a negative res
                res = -(e.errno or errno.EIO)
            done.append((cqe.user_data, res))
        if done:
            liburing.io_uring_cq_advance(self._ring, len(done))
        for op, _ in done:
            self._free.append(self._busy.pop(op))
        return done

    def close(self) -> None:
        liburing.io_uring_queue_exit(self._ring)
        os.close(self.event_fd)


@functools.cache
def liburing_problem() -> str | None:
    """Why the liburing package cannot run here, or None. Its wheels are built for newer CPUs
    than some that run mer (the 2026 wheels execute AVX-512 instructions when a ring is
    made, and die of SIGILL on a CPU without them), and a crash cannot be caught, so a ring
    is made first in a child process, once per process."""
    probe = (
        "import liburing; r = liburing.Ring(); liburing.io_uring_queue_init(2, r); "
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


def _iovec_entry(iov: Any) -> Any:
    """The (iov_base, iov_len) pair of a one-entry liburing.Iovec, as a writable ctypes array."""
    ptr = ctypes.c_size_t.from_address(id(iov) + _HEAD + 8).value
    return (ctypes.c_size_t * 2).from_address(ptr)


def _one_iovec() -> tuple[Any, Any]:
    iov = liburing.Iovec([bytearray(1)])
    return iov, _iovec_entry(iov)


def _iovec_layout_ok() -> bool:
    """Whether liburing.Iovec is laid out as _iovec_entry assumes, checked on a known buffer.

    Memory is peeked through /proc/self/mem, so a wrong guess reads EIO instead of crashing.
    """
    ba = bytearray(8192)
    iov = liburing.Iovec([ba])
    pin = ctypes.c_char.from_buffer(ba)
    addr = ctypes.addressof(pin)
    del pin
    if type(iov).__basicsize__ < _HEAD + 16:
        return False
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            n, ptr = struct.unpack("NN", os.pread(fd, 16, id(iov) + _HEAD))
            entry = struct.unpack("NN", os.pread(fd, 16, ptr)) if n == 1 else None
        finally:
            os.close(fd)
    except (OSError, OverflowError, struct.error):
        return False
    return entry == (addr, len(ba))
