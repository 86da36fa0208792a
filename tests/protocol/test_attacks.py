"""The server under the attacks of docs/security.md, driven in memory (a Clock for time):
guesses that must be counted however the connection ends, names that must not be told apart by
the bytes of an answer, handshakes beyond an address's budget. (The attacks that need real
sockets: tests/system/test_attacks_over_sockets.py.)"""

import json
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from eketwist import guard, spake2plus, userdb
from eketwist.server import ServerFactory
from eketwist.wire import CONTEXT

from tests.support.processes import FAST_SCRYPT
from tests.support.conversation import Conversation


@pytest.fixture
def auth_failures():
    """The "authentication failed" lines the server logs."""
    lines = []

    def observe(event):
        if "authentication failed" in (event.get("log_format") or ""):
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def end_after_share(conversation, ending):
    """End a connection whose guess the server has answered (it sent its share), as a guesser
    who has already learnt from confirmV whether the guess was right would."""
    proto, clock = conversation.proto, conversation.factory.clock
    if ending == "error":
        conversation.feed(conversation.handshake_frame({"type": "error", "code": "x", "message": "bye"}))
    elif ending == "malformed":
        conversation.feed(b"\xff\xff\xff\xff\x09garbage")
    elif ending == "unexpected":
        conversation.feed(conversation.handshake_frame({"type": "hello", "version": 1, "user": "fuzzer"}))
    elif ending == "timeout":
        clock.advance(conversation.factory.handshake_timeout + 1)
    elif ending == "shutdown":
        conversation.factory.drain(1.0)
        clock.advance(2)
    elif ending == "wrong-confirm":
        conversation.feed(conversation.handshake_frame({"type": "confirm", "confirm": "00" * 32}))
    if ending != "reset":
        assert conversation.transport.disconnecting or ending == "silent-close"
    proto.connectionLost(Failure(ConnectionLost()))


@pytest.mark.parametrize(
    "ending", ["error", "malformed", "unexpected", "timeout", "reset", "shutdown", "wrong-confirm", "silent-close"]
)
def test_every_answered_guess_is_counted_however_the_connection_ends(world, auth_failures, ending):
    conversation = Conversation(world)
    conversation.factory.guard.policy.delay_base = 0.5
    conversation.reach("confirm")  # the right password: the client now knows it guessed well
    end_after_share(conversation, ending)
    assert conversation.factory.guard.delay_before_answer("127.0.0.1", "somebody") == 0.5
    assert conversation.factory.guard.delay_before_answer("192.0.2.1", "fuzzer") == 0.5
    assert len(auth_failures) == 1


def test_only_a_valid_confirmation_takes_the_guess_back(world, auth_failures):
    conversation = Conversation(world)
    conversation.factory.guard.policy.delay_base = 0.5
    conversation.reach("confirm")
    # In flight, the guess holds a slot of its address; it delays nobody, and never shows on
    # the name (a prober would see logins).
    assert conversation.factory.guard.delay_before_answer("192.0.2.1", "fuzzer") == 0
    conversation = Conversation(world)
    conversation.factory.guard.policy.delay_base = 0.5
    conversation.reach("ready")
    assert conversation.factory.guard.delay_before_answer("127.0.0.1", "fuzzer") == 0
    assert auth_failures == []


def shares_from_one_address(world, count, max_failures):
    """`count` connections from one address, each having sent its SHARE; (them, their factory)."""
    first = Conversation(world)
    factory = first.factory
    factory.guard.policy.max_source_failures = max_failures
    conversations = [first] + [Conversation(world, factory) for _ in range(count - 1)]
    for conversation in conversations:
        conversation.reach("share")
    for conversation in conversations:
        conversation.x, conversation.share_p = spake2plus.prover_share(conversation.w0)
        conversation.feed(conversation.handshake_frame({"type": "share", "share": conversation.share_p.hex()}))
    return conversations, factory


def test_parallel_connections_cannot_outrun_the_lockout(world):
    """Six connections from one address say HELLO before any guess is answered: only as many
    guesses are answered at once as the address may still fail (3); the others wait, and once
    those 3 have failed the address is locked out and the waiting ones get no answer."""
    conversations, factory = shares_from_one_address(world, 6, max_failures=3)
    answered = [c for c in conversations if c.proto.state == "confirm"]
    waiting = [c for c in conversations if c.proto.state == "share-waiting"]
    assert (len(answered), len(waiting)) == (3, 3)
    for conversation in answered:  # learnt what they wanted from confirmV, and hang up
        conversation.frames_out()
        conversation.proto.connectionLost(Failure(ConnectionLost()))
    factory.clock.advance(0)
    for conversation in waiting:
        replies = [json.loads(payload) for _, payload in conversation.frames_out()]
        assert [r["type"] for r in replies] == ["error"]
        assert replies[0]["code"] == "try-later" and "failed logins" in replies[0]["message"]


