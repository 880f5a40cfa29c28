"""The machine a benchmark runs on: what it is, how busy others keep it, what its disk reads.

Machines are shared: a trial is only worth keeping if nothing else ran beside it. `Share`
reads, before and after a trial, the CPU time of every user-space process (/proc/PID/stat:
user and system time, with that of the children each has reaped) and the time the
hypervisor took from this virtual machine (steal, /proc/stat). Others' share is the growth
of that time outside the benchmark (this process, the processes it names and all their
descendants), over all CPUs and the trial's wall time.

Kernel threads and interrupt time are left out on purpose: in a disk-bound trial they are
mostly the benchmark's own reads being completed and its page cache being reclaimed
(kworker, kswapd, softirq), and counting them threw away every trial that read the disk.
A process that ends during a trial is counted through its parent, whose reaped time grows by
all of that process's time; what it had used before the trial is taken off again.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
_PF_KTHREAD = 0x00200000


def steal_s() -> float:
    """CPU seconds the hypervisor gave to other guests since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[7]) / TICK if len(fields) > 7 else 0.0


def processes() -> dict[int, tuple[int, int, float]]:
    """Every user-space process: pid -> (parent pid, start time in ticks, CPU seconds of it
    and of the children it has reaped)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[6]) & _PF_KTHREAD:
            continue
        cpu = sum(int(v) for v in fields[11:15]) / TICK  # utime stime cutime cstime
        table[int(entry.name)] = (int(fields[1]), int(fields[19]), cpu)
    return table


def descendants(table: dict[int, tuple[int, int, float]], roots: set[int]) -> set[int]:
    """`roots` and every process below them in `table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


class Share:
    """`with Share(pids) as s: ...` then `s.others`: the share of all CPUs (0..1) that
    processes other than this one, `pids` and their descendants used during the block (with
    the time the hypervisor stole)."""

    def __init__(self, pids: list[int] | tuple[int, ...] = ()) -> None:
        self.pids = list(pids)
        self.others = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> Share:
        self._t0, self._steal0, self._table0 = time.monotonic(), steal_s(), processes()
        return self

    def __exit__(self, *exc: object) -> None:
        table = processes()
        self.wall_s = time.monotonic() - self._t0
        roots = {os.getpid(), *self.pids}
        ours = descendants(self._table0, roots) | descendants(table, roots)
        other = steal_s() - self._steal0
        for pid, (_, started, cpu) in table.items():
            if pid in ours:
                continue
            before = self._table0.get(pid)
            other += cpu - (before[2] if before and before[1] == started else 0.0)
        for pid, (_, started, cpu) in self._table0.items():
            if pid not in ours and table.get(pid, (0, -1))[1] != started:
                other -= cpu  # reaped: its parent's reaped time grew by all of it
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
