"""The four protocol machines tested directly, as plain functions: no Protocol, no transport,
no reactor. Messages go in as decoded dicts (as the glue hands them over), events and messages
come out, and each machine's state (its class and its docs/protocol.md section 9 name) is
checked after every step.

1. the handshake: a real Prover against a real Verifier, then every way it fails;
2. the server's requests (serving.Serving): each request, the upload path, the wrong member
   types of section 7.8, every message a state does not accept;
3. the client's side: PARAMS bounds (prover.Prover), every answer to every request
   (requesting.Requesting), refusals against fatal errors;
4. a hypothesis fuzzer over the two client machines (the server's are fuzzed in test_fuzz.py):
   whatever comes, an event or an EketwistError, and always a known state name.

Five mismatches with docs/protocol.md that these tests found were fixed with them: done()
after close(), hex with spaces, untyped listing members, where no-space and integrity refuse,
and codes outside section 8 from a server.
"""

import hashlib
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eketwist import errors, pbkdf, prover, requesting, serving, spake2plus, userdb, verifier, wire
from eketwist.errors import (
    AuthenticationFailed, EketwistError, IntegrityError, ProtocolError, ServerNotAuthenticated, Unsupported,
)
from tests.support.processes import FAST_SCRYPT

SERVER = "files.example"
PASSWORD = "correct horse"
SLOW_SCRYPT = dict(FAST_SCRYPT, n=2048)
ALICE = userdb.make_user("alice", PASSWORD, FAST_SCRYPT, rights=userdb.READ_WRITE)
BOB = userdb.make_user("bob", "bob's password", SLOW_SCRYPT)
# A fixed secret: the answers for unknown names are then the same at every run. The users are
# given to the constructor, as userdb.parse does: it draws the fake costs from theirs.
USERS = userdb.Users(b"\x01" * 32, [ALICE, BOB])
USERS.prepare()
ALICE_W = pbkdf.register(PASSWORD.encode(), ALICE.salt, b"alice", **FAST_SCRYPT)

CONTENT = bytes(range(100))
SHA1_HEX = hashlib.sha1(CONTENT).hexdigest()
SIZE = len(CONTENT)


def trip(message):
    """A message as the peer receives it: encoded canonically, decoded."""
    return wire.decode_message(wire.encode_message(message))


def point_hex(point):
    return spake2plus.encode_point(point).hex()


# =============================================================================================
# 1. The handshake: Prover and Verifier
# =============================================================================================


def server_where(machine):
    return type(machine.state), verifier.state_name(machine.state)


def client_where(machine):
    return type(machine.state), machine.name


def new_verifier(users=USERS):
    return verifier.Verifier(SERVER, lambda: users)


def test_a_whole_handshake_message_by_message():
    client, server = prover.Prover("alice"), new_verifier()
    assert client_where(client) == (prover.Start, "start")
    assert server_where(server) == (verifier.AwaitingHello, "hello")
    assert server.username is None and not server.guessing

    hello = client.hello()
    assert hello == {"type": "hello", "version": 1, "versions": [1, 2], "user": "alice"}
    assert client_where(client) == (prover.AwaitingParams, "params")

    assert server.receive(trip(hello)) == verifier.Hello("alice")
    assert server_where(server) == (verifier.Named, "hello")
    assert (server.username, server.state.user, server.state.known) == ("alice", ALICE, True)

    params = server.params()
    assert params == {"type": "params", "server": SERVER, "salt": ALICE.salt.hex(), "scrypt": FAST_SCRYPT, "version": 2}
    assert server_where(server) == (verifier.AwaitingShare, "share")

    event = client.receive(trip(params))
    assert event == prover.Params(SERVER, ALICE.salt, FAST_SCRYPT, 0.0)
    assert client_where(client) == (prover.Deriving, "deriving")
    assert client.state.server_id == SERVER

    share = client.derived(*pbkdf.register(PASSWORD.encode(), event.salt, b"alice", **event.scrypt))
    assert sorted(share) == ["share", "type"] and share["type"] == "share"
    assert len(share["share"]) == 130 and share["share"].startswith("04")
    assert client_where(client) == (prover.AwaitingShare, "share")

    assert server.receive(trip(share)) == verifier.Share()
    assert server_where(server) == (verifier.ShareReceived, "share")
    assert server.state.share_p == bytes.fromhex(share["share"]) and not server.guessing

    answer = server.answer()
    assert sorted(answer) == ["confirm", "share", "type"] and answer["type"] == "share"
    assert len(answer["share"]) == 130 and len(answer["confirm"]) == 64
    assert server_where(server) == (verifier.AwaitingConfirm, "confirm")
    assert server.guessing

    confirm = client.receive(trip(answer))
    assert type(confirm) is prover.Confirm
    assert sorted(confirm.reply) == ["confirm", "type"] and confirm.reply["type"] == "confirm"
    assert client_where(client) == (prover.AwaitingOk, "ok")

    confirmed = server.receive(trip(confirm.reply))
    assert type(confirmed) is verifier.Confirmed
    assert (confirmed.user, confirmed.reply) == (ALICE, {"type": "ok"})
    assert server_where(server) == (verifier.Authenticated, "ready")
    assert not server.guessing and server.username is None

    done = client.receive(trip(confirmed.reply))
    assert client_where(client) == (prover.Authenticated, "ready")
    assert done == prover.Done(SERVER, confirmed.shared_key)
    assert len(done.shared_key) == 32
    assert client.state.shared_key == done.shared_key
    # The server's machine keeps no key once the glue has it, and its repr shows none.
    assert not hasattr(server.state, "shared_key") and confirmed.shared_key.hex() not in repr(confirmed)
    server.forget_keys()
    assert server_where(server) == (verifier.Authenticated, "ready") and server.state.user is None


def handshake(username="alice", password=PASSWORD, users=USERS):
    """A whole handshake; the shared key both sides hold."""
    client, server = prover.Prover(username), new_verifier(users)
    server.receive(trip(client.hello()))
    event = client.receive(trip(server.params()))
    server.receive(trip(client.derived(*pbkdf.register(password.encode(), event.salt, username.encode(), **event.scrypt))))
    reply = client.receive(trip(server.answer())).reply
    confirmed = server.receive(trip(reply))
    return client.receive(trip(confirmed.reply)).shared_key, confirmed.shared_key


def test_each_handshake_has_a_key_of_its_own():
    first, second = handshake(), handshake()
    assert first[0] == first[1] and second[0] == second[1]
    assert first[0] != second[0]


def server_at_share(username="alice", users=USERS):
    server = new_verifier(users)
    server.receive({"type": "hello", "version": 1, "user": username})
    return server, server.params()


def cheating_confirm(server, username, w0, w1):
    """A client that sends CONFIRM without checking confirmV: what the server then decides.
    Returns (CONFIRM, the client's keys, the server's SHARE)."""
    x, share_p = spake2plus.prover_share(w0)
    server.receive({"type": "share", "share": share_p.hex()})
    answer = server.answer()
    keys = spake2plus.prover_finish(
        wire.CONTEXT, username.encode(), SERVER.encode(), w0, w1, x, share_p, bytes.fromhex(answer["share"]),
    )
    return {"type": "confirm", "confirm": keys.confirm_p.hex()}, keys, answer


def test_a_wrong_password_fails_at_the_servers_confirm():
    server, sent = server_at_share()
    w0, w1 = pbkdf.register(b"wrong password", bytes.fromhex(sent["salt"]), b"alice", **FAST_SCRYPT)
    confirm, keys, answer = cheating_confirm(server, "alice", w0, w1)
    assert keys.confirm_v.hex() != answer["confirm"]  # an honest client would have stopped here
    assert server_where(server) == (verifier.AwaitingConfirm, "confirm")
    with pytest.raises(AuthenticationFailed) as raised:
        server.receive(confirm)
    assert type(raised.value) is AuthenticationFailed and raised.value.code == "auth-failed"
    assert raised.value.message == "Authentication failed: wrong username or password."
    assert server_where(server) == (verifier.Failed, "closed")


def client_at_share(username="alice", password=PASSWORD, server=None):
    """(client in state share, server at share-received) for one handshake."""
    client = prover.Prover(username)
    server = server or new_verifier()
    server.receive(client.hello())
    event = client.receive(server.params())
    server.receive(client.derived(*pbkdf.register(password.encode(), event.salt, username.encode(), **event.scrypt)))
    return client, server


@pytest.mark.parametrize("password, users", [
    pytest.param("wrong password", USERS, id="wrong-password"),
    # A server holding another verifier for alice (an impostor, or the wrong server).
    pytest.param(PASSWORD, userdb.Users(b"\x02" * 32, [userdb.make_user("alice", "other", FAST_SCRYPT)]), id="wrong-server"),
])
def test_the_client_refuses_a_server_that_cannot_prove_itself(password, users):
    client, server = client_at_share(password=password, server=new_verifier(users))
    answer = server.answer()
    with pytest.raises(ServerNotAuthenticated) as raised:
        client.receive(answer)
    assert raised.value.code == "server-auth-failed"
    assert client_where(client) == (prover.Failed, "closed")
    # No CONFIRM left the client: the server still waits for one.
    assert server_where(server) == (verifier.AwaitingConfirm, "confirm")


def params_for(name, users=USERS):
    return server_at_share(name, users)[1]


def test_an_unknown_users_params_look_like_a_known_users():
    known, unknown = params_for("alice"), params_for("mallory")
    assert sorted(known) == sorted(unknown) == ["salt", "scrypt", "server", "type"]
    assert (unknown["type"], unknown["server"]) == ("params", SERVER)
    assert len(bytes.fromhex(unknown["salt"])) == len(known["salt"]) // 2 == userdb.SALT_BYTES
    assert sorted(unknown["scrypt"]) == sorted(known["scrypt"]) == ["n", "p", "r"]
    assert unknown["scrypt"] in (FAST_SCRYPT, SLOW_SCRYPT)
    assert len(wire.encode_message(unknown)) == len(wire.encode_message(known))
    # Stable for the name (another connection, the same answer), and per name.
    assert params_for("mallory") == unknown
    assert params_for("trudy")["salt"] != unknown["salt"]
    # Costs drawn from the real users' costs, both of them.
    costs = {tuple(params_for(f"nobody{i}")["scrypt"].values()) for i in range(64)}
    assert costs == {(1024, 8, 1), (2048, 8, 1)}