def test_parallel_logins_from_one_address_all_succeed(world):
    """Twenty logins at once from one address (a script, a NAT): in flight they are no
    failures, so none is locked out or refused; they take turns in the address's slots."""
    factory = Conversation(world).factory
    conversations = [Conversation(world, factory) for _ in range(20)]
    pending = list(conversations)
    rounds = 0
    while pending and rounds < 50:
        rounds += 1
        for conversation in list(pending):
            if conversation.proto.state == "hello":
                conversation.reach("share")
            if conversation.proto.state == "share":
                x, share_p = spake2plus.prover_share(conversation.w0)
                conversation.x, conversation.share_p = x, share_p
                conversation.feed(conversation.handshake_frame({"type": "share", "share": share_p.hex()}))
            if conversation.proto.state == "confirm":
                reply = json.loads(conversation.frames_out()[-1][1])
                keys = spake2plus.prover_finish(CONTEXT, b"fuzzer", b"fuzz", conversation.w0, conversation.w1,
                                                conversation.x, conversation.share_p, bytes.fromhex(reply["share"]))
                conversation.feed(conversation.handshake_frame({"type": "confirm", "confirm": keys.confirm_p.hex()}))
                assert conversation.proto.state == "ready"
                pending.remove(conversation)
        factory.clock.advance(0)
    assert not pending


def _params_bytes(factory, name, host="10.0.0.5"):
    factory.guard.policy.max_per_source = factory.guard.policy.max_connections = 10_000
    proto = factory.buildProtocol(IPv4Address("TCP", host, 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
    proto.makeConnection(transport)
    proto.dataReceived(Conversation.handshake_frame(None, {"type": "hello", "version": 1, "user": name}))
    data = transport.value()
    length = int.from_bytes(data[:4], "big")
    return data[5 : 5 + length]


def _factory(tmp_path, costs):
    from twisted.internet.task import Clock

    users = userdb.Users.new()
    for i, n in enumerate(costs):
        users.by_name[f"user{i}"] = userdb.make_user(f"user{i}", "pw", dict(FAST_SCRYPT, n=n))
    userdb.save(tmp_path / "users", users)
    (tmp_path / "root").mkdir()
    policy = guard.Policy(handshake_rate=1e6, handshake_burst=1_000_000)
    return ServerFactory(str(tmp_path / "root"), str(tmp_path / "users"), "s", policy=policy, clock=Clock())


def test_params_of_known_and_unknown_names_differ_only_in_the_salt(tmp_path):
    factory = _factory(tmp_path, [1024])
    known = _params_bytes(factory, "user0")
    unknown = _params_bytes(factory, "userX")
    assert json.loads(known)["scrypt"] == json.loads(unknown)["scrypt"]
    salt = re.compile(rb'"salt":"[0-9a-f]{32}"')
    assert salt.sub(b"SALT", known) == salt.sub(b"SALT", unknown)


def test_unknown_names_show_the_real_users_costs_in_their_proportions(tmp_path):
    factory = _factory(tmp_path, [1024, 1024, 1024, 2048])
    shown = [json.loads(_params_bytes(factory, f"nobody{i}"))["scrypt"]["n"] for i in range(400)]
    assert set(shown) == {1024, 2048}
    assert 0.15 < shown.count(2048) / len(shown) < 0.35
    assert shown == [json.loads(_params_bytes(factory, f"nobody{i}"))["scrypt"]["n"] for i in range(400)]


def test_a_sources_handshakes_beyond_its_budget_wait(tmp_path):
    factory = _factory(tmp_path, [1024])
    factory.guard.policy.handshake_rate, factory.guard.policy.handshake_burst = 10, 3
    states = []
    for _ in range(5):
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1))
        proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 1)))
        proto.dataReceived(Conversation.handshake_frame(None, {"type": "hello", "version": 1, "user": "user0"}))
        states.append(proto.state)
    assert states == ["share", "share", "share", "delaying", "delaying"]


