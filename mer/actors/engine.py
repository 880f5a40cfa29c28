"""The engine actor: generation requests in over ZeroMQ, tokens out, one batched step at a time.

`EngineCore` (socket-free, tested directly) turns protocol bodies into engine calls and
engine events into `Tokens` bodies addressed to the api that asked. The shell binds a ROUTER
socket, polls it between steps (without waiting while there is work), steps the engine, and
beats to the supervisor. Requests belong to the api incarnation that sent them: when an api
comes back as a new incarnation, the old one's requests are aborted (their clients are gone).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import zmq

from mer.engine.engine import Engine, compile_grammar
from mer.engine.scheduler import SchedulerConfig
from mer.engine.sequence import Sequence
from mer.errors import MerError, ParamError
from mer.protocol import (
    Body,
    Cancel,
    EngineQuery,
    EngineReport,
    Hello,
    Message,
    Rejected,
    Submit,
    Tokens,
    string_keys,
)
from mer.sampling import SamplingParams


@dataclass
class _Request:
    sequence: Sequence
    peer: bytes  # the api's socket identity
    incarnation: str  # the api's
    prompt_tokens: int


class EngineCore:
    """Protocol bodies in, (peer, body) out (module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.requests: dict[str, _Request] = {}
        self.draining = False  # running requests finish; new ones are refused
        self._api_incarnation: dict[bytes, str] = {}

    def handle(self, peer: bytes, message: Message) -> list[tuple[bytes, Body]]:
        body = message.body
        if isinstance(body, Hello):
            self._new_api(peer, message.incarnation)
            return [(peer, Hello(role="engine"))]
        if isinstance(body, Submit):
            self._new_api(peer, message.incarnation)
            return self._submit(peer, message.incarnation, body)
        if isinstance(body, Cancel):
            request = self.requests.pop(body.request, None)
            if request is not None:
                self.engine.abort(request.sequence)
            return []
        if isinstance(body, EngineQuery):
            return [(peer, EngineReport(self.figures(), self._cache_figures()))]
        return []

    def figures(self) -> dict:
        """The engine's figures (for /metrics)."""
        figures = getattr(self.engine, "figures", None)
        out = dict(figures()) if figures is not None else {}
        out.setdefault("running", len(self.engine.scheduler.running))
        out.setdefault("waiting", len(self.engine.scheduler.waiting))
        args = self.engine.model.args
        out.update(context=args.max_seq_len, vocab_size=args.vocab_size)
        return out

    def _cache_figures(self) -> dict | None:
        """The expert cache's figures when this process streams experts itself (with cache
        and io actors, the api asks the cache actor)."""
        from mer.cache.streamer import ExpertStreamer

        streamer = self.engine.model.streamer
        if isinstance(streamer, ExpertStreamer):
            return string_keys(streamer.telemetry())
        return None

    def _new_api(self, peer: bytes, incarnation: str) -> None:
        if self._api_incarnation.get(peer) == incarnation:
            return
        self._api_incarnation[peer] = incarnation
        for rid in [
            rid
            for rid, r in self.requests.items()
            if r.incarnation != incarnation and r.peer == peer
        ]:
            self.engine.abort(self.requests.pop(rid).sequence)

    def _submit(self, peer: bytes, incarnation: str, body: Submit) -> list[tuple[bytes, Body]]:
        if body.request in self.requests:  # a replay of what still runs here
            return []
        if self.draining:
            return [(peer, Rejected(body.request, 503, "the service is shutting down"))]
        model = self.engine.model
        try:
            params = SamplingParams(**body.params)
        except ParamError as err:
            return [(peer, Rejected(body.request, 400, str(err)))]
        except TypeError as err:
            return [(peer, Rejected(body.request, 400, f"unknown sampling setting ({err})"))]
        total = len(body.prompt_ids) + len(body.resume_ids)
        if not body.prompt_ids or total >= model.args.max_seq_len:
            return [
                (
                    peer,
                    Rejected(
                        body.request,
                        400,
                        f"the prompt has {len(body.prompt_ids)} tokens: the context "
                        f"of {model.args.max_seq_len} leaves no room to generate",
                    ),
                )
            ]
        if max(body.prompt_ids) >= model.args.vocab_size or min(body.prompt_ids) < 0:
            return [(peer, Rejected(body.request, 400, "a prompt token is outside the vocabulary"))]
        try:
            grammar = None
            if body.grammar is not None:
                grammar = compile_grammar(body.grammar, model.tokenizer)
            seq = self.engine.submit(
                body.prompt_ids,
                params,
                body.max_tokens,
                stop_ids=None if body.stop_ids is None else frozenset(body.stop_ids),
                stop_strings=body.stop_strings,
                resume_ids=body.resume_ids,
                grammar=grammar,
            )
        except (MerError, ValueError) as err:
            return [(peer, Rejected(body.request, 400, str(err)))]
        if seq.finish_reason is not None:  # nothing to generate
            return [(peer, Tokens(body.request, [], "", seq.finish_reason, len(body.prompt_ids)))]
        self.requests[body.request] = _Request(seq, peer, incarnation, len(body.prompt_ids))
        return []

    def step(self) -> list[tuple[bytes, Body]]:
        """One engine step; the Tokens bodies it produced, one per request. A step that fails
        (corrupt weights, an unreadable expert) fails the requests it ran, with the reason."""
        try:
            events = self.engine.step()
        except MerError as err:
            failed = []
            for rid, request in list(self.requests.items()):
                if request.sequence.status.value == "running":
                    self.engine.abort(request.sequence)
                    del self.requests[rid]
                    failed.append((request.peer, Rejected(rid, 500, str(err))))
            return failed
        by_seq = {id(r.sequence): rid for rid, r in self.requests.items()}
        gathered: dict[str, list] = {}
        for event in events:
            rid = by_seq.get(id(event.seq))
            if rid is None or (event.token is None and event.finish_reason is None):
                continue
            ids, text, finish, scores = gathered.setdefault(rid, [[], "", None, None])
            if event.token is not None:
                ids.append(event.token)
                if event.logprob is not None:
                    scores = (scores or []) + [
                        [event.logprob, [list(pair) for pair in event.top_logprobs]]
                    ]
            gathered[rid] = [ids, text + event.text, event.finish_reason or finish, scores]
        out = []
        for rid, (ids, text, finish, scores) in gathered.items():
            request = self.requests[rid]
            cached = getattr(request.sequence, "cached_tokens", 0)
            out.append(
                (
                    request.peer,
                    Tokens(rid, ids, text, finish, request.prompt_tokens, scores, cached),
                )
            )
            if finish is not None:
                del self.requests[rid]
        return out


def main() -> None:
    from mer.actors.base import Actor, endpoint, received
    from mer.model import load_model
    from mer.models.sources import resolve_model

    actor = Actor()
    cfg = actor.config
    start = time.monotonic()
    factory = None
    if actor.spec.get("cache_actor"):  # experts come through the cache and io actors

        def factory(source, args):
            from mer.cache.remote import RemoteStreamer

            return RemoteStreamer(
                source,
                args.n_experts_per_tok,
                endpoint(actor.run_dir, "cache"),
                actor.run_dir,
                actor.codec,
                beat=lambda: actor.beat(busy=True),
            )

    model = load_model(
        resolve_model(cfg.model),
        threads=cfg.engine.threads,
        cache_bytes=cfg.cache.bytes,
        io_backend=cfg.io.backend,
        prefetch=cfg.cache.prefetch,
        streamer_factory=factory,
        activations=cfg.engine.activations,
    )
    model.warm_up()
    model.transformer.on_layer = lambda: actor.beat(busy=True)
    board = _compute_board(actor, model)
    e = cfg.engine
    core = EngineCore(
        Engine(
            model,
            SchedulerConfig(
                e.max_batch_tokens,
                e.max_seqs,
                e.prefill_chunk,
                e.kv_budget_tokens,
                prefix_cache=e.prefix_cache,
            ),
        )
    )
    sock = actor.socket(zmq.ROUTER)
    sock.bind(endpoint(actor.run_dir, "engine"))
    actor.log.info("event=loaded model=%s seconds=%.1f", model.source, time.monotonic() - start)
    actor.ready()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    heartbeat_ms = int(cfg.supervisor.heartbeat_s * 1000)
    timers = Timers(model, actor.run_dir / "engine-timers.json")
    try:
        while not actor.stopping:
            busy = core.engine.has_work()
            began = time.perf_counter()
            events = dict(poller.poll(0 if busy else heartbeat_ms))
            if not busy:
                began = time.perf_counter()  # an idle wait for a request is not work
            for peer, message in received(sock, actor.log) if events else ():
                for to, body in core.handle(peer, message):
                    sock.send_multipart([to, actor.codec.encode(body, message.msg_id)])
            stepped = core.engine.has_work()
            if stepped:
                at = time.perf_counter()
                out = core.step()
                timers.step(time.perf_counter() - at)
                for to, body in out:
                    sock.send_multipart([to, actor.codec.encode(body)])
            actor.poll_supervisor()
            core.draining = actor.draining
            if busy or stepped:
                timers.work(time.perf_counter() - began, done=not core.engine.has_work())
            actor.beat(busy=core.engine.has_work())
    finally:
        if board is not None:
            (actor.run_dir / "board").unlink(missing_ok=True)
            board.close()
        model.close()
        actor.close()


class Timers:
    """Where the engine's time goes while it has work, written to the runtime directory at
    each heartbeat (bench/pipeline.py reads it): in steps (the model's math, and waiting for
    compute workers and the disk) or around them (requests and tokens over ZeroMQ); within
    steps, the plumbing of the compute board (a round's time beyond its slowest worker's
    computation) and of the cache (waits for experts that needed no read)."""

    def __init__(self, model, path) -> None:
        self.model, self.path = model, path
        self.work_s = self.step_s = 0.0
        self.steps = 0
        self._written = 0.0

    def step(self, seconds: float) -> None:
        self.step_s += seconds
        self.steps += 1

    def work(self, seconds: float, done: bool) -> None:
        """`seconds` more of work; written out each second, and when the work is `done`."""
        self.work_s += seconds
        now = time.monotonic()
        if done or now - self._written >= 1.0:
            self._written = now
            self.write()

    def figures(self) -> dict:
        executor = self.model.transformer.executor
        streamer = self.model.streamer
        board = getattr(executor, "round_s", 0.0) - getattr(executor, "worker_s", 0.0)
        messages = getattr(streamer, "message_s", 0.0)
        out = {
            "steps": self.steps,
            "work_s": self.work_s,
            "step_s": self.step_s,
            "board_rounds": getattr(executor, "rounds", 0),
            "board_round_s": getattr(executor, "round_s", 0.0),
            "board_worker_s": getattr(executor, "worker_s", 0.0),
            "board_overhead_s": board,
            "cache_message_s": messages,
            "disk_wait_s": getattr(streamer, "stall_s", 0.0),
        }
        around = self.work_s - self.step_s
        out["orchestration_s"] = around + board + messages
        out["orchestration_share"] = out["orchestration_s"] / self.work_s if self.work_s else 0.0
        return out

    def write(self) -> None:
        import json

        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.figures()))
        os.replace(tmp, self.path)