def test_an_unknown_user_fails_at_confirm_even_with_the_fake_verifiers_keys():
    """Knowing the fake verifier's secrets (a test can), a client passes the server's proof;
    the server still refuses: an unknown name never authenticates."""
    server, _ = server_at_share("mallory")
    assert server.state.known is False
    w0 = USERS._fake_w0
    w1 = USERS._derive(b"L", b"") % (spake2plus.ORDER - 1) + 1
    assert spake2plus.verifier_record(w0, w1) == (w0, USERS._fake_L)
    confirm, keys, answer = cheating_confirm(server, "mallory", w0, w1)
    assert keys.confirm_v.hex() == answer["confirm"]
    with pytest.raises(AuthenticationFailed) as raised:
        server.receive(confirm)
    assert type(raised.value) is AuthenticationFailed
    assert server_where(server) == (verifier.Failed, "closed")


def test_an_unknown_user_sees_a_server_that_cannot_prove_itself():
    client, server = client_at_share("mallory", "any password")
    with pytest.raises(ServerNotAuthenticated):
        client.receive(server.answer())
    assert client_where(client) == (prover.Failed, "closed")


@pytest.mark.parametrize("name, problem", [
    ("", "a username must not be empty"),
    ("x" * 65, "a username is at most 64 bytes"),
    ("é" * 33, "a username is at most 64 bytes"),
    ("a b", "a username must not contain spaces or control characters"),
    ("a\u00a0b", "a username must not contain spaces or control characters"),
    ("a\u2028b", "a username must not contain spaces or control characters"),
    ("a\u200bb", "a username must not contain spaces or control characters"),
    ("a\x00b", "a username must not contain spaces or control characters"),
    ("a\ue000", "a username must not contain spaces or control characters"),
    ("a\u0378", "a username must not contain spaces or control characters"),
])
def test_an_invalid_username_is_an_authentication_failure(name, problem):
    server = new_verifier()
    with pytest.raises(AuthenticationFailed) as raised:
        server.receive({"type": "hello", "version": 1, "user": name})
    assert type(raised.value) is AuthenticationFailed
    assert raised.value.message == f"not a valid username: {problem}"
    assert server_where(server) == (verifier.AwaitingHello, "hello")  # the glue closes


@pytest.mark.parametrize("name", ["é" * 32, "e\u0301", "ALICE", "x" * 64])
def test_valid_usernames_are_looked_up(name):
    server = new_verifier()
    assert server.receive({"type": "hello", "version": 1, "user": name}) == verifier.Hello(name)
    assert server.state.known is False


@pytest.mark.parametrize("user", [5, None, True, ["alice"], {"name": "alice"}, "\ud800"])
def test_a_user_that_is_not_a_string_is_a_protocol_error(user):
    server = new_verifier()
    with pytest.raises(ProtocolError) as raised:
        server.receive({"type": "hello", "version": 1, "user": user})
    assert type(raised.value) is ProtocolError
    assert server_where(server) == (verifier.AwaitingHello, "hello")


@pytest.mark.parametrize("version", [0, 3, -1, 2**64])
def test_another_version_is_unsupported(version):
    server = new_verifier()
    with pytest.raises(Unsupported) as raised:
        server.receive({"type": "hello", "version": version, "user": "alice"})
    assert raised.value.code == "unsupported"
    assert raised.value.message == f"protocol version {version} is not supported (this server speaks 1, 2)"
    assert server_where(server) == (verifier.AwaitingHello, "hello")


@pytest.mark.parametrize("hello, chosen", [
    ({"version": 1}, 1),  # a version 1 client: PARAMS as version 1 has it
    ({"version": 1, "versions": [1, 2]}, 2),
    ({"version": 1, "versions": [2, 1, 7]}, 2),  # any order; versions we do not speak ignored
    ({"version": 2}, 2),
    ({"version": 1, "versions": [1]}, 1),
    ({"version": 7, "versions": [1]}, 1),
])
def test_params_chooses_the_highest_version_both_speak(hello, chosen):
    server = new_verifier()
    server.receive({"type": "hello", "user": "alice", **hello})
    params = server.params()
    assert params.get("version", 1) == chosen and ("version" in params) == (chosen != 1)
    client = prover.Prover("alice", versions=hello.get("versions", [hello["version"]]))
    client.hello()
    client.receive(trip(params))
    assert client.version == chosen


@pytest.mark.parametrize("versions", ["2", [1, "2"], [True], {"2": 2}])
def test_versions_that_are_not_a_list_of_integers_are_a_protocol_error(versions):
    with pytest.raises(ProtocolError):
        new_verifier().receive({"type": "hello", "version": 1, "versions": versions, "user": "alice"})


def test_a_client_refuses_a_version_it_did_not_offer():
    client = prover.Prover("alice", versions=[1])
    client.hello()
    with pytest.raises(ProtocolError, match="version 2, which was not offered"):
        client.receive({"type": "params", "server": SERVER, "salt": ALICE.salt.hex(), "scrypt": FAST_SCRYPT, "version": 2})


@pytest.mark.parametrize("server_version, client_version", [(1, 2), (2, 1)])
def test_a_version_changed_on_the_way_fails_the_key_confirmation(server_version, client_version):
    """The chosen version is in the SPAKE2+ Context: a PARAMS whose version was rewritten in
    transit (a downgrade) leaves the two sides with different keys, and the client finds out
    before it reveals its confirmation."""
    server, client = new_verifier(), prover.Prover("alice")
    server.receive(trip({"type": "hello", "version": 1, "versions": [server_version], "user": "alice"}))
    params = server.params()
    client.hello()
    params = {**params, "version": client_version} if client_version != 1 else {k: v for k, v in params.items() if k != "version"}
    event = client.receive(trip(params))
    share = client.derived(*pbkdf.register(PASSWORD.encode(), event.salt, b"alice", **event.scrypt))
    server.receive(trip(share))
    with pytest.raises(ServerNotAuthenticated):
        client.receive(trip(server.answer()))


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1], "missing"])
def test_a_version_that_is_not_an_integer_is_a_protocol_error(version):
    server = new_verifier()
    hello = {"type": "hello", "user": "alice"}
    if version != "missing":
        hello["version"] = version
    with pytest.raises(ProtocolError) as raised:
        server.receive(hello)
    assert type(raised.value) is ProtocolError
    assert raised.value.message == "hello: field 'version' missing or of the wrong type"


VERIFIER_STATES = {
    # label: (class, section 9 name)
    "hello": (verifier.AwaitingHello, "hello"),
    "named": (verifier.Named, "hello"),
    "delaying": (verifier.Delaying, "delaying"),
    "share": (verifier.AwaitingShare, "share"),
    "share-received": (verifier.ShareReceived, "share"),
    "share-waiting": (verifier.ShareWaiting, "share-waiting"),
    "confirm": (verifier.AwaitingConfirm, "confirm"),
    "ready": (verifier.Authenticated, "ready"),
    "closed": (verifier.Failed, "closed"),
}


def verifier_at(label):
    """A Verifier brought to `label` by real messages from a real Prover."""
    server, client = new_verifier(), prover.Prover("alice")
    if label != "hello":
        server.receive(client.hello())
    if label == "delaying":
        server.wait()
    if label in ("share", "share-received", "share-waiting", "confirm", "ready", "closed"):
        client.receive(server.params())
    if label in ("share-received", "share-waiting", "confirm", "ready", "closed"):
        server.receive(client.derived(*ALICE_W))
    if label == "share-waiting":
        server.wait()
    if label in ("confirm", "ready", "closed"):
        confirm = client.receive(server.answer()).reply
    if label == "ready":
        server.receive(confirm)
    if label == "closed":
        with pytest.raises(AuthenticationFailed):
            server.receive({"type": "confirm", "confirm": "00" * 32})
    assert server_where(server) == VERIFIER_STATES[label]
    return server


_, VALID_SHARE_P = spake2plus.prover_share(ALICE_W[0])
HANDSHAKE_MESSAGES = {
    "hello": {"type": "hello", "version": 1, "user": "alice"},
    "share": {"type": "share", "share": VALID_SHARE_P.hex()},
    "confirm": {"type": "confirm", "confirm": "00" * 32},
    "params": {"type": "params", "server": SERVER, "salt": "00" * 16, "scrypt": FAST_SCRYPT},
    "ok": {"type": "ok"},
    "error": {"type": "error", "code": "protocol", "message": "no"},
    "get": {"type": "get", "path": "a.txt"},
    "frobnicate": {"type": "frobnicate"},
}
VERIFIER_ACCEPTS = {("hello", "hello"), ("share", "share"), ("confirm", "confirm")}


@pytest.mark.parametrize("label, kind", [
    (label, kind) for label in VERIFIER_STATES for kind in HANDSHAKE_MESSAGES
    if (label, kind) not in VERIFIER_ACCEPTS
])
def test_the_verifier_refuses_what_its_state_does_not_accept(label, kind):
    server = verifier_at(label)
    before = server.state
    with pytest.raises(ProtocolError) as raised:
        server.receive(dict(HANDSHAKE_MESSAGES[kind]))
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"unexpected {kind!r} message in state {VERIFIER_STATES[label][1]!r}"
    assert server.state is before


def test_waiting_for_params_and_for_a_guess_slot():
    server = verifier_at("named")
    server.wait()
    assert server_where(server) == (verifier.Delaying, "delaying")
    delaying = server.state
    server.wait()  # waiting again is still waiting
    assert server.state is delaying and server.username == "alice"
    assert server.params()["type"] == "params"
    assert server_where(server) == (verifier.AwaitingShare, "share")

    server = verifier_at("share-received")
    share_p = server.state.share_p
    server.wait()
    assert server_where(server) == (verifier.ShareWaiting, "share-waiting")
    assert server.state.share_p == share_p and not server.guessing
    server.wait()
    assert server_where(server) == (verifier.ShareWaiting, "share-waiting")
    assert server.answer()["type"] == "share"
    assert server_where(server) == (verifier.AwaitingConfirm, "confirm") and server.guessing


