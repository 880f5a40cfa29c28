"""Experts streamed through the cache actor: the engine's side of `ExpertStreamer`'s job.

`RemoteStreamer` has the streamer's interface (`observe`, `predict_next`, `run`, ...), so the
transformer does not know where its experts come from. The predictors (`Lookahead`) stay
here, beside the hidden state they need; the tier runs in the cache actor, the reads in the
io actors. For each MoE layer `run` sends one `Acquire` (the layer's experts, the next
layer's read-ahead candidates, the disk's idle window), computes each expert as its
`Granted` arrives (ready ones first, reads as they land) and `Release`s it.

If no answer comes for `resend_s`, the acquire is sent again for the experts still
missing: a cache actor that restarted lost it (acquires are idempotent per ticket). Waits
keep the actor's heartbeat going (`beat`), so a slow disk is not taken for a hung engine.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import zmq

from mer.cache.expert_cache import ExpertKey
from mer.cache.lookahead import Lookahead
from mer.cache.readahead import Candidate
from mer.cache.streamer import sample_experts
from mer.errors import MerError
from mer.io.arena import Arena
from mer.io.reader import ExpertReadError
from mer.models.weights import ExpertWeights
from mer.protocol import Acquire, CacheQuery, CacheReport, Codec, Granted, ProtocolError, Release


class RemoteStreamer:
    """`source`'s experts from the cache actor at `endpoint` (module docstring)."""

    def __init__(
        self,
        source,
        n_experts_per_tok: int,
        endpoint: str,
        run_dir: Path,
        codec: Codec,
        *,
        beat: Callable[[], None] = lambda: None,
        resend_s: float = 1.0,
        arena_wait_s: float = 600.0,
    ) -> None:
        self.source = source
        self.k = n_experts_per_tok
        self.codec = codec
        self.beat = beat
        self.resend_s = resend_s
        self.lookahead = Lookahead(source, n_experts_per_tok)
        self.stall_s = 0.0  # waits for grants: for reads (the disk's) ...
        self.message_s = 0.0  # ... and for experts that were ready (messaging alone)
        self.arena = _wait_for_arena(run_dir, arena_wait_s, beat)
        self._base = np.frombuffer(self.arena.buf, dtype=np.uint8)
        self._decoded: dict[int, tuple[ExpertKey, ExpertWeights]] = {}
        self._context = zmq.Context.instance()
        self.sock = self._context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, codec.sender.encode())
        self.sock.connect(endpoint)
        self._tickets = itertools.count(1)
        self._cpu_s = 0.0
        self._run_started: float | None = None
        self._run_stalled = 0.0

    # -- the streamer's interface -----------------------------------------------------------
    def observe(self, layer: int, ids: Iterable[int], n_tokens: int) -> None:
        self.lookahead.observe(layer, ids, n_tokens)

    def predict_next(
        self, layer: int, h: np.ndarray, next_router: np.ndarray | None
    ) -> list[Candidate]:
        return self.lookahead.predict_next(layer, h, next_router)

    def run(
        self,
        layer: int,
        ids: Iterable[int],
        fn: Callable[[int, ExpertWeights, int], None],
        ahead: list[Candidate] | None = None,
    ) -> None:
        """Call fn(expert, weights, slot) once for each expert of `layer` in `ids`, as each
        is granted; tell the cache about the read-ahead candidates `ahead`."""
        began, stalled = time.perf_counter(), 0.0
        if self._run_started is not None:
            cpu = began - self._run_started - self._run_stalled
            self._cpu_s = cpu if not self._cpu_s else 0.9 * self._cpu_s + 0.1 * cpu
        ticket = next(self._tickets)
        missing = {int(e) for e in ids}
        hint = self.lookahead.hint
        self._send(
            Acquire(
                ticket,
                layer,
                sorted(missing),
                [[c.key[0], c.key[1], c.p, c.nbytes] for c in ahead or []],
                [[k[0], k[1], p] for k, p in hint.items()] if ahead else [],
                self._cpu_s,
            )
        )
        try:
            while missing:
                t0 = time.perf_counter()
                grant = self._next_grant(ticket, layer, missing)
                if grant.read:
                    stalled += time.perf_counter() - t0
                else:
                    self.message_s += time.perf_counter() - t0
                missing.discard(grant.expert)
                if grant.error is not None:
                    raise ExpertReadError(grant.error)
                key = (layer, grant.expert)
                try:
                    fn(grant.expert, self._weights(key, grant.slot), grant.slot)
                finally:
                    self._send(Release(ticket, [[layer, grant.expert]]))
        except BaseException:
            if missing:  # leases granted later are released at once
                self._send(Release(ticket, [[layer, e] for e in sorted(missing)]))
            raise
        self.stall_s += stalled
        self._run_started, self._run_stalled = began, stalled

    def _next_grant(self, ticket: int, layer: int, missing: set[int]) -> Granted:
        last = time.monotonic()
        while True:
            if self.sock.poll(int(self.resend_s * 1000 / 4)):
                try:
                    body = Codec.decode(self.sock.recv()).body
                except ProtocolError:
                    continue
                if (
                    isinstance(body, Granted)
                    and body.ticket == ticket
                    and body.layer == layer
                    and body.expert in missing
                ):
                    return body
                continue  # a duplicate, or the answer of an abandoned acquire
            self.beat()
            if time.monotonic() - last >= self.resend_s:
                last = time.monotonic()
                self._send(Acquire(ticket, layer, sorted(missing)))

    def _send(self, body) -> None:
        self.sock.send(self.codec.encode(body))

    def _weights(self, key: ExpertKey, slot: int) -> ExpertWeights:
        held = self._decoded.get(slot)
        if held is not None and held[0] == key:
            return held[1]
        size = self.arena.slot_size
        weights = self.source.decode(key, self._base[slot * size : (slot + 1) * size])
        if getattr(self.source, "zero_copy", False):
            self._decoded[slot] = (key, weights)
        return weights

    # -- telemetry and shutdown ---------------------------------------------------------------
    @property
    def accesses(self) -> int:
        return len(self.lookahead.accesses)

    def sample_experts(self) -> list[ExpertWeights]:
        return sample_experts(self.source)

    def telemetry(self, timeout_s: float = 2.0) -> dict:
        """The cache actor's figures with this side's (an empty cache part if it does not
        answer within `timeout_s`)."""
        self._send(CacheQuery())
        figures: dict = {}
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            try:
                body = Codec.decode(self.sock.recv()).body
            except ProtocolError:
                continue
            if isinstance(body, CacheReport):
                figures = dict(body.figures)
                break
        tokens = self.lookahead.tokens
        if tokens and "bytes_read" in figures:
            figures["bytes_per_token"] = figures["bytes_read"] / tokens
        local = {"backend": "io actors", **self.lookahead.telemetry()}
        return {**local, **figures, "stall_s": self.stall_s}

    def close(self) -> None:
        self.sock.close(0)
        self._decoded.clear()
        self._base = None
        try:
            self.arena.close()
        except BufferError:  # a view of a slot is still alive: unmapped when it goes
            pass


def _wait_for_arena(run_dir: Path, wait_s: float, beat: Callable[[], None]) -> Arena:
    """The arena the cache actor announces in the runtime directory (it starts first)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            name = json.loads((run_dir / "arena").read_text())["arena"]
            return Arena.attach(name)
        except (OSError, ValueError, KeyError, MerError):
            if time.monotonic() > deadline:
                raise MerError(
                    f"no expert arena announced in {run_dir} after {wait_s:g} s"
                ) from None
        beat()
        time.sleep(0.05)
