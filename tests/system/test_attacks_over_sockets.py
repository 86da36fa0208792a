"""The server under the attacks of docs/security.md, over real sockets on 127.0.0.1: limits that
apply from the first moment, files that must not be served whatever leads to them, clients
that stop reading, and directories swapped for symlinks while requests run. (The attacks that
need no socket are driven in memory: tests/protocol/test_attacks.py.)"""

import os

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from eketwist import guard
from eketwist.server import ServerFactory

from tests.support.rawclient import Closed, RawClient


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
    import socket

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
        # About 280 KiB of entries: 175 of them stall it (one batch waits in Twisted's buffer).
        (root / "many").mkdir()
        for i in range(1_000):
            os.close(os.open(root / "many" / f"{i:06d}-{'x' * 200}", os.O_CREAT | os.O_WRONLY))
        request = {"type": "list", "path": "many"}
    factory = ServerFactory(str(root), str(users_file), "t", idle_timeout=0.5)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        def log_in():
            raw = RawClient(port.getHost().port, receive_buffer=4096)
            assert raw.handshake("alice", PASSWORD)["type"] == "ok"
            return raw

        raw = await deferToThread(log_in)
        [server] = factory.connections
        # The kernel's buffer on the server's side, as small as the client's: otherwise it grows
        # to 4 MiB on loopback, and the listing had to be 30,000 long names to fill it first.
        server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await deferToThread(raw.send_control, request)
        await sleep(0.3)
        assert factory.connections == {server}
        # Still sending, as far as the client lets it: the file or the listing holds the
        # transport (once done, the connection would be merely idle).
        assert server.transport.producer is not server
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
