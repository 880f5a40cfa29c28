"""Matvec (n=1) throughput of every weight kind, with float and with 8-bit activations, against
the machine's memory read bandwidth.

Shapes: an expert's gate/up matrix (N=14336 outputs, K=4096 inputs) and its down matrix
(N=4096, K=14336). Each timed run reads a whole matrix; enough distinct copies are cycled that
their total (>= --pool MiB) dwarfs the last-level cache, so every run streams from DRAM.
Throughput is GGUF weight bytes / time; "ratio" divides it by the read bandwidth measured in the
same run with the same number of threads: a numba kernel summing a 1 GiB array with the
widest vector loads the CPU has, split across that many threads (NumPy's sum, the reference
before, reached about half of what the integer kernels stream).

    python bench/kernels.py [--threads 1,2] [--repeat 15] [--kinds q4_0,q4_k] [--pool 512]
        [--activations q8,f32] [--llama MODEL.gguf[,MODEL.gguf]]

The machine is shared: neighbours take memory bandwidth as well as CPU time. So each case
runs in rounds, each a pass of the bandwidth kernel then a sweep through the copies, and
"ratio" is the median of the rounds' ratios (a round's two halves share the moment).

With --llama, llama.cpp decodes each given GGUF (a `mer synth` model: its weights are of one
kind, the experts' kind) on the same threads, and its effective weight-streaming speed is the
bytes a token reads (every tensor but the embedding, and the used share of the experts) times
its tokens/s: a lower bound of its kernels' GB/s (decode also spends time outside them),
shown beside the kind's row.

Q8_0 and Q4_0 are quantized by mer, the other block types by gguf.quants where it can (the
K-quants: random blocks with moderate scales).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from mer.kernels import matmul as mm

SHAPES = {"gate": (14336, 4096), "down": (4096, 14336)}
KINDS = ["f32", "f16", "bf16", "q8_0", "q4_0", "mxfp4", "q4_k", "q6_k"]


@njit(parallel=True, nogil=True, cache=True)
def _sum_chunks(a, nt):
    out = np.zeros(nt, np.uint64)
    n = a.size
    for c in prange(nt):
        acc = np.uint64(0)
        lo = np.uint64(c * n // nt)
        for k in range(np.uint64((c + 1) * n // nt) - lo):
            acc += a[lo + np.uint64(k)]  # unsigned: no wraparound check, so LLVM vectorizes
        out[c] = acc
    return out


def bandwidth_pass(a: np.ndarray, threads: int) -> float:
    """Bytes/s of one sum of the uint64 array `a` on `threads` threads (LLVM vectorizes the
    loop to the widest loads the CPU has)."""
    numba.set_num_threads(threads)
    t = time.perf_counter()
    _sum_chunks(a, threads)
    return a.nbytes / (time.perf_counter() - t)


def read_bandwidth(a: np.ndarray, threads: int, repeat: int) -> float:
    """GB/s: the median of `repeat` bandwidth passes over `a` after a warm-up one."""
    bandwidth_pass(a, threads)
    return float(np.median([bandwidth_pass(a, threads) for _ in range(repeat)])) / 1e9


def bandwidth_array(threads: list[int], repeat: int) -> np.ndarray:
    """The 1 GiB array of the bandwidth passes, after printing the read bandwidth at each
    thread count (the ratios come from passes paired with each case's rounds)."""
    a = np.ones(1 << 27, np.uint64)
    for t in threads:
        gbs = read_bandwidth(a, t, max(3, repeat // 3))
        print(f"memory read bandwidth, {t} thread(s): {gbs:.1f} GB/s")
    return a


K_QUANTS = {"q4_k": (144, (0, 2)), "q5_k": (176, (0, 2)), "q6_k": (210, (208,))}


def make_weights(
    kind: str, rows: int, cols: int, pool_bytes: int, activations: str
) -> list[mm.PackedWeight]:
    """Distinct copies of one random [rows, cols] matrix of `kind`, about pool_bytes in total,
    packed for `activations`."""
    with mm.packing(activations):
        return _make_weights(kind, rows, cols, pool_bytes)


def _make_weights(kind: str, rows: int, cols: int, pool_bytes: int) -> list[mm.PackedWeight]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, cols), dtype=np.float32)
    if kind in K_QUANTS:
        size, halves = K_QUANTS[kind]
        raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
        for off in halves:
            scale = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
            raw[..., off : off + 2] = scale[..., None].view(np.uint8)
        w = mm.from_gguf_blocks(raw.reshape(-1), kind, rows, cols)
    elif kind == "f32":
        w = mm.pack_float(a, "f32")
    elif kind == "f16":
        w = mm.pack_float(a.astype(np.float16), "f16")
    elif kind == "bf16":
        w = mm.pack_float((a.view(np.uint32) >> 16).astype(np.uint16), "bf16")
    elif kind in ("q8_0", "q4_0"):
        w = mm.quantize(a, kind)
    else:  # other GGUF block types, made by llama.cpp's own Python package
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        blocks = quantize(a, GGMLQuantizationType[kind.upper()])
        w = mm.from_gguf_blocks(blocks.reshape(-1), kind, rows, cols)
    del a
    copies = max(2, -(-pool_bytes // w.nbytes))
    return [w] + [
        mm.PackedWeight(w.kind, rows, cols, tuple(p.copy() for p in w.planes))
        for _ in range(copies - 1)
    ]


def time_matvec(
    ws: list[mm.PackedWeight], threads: int, repeat: int, a: np.ndarray
) -> tuple[float, float]:
    """(median seconds of one matvec, median ratio of its GB/s to the read bandwidth), in
    `repeat` rounds of a bandwidth pass over `a` and a sweep through the copies."""
    mm.set_num_threads(threads, adaptive=False)  # every call on exactly `threads`
    x = np.random.default_rng(1).standard_normal((1, ws[0].cols), dtype=np.float32)
    out = np.empty((1, ws[0].rows), np.float32)
    for w in ws[:2]:
        mm.matmul(w, x, out)  # compile / warm up
    times, ratios = [], []
    for _ in range(repeat):
        bandwidth = bandwidth_pass(a, threads)
        sweep = []
        for w in ws:
            t = time.perf_counter()
            mm.matmul(w, x, out)
            sweep.append(time.perf_counter() - t)
        sec = float(np.median(sweep))
        times.append(sec)
        ratios.append(ws[0].gguf_nbytes / sec / bandwidth)
    return float(np.median(times)), float(np.median(ratios))


def llama_gbps(path: str, threads: int, tokens: int = 32, repeat: int = 3) -> tuple[str, float]:
    """(the experts' kind, llama.cpp's effective GB/s decoding the GGUF at `path`)."""
    import sys
    from pathlib import Path

    import llama_cpp
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_exp, used = field(f"{arch}.expert_count"), field(f"{arch}.expert_used_count")
    per_token, kind = 0.0, "?"
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            continue  # one row a token
        if "_exps." in t.name:
            per_token += t.n_bytes * used / n_exp
            if "down" not in t.name:  # gate and up: two thirds of an expert
                kind = t.tensor_type.name.lower()
        else:
            per_token += t.n_bytes
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import PROMPT, llama_run

    llm = llama_cpp.Llama(
        model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    ids = llm.tokenize(PROMPT.encode())[:64]
    llama_run(llm, ids, 4)
    rate = statistics.median(llama_run(llm, ids, tokens)[1] for _ in range(repeat))
    del llm
    return kind, per_token * rate / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=15, help="timed runs per case (median)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated weight kinds")
    ap.add_argument("--shapes", default="gate,down", help="gate and/or down")
    ap.add_argument("--pool", type=int, default=512, help="MiB of distinct copies per case")
    ap.add_argument("--activations", default="q8,f32", help="q8 and/or f32")
    ap.add_argument("--llama", default="", help="comma-separated GGUFs llama.cpp decodes")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    kinds = args.kinds.split(",")
    shapes = args.shapes.split(",")

    a = bandwidth_array(threads, args.repeat)
    theirs: dict[tuple[str, int], float] = {}
    for path in filter(None, args.llama.split(",")):
        for t in threads:
            kind, gbs = llama_gbps(path, t)
            theirs[(kind, t)] = gbs
            print(f"llama.cpp on {path.rsplit('/', 1)[-1]} ({kind}), {t}T: {gbs:.1f} GB/s")
    rows = []
    for shape in shapes:
        n_out, k_in = SHAPES[shape]
        for kind in kinds:
            for act in args.activations.split(","):
                ws = make_weights(kind, n_out, k_in, args.pool << 20, act)
                if act == "q8" and ws[0].kind == kind:
                    continue  # no integer kernel for this kind: the same as f32
                name = f"{kind} {act}"
                for t in threads:
                    sec, ratio = time_matvec(ws, t, args.repeat, a)
                    gbs = ws[0].gguf_nbytes / sec / 1e9
                    peer = theirs.get((kind, t)) if act == "q8" else None
                    rows.append((shape, n_out, k_in, name, t, sec * 1e3, gbs, ratio, peer))
                    print(
                        f"{shape} {name:9s} {t}T: {sec * 1e3:7.2f} ms {gbs:6.1f} GB/s", flush=True
                    )
                del ws
    print()
    head = f"{'shape':14s} {'kind':9s} {'thr':>3s} {'ms':>8s} {'GB/s':>6s} {'ratio':>6s}"
    print(head + (f" {'llama.cpp GB/s':>15s}" if theirs else ""))
    for shape, n_out, k_in, kind, t, ms, gbs, ratio, peer in rows:
        label = f"{shape} {n_out}x{k_in}"
        row = f"{label:14s} {kind:9s} {t:3d} {ms:8.2f} {gbs:6.1f} {ratio:6.2f}"
        if theirs:
            row += f" {peer:15.1f}" if peer else f" {'-':>15s}"
        print(row)


if __name__ == "__main__":
    main()
