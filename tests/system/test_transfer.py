"""Downloads over real sockets: success, errors that keep the connection, tampering and cuts."""

import hashlib
import json
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward

from eketwist import connection, errors, wire
from eketwist.server import ServerFactory

from tests.support.fixtures import authenticated_client, connect_client, sleep, slow_part_files
from tests.support.processes import PASSWORD, WRITER_PASSWORD
from tests.support.rawclient import CONTROL, DATA, RawClient


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
async def test_a_transfer_cut_short_leaves_no_destination(server_port, tmp_path, factory):
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
    # The server counted the download while it ran, and no longer does (record sizes and the
    # memory hand-back depend on the count).
    for _ in range(50):
        if factory.downloads == 0:
            break
        await sleep(0.02)
    assert factory.downloads == 0


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


# -- reads that wait for whole records (SO_RCVLOWAT while a file streams in)

needs_low_water = pytest.mark.skipif(not connection.RECEIVE_LOW_WATER, reason="SO_RCVLOWAT is used on Linux only")


@needs_low_water
@pytest_twisted.ensureDeferred
async def test_a_download_reads_whole_records_and_resets_the_low_water_mark(root, tmp_path, server_port):
    (root / "records.bin").write_bytes(os.urandom(3 * wire.DATA_CHUNK + 12345))
    client = await authenticated_client(server_port)
    sock = client.transport.getHandle()
    seen = []
    receive = client.data_received

    def watching(chunk):
        seen.append((len(chunk), sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)))
        receive(chunk)

    client.data_received = watching
    result = await client.get("records.bin", str(tmp_path / "records.bin"))
    assert (tmp_path / "records.bin").read_bytes() == (root / "records.bin").read_bytes()
    assert result["size"] == 3 * wire.DATA_CHUNK + 12345
    # While file bytes were owed, reads waited for a whole record or the rest of one (the
    # kernel may still wake us earlier, when the socket's memory is tight), never for more
    # than the file still owed: the last record's 12345 bytes...
    lows = [low for size, low in seen]
    assert min(lows) > 1 and max(lows) <= wire.HEADER_BYTES + wire.MAX_RECORD_PAYLOAD, lows
    assert lows[-1] == 12345, lows
    # ...and once the file is in, any byte wakes us again (checked once the read that brought
    # the END message has been handled: the get's result fires from inside it).
    await sleep(0)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    client.close()


def _upload(port, path, content, record_size, *, abandon_after=None):
    """Upload with a client of our own: `record_size` bytes per DATA record; with
    `abandon_after`, close the connection after that many bytes instead of finishing."""
    raw = RawClient(port, timeout=10)
    try:
        assert raw.handshake("writer", WRITER_PASSWORD)["type"] == "ok"
        raw.send_control({"type": "put", "path": path, "size": len(content), "force": True})
        assert raw.recv_record()[1]["type"] == "ready"
        raw.send_control({"type": "upload", "offset": 0})
        end = len(content) if abandon_after is None else abandon_after
        for start in range(0, end, record_size):
            raw.send_record(DATA, content[start : min(start + record_size, end)])
        if abandon_after is not None:
            return None
        raw.send_control({"type": "end", "size": len(content), "sha1": hashlib.sha1(content).hexdigest()})
        return raw.recv_record()[1]
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_uploads_in_small_records_are_not_kept_waiting(root, server_port):
    # The server waits for the bytes still owed, never for more: records far smaller than
    # ours, and a last one shorter than its header and tag, still complete at once.
    content = os.urandom(wire.DATA_CHUNK + 3001)
    for record_size in (1000, 65536, wire.DATA_CHUNK):
        stored = await deferToThread(_upload, server_port, "small-records.bin", content, record_size)
        assert stored["type"] == "stored", stored
        assert (root / "small-records.bin").read_bytes() == content


@pytest_twisted.ensureDeferred
async def test_an_upload_abandoned_mid_record_is_noticed_at_once(root, server_port):
    content = os.urandom(4 * wire.DATA_CHUNK)
    await deferToThread(_upload, server_port, "abandoned.bin", content, wire.DATA_CHUNK,
                        abandon_after=wire.DATA_CHUNK + 100_000)
    # The close wakes the server although fewer bytes than it waits for arrived: the part file
    # is released (a second upload of the same path is not "busy") and the upload completes.
    await sleep(0.3)
    stored = await deferToThread(_upload, server_port, "abandoned.bin", content, wire.DATA_CHUNK)
    assert stored["type"] == "stored", stored
    assert (root / "abandoned.bin").read_bytes() == content


