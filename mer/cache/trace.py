"""Routing traces and cache-policy simulation on them.

A trace lists, for every forward step, the experts each MoE layer used (each expert once
per step, as the engine reads it once for the whole batch). Replaying the accesses in
order (step, then layer, then expert id) against a cache of C slots gives the hit rate of
a policy: LRU, mer's ExpertCache, or Belady's MIN (evict the expert used farthest in the
future), the optimum no online policy can beat.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mer.cache.expert_cache import CacheFullError, ExpertCache, ExpertKey, Status
from mer.errors import MerError


@dataclass
class RoutingTrace:
    """The experts each layer used at each step and, when recorded with the routers
    (`recorder`), the gate lookahead's predictions for each layer: [expert, rank] pairs from
    the next layer's router applied to the previous layer's hidden state (none for layer 0)."""

    n_layers: int
    n_experts: int
    steps: list[list[list[int]]] = field(default_factory=list)  # [step][layer] -> expert ids
    gates: list[list[list[list[int]]]] = field(default_factory=list)  # [step][layer] -> pairs
    _pending: list[list[int]] = field(default_factory=list, repr=False)
    _last: int = field(default=-1, repr=False)

    def record(self, layer: int, experts: list[int]) -> None:
        """The experts layer `layer` used in this step; a step's MoE layers in order (dense
        layers, as DeepSeek's first ones, are never recorded: they list no experts)."""
        if not self.steps or layer <= self._last:
            self.steps.append([])
            self.gates.append([])
        while len(self.steps[-1]) < layer:  # the dense layers before this one
            self.steps[-1].append([])
            self.gates[-1].append([])
        self.steps[-1].append(sorted(int(e) for e in experts))
        self.gates[-1].append(self._pending if layer else [])
        self._pending = []
        self._last = layer

    def observe(self, layer: int, chosen: np.ndarray, h: np.ndarray | None = None) -> None:
        """A Transformer routing observer: each expert the step's tokens chose, once."""
        self.record(layer, sorted({int(e) for e in chosen.reshape(-1)}))

    def recorder(self, routers: list[np.ndarray | None], k: int):
        """A routing observer that also records the gate lookahead's predictions, with the
        model's routers (one per layer) and experts per token `k`."""
        from mer.cache.readahead import gate_ranks

        def observe(layer: int, chosen: np.ndarray, h: np.ndarray) -> None:
            self.observe(layer, chosen)
            nxt = routers[layer + 1] if layer + 1 < len(routers) else None
            if nxt is not None:
                self._pending = sorted([e, r] for e, r in gate_ranks(h, nxt, k).items())

        return observe

    def accesses(self) -> list[ExpertKey]:
        return [(layer, e) for step in self.steps for layer, es in enumerate(step) for e in es]

    def save(self, path: Path) -> None:
        data = {"n_layers": self.n_layers, "n_experts": self.n_experts, "steps": self.steps}
        if any(any(layer) for step in self.gates for layer in step):
            data["gates"] = self.gates
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> RoutingTrace:
        """The trace in file `path`; MerError naming the file if it is not a valid trace."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise MerError(f"{path}: not a routing trace (not UTF-8 text)") from None
        except ValueError as err:
            raise MerError(f"{path}: not a routing trace (invalid JSON: {err})") from None
        problem = _trace_problem(data)
        if problem:
            raise MerError(f"{path}: not a routing trace ({problem})")
        gates = data.get("gates") or [[[] for _ in step] for step in data["steps"]]
        return cls(data["n_layers"], data["n_experts"], data["steps"], gates)


def co_use_order(trace: RoutingTrace, layer: int) -> list[int]:
    """Layer `layer`'s expert ids in an order that puts experts used in the same step next to
    each other: from the most used expert, each next one is the unplaced expert used most
    often together with the last placed (ties: the more used, then the lower id). Laid out on
    disk in this order, a step's misses are more often adjacent, and adjacent misses are read
    with one request (`mer.io.reader`). Experts the trace never saw come last, by id."""
    n = trace.n_experts
    together = np.zeros((n, n), np.int64)
    used = np.zeros(n, np.int64)
    for step in trace.steps:
        if layer < len(step) and step[layer]:
            ids = np.asarray(step[layer])
            together[np.ix_(ids, ids)] += 1
            used[ids] += 1
    np.fill_diagonal(together, 0)
    left = set(range(n))
    order: list[int] = []
    while left:
        if order:
            last = order[-1]
            best = max(left, key=lambda e: (together[last, e], used[e], -e))
        else:
            best = max(left, key=lambda e: (used[e], -e))
        if not used[best]:
            order += sorted(left)
            break
        order.append(best)
        left.remove(best)
    return order


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _trace_problem(data: object) -> str | None:
    """What makes `data` (parsed JSON) not a trace, or None."""
    if not isinstance(data, dict):
        return "expected a JSON object"
    layers, experts, steps = data.get("n_layers"), data.get("n_experts"), data.get("steps")
    if not (_is_int(layers) and layers > 0 and _is_int(experts) and experts > 0):
        return "n_layers and n_experts must be positive integers"
    if not isinstance(steps, list):
        return "steps must be a list"
    for i, step in enumerate(steps):
        if not isinstance(step, list) or len(step) > layers:
            return f"step {i} must list at most {layers} layers"
        for used in step:
            if not isinstance(used, list) or not all(_is_int(e) and 0 <= e < experts for e in used):
                return f"step {i} must list expert ids in 0..{experts - 1} per layer"
    gates = data.get("gates")
    if gates is not None and not _gates_fit(gates, steps, experts):
        return "gates must give [expert, rank] pairs for each step's layers"
    return None


def _gates_fit(gates: object, steps: list, experts: int) -> bool:
    if not isinstance(gates, list) or len(gates) != len(steps):
        return False
    for step_gates, step in zip(gates, steps, strict=True):
        if not isinstance(step_gates, list) or len(step_gates) != len(step):
            return False
        for pairs in step_gates:
            if not isinstance(pairs, list):
                return False
            for pair in pairs:
                if not (isinstance(pair, list) and len(pair) == 2 and all(map(_is_int, pair))):
                    return False
                if not (0 <= pair[0] < experts and pair[1] >= 0):
                    return False
    return True


def simulate_lru(accesses: list[ExpertKey], capacity: int) -> float:
    cache: OrderedDict[ExpertKey, None] = OrderedDict()
    hits = 0
    for key in accesses:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
            continue
        if len(cache) >= capacity:
            cache.popitem(last=False)
        cache[key] = None
    return hits / len(accesses) if accesses else 0.0


def belady_hits(accesses: list[ExpertKey], capacity: int) -> list[bool]:
    """For each access, whether Belady's MIN (evict the expert used farthest in the future)
    finds it resident with `capacity` slots."""
    never = len(accesses)
    next_use = [never] * len(accesses)
    seen: dict[ExpertKey, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = seen.get(accesses[i], never)
        seen[accesses[i]] = i
    resident: dict[ExpertKey, int] = {}  # key -> its next use
    heap: list[tuple[int, ExpertKey]] = []  # (-next use, key); stale entries skipped
    hits = []
    for i, key in enumerate(accesses):
        hits.append(key in resident)
        if key not in resident and len(resident) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    break
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits


def simulate_belady(accesses: list[ExpertKey], capacity: int) -> float:
    hits = belady_hits(accesses, capacity)
    return sum(hits) / len(hits) if hits else 0.0


def simulate_mer(accesses: list[ExpertKey], capacity: int, pin_fraction: float = 0.25) -> float:
    """ExpertCache's hit rate, used as the engine uses it: the experts of one layer visit (a
    run of accesses to one layer) stay leased until the visit ends, or until the cache needs
    their slots for the visit's other experts."""
    n_layers = max((layer for layer, _ in accesses), default=-1) + 1
    pins = min(capacity - 1, int(capacity * pin_fraction))
    cache = ExpertCache(capacity, pin_budget=pins, n_layers=n_layers)
    leased: list[ExpertKey] = []
    visit: set[ExpertKey] = set()
    for key in accesses:
        if leased and (key[0] != leased[0][0] or key in visit):
            for done in leased:
                cache.release(done)
            leased, visit = [], set()
        while True:
            try:
                status, _ = cache.acquire(key)
                break
            except CacheFullError:
                if not leased:
                    raise
                cache.release(leased.pop(0))
        if status is Status.MISS:
            cache.complete(key)
        leased.append(key)
        visit.add(key)
    return cache.stats.hit_rate


