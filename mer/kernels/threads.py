"""How many threads a kernel call gets: measured, not assumed.

On an idle machine a product split over every core finishes sooner. On a busy one it may
finish much later: a parallel region ends only when its slowest thread does, a thread the OS
lends to another process for a time slice holds up the whole region, and OpenMP threads
spinning at a barrier take cores from the work. With one of two cores busy, a parallel
decode step measured up to 100 times slower than a serial one (bench/contention.py).

So `ThreadPolicy` measures. For each kind of call (a key: which kernel, the shape of the
work, the token count's power of two) it keeps the cost — seconds per unit of work, an
exponential moving average, so that rare long waits weigh as much as they cost — of calls
with each candidate thread count (1, half the threads where there are 4 or more, all of
them), and gives each call the cheapest.

Now and then one call gets another count, to see whether conditions have changed (a probe).
A probe's figure replaces the stale one for its count. If the probed count is cheaper by
`margin` it is chosen, on trial: should the next calls measure it dearer after all (one lucky
call), the old choice returns and counts as confirmed. Probes are spaced to cost at most
`probe_budget` of the time: each confirmation doubles the interval, which is also at least
(r - 1) / probe_budget calls where the other count costs r times as much; a choice that
changes resets it to `probe_every`.

The choice has no numerical consequence: the kernels split work by output rows (attention by
token and head), each computed whole by one thread, so results are bit-identical on any
number of threads (tests/kernels/test_matmul.py).
"""

from __future__ import annotations

from collections.abc import Hashable

_ALPHA = 0.25  # weight of the newest measurement in the moving average


class _Key:
    __slots__ = ("cost", "best", "calls", "interval", "probe", "trial")

    def __init__(self, probe_every: int) -> None:
        self.cost: dict[int, float] = {}  # thread count -> seconds per unit of work
        self.best = 0  # the chosen count, once every count has been measured
        self.calls = 0  # since the last probe
        self.interval = probe_every
        self.probe: int | None = None  # the count a probe is running with
        self.trial: tuple[int, int, int] | None = None  # (old best, old interval, calls left)


class ThreadPolicy:
    """Picks a thread count per call from measured cost (module docstring).
    `adaptive=False` always gives every thread."""

    def __init__(
        self,
        threads: int,
        *,
        adaptive: bool = True,
        probe_every: int = 16,
        probe_budget: float = 0.01,
        max_probe_every: int = 1 << 16,
        margin: float = 0.1,
        candidates: tuple[int, ...] | None = None,
    ) -> None:
        self.threads = threads
        self.adaptive = adaptive and threads > 1
        self.candidates = sorted(
            candidates or {1, threads} | ({threads // 2} if threads >= 4 else set())
        )
        self.probe_every = probe_every
        self.probe_budget = probe_budget
        self.max_probe_every = max_probe_every
        self.margin = margin
        self._keys: dict[Hashable, _Key] = {}

    def choose(self, key: Hashable) -> int:
        """The thread count for the next call of `key`; report the call with `record`."""
        if not self.adaptive:
            return self.threads
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(self.probe_every)
        if not state.best:
            unmeasured = [c for c in self.candidates if c not in state.cost]
            return unmeasured[-1]  # each count once, the most threads first
        if state.trial is not None:
            old, interval, left = state.trial
            state.trial = (old, interval, left - 1) if left > 1 else None  # else: confirmed
        state.calls += 1
        if state.calls < state.interval:
            return state.best
        state.calls = 0
        others = [c for c in self.candidates if c != state.best]
        state.probe = others[(state.interval // self.probe_every) % len(others)]
        return state.probe

    def record(self, key: Hashable, threads: int, work: float, seconds: float) -> None:
        """A call of `key` on `threads` threads did `work` units in `seconds`."""
        state = self._keys.get(key)
        if state is None:
            return
        cost = max(seconds, 1e-9) / max(work, 1e-9)
        old = state.cost.get(threads)
        if old is None or state.probe == threads:
            state.cost[threads] = cost
        else:
            state.cost[threads] = old + _ALPHA * (cost - old)
        if not state.best:
            if len(state.cost) == len(self.candidates):
                state.best = min(state.cost, key=lambda c: (state.cost[c], -c))
            return
        cheapest = min(state.cost, key=lambda c: (state.cost[c], -c))
        if state.probe == threads:
            state.probe = None
            if cheapest == threads and cost < (1 - self.margin) * state.cost[state.best]:
                state.trial = (state.best, state.interval, self.probe_every)
                state.best, state.interval = threads, self.probe_every
            else:
                state.interval = self._spacing(state, state.interval)
        elif threads == state.best and cheapest != threads:
            if state.trial is not None and cheapest == state.trial[0]:
                # The probe was a lucky call: the old choice stands, confirmed.
                state.best, state.interval = cheapest, self._spacing(state, state.trial[1])
            else:
                state.best, state.interval = cheapest, self.probe_every
            state.trial = None

    def _spacing(self, state: _Key, interval: int) -> int:
        others = [c for k, c in state.cost.items() if k != state.best]
        ratio = min(others) / state.cost[state.best] if others else 1.0
        spacing = max(2 * interval, (ratio - 1) / self.probe_budget)
        return int(min(spacing, self.max_probe_every))

    def choices(self) -> dict[Hashable, int]:
        """The current choice per key (for telemetry and tests)."""
        return {k: s.best for k, s in self._keys.items() if s.best}
