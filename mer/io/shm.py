"""Shared-memory segments that never outlive their owner for long.

A process killed by SIGKILL (or a whole process group killed by a closed terminal) runs no
clean-up, and POSIX shared memory stays in /dev/shm until reboot: gigabytes with a real
cache budget. Python's resource tracker does not help (it dies with the process group, and
it warns about "leaked" segments the owner meant to keep), so mer names every segment after
its owner and sweeps the ones whose owner is gone:

    mer.<pid>.<start>.<tag>.<random>

pid and start (the owner's start time in clock ticks since boot, /proc/<pid>/stat field 22)
identify the owning process even after its pid is reused. The owner is the process whose
lifetime bounds the segment's: the process itself for `mer generate`, the supervisor for a
service whose actors come and go. `sweep_orphans()` removes every mer segment whose owner is
no longer running; any mer start calls it.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

logger = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")
PREFIX = "mer"
_TRACKER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Owner:
    """A process, told apart from later processes that reuse its pid by its start time."""

    pid: int
    start: int

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        start = process_start(pid)
        return cls(pid, 0 if start is None else start)

    def alive(self) -> bool:
        return process_start(self.pid) == self.start


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def segment_name(tag: str, owner: Owner | None = None) -> str:
    """A fresh segment name for `tag` (letters and digits) owned by `owner` (default: us)."""
    if not tag.isalnum():
        raise ValueError(f"segment tag must be letters and digits, got {tag!r}")
    who = owner or Owner.current()
    return f"{PREFIX}.{who.pid}.{who.start}.{tag}.{secrets.token_hex(4)}"


def parse_owner(name: str) -> Owner | None:
    """The owner encoded in a mer segment name, or None for a name mer did not make."""
    parts = name.split(".")
    if len(parts) != 5 or parts[0] != PREFIX:
        return None
    try:
        return Owner(int(parts[1]), int(parts[2]))
    except ValueError:
        return None


def create(name: str, size: int) -> SharedMemory:
    """Create segment `name` of `size` bytes without the resource tracker adopting it: mer
    unlinks its own segments (and sweeps those of dead owners), so the tracker would only
    print "leaked shared_memory" warnings for segments meant to outlive a child process."""
    return _untracked(name=name, create=True, size=size)


def attach(name: str) -> SharedMemory:
    """Open an existing segment by name, untracked (see `create`)."""
    return _untracked(name=name)


def unlink(name: str) -> None:
    """Remove segment `name` (existing mappings stay valid until closed). Not through
    SharedMemory.unlink, which would ask the resource tracker to forget an untracked name."""
    import _posixshmem  # the module SharedMemory itself uses

    _posixshmem.shm_unlink("/" + name.lstrip("/"))


def _untracked(**kwargs: object) -> SharedMemory:
    try:
        return SharedMemory(**kwargs, track=False)  # type: ignore[call-arg]  # Python 3.13+
    except TypeError:
        pass
    with _TRACKER_LOCK:  # older Pythons register unconditionally: skip the call
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None
        try:
            return SharedMemory(**kwargs)  # type: ignore[arg-type]
        finally:
            resource_tracker.register = register


def remove_owned(owner: Owner, directory: Path = SHM_DIR) -> int:
    """Remove every mer segment `owner` owns (it is shutting down); how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if parse_owner(name) == owner:
            try:
                (directory / name).unlink()
                removed += 1
            except OSError:
                pass
    return removed


def sweep_orphans(directory: Path = SHM_DIR) -> tuple[int, int]:
    """Remove every mer segment whose owner is gone; (segments removed, their bytes).

    Logs one line when it removed anything."""
    removed, total, pids = 0, 0, set()
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, 0
    for name in names:
        owner = parse_owner(name)
        if owner is None or owner.alive():
            continue
        path = directory / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another mer start swept it first
            continue
        except OSError as err:
            logger.warning("event=shm_sweep_failed segment=%s error=%s", name, err.strerror)
            continue
        removed, total = removed + 1, total + size
        pids.add(owner.pid)
    if removed:
        logger.warning(
            "event=shm_reclaimed segments=%d mib=%.1f dead_pids=%s "
            "(shared memory left by mer processes that were killed)",
            removed,
            total / 2**20,
            ",".join(str(p) for p in sorted(pids)),
        )
    return removed, total
