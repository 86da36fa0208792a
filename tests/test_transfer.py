"""Downloads over real sockets: success, errors that keep the connection, tampering and cuts."""

import hashlib
import json
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward

from eketwist import errors

from .conftest import PASSWORD, authenticated_client, connect_client
from .rawclient import CONTROL, RawClient


@pytest_twisted.ensureDeferred
async def test_get_writes_a_verified_file(root, tmp_path, server_port):
    client = await authenticated_client(server_port)
    destination = tmp_path / "got.bin"
    result = await client.get("sub/data.bin", str(destination))
    original = (root / "sub" / "data.bin").read_bytes()
    assert destination.read_bytes() == original
    assert result["sha1"] == hashlib.sha1(original).hexdigest()
    assert result["size"] == len(original)
    assert abs(destination.stat().st_mtime - (root / "sub" / "data.bin").stat().st_mtime) < 1e-3
    assert not (tmp_path / "got.bin.part").exists()
    client.close()


@pytest_twisted.ensureDeferred
async def test_several_gets_and_errors_on_one_connection(root, tmp_path, server_port):
    os.symlink("/etc/passwd", root / "escape")
    os.symlink("hello.txt", root / "inside-link")
    client = await authenticated_client(server_port)
    cases = [
        ("missing.txt", errors.NotFound, "no such file"),
        ("sub", errors.NotAFile, "is a directory"),
        ("../etc/passwd", errors.BadPath, "'..'"),
        ("/etc/passwd", errors.BadPath, "absolute"),
        ("escape", errors.BadPath, "outside the root"),
        ("sub/../../x", errors.BadPath, "'..'"),
    ]
    for remote, error, text in cases:
        with pytest.raises(error, match=text):
            await client.get(remote, str(tmp_path / "never"))
        assert not (tmp_path / "never").exists() and not (tmp_path / "never.part").exists()
    for name, source in (("a", "hello.txt"), ("b", "empty"), ("c", "inside-link"), ("d", "./sub//data.bin")):
        result = await client.get(source, str(tmp_path / name))
        assert (tmp_path / name).read_bytes() == (root / source).read_bytes()
        assert result["size"] == (root / source).stat().st_size
    client.close()


@pytest_twisted.ensureDeferred
async def test_fifo_and_devices_are_not_served(root, tmp_path, server_port):
    os.mkfifo(root / "fifo")
    os.symlink("/dev/zero", root / "zero")  # outside the root anyway
    client = await authenticated_client(server_port)
    with pytest.raises(errors.NotAFile):
        await client.get("fifo", str(tmp_path / "fifo"))
    with pytest.raises(errors.BadPath):
        await client.get("zero", str(tmp_path / "zero"))
    client.close()


@pytest_twisted.ensureDeferred
async def test_existing_destination_is_replaced_only_when_verified(root, tmp_path, server_port):
    destination = tmp_path / "hello.txt"
    destination.write_bytes(b"old contents")
    client = await authenticated_client(server_port)
    await client.get("hello.txt", str(destination))
    assert destination.read_bytes() == (root / "hello.txt").read_bytes()
    client.close()


@pytest_twisted.ensureDeferred
async def test_unsupported_request_keeps_the_connection(server_port, root):
    def talk():
        raw = RawClient(server_port)
        assert raw.handshake("alice", PASSWORD)["type"] == "ok"
        raw.send_control({"type": "frobnicate", "path": "x"})
        kind, reply = raw.recv_record()
        header, data, end = raw.get("hello.txt")
        raw.close()
        return reply, header, data, end

    reply, header, data, end = await deferToThread(talk)
    assert reply["type"] == "error" and reply["code"] == "unsupported"
    assert header["type"] == "file" and header["digest"] == "sha1"
    assert data == (root / "hello.txt").read_bytes()
    assert end == {"type": "end", "size": len(data), "sha1": hashlib.sha1(data).hexdigest()}


