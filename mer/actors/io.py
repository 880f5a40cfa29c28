"""An io actor: reads experts into arena slots as the cache actor asks.

`IoCore` (socket-free, tested directly) turns each `Read` into reads of the expert's
segments (`ExpertReader`: io_uring with O_DIRECT, else preadv, else buffered reads; each
segment checked against its checksum) and reports a `ReadDone` per expert, with the reason
if it failed. The reads of all the `Read`s that arrived together are submitted together at
the next `poll`, so experts that follow each other on disk are read with one request. A
`Hello` from the cache (a cache that just started asks) is answered once no read from before
it is still landing in the arena.

The shell connects a DEALER socket to the cache (identity `io.N`), says hello when it
starts, and waits on that socket and on the readers' eventfds at once: it never spins. On
SIGTERM (retired by a reload, or the service stops) it finishes the reads it has, then exits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import zmq

from mer.errors import MerError
from mer.io.arena import Arena
from mer.io.reader import ExpertReader, ReadRequest
from mer.protocol import Body, Hello, Read, ReadDone


class IoCore:
    """Reads of `source`'s experts into `arena` by `readers` (one per source file)."""

    def __init__(self, source, readers: list[ExpertReader], arena: Arena | None = None) -> None:
        self.source, self.readers, self.arena = source, readers, arena
        self.flights: dict[tuple[int, int, int], list] = {}  # (layer, e, slot) -> [left, error]
        self.sync_asked = False
        self._queued: dict[int, list[ReadRequest]] = {}  # file -> reads not yet submitted

    @property
    def busy(self) -> bool:
        return bool(self.flights)

    def handle(self, body: Body) -> list[Body]:
        if isinstance(body, Read):
            return self._read(body)
        if isinstance(body, Hello) and body.role == "cache":
            self.sync_asked = True
            return self._answer()
        return []

    def _read(self, body: Read) -> list[Body]:
        key = (body.layer, body.expert)
        ref = (body.layer, body.expert, body.slot)
        try:
            segments = self.source.segments(key)
            if self.arena is None or not 0 <= body.slot < self.arena.n_slots:
                raise ValueError(f"slot {body.slot} is not in the arena")
        except (KeyError, ValueError) as err:
            return [ReadDone(body.layer, body.expert, body.slot, f"cannot read {key}: {err}")]
        if ref in self.flights:
            return []
        self.flights[ref] = [len(segments), None]
        for i, seg in enumerate(segments):
            request = ReadRequest(
                seg.offset, seg.length, self.arena, body.slot, seg.expected, (ref, i), seg.into
            )
            self._queued.setdefault(seg.file, []).append(request)
        return self._finished()

    def _submit(self) -> None:
        """Start the queued reads, each file's in one batch."""
        queued, self._queued = self._queued, {}
        for file, requests in queued.items():
            try:
                self.readers[file].submit(requests)
            except MerError:  # some request is refused: find it, start the others
                for request in requests:
                    try:
                        self.readers[file].submit([request])
                    except MerError as err:  # that segment fails
                        self._segment_done(request.tag[0], str(err))

    def _segment_done(self, ref, error: str | None) -> None:
        flight = self.flights[ref]
        flight[0] -= 1
        if error is not None and flight[1] is None:
            flight[1] = error

    def poll(self) -> list[Body]:
        """Start the reads asked for since the last call; reports of the reads that finished
        (never waits)."""
        self._submit()
        for reader in self.readers:
            if reader.busy:
                for res in reader.poll(block=False):
                    ref = res.tag[0]
                    self._segment_done(ref, None if res.error is None else str(res.error))
        return self._finished() + self._answer()

    def _finished(self) -> list[Body]:
        out: list[Body] = []
        for ref in [r for r, f in self.flights.items() if f[0] <= 0]:
            _, error = self.flights.pop(ref)
            out.append(ReadDone(ref[0], ref[1], ref[2], error))
        return out

    def _answer(self) -> list[Body]:
        if self.sync_asked and not self.flights:
            self.sync_asked = False
            return [Hello("io")]
        return []


def attach_arena(run_dir: Path, current: Arena | None) -> Arena | None:
    """The arena the cache actor announces in the runtime directory (re-attached if it is a
    new one), or `current` if there is no announcement."""
    try:
        name = json.loads((run_dir / "arena").read_text())["arena"]
    except (OSError, ValueError, KeyError):
        return current
    if current is not None and current.name == name:
        return current
    if current is not None:
        current.close()
    return Arena.attach(name)


def main() -> None:
    from mer.actors.base import Actor, endpoint
    from mer.models.sources import resolve_model
    from mer.protocol import Codec, ProtocolError
    from mer.store.load import load_store

    actor = Actor()
    cfg = actor.config
    _, _, _, source = load_store(resolve_model(cfg.model), stream=True, verify=False)
    readers = [
        ExpertReader(
            path,
            queue_depth=cfg.io.queue_depth,
            backend=cfg.io.backend,
            coalesce=cfg.io.coalesce,
            reverify=cfg.io.reverify,
        )
        for path in source.files
    ]
    core = IoCore(source, readers, attach_arena(actor.run_dir, None))
    sock = actor.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, actor.name.encode())
    sock.connect(endpoint(actor.run_dir, "cache"))
    sock.send(actor.codec.encode(Hello("io")))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    for reader in readers:
        poller.register(reader.fileno(), zmq.POLLIN)
    actor.ready()
    heartbeat_ms = int(cfg.supervisor.heartbeat_s * 1000)
    try:
        while not actor.stopping or core.busy:
            events = dict(poller.poll(heartbeat_ms))
            out: list[Body] = []
            for reader in readers:
                if reader.fileno() in events:
                    try:
                        os.eventfd_read(reader.fileno())
                    except BlockingIOError:
                        pass
            if sock in events:
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        body = Codec.decode(frame).body
                    except ProtocolError as err:
                        actor.log.warning("event=bad_message error=%s", err)
                        continue
                    if isinstance(body, Read | Hello):
                        core.arena = attach_arena(actor.run_dir, core.arena)
                    out += core.handle(body)
            out += core.poll()
            for body in out:
                if isinstance(body, ReadDone) and body.error:
                    actor.log.warning(
                        "event=read_failed expert=%d.%d error=%s",
                        body.layer,
                        body.expert,
                        body.error,
                    )
                sock.send(actor.codec.encode(body))
            actor.poll_supervisor()
            actor.beat(busy=core.busy)
    finally:
        for reader in readers:
            reader.close()
        if core.arena is not None:
            core.arena.close()
        actor.close()


if __name__ == "__main__":
    main()
