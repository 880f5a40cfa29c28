"""Merged expert reads, on and off, with the store laid out by expert id or by co-use.

A model of many small experts (default: Qwen3-30B-A3B's experts, 128 per layer, top-8,
768-wide, on 4 layers, Q4_0: 1.4 GiB, made by `mer synth` into --workdir the first time) is
converted to two stores: experts in id order, and in the order a routing trace recorded on
other text gives (`mer convert --trace`). Each store is decoded greedily with its experts
streamed through a RAM cache of --share of the expert bytes, reads merged (`coalesce`, the
default) and not, alternating, until each configuration has --trials trials during which
other processes used at most 5% of the CPUs (else the least noisy). Store reads are
O_DIRECT, so the page cache plays no part. The peer is the same engine with reads not
merged; the table gives tokens/s and its ratio to that, the requests the disk saw and the
expert reads merged per token, bytes per token and read speed.

    cd bench && python coalesce.py [--workdir DIR] [--tokens N] [--share F] [--trials N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mer
from mer.bench.machine import Share
from mer.bench.scenarios import PROMPT, synth
from mer.cache.trace import RoutingTrace
from mer.sampling import SamplingParams
from mer.store.convert import convert
from mer.synth import SHAPES

TRACE_TEXT = (
    "Rivers shape the land they cross: they carve valleys, carry silt to the sea and build "
    "deltas where they slow. Farmers have settled beside them since the first harvests, and "
    "cities grew where a river could be bridged or where ships could load their cargo."
)
GREEDY = SamplingParams(temperature=0.0)


def record_trace(gguf: Path, out: Path, tokens: int) -> None:
    model = mer.load_model(gguf)
    trace = RoutingTrace(model.args.n_layers, model.args.n_experts)
    model.transformer.routing_observer = trace.observe
    ids = model.tokenizer.encode(TRACE_TEXT)
    list(model.generate(ids, GREEDY, tokens, stop_ids=frozenset()))
    trace.save(out)


def trial(store: Path, budget: int, coalesce: bool, ids: list[int], tokens: int) -> dict:
    with mer.load_model(store, cache_bytes=budget, coalesce=coalesce) as model:
        list(model.generate(ids[:8], GREEDY, 2, stop_ids=frozenset()))  # compile, warm
        before = model.expert_stats()
        stamps = []
        with Share() as share:
            for _ in model.generate(ids, GREEDY, tokens, stop_ids=frozenset()):
                stamps.append(time.perf_counter())
        after = model.expert_stats()
    n = len(stamps) - 1
    per = {k: (after[k] - before[k]) / len(stamps) for k in ("disk_reads", "reads_merged")}
    return {
        "tok_s": n / (stamps[-1] - stamps[0]),
        "bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / len(stamps),
        "read_gbps": after["read_gbps"],
        "others": share.others,
        **per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "mer-bench"))
    parser.add_argument("--shape", default="qwen3-30b-a3b-4l", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--share", type=float, default=0.25, help="cache share of experts")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", help="write every trial as JSON here")
    opts = parser.parse_args()

    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gguf = synth(work / f"{opts.shape}-q4_0.gguf", SHAPES[opts.shape], "q4_0", print)
    trace = work / f"{opts.shape}-trace.json"
    if not trace.exists():
        record_trace(gguf, trace, 64)
    stores = {}
    for layout, kwargs in (("id order", {}), ("co-use order", {"trace": trace})):
        path = work / f"{opts.shape}-store-{layout.split()[0]}"
        if not path.exists():
            convert(gguf, path, **kwargs)
        stores[layout] = path
    manifest = json.loads((stores["id order"] / "manifest.json").read_text())
    budget = int(opts.share * manifest["experts"]["bytes"])
    ids = mer.load_model(gguf).tokenizer.encode(PROMPT)[:16]
    configs = [(layout, coalesce) for layout in stores for coalesce in (False, True)]
    trials: dict[tuple, list[dict]] = {c: [] for c in configs}
    for round_no in range(opts.trials + 4):
        for layout, coalesce in configs:
            if sum(t["others"] <= 0.05 for t in trials[(layout, coalesce)]) >= opts.trials:
                continue
            t = trial(stores[layout], budget, coalesce, ids, opts.tokens)
            trials[(layout, coalesce)].append(t)
            print(f"round {round_no}: {layout}, merged={coalesce}: {t['tok_s']:.2f} tok/s, "
                  f"others {t['others']:.1%}", flush=True)  # fmt: skip
        if all(sum(t["others"] <= 0.05 for t in ts) >= opts.trials for ts in trials.values()):
            break
    if opts.out:
        Path(opts.out).write_text(
            json.dumps([{"layout": k[0], "coalesce": k[1], "trials": v} for k, v in trials.items()])
        )

    def kept(ts: list[dict]) -> list[dict]:
        clean = [t for t in ts if t["others"] <= 0.05]
        return clean or [min(ts, key=lambda t: t["others"])]

    gib = manifest["experts"]["bytes"] / 2**30
    print(f"\n{opts.shape} Q4_0, cache {opts.share:.0%} of {gib:.2f} GiB of experts, "
          f"{opts.tokens} tokens, median of the clean trials")  # fmt: skip
    print("| layout | reads merged | tok/s | vs not merged | disk requests/token | "
          "merged/token | MB/token | read GB/s | others |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, coalesce in configs:
        ts = kept(trials[(layout, coalesce)])
        base = statistics.median(t["tok_s"] for t in kept(trials[(layout, False)]))

        def med(key: str, ts=ts) -> float:
            return statistics.median(t[key] for t in ts)

        print(
            f"| {layout} | {'yes' if coalesce else 'no'} | {med('tok_s'):.2f} | "
            f"{med('tok_s') / base:.2f} | {med('disk_reads'):.1f} | {med('reads_merged'):.1f} | "
            f"{med('bytes_per_token') / 1e6:.1f} | {med('read_gbps'):.2f} | "
            f"{max(t['others'] for t in ts):.1%} |"
        )


if __name__ == "__main__":
    main()