@pytest.mark.parametrize("label", ["hello", "share", "confirm", "ready", "closed"])
def test_nothing_to_wait_for_elsewhere(label):
    server = verifier_at(label)
    with pytest.raises(AssertionError):
        server.wait()
    assert server_where(server) == VERIFIER_STATES[label]


def _coordinates(x, y):
    return "04" + x.to_bytes(32, "big").hex() + y.to_bytes(32, "big").hex()


@pytest.mark.parametrize("share, reason", [
    pytest.param("04" + "00" * 64, "point is the identity", id="identity"),
    pytest.param("02" + "11" * 64, "not an uncompressed SEC1 P-256 point", id="compressed-prefix"),
    pytest.param(_coordinates(1, 1), "point is not on the curve", id="off-curve"),
    pytest.param(_coordinates(spake2plus.FIELD_PRIME, 1), "point coordinate out of range", id="x-too-large"),
    pytest.param(_coordinates(1, spake2plus.FIELD_PRIME + 5), "point coordinate out of range", id="y-too-large"),
    pytest.param(point_hex(spake2plus.M * ALICE_W[0]), "derived point is the identity", id="w0-times-M"),
])
def test_an_invalid_share_point_is_a_protocol_error(share, reason):
    server = verifier_at("share")
    assert server.receive({"type": "share", "share": share}) == verifier.Share()  # checked at answer()
    with pytest.raises(ProtocolError) as raised:
        server.answer()
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"invalid share: {reason}"
    assert server_where(server) == (verifier.Failed, "closed")


@pytest.mark.parametrize("field, value, problem", [
    ("share", "04" * 64, "has the wrong length"),
    ("share", "04" * 66, "has the wrong length"),
    ("share", "zz" * 65, "is not hex"),
    ("share", 4, "missing or of the wrong type"),
    ("share", None, "missing or of the wrong type"),
    ("confirm", "00" * 31, "has the wrong length"),
    ("confirm", "0g" * 32, "is not hex"),
    ("confirm", ["00"], "missing or of the wrong type"),
])
def test_a_malformed_share_or_confirm_is_a_protocol_error(field, value, problem):
    label = "share" if field == "share" else "confirm"
    server = verifier_at(label)
    before = server.state
    with pytest.raises(ProtocolError) as raised:
        server.receive({"type": field, field: value})
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"{field}: field {field!r} {problem}"
    assert server.state is before


# =============================================================================================
# 2. The server's requests: serving.Serving
# =============================================================================================

PUT = {"type": "put", "path": "up/b.bin", "size": SIZE, "mtime": 1700000000.5, "mode": 0o640, "force": True}
END = {"type": "end", "size": SIZE, "sha1": SHA1_HEX}
SERVING_STATES = {
    "ready": (serving.Ready, "ready"),
    "working-get": (serving.Working, "working"),
    "working-list": (serving.Working, "working"),
    "working-put": (serving.Working, "working"),
    "upload-offered": (serving.UploadOffered, "upload-offered"),
    "receiving": (serving.Receiving, "receiving"),
    "storing": (serving.Storing, "storing"),
    "closed": (serving.Closed, "closed"),
}


def serving_where(machine):
    return type(machine.state), machine.name


def serving_at(label, offered=0):
    machine = serving.Serving()
    if label == "working-get":
        machine.receive({"type": "get", "path": "a.txt"})
    elif label == "working-list":
        machine.receive({"type": "list", "path": ""})
    elif label == "closed":
        machine.close()
    elif label != "ready":
        machine.receive(dict(PUT))
        if label != "working-put":
            machine.offer(offered, SHA1_HEX if offered else None)
        if label in ("receiving", "storing"):
            machine.receive({"type": "upload", "offset": 0})
        if label == "storing":
            machine.data(SIZE)
            machine.receive(dict(END))
    assert serving_where(machine) == SERVING_STATES[label]
    return machine


@pytest.mark.parametrize("message, request_, state", [
    ({"type": "get", "path": "docs/a.txt"}, serving.Get("docs/a.txt", 0, None), serving.Working("get")),
    ({"type": "get", "path": "a", "offset": 0}, serving.Get("a", 0, None), serving.Working("get")),
    ({"type": "get", "path": "a", "offset": 0, "sha1": SHA1_HEX}, serving.Get("a", 0, None), serving.Working("get")),
    ({"type": "get", "path": "a", "offset": 40, "sha1": SHA1_HEX},
     serving.Get("a", 40, bytes.fromhex(SHA1_HEX)), serving.Working("get")),
    ({"type": "get", "path": "a", "offset": 2**63 - 1, "sha1": SHA1_HEX.upper()},
     serving.Get("a", 2**63 - 1, bytes.fromhex(SHA1_HEX)), serving.Working("get")),
    ({"type": "stat", "path": ""}, serving.Stat(""), serving.Ready()),
    ({"type": "stat", "path": "a\x00b", "later": [1, {"x": None}]}, serving.Stat("a\x00b"), serving.Ready()),
    ({"type": "list", "path": "d"}, serving.List("d", False, False), serving.Working("list")),
    ({"type": "list", "path": "d", "recursive": True, "all": True}, serving.List("d", True, True), serving.Working("list")),
    ({"type": "list", "path": "d", "recursive": False, "all": True}, serving.List("d", False, True), serving.Working("list")),
    ({"type": "mkdir", "path": "new"}, serving.MakeDir("new", None, None), serving.Ready()),
    ({"type": "mkdir", "path": "new", "mode": 0o7777, "mtime": -(2**40) + 1},
     serving.MakeDir("new", 0o7777, -(2**40) + 1), serving.Ready()),
    ({"type": "mkdir", "path": "new", "mode": 0, "mtime": 1764090000.5}, serving.MakeDir("new", 0, 1764090000.5), serving.Ready()),
])
def test_each_request_is_parsed_into_its_object(message, request_, state):
    machine = serving.Serving()
    assert machine.receive(message) == request_
    assert machine.state == state
    assert machine.upload is None and machine.bytes_owed() == 0


def test_put_is_parsed_into_an_upload():
    machine = serving.Serving()
    put = machine.receive(dict(PUT))
    assert type(put) is serving.Put
    upload = put.upload
    assert (upload.path, upload.size, upload.mtime, upload.mode, upload.force) == ("up/b.bin", SIZE, 1700000000.5, 0o640, True)
    assert upload.offered == 0
    assert machine.state == serving.Working("put", upload) and machine.name == "working"
    assert machine.upload is upload


def test_put_with_only_its_required_members():
    put = serving.Serving().receive({"type": "put", "path": "b", "size": 0})
    assert (put.upload.path, put.upload.size, put.upload.mtime, put.upload.mode, put.upload.force) == ("b", 0, None, None, False)


@pytest.mark.parametrize("kind", ["frobnicate", "upload", "end", "ready", "stored", "ok", "", "x" * 300])
def test_an_unknown_request_is_refused_and_the_connection_stays_ready(kind):
    machine = serving.Serving()
    event = machine.receive({"type": kind, "offset": 0})
    assert type(event) is serving.Unknown and type(event.error) is Unsupported
    assert event.error.code == "unsupported"
    assert event.error.message == f"request {kind[:40]!r} is not supported by this server"
    assert serving_where(machine) == (serving.Ready, "ready")


def test_data_in_ready_is_a_protocol_error():
    machine = serving.Serving()
    with pytest.raises(ProtocolError) as raised:
        machine.data(1)
    assert type(raised.value) is ProtocolError
    assert raised.value.message == "unexpected 'data' message in state 'ready'"
    assert serving_where(machine) == (serving.Ready, "ready")


def test_the_upload_path_from_put_to_stored():
    machine = serving.Serving()
    upload = machine.receive(dict(PUT)).upload
    assert machine.offer(0, None) == {"type": "ready", "offset": 0}
    assert serving_where(machine) == (serving.UploadOffered, "upload-offered")
    assert machine.upload is upload and upload.offered == 0

    assert machine.receive({"type": "upload", "offset": 0}) == serving.UploadFrom(upload, 0)
    assert serving_where(machine) == (serving.Receiving, "receiving")
    assert machine.bytes_owed() == SIZE

    assert machine.data(30) is None
    assert machine.bytes_owed() == SIZE - 30
    assert machine.data(0) is None
    assert machine.data(SIZE - 30) is None
    assert machine.bytes_owed() == 0

    finish = machine.receive(dict(END))
    assert finish == serving.Finish(upload, SIZE, bytes.fromhex(SHA1_HEX))
    assert serving_where(machine) == (serving.Storing, "storing")
    assert machine.upload is upload and machine.bytes_owed() == 0

    assert machine.done() is None
    assert serving_where(machine) == (serving.Ready, "ready")
    assert machine.upload is None


@pytest.mark.parametrize("answer", [0, 40])
def test_a_resumed_upload_starts_at_the_offered_offset_or_at_zero(answer):
    machine = serving.Serving()
    upload = machine.receive(dict(PUT)).upload
    assert machine.offer(40, SHA1_HEX) == {"type": "ready", "offset": 40, "sha1": SHA1_HEX}
    assert upload.offered == 40
    assert machine.receive({"type": "upload", "offset": answer}) == serving.UploadFrom(upload, answer)
    assert machine.bytes_owed() == SIZE - answer
    with pytest.raises(IntegrityError):
        machine.data(SIZE - answer + 1)


@pytest.mark.parametrize("offered, offset", [(0, 1), (0, SIZE), (40, 39), (40, 41), (40, SIZE)])
def test_an_upload_at_another_offset_is_a_protocol_error(offered, offset):
    machine = serving_at("upload-offered", offered)
    before = machine.state
    with pytest.raises(ProtocolError) as raised:
        machine.receive({"type": "upload", "offset": offset})
    assert type(raised.value) is ProtocolError
    assert raised.value.message == "upload offset must be 0 or the offered offset"
    assert machine.state is before


