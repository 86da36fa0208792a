"""The handshake over real sockets: success, failures, indistinguishable unknown users,
malformed and out-of-order input, timeouts."""

import json

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread

from eketwist import errors, spake2plus
from eketwist.server import ServerFactory

from tests.support.fixtures import authenticated_client, connect_client, sleep
from tests.support.rawclient import CONTROL, HANDSHAKE, HEADER, RawClient


def capture_protocols(factory):
    built = []
    original = factory.buildProtocol

    def build(addr):
        proto = original(addr)
        built.append(proto)
        return proto

    factory.buildProtocol = build
    return built


@pytest_twisted.ensureDeferred
async def test_full_handshake_gives_both_sides_records(factory, server_port):
    servers = capture_protocols(factory)
    client = await authenticated_client(server_port)
    assert client.state == "ready" and client.authenticated
    assert client.server_id == "test-server"
    await sleep(0.05)
    assert servers[0].state == "ready" and servers[0].authenticated
    client.close()


@pytest_twisted.ensureDeferred
async def test_wrong_password_fails_on_both_sides_without_keys(factory, server_port):
    servers = capture_protocols(factory)
    client = await connect_client(server_port, password="not the password")
    with pytest.raises(errors.ServerNotAuthenticated, match="could not prove"):
        await client.authenticated_deferred
    await sleep(0.1)
    assert not client.authenticated
    assert not servers[0].authenticated and servers[0].state == "closed"


@pytest_twisted.ensureDeferred
async def test_unknown_user_fails_like_a_wrong_password(server_port):
    client = await connect_client(server_port, user="mallory")
    with pytest.raises(errors.ServerNotAuthenticated):
        await client.authenticated_deferred


def _failed_attempt(port, user):
    raw = RawClient(port)
    try:
        final = raw.handshake(user, "guess", check_confirm=False)
        params_size = raw.sizes[0]
        return final, raw.sizes, params_size
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_unknown_user_answers_have_the_same_shape(server_port):
    wrong, wrong_sizes, _ = await deferToThread(_failed_attempt, server_port, "alice")
    # A name of the same length, so that any difference would come from the server's answers.
    unknown, unknown_sizes, _ = await deferToThread(_failed_attempt, server_port, "alicf")
    assert wrong == unknown
    assert wrong["code"] == "auth-failed"
    assert wrong_sizes == unknown_sizes


@pytest_twisted.ensureDeferred
async def test_unknown_user_salt_is_stable(server_port):
    def params(user):
        raw = RawClient(server_port)
        raw.send({"type": "hello", "version": 1, "user": user})
        reply = raw.recv()
        raw.close()
        return reply

    first = await deferToThread(params, "nobody-here")
    second = await deferToThread(params, "nobody-here")
    other = await deferToThread(params, "someone-else")
    assert first == second
    assert first["salt"] != other["salt"]
    assert len(bytes.fromhex(first["salt"])) == 16


def _expect_close_with_error(port, frames):
    raw = RawClient(port)
    try:
        for kind, payload in frames:
            raw.sock.sendall(HEADER.pack(len(payload), kind) + payload if kind is not None else payload)
        error = raw.recv()
        while error["type"] == "params":  # the answer to a valid hello
            error = raw.recv()
        assert raw.closed_by_peer()
        return error
    finally:
        raw.close()


def _hello(user="alice"):
    return (HANDSHAKE, json.dumps({"type": "hello", "version": 1, "user": user}).encode())


