"""The api actor: OpenAI-style HTTP (aiohttp on uvloop) in front of the engine.

`Gateway` (no HTTP, tested with a fake send) keeps every accepted request: its Submit and the
tokens its client has been sent. The engine answers with its incarnation to the Hello the
gateway sends every heartbeat; when that incarnation changes (the engine was restarted) the
gateway submits every open request again with `resume_ids` = what its client already got, so
the new engine goes on from there and the client sees one uninterrupted stream. A request
without a seed is given one, so that a sampled request resumes with the same draws.

HTTP (this issue: completions only; the full API is the next):
- POST /v1/completions: prompt (a string), max_tokens (16), temperature (1), top_p (1), seed,
  stream (SSE chunks in OpenAI's format ending with `data: [DONE]`), and `return_token_ids`
  (each choice also lists its token ids). A client that disconnects cancels its generation.
- GET /health: the api process is up. GET /ready: every actor's kind, index, pid,
  incarnation and restart count (from the supervisor): 200 when all are ready, else 503.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mer.protocol import Body, Hello, Message, Rejected, Submit, Tokens


@dataclass
class Open:
    """An accepted request as the gateway keeps it."""

    submit: Submit
    sent_ids: list[int] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Tokens / Rejected bodies
    prompt_tokens: int = 0


class Gateway:
    """Requests in flight, and their replay when the engine changes incarnation."""

    def __init__(self, send: Callable[[Body], None]) -> None:
        self.send = send
        self.open: dict[str, Open] = {}
        self.engine_incarnation: str | None = None

    def submit(self, body: Submit) -> Open:
        params = dict(body.params)
        params.setdefault("seed", secrets.randbelow(1 << 62))
        body = Submit(**{**body.__dict__, "params": params})
        request = self.open[body.request] = Open(body)
        self.send(body)
        return request

    def cancel(self, request_id: str) -> None:
        from mer.protocol import Cancel

        if self.open.pop(request_id, None) is not None:
            self.send(Cancel(request_id))

    def on_message(self, message: Message) -> None:
        body = message.body
        if isinstance(body, Hello):
            if message.incarnation != self.engine_incarnation:
                first = self.engine_incarnation is None
                self.engine_incarnation = message.incarnation
                if not first:
                    self.replay()
            return
        if message.incarnation != self.engine_incarnation:
            if self.engine_incarnation is None:
                self.engine_incarnation = message.incarnation
            else:
                return  # a dead engine's last words: its tokens are computed again
        if isinstance(body, Tokens | Rejected):
            request = self.open.get(body.request)
            if request is None:
                return
            if isinstance(body, Tokens):
                request.sent_ids += body.ids
                request.prompt_tokens = body.prompt_tokens
            if isinstance(body, Rejected) or body.finish_reason is not None:
                del self.open[body.request]
            request.queue.put_nowait(body)

    def replay(self) -> None:
        for request in self.open.values():
            self.send(Submit(**{**request.submit.__dict__, "resume_ids": list(request.sent_ids)}))


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class Api:
    """The HTTP side (aiohttp), around a Gateway."""

    def __init__(self, actor, tokenizer, model_name: str) -> None:
        import zmq.asyncio

        from mer.actors.base import endpoint

        self.actor = actor
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = zmq.asyncio.Context()
        self.engine = self.context.socket(zmq.DEALER)
        self.engine.setsockopt(zmq.LINGER, 0)
        self.engine.connect(endpoint(actor.run_dir, "engine"))
        self.gateway = Gateway(lambda body: self.engine.send(actor.codec.encode(body)))
        self.draining = False
        self._ids = 0

    # -- loops ----------------------------------------------------------------------------
    async def engine_loop(self) -> None:
        from mer.protocol import Codec, ProtocolError

        while True:
            frame = await self.engine.recv()
            try:
                self.gateway.on_message(Codec.decode(frame))
            except ProtocolError as err:
                self.actor.log.warning("event=bad_message error=%s", err)

    async def beat_loop(self) -> None:
        """Hello to the engine (its answer tells a restart) and a heartbeat to the supervisor,
        twice a heartbeat period; the supervisor's Drain is heard here too."""
        while True:
            self.gateway.send(Hello(role="api"))
            self.actor.poll_supervisor()
            self.draining = self.actor.draining
            self.actor.beat(busy=bool(self.gateway.open), force=True)
            await asyncio.sleep(self.actor.config.supervisor.heartbeat_s / 2)

    async def status(self) -> dict | None:
        import zmq

        from mer.actors.base import endpoint
        from mer.protocol import Codec, Status, StatusQuery

        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint(self.actor.run_dir, "supervisor"))
        try:
            await sock.send(self.actor.codec.encode(StatusQuery()))
            if await sock.poll(2000):
                message = Codec.decode(await sock.recv())
                if isinstance(message.body, Status):
                    return {"state": message.body.state, "actors": message.body.actors}
            return None
        finally:
            sock.close()

    # -- HTTP -----------------------------------------------------------------------------
    def app(self):
        from aiohttp import web

        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.get("/health", self.health),
                web.get("/ready", self.ready),
            ]
        )
        return app

    async def health(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def ready(self, request):
        from aiohttp import web

        status = await self.status()
        if status is None:
            return web.json_response({"state": "unknown", "actors": []}, status=503)
        ok = status["state"] == "serving" and all(a["ready"] for a in status["actors"])
        return web.json_response(status, status=200 if ok else 503)

    async def completions(self, request):
        from aiohttp import web

        if self.draining:
            return web.json_response(error_body(503, "the service is shutting down"), status=503)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return web.json_response(error_body(400, "the body is not JSON"), status=400)
        submit, problem = self._parse(body)
        if problem:
            return web.json_response(error_body(400, problem), status=400)
        if len(self.gateway.open) >= self.actor.config.api.max_waiting + 64:
            return web.json_response(
                error_body(429, "too many requests", "rate_limit_error"),
                status=429,
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(None, self.tokenizer.encode, body["prompt"])
        if not prompt_ids:
            return web.json_response(error_body(400, "prompt encodes to no tokens"), status=400)
        submit = Submit(**{**submit.__dict__, "prompt_ids": prompt_ids})
        open_ = self.gateway.submit(submit)
        created = int(time.time())
        rid = submit.request
        with_ids = bool(body.get("return_token_ids"))
        if body.get("stream"):
            return await self._stream(request, open_, rid, created, with_ids)
        text, ids, finish = "", [], None
        try:
            while finish is None:
                item = await open_.queue.get()
                if isinstance(item, Rejected):
                    return web.json_response(
                        error_body(item.status, item.message), status=item.status
                    )
                text, ids, finish = text + item.text, ids + item.ids, item.finish_reason
        except asyncio.CancelledError:
            self.gateway.cancel(rid)
            raise
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish)}
        if with_ids:
            choice["token_ids"] = ids
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(ids),
            "total_tokens": len(prompt_ids) + len(ids),
        }
        return web.json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def _stream(self, request, open_: Open, rid: str, created: int, with_ids: bool):
        from aiohttp import web

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            while True:
                item = await open_.queue.get()
                if isinstance(item, Rejected):
                    chunk = error_body(item.status, item.message)
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    break
                choice = {
                    "index": 0,
                    "text": item.text,
                    "logprobs": None,
                    "finish_reason": _finish(item.finish_reason),
                }
                if with_ids:
                    choice["token_ids"] = item.ids
                chunk = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if item.finish_reason is not None:
                    break
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.gateway.cancel(rid)
            raise
        return response

    def _parse(self, body: object) -> tuple[Submit | None, str | None]:
        if not isinstance(body, dict):
            return None, "the body must be a JSON object"
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None, "prompt must be a string"
        known = {
            "model",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stream",
            "return_token_ids",
            "top_k",
            "min_p",
            "stop",
            "user",
            "ignore_eos",
        }
        unknown = sorted(set(body) - known)
        if unknown:
            return None, f"unsupported field: {unknown[0]}"
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            return None, "max_tokens must be a whole number >= 0"
        params = {
            k: body[k]
            for k in ("temperature", "top_p", "seed", "top_k", "min_p")
            if body.get(k) is not None
        }
        params.setdefault("temperature", 1.0)
        params.setdefault("top_p", 1.0)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            return None, "stop must be a string or a list of up to 4 strings"
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            return None, "ignore_eos must be true or false"
        self._ids += 1
        rid = f"cmpl-{self.actor.codec.incarnation}-{self._ids}"
        return Submit(rid, [], params, max_tokens, [] if ignore_eos else None, stop), None


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "stop" else "length")


def main() -> None:
    from aiohttp import web

    from mer.actors.base import Actor
    from mer.models.loading import load_tokenizer
    from mer.models.sources import resolve_model

    actor = Actor()
    path = resolve_model(actor.config.model)
    api = Api(actor, load_tokenizer(path), path.name)

    async def serve() -> None:
        runner = web.AppRunner(api.app(), handle_signals=False, access_log=None)
        await runner.setup()
        cfg = actor.config.api
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            actor.log.error(
                "event=listen_failed host=%s port=%d error=%s", cfg.host, cfg.port, err.strerror
            )
            await runner.cleanup()
            raise SystemExit(1) from None
        actor.log.info("event=listening host=%s port=%d", cfg.host, cfg.port)
        actor.ready()
        tasks = [asyncio.create_task(api.engine_loop()), asyncio.create_task(api.beat_loop())]
        try:
            while not actor.stopping:
                await asyncio.sleep(0.2)
        finally:
            for task in tasks:
                task.cancel()
            await runner.cleanup()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    actor.close()


if __name__ == "__main__":
    main()