def test_more_data_than_owed_is_an_integrity_error():
    machine = serving_at("receiving")
    machine.data(SIZE - 10)
    with pytest.raises(IntegrityError) as raised:
        machine.data(11)
    assert raised.value.message == "up/b.bin: the client sent more than the announced size"
    assert machine.bytes_owed() == 10  # nothing counted
    assert serving_where(machine) == (serving.Receiving, "receiving")


def test_a_message_while_storing_is_answered_after_the_upload():
    machine = serving_at("storing")
    upload = machine.upload
    assert machine.receive({"type": "get", "path": "a"}) == serving.Early()
    assert machine.data(5) == serving.Early()
    assert machine.receive({"type": "frobnicate"}) == serving.Early()
    assert serving_where(machine) == (serving.Storing, "storing") and machine.upload is upload
    early = machine.done()
    assert type(early) is ProtocolError
    assert early.message == "unexpected 'get' message before the upload's answer"  # the first one
    assert serving_where(machine) == (serving.Ready, "ready")
    assert machine.done() is None


def test_data_while_storing_is_answered_after_the_upload():
    machine = serving_at("storing")
    assert machine.data(1) == serving.Early()
    assert machine.done().message == "unexpected 'data' message before the upload's answer"


def test_closing_ends_every_state():
    for label in SERVING_STATES:
        machine = serving_at(label)
        machine.close()
        assert serving_where(machine) == (serving.Closed, "closed")
        assert machine.upload is None and machine.bytes_owed() == 0


def test_done_after_close_leaves_the_machine_closed():
    machine = serving_at("storing")
    machine.close()
    machine.done()
    assert serving_where(machine) == (serving.Closed, "closed")


# Section 7.8: a member with the wrong type (null included) or outside its format's range is a
# protocol error; (state, message, the field named in the error).
WRONG_MEMBERS = [
    ("ready", {"type": "get"}, "path"),
    ("ready", {"type": "get", "path": 5}, "path"),
    ("ready", {"type": "get", "path": None}, "path"),
    ("ready", {"type": "get", "path": ["a"]}, "path"),
    ("ready", {"type": "get", "path": "a\ud800"}, "path"),
    ("ready", {"type": "get", "path": "a", "offset": -1, "sha1": SHA1_HEX}, "offset"),
    ("ready", {"type": "get", "path": "a", "offset": 2**63, "sha1": SHA1_HEX}, "offset"),
    ("ready", {"type": "get", "path": "a", "offset": 1.0, "sha1": SHA1_HEX}, "offset"),
    ("ready", {"type": "get", "path": "a", "offset": "1", "sha1": SHA1_HEX}, "offset"),
    ("ready", {"type": "get", "path": "a", "offset": True, "sha1": SHA1_HEX}, "offset"),
    ("ready", {"type": "get", "path": "a", "offset": None}, "offset"),
    ("ready", {"type": "get", "path": "a", "offset": 5}, "sha1"),
    ("ready", {"type": "get", "path": "a", "offset": 5, "sha1": None}, "sha1"),
    ("ready", {"type": "get", "path": "a", "offset": 5, "sha1": "ab" * 19}, "sha1"),
    ("ready", {"type": "get", "path": "a", "offset": 5, "sha1": "ab" * 21}, "sha1"),
    ("ready", {"type": "get", "path": "a", "offset": 5, "sha1": "zz" * 20}, "sha1"),
    ("ready", {"type": "get", "path": "a", "sha1": 20}, "sha1"),  # typed even when ignored
    ("ready", {"type": "stat"}, "path"),
    ("ready", {"type": "stat", "path": False}, "path"),
    ("ready", {"type": "list", "path": "d", "recursive": 1}, "recursive"),
    ("ready", {"type": "list", "path": "d", "recursive": "true"}, "recursive"),
    ("ready", {"type": "list", "path": "d", "recursive": None}, "recursive"),
    ("ready", {"type": "list", "path": "d", "all": 0}, "all"),
    ("ready", {"type": "list", "path": {}}, "path"),
    ("ready", {"type": "mkdir", "path": "d", "mode": 0o10000}, "mode"),
    ("ready", {"type": "mkdir", "path": "d", "mode": -1}, "mode"),
    ("ready", {"type": "mkdir", "path": "d", "mode": "0755"}, "mode"),
    ("ready", {"type": "mkdir", "path": "d", "mode": True}, "mode"),
    ("ready", {"type": "mkdir", "path": "d", "mode": 493.0}, "mode"),
    ("ready", {"type": "mkdir", "path": "d", "mtime": 2**40}, "mtime"),
    ("ready", {"type": "mkdir", "path": "d", "mtime": -(2**40)}, "mtime"),
    ("ready", {"type": "mkdir", "path": "d", "mtime": float("inf")}, "mtime"),
    ("ready", {"type": "mkdir", "path": "d", "mtime": "1700000000"}, "mtime"),
    ("ready", {"type": "mkdir", "path": "d", "mtime": None}, "mtime"),
    ("ready", {"type": "mkdir", "path": "d", "mtime": False}, "mtime"),
    ("ready", {"type": "put", "path": "b"}, "size"),
    ("ready", {"type": "put", "path": "b", "size": -1}, "size"),
    ("ready", {"type": "put", "path": "b", "size": 2**63}, "size"),
    ("ready", {"type": "put", "path": "b", "size": 5.0}, "size"),
    ("ready", {"type": "put", "path": "b", "size": "5"}, "size"),
    ("ready", {"type": "put", "path": "b", "size": None}, "size"),
    ("ready", {"type": "put", "size": 5}, "path"),
    ("ready", {"type": "put", "path": "b", "size": 5, "force": "yes"}, "force"),
    ("ready", {"type": "put", "path": "b", "size": 5, "force": 1}, "force"),
    ("ready", {"type": "put", "path": "b", "size": 5, "force": None}, "force"),
    ("ready", {"type": "put", "path": "b", "size": 5, "mode": 0o10000}, "mode"),
    ("ready", {"type": "put", "path": "b", "size": 5, "mtime": [1]}, "mtime"),
    ("upload-offered", {"type": "upload"}, "offset"),
    ("upload-offered", {"type": "upload", "offset": None}, "offset"),
    ("upload-offered", {"type": "upload", "offset": "0"}, "offset"),
    ("upload-offered", {"type": "upload", "offset": 0.0}, "offset"),
    ("upload-offered", {"type": "upload", "offset": False}, "offset"),
    ("upload-offered", {"type": "upload", "offset": -1}, "offset"),
    ("receiving", {"type": "end", "sha1": SHA1_HEX}, "size"),
    ("receiving", {"type": "end", "size": -1, "sha1": SHA1_HEX}, "size"),
    ("receiving", {"type": "end", "size": "100", "sha1": SHA1_HEX}, "size"),
    ("receiving", {"type": "end", "size": SIZE}, "sha1"),
    ("receiving", {"type": "end", "size": SIZE, "sha1": SHA1_HEX[:-2]}, "sha1"),
    ("receiving", {"type": "end", "size": SIZE, "sha1": None}, "sha1"),
]


@pytest.mark.parametrize("label, message, field", WRONG_MEMBERS)
def test_a_member_of_the_wrong_type_is_a_protocol_error(label, message, field):
    machine = serving_at(label)
    before = machine.state
    with pytest.raises(ProtocolError) as raised:
        machine.receive(message)
    assert type(raised.value) is ProtocolError
    assert raised.value.message.startswith(f"{message['type']}: ")
    assert field in raised.value.message
    assert machine.state is before


# bytes.fromhex skips whitespace: a 40-character string of 13 hex pairs and spaces.
SPACED_SHA1 = " ".join(["ab"] * 13) + "  "


@pytest.mark.parametrize("label, message", [
    ("ready", {"type": "get", "path": "a", "offset": 5, "sha1": SPACED_SHA1}),
    ("receiving", {"type": "end", "size": SIZE, "sha1": SPACED_SHA1}),
])
def test_hex_with_spaces_is_a_protocol_error(label, message):
    assert len(SPACED_SHA1) == 40 and len(bytes.fromhex(SPACED_SHA1)) == 13
    machine = serving_at(label)
    with pytest.raises(ProtocolError):
        machine.receive(message)


SERVING_MESSAGES = {
    "get": {"type": "get", "path": "a.txt"},
    "stat": {"type": "stat", "path": "a.txt"},
    "list": {"type": "list", "path": ""},
    "mkdir": {"type": "mkdir", "path": "d"},
    "put": {"type": "put", "path": "b.bin", "size": 5},
    "upload": {"type": "upload", "offset": 0},
    "end": dict(END),
    "error": {"type": "error", "code": "protocol", "message": "bye"},
    "frobnicate": {"type": "frobnicate"},
}


def _serving_refuses(label, kind):
    if label == "ready":
        return kind in ("error", "data")
    if label == "upload-offered":
        return kind != "upload"
    if label == "receiving":
        return kind not in ("end", "data")
    return label != "storing"


@pytest.mark.parametrize("label, kind", [
    (label, kind) for label in SERVING_STATES for kind in [*SERVING_MESSAGES, "data"] if _serving_refuses(label, kind)
])
def test_serving_refuses_what_its_state_does_not_accept(label, kind):
    machine = serving_at(label)
    before = machine.state
    with pytest.raises(ProtocolError) as raised:
        if kind == "data":
            machine.data(1)
        else:
            machine.receive(dict(SERVING_MESSAGES[kind]))
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"unexpected {kind!r} message in state {SERVING_STATES[label][1]!r}"
    assert machine.state is before


@pytest.mark.parametrize("kind", [*SERVING_MESSAGES, "data"])
def test_storing_holds_every_message_until_the_answer(kind):
    machine = serving_at("storing")
    event = machine.data(1) if kind == "data" else machine.receive(dict(SERVING_MESSAGES[kind]))
    assert event == serving.Early()
    assert machine.done().message == f"unexpected {kind!r} message before the upload's answer"


# =============================================================================================
# 3. The client's side: Prover (PARAMS, SHARE) and Requesting
# =============================================================================================


MISSING = object()  # a member left out of a message


def client_awaiting_params():
    client = prover.Prover("alice")
    client.hello()
    return client