def test_every_names_verifier_points_are_ready_before_any_handshake(tmp_path, monkeypatch):
    """Known names, unknown names, names that logged in and names that never did: answering
    any of them computes no verifier points (a cache filled as names log in told them apart)."""
    users = userdb.Users.new()
    for name in ("alice", "bob"):
        users.by_name[name] = userdb.make_user(name, "pw", FAST_SCRYPT)
    users.prepare()
    computed = []
    real = spake2plus.verifier_points
    monkeypatch.setattr(spake2plus, "verifier_points", lambda *args: computed.append(args) or real(*args))
    for name in ("alice", "bob", "mallory", "nobody"):
        user, _ = users.lookup(name)
        assert users.verifier_points(user) is not None
    assert computed == []
    fakes = [users.lookup(name)[0] for name in ("mallory", "nobody")]
    assert fakes[0].salt != fakes[1].salt  # still a stable salt of its own per name


def test_no_params_after_the_error_that_closed_a_delayed_hello(world):
    """A HELLO waiting out its delay when the connection is closed (a shutdown, a timeout):
    the ERROR was the answer, and no PARAMS may follow it."""
    conversation = Conversation(world)
    factory = conversation.factory
    factory.guard.policy.delay_base = 0.5
    factory.guard.failed("127.0.0.1", "somebody")
    conversation.feed(conversation.handshake_frame({"type": "hello", "version": 1, "user": "fuzzer"}))
    assert conversation.proto.state == "delaying"
    factory.drain(5.0)
    factory.clock.advance(1.0)
    sent = [json.loads(payload)["type"] for _, payload in conversation.frames_out()]
    assert sent == ["error"]


def _answer(factory, user, host, world):
    """A new connection from `host` says HELLO for `user`: (the conversation, the answer, the
    simulated seconds it came after)."""
    conversation = Conversation(world, factory, host=host)
    started = factory.clock.seconds()
    conversation.feed(conversation.handshake_frame({"type": "hello", "version": 1, "user": user}))
    conversation.wait_for_answer()
    return conversation, json.loads(conversation.frames_out()[-1][1]), factory.clock.seconds() - started


def _failed_login(factory, user, host, world):
    """One wrong-password attempt; the simulated seconds until PARAMS came."""
    conversation, params, waited = _answer(factory, user, host, world)
    w0, _ = spake2plus.register(b"wrong", bytes.fromhex(params["salt"]), user.encode(), **params["scrypt"])
    _, share_p = spake2plus.prover_share(w0)
    conversation.feed(conversation.handshake_frame({"type": "share", "share": share_p.hex()}))
    conversation.feed(conversation.handshake_frame({"type": "confirm", "confirm": "00" * 32}))
    assert json.loads(conversation.frames_out()[-1][1])["code"] == "auth-failed"
    conversation.proto.connectionLost(Failure(ConnectionLost()))
    return waited


def test_failures_slow_down_that_source_and_that_name_alike(world):
    """In simulated time, so the delays are exact (over sockets they were measured with margins
    for a busy machine, and cost seconds)."""
    factory = Conversation(world).factory
    factory.guard.policy.delay_base, factory.guard.policy.max_user_delay = 0.4, 0.6
    waits = [_failed_login(factory, "fuzzer", "127.0.0.1", world) for _ in range(3)]
    assert waits == pytest.approx([0, 0.4, 0.8])
    # An unknown name is counted and delayed exactly like a known one.
    unknown = [_failed_login(factory, "nobody", "127.0.0.5", world) for _ in range(3)]
    assert unknown == pytest.approx([0, 0.4, 0.8])
    # The name's owner, elsewhere, waits no longer than the user bound.
    _, answer, waited = _answer(factory, "fuzzer", "127.0.0.9", world)
    assert answer["type"] == "params" and waited == pytest.approx(0.6)
    # Her success takes back what her own address did, not the name's record: a delay
    # that dropped when she logged in would tell a prober the name is real.
    owner = Conversation(world, factory)
    owner.reach("ready")
    _, answer, waited = _answer(factory, "fuzzer", "127.0.0.9", world)
    assert waited == pytest.approx(0.6)
    _, answer, waited = _answer(factory, "bob", "127.0.0.1", world)
    assert waited == 0  # her address (127.0.0.1, where the failures came from) is clear



def test_a_slot_woken_for_a_closing_connection_goes_to_the_next_one_waiting(world):
    """One slot, three shares: the first is answered, two wait. The first waiter times out
    (closing, its connectionLost not yet run) just as the slot frees: the slot must reach the
    second waiter, not be lost until its own handshake deadline."""
    conversations, factory = shares_from_one_address(world, 3, max_failures=1)
    answered, closing, second = conversations
    assert [c.proto.state for c in conversations] == ["confirm", "share-waiting", "share-waiting"]
    closing.proto.timeoutConnection()  # closing; the reactor has not called connectionLost yet
    reply = json.loads(answered.frames_out()[-1][1])
    keys = spake2plus.prover_finish(CONTEXT, b"fuzzer", b"fuzz", answered.w0, answered.w1,
                                    answered.x, answered.share_p, bytes.fromhex(reply["share"]))
    answered.feed(answered.handshake_frame({"type": "confirm", "confirm": keys.confirm_p.hex()}))
    assert answered.proto.state == "ready"  # a valid login frees its slot
    factory.clock.advance(0)  # the wake goes to `closing`, which passes it on
    factory.clock.advance(0)
    assert second.proto.state == "confirm"
    assert json.loads(second.frames_out()[-1][1])["type"] == "share"