def test_record_size_shares_a_budget_between_downloads(factory):
    sizes = {}
    for downloads in (0, 1, 32, 64, 256, 5000):
        factory.downloads = downloads
        sizes[downloads] = factory.record_size()
    assert sizes[0] == sizes[1] == sizes[32] == wire.DATA_CHUNK  # few downloads: the fastest records
    assert sizes[64] == ServerFactory.RECORD_BUDGET // 64 < wire.DATA_CHUNK
    assert sizes[256] == sizes[5000] == ServerFactory.MIN_RECORD  # many: never below the floor


@needs_low_water
@pytest_twisted.ensureDeferred
async def test_a_file_that_shrinks_while_sent_fails_at_once(root, tmp_path, server_port):
    # The server announces a size, then finds less and ends early: fewer bytes than the client
    # waits for. The client must hear the end at once, not at its timeout.
    source = root / "shrinking.bin"
    # Far more than socket buffers hold: the server is still reading when the file shrinks.
    source.write_bytes(os.urandom(16 * wire.DATA_CHUNK))
    client = await connect_client(server_port)
    client.timeout = 20
    await client.authenticated_deferred
    receive = client.data_received

    def shrink_after_the_first_record(chunk):
        receive(chunk)
        os.truncate(source, wire.DATA_CHUNK + 1000)

    client.data_received = shrink_after_the_first_record
    started = reactor.seconds()
    with pytest.raises(errors.IntegrityError, match="changed size"):
        await client.get("shrinking.bin", str(tmp_path / "shrinking.bin"))
    assert reactor.seconds() - started < 5
    assert not (tmp_path / "shrinking.bin").exists()
    client.close()


class ThrottlingProxy(TamperingProxy):
    """Passes the server's bytes on at about `rate` bytes per second, in small pieces."""

    def __init__(self, port, rate, piece=16384):
        def throttle(start, data, proxy_client):
            proxy_client.transport.pauseProducing()
            for offset in range(0, len(data), piece):
                reactor.callLater(offset / rate, proxy_client.peer.transport.write, data[offset : offset + piece])
            reactor.callLater(len(data) / rate, proxy_client.transport.resumeProducing)
            return b""

        super().__init__(port, throttle)


