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
_MAGIC = 0x4D45524152454E41  # "MERARENA": marks the header page that makes `attach(name)` work


def round_up(n: int, align: int = ALIGN) -> int:
    """`n` rounded up to a multiple of `align`."""
    return -(-n // align) * align


class Arena:
    """`n_slots` slots of `slot_size` bytes (a multiple of 4096) in one shared-memory region.

    `Arena(budget_bytes, slot_bytes)` makes slots of `slot_bytes` rounded up to 4 KiB, as many as
    fit in the budget after a one-page header (magic, slot size, slot count) that lets
    `Arena.attach(name)` rebuild the layout. Creation pre-faults every page so the first read into
    a slot does not pay for page faults. The creator `unlink()`s the region when done (leaving the
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
    ) -> None:
        if slot_bytes <= 0:
            raise MerError(f"arena slot size must be positive, got {slot_bytes} bytes")
        slot_size = round_up(slot_bytes)
        n_slots = (budget_bytes - ALIGN) // slot_size
        if n_slots < 1:
            raise MerError(f"arena budget of {budget_bytes} bytes holds no {slot_size}-byte slot")
        size = ALIGN + n_slots * slot_size
        shm_names.sweep_orphans()  # dead owners' arenas would count against /dev/shm's room
        try:
            shm = shm_names.create(name or shm_names.segment_name("arena", owner), size)
        except OSError as e:
            raise MerError(
                f"cannot create a shared-memory arena of {size / 2**20:.1f} MiB: {e.strerror}"
            ) from e
        try:
            # Reserve the pages now: an overfull /dev/shm is then ENOSPC here, not SIGBUS later.
            os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]
        except OSError as e:
            shm.close()
            shm_names.unlink(shm.name)
            raise MerError(
                f"cannot reserve {size / 2**20:.1f} MiB of shared memory in "
                f"{shm_names.SHM_DIR}: {e.strerror} (choose a smaller cache budget)"
            ) from e
        self._setup(shm, owner=True)
        # First touch of fresh memory is slow; pay it now, one byte per 4 KiB page.
        pages = np.frombuffer(self._buf, dtype=np.uint8)[::ALIGN]
        pages[:] = 0
        del pages
        np.frombuffer(self._buf, dtype=np.uint64, count=3)[:] = (_MAGIC, slot_size, n_slots)
        self._read_header()

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
