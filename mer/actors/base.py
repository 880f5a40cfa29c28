"""What every actor process shares: its identity, its logs, its line to the supervisor.

The supervisor starts each actor as `python -m mer.actors.KIND` with its identity and the
service's configuration in the environment (MER_ACTOR, JSON). `Actor` reads them, sets up
logging (one key=value line per event, with the actor's kind, index and pid), connects a
DEALER socket to the supervisor, and sends heartbeats and the one-time "ready". Each actor
module is a thin shell (sockets, decode, dispatch, encode) around a socket-free core.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import zmq

from mer.config import ServeConfig, from_dict
from mer.protocol import Codec, Heartbeat, Ready

ENV = "MER_ACTOR"


def actor_env(
    config: ServeConfig,
    kind: str,
    index: int,
    incarnation: str,
    run_dir: Path,
    fds: dict | None = None,
    extra: dict | None = None,
) -> str:
    """The MER_ACTOR value the supervisor gives a child (`fds`: the compute eventfds it
    inherits, {"go": [...], "done": n}; `extra`: more keys for its spec)."""
    raw = asdict(config)
    raw = {k: v for k, v in raw.items() if v is not None}
    for table in raw.values():
        if isinstance(table, dict):
            for key in [k for k, v in table.items() if v is None]:
                del table[key]
    return json.dumps(
        {
            "kind": kind,
            "index": index,
            "incarnation": incarnation,
            "run_dir": str(run_dir),
            "config": raw,
            "fds": fds or {},
            **(extra or {}),
        }
    )


def endpoint(run_dir: Path, name: str) -> str:
    return f"ipc://{run_dir / name}"


def received(sock: zmq.Socket, log: logging.Logger):
    """Every (peer, message) waiting on ROUTER socket `sock`, without blocking; frames that
    do not decode are logged and skipped."""
    from mer.protocol import Codec, ProtocolError

    while True:
        try:
            peer, frame = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            yield peer, Codec.decode(frame)
        except ProtocolError as err:
            log.warning("event=bad_message error=%s", err)


def supervisor_owner(actor: Actor):
    """The supervisor as an owner of shared memory (`mer.io.shm`): segments that must
    outlive an actor's restart are named after it, read from the runtime directory's name
    (run.PID.START)."""
    from mer.io.shm import Owner

    _, pid, start = actor.run_dir.name.split(".")
    return Owner(int(pid), int(start))


class Actor:
    """This process's identity, configuration, logger and supervisor line."""

    def __init__(self) -> None:
        spec = json.loads(os.environ[ENV])
        self.spec = spec
        self.kind: str = spec["kind"]
        self.index: int = spec["index"]
        self.run_dir = Path(spec["run_dir"])
        self.config = from_dict(spec["config"], ENV)
        self.name = f"{self.kind}.{self.index}"
        self.codec = Codec(self.name, spec["incarnation"])
        self.log = setup_logging(self.config.log.level, self.kind, self.index)
        self.context = zmq.Context.instance()
        self.supervisor = self.context.socket(zmq.DEALER)
        self.supervisor.setsockopt(zmq.LINGER, 0)
        # the supervisor routes its messages to us by this identity
        self.supervisor.setsockopt(zmq.IDENTITY, self.name.encode())
        self.supervisor.connect(endpoint(self.run_dir, "supervisor"))
        self.draining = False
        self._last_beat = 0.0
        self.stopping = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor reloads, not us

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def ready(self) -> None:
        self.supervisor.send(self.codec.encode(Ready(pid=os.getpid())))
        self.log.info("event=ready")

    def beat(self, busy: bool = False, force: bool = False) -> bool:
        """A heartbeat, at most every supervisor.heartbeat_s unless `force`; whether one
        went."""
        now = time.monotonic()
        if force or now - self._last_beat >= self.config.supervisor.heartbeat_s:
            self._last_beat = now
            self.supervisor.send(self.codec.encode(Heartbeat(pid=os.getpid(), busy=busy)))
            return True
        return False

    def poll_supervisor(self) -> list:
        """Bodies the supervisor sent (Drain, Reconfigure), acted on where they are common:
        Drain sets `draining`, Reconfigure applies the log level."""
        from mer.protocol import Drain, ProtocolError, Reconfigure

        bodies = []
        while True:
            try:
                frame = self.supervisor.recv(zmq.NOBLOCK)
            except zmq.Again:
                return bodies
            try:
                body = Codec.decode(frame).body
            except ProtocolError as err:
                self.log.warning("event=bad_message error=%s", err)
                continue
            if isinstance(body, Drain):
                self.draining = True
                self.log.info("event=draining")
            elif isinstance(body, Reconfigure) and "log_level" in body.settings:
                logging.getLogger().setLevel(str(body.settings["log_level"]).upper())
            bodies.append(body)

    def close(self) -> None:
        self.context.destroy(linger=0)


class _KeyValue(logging.Formatter):
    def __init__(self, kind: str, index: int) -> None:
        super().__init__()
        self._who = f"actor={kind} index={index} pid={os.getpid()}"

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"ts={stamp} level={record.levelname.lower()} {self._who} {record.getMessage()}"


def setup_logging(level: str, kind: str, index: int) -> logging.Logger:
    """Logs to stderr, one key=value line per event (systemd's journal keeps stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValue(kind, index))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(f"mer.{kind}")
