"""Who may ask, and who goes next: API keys mapped to classes, a bounded queue per class, and
weighted round-robin among the classes for the engine's places.

The engine runs at most `capacity` generations at once (its `max_seqs`); the api keeps the
rest waiting here, so that the order in which waiting requests start is decided by class
weight and not by arrival alone. Within a class, first come first served. Among classes,
smooth weighted round-robin (as nginx balances upstreams): each pick adds every waiting
class's weight to its credit, takes the class with the most credit (ties: the class listed
first), and charges it the sum of the waiting classes' weights — so classes weighted 3:1
start 3:1 while both have requests waiting, interleaved rather than in bursts, and a class
with nothing waiting neither gains nor loses credit.

A request of n choices takes n places. One larger than the whole capacity starts when the
engine is otherwise idle. When `max_waiting` requests already wait, a new one is refused
(429, with a Retry-After estimated from how fast places have been freeing up).
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mer.http.openai import ApiError


@dataclass
class Waiting:
    item: Any
    places: int
    cls: str
    since: float = field(default_factory=time.monotonic)


class Admission:
    """Keys, classes, the queue and the engine's places (module docstring)."""

    def __init__(
        self,
        capacity: int,
        max_waiting: int,
        weights: dict[str, int] | None = None,
        keys: dict[str, str] | None = None,
        default_class: str = "default",
    ) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.keys = dict(keys or {})
        self.weights = dict(weights or {})
        self.weights.setdefault(default_class, 1)
        for cls in self.keys.values():
            self.weights.setdefault(cls, 1)
        self.default_class = default_class
        self.queues: dict[str, deque[Waiting]] = {c: deque() for c in self.weights}
        self.credit: dict[str, int] = dict.fromkeys(self.weights, 0)
        self.in_flight = 0  # places taken by running requests
        self.admitted: dict[str, int] = dict.fromkeys(self.weights, 0)
        self._freed: deque[float] = deque(maxlen=64)  # when places were freed, recently

    # -- who asks ------------------------------------------------------------------------------
    def classify(self, authorization: str | None) -> str:
        """The class of a request with this Authorization header. With keys configured, a
        request needs one of them (401 otherwise); without, every request is the default
        class."""
        if not self.keys:
            return self.default_class
        if not authorization:
            raise ApiError(
                401,
                "this server needs an API key: send 'Authorization: Bearer KEY'",
                kind="authentication_error",
                code="missing_api_key",
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer":
            for known, cls in self.keys.items():
                if hmac.compare_digest(known.encode(), key.encode()):
                    return cls
        raise ApiError(
            401, "the API key is not valid", kind="authentication_error", code="invalid_api_key"
        )

    # -- the queue -------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def offer(self, item: Any, cls: str, places: int = 1) -> None:
        """Queue `item`; 429 when the queue is full."""
        if self.waiting >= self.max_waiting:
            raise ApiError(
                429,
                f"the server is busy: {self.waiting} requests are waiting; retry later",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            )
        self.queues[cls].append(Waiting(item, places, cls))

    def withdraw(self, item: Any) -> bool:
        """Take a waiting `item` out (its client went away); False if it is not waiting."""
        for queue in self.queues.values():
            for entry in queue:
                if entry.item is item:
                    queue.remove(entry)
                    return True
        return False

    def admit(self) -> list[Waiting]:
        """The waiting requests that start now, in order, their places taken."""
        started = []
        while True:
            ready = [c for c, q in self.queues.items() if q]
            if not ready:
                return started
            total = sum(self.weights[c] for c in ready)
            for c in ready:
                self.credit[c] += self.weights[c]
            best = max(ready, key=lambda c: self.credit[c])  # first listed wins ties
            head = self.queues[best][0]
            if self.in_flight and self.in_flight + head.places > self.capacity:
                for c in ready:  # undo: nobody was picked
                    self.credit[c] -= self.weights[c]
                return started
            self.credit[best] -= total
            self.queues[best].popleft()
            self.in_flight += head.places
            self.admitted[best] += 1
            started.append(head)

    def release(self, places: int) -> None:
        """A running request finished, freeing its places."""
        self.in_flight = max(0, self.in_flight - places)
        self._freed.append(time.monotonic())

    def retry_after(self) -> int:
        """Seconds until a place is likely free for one more waiting request: the waiting
        ahead of it at the rate places have been freed lately (at least 1)."""
        if len(self._freed) < 2:
            return 1
        span = self._freed[-1] - self._freed[0]
        rate = (len(self._freed) - 1) / span if span > 0 else 0.0
        if rate <= 0:
            return 1
        return max(1, math.ceil((self.waiting + 1) / rate))
