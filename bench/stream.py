"""Decode speed with experts streamed from disk, against the same model fully resident.

The model (default: the bundled SmolLM2, whose 30 dense FFNs are streamed like experts) is
converted to a mer store in a temporary directory on the same disk as --dir, then decoded
greedily with every expert resident and with RAM caches of 25%, 50% and 100% of the expert
bytes. The page cache is dropped before each streamed run when permitted (root), so reads
come from the disk. Prints a short table last: tokens/s, ratio to resident, hit rate, read
GB/s, cold-read p50/p99 and prefetch precision.

    python bench/stream.py [--model PATH] [--dir DIR] [--tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from decode import PROMPT, mer_decode  # bench/decode.py, run from bench/

import mer
from mer.models.sources import resolve_model
from mer.store.convert import convert


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file or directory (default: bundled SmolLM2)")
    parser.add_argument("--dir", default=".", help="where to write the temporary store")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    opts = parser.parse_args()

    src = resolve_model(opts.model)
    with tempfile.TemporaryDirectory(dir=opts.dir, prefix="mer-bench-store-") as tmp:
        store = Path(tmp) / "store"
        manifest = convert(src, store)
        expert_bytes = manifest["experts"]["bytes"]
        resident = mer.load_model(store, threads=opts.threads)
        ids = resident.tokenizer.encode(PROMPT)
        mer_decode(resident, ids, 4)  # compile
        base, want = mer_decode(resident, ids, opts.tokens)
        rows = [("resident", base, 1.0, None)]
        dropped = False
        for share in (0.25, 0.5, 1.0):
            dropped = drop_page_cache() or dropped
            with mer.load_model(
                store,
                threads=opts.threads,
                cache_bytes=int(expert_bytes * share) + (4 << 20),
                io_backend=opts.backend,
            ) as model:
                rate, got = mer_decode(model, ids, opts.tokens)
                if got != want:
                    raise SystemExit(f"streamed tokens differ from resident at {share:.0%}")
                rows.append((f"cache {share:.0%}", rate, rate / base, model.expert_stats()))
        print(
            f"model {src.name}, {expert_bytes / 2**20:.0f} MiB of experts, {opts.tokens} "
            f"tokens, {opts.threads} threads, page cache dropped: {dropped}"
        )
        print(
            f"{'run':<12}{'tok/s':>8}{'ratio':>7}{'hit':>7}{'GB/s':>7}"
            f"{'p50 ms':>8}{'p99 ms':>8}{'pf prec':>9}"
        )
        for name, rate, ratio, st in rows:
            if st is None:
                print(f"{name:<12}{rate:>8.1f}{ratio:>7.2f}")
                continue
            print(
                f"{name:<12}{rate:>8.1f}{ratio:>7.2f}{st['hit_rate']:>7.2f}"
                f"{st['read_gbps']:>7.2f}{st['cold_read_ms_p50']:>8.2f}"
                f"{st['cold_read_ms_p99']:>8.2f}{st['prefetch_precision']:>9.2f}"
            )


if __name__ == "__main__":
    main()
