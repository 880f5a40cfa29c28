"""Which predicted experts to read ahead: only those whose read pays for itself.

A read-ahead of an expert for the next layer, issued while this layer computes, fills time
the disk would otherwise sit idle: the idle window W, about one layer's compute once this
layer's demand reads are done. If the expert is then used (probability p) the next layer
waits up to W less. If not, the disk spent the whole read time t on it, and t - W of that
comes out of the next layer's demand reads. So a read-ahead is worth issuing when

    p * min(t, W) > (1 - p) * max(0, t - W),  i.e.  p > 1 - W / t  (any p when W >= t)

and each admitted read uses up its part of the window for the next candidate. On a fast disk
(W >= t) everything likely is read ahead; when reads dominate (t >> W, the larger-than-memory
case) only near-certain predictions are, and when the window is used up nothing is: the disk
is the bottleneck and wrong reads would only slow it down. Eviction is the cache's business:
`ExpertCache.prefetch` never evicts an expert it scores higher than the read-ahead.

Bytes are a cost of their own (an SSD's wear, other programs' page cache): a read-ahead that
turns out unused is a wasted read however idle the disk was. `WasteBudget` lets read-ahead
spend at most `fraction` of the reads issued on expected waste (1 - p per read-ahead), so
read-ahead never reads much beyond what the cache alone would.

The probabilities come from `GateCalibration`: the gate lookahead's measured precision at
each rank (a token's first, second, ... choice of the next layer's router applied to this
layer's hidden state), so an expert is read ahead on the strength of the predictions that
have been right, not on a fixed belief.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mer.kernels.router import route

ExpertKey = tuple[int, int]


def gate_ranks(h: np.ndarray, router: np.ndarray, k: int) -> dict[int, int]:
    """The gate lookahead with ranks: the next layer's `router` (float32 [E, D]) applied to
    this layer's hidden state `h` (float32 [n, D]), top-`k` per token; for each expert some
    token chose, the best rank it had (0: some token's first choice)."""
    h = np.asarray(h, dtype=np.float32).reshape(-1, router.shape[1])
    idx, _ = route(np.ascontiguousarray(h @ np.asarray(router, np.float32).T), k)
    ranks: dict[int, int] = {}
    for rank in range(idx.shape[1]):
        for e in np.unique(idx[:, rank]).tolist():
            ranks.setdefault(int(e), rank)
    return ranks


@dataclass
class GateCalibration:
    """How often the gate lookahead's predictions at each rank were used (Laplace-smoothed;
    a prior of `prior` uses at `prior_p`)."""

    k: int
    prior: float = 4.0
    prior_p: float = 0.75
    predicted: list[float] = field(default_factory=list)
    used: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.predicted = [0.0] * self.k
        self.used = [0.0] * self.k

    def update(self, ranks: dict[int, int], actual: Iterable[int]) -> None:
        actual = set(actual)
        for e, rank in ranks.items():
            self.predicted[rank] += 1
            self.used[rank] += e in actual

    def probability(self, rank: int) -> float:
        return (self.used[rank] + self.prior * self.prior_p) / (self.predicted[rank] + self.prior)


@dataclass(frozen=True)
class Candidate:
    key: ExpertKey
    p: float  # probability that the next visit of its layer uses it
    nbytes: int


@dataclass
class WasteBudget:
    """Expected waste allowed to read-ahead: `fraction` of an expert per read issued (demand or
    ahead), at most `cap` experts saved up; a read-ahead of probability p spends 1 - p."""

    fraction: float = 0.05
    cap: float = 2.0
    credit: float = 1.0

    def earn(self, reads: int = 1) -> None:
        self.credit = min(self.cap, self.credit + self.fraction * reads)

    def spend(self, p: float) -> bool:
        if 1.0 - p > self.credit:
            return False
        self.credit -= 1.0 - p
        return True


def admit(
    candidates: Sequence[Candidate],
    window_s: float,
    bytes_per_s: float,
    budget: WasteBudget | None = None,
    min_p: float = 0.5,
) -> list[Candidate]:
    """The candidates worth reading ahead, most likely first (module docstring): each needs
    p > 1 - W / t with W what is left of the idle window `window_s` after the ones before it,
    and t its read time at `bytes_per_s`; p > `min_p` whatever the window; and room in the
    waste `budget` (spent here for those chosen)."""
    chosen = []
    left = max(0.0, window_s)
    for c in sorted(candidates, key=lambda c: (-c.p, c.key)):
        t = c.nbytes / bytes_per_s if bytes_per_s > 0 else float("inf")
        if t <= 0 or c.p <= max(min_p, 1.0 - left / t):
            continue  # later candidates are no more likely, but may be smaller: keep looking
        if budget is not None and not budget.spend(c.p):
            break
        chosen.append(c)
        left = max(0.0, left - t)
    return chosen
