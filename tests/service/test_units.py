"""The service's socket-free parts: protocol, configuration, restart policy, sd_notify, the
engine actor's core and the api's gateway."""

from __future__ import annotations

import socket
import time

import pytest

from mer.config import ConfigError, ServeConfig
from mer.protocol import (
    KINDS,
    Cancel,
    Codec,
    Hello,
    ProtocolError,
    Submit,
    Tokens,
)
from mer.supervisor.notify import Notifier
from mer.supervisor.restart import RestartPolicy


# -- protocol ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips_and_documents_its_body(kind):
    """Each schema's docstring shows its body on the wire; that example decodes to the
    schema and survives a round trip in an envelope."""
    cls = KINDS[kind]
    example = _wire_example(cls.__doc__ or "")
    assert example is not None, f"{kind}: no wire example in the docstring"
    body = cls.from_wire(example)
    codec = Codec("api.0", "abcd1234")
    message = Codec.decode(codec.encode(body, parent=7))
    assert message.body == body and message.kind == kind
    assert (message.sender, message.incarnation, message.parent_id) == ("api.0", "abcd1234", 7)
    assert body.to_wire() == {**body.to_wire(), **example}


def _wire_example(doc: str):
    """The first balanced {...} of `doc`, as JSON."""
    import json

    start = doc.find("{")
    if start < 0:
        return None
    depth = 0
    for i, ch in enumerate(doc[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return json.loads(" ".join(doc[start : i + 1].split()))
    return None


@pytest.mark.parametrize(
    "frame",
    [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x02", Codec("x").encode(Cancel("r"))[:-3]],
)
def test_garbage_is_a_protocol_error(frame):
    with pytest.raises(ProtocolError):
        Codec.decode(frame)


def test_unknown_fields_are_refused():
    import msgpack

    frame = msgpack.packb(
        {
            "v": 1,
            "kind": "cancel",
            "sender": "a",
            "inc": "b",
            "id": 1,
            "parent": None,
            "body": {"request": "r", "extra": 1},
        }
    )
    with pytest.raises(ProtocolError, match="extra"):
        Codec.decode(frame)


# -- configuration -------------------------------------------------------------------------------
def test_defaults_need_no_file_and_the_documented_file_is_the_defaults(tmp_path):
    from pathlib import Path

    documented = Path(__file__).resolve().parents[2] / "configs" / "mer.toml"
    assert ServeConfig.load(documented) == ServeConfig.load()


@pytest.mark.parametrize(
    "text, key",
    [
        ("[api]\nprot = 1\n", "api.prot"),
        ("[nope]\n", "nope"),
        ('[api]\nport = "80"\n', "api.port"),
        ("[api]\nport = 0\n", "api.port"),
        ('[cache]\nbytes = "lots"\n', "cache.bytes"),
        ("[supervisor]\nheartbeat_timeout_s = 1.0\n", "supervisor.heartbeat_timeout_s"),
        ('[io]\nbackend = "floppy"\n', "io.backend"),
        ('[engine]\nactivations = "int4"\n', "engine.activations"),
        ("model = 3\n", "model"),
        ("[api\n", "not valid TOML"),
    ],
)
def test_bad_keys_are_named(tmp_path, text, key):
    path = tmp_path / "mer.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        ServeConfig.load(path)


def test_sizes_and_overrides(tmp_path):
    path = tmp_path / "mer.toml"
    path.write_text('[cache]\nbytes = "2G"\n[api]\nport = 9000\n')
    config = ServeConfig.load(path).override(**{"api.port": 9100, "compute.count": None})
    assert config.cache.bytes == 2 << 30 and config.api.port == 9100


# -- restart policy ------------------------------------------------------------------------------
def test_intensity_within_period_then_escalate():
    policy = RestartPolicy(intensity=3, period_s=10)
    assert [policy.allow(t) for t in (0, 1, 2)] == [True, True, True]
    assert not policy.allow(3)  # a fourth within 10 s
    assert policy.allow(11.5)  # the first two have left the window


# -- sd_notify -----------------------------------------------------------------------------------
def test_notify_over_a_real_datagram_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier(path)
    assert notifier.enabled and notifier.watchdog_s == 4.0
    notifier.ready("serving")
    assert server.recv(1024) == b"READY=1\nSTATUS=serving"
    notifier.reloading()
    assert server.recv(1024).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    notifier.watchdog()
    assert server.recv(1024) == b"WATCHDOG=1"
    server.close()
    assert not Notifier("").enabled


def test_notify_never_stalls_on_a_reader_that_fell_behind(tmp_path):
    """A datagram queue holds a handful of messages; once it is full, routine messages are
    dropped at once and state changes give up after a second, so the supervisor's loop (which
    also answers /ready) never hangs on systemd."""
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    notifier = Notifier(path)
    start = time.monotonic()
    sent = sum(notifier.send(WATCHDOG=1) for _ in range(500))
    assert 0 < sent < 500 and notifier.dropped == 500 - sent
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    notifier.stopping()
    assert 0.9 < time.monotonic() - start < 3.0 and notifier.dropped == 501 - sent
    server.setblocking(False)
    got = [server.recv(64) for _ in range(sent)]
    assert got == [b"WATCHDOG=1"] * sent
    notifier.ready("serving")  # room again
    assert server.recv(64) == b"READY=1\nSTATUS=serving"
    server.close()


# -- the api's gateway ---------------------------------------------------------------------------
def test_gateway_replays_what_was_open_when_the_engine_changes():
    from mer.actors.api import Gateway
    from mer.protocol import Message

    sent = []
    gateway = Gateway(sent.append)

    def deliver(body, incarnation):
        gateway.on_message(Message(body.KIND, "engine.0", incarnation, 1, None, body))

    deliver(Hello("engine"), "e1")
    open_ = gateway.submit(Submit("r-1", [1, 2, 3], {"temperature": 0.8}, 10))
    assert sent[-1].params["seed"] is not None  # given one, so that a replay draws the same
    deliver(Tokens("r-1", [7, 8], "ab", None, 3), "e1")
    deliver(Hello("engine"), "e2")  # the engine was restarted
    assert sent[-1].resume_ids == [7, 8] and sent[-1].params == sent[0].params
    deliver(Tokens("r-1", [9], "zz", None, 3), "e1")  # a dead incarnation's late tokens
    assert open_.sent_ids == [7, 8]
    deliver(Tokens("r-1", [9], "c", "length", 3), "e2")
    assert open_.sent_ids == [7, 8, 9] and "r-1" not in gateway.open
