"""The server under the attacks of docs/security.md, driven in memory (a Clock for time) or over
real sockets: guesses that must be counted however the connection ends, names that must not be
told apart by the bytes of an answer, limits that apply from the first moment."""

import json
import os
import re

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from eketwist import guard, spake2plus, userdb
from eketwist.server import ServerFactory
from eketwist.wire import CONTEXT

from tests.support.processes import FAST_SCRYPT
from tests.support.rawclient import Closed, RawClient
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


def test_parallel_connections_cannot_outrun_the_lockout(world):
    """Six connections from one address say HELLO before any guess is answered: only as many
    guesses are answered at once as the address may still fail (3); the others wait, and once
    those 3 have failed the address is locked out and the waiting ones get no answer."""
    first = Conversation(world)
    factory = first.factory
    factory.guard.policy.max_source_failures = 3
    conversations = [first] + [Conversation(world, factory) for _ in range(5)]
    for conversation in conversations:
        conversation.reach("share")
    for conversation in conversations:
        x, share_p = spake2plus.prover_share(conversation.w0)
        conversation.feed(conversation.handshake_frame({"type": "share", "share": share_p.hex()}))
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


@pytest.mark.parametrize("policy", [{"max_per_source": 3}])
@pytest_twisted.ensureDeferred
async def test_silent_connections_count_against_the_per_address_cap_from_accept(root, users_file, policy):
    from twisted.internet import reactor

    factory = ServerFactory(str(root), str(users_file), "t", policy=guard.Policy(**policy))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        number = port.getHost().port

        def open_silent_then_one_more():
            silent = [RawClient(number, timeout=5) for _ in range(3)]
            extra = RawClient(number, timeout=5)
            try:
                return extra.recv()  # refused without having sent a byte
            finally:
                for raw in (*silent, extra):
                    raw.close()

        refusal = await deferToThread(open_silent_then_one_more)
        assert refusal["type"] == "error" and refusal["code"] == "try-later"
        assert "too many connections from your address" in refusal["message"]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_users_file_is_refused_whatever_leads_to_it(root, users_file, factory, server_port, tmp_path):
    from eketwist import errors

    from tests.support.fixtures import authenticated_client
    from tests.support.processes import WRITER_PASSWORD

    os.link(users_file, root / "hardlink")  # a local account's doing: defence in depth
    os.symlink(users_file, root / "symlink")
    client = await authenticated_client(server_port)
    for name in ("hardlink", "symlink"):
        with pytest.raises(errors.BadPath):
            await client.get(name, str(tmp_path / name))
    client.close()
    writer = await authenticated_client(server_port, user="writer", password=WRITER_PASSWORD)
    local = tmp_path / "evil"
    local.write_text("# no header\n")
    with pytest.raises(errors.BadPath):
        await writer.put(str(local), "hardlink", force=True)
    writer.close()
    assert "secret" in users_file.read_text()