def params(**changes):
    message = {"type": "params", "server": SERVER, "salt": "ab" * 16, "scrypt": dict(FAST_SCRYPT)}
    message.update(changes)
    return {key: value for key, value in message.items() if value is not MISSING}



@pytest.mark.parametrize("message, server, salt, scrypt", [
    (params(scrypt={"n": 2**10, "r": 1, "p": 1}), SERVER, b"\xab" * 16, {"n": 1024, "r": 1, "p": 1}),
    (params(scrypt={"n": 2**20, "r": 8, "p": 4}), SERVER, b"\xab" * 16, {"n": 2**20, "r": 8, "p": 4}),
    (params(scrypt={"n": 2**10, "r": 16, "p": 4, "later": 1}), SERVER, b"\xab" * 16, {"n": 1024, "r": 16, "p": 4}),
    (params(salt="00" * 8), SERVER, b"\x00" * 8, FAST_SCRYPT),
    (params(salt="AB" * 64), SERVER, b"\xab" * 64, FAST_SCRYPT),
    (params(server="é" * 127), "é" * 127, b"\xab" * 16, FAST_SCRYPT),
    (params(server="s" * 255), "s" * 255, b"\xab" * 16, FAST_SCRYPT),
])
def test_params_within_bounds_are_accepted(message, server, salt, scrypt):
    client = client_awaiting_params()
    assert client.receive(message) == prover.Params(server, salt, scrypt, 0.0)
    assert client_where(client) == (prover.Deriving, "deriving") and client.state.server_id == server


UNREASONABLE = "the server asked for unreasonable password hashing: "


@pytest.mark.parametrize("message, problem", [
    (params(scrypt={"n": 2**9, "r": 8, "p": 1}), UNREASONABLE + "scrypt n must be between 1024 and 1048576"),
    (params(scrypt={"n": 2**21, "r": 1, "p": 1}), UNREASONABLE + "scrypt n must be between 1024 and 1048576"),
    (params(scrypt={"n": 3 * 1024, "r": 8, "p": 1}), UNREASONABLE + "scrypt n must be a power of two"),
    (params(scrypt={"n": 1000, "r": 8, "p": 1}), UNREASONABLE + "scrypt n must be between 1024 and 1048576"),
    (params(scrypt={"n": 1024, "r": 0, "p": 1}), UNREASONABLE + "scrypt r must be between 1 and 16"),
    (params(scrypt={"n": 1024, "r": 17, "p": 1}), UNREASONABLE + "scrypt r must be between 1 and 16"),
    (params(scrypt={"n": 1024, "r": 8, "p": 0}), UNREASONABLE + "scrypt p must be between 1 and 4"),
    (params(scrypt={"n": 1024, "r": 8, "p": 5}), UNREASONABLE + "scrypt p must be between 1 and 4"),
    (params(scrypt={"n": 2**20, "r": 9, "p": 1}), UNREASONABLE + "scrypt parameters would need more than 1 GiB"),
    (params(scrypt={"n": 2**20, "r": 16, "p": 1}), UNREASONABLE + "scrypt parameters would need more than 1 GiB"),
    (params(scrypt={"n": 1024.0, "r": 8, "p": 1}), UNREASONABLE + "scrypt n must be between 1024 and 1048576"),
    (params(scrypt={"n": "1024", "r": 8, "p": 1}), UNREASONABLE + "scrypt n must be between 1024 and 1048576"),
    (params(scrypt={"n": 1024, "r": True, "p": 1}), UNREASONABLE + "scrypt r must be between 1 and 16"),
    (params(scrypt={"n": 1024, "r": 8, "p": None}), UNREASONABLE + "scrypt p must be between 1 and 4"),
    (params(scrypt={"n": 1024, "r": 8}), UNREASONABLE + "scrypt parameters must have n, r and p"),
    (params(scrypt=[1024, 8, 1]), UNREASONABLE + "scrypt parameters must have n, r and p"),
    (params(scrypt="n=1024"), UNREASONABLE + "scrypt parameters must have n, r and p"),
    (params(scrypt=None), UNREASONABLE + "scrypt parameters must have n, r and p"),
    (params(scrypt=MISSING), UNREASONABLE + "scrypt parameters must have n, r and p"),
    (params(salt="00" * 7), "params: field 'salt' has the wrong length"),
    (params(salt="00" * 65), "params: field 'salt' has the wrong length"),
    (params(salt="0" * 31), "params: field 'salt' is not hex"),
    (params(salt="zz" * 16), "params: field 'salt' is not hex"),
    (params(salt=16), "params: field 'salt' missing or of the wrong type"),
    (params(salt=MISSING), "params: field 'salt' missing or of the wrong type"),
    (params(server=""), "params: field 'server' is empty or too long"),
    (params(server="s" * 256), "params: field 'server' is empty or too long"),
    (params(server="é" * 128), "params: field 'server' is empty or too long"),
    (params(server="\ud800"), "params: field 'server' is not valid UTF-8"),
    (params(server=None), "params: field 'server' missing or of the wrong type"),
    (params(server=MISSING), "params: field 'server' missing or of the wrong type"),
])
def test_params_out_of_bounds_are_a_protocol_error_before_any_scrypt(message, problem):
    client = client_awaiting_params()
    with pytest.raises(ProtocolError) as raised:
        client.receive(message)
    assert type(raised.value) is ProtocolError
    assert raised.value.message == problem
    assert client_where(client) == (prover.AwaitingParams, "params")


def test_a_short_salt_spelled_with_spaces_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        client_awaiting_params().receive(params(salt="00 00 00 00 00  "))


PROVER_STATES = {
    "start": (prover.Start, "start"),
    "params": (prover.AwaitingParams, "params"),
    "deriving": (prover.Deriving, "deriving"),
    "share": (prover.AwaitingShare, "share"),
    "ok": (prover.AwaitingOk, "ok"),
    "ready": (prover.Authenticated, "ready"),
    "closed": (prover.Failed, "closed"),
}


def prover_at(label):
    """(a Prover brought to `label` by a real Verifier, that Verifier's SHARE or None)."""
    client, server, answer = prover.Prover("alice"), new_verifier(), None
    order = list(PROVER_STATES)
    reached = order.index(label) if label != "closed" else order.index("share")
    if reached >= order.index("params"):
        server.receive(client.hello())
    if reached >= order.index("deriving"):
        client.receive(server.params())
    if reached >= order.index("share"):
        server.receive(client.derived(*ALICE_W))
        answer = server.answer()
    if label == "closed":
        with pytest.raises(ServerNotAuthenticated):
            client.receive(dict(answer, confirm="00" * 32))
    if reached >= order.index("ok"):
        reply = client.receive(answer).reply
    if reached >= order.index("ready"):
        client.receive(server.receive(reply).reply)
    assert client_where(client) == PROVER_STATES[label]
    return client, answer


PROVER_ACCEPTS = {("params", "params"), ("share", "share"), ("ok", "ok")}
CLIENT_HANDSHAKE_MESSAGES = {**HANDSHAKE_MESSAGES, "share": {"type": "share", "share": VALID_SHARE_P.hex(), "confirm": "00" * 32}}


@pytest.mark.parametrize("label, kind", [
    (label, kind) for label in PROVER_STATES for kind in CLIENT_HANDSHAKE_MESSAGES if (label, kind) not in PROVER_ACCEPTS
])
def test_the_prover_refuses_what_its_state_does_not_accept(label, kind):
    client, _ = prover_at(label)
    before = client.state
    with pytest.raises(ProtocolError) as raised:
        client.receive(dict(CLIENT_HANDSHAKE_MESSAGES[kind]))
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"unexpected {kind!r} message in state {PROVER_STATES[label][1]!r}"
    assert client.state is before


@pytest.mark.parametrize("change, problem", [
    ({"share": "04" * 64}, "share: field 'share' has the wrong length"),
    ({"share": None}, "share: field 'share' missing or of the wrong type"),
    ({"confirm": "00" * 33}, "share: field 'confirm' has the wrong length"),
    ({"confirm": "xy" * 32}, "share: field 'confirm' is not hex"),
    ({"confirm": MISSING}, "share: field 'confirm' missing or of the wrong type"),
])
def test_a_malformed_server_share_is_a_protocol_error(change, problem):
    client, answer = prover_at("share")
    before = client.state
    message = {key: value for key, value in {**answer, **change}.items() if value is not MISSING}
    with pytest.raises(ProtocolError) as raised:
        client.receive(message)
    assert type(raised.value) is ProtocolError and raised.value.message == problem
    assert client.state is before


@pytest.mark.parametrize("share, reason", [
    pytest.param("04" + "00" * 64, "point is the identity", id="identity"),
    pytest.param(_coordinates(1, 1), "point is not on the curve", id="off-curve"),
    pytest.param(_coordinates(1, spake2plus.FIELD_PRIME), "point coordinate out of range", id="y-too-large"),
    pytest.param(point_hex(spake2plus.N * ALICE_W[0]), "derived point is the identity", id="w0-times-N"),
])
def test_an_invalid_server_share_point_is_a_protocol_error(share, reason):
    client, answer = prover_at("share")
    with pytest.raises(ProtocolError) as raised:
        client.receive(dict(answer, share=share))
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"invalid share from the server: {reason}"
    assert client_where(client) == (prover.Failed, "closed")


def test_a_server_share_with_uppercase_hex_is_read():
    client, answer = prover_at("share")
    event = client.receive({key: value.upper() if key != "type" else value for key, value in answer.items()})
    assert type(event) is prover.Confirm
    assert client_where(client) == (prover.AwaitingOk, "ok")


# -- requesting.Requesting


class Request:
    """What the glue keeps with a request: here only the path the messages name."""

    def __init__(self, remote="docs/a.txt"):
        self.remote = remote

    def __repr__(self):
        return f"Request({self.remote!r})"


def entry(name="a.txt", **changes):
    return {"name": name, "kind": "file", "size": 5, "mtime": 1764090000.5, "mode": 0o644, **changes}


