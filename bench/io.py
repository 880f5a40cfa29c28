"""Expert-read throughput of mer's io_uring and preadv backends against fio on the same file.

Writes a test file of random bytes (default 1 GiB, shrunk to a quarter of the free space when
that is less) next to the repository, then for each block size (an expert-sized read), queue
depth and access pattern measures:

  mer uring   ExpertReader(backend="uring"): `depth` reads in flight, one SQE per block
  fio uring   fio --direct=1 --ioengine=io_uring --iodepth=depth        (same file, bs, pattern)
  mer preadv  ExpertReader(backend="preadv"): `depth` threads doing O_DIRECT os.preadv
  fio psync   fio --direct=1 --ioengine=psync --numjobs=depth --thread  (its blocking twin)

Every run reads the whole file once; the page cache is dropped before each run when
/proc/sys/vm/drop_caches is writable (O_DIRECT bypasses it anyway). The four runs of a setting
are interleaved and repeated `--repeat` times, and the table (printed last) shows medians with
mer/fio ratios, plus the spread of fio's own repeats, since shared virtual disks are noisy.
`--file /dev/shm/x.bin` (tmpfs takes O_DIRECT since Linux 6.6) runs the same at memory speed,
which shows the software overhead of each reader rather than the disk.

    python bench/io.py [--size-mib 1024] [--block-mib 4,16] [--depths 1,4,16] [--repeat 4]
                       [--patterns read,randread] [--file PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mer.io.arena import ALIGN, Arena
from mer.io.reader import ExpertReader

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def write_file(path: Path, size: int) -> None:
    """`size` random bytes at `path` (kept if already the right size), synced to disk."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, size, 64 * MiB):
            f.write(rng.integers(0, 256, min(64 * MiB, size - start), np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())


def drop_caches() -> bool:
    """Drop the page cache; False when not permitted."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def offsets(size: int, bs: int, pattern: str) -> list[int]:
    """Block offsets covering the file once, in order or shuffled."""
    offs = np.arange(size // bs, dtype=np.int64) * bs
    if pattern == "randread":
        np.random.default_rng(1).shuffle(offs)
    return offs.tolist()


def run_mer(path: Path, backend: str, bs: int, depth: int, offs: list[int]) -> float:
    """GB/s of reading blocks `offs` with `depth` reads in flight, refilling slots as they free."""
    with (
        Arena(ALIGN + depth * bs, bs) as arena,
        ExpertReader(path, backend=backend, queue_depth=depth, verify=False, chunk_bytes=bs) as r,
    ):
        todo = iter(offs)
        t0 = time.perf_counter()
        r.submit([(next(todo), bs, arena, s, None, s) for s in range(min(depth, len(offs)))])
        while r.busy:
            for res in r.poll():
                if res.error is not None:
                    raise res.error
                nxt = next(todo, None)
                if nxt is not None:  # reuse the slot that just finished
                    r.submit([(nxt, bs, arena, res.slot, None, res.slot)])
        seconds = time.perf_counter() - t0
    return len(offs) * bs / seconds / 1e9


def run_fio(path: Path, engine: str, bs: int, depth: int, size: int, pattern: str) -> float:
    """fio's GB/s for the same file, block size, depth and pattern."""
    cmd = ["fio", "--name=mer", f"--filename={path}", "--direct=1", f"--rw={pattern}"]
    cmd += [f"--bs={bs}", "--output-format=json", f"--ioengine={engine}"]
    if engine == "io_uring":
        cmd += [f"--iodepth={depth}", f"--size={size}"]
    else:  # blocking engine: `depth` threads, each on its own stretch of the file
        part = size // depth // bs * bs
        cmd += [f"--numjobs={depth}", "--thread", "--group_reporting"]
        cmd += [f"--size={part}", f"--offset_increment={part}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return job["read"]["bw_bytes"] / 1e9


PAIRS = (("uring", "io_uring"), ("preadv", "psync"))  # mer backend, fio engine it is held to


def measure(path: Path, size: int, pattern: str, bs: int, depth: int, repeat: int, fio: bool):
    """[pattern, bs MiB, depth, mer uring, fio uring, mer preadv, fio psync, fio spread]."""
    offs = offsets(size, bs, pattern)
    runs: list[list[float]] = [[], [], [], []]
    tasks = [
        (2 * k + f, backend, engine, f) for k, (backend, engine) in enumerate(PAIRS) for f in (0, 1)
    ]
    for rep in range(repeat):  # interleaved and alternated, so disk moods hit everyone alike
        for col, backend, engine, is_fio in tasks[:: 1 if rep % 2 == 0 else -1]:
            if is_fio and not fio:
                continue
            drop_caches()
            runs[col].append(
                run_fio(path, engine, bs, depth, size, pattern)
                if is_fio
                else run_mer(path, backend, bs, depth, offs)
            )
    med = [float(np.median(r)) if r else None for r in runs]
    spread = [max(r) / min(r) - 1 for r in runs[1::2] if r]
    return [pattern, bs // MiB, depth, *med, max(spread, default=None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--block-mib", default="4,16")
    ap.add_argument("--depths", default="1,4,16")
    ap.add_argument("--patterns", default="read,randread")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--file", type=Path, default=REPO.parent / "mer-bench-io.bin")
    ap.add_argument("--keep", action="store_true", help="keep the test file afterwards")
    args = ap.parse_args()
    blocks = [int(b) * MiB for b in args.block_mib.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    patterns = args.patterns.split(",")

    free = shutil.disk_usage(args.file.parent).free
    size = min(args.size_mib * MiB, free // 4) // max(blocks) * max(blocks)
    if size < max(blocks) * max(depths):
        sys.exit(f"only {free // MiB} MiB free next to {args.file}: too little for the benchmark")
    print(f"writing {size // MiB} MiB test file {args.file} ...", flush=True)
    write_file(args.file, size)
    fio = shutil.which("fio")
    if fio is None:
        print("fio not found (install with `apt-get install -y fio`): fio columns skipped")
    dropped = drop_caches()
    print(f"page cache drop between runs: {'yes' if dropped else 'not permitted, skipped'}")

    rows = []
    try:
        for pattern in patterns:
            for bs in blocks:
                for depth in depths:
                    row = measure(args.file, size, pattern, bs, depth, args.repeat, bool(fio))
                    rows.append(row)
                    print("  done", *row[:3], flush=True)
    finally:
        if not args.keep:
            args.file.unlink(missing_ok=True)

    def cell(x: float | None) -> str:
        return f"{x:7.2f}" if x is not None else "    n/a"

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:6.2f}" if b else "   n/a"

    print()
    print(f"GB/s reading a {size // MiB} MiB file with O_DIRECT (1 GB = 1e9 bytes)")
    print(f"median of {args.repeat} runs; 'fio spread' = max/min - 1 over fio's own repeats")
    print(
        "pattern   bs MiB  depth | mer uring  fio uring  ratio | mer preadv  fio psync  ratio"
        " | fio spread"
    )
    for pattern, bs, depth, mu, fu, mp, fp, sp in rows:
        print(
            f"{pattern:8} {bs:6} {depth:6} |   {cell(mu)}    {cell(fu)} {ratio(mu, fu)} |"
            f"    {cell(mp)}    {cell(fp)} {ratio(mp, fp)} |"
            + (f" {sp:9.0%}" if sp is not None else "       n/a")
        )
    if fio:
        gm = [float(np.exp(np.mean([np.log(r[i] / r[i + 1]) for r in rows]))) for i in (3, 5)]
        print(f"{'geometric mean':22} |{'':22}{gm[0]:6.2f} |{'':23}{gm[1]:6.2f} |")


if __name__ == "__main__":
    main()