@pytest.mark.parametrize("lie", ["sha1", "size"])
def test_a_pipelined_upload_that_lies_about_its_digest_is_never_named(world, lie):
    """Version 2 commits uploads while it reads on: an END whose SHA-1 (or size) does not
    match what came still leaves no file under the name and no partial file; the refusal
    (integrity, section 7.5) comes first, then the answer to the request behind it."""
    import hashlib
    import os

    from tests.support.conversation import threads_by_hand

    root = world[0]
    with threads_by_hand() as threads:
        conversation = Conversation(world, version=2)
        conversation.reach("v2-ready")
        content = os.urandom(500)
        end = {"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()}
        if lie == "sha1":
            end["sha1"] = hashlib.sha1(content + b"x").hexdigest()
        else:
            end["size"] = len(content) - 1
        conversation.feed(
            conversation.message_frame({"type": "put", "path": "lied.bin", "size": len(content), "inline": True})
            + conversation.record(2, content) + conversation.message_frame(end)
            + conversation.message_frame({"type": "mkdir", "path": f"made-after-{lie}"})
        )
        threads.run()
        conversation.factory.clock.advance(0)
        replies = [json.loads(plaintext) for kind, plaintext in conversation.frames_out() if kind == 1]
        assert [reply["type"] for reply in replies] == ["error", "done"], replies
        assert replies[0]["code"] == "integrity" and not conversation.transport.disconnecting
        assert not (root / "lied.bin").exists() and (root / f"made-after-{lie}").is_dir()
        assert not [p.name for p in root.iterdir() if p.name.startswith(".eke-part.lied")]


def test_refused_uploads_behind_a_commit_cannot_grow_the_servers_memory(world):
    """Refusals owed behind an upload being committed are answers like any other: past one
    connection's bound the server reads no further request until they have gone."""
    from eketwist import serving
    from tests.support.conversation import threads_by_hand

    with threads_by_hand() as threads:
        conversation = Conversation(world, version=2)
        conversation.reach("v2-committing")  # one upload's commit waits in the pool
        refused = {"type": "put", "path": "hello.txt", "size": 0, "inline": True}  # exists
        end = {"type": "end", "size": 0, "sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709"}
        conversation.feed(b"".join(conversation.message_frame(m) for _ in range(2000) for m in (refused, end)))
        assert len(conversation.proto.owed) <= serving.Serving.MAX_COMMITTING
        assert "frames held" in conversation.proto._holds, "the rest waits unread"
        for _ in range(200):
            threads.run()
            conversation.factory.clock.advance(0)
        replies = [json.loads(plaintext) for kind, plaintext in conversation.frames_out() if kind == 1]
        assert replies[0]["type"] == "stored" and len(replies) == 2001
        assert {reply["code"] for reply in replies[1:]} == {"exists"}
        assert not conversation.proto.owed and conversation.factory.committing == 0


def test_a_put_followed_by_a_request_before_ready_is_a_protocol_error(world, tmp_path):
    """Rule 2 of section 7.9: after a PUT without `inline`, nothing until READY. The server
    says so, rather than holding the request until the idle timeout."""
    from tests.support.conversation import threads_by_hand

    from eketwist.files import server_part_name

    root = world[0]
    with threads_by_hand():
        conversation = Conversation(world, version=2)
        conversation.reach("v2-ready")
        part = root / server_part_name("resumable.bin", "fuzzer")
        part.write_bytes(b"abc")  # a partial upload to hash first: the PUT stays working
        part.chmod(0o600)
        conversation.feed(conversation.message_frame({"type": "put", "path": "resumable.bin", "size": 10}))
        assert conversation.proto.state == "working", "hashing the partial upload (its thread waits)"
        conversation.feed(conversation.message_frame({"type": "stat", "path": "hello.txt"}))
        replies = [json.loads(plaintext) for kind, plaintext in conversation.frames_out() if kind == 1]
        assert replies and replies[-1]["type"] == "error" and replies[-1]["code"] == "protocol", replies
        assert conversation.transport.disconnecting
