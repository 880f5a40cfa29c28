"""One benchmark trial in a fresh process: `python -m mer.bench.workers JSON` prints one JSON
line of figures (or {"error": ...} and exits 1).

Each engine gets the same token ids: a prefill of the prompt, then greedy decoding, one
token at a time; only those two phases are timed. The kinds:

- "mer": mer on a GGUF file or store, every expert resident, or streamed through a cache of
  `cache_bytes`; streamed trials add the cache's figures for the decode phase alone;
  `activations` as `mer.load_model` takes it.
- "llama": llama.cpp (llama-cpp-python) on a GGUF file with its weights memory-mapped,
  its CPU weight repacking on (its default) or off (`repack`: false).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

from mer.bench.machine import process_read_bytes


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_mer(spec: dict) -> dict:
    import mer
    from mer.kernels import matmul

    start = time.perf_counter()
    model = mer.load_model(
        spec["model"],
        cache_bytes=spec.get("cache_bytes"),
        prefetch=spec.get("prefetch", True),
        coalesce=spec.get("coalesce", True),
        activations=spec.get("activations"),
    )
    if spec.get("threads"):
        matmul.set_num_threads(spec["threads"])
    model.warm_up()
    loaded = time.perf_counter()
    ids = np.asarray(spec["prompt_ids"], np.int64)
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(ids, cache, all_logits=False)[0]
    t1 = time.perf_counter()
    streamer = model.streamer
    before = streamer.telemetry() if streamer else None
    read0, access0 = process_read_bytes(), streamer.accesses if streamer else 0
    n = spec["decode_tokens"]
    for _ in range(n):
        token = int(np.argmax(logits))
        logits = model.forward(np.asarray([token]), cache, all_logits=False)[0]
    t2 = time.perf_counter()
    out = {
        "load_s": loaded - start,
        "prefill_tok_s": len(ids) / (t1 - t0),
        "decode_tok_s": n / (t2 - t1),
        "decode_s_per_token": (t2 - t1) / n,
        "process_read_bytes_per_token": (process_read_bytes() - read0) / n,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if streamer is not None:
        after = streamer.telemetry()

        def delta(name: str) -> float:
            return after[name] - before[name]

        acquires = delta("acquires")
        out.update(
            slots=after["slots"],
            bytes_per_token=delta("bytes_read") / n,
            belady_bytes_per_token=streamer.belady_bytes(from_access=access0) / n,
            hit_rate=delta("hits") / acquires,
            inflight_hit_rate=delta("inflight_hits") / acquires,
            miss_rate=delta("misses") / acquires,
            read_gbps=after["read_gbps"],
            stall_s_per_token=delta("stall_s") / n,
            prefetches_per_token=delta("prefetches") / n,
            prefetch_precision=(
                delta("prefetch_used") / delta("prefetches") if delta("prefetches") else None
            ),
            prefetch_wasted_bytes_per_token=delta("prefetch_wasted_bytes") / n,
            disk_reads_per_token=delta("disk_reads") / n,
            reads_merged_per_token=delta("reads_merged") / n,
        )
        model.close()
    return out


def run_llama(spec: dict) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not spec.get("repack", True):
        # llama-cpp-python has no argument for it: the model parameters' use_extra_bufts
        # (llama.cpp's --no-repack) is set where the defaults are made.
        defaults = low.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = no_repack
        llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    threads = spec.get("threads") or os.cpu_count()
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=max(256, len(spec["prompt_ids"]) + spec["decode_tokens"] + 8),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        use_mmap=True,
        verbose=False,
    )
    loaded = time.perf_counter()
    ids = list(spec["prompt_ids"])
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    read0 = process_read_bytes()
    n = spec["decode_tokens"]
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    t2 = time.perf_counter()
    return {
        "load_s": loaded - start,
        "prefill_tok_s": len(ids) / (t1 - t0),
        "decode_tok_s": n / (t2 - t1),
        "decode_s_per_token": (t2 - t1) / n,
        "process_read_bytes_per_token": (process_read_bytes() - read0) / n,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


KINDS = {"mer": run_mer, "llama": run_llama}


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = KINDS[spec["kind"]](spec)
    except Exception as err:  # reported to the parent as a failed trial
        print(json.dumps({"error": f"{type(err).__name__}: {' '.join(str(err).split())}"}))
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
