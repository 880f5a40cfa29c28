"""Every message the service's actors exchange: an envelope, and one frozen schema per kind.

On the wire a message is one msgpack frame (plus raw frames for large buffers, never packed):

    {"v": 1, "kind": "submit", "sender": "api.0", "inc": "3f2a9c1e", "id": 17,
     "parent": null, "body": {...}}

`sender` is the actor's kind and index, `inc` its incarnation (new at each restart, so a
message from a dead incarnation is told apart), `id` a per-sender counter and `parent` the id
of the message this one answers. Bodies hold only msgpack's own types (no tuples, no numpy
scalars, string map keys). Each schema's docstring shows its body.

Sockets: the engine, the cache and the supervisor bind ROUTER sockets at ipc:// paths in the
service's runtime directory (mode 0700); the others connect DEALER sockets (REQ/REP would
wedge after a peer restarts). LINGER is 0 everywhere: a restart never waits for a dead peer.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a message of this protocol (and is dropped, with a log line)."""


@dataclass(frozen=True)
class Body:
    KIND: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> Body:
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.KIND}: body must be a map")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ProtocolError(f"{cls.KIND}: unknown fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ProtocolError(f"{cls.KIND}: {err}") from None


# -- api <-> engine ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Submit(Body):
    """Start (or, after an engine restart, resume) a generation.
    {"request": "r-12", "prompt_ids": [1, 415], "params": {"temperature": 0.7, "seed": 3},
     "max_tokens": 64, "stop_ids": [2], "stop_strings": ["###"], "resume_ids": [],
     "grammar": null}
    `resume_ids`: tokens the client already received; the engine feeds them after the prompt
    and continues from there, so the stream goes on as if nothing had happened. `grammar`:
    what the output must be, for constrained decoding ({"type": "json_object"} or
    {"type": "json_schema", "schema": {...}})."""

    KIND: ClassVar[str] = "submit"
    request: str
    prompt_ids: list[int]
    params: dict[str, Any]
    max_tokens: int
    stop_ids: list[int] | None = None  # None: the model's end-of-sequence ids
    stop_strings: list[str] = field(default_factory=list)
    resume_ids: list[int] = field(default_factory=list)
    grammar: dict[str, Any] | None = None


@dataclass(frozen=True)
class Cancel(Body):
    """Stop a generation (its client went away): {"request": "r-12"}"""

    KIND: ClassVar[str] = "cancel"
    request: str


@dataclass(frozen=True)
class Tokens(Body):
    """New tokens of a generation, and its end:
    {"request": "r-12", "ids": [311], "text": " the", "finish_reason": null,
     "prompt_tokens": 2, "logprobs": [[-0.31, [[311, -0.31], [264, -1.9]]]],
     "cached_tokens": 0}
    `logprobs` (when asked for): per id, its log-probability and the most likely
    alternatives; `cached_tokens`: prompt tokens whose keys and values came from the
    prefix cache."""

    KIND: ClassVar[str] = "tokens"
    request: str
    ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    logprobs: list[list[Any]] | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class Rejected(Body):
    """A generation the engine cannot run: {"request": "r-12", "status": 400,
    "message": "the prompt has 5000 tokens: ..."}"""

    KIND: ClassVar[str] = "rejected"
    request: str
    status: int
    message: str


@dataclass(frozen=True)
class Hello(Body):
    """A peer (re)connected: {"role": "api"}. The engine answers an api's with its own, so
    the api learns the engine's incarnation and replays what was in flight when it changes.
    An io actor sends one when it starts and in answer to the cache's (a cache that
    restarted asks), once none of its reads from before is still landing in the arena."""

    KIND: ClassVar[str] = "hello"
    role: str


@dataclass(frozen=True)
class EngineQuery(Body):
    """The engine's figures, please (api -> engine, for /metrics): {}"""

    KIND: ClassVar[str] = "engine_query"


@dataclass(frozen=True)
class EngineReport(Body):
    """The engine's figures (`Engine.figures`, and the expert cache's when the engine streams
    experts itself): {"figures": {"running": 2, "waiting": 0, "kv_usage": 0.1},
    "cache": null}"""

    KIND: ClassVar[str] = "engine_report"
    figures: dict[str, Any]
    cache: dict[str, Any] | None = None


# -- engine <-> cache <-> io ---------------------------------------------------------------------
@dataclass(frozen=True)
class Acquire(Body):
    """Lease a layer's experts (engine -> cache); each is `Granted` once ready. `ahead`:
    read-ahead candidates [layer, expert, p, bytes]; `hint`: [layer, expert, p] for the
    eviction score; `window_s`: the disk's idle window (a layer's compute time). A resend
    (same ticket) after a cache restart names only the experts not granted yet.
    {"ticket": 7, "layer": 3, "experts": [1, 5], "ahead": [[4, 2, 0.91, 1052672]],
     "hint": [[4, 2, 0.91]], "window_s": 0.012}"""

    KIND: ClassVar[str] = "acquire"
    ticket: int
    layer: int
    experts: list[int]
    ahead: list[list[Any]] = field(default_factory=list)
    hint: list[list[Any]] = field(default_factory=list)
    window_s: float = 0.0


@dataclass(frozen=True)
class Granted(Body):
    """An expert of an `Acquire` is ready in arena slot `slot` (cache -> engine), or could
    not be read (`error`; the lease is gone); `read`: it had to be read first (the wait was
    the disk's): {"ticket": 7, "layer": 3, "expert": 5, "slot": 12, "error": null,
    "read": true}"""

    KIND: ClassVar[str] = "granted"
    ticket: int
    layer: int
    expert: int
    slot: int
    error: str | None = None
    read: bool = False


