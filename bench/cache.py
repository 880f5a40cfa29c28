"""Hit rates of LRU, mer's ExpertCache policy and Belady's MIN on routing traces, and the
Markov predictor's precision/recall replayed on the same traces.

Synthetic workloads: each layer has its own Zipf popularity over the experts (a random
permutation per layer, so hot experts differ by layer), and with probability `rho` a layer
reuses its previous step's expert set (temporal correlation; Mixtral measured 14–28%
same-first-choice for consecutive tokens). Traces recorded from model runs
(`mer trace record`) can be added with --trace.

`bound` (synthetic workloads only) caps what any policy that cannot see the future can
reach in expectation: a slot's chances of a hit come at most once per step (an expert
loaded on a miss waits a full step for its next use), and at step t expert e of layer l is
used with probability rho·[e used at t-1] + (1 - rho)·q_le (q: its inclusion probability,
estimated by sampling), so no policy expects more hits at step t than the sum of the C
largest of those probabilities. Belady sees the future and can beat it.

`--model PATH` records a trace from that model in the same run (greedy-free sampling over a
few prompts, experts streamed so that the next-layer gate lookahead's precision/recall is
measured online too) and adds it to the table.

    python bench/cache.py [--trace FILE ...] [--model PATH] [--steps N] [--capacity F ...]

Prints a short table last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mer.cache.predict import MarkovPredictor
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


def popularity(layers: int, experts: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Per-layer Zipf(s) probabilities over the experts, permuted per layer: [layers, experts]."""
    weights = 1.0 / np.arange(1, experts + 1) ** s
    return np.array([rng.permutation(weights / weights.sum()) for _ in range(layers)])


def synthetic(
    layers: int, experts: int, k: int, s: float, rho: float, steps: int, seed: int
) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    probs = popularity(layers, experts, s, rng)
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


def inclusion(probs: np.ndarray, k: int, samples: int = 4000, seed: int = 1) -> np.ndarray:
    """P(expert in a layer's k draws without replacement): [layers, experts]. Successive
    sampling as numpy's choice does it equals the top k of log p + Gumbel noise."""
    rng = np.random.default_rng(seed)
    q = np.zeros_like(probs)
    logp = np.log(np.maximum(probs, 1e-300))
    for layer, row in enumerate(logp):
        noisy = row + rng.gumbel(size=(samples, row.size))
        top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
        q[layer] = np.bincount(top.ravel(), minlength=row.size) / samples
    return q


def online_bound(trace: RoutingTrace, spec: tuple, seed: int, slots: list[int]) -> list[float]:
    """The `bound` of the module docstring for each cache size in `slots`."""
    layers, experts, k, s, rho = spec
    q = inclusion(popularity(layers, experts, s, np.random.default_rng(seed)), k)
    hits = np.zeros(len(slots))
    previous = None
    for step in trace.steps:
        p = q.copy() if previous is None else (1.0 - rho) * q
        if previous is not None:
            for layer, es in enumerate(previous):
                p[layer, es] += rho
        ranked = np.cumsum(np.sort(p.ravel())[::-1])
        hits += ranked[np.array(slots) - 1]
        previous = step
    return list(hits / len(trace.accesses()))


def markov_replay(trace: RoutingTrace) -> tuple[float, float]:
    """The Markov predictor's precision and recall, observing the trace in order."""
    markov = MarkovPredictor(trace.n_layers, trace.n_experts)
    for step in trace.steps:
        for layer, experts in enumerate(step):
            markov.observe(layer, experts)
    return markov.stats.precision, markov.stats.recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="*", default=[], help="recorded trace files")
    parser.add_argument("--steps", type=int, default=400, help="tokens per synthetic trace")
    parser.add_argument("--capacity", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--model", help="record a trace from this MoE model in the same run")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per prompt (--model)")
    opts = parser.parse_args()
    start = time.perf_counter()
    traces = {
        name: (synthetic(*spec, steps=opts.steps, seed=i), spec, i)
        for i, (name, spec) in enumerate(WORKLOADS.items())
    }
    for path in opts.trace:
        traces[f"recorded {path}"] = (RoutingTrace.load(path), None, None)
    gate = None
    if opts.model:
        trace, gate = record(opts.model, opts.tokens)
        traces[f"model {Path(opts.model).name}"] = (trace, None, None)
    rows = []
    for name, (trace, spec, seed) in traces.items():
        accesses = trace.accesses()
        slots = [capacity_slots(c, trace.n_layers, trace.n_experts) for c in opts.capacity]
        bounds = online_bound(trace, spec, seed, slots) if spec else [None] * len(slots)
        precision, recall = markov_replay(trace)
        for spec_c, n, bound in zip(opts.capacity, slots, bounds, strict=True):
            lru, ours, best = (
                f(accesses, n) for f in (simulate_lru, simulate_mer, simulate_belady)
            )
            rows.append((name, spec_c, lru, ours, best, bound, precision, recall))
        print(f"{name}: {len(accesses)} accesses, {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(
        f"{'workload':<24}{'capacity':>9}{'LRU':>7}{'mer':>7}{'Belady':>8}{'mer/Bel':>8}"
        f"{'bound':>7}{'markov P':>10}{'R':>6}"
    )
    for name, spec_c, lru, ours, best, bound, precision, recall in rows:
        ratio = ours / best if best else 1.0
        bound_text = f"{bound:>7.3f}" if bound is not None else f"{'-':>7}"
        print(
            f"{name[:24]:<24}{spec_c:>9.0%}{lru:>7.3f}{ours:>7.3f}{best:>8.3f}{ratio:>8.2f}"
            f"{bound_text}{precision:>10.2f}{recall:>6.2f}"
        )
    if gate is not None:
        print(f"gate lookahead on {opts.model}: precision {gate[0]:.2f}, recall {gate[1]:.2f}")


PROMPTS = [
    "The history of the printing press begins in the fifteenth century,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Les montagnes des Alpes sont couvertes de neige en hiver, et",
    "Q: What is the capital of Australia?\nA:",
]


def record(path: str, tokens: int) -> tuple[RoutingTrace, tuple[float, float]]:
    """A routing trace of `path` generating from a few prompts, and the gate lookahead's
    (precision, recall) measured while streaming the experts through a cache that holds all
    of them (prediction is measured the same whatever the cache size)."""
    import mer
    from mer.sampling import SamplingParams

    with mer.load_model(path, cache_bytes=1 << 62) as model:
        if not model.args.is_moe:
            raise SystemExit(f"{path}: not a Mixture-of-Experts model")
        trace = RoutingTrace(model.args.n_layers, model.args.n_experts)
        model.transformer.routing_observer = trace.recorder(
            [layer.router for layer in model.weights.layers], model.args.n_experts_per_tok
        )
        for i, text in enumerate(PROMPTS):
            ids = model.tokenizer.encode(text)
            params = SamplingParams(temperature=0.8, seed=i)
            for _ in model.generate(ids, params, tokens, stop_ids=frozenset()):
                pass
        stats = model.expert_stats()
    return trace, (stats["gate_precision"], stats["gate_recall"])


if __name__ == "__main__":
    main()
