"""sd_notify: telling systemd how the service is doing, over $NOTIFY_SOCKET.

READY=1 once the model is loaded and every actor is up; STATUS= a line for `systemctl status`;
WATCHDOG=1 while every actor's heartbeat is fresh (and only then, so a hung actor that cannot
be replaced lets systemd's watchdog act); RELOADING=1 with MONOTONIC_USEC around a SIGHUP
reload, then READY=1; STOPPING=1 on SIGTERM; EXTEND_TIMEOUT_USEC while a slow start goes on.
Without $NOTIFY_SOCKET (not under systemd) every call does nothing.

Sending never stalls the supervisor: a datagram socket whose reader has fallen behind (its
queue holds only a few messages) would block `sendto`, so the routine messages (WATCHDOG,
STATUS, EXTEND_TIMEOUT_USEC) go without waiting and are dropped if the queue is full, and the
state changes (READY, RELOADING, STOPPING) wait at most a second.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = None
        self.watchdog_s: float | None = None
        self.dropped = 0
        if address:
            # An address starting with @ is in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            usec = os.environ.get("WATCHDOG_USEC")
            pid = os.environ.get("WATCHDOG_PID")
            if usec and (pid is None or int(pid) == os.getpid()):
                self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, wait: float = 0.0, **fields: object) -> bool:
        """Send KEY=value lines, e.g. send(READY=1, STATUS="serving"), waiting at most `wait`
        seconds for room in the receiver's queue. True if it was sent."""
        if self._address is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(wait)  # 0: non-blocking
            try:
                sock.sendto(text.encode(), self._address)
            except OSError:  # systemd gone or not reading (a full queue): nothing to tell
                self.dropped += 1
                return False
        return True

    def ready(self, status: str) -> None:
        self.send(1.0, READY=1, STATUS=status)

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send(1.0, RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> None:
        self.send(1.0, STOPPING=1)

    def extend(self, seconds: float) -> None:
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def status(self, text: str) -> None:
        self.send(STATUS=text)
