"""The api actor: OpenAI-compatible HTTP (aiohttp on uvloop) in front of the engine.

`Gateway` (no HTTP, tested with a fake send) keeps every generation sent to the engine: its
Submit and the tokens its client has been sent. The engine answers with its incarnation to
the Hello the gateway sends every heartbeat; when that incarnation changes (the engine was
restarted) the gateway submits every open generation again with `resume_ids` = what its
client already got, so the new engine goes on from there and the client sees one
uninterrupted stream. A generation without a seed is given one, so that a sampled one
resumes with the same draws.

`Api` is the HTTP side. A request is read (413 past `api.max_body_bytes`), its key checked
and classed (mer/http/admission.py), parsed and tokenized (mer/http/openai.py: every field,
or a 400 naming the one that is wrong), queued for admission (429 when the queue is full),
then run as one engine generation per choice; the answer is shaped by mer/http/openai.py,
whole or as server-sent events. A client that goes away (aiohttp cancels its handler) has its
generations cancelled, which the engine applies before its next step. Endpoints:
POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id},
GET /openapi.json, GET /metrics (mer/http/metrics.py), GET /health (the api process is up),
GET /ready (every actor's kind, index, pid, incarnation and restart count, from the
supervisor: 200 when all are ready, else 503).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mer.http.openai import ApiError, Job, Limits
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

    def submit(self, body: Submit, queue: asyncio.Queue | None = None) -> Open:
        """Send a generation; its Tokens and Rejected bodies go to `queue` (its own if None:
        the choices of one request share theirs)."""
        params = dict(body.params)
        if params.get("seed") is None:
            params["seed"] = secrets.randbelow(1 << 62)
        body = Submit(**{**body.__dict__, "params": params})
        request = self.open[body.request] = Open(body)
        if queue is not None:
            request.queue = queue
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


@dataclass
class Choice:
    """One choice of a request as it streams: what its client has been sent."""

    index: int
    request: str  # its engine generation's id
    ids: list[int] = field(default_factory=list)
    text: str = ""
    scores: list = field(default_factory=list)
    finish: str | None = None
    cached: int = 0
    last: float = 0.0  # when its last tokens came
    sent_text: int = 0  # characters of `text` already streamed (tools hold some back)


@dataclass
class Ticket:
    """A request waiting for admission, then running."""

    job: Job
    cls: str
    arrived: float
    started: asyncio.Future
    choices: list[Choice] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token: float | None = None
    rid: str = ""  # the response's id


class Api:
    """The HTTP side (aiohttp), around a Gateway (module docstring)."""

    def __init__(self, actor, tokenizer, model_name: str) -> None:
        import zmq.asyncio

        from mer.actors.base import endpoint
        from mer.http.admission import Admission
        from mer.http.metrics import Metrics
        from mer.http.openai import TokenText

        self.actor = actor
        self.tokenizer = tokenizer
        cfg = actor.config
        self.model_name = cfg.api.model_name or model_name
        self.context = zmq.asyncio.Context()
        self.engine = self.context.socket(zmq.DEALER)
        self.engine.setsockopt(zmq.LINGER, 0)
        self.engine.connect(endpoint(actor.run_dir, "engine"))
        self.gateway = Gateway(lambda body: self.engine.send(actor.codec.encode(body)))
        self.admission = Admission(
            cfg.engine.max_seqs,
            cfg.api.max_waiting,
            cfg.api.classes,
            cfg.api.keys,
            cfg.api.default_class,
        )
        self.metrics = Metrics(self.model_name)
        self.text_of = TokenText(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
        self.limits: Limits | None = None  # known once the engine has said
        self.draining = False
        self.created = int(time.time())
        self._ids = 0
        self._reports: list[asyncio.Future] = []

    # -- loops ----------------------------------------------------------------------------
    async def engine_loop(self) -> None:
        from mer.protocol import Codec, EngineReport, ProtocolError

        while True:
            frame = await self.engine.recv()
            try:
                message = Codec.decode(frame)
            except ProtocolError as err:
                self.actor.log.warning("event=bad_message error=%s", err)
                continue
            if isinstance(message.body, EngineReport):
                while self._reports:
                    future = self._reports.pop(0)
                    if not future.done():
                        future.set_result(message.body)
                continue
            self.gateway.on_message(message)

    async def beat_loop(self) -> None:
        """Hello to the engine (its answer tells a restart) and a heartbeat to the supervisor,
        twice a heartbeat period; the supervisor's Drain is heard here too. Until the
        engine has told the model's limits, it is asked for them; the api is ready once it
        knows them."""
        while True:
            self.gateway.send(Hello(role="api"))
            self.actor.poll_supervisor()
            self.draining = self.actor.draining
            self.actor.beat(busy=bool(self.gateway.open), force=True)
            if self.limits is None:
                report = await self.engine_report(
                    timeout_s=self.actor.config.supervisor.heartbeat_s
                )
                if report is not None:
                    cfg = self.actor.config.api
                    context = int(report.figures["context"])
                    self.limits = Limits(
                        context=context,
                        max_tokens=min(cfg.max_tokens or context, context),
                        model=self.model_name,
                        vocab_size=int(report.figures["vocab_size"]),
                    )
                    self.actor.ready()  # it can serve: it knows the model's limits
                continue
            await asyncio.sleep(self.actor.config.supervisor.heartbeat_s / 2)

    async def engine_report(self, timeout_s: float = 2.0):
        from mer.protocol import EngineQuery

        future = asyncio.get_running_loop().create_future()
        self._reports.append(future)
        self.gateway.send(EngineQuery())
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None

    async def _ask(self, kind: str, query, answer_type, timeout_s: float = 2.0):
        """One question to the supervisor or the cache actor, on a socket of its own."""
        import zmq

        from mer.actors.base import endpoint
        from mer.protocol import Codec

        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint(self.actor.run_dir, kind))
        try:
            await sock.send(self.actor.codec.encode(query))
            if await sock.poll(int(timeout_s * 1000)):
                message = Codec.decode(await sock.recv())
                if isinstance(message.body, answer_type):
                    return message.body
            return None
        finally:
            sock.close()

    async def status(self) -> dict | None:
        from mer.protocol import Status, StatusQuery

        body = await self._ask("supervisor", StatusQuery(), Status)
        return None if body is None else {"state": body.state, "actors": body.actors}

    # -- HTTP -----------------------------------------------------------------------------
    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.actor.config.api.max_body_bytes)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model:.+}", self.model),
                web.get("/openapi.json", self.openapi),
                web.get("/metrics", self.metrics_page),
                web.get("/health", self.health),
                web.get("/ready", self.ready),
            ]
        )

        @web.middleware
        async def errors(request, handler):
            return await self._errors(request, handler)

        app.middlewares.append(errors)
        return app

    @staticmethod
    def _error(err: ApiError):
        from aiohttp import web

        return web.json_response(err.body(), status=err.status, headers=err.headers)

    async def _errors(self, request, handler):
        """Every refusal in OpenAI's error shape, aiohttp's own (404, 405) included."""
        from aiohttp import web

        try:
            return await handler(request)
        except ApiError as err:
            return self._error(err)
        except web.HTTPException as err:  # aiohttp's own: unknown path, wrong method
            if err.status < 400:
                raise
            kind = "not_found_error" if err.status == 404 else "invalid_request_error"
            return self._error(
                ApiError(err.status, f"{request.method} {request.path}: {err.reason}", kind)
            )
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as err:  # a bug: say where, in one line, and answer 500
            import traceback

            where = traceback.extract_tb(err.__traceback__)[-1]
            self.actor.log.error(
                "event=request_failed path=%s error=%s:%s at=%s:%d",
                request.path,
                type(err).__name__,
                str(err).replace("\n", " ")[:200],
                where.filename.rsplit("/", 1)[-1],
                where.lineno,
            )
            return self._error(ApiError(500, "internal error; the log has details", "server_error"))

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

    def _model_card(self) -> dict:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "mer",
        }
        if self.limits is not None:
            card["max_model_len"] = self.limits.context
        return card

    async def models(self, request):
        from aiohttp import web

        self.admission.classify(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from aiohttp import web

        self.admission.classify(request.headers.get("Authorization"))
        name = request.match_info["model"]
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist",
                "not_found_error",
                "model",
                "model_not_found",
            )
        return web.json_response(self._model_card())

    async def openapi(self, request):
        from aiohttp import web

        from mer.http.spec import openapi

        return web.json_response(openapi(self.model_name, self.limits))

    async def metrics_page(self, request):
        from aiohttp import web

        from mer.http.metrics import CONTENT_TYPE
        from mer.protocol import CacheQuery, CacheReport

        report, status = await asyncio.gather(self.engine_report(), self.status())
        engine = dict(report.figures) if report is not None else {}
        engine["api_waiting"] = self.admission.waiting
        cache = report.cache if report is not None else None
        if status and any(a["kind"] == "cache" for a in status["actors"]):
            answer = await self._ask("cache", CacheQuery(), CacheReport)
            cache = answer.figures if answer is not None else None
        body = self.metrics.render(engine, cache, status)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # -- generation ----------------------------------------------------------------------------
    async def chat(self, request):
        return await self._generate(request, "chat")

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def _read(self, request) -> object:
        from aiohttp import web

        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.actor.config.api.max_body_bytes
            raise ApiError(413, f"the request body is over the limit of {limit} bytes") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None

    def _parse(self, kind: str, body: object) -> Job:
        from mer.chat import ChatTemplateError
        from mer.errors import ModelFormatError
        from mer.http.openai import parse_chat, parse_completion

        assert self.limits is not None
        try:
            if kind == "chat":
                job = parse_chat(
                    body,
                    self.limits,
                    lambda messages, tools, kwargs: self.tokenizer.encode_chat(
                        messages, True, tools, kwargs
                    ),
                )
            else:
                job = parse_completion(body, self.limits, self.tokenizer.encode)
        except (ChatTemplateError, ModelFormatError) as err:
            raise ApiError(400, str(err), param="messages") from None
        return self._checked(job)

    def _checked(self, job: Job) -> Job:
        """A job whose output grammar (if any) compiles: a schema that cannot be one is the
        client's 400, named, before anything runs."""
        from mer.engine.engine import compile_grammar
        from mer.errors import ParamError

        spec = _grammar(job)
        if spec is not None:
            try:
                compile_grammar(spec, self.tokenizer)
            except ParamError as err:
                raise ApiError(400, str(err), param=err.name) from None
        return job

    async def _generate(self, request, kind: str):
        arrived = time.monotonic()
        labels = self.metrics.labels()
        try:
            cls = self.admission.classify(request.headers.get("Authorization"))
            if self.draining:
                raise ApiError(503, "the service is shutting down", "server_error")
            if self.limits is None:
                raise ApiError(
                    503,
                    "the model is still loading; retry shortly",
                    "server_error",
                    headers={"Retry-After": "1"},
                )
            body = await self._read(request)
            loop = asyncio.get_running_loop()
            job = await loop.run_in_executor(None, self._parse, kind, body)
            ticket = Ticket(job, cls, arrived, loop.create_future())
            self.admission.offer(ticket, cls, job.choices)
        except ApiError as err:
            self.metrics.rejected.labels(**labels, status=str(err.status)).inc()
            raise
        self._admit()
        try:
            await ticket.started
            self.metrics.queue_time.labels(**labels).observe(time.monotonic() - arrived)
            self._start(ticket)
            if job.stream:
                return await self._stream(request, ticket)
            return await self._whole(ticket)
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.cancelled.labels(**labels).inc()
            raise
        finally:
            if not ticket.started.done():
                ticket.started.cancel()
                self.admission.withdraw(ticket)
            else:
                for choice in ticket.choices:
                    self.gateway.cancel(choice.request)  # a no-op once finished
                self.admission.release(job.choices)
                self._admit()

    def _admit(self) -> None:
        for entry in self.admission.admit():
            if not entry.item.started.done():
                entry.item.started.set_result(True)

    def _start(self, ticket: Ticket) -> None:
        """One engine generation per choice."""
        job = ticket.job
        self._ids += 1
        kind = "chatcmpl" if job.kind == "chat" else "cmpl"
        rid = f"{kind}-{self.actor.codec.incarnation}-{self._ids}"
        ticket.rid = rid
        grammar = _grammar(job)
        for index in range(job.choices):
            params = dict(job.params)
            params["seed"] = job.seed_of(index)
            choice = Choice(index, f"{rid}-{index}", last=ticket.arrived)
            ticket.choices.append(choice)
            max_tokens = job.max_tokens
            if max_tokens is None:  # the rest of the context, within the api's limit
                room = self.limits.context - len(job.prompt_of(index))
                max_tokens = min(room, self.limits.max_tokens)
            self.gateway.submit(
                Submit(
                    choice.request,
                    job.prompt_of(index),
                    params,
                    max_tokens,
                    [] if job.ignore_eos else None,
                    job.stop,
                    grammar=grammar,
                ),
                ticket.queue,
            )

    async def _next(self, ticket: Ticket):
        """The next engine answer for one of the ticket's choices: (choice, Tokens) or raises
        ApiError for a Rejected one. Counts tokens and latencies."""
        item = await ticket.queue.get()
        index = int(item.request.rsplit("-", 1)[1])
        choice = ticket.choices[index]
        if isinstance(item, Rejected):
            raise ApiError(
                item.status,
                item.message,
                "server_error" if item.status >= 500 else "invalid_request_error",
            )
        now = time.monotonic()
        labels = self.metrics.labels()
        if item.ids:
            if ticket.first_token is None:
                ticket.first_token = now
                self.metrics.ttft.labels(**labels).observe(now - ticket.arrived)
            elif choice.ids:
                gap = (now - choice.last) / len(item.ids)
                for _ in item.ids:
                    self.metrics.itl.labels(**labels).observe(gap)
            self.metrics.generation_tokens.labels(**labels).inc(len(item.ids))
        choice.last = now
        choice.ids += item.ids
        choice.text += item.text
        choice.scores += item.logprobs or []
        choice.cached = max(choice.cached, item.cached_tokens)
        if item.finish_reason is not None:
            choice.finish = item.finish_reason
            self.metrics.requests.labels(**labels, finished_reason=item.finish_reason).inc()
        return choice, item

    def _done(self, ticket: Ticket) -> None:
        labels = self.metrics.labels()
        self.metrics.e2e.labels(**labels).observe(time.monotonic() - ticket.arrived)
        self.metrics.prompt_tokens.labels(**labels).inc(sum(len(p) for p in ticket.job.prompts))

    def _usage(self, ticket: Ticket) -> dict:
        from mer.http.openai import usage

        job = ticket.job
        return usage(
            sum(len(p) for p in job.prompts),
            sum(len(c.ids) for c in ticket.choices),
            sum(c.cached for c in ticket.choices[:: job.n]),
        )

    async def _whole(self, ticket: Ticket):
        from aiohttp import web

        while not all(c.finish is not None for c in ticket.choices):
            await self._next(ticket)
        self._done(ticket)
        job = ticket.job
        out = {
            "id": ticket.rid,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [self._choice(ticket, c) for c in ticket.choices],
            "usage": self._usage(ticket),
        }
        return web.json_response(out)

    def _choice(self, ticket: Ticket, choice: Choice) -> dict:
        from mer.http.openai import chat_logprobs, completion_logprobs, finish_reason

        job = ticket.job
        if job.kind == "completion":
            out = {
                "index": choice.index,
                "text": choice.text,
                "logprobs": None
                if job.logprobs is None
                else completion_logprobs(choice.ids, choice.scores, self.text_of, 0),
                "finish_reason": finish_reason(choice.finish),
            }
            if job.return_token_ids:
                out["token_ids"] = choice.ids
            return out
        calls = self._tool_calls(ticket, choice)
        message = {"role": "assistant", "content": choice.text if calls is None else None}
        if calls is not None:
            message["tool_calls"] = calls
        out = {
            "index": choice.index,
            "message": message,
            "logprobs": None
            if job.logprobs is None
            else chat_logprobs(choice.ids, choice.scores, self.text_of),
            "finish_reason": finish_reason(choice.finish, calls is not None),
        }
        if job.return_token_ids:
            out["token_ids"] = choice.ids
        return out

    def _tool_calls(self, ticket: Ticket, choice: Choice):
        from mer.http.openai import parse_tool_calls

        job = ticket.job
        if not job.tools or job.tool_choice == "none":
            return None
        forced = job.tool_choice["function"]["name"] if isinstance(job.tool_choice, dict) else None
        return parse_tool_calls(
            choice.text, job.tools, forced, lambda: f"call_{secrets.token_hex(12)}"
        )

    async def _stream(self, request, ticket: Ticket):
        from aiohttp import web

        from mer.http.openai import chat_logprobs, completion_logprobs, finish_reason

        job = ticket.job
        chat = job.kind == "chat"
        tools = bool(job.tools) and job.tool_choice != "none"
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())

        def chunk(choices: list, usage=None) -> bytes:
            out = {
                "id": ticket.rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if job.include_usage:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n".encode()

        if chat:  # the role first, as OpenAI sends it
            await response.write(
                chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for c in ticket.choices
                    ]
                )
            )
        try:
            while not all(c.finish is not None for c in ticket.choices):
                choice, item = await self._next(ticket)
                finished = item.finish_reason is not None
                if not item.ids and not item.text and not finished:
                    continue
                scores = item.logprobs or []
                if chat:
                    if tools:  # tool calls are parsed from the whole text, at the end
                        if not finished:
                            continue
                        calls = self._tool_calls(ticket, choice)
                        if calls is None:
                            delta = {"content": choice.text}
                        else:
                            delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                        logprobs = (
                            None
                            if job.logprobs is None
                            else chat_logprobs(choice.ids, choice.scores, self.text_of)
                        )
                    else:
                        delta = {"content": item.text} if item.text or not finished else {}
                        calls = None
                        logprobs = (
                            None
                            if job.logprobs is None
                            else chat_logprobs(item.ids, scores, self.text_of)
                        )
                    entry = {
                        "index": choice.index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(item.finish_reason, calls is not None),
                    }
                else:
                    offset = len(choice.text) - len(item.text)
                    entry = {
                        "index": choice.index,
                        "text": item.text,
                        "logprobs": None
                        if job.logprobs is None
                        else completion_logprobs(item.ids, scores, self.text_of, offset),
                        "finish_reason": finish_reason(item.finish_reason),
                    }
                if job.return_token_ids:
                    entry["token_ids"] = choice.ids if tools else item.ids
                await response.write(chunk([entry]))
            self._done(ticket)
            if job.include_usage:
                await response.write(chunk([], self._usage(ticket)))
        except ApiError as err:
            await response.write(f"data: {json.dumps(err.body())}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


def _grammar(job: Job) -> dict | None:
    """What the engine constrains each choice's output to (`mer.engine.engine.
    compile_grammar`): the response format; or, for a tool call that must happen, the named
    function's arguments, or a call to any of the tools (tool_choice required)."""
    if job.response_format is not None:
        return {"response_format": job.response_format}
    if not job.tools:
        return None
    if isinstance(job.tool_choice, dict):
        name = job.tool_choice["function"]["name"]
        return {"tool": next(t for t in job.tools if t["function"]["name"] == name)}
    if job.tool_choice == "required":
        return {"tools": job.tools}
    return None


def main() -> None:
    from aiohttp import web

    from mer.actors.base import Actor
    from mer.models.loading import load_tokenizer
    from mer.models.sources import resolve_model

    actor = Actor()
    path = resolve_model(actor.config.model)
    api = Api(actor, load_tokenizer(path), path.name)

    async def serve() -> None:
        runner = web.AppRunner(
            api.app(), handle_signals=False, access_log=None, handler_cancellation=True
        )
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
