"""Writing a store so that no interruption loses one.

A conversion writes into a hidden sibling of its destination, `.NAME.partial.PID.START`
(PID and START name the converting process, see `mer.io.shm.Owner`), and swaps it in only
once complete: with one atomic exchange of the two directories where the file system offers
it (Linux renameat2 RENAME_EXCHANGE), else by renaming the old store aside first, to
`.NAME.old.PID.START`. So whatever moment a conversion is killed at, DST is either the old
store or the new one. Whatever a killed conversion left behind is cleared by the next
conversion into the same place (`sweep`): a partial directory is removed, and an old store
renamed aside is put back if DST is missing, else removed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path

from mer.io.shm import Owner

logger = logging.getLogger(__name__)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_dir(dst: Path, owner: Owner | None = None) -> Path:
    """Where this process writes the store that will become `dst`."""
    who = owner or Owner.current()
    return dst.parent / f".{dst.name}.partial.{who.pid}.{who.start}"


def _aside_dir(dst: Path, owner: Owner | None = None) -> Path:
    who = owner or Owner.current()
    return dst.parent / f".{dst.name}.old.{who.pid}.{who.start}"


def _leftovers(dst: Path) -> list[tuple[str, Path, Owner]]:
    """(kind, path, owner) of staging and set-aside directories for `dst`."""
    found = []
    prefix = f".{dst.name}."
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return []
    for path in entries:
        rest = path.name[len(prefix) :].split(".") if path.name.startswith(prefix) else []
        if len(rest) == 3 and rest[0] in ("partial", "old") and all(r.isdigit() for r in rest[1:]):
            found.append((rest[0], path, Owner(int(rest[1]), int(rest[2]))))
    return found


def sweep(dst: Path) -> None:
    """Clear what killed conversions into `dst` left behind (see the module docstring)."""
    for kind, path, owner in _leftovers(dst):
        if owner.alive():
            continue
        if kind == "old" and not dst.exists():
            os.rename(path, dst)
            logger.warning("event=store_restored store=%s from=%s", dst, path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("event=store_leftover_removed path=%s", path)


def swap_in(new: Path, dst: Path) -> None:
    """Make the complete store in `new` be `dst`, replacing what `dst` held."""
    if not dst.exists():
        os.rename(new, dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new)  # now the old store
        return
    aside = _aside_dir(dst)
    os.rename(dst, aside)
    os.rename(new, dst)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two directories; False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
