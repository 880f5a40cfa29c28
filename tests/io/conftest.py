"""Fixtures for the I/O tests: files on a disk that takes O_DIRECT, and on a tmpfs."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (longest matching mount point)."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ = line.split()[:3]
        if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
            best, kind = mnt, typ
    return kind


def takes_o_direct(directory: Path) -> bool:
    """Whether a file in `directory` can be opened and read with O_DIRECT."""
    probe = directory / ".o_direct_probe"
    probe.write_bytes(b"\0" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    try:
        with mmap.mmap(-1, 4096) as page:
            os.preadv(fd, [page], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture(name="takes_o_direct", scope="session")
def takes_o_direct_fixture() -> Callable[[Path], bool]:
    """The `takes_o_direct(directory)` probe, for tests."""
    return takes_o_direct


@contextmanager
def o_direct_dir(base: Path) -> Iterator[Path | None]:
    """`base` if it is on a real disk (not tmpfs) that accepts O_DIRECT, else a fresh directory
    next to the repository if that one does (removed afterwards), else None."""
    if fs_type(base) != "tmpfs" and takes_o_direct(base):
        yield base
        return
    made = Path(tempfile.mkdtemp(prefix="mer-io-test-", dir=REPO.parent))
    try:
        yield made if takes_o_direct(made) else None
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a real disk (not tmpfs) that accepts O_DIRECT; removed afterwards."""
    base = tmp_path_factory.mktemp("io")
    with o_direct_dir(base) as found:
        if found is None:
            pytest.skip(f"no directory that takes O_DIRECT (tried {base} and next to the repo)")
        yield found


@pytest.fixture(scope="module")
def tmpfs_dir() -> Iterator[Path]:
    """A fresh directory on a writable tmpfs mount, or skip when none is mounted."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ, opts = line.split()[:4]
        if typ == "tmpfs" and "rw" in opts.split(",") and os.access(mnt, os.W_OK):
            try:
                made = Path(tempfile.mkdtemp(prefix="mer-io-test-", dir=mnt))
            except OSError:
                continue
            try:
                yield made
            finally:
                shutil.rmtree(made, ignore_errors=True)
            return
    pytest.skip("no writable tmpfs mounted")


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def make_file() -> Callable[[Path, int, int], tuple[Path, bytes]]:
    """make_file(dir, size, seed) -> (path, contents): a file of random bytes."""

    def make(directory: Path, size: int, seed: int = 0) -> tuple[Path, bytes]:
        data = random_bytes(size, seed)
        path = directory / f"data-{size}-{seed}.bin"
        path.write_bytes(data)
        return path, data

    return make
