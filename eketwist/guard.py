"""Defences against password guessing and connection floods, as bookkeeping with an injected
clock: no I/O, so it can be tested and measured in simulated time.

- Guessing: failed authentications are counted per source address and per username within a
  window. Each failure makes the server wait longer before answering the next HELLO from that
  source or for that user (exponential, capped; the user's cap bounds how long an attacker can
  delay a legitimate user elsewhere). Too many failures from one source lock it out for a while.
  Unknown usernames are counted exactly like known ones, so the delay reveals nothing.
- Floods: a cap on connections per source and on all connections, and OpenSSH's MaxStartups
  for handshakes in progress (start:rate:full - beyond `start`, new connections are dropped
  with a probability rising from rate% to 100% at `full`).
"""

import collections
import random
from dataclasses import dataclass


@dataclass
class Policy:
    failure_window: float = 600.0
    max_source_failures: int = 10
    source_lockout: float = 900.0
    delay_base: float = 0.5
    max_source_delay: float = 10.0
    max_user_delay: float = 5.0
    startups_start: int = 1500
    startups_rate: int = 30
    startups_full: int = 3000
    max_per_source: int = 64
    max_connections: int = 8000
    # Bounds the bookkeeping itself: an attacker with many addresses or names cannot grow it.
    max_tracked: int = 100_000

    def check(self):
        problems = []
        if not 0 < self.startups_start <= self.startups_full:
            problems.append("max-startups needs 0 < start <= full")
        if not 0 <= self.startups_rate <= 100:
            problems.append("max-startups rate is a percentage")
        for name in ("max_source_failures", "max_per_source", "max_connections", "max_tracked"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        for name in ("failure_window", "source_lockout", "delay_base", "max_source_delay", "max_user_delay"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must not be negative")
        return problems


class Refused(Exception):
    """A connection the guard turns away; `quiet` ones are dropped without a word (floods)."""

    def __init__(self, reason, *, quiet=False, log_key=None):
        super().__init__(reason)
        self.reason = reason
        self.quiet = quiet
        self.log_key = log_key


class _Failures:
    """Failure times per key within the window, least recently touched first, bounded."""

    def __init__(self, policy):
        self._policy = policy
        self._times = collections.OrderedDict()

    def __len__(self):
        return len(self._times)

    def count(self, key, now):
        times = self._times.get(key)
        if not times:
            return 0
        horizon = now - self._policy.failure_window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._times[key]
            return 0
        return len(times)

    def add(self, key, now):
        times = self._times.get(key)
        if times is None:
            # Enough history to reach the lockout threshold, no more.
            times = self._times[key] = collections.deque(maxlen=self._policy.max_source_failures + 1)
        times.append(now)
        self._times.move_to_end(key)
        while len(self._times) > self._policy.max_tracked:
            self._times.popitem(last=False)
        return self.count(key, now)

    def clear(self, key):
        self._times.pop(key, None)


class Guard:
    def __init__(self, policy=None, clock=None, rng=None):
        from twisted.internet import reactor

        self.policy = policy or Policy()
        self.clock = clock or reactor
        self._random = rng or random.random
        self._by_source = _Failures(self.policy)
        self._by_user = _Failures(self.policy)
        self._locked_until = collections.OrderedDict()
        self._per_source = collections.Counter()
        self.connections = 0
        self.handshakes = 0
        self.refused = collections.Counter()

    # -- connections

    def admit(self, source):
        """Account for a new connection from `source`, or raise Refused."""
        self.admit_connection()
        try:
            self.admit_source(source)
        except Refused:
            self.closed(None, in_handshake=True)
            raise

    def admit_connection(self):
        """The caps on all connections, checked when one is accepted (raises Refused)."""
        policy = self.policy
        if self.connections >= policy.max_connections:
            self.refused["server-full"] += 1
            raise Refused("the server has too many connections; try again later", log_key=("server-full",))
        if self.handshakes >= policy.startups_start:
            if self.handshakes >= policy.startups_full:
                drop = 1.0
            else:
                span = policy.startups_full - policy.startups_start
                extra = (self.handshakes - policy.startups_start) / span
                drop = policy.startups_rate / 100 + (1 - policy.startups_rate / 100) * extra
            if self._random() < drop:
                self.refused["startups"] += 1
                raise Refused("too many handshakes in progress", quiet=True, log_key=("startups",))
        self.connections += 1
        self.handshakes += 1

    def admit_source(self, source):
        """The limits per address, checked once the client's address is known (behind a
        proxy, from the PROXY header that precedes its first bytes). Raises Refused."""
        now = self.clock.seconds()
        until = self._locked_until.get(source)
        if until is not None:
            if until > now:
                self.refused["locked-out"] += 1
                raise Refused(
                    f"too many failed logins from your address; try again in {int(until - now) + 1} s",
                    log_key=("locked-out", source),
                )
            del self._locked_until[source]
        if self._per_source[source] >= self.policy.max_per_source:
            self.refused["per-source"] += 1
            raise Refused("too many connections from your address", log_key=("per-source", source))
        self._per_source[source] += 1

    def authenticated(self, source):
        """The connection from `source` left the handshake (by succeeding)."""
        self.handshakes -= 1

    def closed(self, source, in_handshake):
        """A connection ended; `source` None if its address was never admitted."""
        self.connections -= 1
        if in_handshake:
            self.handshakes -= 1
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def open_sources(self):
        return len(self._per_source)

    # -- guessing

    def _delay(self, failures, cap):
        if failures <= 0:
            return 0.0
        return min(self.policy.delay_base * 2 ** (failures - 1), cap)

    def delay_before_answer(self, source, user):
        """Seconds to wait before answering a HELLO from `source` for `user`."""
        now = self.clock.seconds()
        return max(
            self._delay(self._by_source.count(source, now), self.policy.max_source_delay),
            self._delay(self._by_user.count(user, now), self.policy.max_user_delay),
        )

    def failed(self, source, user):
        """Record a failed authentication; returns the lockout in seconds if it starts now."""
        now = self.clock.seconds()
        self._by_user.add(user, now)
        if self._by_source.add(source, now) >= self.policy.max_source_failures:
            self._by_source.clear(source)
            self._locked_until[source] = now + self.policy.source_lockout
            self._locked_until.move_to_end(source)
            while len(self._locked_until) > self.policy.max_tracked:
                self._locked_until.popitem(last=False)
            return self.policy.source_lockout
        return None

    def succeeded(self, source, user):
        self._by_source.clear(source)
        self._by_user.clear(user)

    def tracked(self):
        return len(self._by_source) + len(self._by_user) + len(self._locked_until)


class LogLimiter:
    """Lets one message per key through per interval, counting the ones it holds back."""

    def __init__(self, clock, interval=60.0, max_keys=10_000):
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._last = collections.OrderedDict()
        self.suppressed = collections.Counter()

    def allow(self, key):
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] += 1
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True

    def held_back(self, key):
        return self.suppressed.pop(key, 0)
