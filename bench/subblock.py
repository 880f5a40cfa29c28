"""Matvec (n=1) throughput of the GGUF sub-block kinds against the machine's memory bandwidth.

Kinds: q4_1, q5_0, q5_1, q4_k, q5_k, q6_k. Shapes: [14336, 4096] (a large FFN matrix) and
[1536, 576] (SmolLM2-135M's gate/up; [1536, 768] for the K-quants, whose rows hold whole
256-weight super-blocks). Each timed run reads a whole matrix; enough distinct copies are
cycled that their total (>= --pool MiB) dwarfs the last-level cache, as in decode, where every
matrix streams from DRAM. Throughput is GGUF bytes (rows * cols / BLOCK * BLOCK_BYTES) / time;
"ratio" divides it by the read bandwidth measured with the same number of threads, the
median over rounds of a bandwidth pass then a sweep (bench/kernels.py's time_matvec).

    python bench/subblock.py [--threads 1,2] [--repeat 15] [--kinds q4_1,q6_k] [--pool 512]
"""

from __future__ import annotations

import argparse

import numpy as np
from kernels import bandwidth_array, time_matvec  # bench/kernels.py, run from bench/

from mer.kernels import matmul as mm
from mer.kernels.mm_gguf import KINDS

SHAPES = ((14336, 4096), (1536, 576))  # K-quants: cols rounded up to 256 (576 -> 768)
F16_FIELDS = {"q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2), "q5_k": (0, 2)}


def random_weight(kind: str, rows: int, cols: int, rng: np.random.Generator) -> mm.PackedWeight:
    """Random GGUF blocks of `kind` with finite, moderate f16 scales."""
    cls = next(k for k in KINDS if k.KIND == kind)
    nb = rows * cols // cls.BLOCK
    raw = rng.integers(0, 256, size=(nb, cls.BLOCK_BYTES), dtype=np.uint8)
    for off in F16_FIELDS.get(kind, (208,)):
        scale = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(nb, 2)
    return mm.from_gguf_blocks(raw.reshape(-1), kind, rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=15, help="timed runs per case (median)")
    ap.add_argument("--kinds", default=",".join(k.KIND for k in KINDS), help="comma-separated")
    ap.add_argument("--pool", type=int, default=512, help="MiB of distinct copies per case")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    a = bandwidth_array(threads, args.repeat)
    rng = np.random.default_rng(0)
    rows = []
    for n_out, k_in in SHAPES:
        for kind in args.kinds.split(","):
            if kind.endswith("_k"):  # K-quant rows hold whole 256-weight super-blocks
                k_in = -(-k_in // 256) * 256
            w = random_weight(kind, n_out, k_in, rng)
            copies = max(2, -(-(args.pool << 20) // w.nbytes))
            ws = [w] + [
                mm.PackedWeight(kind, n_out, k_in, tuple(p.copy() for p in w.planes))
                for _ in range(copies - 1)
            ]
            for t in threads:
                sec, ratio = time_matvec(ws, t, args.repeat, a)  # ratio: paired rounds
                gbs = w.gguf_nbytes / sec / 1e9
                rows.append((f"{n_out}x{k_in}", kind, t, sec * 1e3, gbs, ratio))
                print(
                    f"{n_out}x{k_in} {kind} {t}T: {sec * 1e3:7.3f} ms {gbs:6.1f} GB/s", flush=True
                )
            del ws, w
    print()
    print(f"{'shape':10s} {'kind':5s} {'thr':>3s} {'ms':>8s} {'GB/s':>6s} {'ratio':>6s}")
    for shape, kind, t, ms, gbs, ratio in rows:
        print(f"{shape:10s} {kind:5s} {t:3d} {ms:8.3f} {gbs:6.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
