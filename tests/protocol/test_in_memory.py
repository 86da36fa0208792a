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

    def __init__(self, world, password="pw", versions=(1, 2), **factory_options):
        root, users, _, _ = world
        self.clock = Clock()
        self.factory = ServerFactory(str(root), str(users), "memory", clock=self.clock, **factory_options)
        self.client = ClientProtocol("fuzzer", password, timeout=30, clock=self.clock, versions=versions)
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


@pytest.mark.parametrize("versions", [(1,), (1, 2)])  # version 2: inline, committed beside the next requests
def test_an_upload_being_stored_at_shutdown_gets_its_answer_first(world, threads, tmp_path, versions):
    """Committing is bounded by the disk: the grace's end spares it, the client hears STORED
    (never a try-later for an upload that was in fact committed), then the close."""
    root = world[0]
    data = os.urandom(100_000)
    (tmp_path / "f.bin").write_bytes(data)
    session = Session(world, versions=versions)
    session.pump.flush()
    client = session.result(session.client.authenticated_deferred, threads)
    name = f"stored-at-shutdown-v{max(versions)}.bin"
    upload = client.put(str(tmp_path / "f.bin"), name)
    for _ in range(200):  # until the server stores it (its thread not run yet)
        session.pump.pump()
        session.clock.advance(0)
        if session.server.storing:
            break
        if session.server.state == "upload-offered":
            continue
    assert session.server.storing
    drained = session.factory.drain(grace=1.0)
    session.clock.advance(1.0)
    session.pump.pump()
    assert session.server.storing and not upload.called
    stored = session.result(upload, threads)  # the store runs: STORED, then try-later
    assert stored["sha1"] == hashlib.sha1(data).hexdigest()
    assert (root / name).read_bytes() == data
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

    from eketwist import realm, storage, wire

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "only-here.txt").write_bytes(b"x")
    asked = []

    @implementer(portal.IRealm)
    class ReadOnlyElsewhere:
        def requestAvatar(self, user, mind, *interfaces):
            asked.append((user.name, interfaces))
            return storage.IStorage, storage.Root(str(elsewhere), rights=wire.RIGHT_BUNDLES["read"]), lambda: asked.append("logout")

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


# -- version 2: pipelined requests (docs/protocol.md section 7.9)


def _authenticated(session, threads):
    session.pump.flush()
    return session.result(session.client.authenticated_deferred, threads)


def _put_many(client, tmp_path, prefix, count):
    """`count` small files put at once (inline, pipelined) as sub/PREFIX0, sub/PREFIX1, ..."""
    puts = []
    for i in range(count):
        (tmp_path / f"{prefix}{i}").write_bytes(b"%d" % i)
        puts.append(client.put(str(tmp_path / f"{prefix}{i}"), f"sub/{prefix}{i}"))
    return puts


def _fired(deferreds):
    outcomes = []
    for deferred in deferreds:
        deferred.addBoth(outcomes.append)
    return outcomes


def test_the_versions_are_negotiated_and_a_version_1_client_is_served_one_request_at_a_time(world, threads):
    newer = Session(world)
    assert _authenticated(newer, threads).version == 2 and newer.server.serving.version == 2
    older = Session(world, versions=(1,))
    client = _authenticated(older, threads)
    assert client.version == 1 and not client.pipelined and older.server.serving.version == 1
    client.stat("hello.txt")
    with pytest.raises(RuntimeError):
        client.stat("sub")  # version 1: the next request only after the answer


def test_pipelined_requests_are_all_in_flight_and_answered_in_order(world, threads, tmp_path):
    root = world[0]
    for i in range(30):
        (root / "sub" / f"f{i}").write_bytes(b"%d" % i * (i + 1))
    session = Session(world)
    client = _authenticated(session, threads)
    asked = []
    for i in range(30):
        asked.append(client.stat(f"sub/f{i}"))
        asked.append(client.get(f"sub/f{i}", str(tmp_path / f"f{i}")))
    asked.append(client.stat("sub/missing"))  # refused: the others are answered all the same
    asked.append(client.stat("hello.txt"))
    assert len(client.requesting.in_flight) == len(asked), "sent without waiting for answers"
    session.settle(threads)
    outcomes = _fired(asked)
    assert len(outcomes) == len(asked)
    for i in range(30):
        entry, got = outcomes[2 * i], outcomes[2 * i + 1]
        assert entry["name"] == f"f{i}" and entry["size"] == len(b"%d" % i * (i + 1))
        assert got["remote"] == f"sub/f{i}" and (tmp_path / f"f{i}").read_bytes() == b"%d" % i * (i + 1)
    assert isinstance(outcomes[-2].value, errors.NotFound)
    assert outcomes[-1]["name"] == "hello.txt"
    assert client.state == "ready" and session.server.state == "ready"