@dataclass(frozen=True)
class Release(Body):
    """Done with these experts of ticket `ticket` (engine -> cache); a release of one not
    held under that ticket is ignored: {"ticket": 7, "keys": [[3, 5]]}"""

    KIND: ClassVar[str] = "release"
    ticket: int
    keys: list[list[int]]


@dataclass(frozen=True)
class Read(Body):
    """Read an expert into arena slot `slot` (cache -> io): {"layer": 3, "expert": 5,
    "slot": 12}"""

    KIND: ClassVar[str] = "read"
    layer: int
    expert: int
    slot: int


@dataclass(frozen=True)
class ReadDone(Body):
    """A `Read` finished (io -> cache), verified, or with the reason it failed:
    {"layer": 3, "expert": 5, "slot": 12, "error": null}"""

    KIND: ClassVar[str] = "read_done"
    layer: int
    expert: int
    slot: int
    error: str | None = None


@dataclass(frozen=True)
class CacheQuery(Body):
    """The cache's figures, please (engine -> cache): {}"""

    KIND: ClassVar[str] = "cache_query"


@dataclass(frozen=True)
class CacheReport(Body):
    """The cache tier's telemetry (`CacheTier.telemetry`, every figure):
    {"figures": {"hits": 10, "misses": 2, "bytes_read": 8388608}}"""

    KIND: ClassVar[str] = "cache_report"
    figures: dict[str, Any]


# -- actors <-> supervisor ----------------------------------------------------------------------
@dataclass(frozen=True)
class Heartbeat(Body):
    """I am alive and my loop turns: {"pid": 4242, "busy": true}"""

    KIND: ClassVar[str] = "heartbeat"
    pid: int
    busy: bool = False


@dataclass(frozen=True)
class Ready(Body):
    """Loaded and serving: {"pid": 4242}"""

    KIND: ClassVar[str] = "ready"
    pid: int


@dataclass(frozen=True)
class StatusQuery(Body):
    """What runs now? (the api asks, for /ready): {}"""

    KIND: ClassVar[str] = "status_query"


@dataclass(frozen=True)
class Status(Body):
    """Every actor: {"state": "serving", "actors": [{"kind": "engine", "index": 0,
    "pid": 4242, "incarnation": "3f2a9c1e", "restarts": 0, "ready": true,
    "heartbeat_age_s": 0.4, "uptime_s": 812.5}]} (uptime: since this incarnation started)"""

    KIND: ClassVar[str] = "status"
    state: str
    actors: list[dict[str, Any]]


@dataclass(frozen=True)
class Drain(Body):
    """Finish what runs, accept nothing new (SIGTERM): {"timeout_s": 30.0}"""

    KIND: ClassVar[str] = "drain"
    timeout_s: float


@dataclass(frozen=True)
class Reconfigure(Body):
    """Settings that change live (SIGHUP): {"settings": {"log_level": "info", "io": 2,
    "cache_bytes": 8589934592, "pin_fraction": 0.25}}"""

    KIND: ClassVar[str] = "reconfigure"
    settings: dict[str, Any]


KINDS: dict[str, type[Body]] = {
    cls.KIND: cls
    for cls in (
        Submit,
        Cancel,
        Tokens,
        Rejected,
        Hello,
        EngineQuery,
        EngineReport,
        Acquire,
        Granted,
        Release,
        Read,
        ReadDone,
        CacheQuery,
        CacheReport,
        Heartbeat,
        Ready,
        StatusQuery,
        Status,
        Drain,
        Reconfigure,
    )
}


@dataclass(frozen=True)
class Message:
    kind: str
    sender: str
    incarnation: str
    msg_id: int
    parent_id: int | None
    body: Body


class Codec:
    """Encodes this actor's messages (numbering them) and decodes anyone's."""

    def __init__(self, sender: str, incarnation: str | None = None) -> None:
        self.sender = sender
        self.incarnation = incarnation or new_incarnation()
        self._ids = itertools.count(1)

    def encode(self, body: Body, parent: int | None = None) -> bytes:
        return msgpack.packb(
            {
                "v": VERSION,
                "kind": body.KIND,
                "sender": self.sender,
                "inc": self.incarnation,
                "id": next(self._ids),
                "parent": parent,
                "body": body.to_wire(),
            },
            use_bin_type=True,
        )

    @staticmethod
    def decode(frame: bytes) -> Message:
        try:
            data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        except (ValueError, msgpack.exceptions.ExtraData, TypeError) as err:
            raise ProtocolError(f"not msgpack: {err}") from None
        if not isinstance(data, dict) or data.get("v") != VERSION:
            raise ProtocolError("not a message of this protocol version")
        cls = KINDS.get(data.get("kind"))
        if cls is None:
            raise ProtocolError(f"unknown kind {data.get('kind')!r}")
        try:
            return Message(
                data["kind"],
                str(data["sender"]),
                str(data["inc"]),
                int(data["id"]),
                data.get("parent"),
                cls.from_wire(data.get("body")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"bad envelope: {err}") from None


def string_keys(value: Any) -> Any:
    """`value` with every map key a string (msgpack maps here take no other keys), e.g. a
    telemetry dict keyed by layer number."""
    if isinstance(value, dict):
        return {str(k): string_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [string_keys(v) for v in value]
    return value


def new_incarnation() -> str:
    return secrets.token_hex(4)
