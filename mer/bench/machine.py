"""The machine a benchmark runs on: what it is, how busy others keep it, what its disk reads.

Machines are shared: a trial is only worth keeping if nothing else ran beside it. `Share`
reads the whole machine's busy time (/proc/stat, steal time included: a virtual machine's
neighbours take CPU that way) before and after a trial, subtracts the CPU time of the
processes the benchmark itself runs, and gives the rest as a share of all CPUs over the
trial's wall time.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


def machine_busy_s() -> float:
    """CPU seconds all CPUs spent not idle since boot (user, nice, system, irq, softirq,
    steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def process_cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Share:
    """`with Share(pids) as s: ...` then `s.others`: the share of all CPUs (0..1) that
    processes other than this one, its children and `pids` used during the block."""

    def __init__(self, pids: list[int] | tuple[int, ...] = ()) -> None:
        self.pids = list(pids)
        self.others = 0.0
        self.wall_s = 0.0

    def _sample(self) -> tuple[float, float, float, float]:
        ours = own_cpu_s() + sum(process_cpu_s(p) for p in self.pids)
        return time.monotonic(), machine_busy_s(), ours, 0.0

    def __enter__(self) -> Share:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        t1, busy1, ours1, _ = self._sample()
        t0, busy0, ours0, _ = self._start
        self.wall_s = t1 - t0
        other = (busy1 - busy0) - (ours1 - ours0)
        self.others = max(0.0, other / (self.wall_s * CPUS)) if self.wall_s > 0 else 0.0


def describe() -> dict:
    """CPU model and flags of note, cores, memory, kernel, and the disk under the working
    directory."""
    cpu = "unknown"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "unknown":
            cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    dev = block_device(Path.cwd())
    model = _read(Path(f"/sys/block/{dev}/device/model")) if dev else None
    return {
        "cpu": cpu,
        "cpus": CPUS,
        "simd": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "amx_int8")),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "disk": {"device": dev, "model": model},
    }


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def block_device(path: Path) -> str | None:
    """The whole disk (as named in /sys/block) that holds `path`, or None."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sys_dev.exists():
        return None
    real = sys_dev.resolve()
    # a partition's directory sits inside its disk's
    return real.parent.name if (real / "partition").exists() else real.name


def disk_read_bytes(device: str | None) -> int:
    """Bytes read from block device `device` since boot (0 if unknown)."""
    stat = _read(Path(f"/sys/block/{device}/stat")) if device else None
    return int(stat.split()[2]) * 512 if stat else 0


def process_read_bytes(pid: int | None = None) -> int:
    """Bytes process `pid` (default: this one) caused to be read from storage."""
    text = _read(Path(f"/proc/{pid or os.getpid()}/io")) or ""
    for line in text.splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0
