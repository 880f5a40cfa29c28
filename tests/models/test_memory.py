"""A model resident in RAM costs about its file's size once: packed copies, not the file too."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = """
import gc, sys
import mer
from mer.models.sources import resolve_model

def pss():
    with open("/proc/self/smaps_rollup") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("Pss:"))

path = resolve_model(None)
warm = mer.load_model(path, activations=sys.argv[1])  # kernels compiled or loaded
warm.warm_up()
warm.logits([1, 2, 3])
del warm
gc.collect()
before = pss()
model = mer.load_model(path, activations=sys.argv[1])
model.logits([1, 2, 3])
print(pss() - before, path.stat().st_size)
"""


def test_resident_gguf_costs_its_size_once():
    # Quantized matrices are copied into their kernel layouts; the file's pages that packing
    # read are then dropped from the process (they stay in the page cache), so the PSS the
    # model adds is about the file's size, not twice it.
    for activations in ("q8", "f32"):
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(SCRIPT), activations],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        added, size = (int(v) for v in proc.stdout.split())
        print(f"{activations}: PSS added {added / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file")
        assert added <= 1.25 * size, (activations, added, size)
