"""The real client Protocol against the real server Protocol, in memory: iosim's pump for the
bytes, one task.Clock for both sides' timers and the Deferreds they fire on a later turn, and
their thread work run by hand. Whole sessions, refusals and timeouts, without a socket or a
real second."""

import hashlib
import os

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from eketwist import errors
from eketwist.client_protocol import ClientProtocol
from eketwist.server import ServerFactory

from ..support.conversation import threads_by_hand


class Session:
    """A client and a server connected by iosim, with a clock and threads run by hand."""

    def __init__(self, world, password="pw", **factory_options):
        root, users, _, _ = world
        self.clock = Clock()
        self.factory = ServerFactory(str(root), str(users), "memory", clock=self.clock, **factory_options)
        self.client = ClientProtocol("fuzzer", password, timeout=30, clock=self.clock)
        self.server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.pump = iosim.connect(
            self.server, iosim.makeFakeServer(self.server), self.client, iosim.makeFakeClient(self.client),
            greet=False,
        )

    def settle(self, threads):
        """Until nothing moves: bytes both ways, thread work, timers due now."""
        for _ in range(1000):
            moved = self.pump.pump()
            pending = bool(threads.pending)
            threads.run()
            self.clock.advance(0)
            if not (moved or pending or self.pump.pump()):
                return
        raise AssertionError("the conversation never settled")

    def result(self, deferred, threads):
        self.settle(threads)
        outcome = []
        deferred.addBoth(outcome.append)
        assert outcome, "the Deferred did not fire"
        return outcome[0]


@pytest.fixture
def threads():
    with threads_by_hand() as pool:
        yield pool


def test_a_whole_session(world, threads, tmp_path):
    root = world[0]
    session = Session(world)
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    assert client is session.client and client.state == "ready" and session.server.state == "ready"
    assert client.server_id == "memory"

    entry = session.result(client.stat("hello.txt"), threads)
    assert (entry["kind"], entry["size"]) == ("file", len(b"hello\n"))

    got = session.result(client.get("hello.txt", str(tmp_path / "hello.txt")), threads)
    assert (tmp_path / "hello.txt").read_bytes() == b"hello\n"
    assert got["sha1"] == hashlib.sha1(b"hello\n").hexdigest() and got["resumed_from"] == 0

    data = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(data)
    stored = session.result(client.put(str(tmp_path / "up.bin"), "sub/up.bin"), threads)
    assert stored["sha1"] == hashlib.sha1(data).hexdigest()
    session.settle(threads)
    assert (root / "sub" / "up.bin").read_bytes() == data

    names = [entry["name"] for entry in session.result(client.list("sub"), threads)]
    assert "up.bin" in names
    assert client.state == "ready" and session.server.state == "ready"


def test_a_refusal_fails_the_request_and_the_next_one_is_served(world, threads):
    session = Session(world)
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    refused = session.result(client.stat("no/such/file"), threads)
    assert isinstance(refused.value, errors.NotFound)
    assert session.result(client.stat("hello.txt"), threads)["name"] == "hello.txt"


def test_a_wrong_password_fails_before_the_client_reveals_anything(world, threads):
    session = Session(world, password="not the password")
    session.pump.flush()
    failure = session.result(session.client.authenticated_deferred, threads)
    assert isinstance(failure.value, errors.ServerNotAuthenticated)
    assert session.client.state == "closed"


def test_an_idle_session_times_out_on_the_servers_clock(world, threads):
    session = Session(world, idle_timeout=60)
    session.pump.flush()
    session.result(session.client.authenticated_deferred, threads)
    session.clock.advance(59)
    session.settle(threads)
    assert session.server.state == "ready"
    session.clock.advance(2)
    session.settle(threads)
    assert session.server.state == "closed"


