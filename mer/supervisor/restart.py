"""When to restart and when to give up: OTP's one_for_one with intensity and period.

A child that exits or hangs is restarted on its own (one_for_one). Restarts are counted over
a sliding window of `period_s` seconds; the restart that would make them more than
`intensity` is refused, and the supervisor escalates (exits non-zero, naming the child), so
that something above it (systemd's Restart=on-failure) can start afresh. Pure: the clock is
passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    intensity: int
    period_s: float
    _times: deque = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if the window has room; False means escalate."""
        while self._times and now - self._times[0] > self.period_s:
            self._times.popleft()
        if len(self._times) >= self.intensity:
            return False
        self._times.append(now)
        return True
