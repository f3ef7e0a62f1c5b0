"""Per-session rate limiting: token buckets for messages and bytes.

A bucket holds up to ``rate * burst_sec`` tokens and refills at ``rate`` per second. A
message passes while the bucket is not empty and then costs its size, so the bucket may
go into debt: a message larger than the bucket still passes when the bucket is full, and
the average rate holds. Refusals are *violations*; ``max_violations`` of them within
``window_sec`` mean persistent abuse and the caller closes the session (1008).
"""

from __future__ import annotations

import collections
import time


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = float(rate)
        self.capacity = max(float(capacity), 1.0)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, cost: float, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.stamp = now
        if tokens <= 0:
            self.tokens = tokens
            return False
        self.tokens = tokens - cost
        return True


class SessionRateLimiter:
    """Both buckets of one session, and its recent violations."""

    __slots__ = ("_msgs", "_bytes", "_violations", "_max_violations", "_window", "_clock")

    def __init__(self, msgs_per_sec=0.0, bytes_per_sec=0.0, burst_sec=1.0, max_violations=10,
                 window_sec=10.0, clock=time.monotonic):
        now = clock()
        self._msgs = TokenBucket(msgs_per_sec, msgs_per_sec * burst_sec, now) if msgs_per_sec else None
        self._bytes = TokenBucket(bytes_per_sec, bytes_per_sec * burst_sec, now) if bytes_per_sec else None
        self._violations = collections.deque()
        self._max_violations = max_violations
        self._window = window_sec
        self._clock = clock

    @classmethod
    def from_config(cls, config) -> "SessionRateLimiter | None":
        if not (config.rate_limit_msgs_per_sec or config.rate_limit_bytes_per_sec):
            return None
        return cls(config.rate_limit_msgs_per_sec, config.rate_limit_bytes_per_sec, config.rate_limit_burst_sec,
                   config.rate_limit_max_violations, config.rate_limit_window_sec)

    def allow(self, size: int) -> bool:
        now = self._clock()
        msgs = self._msgs
        if msgs is not None and not msgs.take(1, now):
            return False
        nbytes = self._bytes
        if nbytes is not None and not nbytes.take(size, now):
            if msgs is not None:
                msgs.tokens += 1  # refund: the message did not pass
            return False
        return True

    def violation(self) -> bool:
        """Record a refused message; True when the session should be closed for abuse."""
        if not self._max_violations:
            return False
        now = self._clock()
        v = self._violations
        v.append(now)
        horizon = now - self._window
        while v and v[0] < horizon:
            v.popleft()
        return len(v) >= self._max_violations