@pytest_twisted.ensureDeferred
async def test_a_slow_link_shows_progress_before_a_whole_record_arrives(root, tmp_path, server_port):
    # 1 MB/s: a 2 MiB record takes 2 s, longer than the client's 1 s timeout. Waiting for whole
    # records must not hide that bytes are arriving.
    (root / "slow.bin").write_bytes(os.urandom(wire.DATA_CHUNK + 5000))
    listening = reactor.listenTCP(0, ThrottlingProxy(server_port, rate=1_000_000), interface="127.0.0.1")
    try:
        client = await connect_client(listening.getHost().port)
        client.timeout = 1
        await client.authenticated_deferred
        result = await client.get("slow.bin", str(tmp_path / "slow.bin"))
        assert (tmp_path / "slow.bin").read_bytes() == (root / "slow.bin").read_bytes()
        assert result["size"] == wire.DATA_CHUNK + 5000
        client.close()
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_other_clients_are_served_while_an_upload_is_flushed_to_a_slow_disk(root, tmp_path, server_port, monkeypatch):
    """The end of an upload (last writes, fsync, rename) waits for the disk, which takes seconds
    for a large file on a slow one: the server does it in a thread and serves everyone else."""
    import threading
    import time

    flushing = threading.Event()
    flush_started = []
    real_fsync = os.fsync

    def slow_fsync(fd):  # a disk taking its time to flush what was written
        flush_started.append(time.monotonic())
        flushing.set()
        time.sleep(1.0)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    writer = await authenticated_client(server_port, "writer", WRITER_PASSWORD)
    reader = await authenticated_client(server_port)
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(300_000))
    started = time.monotonic()
    stored = writer.put(str(source), "upload.bin")
    assert await deferToThread(flushing.wait, 10), "the server never flushed the upload"
    entry = await reader.stat("hello.txt")
    answered = time.monotonic() - flush_started[0]
    result = await stored
    assert entry["size"] == (root / "hello.txt").stat().st_size
    assert answered < 0.5, f"a stat was answered {answered:.2f} s after another client's upload began to flush"
    assert time.monotonic() - started >= 1.0  # the flush did take its time
    assert (root / "upload.bin").read_bytes() == source.read_bytes()
    assert result["sha1"] == hashlib.sha1(source.read_bytes()).hexdigest()
    # The connection carries on after the upload.
    assert (await writer.stat("upload.bin"))["size"] == 300_000
    writer.close()
    reader.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_disk_holds_back_only_its_uploader(root, tmp_path, factory, server_port, monkeypatch):
    """When the disk falls behind an upload, the server stops reading that client (TCP holds
    it back) instead of blocking its reactor: other clients are served meanwhile, and the
    uploader's idle timeout does not run while the wait is the server's own."""
    import threading
    import time

    writing = threading.Event()
    write_started = []

    def on_write():
        write_started.append(time.monotonic())
        writing.set()

    slow_part_files(monkeypatch, 0.8, min_bytes=64 * 1024, on_write=on_write)  # 0.8 s a record
    factory.idle_timeout = 0.5  # shorter than one record's write
    writer = await authenticated_client(server_port, "writer", WRITER_PASSWORD)
    reader = await authenticated_client(server_port)
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(3 * wire.DATA_CHUNK))
    ticks = [time.monotonic()]  # the reactor's heartbeat: a gap is a stall of every connection
    heartbeat = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    heartbeat.start(0.01)
    stored = writer.put(str(source), "upload.bin")
    assert await deferToThread(writing.wait, 10), "the server never wrote the upload"
    for _ in range(3):  # served while the disk writes the records, one after another
        entry = await reader.stat("hello.txt")
        assert entry["size"] == (root / "hello.txt").stat().st_size
        await sleep(0.3)
    result = await stored
    heartbeat.stop()
    assert len(write_started) == 3
    stall = max(later - earlier for earlier, later in zip(ticks, ticks[1:]))
    assert stall < 0.3, f"the reactor stalled for {stall:.2f} s while the disk was slow"
    assert result["sha1"] == hashlib.sha1(source.read_bytes()).hexdigest()
    assert (root / "upload.bin").read_bytes() == source.read_bytes()
    writer.close()
    reader.close()


@pytest_twisted.ensureDeferred
async def test_uploads_are_counted_while_they_run(tmp_path, factory, server_port):
    """The server counts uploads from PUT to their end, however they end (the memory
    hand-back waits for no transfer to run)."""
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(16 * wire.DATA_CHUNK))

    async def until(condition):
        for _ in range(250):
            if condition():
                return True
            await sleep(0.02)
        return False

    writer = await authenticated_client(server_port, "writer", WRITER_PASSWORD)
    assert factory.uploads == 0
    stored = writer.put(str(source), "whole.bin")
    assert await until(lambda: factory.uploads == 1)
    await stored
    assert await until(lambda: factory.uploads == 0), "a stored upload is still counted"

    cut = await authenticated_client(server_port, "writer", WRITER_PASSWORD)
    failed = cut.put(str(source), "cut.bin")
    failed.addErrback(lambda failure: failure.trap(errors.EketwistError))
    assert await until(lambda: factory.uploads == 1)
    cut.transport.abortConnection()
    await failed
    assert await until(lambda: factory.uploads == 0), "an upload cut short is still counted"
    writer.close()


@pytest_twisted.ensureDeferred
async def test_the_client_says_when_a_server_speaks_only_version_1_and_still_transfers(root, tmp_path, factory, server_port):
    """An older server (version 1 only): the client falls back to one request at a time, and
    says so once when that costs a round trip per file."""
    from tests.support.processes import run_client

    factory.versions = (1,)
    (root / "old").mkdir()
    for i in range(3):
        (root / "old" / f"f{i}").write_bytes(os.urandom(1000 + i))
    down = tmp_path / "down"
    down.mkdir()
    result = await deferToThread(run_client, server_port, "get", "-r", "old", str(down))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("protocol version 1 only") == 1, result.stderr
    for i in range(3):
        assert (down / "old" / f"f{i}").read_bytes() == (root / "old" / f"f{i}").read_bytes()
    factory.versions = (1, 2)
    (tmp_path / "again").mkdir()
    again = await deferToThread(run_client, server_port, "get", "-r", "old", str(tmp_path / "again"))
    assert again.returncode == 0 and "version 1" not in again.stderr, again.stderr
