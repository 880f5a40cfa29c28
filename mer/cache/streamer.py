"""Experts streamed from disk through the RAM cache during the forward pass.

`ExpertStreamer` ties together an arena of slots (`mer.io.arena`), the cache policy
(`ExpertCache`), one reader per source file (`ExpertReader`: io_uring, preadv or buffered)
and the predictors. For each MoE layer the forward pass calls `run(layer, ids, fn, ahead)`:

1. every chosen expert is leased; misses are read at once, many reads in flight;
2. read-ahead for the next layer is admitted from `ahead` (`predict_next`'s candidates);
3. experts are computed as they become ready (hits first, then reads in completion order)
   and released; when the cache is too small for all of a layer's experts at once, computed
   experts make room for the rest.

Whatever the order of computation, the caller sums expert outputs in a fixed order, so a
streamed model gives bit-identical logits to one with every expert resident.

Read-ahead admission (`mer.cache.readahead`): a candidate is read ahead when its read pays for
itself in the disk's idle window (p > 1 - W / t, W the window left: the measured CPU time of
a layer, t its read time at the measured read speed; and p > 1/2), when its expected waste
fits the waste budget (5% of the reads issued), and when the cache admits it (never evicting
a leased, pinned, loading or higher-scoring expert). Candidates are the
gate lookahead's predictions with their measured precision by rank; after the last layer,
the Markov chain's for the next step's first layer.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from mer.cache.expert_cache import CacheFullError, ExpertCache, ExpertKey, Status
from mer.cache.predict import MarkovPredictor, PredictorStats
from mer.cache.readahead import Candidate, GateCalibration, WasteBudget, admit, gate_ranks
from mer.cache.sources import ExpertSource
from mer.cache.trace import belady_hits
from mer.errors import MerError
from mer.io.arena import ALIGN, Arena
from mer.io.reader import ExpertReader, ExpertReadError, ReadRequest, ReadResult
from mer.models.weights import ExpertWeights

logger = logging.getLogger(__name__)
_LATENCIES = 4096  # cold-read latencies kept for percentiles


@dataclass
class _Flight:
    """An expert whose segments are being read."""

    key: ExpertKey
    remaining: int
    nbytes: int
    started: float
    demand: bool  # somebody waits for it (a read-ahead becomes demand when acquired)
    cold: bool  # issued on demand: its latency is a cold read's
    error: ExpertReadError | None = None
    acquired: float | None = None  # when a read-ahead in flight was acquired (an in-flight hit)


@dataclass
class StreamStats:
    """Counters of the streaming tier (the cache's own counters are in `cache.stats`)."""

    steps: int = 0  # forward passes (each visits every layer once)
    tokens: int = 0  # tokens those passes processed
    demand_reads: int = 0
    prefetch_reads: int = 0
    bytes_read: int = 0
    read_busy_s: float = 0.0  # wall time with at least one read in flight
    stall_s: float = 0.0  # time the forward pass waited for demand reads
    inflight_wait_s: float = 0.0  # time from acquiring a read-ahead in flight to its arrival
    cold_read_ms: deque = field(default_factory=lambda: deque(maxlen=_LATENCIES))
    gate: PredictorStats = field(default_factory=PredictorStats)


class ExpertStreamer:
    """Serves a model's experts from `source` through a RAM cache of `cache_bytes`."""

    def __init__(
        self,
        source: ExpertSource,
        cache_bytes: int,
        *,
        n_experts_per_tok: int = 1,
        backend: str = "auto",
        verify: bool = True,
        queue_depth: int = 16,
        prefetch: bool = True,
        pin_fraction: float = 0.25,
    ) -> None:
        self.source = source
        self.k = n_experts_per_tok
        slot = source.slot_bytes
        # never more slots than experts: a budget above the model's size holds all of it
        n_slots = min(int(cache_bytes) // slot, source.n_layers * source.n_experts)
        if n_slots < 1:
            raise MerError(
                f"cache budget of {int(cache_bytes)} bytes holds no expert (one needs {slot} bytes)"
            )
        self.arena = Arena(ALIGN + n_slots * slot, slot)
        self.readers: list[ExpertReader] = []
        self._mem = _Resources(self.arena, self.readers)
        self._finalizer = weakref.finalize(self, self._mem.close)
        try:
            for path in source.files:
                self.readers.append(
                    ExpertReader(path, queue_depth=queue_depth, backend=backend, verify=verify)
                )
        except BaseException:
            self._finalizer()
            raise
        self.backend = self.readers[0].backend
        pin = min(int(n_slots * pin_fraction), n_slots - 1)
        self.cache = ExpertCache(n_slots, pin_budget=pin, n_layers=source.n_layers)
        self.prefetch_enabled = prefetch
        self.markov = MarkovPredictor(source.n_layers, source.n_experts)
        self.stats = StreamStats()
        self._flights: dict[ExpertKey, _Flight] = {}
        self.calibration = GateCalibration(n_experts_per_tok)
        self.budget = WasteBudget()
        self._gate_ranks: dict[int, dict[int, int]] = {}  # layer -> its predicted experts
        self._hint: dict[ExpertKey, float] = {}
        self._cpu_s = 0.0  # moving average of a layer's CPU time: the disk's idle window
        self._run_started: float | None = None
        self._run_stalled = 0.0
        self._busy_since: float | None = None
        self._accesses: list[ExpertKey] = []  # the routing so far, for Belady's bytes

    # -- the forward pass's entry points -----------------------------------------------------
    def observe(self, layer: int, ids: Iterable[int], n_tokens: int) -> None:
        """The experts layer `layer` chose for this step of `n_tokens` tokens: scores and
        trains the predictors."""
        if layer == 0:
            self.stats.steps += 1
            self.stats.tokens += n_tokens
        actual = {int(e) for e in ids}
        self._accesses += [(layer, e) for e in sorted(actual)]
        if self.source.n_experts == 1:  # a dense FFN: nothing to predict
            return
        predicted = self._gate_ranks.pop(layer, None)
        if predicted is not None:
            self.stats.gate.update(predicted, actual)
            self.calibration.update(predicted, actual)
        self.markov.observe(layer, actual)

    def predict_next(
        self, layer: int, h: np.ndarray, next_router: np.ndarray | None
    ) -> list[Candidate]:
        """Read-ahead candidates for the layer after `layer` (layer 0 of the next step after
        the last layer): the next layer's router applied to this layer's hidden state `h`
        (the gate lookahead), each with the measured precision of its rank; after the last
        layer, the Markov chain's estimate for the next step's first layer.

        Only the gate lookahead is passed on to the cache's eviction score (`hint`): the cache
        keeps its own per-expert Markov estimate, which a hint would override, and hinting the
        Markov chain's estimate measured lower hit rates (bench/cache.py)."""
        nxt = (layer + 1) % self.source.n_layers
        self._hint = {}
        if self.source.n_experts == 1:  # dense FFNs: the next one is always needed
            self._hint = {(nxt, 0): 1.0}
            return [self._candidate((nxt, 0), 1.0)]
        if nxt > layer and next_router is not None:
            ranks = gate_ranks(h, next_router, self.k)
            self._gate_ranks[nxt] = ranks
            self._hint = {(nxt, e): self.calibration.probability(r) for e, r in ranks.items()}
            return [self._candidate(key, p) for key, p in self._hint.items()]
        return [self._candidate((nxt, e), p) for e, p in self.markov.predict(nxt).items()]

    def _candidate(self, key: ExpertKey, p: float) -> Candidate:
        return Candidate(key, p, sum(seg.length for seg in self.source.segments(key)))

    def run(
        self,
        layer: int,
        ids: Iterable[int],
        fn: Callable[[int, ExpertWeights], None],
        ahead: list[Candidate] | None = None,
    ) -> None:
        """Call fn(expert, weights) once for each expert id of `layer` in `ids`, in any order,
        with the expert's weights resident for the duration of the call; then consider the
        read-ahead candidates `ahead` (`predict_next`)."""
        todo = deque(int(e) for e in ids)
        ready: deque[ExpertKey] = deque()
        waiting: set[ExpertKey] = set()
        leased: list[ExpertKey] = []
        began, stalled = time.perf_counter(), 0.0
        if self._run_started is not None:  # the time since the last layer began, less stalls
            cpu = began - self._run_started - self._run_stalled
            self._cpu_s = cpu if not self._cpu_s else 0.9 * self._cpu_s + 0.1 * cpu
        self._harvest(block=False)
        try:
            self._lease(layer, todo, ready, waiting, leased)
            if ahead and self.prefetch_enabled:
                self._prefetch(ahead)
            while todo or ready or waiting:
                done: list[ExpertKey] = []
                if ready:
                    key = ready.popleft()
                    fn(key[1], self._weights(key))
                    self.cache.release(key)
                    leased.remove(key)
                    done = self._harvest(block=False) if self.busy else []
                elif self.busy:
                    t0 = time.perf_counter()
                    done = self._harvest(block=True)
                    stalled += time.perf_counter() - t0
                elif todo:
                    raise MerError(
                        f"expert cache of {self.cache.n_slots} slots has no room for layer "
                        f"{layer}'s experts (every slot is pinned or in use)"
                    )
                for key in done:
                    if key in waiting:
                        waiting.discard(key)
                        ready.append(key)
                self._lease(layer, todo, ready, waiting, leased)
        except ExpertReadError:
            leased = [k for k in leased if self.cache.leases(k)]
            raise
        finally:
            for key in leased:
                self.cache.release(key)
        self.stats.stall_s += stalled
        self._run_started, self._run_stalled = began, stalled

    # -- internals ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._flights)

    def _weights(self, key: ExpertKey) -> ExpertWeights:
        """The kernel-ready weights of a ready expert. Zero-copy sources (a store) give views
        of the slot, kept while the slot holds the expert; others are decoded on each use."""
        slot = self.cache.slot_of(key)
        held = self._mem.decoded.get(slot)
        if held is not None and held[0] == key:
            return held[1]
        weights = self.source.decode(key, self._slot(key))
        if getattr(self.source, "zero_copy", False):
            self._mem.decoded[slot] = (key, weights)
        return weights

    def _slot(self, key: ExpertKey) -> np.ndarray:
        slot = self.cache.slot_of(key)
        size = self.arena.slot_size
        return self._mem.base[slot * size : (slot + 1) * size]

    def _lease(self, layer, todo, ready, waiting, leased) -> None:
        while todo:
            key = (layer, todo[0])
            try:
                status, slot = self.cache.acquire(key)
            except CacheFullError:
                return
            todo.popleft()
            leased.append(key)
            if status is Status.HIT:
                ready.append(key)
                continue
            waiting.add(key)
            if status is Status.MISS:
                self._read(key, slot, demand=True)
            else:  # a read-ahead in flight: now somebody waits for it
                flight = self._flights[key]
                flight.demand = True
                flight.acquired = time.perf_counter()

    def _prefetch(self, candidates: list[Candidate]) -> None:
        self.cache.hint(self._hint)
        s = self.stats
        if not s.read_busy_s:  # no read speed measured yet
            return
        depth = self.readers[0].queue_depth
        for c in admit(candidates, self._cpu_s, s.bytes_read / s.read_busy_s, self.budget):
            if len(self._flights) >= depth:
                break
            slot = self.cache.prefetch(c.key, c.p)
            if slot is not None:
                self._read(c.key, slot, demand=False)

    def _read(self, key: ExpertKey, slot: int, demand: bool) -> None:
        self._mem.decoded.pop(slot, None)  # the slot is about to hold other bytes
        segments = self.source.segments(key)
        now = time.perf_counter()
        if not self._flights:
            self._busy_since = now
        flight = _Flight(key, len(segments), sum(s.length for s in segments), now, demand, demand)
        self._flights[key] = flight
        self.budget.earn()
        if demand:
            self.stats.demand_reads += 1
        else:
            self.stats.prefetch_reads += 1
        for i, seg in enumerate(segments):
            self.readers[seg.file].submit(
                [
                    ReadRequest(
                        seg.offset, seg.length, self.arena, slot, seg.expected, (key, i), seg.into
                    )
                ]
            )

    def _harvest(self, block: bool) -> list[ExpertKey]:
        """Finish reads that completed; with `block`, wait for at least one expert."""
        done: list[ExpertKey] = []
        error: ExpertReadError | None = None
        while True:
            busy = [r for r in self.readers if r.busy]
            results: list[ReadResult] = []
            for reader in busy:
                results += reader.poll(block=False)
            if not results and block and busy:
                results = busy[0].poll(block=True)
            for res in results:
                key = res.tag[0]
                flight = self._flights[key]
                flight.remaining -= 1
                flight.error = flight.error or res.error
                if flight.remaining == 0:
                    done.append(key)
                    error = self._finish(flight) or error
            if error is not None:
                raise error
            if done or not block or not self._flights:
                return done

    def _finish(self, flight: _Flight) -> ExpertReadError | None:
        """Hand a finished read to the cache; the error, if the forward pass waits for it."""
        del self._flights[flight.key]
        now = time.perf_counter()
        if not self._flights and self._busy_since is not None:
            self.stats.read_busy_s += now - self._busy_since
            self._busy_since = None
        if flight.error is not None:
            self.cache.complete(flight.key, ok=False)
            if flight.demand:
                return flight.error
            logger.warning("event=prefetch_failed expert=%s error=%s", flight.key, flight.error)
            return None
        self.stats.bytes_read += flight.nbytes
        if flight.cold:
            self.stats.cold_read_ms.append((now - flight.started) * 1e3)
        if flight.acquired is not None:
            self.stats.inflight_wait_s += now - flight.acquired
        self.cache.complete(flight.key, ok=True)
        return None

    # -- telemetry and shutdown --------------------------------------------------------------
    @property
    def accesses(self) -> int:
        """Expert uses so far (one per expert a layer visit chose)."""
        return len(self._accesses)

    def belady_bytes(self, from_access: int = 0) -> int:
        """Bytes Belady's MIN would have read for the routing so far with this cache's slots
        (the least any policy could read), counting its misses from use `from_access` on."""
        hits = belady_hits(self._accesses, self.cache.n_slots)
        return sum(
            sum(seg.length for seg in self.source.segments(key))
            for key, hit in zip(self._accesses[from_access:], hits[from_access:], strict=True)
            if not hit
        )

    def sample_experts(self) -> list[ExpertWeights]:
        """One expert of each block-type mix the source holds, decoded from zeroed bytes: what
        the kernels will be given, for compiling them ahead of use."""
        zeros = np.zeros(self.arena.slot_size, np.uint8)
        seen: dict[tuple[str, ...], ExpertWeights] = {}
        for layer in range(self.source.n_layers):
            for e in range(self.source.n_experts):
                kinds = self.source.kinds((layer, e))
                if kinds not in seen:
                    seen[kinds] = self.source.decode((layer, e), zeros)
        return list(seen.values())

    def telemetry(self) -> dict:
        """The streaming tier's figures (README: "What --stats reports" defines each): acquires
        that found the expert ready, found its read in flight, or missed, overall and per layer;
        bytes read (per token too) and read speed; stalls and cold-read latency; read-ahead
        precision, recall and waste; each predictor's precision and recall."""
        c, s = self.cache.stats, self.stats
        lat = np.array(s.cold_read_ms) if s.cold_read_ms else np.zeros(1)
        layers = sorted(set(c.hits_by_layer) | set(c.pending_by_layer) | set(c.misses_by_layer))
        slot = self.arena.slot_size
        reads = s.demand_reads + s.prefetch_reads
        return {
            "backend": self.backend,
            "slots": self.cache.n_slots,
            "slot_bytes": slot,
            "steps": s.steps,
            "tokens": s.tokens,
            "acquires": c.acquires,
            "hits": c.hits,
            "inflight_hits": c.pending_hits,
            "misses": c.misses,
            "hit_rate": c.hit_rate,
            "inflight_hit_rate": c.pending_rate,
            "miss_rate": c.misses / c.acquires if c.acquires else 0.0,
            "inflight_wait_s": s.inflight_wait_s,
            "per_layer": {
                layer: {
                    "hits": c.hits_by_layer.get(layer, 0),
                    "inflight_hits": c.pending_by_layer.get(layer, 0),
                    "misses": c.misses_by_layer.get(layer, 0),
                }
                for layer in layers
            },
            "demand_reads": s.demand_reads,
            "prefetch_reads": s.prefetch_reads,
            "bytes_read": s.bytes_read,
            "bytes_per_token": s.bytes_read / s.tokens if s.tokens else 0.0,
            "read_gbps": s.bytes_read / s.read_busy_s / 1e9 if s.read_busy_s else 0.0,
            "read_busy_s": s.read_busy_s,
            "stall_s": s.stall_s,
            "cold_read_ms_p50": float(np.percentile(lat, 50)),
            "cold_read_ms_p99": float(np.percentile(lat, 99)),
            "prefetches": c.prefetches,
            "prefetch_used": c.prefetch_used,
            "prefetch_precision": c.prefetch_used / c.prefetches if c.prefetches else 0.0,
            "prefetch_recall": c.prefetch_used / max(c.prefetch_used + c.misses, 1),
            "prefetch_wasted_bytes": c.prefetch_wasted * s.bytes_read // max(reads, 1),
            "belady_bytes": self.belady_bytes(),
            "gate_precision": s.gate.precision,
            "gate_recall": s.gate.recall,
            "markov_precision": self.markov.stats.precision,
            "markov_recall": self.markov.stats.recall,
        }

    def close(self) -> None:
        """Wait for reads in flight, close the readers and free the arena."""
        self._finalizer()


class _Resources:
    """What a streamer must give back: its readers and its arena (also at exit or on GC)."""

    def __init__(self, arena: Arena, readers: list[ExpertReader]) -> None:
        self.arena, self.readers = arena, readers
        self.base: np.ndarray | None = np.frombuffer(arena.buf, dtype=np.uint8)
        self.decoded: dict[int, tuple[ExpertKey, ExpertWeights]] = {}  # slot -> its views

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.base = None
        self.decoded.clear()
        self.arena.unlink()
        try:
            self.arena.close()
        except BufferError:  # somebody still holds a view of a slot: unmapped when it goes
            pass