@pytest_twisted.ensureDeferred
async def test_garbage_and_bad_records_after_auth_close_the_connection(server_port):
    def talk(payload_kind):
        raw = RawClient(server_port)
        assert raw.handshake("alice", PASSWORD)["type"] == "ok"
        if payload_kind == "forged":
            raw.sock.sendall(b"\x00\x00\x00\x20\x01" + b"\x00" * 32)
        elif payload_kind == "plaintext":
            raw.send({"type": "get", "path": "hello.txt"})
        elif payload_kind == "oversized":
            raw.sock.sendall(b"\x7f\x00\x00\x00\x01")
        kind, head, payload = raw.recv_frame()
        closed = raw.closed_by_peer()
        raw.close()
        return kind, raw.receive_cipher.open(head, payload), closed

    for payload_kind in ("forged", "plaintext", "oversized"):
        kind, plaintext, closed = await deferToThread(talk, payload_kind)
        error = json.loads(plaintext)
        assert kind == CONTROL and error["type"] == "error" and closed
        assert error["code"] == ("integrity" if payload_kind == "forged" else "protocol")


class TamperingProxy(portforward.ProxyFactory):
    """Forwards a connection to the server, passing server bytes through `tamper`."""

    def __init__(self, port, tamper):
        super().__init__("127.0.0.1", port)

        class Client(portforward.ProxyClient):
            seen = 0

            def dataReceived(self, data):
                start, Client.seen = Client.seen, Client.seen + len(data)
                data = tamper(start, data, self)
                if data:
                    self.peer.transport.write(data)

        class ClientFactory(portforward.ProxyClientFactory):
            protocol = Client

        class Server(portforward.ProxyServer):
            clientProtocolFactory = ClientFactory

        self.protocol = Server
        self.noisy = False


async def _get_through(proxy_factory, destination):
    listening = reactor.listenTCP(0, proxy_factory, interface="127.0.0.1")
    try:
        client = await connect_client(listening.getHost().port)
        await client.authenticated_deferred
        return await client.get("sub/data.bin", str(destination))
    finally:
        await listening.stopListening()


@pytest.mark.parametrize("offset", [2000, 100_000, 290_000])
@pytest_twisted.ensureDeferred
async def test_a_flipped_bit_closes_the_connection_and_writes_nothing(server_port, tmp_path, offset):
    # The handshake is a few hundred bytes: `offset` lands in a data record.
    def flip(start, data, proxy_client):
        if start <= offset < start + len(data):
            data = bytearray(data)
            data[offset - start] ^= 0x10
            data = bytes(data)
        return data

    destination = tmp_path / "got.bin"
    with pytest.raises(errors.IntegrityError, match="failed authentication"):
        await _get_through(TamperingProxy(server_port, flip), destination)
    assert not destination.exists()
    assert not (tmp_path / "got.bin.part").exists()


@pytest_twisted.ensureDeferred
async def test_a_transfer_cut_short_leaves_no_destination(server_port, tmp_path):
    def cut(start, data, proxy_client):
        if start + len(data) > 150_000:
            proxy_client.transport.loseConnection()
            proxy_client.peer.transport.loseConnection()
            return data[: max(0, 150_000 - start)]
        return data

    destination = tmp_path / "got.bin"
    with pytest.raises(errors.ConnectionFailed):
        await _get_through(TamperingProxy(server_port, cut), destination)
    assert not destination.exists()


@pytest_twisted.ensureDeferred
async def test_digest_cache_never_serves_a_stale_digest(root, tmp_path, factory, server_port):
    client = await authenticated_client(server_port)
    path = root / "sub" / "data.bin"
    first = await client.get("sub/data.bin", str(tmp_path / "one"))
    assert factory.digests.get(os.stat(path)) == first["sha1"]
    again = await client.get("sub/data.bin", str(tmp_path / "two"))  # served from the cache
    assert again["sha1"] == first["sha1"] and (tmp_path / "two").read_bytes() == path.read_bytes()
    # Same size, same mtime, new bytes: the change time tells.
    st = os.stat(path)
    path.write_bytes(os.urandom(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = await client.get("sub/data.bin", str(tmp_path / "three"))
    assert (tmp_path / "three").read_bytes() == path.read_bytes()
    assert third["sha1"] == hashlib.sha1(path.read_bytes()).hexdigest() != first["sha1"]
    client.close()
