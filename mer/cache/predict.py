"""The expert predictors: which experts a layer will use before its router runs.

- `MarkovPredictor`: for each layer, a Markov chain over the layer's expert *sets* in time
  (one set per forward step). With order 2 the state is (set at step t-2, set at step t-1)
  and the prediction for step t gives each expert the share of the state's past successors
  that contained it. A state seen fewer than `min_count` times backs off to order 1 (the
  set at t-1), and then to the layer's overall per-expert frequency.
- `next_layer_gate`: the gate lookahead. The residual stream changes little from one layer
  to the next, so the next layer's router applied to this layer's hidden state mostly picks
  the experts that router will pick one layer later.

`PredictorStats` scores a predictor: precision (predicted experts that were used) and
recall (used experts that were predicted). Socket-free, numpy and Python only.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mer.kernels.router import route


@dataclass
class PredictorStats:
    """Counts of predicted, correctly predicted and actually used experts over `steps`."""

    predicted: int = 0
    correct: int = 0
    actual: int = 0
    steps: int = 0

    def update(self, predicted: Iterable[int], actual: Iterable[int]) -> None:
        predicted, actual = set(predicted), set(actual)
        self.predicted += len(predicted)
        self.correct += len(predicted & actual)
        self.actual += len(actual)
        self.steps += 1

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else 0.0


class _State:
    """What followed one context: how often it was seen, and how often each expert came."""

    __slots__ = ("count", "experts")

    def __init__(self) -> None:
        self.count = 0
        self.experts: dict[int, int] = {}


class MarkovPredictor:
    """Per-layer Markov chains over expert sets, with back-off to lower orders.

    Sets are kept as bitmasks (bit e set when expert e was used). Each layer keeps at most
    `max_states` contexts per order, the least recently used going first, so memory stays
    bounded however many distinct sets a 128-expert layer produces.
    """

    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        *,
        order: int = 2,
        threshold: float = 0.5,
        min_count: int = 2,
        max_states: int = 4096,
    ) -> None:
        if n_layers < 1 or n_experts < 1:
            raise ValueError("n_layers and n_experts must be at least 1")
        if order < 0:
            raise ValueError("order must be 0 or more")
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if min_count < 1 or max_states < 1:
            raise ValueError("min_count and max_states must be at least 1")
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.order = order
        self.threshold = threshold
        self.min_count = min_count
        self.max_states = max_states
        self.stats = PredictorStats()
        self.layer_stats: dict[int, PredictorStats] = {}
        self._history = [deque(maxlen=order) for _ in range(n_layers)]  # recent bitmasks
        # [layer][j - 1]: context of the last j sets -> what followed it
        self._tables: list[list[OrderedDict[tuple[int, ...], _State]]] = [
            [OrderedDict() for _ in range(order)] for _ in range(n_layers)
        ]
        self._seen = [0] * n_layers  # observations per layer
        self._freq: list[dict[int, int]] = [{} for _ in range(n_layers)]

    def predict(self, layer: int) -> dict[int, float]:
        """Probability that each expert is in `layer`'s next set (only those above 0)."""
        self._check_layer(layer)
        history = self._history[layer]
        for j in range(len(history), 0, -1):
            state = self._tables[layer][j - 1].get(tuple(history)[-j:])
            if state is not None and state.count >= self.min_count:
                return {e: c / state.count for e, c in state.experts.items()}
        seen = self._seen[layer]
        return {e: c / seen for e, c in self._freq[layer].items()} if seen else {}

    def predicted_set(self, layer: int) -> set[int]:
        """The experts predicted for `layer`'s next set: those with p >= threshold."""
        return {e for e, p in self.predict(layer).items() if p >= self.threshold}

    def observe(self, layer: int, experts: Iterable[int]) -> None:
        """`layer` used `experts` at this step: score the prediction made for it, then learn."""
        actual = {int(e) for e in experts}
        if any(not 0 <= e < self.n_experts for e in actual):
            raise ValueError(f"expert ids must be in 0..{self.n_experts - 1}: {sorted(actual)}")
        predicted = self.predicted_set(layer)
        self.stats.update(predicted, actual)
        self.layer_stats.setdefault(layer, PredictorStats()).update(predicted, actual)
        history = tuple(self._history[layer])
        for j in range(1, len(history) + 1):
            table = self._tables[layer][j - 1]
            context = history[-j:]
            state = table.get(context)
            if state is None:
                state = table[context] = _State()
                if len(table) > self.max_states:
                    table.popitem(last=False)
            else:
                table.move_to_end(context)
            state.count += 1
            for e in actual:
                state.experts[e] = state.experts.get(e, 0) + 1
        freq = self._freq[layer]
        for e in actual:
            freq[e] = freq.get(e, 0) + 1
        self._seen[layer] += 1
        self._history[layer].append(sum(1 << e for e in actual))

    def n_states(self, layer: int) -> int:
        """Contexts the layer's tables hold (all orders)."""
        self._check_layer(layer)
        return sum(len(t) for t in self._tables[layer])

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} outside 0..{self.n_layers - 1}")


def next_layer_gate(h: np.ndarray, router: np.ndarray, k: int) -> dict[int, float]:
    """The gate lookahead: the next layer's `router` (float32 [E, D]) applied to this layer's
    hidden state `h` (float32 [n, D], or [D] for one token), softmax and top-`k` per token
    (`mer.kernels.router.route`). Returns, for each expert chosen by some token, the share of
    the n tokens whose top-k contains it."""
    h = np.asarray(h, dtype=np.float32)
    if h.ndim == 1:
        h = h[None, :]
    router = np.asarray(router, dtype=np.float32)
    if h.ndim != 2 or router.ndim != 2 or h.shape[1] != router.shape[1]:
        raise ValueError(f"next_layer_gate: h {h.shape} and router {router.shape} do not match")
    n = h.shape[0]
    if n == 0:
        return {}
    idx, _ = route(np.ascontiguousarray(h @ router.T), k)
    counts = np.bincount(idx.ravel(), minlength=router.shape[0])
    return {int(e): float(counts[e]) / n for e in np.flatnonzero(counts)}
