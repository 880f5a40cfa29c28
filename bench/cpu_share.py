"""How much of the machine other processes used while a trial ran.

This machine is shared: a trial is only worth keeping if nothing else ran beside it. `Share`
reads the whole machine's busy time (/proc/stat, steal time included: a virtual machine's
neighbours take CPU that way) before and after a trial, subtracts the CPU time of the
processes the benchmark itself runs, and gives the rest as a share of all CPUs over the
trial's wall time.
"""

from __future__ import annotations

import os
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
