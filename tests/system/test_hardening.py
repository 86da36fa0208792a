"""Hostile clients against a live server: guessing penalties, lockouts, connection caps,
back-pressure, disappearing roots, secrets."""

import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from eketwist import errors, guard, userdb, wire
from eketwist.server import ServerFactory

from tests.support.fixtures import authenticated_client, sleep
from tests.support.processes import PASSWORD
from tests.support.rawclient import RawClient


def listen(factory):
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, port.getHost().port


def server_with(root, users_file, **policy):
    return ServerFactory(str(root), str(users_file), "t", policy=guard.Policy(**policy))


def raw_from(port, source="127.0.0.1"):
    return RawClient(port, source=source)


def _hello(raw, user):
    """HELLO on `raw`; (the server's answer, seconds until it came)."""
    started = time.monotonic()
    raw.send({"type": "hello", "version": 1, "user": user})
    answer = raw.recv()
    return answer, time.monotonic() - started


def failed_login(port, user, source="127.0.0.1"):
    """One wrong-password attempt; returns seconds until PARAMS arrived."""
    raw = raw_from(port, source)
    try:
        params, waited = _hello(raw, user)
        if params["type"] == "error":
            return params
        from eketwist import spake2plus

        w0, w1 = spake2plus.register(b"wrong", bytes.fromhex(params["salt"]), user.encode(), **params["scrypt"])
        x, share_p = spake2plus.prover_share(w0)
        raw.send({"type": "share", "share": share_p.hex()})
        raw.recv()
        raw.send({"type": "confirm", "confirm": "00" * 32})
        assert raw.recv()["code"] == "auth-failed"
        return waited
    finally:
        raw.close()


def first_answer(port, user, source="127.0.0.1"):
    raw = raw_from(port, source)
    try:
        return _hello(raw, user)
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_lockout_refuses_the_source_once_logged(root, users_file, tmp_path):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    port, number = listen(server_with(root, users_file, delay_base=0, max_source_failures=3, source_lockout=60))
    try:
        for _ in range(3):
            await deferToThread(failed_login, number, "alice", "127.0.0.3")
        for _ in range(5):
            answer, _ = await deferToThread(first_answer, number, "alice", "127.0.0.3")
            assert answer["code"] == "try-later" and "too many failed logins" in answer["message"]
        answer, _ = await deferToThread(first_answer, number, "alice", "127.0.0.4")
        assert answer["type"] == "params"
        texts = [e.get("log_format", "") for e in events]
        assert sum("locking out" in t for t in texts) == 1
        assert sum("refused a connection" in t for t in texts) == 1  # not once per connection
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_per_source_cap_and_max_startups(root, users_file):
    port, number = listen(server_with(root, users_file, max_per_source=3, startups_start=5, startups_rate=100, startups_full=6))
    held = []
    try:
        def connect_and_hold(source):
            raw = raw_from(number, source)
            raw.sock.sendall(b"\x00")  # per-address limits apply from the first byte
            held.append(raw)
            return raw

        for _ in range(3):
            await deferToThread(connect_and_hold, "127.0.0.2")
        over = await deferToThread(connect_and_hold, "127.0.0.2")
        assert (await deferToThread(over.recv))["code"] == "try-later"
        for i in range(2):
            await deferToThread(connect_and_hold, f"127.0.1.{i}")
        await sleep(0.1)

        def dropped(source):
            try:
                return connect_and_hold(source).closed_by_peer()
            except ConnectionResetError:  # reset before connect() even returned
                return True

        assert await deferToThread(dropped, "127.0.2.1")  # the sixth handshake
    finally:
        for raw in held:
            raw.close()
        await port.stopListening()


def _buffered(transport):
    # Twisted's write buffer: what the server holds for a client that does not read.
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_cannot_grow_the_server(root, users_file, factory):
    with open(root / "big.bin", "wb") as big:  # never read to its end: sparse, nothing to write
        big.truncate(64 * 1024 * 1024)
    built = []
    original = factory.buildProtocol
    factory.buildProtocol = lambda addr: built.append(original(addr)) or built[-1]
    port, number = listen(factory)
    try:
        def flood():
            raw = RawClient(number)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert raw.handshake("alice", PASSWORD)["type"] == "ok"
            raw.sock.settimeout(0.5)
            sent = 0
            try:
                for _ in range(200_000):  # stat requests, never reading a reply
                    raw.send_control({"type": "stat", "path": "sub/" + "x" * 500})
                    sent += 1
            except socket.timeout:
                pass
            return raw, sent

        raw, sent = await deferToThread(flood)
        await sleep(0.3)
        assert sent < 200_000  # the server stopped reading us
        assert _buffered(built[0].transport) < 2 * 1024 * 1024
        raw.close()

        def slow_reader():
            raw = RawClient(number)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert raw.handshake("alice", PASSWORD)["type"] == "ok"
            raw.send_control({"type": "get", "path": "big.bin"})
            return raw

        raw = await deferToThread(slow_reader)
        await sleep(1.0)
        # At most about one record waits in the server for a reader that does not read.
        assert _buffered(built[1].transport) <= wire.HEADER_BYTES + wire.MAX_RECORD_PAYLOAD + 64 * 1024
        raw.close()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_root_that_disappears_gives_clear_errors(root, tmp_path, server_port):
    client = await authenticated_client(server_port)
    os.rename(root, tmp_path / "moved-away")
    for request in (lambda: client.list(""), lambda: client.stat("hello.txt"),
                    lambda: client.get("hello.txt", str(tmp_path / "x"))):
        with pytest.raises(errors.NotFound, match="the root directory is not available on the server"):
            await request()
    os.rename(tmp_path / "moved-away", root)
    result = await client.get("hello.txt", str(tmp_path / "x"))
    assert result["size"] == 13
    client.close()


def test_secrets_never_reach_logs_or_reprs(daemon, tmp_path, users_file):
    from tests.support.processes import run_client

    server = daemon()
    assert run_client(server.port, "get", "hello.txt", cwd=tmp_path).returncode == 0
    assert run_client(server.port, "get", "hello.txt", cwd=tmp_path, password="wrong guess").returncode == 4
    log = server.log_text()
    users = userdb.load(users_file)
    alice = users.by_name["alice"]
    for secret in (PASSWORD, "wrong guess", alice.w0.to_bytes(32, "big").hex(), alice.L.hex(), users.secret.hex(), alice.salt.hex()):
        assert secret not in log
    for thing in (alice, users):
        assert alice.L.hex() not in repr(thing) and str(alice.w0) not in repr(thing)


def test_users_file_that_cannot_be_read_stops_start_up(root, tmp_path):
    import subprocess

    from tests.support.processes import BIN as VENV_BIN

    result = subprocess.run(
        [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "eke", "--port", "tcp:0:interface=127.0.0.1",
         "--root", str(root), "--users", str(tmp_path)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode != 0 and "cannot read" in result.stdout + result.stderr


def test_reprs_show_no_key_material():
    from eketwist import records, spake2plus
    from eketwist.client_protocol import ClientProtocol

    client = ClientProtocol("alice", "hunter2")
    assert "hunter2" not in repr(client)
    keys = spake2plus.Keys(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)
    cipher = records.RecordCipher(b"\x03" * 32, records.CLIENT_TO_SERVER)
    for thing in (keys, cipher, client):
        text = repr(thing)
        assert "0101" not in text and "0303" not in text and "\\x01" not in text and "\\x03" not in text