FILE = {"type": "file", "name": "a.txt", "size": SIZE, "mtime": 1700000000.5, "mode": 0o644, "digest": "sha1", "offset": 0}
CLIENT_MESSAGES = {
    "entry": {"type": "entry", "entry": entry()},
    "done": {"type": "done"},
    "entries": {"type": "entries", "entries": [entry()], "more": False},
    "file": dict(FILE),
    "end": dict(END),
    "ready": {"type": "ready", "offset": 0},
    "stored": {"type": "stored", "size": SIZE, "sha1": SHA1_HEX},
    "ok": {"type": "ok"},
    "params": params(),
    "get": {"type": "get", "path": "a"},
    "frobnicate": {"type": "frobnicate"},
}
REQUESTING_STATES = {
    # label: (state class or None, section 9 name)
    "ready": (type(None), "ready"),
    "stat": (requesting.AwaitingEntry, "stat"),
    "mkdir": (requesting.AwaitingDone, "mkdir"),
    "listing": (requesting.Listing, "listing"),
    "preparing": (requesting.Preparing, "preparing"),
    "get-header": (requesting.AwaitingFile, "get-header"),
    "get-data": (requesting.ReceivingFile, "get-data"),
    "put-offer": (requesting.AwaitingReady, "put-offer"),
    "put-sending": (requesting.Sending, "put-sending"),
    "put-stored": (requesting.AwaitingStored, "put-stored"),
}
REQUESTING_ACCEPTS = {
    ("stat", "entry"), ("mkdir", "done"), ("listing", "entries"), ("get-header", "file"), ("get-data", "end"),
    ("get-data", "data"), ("put-offer", "ready"), ("put-stored", "stored"),
}
ANSWER_LABELS = ["stat", "mkdir", "listing", "get-header", "put-offer", "put-stored"]


def requesting_where(machine):
    return type(machine.current.state if machine.current else None), machine.name


def requesting_at(label, resume_from=0):
    """(a Requesting whose one request is in `label`, that request), as the glue brings it."""
    machine, request = requesting.Requesting(), Request()
    initial = {
        "stat": requesting.AwaitingEntry(), "mkdir": requesting.AwaitingDone(), "listing": requesting.Listing(),
        "preparing": requesting.Preparing(), "get-header": requesting.AwaitingFile(resume_from),
        "get-data": requesting.AwaitingFile(0), "put-offer": requesting.AwaitingReady(SIZE),
        "put-sending": requesting.Sending(SIZE), "put-stored": requesting.AwaitingStored(SIZE, SHA1_HEX),
    }
    if label != "ready":
        machine.begin(request, initial[label])
    if label == "get-data":
        machine.receive(dict(FILE))
    assert requesting_where(machine) == REQUESTING_STATES[label]
    return machine, request


def test_stat_answered_with_its_entry():
    machine, request = requesting_at("stat")
    answer = machine.receive({"type": "entry", "entry": entry("a.txt", kind="door", mode=0o4755, later=1)})
    assert type(answer) is requesting.Answered and answer.request is request
    assert answer.result.to_json() == {"name": "a.txt", "kind": "other", "size": 5, "mtime": 1764090000.5, "mode": 0o755}
    assert answer.result["kind"] == "other"
    # The exchange stays current until the glue is done with it.
    assert requesting_where(machine) == (requesting.AwaitingEntry, "stat")
    machine.finish(request)
    assert requesting_where(machine) == (type(None), "ready") and machine.current is None


def test_mkdir_answered_with_done():
    machine, request = requesting_at("mkdir")
    assert machine.receive({"type": "done", "later": True}) == requesting.Answered(request, None)


@pytest.mark.parametrize("item, problem", [
    ("a.txt", "entry: an object is expected"),
    (None, "entry: an object is expected"),
    (entry(name=MISSING), "entry: field 'name' missing or of the wrong type"),
    (entry(name=""), "entry: field 'name' is empty or too long"),
    (entry(name="x" * 4097), "entry: field 'name' is empty or too long"),
    (entry(size=-1), "entry: field 'size' out of range"),
    (entry(size="5"), "entry: field 'size' missing or of the wrong type"),
    (entry(mtime=None), "entry: field 'mtime' missing or of the wrong type"),
    (entry(mode=0o10000), "entry: field 'mode' out of range"),
    (entry(name="/etc/passwd"), "the server sent an unsafe name in a listing: '/etc/passwd'"),
    (entry(name="a/../../b"), "the server sent an unsafe name in a listing: 'a/../../b'"),
    (entry(name=".."), "the server sent an unsafe name in a listing: '..'"),
    (entry(name="./a"), "the server sent an unsafe name in a listing: './a'"),
    (entry(name="a//b"), "the server sent an unsafe name in a listing: 'a//b'"),
    (entry(name="a/"), "the server sent an unsafe name in a listing: 'a/'"),
])
def test_a_bad_entry_is_a_protocol_error(item, problem):
    if isinstance(item, dict):
        item = {key: value for key, value in item.items() if value is not MISSING}
    for label, message in [("stat", {"type": "entry", "entry": item}),
                           ("listing", {"type": "entries", "entries": [entry("ok"), item], "more": False})]:
        machine, _ = requesting_at(label)
        with pytest.raises(ProtocolError) as raised:
            machine.receive(message)
        assert type(raised.value) is ProtocolError and raised.value.message == problem


def test_a_listing_in_batches_sorted_by_name():
    machine, request = requesting_at("listing")
    assert machine.receive({"type": "entries", "entries": [entry("c"), entry("a/b", kind="dir")], "more": True}) is None
    assert machine.receive({"type": "entries", "entries": [], "more": True}) is None
    assert requesting_where(machine) == (requesting.Listing, "listing")
    answer = machine.receive({"type": "entries", "entries": [entry("b", kind="partial"), entry("a", kind="dir")], "more": False})
    assert type(answer) is requesting.Answered and answer.request is request
    assert [(item.name, item.kind) for item in answer.result] == [("a", "dir"), ("a/b", "dir"), ("b", "partial"), ("c", "file")]


@pytest.mark.parametrize("entries", ["a", None, {"name": "a"}, 3])
def test_entries_that_are_not_a_list_are_a_protocol_error(entries):
    machine, _ = requesting_at("listing")
    with pytest.raises(ProtocolError) as raised:
        machine.receive({"type": "entries", "entries": entries, "more": False})
    assert raised.value.message == "entries: a list is expected"


def test_a_listing_over_the_byte_budget_is_a_protocol_error(monkeypatch):
    cost = sys.getsizeof("n1") + requesting.ENTRY_BYTES
    monkeypatch.setattr(requesting, "MAX_LISTING_BYTES", 3 * cost)
    machine, _ = requesting_at("listing")
    assert machine.receive({"type": "entries", "entries": [entry("n1"), entry("n2")], "more": True}) is None
    assert machine.receive({"type": "entries", "entries": [entry("n3")], "more": True}) is None
    assert machine.current.state.held == 3 * cost  # at the budget: still held
    with pytest.raises(ProtocolError) as raised:
        machine.receive({"type": "entries", "entries": [entry("n4")], "more": False})
    assert raised.value.message.startswith("the listing of docs/a.txt is larger than this client holds")
    assert [item.name for item in machine.current.state.entries] == ["n1", "n2", "n3"]


@pytest.mark.parametrize("message", [
    {"type": "entries", "entries": [], "more": 1},
    {"type": "entries", "entries": [], "more": "false"},
    {"type": "entries", "entries": [], "more": None},
    {"type": "entries", "entries": [entry(kind=5)], "more": False},
    {"type": "entries", "entries": [entry(kind=None)], "more": False},
])
def test_wrong_types_in_a_listing_are_a_protocol_error(message):
    machine, _ = requesting_at("listing")
    with pytest.raises(ProtocolError):
        machine.receive(message)


@pytest.mark.parametrize("resume_from, changes, offset", [
    (0, {}, 0),
    (0, {"offset": MISSING, "mode": MISSING}, 0),
    (40, {"offset": 40}, 40),
    (40, {"offset": 0}, 0),  # the file changed: start over
    (SIZE, {"offset": SIZE}, SIZE),
    (0, {"mtime": 1700000000, "digest": "sha1"}, 0),
])
def test_a_file_header_starts_the_download(resume_from, changes, offset):
    machine, request = requesting_at("get-header", resume_from)
    message = {key: value for key, value in {**FILE, **changes}.items() if value is not MISSING}
    header = machine.receive(message)
    mode = None if changes.get("mode") is MISSING else 0o644
    assert header == requesting.FileHeader(request, SIZE, message["mtime"], mode, offset)
    assert requesting_where(machine) == (requesting.ReceivingFile, "get-data")
    assert machine.bytes_owed() == SIZE - offset


@pytest.mark.parametrize("resume_from, changes, error, problem", [
    (0, {"offset": 40}, ProtocolError, "the server resumed at an offset we did not ask for"),
    (40, {"offset": 39}, ProtocolError, "the server resumed at an offset we did not ask for"),
    (40, {"offset": 41}, ProtocolError, "the server resumed at an offset we did not ask for"),
    (SIZE + 1, {"offset": SIZE + 1}, ProtocolError, "the server resumed past the end of the file"),
    (0, {"digest": "md5"}, Unsupported, "the server offers digest 'md5', which this client does not know"),
    (0, {"digest": ""}, ProtocolError, "file: field 'digest' is empty or too long"),
    (0, {"digest": MISSING}, ProtocolError, "file: field 'digest' missing or of the wrong type"),
    (0, {"size": -1}, ProtocolError, "file: field 'size' out of range"),
    (0, {"size": MISSING}, ProtocolError, "file: field 'size' missing or of the wrong type"),
    (0, {"mtime": 2**40}, ProtocolError, "file: field 'mtime' out of range"),
    (0, {"mode": "644"}, ProtocolError, "file: field 'mode' missing or of the wrong type"),
    (0, {"offset": None}, ProtocolError, "file: field 'offset' missing or of the wrong type"),
])
def test_a_bad_file_header_is_refused(resume_from, changes, error, problem):
    machine, _ = requesting_at("get-header", resume_from)
    before = machine.current.state
    message = {key: value for key, value in {**FILE, **changes}.items() if value is not MISSING}
    with pytest.raises(error) as raised:
        machine.receive(message)
    assert type(raised.value) is error and raised.value.message == problem
    assert machine.current.state is before


