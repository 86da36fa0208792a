"""The guard's bookkeeping in simulated time: delays, lockouts, caps, bounded memory, and the
guessing rate the defaults allow."""

import pytest
from twisted.internet.task import Clock

from eketwist import guard


def make(**overrides):
    clock = Clock()
    return guard.Guard(guard.Policy(**overrides), clock, rng=lambda: 0.5), clock


def accept(g, source):
    """What the server asks of the guard when it accepts a connection from `source`
    (ServerProtocol.connectionMade): the caps on all connections, then the address's."""
    g.admit_connection()
    try:
        g.admit_source(source)
    except guard.Refused:
        g.closed(None, in_handshake=True)
        raise


def tracked(g):
    """Entries in the guard's bookkeeping of failures, lockouts and handshake budgets."""
    return len(g._by_source) + len(g._by_user) + len(g._locked_until) + len(g._handshake_due)


def test_delays_grow_per_failure_and_are_capped():
    g, clock = make()
    delays = []
    for _ in range(8):
        delays.append(g.delay_before_answer("10.0.0.1", "alice"))
        g.failed("10.0.0.1", "alice")
    assert delays == [0, 0.5, 1, 2, 4, 8, 10, 10]


def test_failures_expire_after_the_window():
    g, clock = make()
    for _ in range(3):
        g.failed("10.0.0.1", "alice")
    assert g.delay_before_answer("10.0.0.1", "alice") == 2
    clock.advance(601)
    assert g.delay_before_answer("10.0.0.1", "alice") == 0


def test_a_user_under_attack_is_delayed_at_most_the_user_bound():
    g, clock = make()
    for i in range(500):  # a botnet: every guess from a new address
        g.failed(f"10.1.{i // 250}.{i % 250}", "alice")
    assert g.delay_before_answer("192.0.2.7", "alice") == g.policy.max_user_delay == 5
    # Her owner logs in from elsewhere: the guessers still see the name's delay (a success
    # that cleared it would tell them she just logged in).
    g.succeeded("192.0.2.7", "alice")
    assert g.delay_before_answer("10.1.0.1", "alice") == 5


def test_a_success_takes_back_the_owners_typos_only():
    g, clock = make()
    prober, owner = "10.0.0.66", "192.0.2.7"
    for _ in range(3):
        g.failed(prober, "alice")
    g.failed(owner, "alice")
    g.failed(owner, "alice")  # the owner's typos
    assert g.delay_before_answer(owner, "alice") == 5  # 5 failures on the name: at the cap
    assert g.take_guess_slot(owner)
    g.guess_confirmed(owner, "alice")
    assert g.delay_before_answer(owner, "bob") == 0  # the owner's address: its typos taken back
    assert g.delay_before_answer(prober, "bob") == 2  # the prober's 3 remain on its address
    # The name's count is never cleared by a success: what a prober sees does not change.
    assert g.delay_before_answer("192.0.2.99", "alice") == 5


def test_ones_own_account_does_not_wipe_guesses_at_others():
    g, clock = make(max_source_failures=3)
    source = "10.0.0.66"
    g.failed(source, "victim")
    g.failed(source, "victim")
    assert g.take_guess_slot(source)
    g.guess_confirmed(source, "mallory")  # mallory's own, valid account
    assert g.delay_before_answer(source, "nobody") == 1  # the 2 guesses at victim still count
    assert g.failed(source, "victim") == 900  # the third guess at others: locked out