def test_a_download_cut_at_shutdown_says_so_and_keeps_what_it_received(world, threads, tmp_path):
    root = world[0]
    data = os.urandom(16 * 2**20)
    (root / "big.bin").write_bytes(data)
    session = Session(world)
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    download = client.get("big.bin", str(tmp_path / "big.bin"))
    for _ in range(3):  # the file starts to flow, then the server is stopped
        session.pump.pump()
        session.clock.advance(0)
    assert client.state == "get-data"
    drained = session.factory.drain(grace=1.0)
    session.clock.advance(1.0)
    failure = session.result(download, threads)
    assert isinstance(failure.value, errors.TryLater) and "shutting down" in failure.value.message
    assert failure.value.exit_code == errors.EXIT_BUSY
    part = tmp_path / "big.bin.part"
    assert part.exists() and 0 < part.stat().st_size < len(data)  # kept for a resume
    assert not (tmp_path / "big.bin").exists()
    session.clock.advance(2.0)  # the cut connection is aborted a moment later
    session.settle(threads)
    assert drained.called


def test_an_upload_being_stored_at_shutdown_gets_its_answer_first(world, threads, tmp_path):
    """Committing is bounded by the disk: the grace's end spares it, the client hears STORED
    (never a try-later for an upload that was in fact committed), then the close."""
    root = world[0]
    data = os.urandom(100_000)
    (tmp_path / "f.bin").write_bytes(data)
    session = Session(world)
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    upload = client.put(str(tmp_path / "f.bin"), "stored-at-shutdown.bin")
    for _ in range(200):  # until the server stores it (its thread not run yet)
        session.pump.pump()
        session.clock.advance(0)
        if session.server.state == "storing":
            break
        if session.server.state == "upload-offered":
            continue
    assert session.server.state == "storing"
    drained = session.factory.drain(grace=1.0)
    session.clock.advance(1.0)
    session.pump.pump()
    assert session.server.state == "storing" and not upload.called
    stored = session.result(upload, threads)  # the store runs: STORED, then try-later
    assert stored["sha1"] == hashlib.sha1(data).hexdigest()
    assert (root / "stored-at-shutdown.bin").read_bytes() == data
    session.clock.advance(2.0)
    session.settle(threads)
    assert session.server.state == "closed" and drained.called


def test_the_client_gives_up_on_a_server_that_says_nothing(world, threads):
    session = Session(world)
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    asked = client.stat("hello.txt")  # the answer never travels: nothing is pumped
    session.clock.advance(29)
    assert not asked.called and client.state == "stat"
    session.clock.advance(2)  # past the client's 30 s without progress
    session.clock.advance(0)
    outcome = []
    asked.addBoth(outcome.append)
    assert isinstance(outcome[0].value, errors.Timeout) and client.state == "closed"


def test_the_users_view_of_the_disk_comes_from_the_cred_realm(world, threads, tmp_path):
    """The avatar twisted.cred's realm gives is what every request goes through: another realm
    (here, a read-only view of another directory) changes what the user sees and may do."""
    from twisted.cred import portal

    from eketwist import realm, storage

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "only-here.txt").write_bytes(b"x")
    asked = []

    @implementer(portal.IRealm)
    class ReadOnlyElsewhere:
        def requestAvatar(self, user, mind, *interfaces):
            asked.append((user.name, interfaces))
            return storage.IStorage, storage.Root(str(elsewhere), writable=False), lambda: asked.append("logout")

    session = Session(world)
    session.factory.portal = portal.Portal(ReadOnlyElsewhere(), [realm.KeyConfirmationChecker()])
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    assert asked == [("fuzzer", (storage.IStorage,))]
    assert session.result(client.stat("only-here.txt"), threads)["size"] == 1
    assert isinstance(session.result(client.stat("hello.txt"), threads).value, errors.NotFound)
    refused = session.result(client.mkdir("new"), threads)
    assert isinstance(refused.value, errors.PermissionDenied)
    client.transport.loseConnection()
    session.settle(threads)
    assert asked[-1] == "logout"
