"""Defences against password guessing and connection floods, as bookkeeping with an injected
clock: no I/O, so it can be tested and measured in simulated time.

- Guessing: every guess the server answers is counted, per source address and per username,
  within a window: from the moment the server sends its share the client can check its guess,
  so the guess holds one of its address's few slots until it ends, and any ending but a valid
  confirmation records a failure.
  Each failure makes the server wait longer before answering the next HELLO from that source or
  for that user (exponential, capped; the user's cap bounds how long an attacker can delay a
  legitimate user elsewhere). Too many failures from one source lock it out for a while.
  A success takes back only what that address did to that name (its owner's typos); the
  name's count is never cleared by a success, so a prober cannot see its owner log in, and
  one's own account cannot be used to wipe the guesses made against others.
  Unknown usernames are counted exactly like known ones, so the delay reveals nothing.
- Handshake work: each source has a budget of handshakes per second (a token bucket); beyond
  it, answers wait, so one address cannot take the daemon's handshake capacity.
- Floods: a cap on connections per source and on all connections, and OpenSSH's MaxStartups
  for handshakes in progress (start:rate:full - beyond `start`, new connections are dropped
  with a probability rising from rate% to 100% at `full`).
"""

import collections
import ipaddress
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
    handshake_rate: float = 20.0  # per source, per second (sustained)
    handshake_burst: int = 40  # per source, at once
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
        for name in ("max_source_failures", "max_per_source", "max_connections", "max_tracked", "handshake_burst"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        for name in ("failure_window", "source_lockout", "delay_base", "max_source_delay", "max_user_delay"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must not be negative")
        if not self.handshake_rate > 0:
            problems.append("handshake-rate must be positive")
        return problems


# The longest a handshake waits for its address's budget; beyond, it is turned away.
MAX_HANDSHAKE_WAIT = 5.0


def source_key(host):
    """What per-address limits count by: an IPv4 address (also when mapped into IPv6), or an
    IPv6 address's /64, which one host or site gets whole (counting each of its 2^64
    addresses apart would give it that many budgets, lockouts and connection caps)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP address (a UNIX socket): as it is
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class Refused(Exception):
    """A connection the guard turns away; `quiet` ones are dropped without a word (floods)."""

    def __init__(self, reason, *, quiet=False, log_key=None, locked_out=False, retry_after=None):
        super().__init__(reason)
        self.reason = reason
        self.quiet = quiet
        self.log_key = log_key
        self.locked_out = locked_out
        self.retry_after = retry_after


class _Failures:
    """Failures per key within the window, least recently touched first, bounded. Each failure
    remembers the other side of its pair (the name for a source, the source for a name), so
    that a success can take back exactly the failures of that pair."""

    def __init__(self, policy):
        self._policy = policy
        self._times = collections.OrderedDict()  # key -> deque of (time, other key)

    def __len__(self):
        return len(self._times)

    def count(self, key, now):
        times = self._times.get(key)
        if not times:
            return 0
        horizon = now - self._policy.failure_window
        while times and times[0][0] <= horizon:
            times.popleft()
        if not times:
            del self._times[key]
            return 0
        return len(times)

    def add(self, key, other, now):
        times = self._times.get(key)
        if times is None:
            # Enough history to reach the lockout threshold, no more.
            times = self._times[key] = collections.deque(maxlen=self._policy.max_source_failures + 1)
        times.append((now, other))
        self._times.move_to_end(key)
        while len(self._times) > self._policy.max_tracked:
            self._times.popitem(last=False)
        return self.count(key, now)

    def take_back(self, key, other):
        """Forget the failures of the pair (key, other)."""
        times = self._times.get(key)
        if times:
            kept = [(t, o) for t, o in times if o != other]
            times.clear()
            times.extend(kept)
            if not times:
                del self._times[key]

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
        self._in_flight = {}  # source -> guesses answered and not yet settled
        self._slot_waiters = {}  # source -> callbacks waiting for one of its slots
        self._handshake_due = collections.OrderedDict()  # source -> token bucket's next free time
        self._per_source: "collections.Counter[str]" = collections.Counter()
        self.connections = 0
        self.handshakes = 0
        self.refused: "collections.Counter[str]" = collections.Counter()

    # -- connections

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
        """The limits per address, checked when a connection is accepted (behind a proxy,
        once its PROXY header has given the client's address). Raises Refused."""
        self.check_source(source)
        if source in self._locked_until:  # expired
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

    # -- guessing

    def _delay(self, failures, cap):
        if failures <= 0:
            return 0.0
        # The exponent is capped: any --max-failures stays a finite float (2**1024 is not).
        return min(self.policy.delay_base * 2.0 ** min(failures - 1, 64), cap)

    def check_source(self, source):
        """Raise Refused if `source` is locked out now (a connection opened before the lockout
        began must not get its guess answered either)."""
        until = self._locked_until.get(source)
        if until is not None and until > self.clock.seconds():
            self.refused["locked-out"] += 1
            left = until - self.clock.seconds()
            raise Refused(
                f"too many failed logins from your address; try again in {int(left) + 1} s",
                log_key=("locked-out", source), locked_out=True, retry_after=left,
            )

    def handshake_delay(self, source):
        """Seconds to wait before doing a handshake's work for `source`, within its budget
        (handshake_rate per second, handshake_burst at once): a token bucket kept as the time
        its next token is free (GCRA). Each call spends one token. Past MAX_HANDSHAKE_WAIT of
        waiting, Refused, and no token spent: a source cannot run up a debt that keeps the
        others at its address (behind one NAT) waiting long after it stopped."""
        policy = self.policy
        now = self.clock.seconds()
        interval = 1.0 / policy.handshake_rate
        due = max(self._handshake_due.get(source, now), now)
        delay = max(0.0, due - now - (policy.handshake_burst - 1) * interval)
        if delay > MAX_HANDSHAKE_WAIT:
            self.refused["handshake-budget"] += 1
            raise Refused("too many handshakes from your address; try again shortly",
                          log_key=("handshake-budget", source))
        self._handshake_due[source] = due + interval
        self._handshake_due.move_to_end(source)
        while len(self._handshake_due) > policy.max_tracked:
            self._handshake_due.popitem(last=False)
        return delay

    def delay_before_answer(self, source, user):
        """Seconds to wait before answering a HELLO from `source` for `user`."""
        now = self.clock.seconds()
        return max(
            self._delay(self._by_source.count(source, now), self.policy.max_source_delay),
            self._delay(self._by_user.count(user, now), self.policy.max_user_delay),
        )

    def delay_after_failure(self, source, user):
        """What delay_before_answer would be after one more failure of `source` on `user`."""
        now = self.clock.seconds()
        return max(
            self._delay(self._by_source.count(source, now) + 1, self.policy.max_source_delay),
            self._delay(self._by_user.count(user, now) + 1, self.policy.max_user_delay),
        )

    # A guess is answered (the server's share sent) only in one of its address's slots: an
    # address may have at most max_source_failures minus its failures in the window answered
    # and not yet settled. A valid confirmation frees the slot; any other ending frees it and
    # records a failure (of the address, and of the name). So every guess answered counts,
    # parallel connections cannot outrun the lockout, and yet logins in flight are not
    # failures: they neither lock out a busy address nor slow its next logins, nor show on
    # the name to anyone (a name whose delay rose during every login would tell probers that
    # it exists and when its owner logs in).

    def take_guess_slot(self, source):
        """True, and a slot taken, if `source` may have one more guess answered now."""
        in_flight = self._in_flight.get(source, 0)
        if in_flight + self._by_source.count(source, self.clock.seconds()) >= self.policy.max_source_failures:
            return False
        self._in_flight[source] = in_flight + 1
        return True

    def wait_for_guess_slot(self, source, callback):
        """Call `callback()` (on a later reactor turn) when one of `source`'s slots frees."""
        self._slot_waiters.setdefault(source, collections.deque()).append(callback)

    def stop_waiting(self, source, callback):
        waiters = self._slot_waiters.get(source)
        if waiters is not None and callback in waiters:
            waiters.remove(callback)
            if not waiters:
                del self._slot_waiters[source]

    def _free_slot(self, source):
        in_flight = self._in_flight.get(source, 0) - 1
        if in_flight > 0:
            self._in_flight[source] = in_flight
        else:
            self._in_flight.pop(source, None)
        self.wake_next_waiter(source)

    def wake_next_waiter(self, source):
        """A slot of `source` is free: the next connection waiting for one hears (also when
        the one woken before was closing and passes the wake on)."""
        waiters = self._slot_waiters.get(source)
        if waiters:
            callback = waiters.popleft()
            if not waiters:
                del self._slot_waiters[source]
            self.clock.callLater(0, callback)

    def guess_abandoned(self, source):
        """A slot taken for a guess that was never answered (the share was invalid)."""
        self._free_slot(source)

    def guess_failed(self, source, user):
        """A guess answered in a slot ended without a valid confirmation; returns the lockout
        in seconds if it starts now, else None."""
        lockout = self.failed(source, user)
        self._free_slot(source)
        return lockout

    def guess_confirmed(self, source, user):
        """A guess answered in a slot was confirmed: the slot frees, no failure is recorded,
        and the address's earlier failures on this name (its owner's typos) are taken back."""
        self.succeeded(source, user)
        self._free_slot(source)

    def failed(self, source, user):
        """Record a failed authentication; returns the lockout in seconds if it starts now."""
        now = self.clock.seconds()
        self._by_user.add(user, source, now)
        if self._by_source.add(source, user, now) >= self.policy.max_source_failures:
            # The failures stay counted: once the lockout ends, each failure still in the
            # window locks again.
            self._locked_until[source] = now + self.policy.source_lockout
            self._locked_until.move_to_end(source)
            while len(self._locked_until) > self.policy.max_tracked:
                self._locked_until.popitem(last=False)
            return self.policy.source_lockout
        return None

    def succeeded(self, source, user):
        """A valid confirmation from `source` for `user`: take back, on that address, its
        failures on this name (the owner's typos). The name's own count is left alone,
        whoever succeeds: a delay that dropped when its owner logged in would tell a prober
        that the name exists (only real names can succeed). Failures of this address on
        other names stay too, so that one's own account cannot wipe the guesses made at
        others."""
        self._by_source.take_back(source, user)


class LogLimiter:
    """Lets one message per key through per interval."""

    def __init__(self, clock, interval=60.0, max_keys=10_000):
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._last = collections.OrderedDict()

    def allow(self, key):
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True