G = spake2plus.encode_point(spake2plus.GENERATOR)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([(HANDSHAKE, b'{"type":"share","share":"00"}')], "protocol"),  # out of order
        ([(HANDSHAKE, b"\xff\xfe not json")], "protocol"),
        ([(HANDSHAKE, b'["type"]')], "protocol"),
        ([(HANDSHAKE, b"[" * 3000 + b"]" * 3000)], "protocol"),
        ([(HANDSHAKE, b'{"type":"hello","version":3,"user":"alice"}')], "unsupported"),
        # Names no one can register: said plainly (that tells nothing about who exists).
        ([(HANDSHAKE, b'{"type":"hello","version":1,"user":""}')], "auth-failed"),
        ([(HANDSHAKE, b'{"type":"hello","version":1,"user":"' + b"a" * 65 + b'"}')], "auth-failed"),
        ([(HANDSHAKE, '{"type":"hello","version":1,"user":"al\u00a0ice"}'.encode())], "auth-failed"),
        ([(HANDSHAKE, b'{"type":"hello","version":1,"user":"al\\u200bice"}')], "auth-failed"),
        ([(HANDSHAKE, b'{"type":"hello","version":1,"user":"al\\u0000ice"}')], "auth-failed"),
        ([(HANDSHAKE, b'{"type":"hello","version":1,"user":5}')], "protocol"),
        ([(HANDSHAKE, b'{"type":"hello","version":"1","user":"alice"}')], "protocol"),
        ([(HANDSHAKE, b'{"type":"hello","version":1,"user":"\\ud800"}')], "protocol"),
        ([(CONTROL, b"x" * 40)], "protocol"),  # a record before the handshake
        ([(7, b"")], "protocol"),  # unknown frame kind
        ([(None, HEADER.pack(100_000, HANDSHAKE))], "protocol"),  # oversized, refused from the header
        ([_hello(), (HANDSHAKE, json.dumps({"type": "share", "share": "04" + "00" * 64}).encode())], "protocol"),
        ([_hello(), (HANDSHAKE, json.dumps({"type": "share", "share": "04" + "01" * 64}).encode())], "protocol"),
        ([_hello(), (HANDSHAKE, json.dumps({"type": "share", "share": G[:33].hex()}).encode())], "protocol"),
        ([_hello(), _hello()], "protocol"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_input_closes_with_a_clear_error(server_port, frames, code):
    error = await deferToThread(_expect_close_with_error, server_port, frames)
    assert error["type"] == "error" and error["code"] == code
    assert "Traceback" not in error["message"]
    if code == "auth-failed":
        assert error["message"].startswith("not a valid username: "), error
    # ... and the server keeps serving everyone else.
    client = await authenticated_client(server_port)
    client.close()


@pytest_twisted.ensureDeferred
async def test_handshake_deadline_is_not_reset_by_trickled_bytes(root, users_file):
    clock = task.Clock()
    factory = ServerFactory(str(root), str(users_file), "t", handshake_timeout=10, clock=clock)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        lost = defer.Deferred()

        class Trickle(protocol.Protocol):
            def connectionLost(self, reason):
                lost.callback(None)

        proto = Trickle()
        await protocol.ClientCreator(reactor, lambda: proto).connectTCP("127.0.0.1", port.getHost().port)
        hello = HEADER.pack(len(_hello()[1]), HANDSHAKE) + _hello()[1]
        for i in range(3):  # a byte now and then, as a slowloris would
            proto.transport.write(hello[i : i + 1])
            await sleep(0.01)
            clock.advance(3)
        assert not lost.called
        clock.advance(1.5)
        await lost
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_idle_authenticated_connection_is_closed(root, users_file):
    clock = task.Clock()
    factory = ServerFactory(str(root), str(users_file), "t", idle_timeout=60, clock=clock)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = await authenticated_client(port.getHost().port)
        lost = defer.Deferred()
        client.connectionLost = lambda reason: lost.callback(None)
        clock.advance(59)
        await sleep(0.05)
        assert not lost.called
        clock.advance(2)
        await lost
    finally:
        await port.stopListening()


class FakeServer(protocol.Protocol):
    """Answers a hello with whatever `params` it is given, and records what it receives."""

    params = None

    def connectionMade(self):
        self.received = []
        self.factory.instances.append(self)

    def dataReceived(self, data):
        self.received.append(data)
        if len(self.received) == 1:
            self._send(self.params)
        elif len(self.received) == 2 and b'"share"' in data:
            share = spake2plus.encode_point(spake2plus.GENERATOR * 12345)
            self._send({"type": "share", "share": share.hex(), "confirm": "00" * 32})

    def _send(self, message):
        payload = json.dumps(message).encode()
        self.transport.write(HEADER.pack(len(payload), HANDSHAKE) + payload)


async def _against_fake_server(params):
    factory = protocol.Factory.forProtocol(FakeServer)
    factory.instances = []
    FakeServer.params = params
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = await connect_client(port.getHost().port)
        try:
            await client.authenticated_deferred
        finally:
            received = b"".join(factory.instances[0].received)
        return received
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "scrypt",
    [{"n": 2**30, "r": 8, "p": 1}, {"n": 2**15, "r": 1000, "p": 1}, {"n": 3000, "r": 8, "p": 1}, {"n": 1024}, None],
)
@pytest_twisted.ensureDeferred
async def test_client_refuses_unreasonable_scrypt_parameters(scrypt):
    params = {"type": "params", "server": "fake", "salt": "00" * 16, "scrypt": scrypt}
    with pytest.raises(errors.ProtocolError, match="unreasonable password hashing"):
        await _against_fake_server(params)


@pytest_twisted.ensureDeferred
async def test_client_sends_no_confirmation_to_an_impostor():
    factory = protocol.Factory.forProtocol(FakeServer)
    factory.instances = []
    FakeServer.params = {"type": "params", "server": "fake", "salt": "00" * 16, "scrypt": {"n": 1024, "r": 8, "p": 1}}
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = await connect_client(port.getHost().port)
        with pytest.raises(errors.ServerNotAuthenticated):
            await client.authenticated_deferred
        await sleep(0.05)
        everything = b"".join(factory.instances[0].received)
        assert b'"confirm"' not in everything
    finally:
        await port.stopListening()
