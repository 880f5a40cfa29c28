"""Hit rates of LRU, mer's ExpertCache policy and Belady's MIN on routing traces.

Synthetic workloads: each layer has its own Zipf popularity over the experts (a random
permutation per layer, so hot experts differ by layer), and with probability `rho` a token
reuses the previous token's expert choice in that layer (temporal correlation; Mixtral
measured 14–28% same-first-choice for consecutive tokens). Traces recorded from model runs
(`mer trace record`) can be added with --trace. Prints a short table last.

    python bench/cache.py [--trace FILE ...] [--steps N]
"""

from __future__ import annotations

import argparse

import numpy as np

from mer.cache.trace import (
    RoutingTrace,
    capacity_slots,
    simulate_belady,
    simulate_lru,
    simulate_mer,
)

WORKLOADS = {
    # name: (layers, experts, top-k, zipf exponent, reuse probability)
    "mixtral-like uniform": (32, 8, 2, 0.0, 0.2),
    "mixtral-like zipf 0.8": (32, 8, 2, 0.8, 0.2),
    "qwen3-like zipf 1.0": (48, 128, 8, 1.0, 0.3),
    "skewed zipf 1.2": (16, 64, 4, 1.2, 0.5),
}


def synthetic(
    layers: int, experts: int, k: int, s: float, rho: float, steps: int, seed: int
) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1) ** s
    probs = [rng.permutation(weights / weights.sum()) for _ in range(layers)]
    trace = RoutingTrace(layers, experts)
    previous: list[list[int]] | None = None
    for _ in range(steps):
        for layer in range(layers):
            if previous is not None and rng.random() < rho:
                chosen = previous[layer]
            else:
                chosen = rng.choice(experts, size=k, replace=False, p=probs[layer]).tolist()
            trace.record(layer, chosen)
        previous = trace.steps[-1]
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="*", default=[], help="recorded trace files")
    parser.add_argument("--steps", type=int, default=400, help="tokens per synthetic trace")
    parser.add_argument("--capacity", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    opts = parser.parse_args()
    traces = {
        name: synthetic(*spec, steps=opts.steps, seed=i)
        for i, (name, spec) in enumerate(WORKLOADS.items())
    }
    for path in opts.trace:
        traces[f"recorded {path}"] = RoutingTrace.load(path)
    rows = []
    for name, trace in traces.items():
        accesses = trace.accesses()
        for spec in opts.capacity:
            slots = capacity_slots(spec, trace.n_layers, trace.n_experts)
            lru, ours, best = (
                f(accesses, slots) for f in (simulate_lru, simulate_mer, simulate_belady)
            )
            rows.append((name, spec, lru, ours, best))
    print(f"{'workload':<28}{'capacity':>9}{'LRU':>8}{'mer':>8}{'Belady':>8}{'mer/Belady':>12}")
    for name, spec, lru, ours, best in rows:
        print(f"{name[:28]:<28}{spec:>9.0%}{lru:>8.3f}{ours:>8.3f}{best:>8.3f}{ours / best:>12.2f}")


if __name__ == "__main__":
    main()