def test_the_data_of_a_file_then_its_end():
    machine, request = requesting_at("get-data")
    assert machine.bytes_owed() == SIZE
    assert machine.data(60) is None and machine.bytes_owed() == 40
    assert machine.data(40) is None and machine.bytes_owed() == 0
    assert machine.receive({"type": "end", "size": SIZE, "sha1": SHA1_HEX.upper()}) == requesting.FileEnd(
        request, SIZE, bytes.fromhex(SHA1_HEX))


def test_data_past_the_announced_size_is_an_integrity_error():
    machine, _ = requesting_at("get-data")
    machine.data(SIZE - 1)
    with pytest.raises(IntegrityError) as raised:
        machine.data(2)
    assert raised.value.message == "docs/a.txt: the server sent more than the announced size"
    assert machine.bytes_owed() == 1


@pytest.mark.parametrize("size", [SIZE - 1, SIZE + 1, 0])
def test_an_end_with_another_size_is_an_integrity_error(size):
    machine, _ = requesting_at("get-data")
    with pytest.raises(IntegrityError) as raised:
        machine.receive({"type": "end", "size": size, "sha1": SHA1_HEX})
    assert raised.value.message == "docs/a.txt: the file changed size on the server while it was sent"


@pytest.mark.parametrize("message, problem", [
    ({"type": "end", "sha1": SHA1_HEX}, "end: field 'size' missing or of the wrong type"),
    ({"type": "end", "size": SIZE}, "end: field 'sha1' missing or of the wrong type"),
    ({"type": "end", "size": SIZE, "sha1": SHA1_HEX + "00"}, "end: field 'sha1' has the wrong length"),
])
def test_a_malformed_end_is_a_protocol_error(message, problem):
    machine, _ = requesting_at("get-data")
    with pytest.raises(ProtocolError) as raised:
        machine.receive(message)
    assert type(raised.value) is ProtocolError and raised.value.message == problem


@pytest.mark.parametrize("message, offset, sha1", [
    ({"type": "ready", "offset": 0}, 0, None),
    ({"type": "ready", "offset": 0, "sha1": "not even hex"}, 0, None),  # ignored at offset 0
    ({"type": "ready", "offset": 40, "sha1": SHA1_HEX}, 40, bytes.fromhex(SHA1_HEX)),
    ({"type": "ready", "offset": SIZE, "sha1": SHA1_HEX.upper()}, SIZE, bytes.fromhex(SHA1_HEX)),
])
def test_ready_offers_an_offset(message, offset, sha1):
    machine, request = requesting_at("put-offer")
    assert machine.receive(message) == requesting.Offered(request, offset, sha1)
    assert requesting_where(machine) == (requesting.Preparing, "preparing")
    machine.move(request, requesting.Sending(SIZE))
    assert requesting_where(machine) == (requesting.Sending, "put-sending")
    machine.move(request, requesting.AwaitingStored(SIZE, SHA1_HEX))
    assert requesting_where(machine) == (requesting.AwaitingStored, "put-stored")


@pytest.mark.parametrize("message, problem", [
    ({"type": "ready", "offset": SIZE + 1, "sha1": SHA1_HEX}, "ready: field 'offset' out of range"),
    ({"type": "ready", "offset": -1}, "ready: field 'offset' out of range"),
    ({"type": "ready", "offset": 40}, "ready: field 'sha1' missing or of the wrong type"),
    ({"type": "ready", "offset": 40, "sha1": SHA1_HEX[2:]}, "ready: field 'sha1' has the wrong length"),
    ({"type": "ready"}, "ready: field 'offset' missing or of the wrong type"),
])
def test_a_bad_ready_is_a_protocol_error(message, problem):
    machine, _ = requesting_at("put-offer")
    with pytest.raises(ProtocolError) as raised:
        machine.receive(message)
    assert type(raised.value) is ProtocolError and raised.value.message == problem
    assert requesting_where(machine) == (requesting.AwaitingReady, "put-offer")


def test_stored_confirms_the_upload():
    machine, request = requesting_at("put-stored")
    assert machine.receive({"type": "stored", "size": SIZE, "sha1": SHA1_HEX.upper()}) == requesting.Stored(
        request, SIZE, SHA1_HEX)


@pytest.mark.parametrize("size, sha1", [
    (SIZE + 1, SHA1_HEX),
    (SIZE - 1, SHA1_HEX),
    (SIZE, hashlib.sha1(b"something else").hexdigest()),
])
def test_stored_with_another_size_or_sha1_is_an_integrity_error(size, sha1):
    machine, _ = requesting_at("put-stored")
    with pytest.raises(IntegrityError) as raised:
        machine.receive({"type": "stored", "size": size, "sha1": sha1})
    assert raised.value.message == "docs/a.txt: the server stored something else than what was sent"


@pytest.mark.parametrize("label, kind", [
    (label, kind) for label in REQUESTING_STATES for kind in [*CLIENT_MESSAGES, "data"]
    if (label, kind) not in REQUESTING_ACCEPTS
])
def test_requesting_refuses_what_its_state_does_not_accept(label, kind):
    machine, _ = requesting_at(label)
    before = machine.current.state if machine.current else None
    with pytest.raises(ProtocolError) as raised:
        if kind == "data":
            machine.data(1)
        else:
            machine.receive(dict(CLIENT_MESSAGES[kind]))
    assert type(raised.value) is ProtocolError
    assert raised.value.message == f"unexpected {kind!r} message in state {REQUESTING_STATES[label][1]!r}"
    assert (machine.current.state if machine.current else None) is before


# Section 3.7, literally: the codes that refuse a request's first answer (and STORED), and the
# two that refuse only in answer to an upload's END.
SPEC_REFUSALS = {"not-found", "not-a-file", "permission-denied", "bad-path", "exists", "too-large", "busy", "unsupported"}
END_REFUSALS = {"integrity", "no-space"}
# Where each of those refuses (section 3.7): no-space any write, integrity only an upload's END.
REFUSED_WHERE = {"no-space": {"mkdir", "put-offer", "put-stored"}, "integrity": {"put-stored"}}
CODES = [*sorted(errors.WIRE_CODES), "no-such-code"]


def test_the_refusal_codes_are_section_3_7s():
    assert errors.REFUSAL_CODES == SPEC_REFUSALS
    assert errors.WRITE_REFUSAL_CODES == SPEC_REFUSALS | {"no-space"}
    assert errors.UPLOAD_END_REFUSAL_CODES == SPEC_REFUSALS | END_REFUSALS < errors.WIRE_CODES


@pytest.mark.parametrize("label", list(REQUESTING_STATES))
def test_an_error_refuses_the_request_or_ends_the_connection(label):
    for code in CODES:
        machine, request = requesting_at(label)
        before = machine.current.state if machine.current else None
        event = machine.receive({"type": "error", "code": code, "message": f"said {code}"})
        refusal = label in ANSWER_LABELS and (code in SPEC_REFUSALS or label in REFUSED_WHERE.get(code, ()))
        expected_class = errors.BY_CODE.get(code, EketwistError) if code in errors.WIRE_CODES else EketwistError
        if refusal:
            assert type(event) is requesting.Refused and event.request is request, code
        else:
            assert type(event) is requesting.Failed, code
        assert type(event.error) is expected_class, code
        assert event.error.message == f"said {code}"
        assert (machine.current.state if machine.current else None) is before


@pytest.mark.parametrize("message, error_class, text", [
    ({"type": "error", "code": "not-found"}, errors.NotFound, "No such file on the server."),
    ({"type": "error", "code": "busy", "message": ""}, errors.Busy, errors.Busy.__doc__.strip()),
    ({"type": "error", "code": "exists", "message": 5}, errors.Exists, errors.Exists.__doc__.strip()),
])
def test_a_refusal_without_a_message_gets_the_default_one(message, error_class, text):
    machine, request = requesting_at("put-offer")
    event = machine.receive(message)
    assert type(event) is requesting.Refused and event.request is request
    assert type(event.error) is error_class and event.error.message == text


@pytest.mark.parametrize("code", [None, 404, ["not-found"]])
def test_an_error_code_that_is_not_a_string_is_fatal(code):
    machine, _ = requesting_at("stat")
    event = machine.receive({"type": "error", "code": code, "message": "x"})
    assert type(event) is requesting.Failed and type(event.error) is EketwistError


@pytest.mark.parametrize("label", ANSWER_LABELS)
def test_no_space_refuses_only_writes_and_integrity_only_an_uploads_end(label):
    for code in sorted(END_REFUSALS):
        machine, _ = requesting_at(label)
        event = machine.receive({"type": "error", "code": code, "message": "x"})
        expected = requesting.Refused if label in REFUSED_WHERE[code] else requesting.Failed
        assert type(event) is expected, code


@pytest.mark.parametrize("code", ["usage", "connection", "local-io"])
def test_a_code_outside_section_8_is_internal(code):
    machine, _ = requesting_at("stat")
    event = machine.receive({"type": "error", "code": code, "message": "x"})
    assert type(event) is requesting.Failed
    assert type(event.error) is EketwistError and event.error.exit_code == errors.EXIT_FAILURE


def test_abandon_returns_every_request_in_flight():
    machine, request = requesting_at("get-data")
    assert machine.abandon() == [request]
    assert requesting_where(machine) == (type(None), "ready") and machine.bytes_owed() == 0


# =============================================================================================
# 4. The client machines fuzzed: an event or an EketwistError, and a known state, always
# =============================================================================================

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
PROVER_NAMES = {"start", "params", "deriving", "share", "ok", "ready", "closed"}
REQUESTING_NAMES = {"ready", "stat", "mkdir", "listing", "preparing", "get-header", "get-data", "put-offer",
                    "put-sending", "put-stored"}
PROVER_EVENTS = (prover.Params, prover.Confirm, prover.Done)
REQUESTING_EVENTS = (requesting.Answered, requesting.Refused, requesting.Failed, requesting.FileHeader,
                     requesting.FileEnd, requesting.Offered, requesting.Stored)