def _compute_board(actor, model):
    """With a store, the board compute workers take products from, announced in the runtime
    directory's `board` file; the model's products then go through it."""
    import json

    from mer.compute.board import Board
    from mer.compute.executor import BoardExecutor
    from mer.compute.weights import WeightTable
    from mer.io.shm import sweep_orphans

    fds = actor.spec.get("fds") or {}
    if not actor.spec.get("store") or not fds.get("go"):
        return None  # (workers may come later, by a reload: the board is there for them)
    a, e = model.args, actor.config.engine
    widest = max(a.dim, a.ffn_dim, a.n_heads * a.head_dim)
    data = 16 * e.max_batch_tokens * widest + 8 * e.max_seqs * (a.vocab_size + a.dim) + (1 << 20)
    sweep_orphans()
    board = Board.create(data)
    streamer = model.streamer
    source = streamer.source if streamer is not None else None
    table = WeightTable(model.weights, source, streamer.arena if streamer else None)
    c = actor.config.compute
    model.transformer.executor = BoardExecutor(
        board,
        table,
        fds["go"],
        fds["done"],
        c.stripes,
        c.min_work,
        c.round_timeout_s,
        actor.log,
        lambda: actor.beat(busy=True),
        measured=c.measured,
    )
    note = {
        "board": board.name,
        "arena": streamer.arena.name if streamer else None,
        "engine": actor.codec.incarnation,
    }
    tmp = actor.run_dir / "board.tmp"
    tmp.write_text(json.dumps(note))
    os.replace(tmp, actor.run_dir / "board")
    actor.log.info("event=board name=%s workers=%d", board.name, fds["workers"])
    return board


if __name__ == "__main__":
    main()