def test_an_address_has_as_many_guesses_in_flight_as_it_may_still_fail():
    """Parallel connections cannot outrun the lockout, yet logins in flight are no failures:
    a busy address is neither locked out nor slowed by them."""
    g, clock = make(max_source_failures=3, source_lockout=100)
    freed = []
    assert [g.take_guess_slot("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    g.wait_for_guess_slot("10.0.0.1", lambda: freed.append(True))
    assert g.delay_before_answer("10.0.0.1", "alice") == 0  # in flight: not failures
    g.guess_confirmed("10.0.0.1", "alice")  # one was the owner: its slot frees
    clock.advance(0)
    assert freed == [True] and g.take_guess_slot("10.0.0.1")
    assert g.guess_failed("10.0.0.1", "alice") is None
    assert g.guess_failed("10.0.0.1", "alice") is None
    assert not g.take_guess_slot("10.0.0.1")  # 2 failures and 1 in flight: no more
    assert g.guess_failed("10.0.0.1", "alice") == 100  # the third failure: locked out
    with pytest.raises(guard.Refused):
        g.check_source("10.0.0.1")


def test_any_max_failures_gives_a_finite_delay():
    g, clock = make(max_source_failures=5000, max_source_delay=10)
    for _ in range(2000):
        g.failed("10.0.0.1", "alice")
    assert g.delay_before_answer("10.0.0.1", "alice") == 10


def test_handshake_budget_per_source():
    g, clock = make(handshake_rate=10, handshake_burst=5)
    delays = [g.handshake_delay("10.0.0.1") for _ in range(8)]
    assert delays[:5] == [0, 0, 0, 0, 0]
    assert delays[5:] == pytest.approx([0.1, 0.2, 0.3])
    assert g.handshake_delay("10.0.0.2") == 0  # each source has its own budget
    clock.advance(10)
    assert g.handshake_delay("10.0.0.1") == 0  # refilled


def test_lockout_after_too_many_failures_then_release():
    g, clock = make(max_source_failures=3, source_lockout=100)
    accept(g, "10.0.0.1")
    assert g.failed("10.0.0.1", "a") is None
    assert g.failed("10.0.0.1", "b") is None
    assert g.failed("10.0.0.1", "c") == 100
    with pytest.raises(guard.Refused, match="too many failed logins"):
        accept(g, "10.0.0.1")
    accept(g, "10.0.0.2")  # others are not affected
    clock.advance(101)
    accept(g, "10.0.0.1")
    assert g.refused["locked-out"] == 1


def test_connection_caps_and_accounting():
    g, clock = make(max_per_source=2, max_connections=3)
    accept(g, "a")
    accept(g, "a")
    with pytest.raises(guard.Refused, match="from your address"):
        accept(g, "a")
    accept(g, "b")
    with pytest.raises(guard.Refused, match="too many connections"):
        accept(g, "c")
    g.closed("a", in_handshake=True)
    accept(g, "c")
    assert (g.connections, g.handshakes) == (3, 3)
    g.authenticated("c")
    g.closed("c", in_handshake=False)
    assert (g.connections, g.handshakes) == (2, 2)
    # Each address's count goes back to nothing as its connections close.
    g.closed("a", in_handshake=True)
    g.closed("b", in_handshake=True)
    accept(g, "a")
    accept(g, "a")
    with pytest.raises(guard.Refused, match="from your address"):
        accept(g, "a")


@pytest.mark.parametrize(
    "in_progress, draw, admitted",
    [(4, 0.0, True), (5, 0.29, False), (5, 0.31, True), (7, 0.57, False), (7, 0.59, True), (10, 0.999, False)],
)
def test_max_startups_random_early_drop(in_progress, draw, admitted):
    g = guard.Guard(guard.Policy(startups_start=5, startups_rate=30, startups_full=10), Clock(), rng=lambda: draw)
    g.handshakes = in_progress
    if admitted:
        accept(g, "x")
    else:
        with pytest.raises(guard.Refused) as refusal:
            accept(g, "x")
        assert refusal.value.quiet


def test_bookkeeping_is_bounded():
    g, clock = make(max_tracked=100)
    for i in range(5000):
        g.failed(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", f"user{i}")
        g.handshake_delay(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")
    assert tracked(g) <= 400


def test_log_limiter_lets_one_through_per_interval():
    clock = Clock()
    limiter = guard.LogLimiter(clock, interval=60)
    assert limiter.allow("k") and not limiter.allow("k") and not limiter.allow("k")
    clock.advance(61)
    assert limiter.allow("k")


def simulate_guesses(policy, minutes, sources):
    """An attacker guessing as fast as the policy allows, one connection at a time per source,
    rotating over `sources` addresses. Returns guesses made."""
    clock = Clock()
    g = guard.Guard(policy, clock)
    guesses = 0
    horizon = minutes * 60
    next_free = {f"198.51.100.{i}": 0.0 for i in range(sources)}
    while True:
        source = min(next_free, key=next_free.get)
        if max(next_free[source], clock.seconds()) >= horizon:
            return guesses
        clock.advance(max(0.0, next_free[source] - clock.seconds()))
        try:
            accept(g, source)
        except guard.Refused:
            next_free[source] = clock.seconds() + 1  # try again a second later
            continue
        wait = g.delay_before_answer(source, "alice")
        if clock.seconds() + wait >= horizon:
            return guesses
        clock.advance(wait)
        g.failed(source, "alice")
        g.closed(source, in_handshake=True)
        guesses += 1
        next_free[source] = clock.seconds() + 0.01  # a round trip


def test_guesses_per_minute_with_the_defaults(capsys):
    policy = guard.Policy()
    one_source_first_minute = simulate_guesses(policy, 1, sources=1)
    one_source_hour = simulate_guesses(policy, 60, sources=1)
    many_sources_hour = simulate_guesses(policy, 60, sources=1000)
    with capsys.disabled():
        print(
            f"\n[figures] guesses against one user with the defaults: one address, serial: "
            f"{one_source_first_minute} in the first minute, {one_source_hour / 60:.2f}/min over an hour; "
            f"1000 addresses, serial: {many_sources_hour / 60:.1f}/min"
        )
    # One address: 10 failures, then locked out for 15 minutes, window 10 minutes.
    assert one_source_first_minute <= 10
    assert one_source_hour <= 10 * (60 // 15 + 1)
    # Many addresses: every answer waits the user's bound (5 s), so at most 12 per minute.
    assert many_sources_hour / 60 <= 60 / policy.max_user_delay + 1


def test_a_guess_in_flight_does_not_show_on_the_name():
    """Between the owner's share and confirmation, a prober's HELLO for the name must be
    answered as before: a delay that came and went would show a login (and that the name
    exists). Only a guess that ends unconfirmed counts against the name."""
    g, clock = make()
    assert g.take_guess_slot("192.0.2.7")  # the owner's handshake, in flight
    assert g.delay_before_answer("10.0.0.66", "alice") == 0
    g.guess_confirmed("192.0.2.7", "alice")
    assert g.delay_before_answer("10.0.0.66", "alice") == 0
    assert g.take_guess_slot("10.0.0.66")
    g.guess_failed("10.0.0.66", "alice")  # the prober's own guess, ended without confirming
    assert g.delay_before_answer("192.0.2.8", "alice") == 0.5


def test_a_source_cannot_run_up_a_handshake_debt():
    g, clock = make(handshake_rate=10, handshake_burst=1)
    waits = []
    for _ in range(200):
        try:
            waits.append(g.handshake_delay("10.0.0.1"))
        except guard.Refused as refusal:
            assert "too many handshakes" in refusal.reason
    assert max(waits) <= guard.MAX_HANDSHAKE_WAIT and len(waits) < 60
    clock.advance(guard.MAX_HANDSHAKE_WAIT + 0.2)
    assert g.handshake_delay("10.0.0.1") == 0  # the refused ones left no debt behind


@pytest.mark.parametrize(
    "host, key",
    [("192.0.2.1", "192.0.2.1"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
     ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"), ("::ffff:192.0.2.9", "192.0.2.9"), ("unix-peer", "unix-peer")],
)
def test_an_ipv6_host_counts_as_one_address_per_64(host, key):
    assert guard.source_key(host) == key