def capacity_slots(spec: float, n_layers: int, n_experts: int) -> int:
    """A capacity given as a fraction of all experts (in (0, 1]) or as a whole number of
    slots; MerError for anything else (zero, negative, not finite, 1.5)."""
    if not math.isfinite(spec) or spec <= 0 or (spec > 1 and spec != int(spec)):
        raise MerError(
            f"--capacity {spec:g}: give a fraction of all experts in (0, 1] or a whole "
            "number of slots"
        )
    total = n_layers * n_experts
    slots = round(spec * total) if spec <= 1 else int(spec)
    return max(1, min(total, slots))


class RoutingStats:
    """A Transformer routing observer that counts, per layer, how often each expert is chosen
    and how often a token's first choice is the previous token's (tokens in the order the
    model saw them)."""

    def __init__(self, n_layers: int, n_experts: int) -> None:
        self.counts = np.zeros((n_layers, n_experts), np.int64)  # choices, all K per token
        self.tokens = np.zeros(n_layers, np.int64)
        self.repeats = np.zeros(n_layers, np.int64)  # first choice equal to the previous one
        self.pairs = np.zeros(n_layers, np.int64)
        self._last: dict[int, int] = {}  # layer -> the last token's first choice

    def observe(self, layer: int, chosen: np.ndarray, h: np.ndarray | None = None) -> None:
        self.counts[layer] += np.bincount(chosen.reshape(-1), minlength=self.counts.shape[1])
        self.tokens[layer] += chosen.shape[0]
        first = chosen[:, 0]
        if layer in self._last:
            first = np.concatenate([[self._last[layer]], first])
        self.repeats[layer] += int((first[1:] == first[:-1]).sum())
        self.pairs[layer] += len(first) - 1
        self._last[layer] = int(first[-1])

    def shares(self) -> np.ndarray:
        """float [L, E]: the share of tokens that chose each expert (rows sum to K)."""
        return self.counts / np.maximum(self.tokens, 1)[:, None]

    def repeat_rate(self) -> float:
        """How often consecutive tokens share their first choice, over all layers."""
        return float(self.repeats.sum() / max(self.pairs.sum(), 1))

    def table(self) -> str:
        """The per-layer histogram (percent of tokens choosing each expert), with each
        layer's first-choice repeat rate."""
        n_experts = self.counts.shape[1]
        head = "layer " + "".join(f"{e:>5}" for e in range(n_experts)) + "  repeat"
        lines = [head]
        for layer, row in enumerate(self.shares()):
            if not self.tokens[layer]:  # a dense layer of an MoE model: nothing routed
                lines.append(f"{layer:>5}  dense")
                continue
            rate = self.repeats[layer] / max(self.pairs[layer], 1)
            lines.append(
                f"{layer:>5} " + "".join(f"{100 * v:>5.0f}" for v in row) + f"  {rate:>6.0%}"
            )
        return "\n".join(lines)
