"""A shared-memory arena of fixed-size, 4 KiB-aligned slots that expert weights are read into.

The arena is one `multiprocessing.shared_memory.SharedMemory` region cut into equal slots. Slot
offsets and sizes are multiples of 4096, and the region itself is page aligned (it is an mmap), so
every slot can be the target of an O_DIRECT read. Other processes open the same region with
`Arena.attach(name)` and see the bytes without a copy.

Ownership rule: a slot is only ever written by the reader (`mer.io.reader.ExpertReader`), and only
while no one else is using it; everyone else treats slot memory as read-only. The arena does not
lock anything: the process that hands slots to the reader decides when a slot may be refilled.
"""

from __future__ import annotations

import ctypes
import os
from multiprocessing.shared_memory import SharedMemory

import numpy as np
from numpy.typing import DTypeLike

from mer.errors import MerError
from mer.io import shm as shm_names

ALIGN = 4096
_PUNCH_HOLE, _KEEP_SIZE = 0x02, 0x01  # fallocate(2) modes
_LIBC = ctypes.CDLL(None, use_errno=True)
_MAGIC = 0x4D45524152454E41  # "MERARENA": marks the header page that makes `attach(name)` work


def round_up(n: int, align: int = ALIGN) -> int:
    """`n` rounded up to a multiple of `align`."""
    return -(-n // align) * align


class Arena:
    """`n_slots` slots of `slot_size` bytes (a multiple of 4096) in one shared-memory region.

    `Arena(budget_bytes, slot_bytes)` makes slots of `slot_bytes` rounded up to 4 KiB, as many as
    fit in the budget after a one-page header (magic, slot size, slot count) that lets
    `Arena.attach(name)` rebuild the layout. Creation pre-faults every page so the first read into
    a slot does not pay for page faults. With `capacity_slots` above what the budget holds, the
    region has room for that many slots but only the budget's are backed by memory: a cache
    budget then grows (`reserve`) and shrinks (`discard`) while every process keeps its
    mapping. The creator `unlink()`s the region when done (leaving the
    `with` block does it); attached processes only `close()`. The region is named after its
    owner (`mer.io.shm`: this process unless `owner` says otherwise), so that a later mer start
    removes it if the owner is killed before it can unlink it.
    """

    def __init__(
        self,
        budget_bytes: int,
        slot_bytes: int,
        *,
        name: str | None = None,
        owner: shm_names.Owner | None = None,
        capacity_slots: int | None = None,
    ) -> None:
        if slot_bytes <= 0:
            raise MerError(f"arena slot size must be positive, got {slot_bytes} bytes")
        slot_size = round_up(slot_bytes)
        n_slots = (budget_bytes - ALIGN) // slot_size
        if n_slots < 1:
            raise MerError(f"arena budget of {budget_bytes} bytes holds no {slot_size}-byte slot")
        capacity = max(n_slots, capacity_slots or 0)
        size = ALIGN + capacity * slot_size
        shm_names.sweep_orphans()  # dead owners' arenas would count against /dev/shm's room
        try:
            shm = shm_names.create(name or shm_names.segment_name("arena", owner), size)
        except OSError as e:
            raise MerError(
                f"cannot create a shared-memory arena of {size / 2**20:.1f} MiB: {e.strerror}"
            ) from e
        self._setup(shm, owner=True)
        np.frombuffer(self._buf, dtype=np.uint64, count=3)[:] = (_MAGIC, slot_size, capacity)
        self._read_header()
        try:
            self.reserve(0, n_slots)
        except MerError:
            self.close()
            shm_names.unlink(shm.name)
            raise

    def reserve(self, first: int, last: int) -> None:
        """Back slots first..last-1 with memory (an arena made with room for more slots than
        its budget is sparse beyond it): an overfull /dev/shm is then ENOSPC here, not SIGBUS
        later. The pages are allocated (zeroed) now and read once, so the first read into a
        slot does not pay for page faults; bytes already there are kept."""
        start = 0 if first == 0 else ALIGN + first * self.slot_size
        end = ALIGN + last * self.slot_size
        if end <= start:
            return
        try:
            os.posix_fallocate(self._shm._fd, start, end - start)  # type: ignore[attr-defined]
        except OSError as e:
            raise MerError(
                f"cannot reserve {(end - start) / 2**20:.1f} MiB of shared memory in "
                f"{shm_names.SHM_DIR}: {e.strerror} (choose a smaller cache budget)"
            ) from e
        pages = np.frombuffer(self._buf, dtype=np.uint8, count=end - start, offset=start)
        int(pages[::ALIGN].sum())  # a read per page maps it here
        del pages

    def discard(self, first: int, last: int) -> None:
        """Give the memory of slots first..last-1 back (their bytes read as zeros after)."""
        if first >= last:
            return
        off, length = ALIGN + first * self.slot_size, (last - first) * self.slot_size
        fd = self._shm._fd  # type: ignore[attr-defined]
        mode = _PUNCH_HOLE | _KEEP_SIZE
        if _LIBC.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(length)) != 0:
            err = ctypes.get_errno()
            raise MerError(f"cannot free arena slots {first}..{last - 1}: {os.strerror(err)}")

    def _setup(self, shm: SharedMemory, *, owner: bool) -> None:
        self._shm = shm
        self._buf: memoryview = shm.buf
        self.owner = owner
        self._closed = False
        self._unlinked = False
        # Base address for io_uring iovecs. The ctypes object exports a buffer, so drop it at once.
        probe = ctypes.c_char.from_buffer(self._buf)
        self.address: int = ctypes.addressof(probe) + ALIGN
        del probe

    def _read_header(self) -> None:
        magic, slot_size, n_slots = (int(x) for x in np.frombuffer(self._buf, np.uint64, 3))
        if magic != _MAGIC or ALIGN + slot_size * n_slots > len(self._buf) or slot_size % ALIGN:
            raise MerError(f"shared memory {self._shm.name!r} is not a mer arena")
        self.slot_size = slot_size
        self.n_slots = n_slots

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Open, by name, an arena that another process created."""
        arena = cls.__new__(cls)
        try:
            shm = shm_names.attach(name)
        except OSError as e:
            raise MerError(f"cannot open shared-memory arena {name!r}: {e.strerror}") from e
        arena._setup(shm, owner=False)
        try:
            arena._read_header()
        except MerError:
            arena.close()
            raise
        return arena

    @property
    def name(self) -> str:
        """The name other processes pass to `Arena.attach`."""
        return self._shm.name

    @property
    def buf(self) -> memoryview:
        """All slots as one writable memoryview; slot `i` starts at `slot_offset(i)`."""
        return self._buf[ALIGN:]

    def slot_offset(self, i: int) -> int:
        """Byte offset of slot `i` in `buf` (a multiple of 4096)."""
        if not 0 <= i < self.n_slots:
            raise IndexError(f"slot {i} out of range for an arena of {self.n_slots} slots")
        return i * self.slot_size

    def slot_view(self, i: int) -> memoryview:
        """Slot `i` as a writable memoryview (no copy). Release it before `close()`."""
        off = ALIGN + self.slot_offset(i)
        return self._buf[off : off + self.slot_size]

    def slot_array(self, i: int, dtype: DTypeLike, count: int, offset: int = 0) -> np.ndarray:
        """`count` items of `dtype` starting `offset` bytes into slot `i`, as a zero-copy array."""
        dt = np.dtype(dtype)
        if offset < 0 or count < 0 or offset + count * dt.itemsize > self.slot_size:
            raise IndexError(
                f"{count} x {dt} at byte {offset} does not fit a {self.slot_size}-byte slot"
            )
        start = ALIGN + self.slot_offset(i) + offset
        return np.frombuffer(self._buf, dtype=dt, count=count, offset=start)

    def close(self) -> None:
        """Unmap the region in this process. Views and arrays of it must be gone by then."""
        if not self._closed:
            self._buf.release()
            self._shm.close()
            self._closed = True

    def unlink(self) -> None:
        """Remove the region's name (creator only); existing mappings stay valid until closed."""
        if self.owner and not self._unlinked:
            shm_names.unlink(self._shm.name)
            self._unlinked = True

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.unlink()