def test_inline_uploads_are_committed_together_and_a_refused_one_is_dropped(world, threads, tmp_path):
    root = world[0]
    (root / "sub" / "taken").write_bytes(b"already here")
    session = Session(world)
    client = _authenticated(session, threads)
    contents = {}
    puts = []
    for i in range(12):
        name = "taken" if i == 5 else f"up{i}"
        contents[name] = os.urandom(1000 * (i + 1))
        (tmp_path / name).write_bytes(contents[name])
        puts.append(client.put(str(tmp_path / name), f"sub/{name}"))
    listed = client.list("sub")  # after the uploads: sees every file stored before it
    for _ in range(50):  # every PUT, its DATA and END, without a READY, and no commit run yet
        session.pump.pump()
        session.clock.advance(0)
    assert session.server.serving.committing == 11, "the uploads after a commit started were read"
    assert session.server.state == "ready" and not any(put.called for put in puts)
    assert not (root / "sub" / "up0").exists(), "no name before the commit"
    session.settle(threads)
    outcomes = _fired(puts + [listed])
    for i, outcome in enumerate(outcomes[:12]):
        if i == 5:
            assert isinstance(outcome.value, errors.Exists)
        else:
            assert outcome["sha1"] == hashlib.sha1(contents[f"up{i}"]).hexdigest()
            assert (root / "sub" / f"up{i}").read_bytes() == contents[f"up{i}"]
    assert (root / "sub" / "taken").read_bytes() == b"already here"
    assert {entry["name"] for entry in outcomes[12]} >= {f"up{i}" for i in range(12) if i != 5}
    assert not [path.name for path in (root / "sub").iterdir() if path.name.startswith(".eke-part")]
    assert session.server.serving.committing == 0 and not session.server.busy


def test_a_fatal_error_in_a_pipeline_fails_the_rest_and_keeps_what_was_finished(world, threads, tmp_path):
    root = world[0]
    for i in range(6):
        (root / "sub" / f"big{i}").write_bytes(os.urandom(3 * 1024 * 1024))
    session = Session(world)
    client = _authenticated(session, threads)
    gets = [client.get(f"sub/big{i}", str(tmp_path / f"big{i}")) for i in range(6)]
    for _ in range(400):  # until two files are in and the third flows
        session.pump.pump()
        threads.run()
        session.clock.advance(0)
        # (Counted by the answers, not by the third .part's size: its bytes are written by a
        # worker thread, and under load it could still be empty when all six had come.)
        if sum(get.called for get in gets) >= 2:
            break
    session.factory.drain(grace=0)  # the transfer is cut: a fatal try-later
    session.settle(threads)
    outcomes = _fired(gets)
    finished = [isinstance(outcome, dict) for outcome in outcomes].count(True)
    assert 2 <= finished < 6
    assert all(isinstance(outcome, dict) for outcome in outcomes[:finished]), "answered in order"
    for i in range(finished):
        assert (tmp_path / f"big{i}").read_bytes() == (root / "sub" / f"big{i}").read_bytes()
    for i in range(finished, 6):
        assert isinstance(outcomes[i].value, errors.TryLater) and not (tmp_path / f"big{i}").exists()
    kept = {path.name: path.stat().st_size for path in tmp_path.glob("*.part")}
    assert all(0 < size <= 3 * 1024 * 1024 for size in kept.values()), kept  # for a resume; none empty