FUZZ_TYPES = ["params", "share", "ok", "error", "hello", "confirm", "entry", "done", "entries", "file", "end",
              "ready", "stored", "data", "get", "put", "frobnicate", "x" * 300, ""]
FUZZ_FIELDS = ["server", "salt", "scrypt", "share", "confirm", "code", "message", "entry", "entries", "more",
               "name", "kind", "size", "mtime", "mode", "digest", "offset", "sha1", "path"]
# "$share" and "$confirm" stand for the example's real server SHARE values, when it has one.
MEANINGFUL = st.sampled_from([
    "", "..", "/etc/passwd", "a/../b", "sha1", "md5", SHA1_HEX, SHA1_HEX.upper(), SPACED_SHA1, "00" * 16,
    "$share", "$confirm", "04" + "00" * 64, point_hex(spake2plus.N * ALICE_W[0]), VALID_SHARE_P.hex(),
    *sorted(errors.WIRE_CODES), "local-io", "usage", "\ud800", "é" * 128, "file", "dir", "partial",
]) | st.sampled_from([0, 1, 39, 40, 41, SIZE - 1, SIZE, SIZE + 1, 2**63 - 1, 2**63, -1, 2**40, 1.5, True, False, None])
COMPOUND = st.sampled_from([
    dict(FAST_SCRYPT), {"n": 2**20, "r": 16, "p": 1}, {"n": 1024, "r": 8}, entry(), entry("a/b", kind=5),
    [entry()], [entry("b"), entry("a")], [entry("../x")], [entry(name=None)], [entry(mode="644")],
    [entry(size=None)], [entry(mtime=float("nan"))], [entry(kind=None), "a"], [],
])
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
    | st.text(max_size=40) | MEANINGFUL
)
# One level of nesting is enough here: no member of a message to the client nests deeper
# than an entry in a list, and deeper values cost generation time without reaching more code.
json_values = scalars | COMPOUND | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=6), scalars, max_size=3)
random_messages = st.builds(
    lambda kind, members: {**members, "type": kind},
    st.sampled_from(FUZZ_TYPES), st.dictionaries(st.sampled_from(FUZZ_FIELDS), json_values, max_size=4),
)
# Well-formed messages for each machine, as they are and with a member or two changed or
# removed: sequences accepted step by step reach the deeper states and checks.
PROVER_TEMPLATES = [
    params(), {"type": "share", "share": "$share", "confirm": "$confirm"}, {"type": "ok"},
    {"type": "error", "code": "auth-failed", "message": "m"},
]
REQUESTING_TEMPLATES = [
    *(message for kind, message in CLIENT_MESSAGES.items() if kind not in ("ok", "params", "get", "frobnicate")),
    dict(FILE, offset=40), {"type": "ready", "offset": 40, "sha1": SHA1_HEX},
    {"type": "entries", "entries": [entry("b"), entry("a", kind="dir")], "more": True},
    {"type": "error", "code": "not-found", "message": "m"}, {"type": "error", "code": "integrity", "message": "m"},
    {"type": "error", "code": "protocol", "message": "m"},
]


def _mutations(template):
    keys = sorted(set(template) - {"type"}) or FUZZ_FIELDS
    return st.builds(
        lambda changes, removed: {
            **{key: value for key, value in template.items() if key not in removed}, **changes, "type": template["type"],
        },
        st.dictionaries(st.sampled_from(keys), json_values, max_size=2),
        st.lists(st.sampled_from(keys), max_size=1),
    )


def messages_for(templates):
    return random_messages | st.one_of([_mutations(template) for template in templates]) | st.sampled_from(templates)


# Entries with a member changed or removed, alone (ENTRY) or in a batch (ENTRIES).
mutated_entries = _mutations({"type": "entry", **entry()}).map(lambda item: {k: v for k, v in item.items() if k != "type"})
entry_messages = st.builds(
    lambda items, more: {"type": "entries", "entries": items, "more": more},
    st.lists(mutated_entries | st.builds(entry, st.sampled_from(["a", "b/c", "d"])), max_size=3), st.booleans(),
) | st.builds(lambda item: {"type": "entry", "entry": item}, mutated_entries)


data_lengths = st.integers(0, 2 * SIZE) | st.sampled_from([2**63 - 1, 2**64])


def _fill(value, answer):
    """The example's real SHARE values in place of their placeholders, at any depth."""
    if isinstance(value, str) and answer is not None and value in ("$share", "$confirm"):
        return answer[value[1:]]
    if isinstance(value, dict):
        return {key: _fill(item, answer) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, answer) for item in value]
    return value


# Generating an example costs far more than running it (a few milliseconds against
# microseconds), so each generated sequence is fed to a machine in every state in turn:
# EXAMPLES examples per state, at the price of EXAMPLES generations per machine.


def _figures(capsys, machine, stats):
    with capsys.disabled():
        print(
            f"\n[figures] {machine} fuzzer: {EXAMPLES} examples from each of {len(stats)} states, "
            f"{sum(s['events'] for s in stats.values())} events, {sum(s['errors'] for s in stats.values())} "
            f"EketwistErrors, then in {sorted(set().union(*(s['names'] for s in stats.values())))}; 0 other exceptions"
        )


def _fuzz_prover(client, sequence, answer, stats):
    for message in sequence:
        try:
            event = client.receive(_fill(message, answer))
        except EketwistError:
            stats["errors"] += 1
            assert client.name in PROVER_NAMES
            return  # the glue ends the connection
        finally:
            stats["names"].add(client.name)
        assert isinstance(event, PROVER_EVENTS), event
        stats["events"] += 1
        if isinstance(event, prover.Params):
            client.derived(*ALICE_W)  # what the glue does once scrypt has run
        assert client.name in PROVER_NAMES


def test_the_prover_survives_anything_in_every_state(capsys):
    # Driven to each state once; each example starts from a copy (states are immutable).
    reached = {label: prover_at(label) for label in PROVER_STATES}
    stats = {label: {"examples": 0, "events": 0, "errors": 0, "names": set()} for label in PROVER_STATES}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(sequence=st.lists(messages_for(PROVER_TEMPLATES), min_size=1, max_size=4))
    def fuzz(sequence):
        for label, (template, answer) in reached.items():
            client = prover.Prover("alice")
            client.state = template.state
            stats[label]["examples"] += 1
            _fuzz_prover(client, sequence, answer, stats[label])

    fuzz()
    _figures(capsys, "Prover", stats)
    assert {label: figures["examples"] for label, figures in stats.items()} == dict.fromkeys(PROVER_STATES, EXAMPLES)


requesting_inputs = st.lists(
    st.one_of(
        st.tuples(st.just("message"), messages_for(REQUESTING_TEMPLATES) | entry_messages),
        st.tuples(st.just("data"), data_lengths),
        st.tuples(st.just("begin"), st.sampled_from([label for label in REQUESTING_STATES if label != "ready"])),
    ),
    min_size=1, max_size=5,
)


def _glue(machine, event):
    """What the glue does with an event, so that a sequence goes on from where it leads."""
    if isinstance(event, (requesting.Answered, requesting.Refused, requesting.FileEnd, requesting.Stored)):
        machine.finish(event.request)
    elif isinstance(event, requesting.Offered):
        machine.move(event.request, requesting.AwaitingStored(SIZE, SHA1_HEX))


def _fuzz_requesting(machine, sequence, resume_from, stats):
    for kind, value in sequence:
        if kind == "begin":
            if machine.current is None:  # one request in flight at a time, as the glue
                begun, _ = requesting_at(value, resume_from)
                machine.begin(begun.current.request, begun.current.state)
            continue
        try:
            event = machine.receive(value) if kind == "message" else machine.data(value)
        except EketwistError:
            stats["errors"] += 1
            assert machine.name in REQUESTING_NAMES
            return  # the glue ends the connection
        finally:
            stats["names"].add(machine.name)
        assert event is None or isinstance(event, REQUESTING_EVENTS), event
        assert machine.name in REQUESTING_NAMES
        if isinstance(event, requesting.Failed):
            return
        stats["events"] += event is not None
        _glue(machine, event)
        assert machine.name in REQUESTING_NAMES
        assert machine.bytes_owed() >= 0


def test_requesting_survives_anything_in_every_state(capsys):
    stats = {label: {"examples": 0, "events": 0, "errors": 0, "names": set()} for label in REQUESTING_STATES}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(sequence=requesting_inputs, resume_from=st.sampled_from([0, 40]))
    def fuzz(sequence, resume_from):
        for label in REQUESTING_STATES:
            machine, _ = requesting_at(label, resume_from)
            stats[label]["examples"] += 1
            _fuzz_requesting(machine, sequence, resume_from, stats[label])

    fuzz()
    _figures(capsys, "Requesting", stats)
    assert {label: figures["examples"] for label, figures in stats.items()} == dict.fromkeys(REQUESTING_STATES, EXAMPLES)


def test_the_outbox_keeps_the_order_requests_were_made_in():
    """A request being prepared keeps its place, and an upload holds the ones behind it until
    its messages and DATA have gone (docs/protocol.md section 7.9, rule 2)."""
    outbox = requesting.Outbox()
    outbox.add("stat", requesting.AwaitingEntry(), {"type": "stat"})
    outbox.add("resumed get", None, None)  # hashing its part file
    outbox.add("put", requesting.AwaitingReady(5), {"type": "put"})
    outbox.add("list", requesting.Listing(), {"type": "list"})
    assert outbox.next().request == "stat"
    assert outbox.preparing and outbox.next() is None, "the rest waits for the one being prepared"
    outbox.prepared("resumed get", requesting.AwaitingFile(10), {"type": "get", "offset": 10})
    sent = outbox.next()
    assert (sent.request, sent.state) == ("resumed get", requesting.AwaitingFile(10))
    assert outbox.next().request == "put"
    outbox.hold("put")  # READY, then UPLOAD, DATA and END go before anything else
    assert outbox.next() is None
    assert not outbox.release("list") and outbox.release("put")
    assert outbox.next().request == "list" and outbox.next() is None
    outbox.add("late", requesting.AwaitingEntry(), {"type": "stat"})
    assert outbox.abandon() == ["late"] and outbox.next() is None
