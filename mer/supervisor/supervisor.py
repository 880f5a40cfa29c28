"""`mer serve`: start the actors, keep them alive, reload, drain, tell systemd.

Children are started by exec (`python -m mer.actors.KIND`, never fork: numba's threads do not
survive a fork) in order (engine, then api), each with its identity and the configuration in
MER_ACTOR, and are stopped in the reverse order. A child dies with the supervisor
(PR_SET_PDEATHSIG), so a killed supervisor leaves no actor behind; its runtime directory and
shared memory are named after it and swept by the next start.

One_for_one (`RestartPolicy`): a child that exits, or stops beating for
`heartbeat_timeout_s` (hung, or SIGSTOP'd), is killed and started again as a new incarnation;
when restarts exceed `intensity` within `period_s`, the supervisor stops everything and exits
non-zero naming the child. SIGHUP re-reads the configuration file and applies what can change
live (the log level), saying what cannot; SIGTERM drains: the api refuses new requests (503),
running ones finish up to `drain_timeout_s`, then everything stops and the exit is 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from mer.actors.base import ENV, actor_env, endpoint
from mer.compute.board import MAX_WORKERS
from mer.config import ServeConfig
from mer.errors import MerError
from mer.io.shm import Owner, remove_owned
from mer.protocol import (
    Codec,
    Drain,
    Heartbeat,
    ProtocolError,
    Ready,
    Reconfigure,
    Status,
    StatusQuery,
    new_incarnation,
)
from mer.supervisor.notify import Notifier
from mer.supervisor.restart import RestartPolicy

log = logging.getLogger("mer.supervisor")
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    kind: str
    index: int
    proc: subprocess.Popen | None = None
    incarnation: str = ""
    started: float = 0.0
    ready: bool = False
    last_beat: float = 0.0
    restarts: int = 0
    busy: bool = False  # at its last heartbeat
    beat_since_drain: bool = False
    retiring: bool = False  # a reload lowered its kind's count: it exits for good

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.index}"

    def describe(self, now: float) -> dict:
        return {
            "kind": self.kind,
            "index": self.index,
            "pid": self.proc.pid if self.proc else None,
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "ready": self.ready,
            "heartbeat_age_s": round(now - self.last_beat, 3) if self.last_beat else None,
            "uptime_s": round(now - self.started, 3) if self.started else None,
        }


class Escalation(MerError):
    """A child kept failing: the service stops (and systemd may start it afresh)."""


@dataclass
class Supervisor:
    config: ServeConfig
    config_path: str | None = None
    overrides: dict = field(default_factory=dict)
    notifier: Notifier = field(default_factory=Notifier)
    clock: object = time.monotonic

    def __post_init__(self) -> None:
        s = self.config.supervisor
        self.policy = RestartPolicy(s.intensity, s.period_s)
        self.store = serves_store(self.config)
        self.compute = compute_count(self.config)
        self.cache_actor = self.store and self.config.cache.bytes is not None
        self.children = []
        if self.cache_actor:
            self.children.append(Child("cache", 0))
            self.children += [Child("io", i) for i in range(self.config.io.count)]
        self.children.append(Child("engine", 0))
        self.children += [Child("compute", i) for i in range(self.compute)]
        self.children.append(Child("api", 0))
        # eventfds the engine wakes compute workers with (one per slot, for workers added by
        # a reload too) and they answer on; inherited by engine and workers
        slots = min(MAX_WORKERS, max(self.compute, os.cpu_count() or 1, 4))
        self.go_fds = [os.eventfd(0) for _ in range(slots)]
        self.done_fd = os.eventfd(0)
        self.codec = Codec("supervisor.0")
        self.state = "starting"
        self._signals: list[int] = []
        self._announced_ready = False

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> int:
        self.run_dir = make_run_dir(self.config.supervisor.runtime_dir)
        context = zmq.Context()
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted actor takes its identity over
        self.sock.bind(endpoint(self.run_dir, "supervisor"))
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(wake_r.fileno(), zmq.POLLIN)
        log.info("event=starting run_dir=%s", self.run_dir)
        try:
            for child in self.children:
                self._start(child)
            return self._loop(poller, wake_r)
        except Escalation as err:
            log.error("event=escalate %s", err)
            print(f"mer: error: {err}", file=sys.stderr)
            return 1
        finally:
            self._stop_all()
            signal.set_wakeup_fd(-1)
            context.destroy(linger=0)
            wake_r.close()
            wake_w.close()
            for fd in [*self.go_fds, self.done_fd]:
                os.close(fd)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            remove_owned(Owner.current())  # the expert arena outlives cache restarts, not us

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _loop(self, poller: zmq.Poller, wake: socket.socket) -> int:
        tick = self.config.supervisor.heartbeat_s / 2
        next_watchdog = 0.0
        drain_until: float | None = None
        while True:
            events = dict(poller.poll(int(tick * 1000)))
            if wake.fileno() in events:
                with contextlib.suppress(BlockingIOError):
                    while wake.recv(64):
                        pass
            if self.sock in events:
                self._receive()
            while self._signals:
                signum = self._signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT) and drain_until is None:
                    drain_until = self._drain()
                elif signum == signal.SIGHUP:
                    self._reload()
            now = self.clock()
            self._reap(now)
            self._check_hung(now)
            if drain_until is not None:
                idle = all(
                    c.proc is None or (c.beat_since_drain and not c.busy) for c in self.children
                )
                if idle or now >= drain_until:
                    log.info("event=drained timed_out=%s", not idle)
                    return 0
            if self.state == "starting" and all(c.ready for c in self._serving()):
                self.state = "serving"
                if not self._announced_ready:
                    self._announced_ready = True
                    self.notifier.ready(self._status_line())
                    log.info("event=serving")
            elif self.state == "starting" and self.notifier.enabled:
                self.notifier.extend(self.config.supervisor.start_timeout_s)
            if now >= next_watchdog and self.notifier.watchdog_s:
                next_watchdog = now + self.notifier.watchdog_s / 2
                if self._all_fresh(now):
                    self.notifier.watchdog()

    # -- messages ---------------------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            try:
                peer, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = Codec.decode(frame)
            except ProtocolError as err:
                log.warning("event=bad_message error=%s", err)
                continue
            body = message.body
            if isinstance(body, StatusQuery):
                now = self.clock()
                status = Status(self.state, [c.describe(now) for c in self.children])
                self.sock.send_multipart([peer, self.codec.encode(status, message.msg_id)])
                continue
            child = self._child(message.sender)
            if child is None or message.incarnation != child.incarnation:
                continue  # a message from a dead incarnation
            if isinstance(body, Heartbeat):
                child.last_beat = self.clock()
                child.busy = body.busy
                child.beat_since_drain = self.state == "draining"
            elif isinstance(body, Ready):
                child.ready = True
                child.last_beat = self.clock()
                log.info("event=child_ready actor=%s pid=%d", child.name, body.pid)

    def _child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)

    def _serving(self) -> list[Child]:
        return [c for c in self.children if not c.retiring]

    # -- children ---------------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        child.incarnation = new_incarnation()
        share = child.kind in ("engine", "compute")  # they hand each other the products
        fds = {"go": self.go_fds, "done": self.done_fd, "workers": self.compute}
        spec = actor_env(
            self.config,
            child.kind,
            child.index,
            child.incarnation,
            self.run_dir,
            fds if share else None,
            {"cache_actor": self.cache_actor, "store": self.store},
        )
        child.proc = subprocess.Popen(
            [sys.executable, "-m", f"mer.actors.{child.kind}"],
            env={**os.environ, ENV: spec},
            preexec_fn=_die_with_parent,
            stdin=subprocess.DEVNULL,
            pass_fds=[*self.go_fds, self.done_fd] if share else (),
        )
        child.started = self.clock()
        child.ready = False
        child.last_beat = 0.0
        if self.state == "serving":
            self.state = "starting"
        log.info(
            "event=child_started actor=%s pid=%d incarnation=%s",
            child.name,
            child.proc.pid,
            child.incarnation,
        )

    def _reap(self, now: float) -> None:
        for child in list(self.children):
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            if child.retiring:
                log.info("event=child_retired actor=%s pid=%d", child.name, child.proc.pid)
                self.children.remove(child)
                continue
            log.warning(
                "event=child_exited actor=%s pid=%d code=%s", child.name, child.proc.pid, code
            )
            child.proc = None
            self._restart(child, now, f"exited with code {code}")

    def _check_hung(self, now: float) -> None:
        s = self.config.supervisor
        for child in list(self.children):
            if child.proc is None:
                continue
            silent = now - (child.last_beat or child.started)
            limit = s.heartbeat_timeout_s if child.ready else s.start_timeout_s
            if silent > limit:
                log.warning(
                    "event=child_hung actor=%s pid=%d silent_s=%.1f",
                    child.name,
                    child.proc.pid,
                    silent,
                )
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()
                child.proc = None
                if child.retiring:
                    self.children.remove(child)
                    continue
                self._restart(child, now, f"hung (no heartbeat for {silent:.0f} s)")

    def _restart(self, child: Child, now: float, why: str) -> None:
        if not self.policy.allow(now):
            s = self.config.supervisor
            raise Escalation(
                f"actor {child.name} {why}, and more than {s.intensity} restarts within "
                f"{s.period_s:g} s: giving up"
            )
        child.restarts += 1
        log.info(
            "event=restart actor=%s reason=%s restarts=%d",
            child.name,
            why.replace(" ", "_"),
            child.restarts,
        )
        self._start(child)

    def _stop_all(self) -> None:
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def _all_fresh(self, now: float) -> bool:
        timeout = self.config.supervisor.heartbeat_timeout_s
        return all(
            c.proc is not None and c.ready and now - c.last_beat < timeout for c in self._serving()
        )

    # -- signals ----------------------------------------------------------------------------
    def _drain(self) -> float:
        self.notifier.stopping()
        self.state = "draining"
        timeout = self.config.supervisor.drain_timeout_s
        log.info("event=draining timeout_s=%g", timeout)
        for child in self.children:
            if child.proc is not None:
                self._send(child, Drain(timeout))
        return self.clock() + timeout

    def _send(self, child: Child, body) -> None:
        # Actors hear from the supervisor on their DEALER: routed by their socket identity,
        # which is the sender name they set.
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart([child.name.encode(), self.codec.encode(body)], zmq.NOBLOCK)

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            fresh = ServeConfig.load(self.config_path).override(**self.overrides)
        except MerError as err:
            log.error("event=reload_failed error=%s", err)
            self.notifier.ready(self._status_line())
            return
        changed = _changes(self.config, fresh)
        live = {"log.level"}
        if self.store:
            live.add("compute.count")
        if self.cache_actor and fresh.cache.bytes is not None:
            live |= {"io.count", "cache.bytes", "cache.pin_fraction"}
        for key in sorted(set(changed) - live):
            log.warning("event=reload_not_live key=%s (restart the service to change it)", key)
        # what changes now; the rest waits for a restart (children started later get it too)
        self.config = self.config.override(
            **{key: value for key, value in changed.items() if key in live}
        )
        if "log.level" in changed:
            logging.getLogger().setLevel(fresh.log.level.upper())
            for child in self._serving():
                self._send(child, Reconfigure({"log_level": fresh.log.level}))
        if "compute.count" in changed and "compute.count" in live:
            self.compute = self._resize("compute", compute_count(self.config))
        settings: dict = {}
        if "io.count" in changed and "io.count" in live:
            settings["io"] = self._resize("io", self.config.io.count)
        if "cache.bytes" in changed and "cache.bytes" in live:
            settings["cache_bytes"] = self.config.cache.bytes
        if "cache.pin_fraction" in changed and "cache.pin_fraction" in live:
            settings["pin_fraction"] = self.config.cache.pin_fraction
        cache = self._child("cache.0")
        if settings and cache is not None:
            self._send(cache, Reconfigure(settings))
        log.info("event=reloaded changed=%s", ",".join(sorted(changed)) or "nothing")
        self.notifier.ready(self._status_line())

    def _resize(self, kind: str, count: int) -> int:
        """Start or retire children of `kind` so that `count` serve; the count reached."""
        if kind == "compute":
            count = min(count, len(self.go_fds))  # one eventfd per worker, made at start
        running = [c for c in self.children if c.kind == kind and not c.retiring]
        for child in running[count:]:
            child.retiring = True
            if child.proc is not None:
                child.proc.terminate()  # it finishes what it has, then exits
            log.info("event=child_retiring actor=%s", child.name)
        for index in range(len(running), count):
            child = Child(kind, index)
            at = max(i for i, c in enumerate(self.children) if c.kind in (kind, "engine")) + 1
            self.children.insert(at, child)
            self._start(child)
        return count

    def _status_line(self) -> str:
        return f"serving {self.config.model or 'the bundled model'}: " + ", ".join(
            f"{c.name} pid {c.proc.pid if c.proc else '-'}" for c in self.children
        )


def serves_store(config: ServeConfig) -> bool:
    """The model is a mer store (its files can be shared by every actor)."""
    from mer.store.format import is_store

    return bool(config.model) and is_store(Path(config.model))


def compute_count(config: ServeConfig) -> int:
    """Compute workers to run: the configured count (default: one per core), or none when the
    model is not a mer store (workers share a store's memory-mapped weights; other formats
    would be repacked in every process)."""
    wanted = config.compute.count if config.compute.count is not None else os.cpu_count() or 1
    if wanted and not serves_store(config):
        log.warning(
            "event=compute_workers_off reason=not_a_store (run `mer convert` to share "
            "the weights between workers; the engine computes everything)"
        )
        return 0
    return wanted


def _changes(old: ServeConfig, new: ServeConfig) -> dict[str, object]:
    from dataclasses import asdict

    a, b = asdict(old), asdict(new)
    out = {}
    for section, values in b.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if a[section][key] != value:
                    out[f"{section}.{key}"] = value
        elif a[section] != values:
            out[section] = values
    return out


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Children ignore the terminal's SIGINT: the supervisor decides when they stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_run_dir(base: str | None) -> Path:
    """A fresh directory, mode 0700, for this run's sockets; those of dead runs are removed."""
    root = Path(
        base
        or os.environ.get("RUNTIME_DIRECTORY")
        or Path(tempfile.gettempdir()) / f"mer-{os.getuid()}"
    )
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for old in root.glob("run.*.*"):
        parts = old.name.split(".")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            if not Owner(int(parts[1]), int(parts[2])).alive():
                shutil.rmtree(old, ignore_errors=True)
    me = Owner.current()
    path = root / f"run.{me.pid}.{me.start}"
    path.mkdir(mode=0o700)
    return path