def test_a_connection_with_many_requests_queued_does_not_starve_another(world, threads):
    """The server takes one connection's next request on a later turn of its loop, so the
    other connection's request is answered after a few of the flood's, not after all."""
    flooding = Session(world)
    flooder = _authenticated(flooding, threads)
    other = Session(world)
    other.factory, other.clock = flooding.factory, flooding.clock  # one server, one clock
    other.server = flooding.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    other.client = ClientProtocol("fuzzer", "pw", timeout=30, clock=flooding.clock)
    other.pump = iosim.connect(
        other.server, iosim.makeFakeServer(other.server), other.client, iosim.makeFakeClient(other.client),
        greet=False,
    )
    client = _authenticated(other, threads)
    flood = [flooder.stat("hello.txt") for _ in range(2000)]
    flooding.pump.pump()  # every request reaches the server
    assert session_held(flooding), "the requests after the first wait, unread, in the decoder"
    answered_first = []
    asked = client.stat("sub")
    asked.addCallback(lambda entry: answered_first.append(sum(1 for d in flood if d.called)))
    for _ in range(100_000):
        flooding.pump.pump()
        other.pump.pump()
        one_turn(flooding.clock)
        if all(d.called for d in flood) and asked.called:
            break
    assert answered_first and answered_first[0] < 50, answered_first
    assert all(d.called for d in flood)


def one_turn(clock):
    """What a reactor does in one iteration: the calls due now, not those they schedule (a
    Clock's advance(0) runs those too, which would hide any unfairness)."""
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        if call in clock.calls:  # not cancelled by an earlier one
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def session_held(session):
    """True when the server holds the frames after a waiting request (it reads no more)."""
    return session.server._next_request is not None and "frames held" in session.server._holds


def test_uploads_awaiting_their_commit_are_bounded_per_connection_and_in_all(world, threads, tmp_path):
    """Each upload past END holds a part file until its commit: one connection keeps at most
    MAX_COMMITTING of them, and once the server as a whole holds COMMITTING_LIMIT a connection
    takes no further upload until its own are answered."""
    from eketwist import serving

    session = Session(world)
    client = _authenticated(session, threads)
    session.factory.COMMITTING_LIMIT = 5
    puts = []
    for i in range(serving.Serving.MAX_COMMITTING + 10):
        (tmp_path / f"c{i}").write_bytes(b"%d" % i)
        puts.append(client.put(str(tmp_path / f"c{i}"), f"sub/c{i}"))
    for _ in range(200):  # no commit runs: the threads wait
        session.pump.pump()
        session.clock.advance(0)
    assert session.server.serving.committing == 5 == session.factory.committing
    session.factory.COMMITTING_LIMIT = 256  # now one connection's own bound holds
    threads.run()
    for _ in range(200):
        session.pump.pump()
        session.clock.advance(0)
    assert session.server.serving.committing == serving.Serving.MAX_COMMITTING
    session.settle(threads)
    assert all(isinstance(outcome, dict) for outcome in _fired(puts))
    assert session.factory.committing == 0 and session.server.serving.committing == 0


def test_a_commit_that_fails_the_connection_leaves_no_count_behind(world, threads, tmp_path, monkeypatch):
    """A disk error renaming one upload ends the connection; the uploads committed with it and
    after it are still counted out, so the server's bound on uploads in commit does not creep."""
    import errno

    from eketwist import files

    real_link = files.os.link

    def failing_link(source, destination, **at):  # how a PUT without force names its file
        if destination == "bad0":  # the server names it in its directory's descriptor
            raise OSError(errno.EIO, "Input/output error")
        return real_link(source, destination, **at)

    monkeypatch.setattr(files.os, "link", failing_link)
    session = Session(world)
    puts = _put_many(_authenticated(session, threads), tmp_path, "bad", 6)
    session.settle(threads)
    outcomes = _fired(puts)
    assert not isinstance(outcomes[0], dict) and "Input/output error" in outcomes[0].value.message
    assert session.server.closing
    assert session.factory.committing == 0 and session.server.serving.committing == 0


def test_a_drain_takes_no_new_upload_beside_those_being_committed(world, threads, tmp_path):
    """Shutting down: the uploads past their END are committed and answered, no further one
    starts, and the connection closes (try-later) within the grace period."""
    session = Session(world)
    puts = _put_many(_authenticated(session, threads), tmp_path, "drained", 40)
    for _ in range(30):  # some uploads reach END; their commits wait in the pool
        session.pump.pump()
        session.clock.advance(0)
    owed = session.server.serving.committing
    owed += session.server.upload_in_progress is not None  # a running upload may finish
    assert owed > 0
    drained = session.factory.drain(grace=1.0)
    session.settle(threads)
    outcomes = _fired(puts)
    stored = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    assert len(stored) == owed, "those past END are answered; none started after the drain"
    assert all(isinstance(outcome.value, errors.TryLater) for outcome in outcomes[owed:])
    assert drained.called and session.server.closing
