"""What the forward pass tells the cache ahead of time: which experts the next layer will
probably use, and how often such predictions were right.

`Lookahead` sits beside the forward pass (it needs the hidden state), in the process that
runs it: for each MoE layer it scores the predictions made for that layer, trains the
Markov chain and records the routing (for Belady's bound); then it predicts the layer after:
the next layer's router applied to this layer's hidden state (the gate lookahead), each
expert with the measured precision of its rank; after the last layer, the Markov chain's
estimate for the next step's first layer. Only the gate lookahead is passed on to the
cache's eviction score (`hint`): the cache keeps its own per-expert Markov estimate, which a
hint would override, and hinting the Markov chain's estimate measured lower hit rates
(bench/cache.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mer.cache.expert_cache import ExpertKey
from mer.cache.predict import MarkovPredictor, PredictorStats
from mer.cache.readahead import Candidate, GateCalibration, gate_ranks
from mer.cache.sources import ExpertSource


class Lookahead:
    """Predictions of `source`'s next experts for a model choosing `k` per token."""

    def __init__(self, source: ExpertSource, k: int) -> None:
        self.source = source
        self.k = k
        self.markov = MarkovPredictor(source.n_layers, source.n_experts)
        self.calibration = GateCalibration(k)
        self.gate = PredictorStats()
        self.hint: dict[ExpertKey, float] = {}  # the latest gate predictions, for eviction
        self.accesses: list[ExpertKey] = []  # the routing so far, for Belady's bytes
        self.steps = 0  # forward passes (each visits every layer once)
        self.tokens = 0  # tokens those passes processed
        self._ranks: dict[int, dict[int, int]] = {}  # layer -> its predicted experts' ranks

    def observe(self, layer: int, ids: Iterable[int], n_tokens: int) -> None:
        """The experts layer `layer` chose for a step of `n_tokens` tokens."""
        if layer == 0:
            self.steps += 1
            self.tokens += n_tokens
        actual = {int(e) for e in ids}
        self.accesses += [(layer, e) for e in sorted(actual)]
        if self.source.n_experts == 1:  # a dense FFN: nothing to predict
            return
        predicted = self._ranks.pop(layer, None)
        if predicted is not None:
            self.gate.update(predicted, actual)
            self.calibration.update(predicted, actual)
        self.markov.observe(layer, actual)

    def predict_next(
        self, layer: int, h: np.ndarray, next_router: np.ndarray | None
    ) -> list[Candidate]:
        """Read-ahead candidates for the layer after `layer` (module docstring); sets `hint`."""
        nxt = (layer + 1) % self.source.n_layers
        self.hint = {}
        if self.source.n_experts == 1:  # dense FFNs: the next one is always needed
            self.hint = {(nxt, 0): 1.0}
            return [self.candidate((nxt, 0), 1.0)]
        if nxt > layer and next_router is not None:
            ranks = gate_ranks(h, next_router, self.k)
            self._ranks[nxt] = ranks
            self.hint = {(nxt, e): self.calibration.probability(r) for e, r in ranks.items()}
            return [self.candidate(key, p) for key, p in self.hint.items()]
        return [self.candidate((nxt, e), p) for e, p in self.markov.predict(nxt).items()]

    def candidate(self, key: ExpertKey, p: float) -> Candidate:
        return Candidate(key, p, sum(seg.length for seg in self.source.segments(key)))

    def telemetry(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "gate_precision": self.gate.precision,
            "gate_recall": self.gate.recall,
            "markov_precision": self.markov.stats.precision,
            "markov_recall": self.markov.stats.recall,
        }
