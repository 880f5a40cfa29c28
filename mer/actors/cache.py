"""The cache actor: owns the expert arena's contents, answers the engine's acquires, sends
reads to the io actors.

`CacheCore` (socket-free, tested directly) wraps the RAM tier (`CacheTier`: residency,
leases, pinning, eviction, read-ahead admission) with who asked for what:

- an `Acquire` from the engine leases each expert under the acquire's ticket; a ready one
  is `Granted` at once, a missing one is read (a `Read` to the io actor with the fewest
  reads in flight) and granted when its `ReadDone` comes back; when every slot is leased or
  loading, acquires wait in order for releases. An acquire names its read-ahead candidates,
  which the tier admits or not. Acquires are idempotent per (ticket, expert), so the engine
  may resend one whenever it has waited long (the cache may have restarted).
- leases belong to one engine incarnation: the first message of a new one reclaims all of
  the old one's (it died; its requests are replayed from scratch).
- reads belong to one io incarnation: when an io actor comes back as a new incarnation, the
  reads given to the old one are given out again (the slot is still reserved for them).

The arena and a table of what each slot holds (`mer.cache.slots`) outlive the actor: a new
cache actor re-attaches both, keeps what was ready (leases included), and keeps slots that
were being read out of use until every io actor has answered its `Hello` (sent once none of
its old reads can still land). The budget changes live (`Reconfigure`): growing backs more
of the arena's slots with memory, shrinking evicts what sits beyond the new end (leased
experts when released) and gives that memory back.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

import zmq

from mer.cache.expert_cache import ExpertKey, Status
from mer.cache.readahead import Candidate
from mer.cache.slots import FREE, LOADING, READY, SlotTable
from mer.cache.tier import MAX_READS, CacheTier, ReadOrder
from mer.protocol import (
    Acquire,
    Body,
    CacheQuery,
    CacheReport,
    Granted,
    Hello,
    Message,
    Read,
    ReadDone,
    Release,
    string_keys,
)

ENGINE = b"engine.0"


class CacheCore:
    """Protocol bodies in, (peer, body) out (module docstring). `ios`: io actors expected."""

    def __init__(self, tier: CacheTier, table: SlotTable, ios: int, log=None) -> None:
        self.tier, self.table, self.log = tier, table, log
        self.engine = ""  # the engine incarnation holding the leases
        self.leased: dict[ExpertKey, int] = {}  # expert -> ticket it is leased under
        self.waiting: dict[ExpertKey, int] = {}  # leased, being read -> ticket
        self.queued: deque[tuple[int, ExpertKey]] = deque()  # acquires waiting for a slot
        self.ios: dict[str, str] = {}  # io actors that said hello -> their incarnation
        self.unsynced = {f"io.{i}" for i in range(ios)}  # asked, not answered yet
        self.assigned: dict[ExpertKey, tuple[str, str, int]] = {}  # read -> (io, inc, slot)
        self.unsent: deque[ReadOrder] = deque()  # reads no io actor could take yet
        self.held: list[int] = []  # slots a read may still be landing in (after a restart)
        self._touched: set[int] = set()
        if table.restored:
            self._restore()
        table.in_use = tier.cache.n_slots

    def _restore(self) -> None:
        cache = self.tier.cache
        self.engine = self.table.engine
        kept = 0
        for slot, key, state, leases, ticket in self.table.entries():
            if slot >= cache.n_slots:
                self.table.write(slot, None, FREE)
            elif state == READY:
                cache.restore(key, slot, leases)
                kept += 1
                if leases:
                    self.leased[key] = ticket
            elif state == LOADING:
                cache.hold(slot)
                self.held.append(slot)
        if self.log:
            self.log.info(
                "event=cache_restored ready=%d leased=%d held=%d",
                kept,
                len(self.leased),
                len(self.held),
            )

    # -- messages ---------------------------------------------------------------------------
    def handle(self, peer: bytes, message: Message) -> list[tuple[bytes, Body]]:
        body = message.body
        out: list[tuple[bytes, Body]] = []
        if isinstance(body, Acquire | Release) and message.incarnation != self.engine:
            self._new_engine(message.incarnation)
        if isinstance(body, Acquire):
            for e in body.experts:
                out += self._acquire(body.ticket, (body.layer, int(e)))
            ahead = [Candidate((int(a[0]), int(a[1])), float(a[2]), int(a[3])) for a in body.ahead]
            hint = {(int(h[0]), int(h[1])): float(h[2]) for h in body.hint}
            self.tier.read_ahead(ahead, hint, body.window_s)
        elif isinstance(body, Release):
            for layer, e in body.keys:
                self._release(body.ticket, (int(layer), int(e)))
            out += self._retry()
        elif isinstance(body, ReadDone):
            out += self._read_done((body.layer, body.expert), body.slot, body.error)
        elif isinstance(body, Hello) and body.role == "io":
            self._io_hello(message.sender, message.incarnation)
        elif isinstance(body, CacheQuery):
            out.append((peer, CacheReport(string_keys(self.tier.telemetry(0)))))
        return out + self._dispatch()

    def _new_engine(self, incarnation: str) -> None:
        reclaimed = self.tier.cache.reclaim_leases()
        for key in self.leased:
            slot = self.tier.cache.slot_of(key)
            if slot is not None:
                self._touched.add(slot)
        if self.log and self.engine:
            self.log.info(
                "event=leases_reclaimed engine=%s leases=%d new_engine=%s",
                self.engine,
                reclaimed,
                incarnation,
            )
        self.leased.clear()
        self.waiting.clear()
        self.queued.clear()
        self.engine = self.table.engine = incarnation

    def _acquire(self, ticket: int, key: ExpertKey) -> list[tuple[bytes, Body]]:
        held = self.leased.get(key)
        if held is not None:  # a resend: grant again what is ready
            slot = self.tier.cache.slot_of(key)
            if held == ticket and key not in self.waiting and slot is not None:
                return [(ENGINE, Granted(ticket, key[0], key[1], slot))]
            return []
        if (ticket, key) in self.queued:
            return []
        if self.queued:  # first come, first served
            self.queued.append((ticket, key))
            return []
        return self._try(ticket, key)

    def _try(self, ticket: int, key: ExpertKey) -> list[tuple[bytes, Body]] | None:
        got = self.tier.acquire(key)
        if got is None:
            self.queued.append((ticket, key))
            return []
        status, slot = got
        self.leased[key] = ticket
        self._touched.add(slot)
        if status is Status.HIT:
            return [(ENGINE, Granted(ticket, key[0], key[1], slot))]
        self.waiting[key] = ticket
        return []

    def _retry(self) -> list[tuple[bytes, Body]]:
        out: list[tuple[bytes, Body]] = []
        while self.queued:
            ticket, key = self.queued.popleft()
            got = self.tier.acquire(key)
            if got is None:
                self.queued.appendleft((ticket, key))
                break
            status, slot = got
            self.leased[key] = ticket
            self._touched.add(slot)
            if status is Status.HIT:
                out.append((ENGINE, Granted(ticket, key[0], key[1], slot)))
            else:
                self.waiting[key] = ticket
        return out

    def _release(self, ticket: int, key: ExpertKey) -> None:
        if self.leased.get(key) != ticket:
            return  # not held under this ticket: a duplicate, or reclaimed
        slot = self.tier.cache.slot_of(key)
        del self.leased[key]
        self.waiting.pop(key, None)
        self.tier.release(key)
        if slot is not None:
            self._touched.add(slot)

    def _read_done(self, key: ExpertKey, slot: int, error: str | None) -> list[tuple[bytes, Body]]:
        assigned = self.assigned.get(key)
        if assigned is None or assigned[2] != slot:
            return []  # a read given out twice (its io restarted) already came back
        del self.assigned[key]
        self.tier.read_done(key, None if error is None else RuntimeError(error))
        self._touched.add(slot)
        out: list[tuple[bytes, Body]] = []
        ticket = self.waiting.pop(key, None)
        if ticket is not None:
            out.append((ENGINE, Granted(ticket, key[0], key[1], slot, error, read=True)))
            if error is not None:
                self.leased.pop(key, None)  # the failed expert left the cache, lease and all
        return out + self._retry()

    def _io_hello(self, name: str, incarnation: str) -> None:
        old = self.ios.get(name)
        self.ios[name] = incarnation
        self.unsynced.discard(name)
        if old is not None and old != incarnation:  # it restarted: its reads died with it
            for key, (io, inc, slot) in list(self.assigned.items()):
                if io == name and inc == old:
                    del self.assigned[key]
                    self.unsent.append(ReadOrder(key, slot, self.tier.source.segments(key)))
            if self.log:
                self.log.info("event=io_restarted io=%s incarnation=%s", name, incarnation)
        if not self.unsynced and self.held:
            for slot in self.held:
                self.tier.cache.unhold(slot)
                self._touched.add(slot)
            self.held = []

    def _dispatch(self) -> list[tuple[bytes, Body]]:
        self.unsent.extend(self.tier.take_orders())
        out: list[tuple[bytes, Body]] = []
        while self.unsent and self.ios:
            order = self.unsent.popleft()
            load = {name: 0 for name in self.ios}
            for io, _, _ in self.assigned.values():
                if io in load:
                    load[io] += 1
            name = min(load, key=lambda n: (load[n], n))
            self.assigned[order.key] = (name, self.ios[name], order.slot)
            self._touched.add(order.slot)
            out.append((name.encode(), Read(order.key[0], order.key[1], order.slot)))
        return out

    # -- the table, budget changes ----------------------------------------------------------
    def sync_table(self) -> list[int]:
        """Write the touched slots' rows; the slots beyond a shrunk budget that emptied (their
        memory can go)."""
        cache = self.tier.cache
        vacated, cache.vacated = cache.vacated, []
        for slot in self._touched | set(vacated):
            key = cache.key_at(slot)
            if key is None:
                self.table.write(slot, None, LOADING if slot in self.held else FREE)
            else:
                state = READY if cache.is_ready(key) else LOADING
                self.table.write(slot, key, state, cache.leases(key), self.leased.get(key, 0))
        self._touched.clear()
        return vacated

    def resize(self, n_slots: int, pin_fraction: float | None = None) -> tuple[int, int]:
        """Use `n_slots` slots from now on; (old, new) count."""
        cache = self.tier.cache
        old = cache.n_slots
        n_slots = max(1, min(n_slots, self.table.capacity))
        pin = None if pin_fraction is None else min(int(n_slots * pin_fraction), n_slots - 1)
        cache.resize(n_slots, pin)
        self.table.in_use = n_slots
        return old, n_slots

    def set_io_count(self, n: int) -> None:
        """Io actors beyond `n` are retiring: no more reads go to them."""
        for name in [k for k in self.ios if int(k.split(".")[1]) >= n]:
            del self.ios[name]
        self.unsynced = {k for k in self.unsynced if int(k.split(".")[1]) < n}
        self.unsynced |= {f"io.{i}" for i in range(n) if f"io.{i}" not in self.ios}


# -- the shell --------------------------------------------------------------------------------
def open_arena(run_dir: Path, source, n_slots: int, owner, log):
    """The arena of the last cache incarnation if it is there (announced in the runtime
    directory's `arena` note), else a new one announced there; (arena, table)."""
    from mer.errors import MerError
    from mer.io.arena import ALIGN, Arena
    from mer.io.shm import unlink

    capacity = source.n_layers * source.n_experts
    note = run_dir / "arena"
    arena = None
    try:
        known = json.loads(note.read_text())
        arena = Arena.attach(known["arena"])
        if arena.slot_size != source.slot_bytes or arena.n_slots != capacity:
            raise MerError("another layout")
        log.info("event=arena_reattached name=%s", arena.name)
    except (OSError, ValueError, KeyError, MerError):
        if arena is not None:
            arena.close()
            unlink(arena.name)
            arena = None
        (run_dir / "slots").unlink(missing_ok=True)
    if arena is None:
        arena = Arena(
            ALIGN + n_slots * source.slot_bytes,
            source.slot_bytes,
            owner=owner,
            capacity_slots=capacity,
        )
        tmp = run_dir / "arena.tmp"
        tmp.write_text(json.dumps({"arena": arena.name}))
        os.replace(tmp, note)
        log.info("event=arena_created name=%s slots=%d capacity=%d", arena.name, n_slots, capacity)
    return arena, SlotTable(run_dir / "slots", capacity)


def main() -> None:
    from mer.actors.base import Actor, endpoint, received, supervisor_owner
    from mer.cache.streamer import slots_for
    from mer.models.sources import resolve_model
    from mer.protocol import Reconfigure
    from mer.store.load import load_store

    actor = Actor()
    cfg = actor.config
    _, _, _, source = load_store(resolve_model(cfg.model), stream=True, verify=False)
    n_slots = slots_for(source, cfg.cache.bytes)
    arena, table = open_arena(actor.run_dir, source, n_slots, supervisor_owner(actor), actor.log)
    if n_slots > table.in_use:
        arena.reserve(table.in_use, n_slots)
    tier = CacheTier(
        source,
        n_slots,
        prefetch=cfg.cache.prefetch,
        pin_fraction=cfg.cache.pin_fraction,
        max_reads=MAX_READS * cfg.io.count,
    )
    core = CacheCore(tier, table, cfg.io.count, actor.log)
    sock = actor.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes its identity over
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a message for a peer not connected fails
    sock.bind(endpoint(actor.run_dir, "cache"))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    actor.ready()
    heartbeat_ms = int(cfg.supervisor.heartbeat_s * 1000)
    next_hello = 0.0
    try:
        while not actor.stopping:
            events = dict(poller.poll(50 if core.unsynced else heartbeat_ms))
            out: list[tuple[bytes, Body]] = []
            if sock in events:
                for peer, message in received(sock, actor.log):
                    out += core.handle(peer, message)
            for body in actor.poll_supervisor():
                if isinstance(body, Reconfigure):
                    out += _reconfigure(core, arena, body.settings, source, actor.log)
            for slot in core.sync_table():  # rows first, then the reads they announce
                arena.discard(slot, slot + 1)
            for to, body in out:
                try:
                    sock.send_multipart([to, actor.codec.encode(body)])
                except zmq.ZMQError:  # not connected (restarting): it resends, or we re-send
                    pass
            now = time.monotonic()
            if core.unsynced and now >= next_hello:
                next_hello = now + 0.05
                for name in sorted(core.unsynced):
                    try:
                        sock.send_multipart([name.encode(), actor.codec.encode(Hello("cache"))])
                    except zmq.ZMQError:
                        pass
            actor.beat(busy=bool(core.leased or core.tier.busy))
    finally:
        table.close()
        arena.close()  # the supervisor removes it when the service stops
        actor.close()


def _reconfigure(core: CacheCore, arena, settings: dict, source, log) -> list:
    out: list = []
    if "io" in settings:
        core.set_io_count(int(settings["io"]))
    if "cache_bytes" in settings or "pin_fraction" in settings:
        cache = core.tier.cache
        n = cache.n_slots
        if settings.get("cache_bytes"):
            from mer.cache.streamer import slots_for

            n = slots_for(source, int(settings["cache_bytes"]))
        n = min(n, arena.n_slots)
        if n > cache.n_slots:
            arena.reserve(cache.n_slots, n)
        pin = settings.get("pin_fraction")
        old, new = core.resize(n, None if pin is None else float(pin))
        log.info(
            "event=cache_resized slots_before=%d slots=%d pin_budget=%d",
            old,
            new,
            cache.pin_budget,
        )
        out += core._retry()
    return out + core._dispatch()


if __name__ == "__main__":
    main()