@pytest.mark.parametrize("request_kind", ["get", "list"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout(root, users_file, monkeypatch, request_kind):
    """A download or listing the client never reads holds a file or a directory open: the
    idle timeout runs while they wait, then the connection is cut (it cannot even be told
    why: it does not read)."""
    from twisted.internet import reactor

    from eketwist import connection

    from tests.support.fixtures import sleep
    from tests.support.processes import PASSWORD

    monkeypatch.setattr(connection, "CLOSE_GRACE", 0.5)
    if request_kind == "get":
        with open(root / "big.bin", "wb") as big:
            big.truncate(256 * 1024 * 1024)  # sparse: nothing to write
        request = {"type": "get", "path": "big.bin"}
    else:
        (root / "many").mkdir()
        for i in range(30_000):
            os.close(os.open(root / "many" / f"{i:06d}-{'x' * 200}", os.O_CREAT | os.O_WRONLY))
        request = {"type": "list", "path": "many"}
    factory = ServerFactory(str(root), str(users_file), "t", idle_timeout=0.5)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        def stall():
            raw = RawClient(port.getHost().port, receive_buffer=4096)
            assert raw.handshake("alice", PASSWORD)["type"] == "ok"
            raw.send_control(request)
            return raw

        raw = await deferToThread(stall)
        await sleep(0.3)
        assert len(factory.connections) == 1  # sending, as far as the client lets it
        for _ in range(100):
            if not factory.connections:
                break
            await sleep(0.1)
        assert not factory.connections, "a client that stopped reading still holds its connection"
        raw.close()
    finally:
        await port.stopListening()


def _raw_put(raw, path, data):
    """An upload through the raw client: the server's final answer (stored or error)."""
    import hashlib

    raw.send_control({"type": "put", "path": path, "size": len(data), "force": True})
    _, answer = raw.recv_record()
    if answer["type"] != "ready":
        return answer
    raw.send_control({"type": "upload", "offset": 0})
    raw.send_record(2, data)
    raw.send_control({"type": "end", "size": len(data), "sha1": hashlib.sha1(data).hexdigest()})
    return raw.recv_record()[1]


@pytest.mark.parametrize("walk", ["openat2", "by hand"])
@pytest_twisted.ensureDeferred
async def test_a_directory_swapped_for_a_symlink_during_requests_leads_nowhere(tmp_path, users_file, walk, monkeypatch):
    """A local account swaps a directory inside the root for a symlink to outside, as fast as
    it can, while a user downloads, lists and uploads through it (the attack that got 18 files
    out of 262 GETs in 30 s when paths were checked as strings, then opened)."""
    import threading
    import time

    from twisted.internet import reactor

    from eketwist import storage

    from tests.support.processes import WRITER_PASSWORD

    if walk == "by hand":
        monkeypatch.setattr(storage, "_SYS_OPENAT2", None)  # as on a kernel without openat2
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("OUTSIDE")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("inside")  # 6 bytes; outside's are 7
    factory = ServerFactory(str(root), str(users_file), "t", policy=guard.Policy(max_per_source=1000))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            try:
                os.rename(root / "d", root / "d.real")
                os.symlink(outside, root / "d")
                time.sleep(0.0005)
                os.unlink(root / "d")
                os.rename(root / "d.real", root / "d")
            except OSError:
                pass

    def connect():
        raw = RawClient(port.getHost().port)
        assert raw.handshake("writer", WRITER_PASSWORD)["type"] == "ok"
        return raw

    def attack():
        raw = connect()
        escapes = attempts = drops = 0
        deadline = time.monotonic() + float(os.environ.get("SWAP_RACE_SECONDS", "3"))
        while time.monotonic() < deadline:
            attempts += 1
            try:
                escapes += race_once(raw)
            except Closed:
                drops += 1
                raw.close()
                raw = connect()
        raw.close()
        return escapes, attempts, drops

    def race_once(raw):
        _, data, _ = raw.get("d/f")
        escapes = data == b"OUTSIDE"
        raw.send_control({"type": "list", "path": "d"})
        while True:
            _, answer = raw.recv_record()
            if answer["type"] == "error":
                break
            escapes += any(entry["name"] == "f" and entry["size"] == 7 for entry in answer["entries"])
            if not answer["more"]:
                break
        _raw_put(raw, "d/new", b"written")
        return escapes

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        escapes, attempts, drops = await deferToThread(attack)
    finally:
        stop.set()
        swapper.join()
        await port.stopListening()
    print(f"\n[figures] swap race: {attempts} rounds of get, list and put through a swapped directory: "
          f"{escapes} escapes, {drops} dropped connections")
    assert attempts > 50
    assert (escapes, drops) == (0, 0), f"{escapes} escapes, {drops} dropped connections in {attempts} rounds"
    assert sorted(os.listdir(outside)) == ["f"], "an upload went outside the root"


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


@pytest.mark.parametrize("text, shown", [("a\u202eb", "a\\u202eb"), ("x\u2066y\u2069", "x\\u2066y\\u2069"),
                                         ("\u200fz", "\\u200fz"), ("ok é", "ok é")])
def test_bidirectional_controls_are_shown_escaped(text, shown):
    from eketwist import textsafe

    assert textsafe.escape(text) == shown
    encoded = textsafe.json_text(text)
    assert json.loads(encoded) == text
    assert not any(control in encoded for control in "\u202e\u2066\u2069\u200f")
