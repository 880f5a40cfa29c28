"""Share: whose CPU time spoils a benchmark trial, measured on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mer.bench.machine import CPUS, Share, descendants, processes

SPIN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def spin_detached(seconds: float) -> int:
    """A CPU hog that is not this process's descendant (its parent exits at once, so it is
    re-parented): another user's work, as far as a benchmark is concerned. It holds none of
    our pipes, so this returns while it spins."""
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {SPIN.format(s=seconds)!r}],\n"
        "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_another_process_counts_and_our_own_do_not():
    with Share() as alone:
        time.sleep(1.0)
    pid = spin_detached(2.5)
    time.sleep(0.5)  # started and spinning
    with Share() as beside:
        time.sleep(1.0)
    with Share() as reaped:  # it ends, and its new parent reaps it: only its last second counts
        time.sleep(2.0)
    assert pid not in descendants(processes(), {os.getpid()})
    with Share() as child:
        subprocess.run([sys.executable, "-c", SPIN.format(s=1.0)], check=True)
    named = subprocess.Popen([sys.executable, "-c", SPIN.format(s=2.0)])
    time.sleep(0.5)
    with Share([named.pid]) as listed:
        time.sleep(1.0)
    named.wait()
    # a hog beside the trial is most of a CPU; the benchmark's own work is none of it
    assert beside.others - alone.others > 0.6 / CPUS
    # about one second of CPU over a 2 s block; all 2.5 s of it would be 1.25 / CPUS
    assert 0.5 / 2 / CPUS < reaped.others - alone.others < 1.6 / 2 / CPUS
    assert child.others < alone.others + 0.3 / CPUS
    assert listed.others < alone.others + 0.3 / CPUS


def test_kernel_threads_are_not_processes():
    table = processes()
    assert os.getpid() in table
    assert all(ppid != 2 or pid == 2 for pid, (ppid, _, _) in table.items())
