"""A memory cap for a benchmark's child processes, page cache included: a cgroup.

cgroup v2 (`memory.max`) where the unified hierarchy has the memory controller, else v1
(`memory.limit_in_bytes`, as root). Both count the page cache that a process's reads bring
in, so a capped model larger than the cap cannot sit in RAM through the page cache.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from mer.errors import MerError

_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/memory")


def _v2_ready() -> bool:
    controllers = _V2 / "cgroup.controllers"
    return controllers.is_file() and "memory" in controllers.read_text().split()


def available() -> str | None:
    """ "v2", "v1", or None where no memory cgroup can be made here (not root, no controller)."""
    if os.geteuid() != 0:
        return None
    if _v2_ready():
        return "v2"
    if (_V1 / "memory.limit_in_bytes").is_file():
        return "v1"
    return None


class MemoryCap:
    """`with MemoryCap(limit_bytes) as cap: cap.run(cmd)`: run commands with at most
    `limit_bytes` of memory, page cache included; `cap.peak_bytes()` is the most it used."""

    def __init__(self, limit_bytes: int, name: str = "mer-bench") -> None:
        self.kind = available()
        if self.kind is None:
            raise MerError("no memory cgroup can be made here (needs root and a memory controller)")
        self.limit_bytes = int(limit_bytes)
        root = _V2 if self.kind == "v2" else _V1
        self.path = root / f"{name}-{os.getpid()}-{time.monotonic_ns()}"

    def __enter__(self) -> MemoryCap:
        self.path.mkdir()
        if self.kind == "v2":
            (self.path / "memory.max").write_text(str(self.limit_bytes))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        return self

    def reset_peak(self) -> None:
        """Start counting the peak from now (v1; v2 kernels before 6.12 cannot)."""
        peak = self.path / ("memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak")
        with contextlib.suppress(OSError):
            peak.write_text("0")

    def peak_bytes(self) -> int:
        peak = self.path / ("memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak")
        return int(peak.read_text()) if peak.exists() else 0

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `cmd` to completion inside the cap (and its children with it)."""
        procs = self.path / "cgroup.procs"
        return subprocess.run(cmd, preexec_fn=lambda: procs.write_text(str(os.getpid())), **kwargs)

    def __exit__(self, *exc: object) -> None:
        procs = self.path / "cgroup.procs"
        for _ in range(100):  # wait for stragglers, then remove the group
            pids = procs.read_text().split() if procs.exists() else []
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def drop_page_cache() -> bool:
    """Write dirty pages back and drop the clean page cache (root only); whether it worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False
