"""A token bucket, sans I/O: the per-connection command rate limit."""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    ALLOW = "allow"  # act on the command
    REFUSE = "refuse"  # answer `rate_limited`, do not act
    CLOSE = "close"  # the client ignores the refusals: end the connection


class TokenBucket:
    """Holds up to `burst` tokens and gains `rate` per second; each command takes one.

    A command finding less than one token is refused, and still takes its token: the bucket
    goes into debt, so a client that keeps sending faster than `rate` stays refused until
    it pauses long enough to pay it back. Once the debt passes `burst` (more than `burst`
    refusals without such a pause) the verdict is CLOSE. Pure; `now` is monotonic seconds.
    """

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> Verdict:
        """Take one token for a command arriving at `now`; say what to do with it."""
        elapsed = max(0.0, now - self._updated)  # a clock never runs back, but be safe
        self._updated = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate) - 1.0
        if self._tokens >= 0.0:
            return Verdict.ALLOW
        if self._tokens < -self.burst:
            return Verdict.CLOSE
        return Verdict.REFUSE
