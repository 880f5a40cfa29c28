"""Experts streamed from disk through the RAM cache during the forward pass.

`ExpertStreamer` ties together an arena of slots (`mer.io.arena`), the RAM tier (`CacheTier`:
the cache policy, reads in flight, read-ahead admission), one reader per source file
(`ExpertReader`: io_uring, preadv or buffered) and the predictors (`Lookahead`), all in this
process: `mer generate`'s way. The service splits the same parts over actors (the tier in the
cache actor, the readers in io actors, the predictors in the engine: `mer.cache.remote`).
For each MoE layer the forward pass calls `run(layer, ids, fn, ahead)`:

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

import numpy as np

from mer.cache.expert_cache import ExpertKey, Status
from mer.cache.lookahead import Lookahead
from mer.cache.readahead import Candidate
from mer.cache.sources import ExpertSource
from mer.cache.tier import CacheTier
from mer.cache.trace import belady_hits
from mer.errors import MerError
from mer.io.arena import ALIGN, Arena
from mer.io.reader import QUEUE_DEPTH, ExpertReader, ExpertReadError, ReadRequest, ReadResult
from mer.models.weights import ExpertWeights

logger = logging.getLogger(__name__)


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
        queue_depth: int = QUEUE_DEPTH,
        prefetch: bool = True,
        pin_fraction: float = 0.25,
        coalesce: bool = True,
    ) -> None:
        self.source = source
        self.k = n_experts_per_tok
        n_slots = slots_for(source, cache_bytes)
        self.arena = Arena(ALIGN + n_slots * source.slot_bytes, source.slot_bytes)
        self.readers: list[ExpertReader] = []
        self._mem = _Resources(self.arena, self.readers)
        self._finalizer = weakref.finalize(self, self._mem.close)
        try:
            for path in source.files:
                self.readers.append(
                    ExpertReader(
                        path,
                        queue_depth=queue_depth,
                        backend=backend,
                        verify=verify,
                        coalesce=coalesce,
                    )
                )
        except BaseException:
            self._finalizer()
            raise
        self.backend = self.readers[0].backend
        self.tier = CacheTier(source, n_slots, prefetch=prefetch, pin_fraction=pin_fraction)
        self.lookahead = Lookahead(source, n_experts_per_tok)
        self.stall_s = 0.0  # time the forward pass waited for demand reads
        self._segments_left: dict[ExpertKey, int] = {}
        self._errors: dict[ExpertKey, ExpertReadError] = {}
        self._cpu_s = 0.0  # moving average of a layer's CPU time: the disk's idle window
        self._run_started: float | None = None
        self._run_stalled = 0.0

    @property
    def cache(self):
        """The cache policy (`ExpertCache`)."""
        return self.tier.cache

    # -- the forward pass's entry points -----------------------------------------------------
    def observe(self, layer: int, ids: Iterable[int], n_tokens: int) -> None:
        """The experts layer `layer` chose for this step of `n_tokens` tokens: scores and
        trains the predictors (`mer.cache.lookahead`)."""
        self.lookahead.observe(layer, ids, n_tokens)

    def predict_next(
        self, layer: int, h: np.ndarray, next_router: np.ndarray | None
    ) -> list[Candidate]:
        """Read-ahead candidates for the layer after `layer` (`Lookahead.predict_next`)."""
        return self.lookahead.predict_next(layer, h, next_router)

    def run(
        self,
        layer: int,
        ids: Iterable[int],
        fn: Callable[[int, ExpertWeights, int], None],
        ahead: list[Candidate] | None = None,
    ) -> None:
        """Call fn(expert, weights, slot) once for each expert id of `layer` in `ids`, in any
        order, with the expert's weights resident in arena slot `slot` for the duration of
        the call; then consider the read-ahead candidates `ahead` (`predict_next`)."""
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
            if ahead:
                self._prefetch(ahead)
            while todo or ready or waiting:
                done: list[ExpertKey] = []
                if ready:
                    key = ready.popleft()
                    fn(key[1], self._weights(key), self.cache.slot_of(key))
                    self.tier.release(key)
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
                self.tier.release(key)
        self.stall_s += stalled
        self._run_started, self._run_stalled = began, stalled

    # -- internals ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.tier.busy

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
            got = self.tier.acquire(key)
            if got is None:
                break
            todo.popleft()
            leased.append(key)
            if got[0] is Status.HIT:
                ready.append(key)
            else:
                waiting.add(key)
        self._issue()

    def _prefetch(self, candidates: list[Candidate]) -> None:
        self.tier.read_ahead(candidates, self.lookahead.hint, self._cpu_s)
        self._issue()

    def _issue(self) -> None:
        """Hand the tier's read orders to the readers, each reader's in one batch (so reads
        of experts that follow each other in the file are merged)."""
        batches: dict[int, list[ReadRequest]] = {}
        for order in self.tier.take_orders():
            self._mem.decoded.pop(order.slot, None)  # the slot is about to hold other bytes
            self._segments_left[order.key] = len(order.segments)
            for i, seg in enumerate(order.segments):
                batches.setdefault(seg.file, []).append(
                    ReadRequest(
                        seg.offset,
                        seg.length,
                        self.arena,
                        order.slot,
                        seg.expected,
                        (order.key, i),
                        seg.into,
                    )
                )
        for file, requests in batches.items():
            self.readers[file].submit(requests)

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
                self._segments_left[key] -= 1
                if res.error is not None:
                    self._errors.setdefault(key, res.error)
                if self._segments_left[key] == 0:
                    del self._segments_left[key]
                    done.append(key)
                    failed = self._errors.pop(key, None)
                    if self.tier.read_done(key, failed) and failed is not None:
                        error = error or failed
            if error is not None:
                raise error
            if done or not block or not self.busy:
                return done

    # -- telemetry and shutdown --------------------------------------------------------------
    @property
    def accesses(self) -> int:
        """Expert uses so far (one per expert a layer visit chose)."""
        return len(self.lookahead.accesses)

    def belady_bytes(self, from_access: int = 0) -> int:
        """Bytes Belady's MIN would have read for the routing so far with this cache's slots
        (the least any policy could read), counting its misses from use `from_access` on."""
        accesses = self.lookahead.accesses
        hits = belady_hits(accesses, self.cache.n_slots)
        return sum(
            self.tier.nbytes(key)
            for key, hit in zip(accesses[from_access:], hits[from_access:], strict=True)
            if not hit
        )

    def sample_experts(self) -> list[ExpertWeights]:
        """One expert of each block-type mix the source holds, decoded from zeroed bytes: what
        the kernels will be given, for compiling them ahead of use."""
        return sample_experts(self.source)

    def telemetry(self) -> dict:
        """The streaming tier's figures (README: "What --stats reports" defines each): acquires
        that found the expert ready, found its read in flight, or missed, overall and per layer;
        bytes read (per token too) and read speed; stalls and cold-read latency; read-ahead
        precision, recall and waste; each predictor's precision and recall; the requests the
        disk saw (`disk_reads`) and the expert reads merged into another's (`reads_merged`)."""
        return {
            "backend": self.backend,
            "disk_reads": sum(r.stats.reads for r in self.readers),
            "reads_merged": sum(r.stats.merged for r in self.readers),
            **self.lookahead.telemetry(),
            **self.tier.telemetry(self.lookahead.tokens),
            "stall_s": self.stall_s,
            "belady_bytes": self.belady_bytes(),
        }

    def close(self) -> None:
        """Wait for reads in flight, close the readers and free the arena."""
        self._finalizer()


def slots_for(source: ExpertSource, cache_bytes: int) -> int:
    """Slots a budget of `cache_bytes` holds: never more than the source has experts (a
    budget above the model's size holds all of it), never none."""
    n_slots = min(int(cache_bytes) // source.slot_bytes, source.n_layers * source.n_experts)
    if n_slots < 1:
        raise MerError(
            f"cache budget of {int(cache_bytes)} bytes holds no expert "
            f"(one needs {source.slot_bytes} bytes)"
        )
    return n_slots


def sample_experts(source: ExpertSource) -> list[ExpertWeights]:
    """One expert of each block-type mix `source` holds, decoded from zeroed bytes."""
    zeros = np.zeros(source.slot_bytes, np.uint8)
    seen: dict[tuple[str, ...], ExpertWeights] = {}
    for key in source.keys():
        kinds = source.kinds(key)
        if kinds not in seen:
            seen[kinds] = source.decode(key, zeros)
    return list(seen.values())


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
