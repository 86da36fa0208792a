"""The daemon's edges: it never serves its own files, believes PROXY headers from trusted
proxies only, and keeps its log safe to read and private."""

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from eketwist import proxy, server, tap, userdb

from tests.support.fixtures import sleep
from tests.support.processes import FAST_SCRYPT, BIN as VENV_BIN, Daemon, free_port, wait_for_port
from tests.support.rawclient import RawClient

TWISTD = str(VENV_BIN / "twistd")


def umask_022():
    os.umask(0o022)


def twistd(cwd, *arguments, timeout=30):
    return subprocess.run(
        [TWISTD, *arguments], cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=umask_022
    )


def refusal(result):
    """The one line twistd printed for a refused start (after its usage text)."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(TWISTD), output
    return last


@pytest.fixture
def site(tmp_path, users_file):
    """A directory laid out like the README's: ./eke-users beside ./files."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "hello.txt").write_text("hello\n")
    return tmp_path


# -- the daemon never serves its own files


def test_bare_twistd_eke_refuses_and_the_readme_command_starts_with_a_private_log(site):
    port = f"tcp:{free_port()}:interface=127.0.0.1"
    # `twistd eke`: root "." holds ./eke-users (and twistd.pid, twistd.log).
    line = refusal(twistd(site, "--nodaemon", "eke", "--port", port))
    assert f"the users file {site / 'eke-users'} is inside the served root {site}" in line
    assert "--root ./files" in line
    # The README's `twistd eke --port 4000 --root ./files`, daemonized as written.
    started = twistd(site, "eke", "--port", port, "--root", "./files")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        wait_for_port(int(port.split(":")[1]))
    finally:
        pid = int((site / "twistd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while (site / "twistd.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    # twistd.log was created while the umask was 022: still not readable by others.
    assert stat.S_IMODE((site / "twistd.log").stat().st_mode) & 0o077 == 0


def _key_in_root(site):
    (site / "files" / "key.pem").write_text("not a key")
    return ["--port", "ssl:0:interface=127.0.0.1:privateKey=files/key.pem:certKey=cert.pem", "--root", "files"], "files/key.pem"


def _users_in_root(site):
    shutil.copy(site / "eke-users", site / "files" / "eke-users")
    return ["--root", "files", "--users", "files/eke-users"], "files/eke-users"


def _users_linked_from_root(site):
    # The real file is outside, but the link inside can be replaced by an upload.
    (site / "files" / "users-link").symlink_to(site / "eke-users")
    return ["--root", "files", "--users", "files/users-link"], "files/users-link"


def _users_under_a_users_own_root(site):
    users = userdb.load(site / "eke-users")
    users.by_name["carol"] = userdb.make_user("carol", "pw", FAST_SCRYPT, root=str(site))
    userdb.save(site / "eke-users", users)
    return ["--root", "files"], str(site)


@pytest.mark.parametrize(
    "twistd_options, layout",
    [
        (["--pidfile", "files/twistd.pid"], lambda site: (["--root", "files"], "files/twistd.pid")),
        (["--logfile", "files/twistd.log"], lambda site: (["--root", "files"], "files/twistd.log")),
        (["--rundir", "files", "--pidfile", "twistd.pid"], lambda site: (["--root", "files"], "files/twistd.pid")),
        ([], _key_in_root),
        ([], _users_in_root),
        ([], _users_linked_from_root),
        ([], _users_under_a_users_own_root),
    ],
    ids=["pidfile", "logfile", "pidfile-in-rundir", "tls-key", "users-file", "users-file-symlink", "user-root"],
)
def test_start_refused_when_a_daemon_file_is_inside_a_root(site, twistd_options, layout):
    eke_options, named = layout(site)
    if "--port" not in eke_options:
        eke_options += ["--port", "tcp:0:interface=127.0.0.1"]
    line = refusal(twistd(site, "--nodaemon", "--pidfile=", *twistd_options, "eke", *eke_options))
    assert "inside the served root" in line and named in line, line
    assert not (site / "files" / "twistd.log").exists()


def test_reload_refuses_a_users_file_that_puts_it_inside_a_root(site, monkeypatch):
    monkeypatch.chdir(site)
    options = tap.Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--root", "files"])
    top = tap.makeService(options)
    store = top.factory.users
    users = userdb.load(site / "eke-users")
    users.by_name["mallory"] = userdb.make_user("mallory", "pw", FAST_SCRYPT, root=str(site))
    userdb.save(site / "eke-users", users)
    assert "mallory" not in store.current().by_name  # the last good copy is kept
    assert "alice" in store.current().by_name


@pytest.mark.parametrize(
    "port, extra, expected",
    [
        ("haproxy:tcp:0:interface=127.0.0.1", [], "--trusted-proxies ADDR"),
        ("tcp:0:interface=127.0.0.1", ["--trusted-proxies", "127.0.0.1"], "only to a haproxy: port"),
        ("haproxy:tcp:0:interface=127.0.0.1", ["--trusted-proxies", "10.0.0.1/8"], "host bits set"),
    ],
    ids=["haproxy-without-trusted", "trusted-without-haproxy", "bad-network"],
)
def test_proxy_options_refused(site, port, extra, expected):
    line = refusal(twistd(site, "--nodaemon", "--pidfile=", "eke", "--port", port, "--root", "files", *extra))
    assert expected in line


# -- PROXY protocol from trusted proxies only


class Recorder(protocol.Factory):
    """A wrapped factory that notes what its protocols saw."""

    def __init__(self):
        self.built = []
        self.peers_at_connection = []
        self.received = []

    def buildProtocol(self, addr):
        self.built.append(addr)
        recorder = self

        class Noting(protocol.Protocol):
            def connectionMade(self):
                recorder.peers_at_connection.append(self.transport.getPeer())

            def dataReceived(self, data):
                recorder.received.append(data)

        return Noting()


class Client(protocol.Protocol):
    def __init__(self, first=b""):
        self.first = first
        self.lost = defer.Deferred()
        self.received = b""

    def connectionMade(self):
        if self.first:
            self.transport.write(self.first)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


async def listen(factory, trusted, clock=None):
    endpoint = proxy.TrustedProxyEndpoint(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), proxy.TrustedProxies.parse(trusted), clock=clock
    )
    return await endpoint.listen(factory)


async def connect(port, first=b""):
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Client(first))


async def closed_within(client, seconds):
    timeout = reactor.callLater(seconds, client.lost.cancel)
    try:
        await client.lost
    except defer.CancelledError:
        raise AssertionError(f"still connected after {seconds} s") from None
    timeout.cancel()


HEADER = b"PROXY TCP4 192.0.2.33 127.0.0.1 40404 4000\r\n"


@pytest_twisted.ensureDeferred
async def test_untrusted_peer_is_dropped_at_accept():
    recorder = Recorder()
    port = await listen(recorder, "192.0.2.1,10.0.0.0/8")
    try:
        client = await connect(port, HEADER + b"hello")
        await closed_within(client, 5)
        assert recorder.built == [] and recorder.received == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_trusted_proxy_claim_is_the_peer_the_server_sees_at_connection_made(factory):
    seen = []

    class Noting(server.ServerProtocol):
        def connectionMade(self):
            seen.append(self.transport.getPeer())
            super().connectionMade()

    factory.protocol = Noting
    port = await listen(factory, "127.0.0.1")
    try:
        # The header in pieces, the first shorter than any PROXY signature.
        client = await connect(port, HEADER[:3])
        await sleep(0.1)
        assert seen == []  # nothing reaches the server before the header is whole
        client.transport.write(HEADER[3:])
        for _ in range(50):
            if seen:
                break
            await sleep(0.02)
        assert (seen[0].host, seen[0].port) == ("192.0.2.33", 40404)
        (connection,) = factory.connections
        assert connection.peer == "192.0.2.33:40404"
        client.transport.loseConnection()
        await client.lost
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_silent_or_trickling_trusted_connection_is_dropped_at_the_deadline():
    clock = task.Clock()
    recorder = Recorder()
    port = await listen(recorder, "127.0.0.0/8", clock=clock)
    try:
        client = await connect(port)
        for piece in (b"PRO", b"XY T", b"CP4 "):  # each piece is valid so far, none ends it
            await sleep(0.05)
            clock.advance(proxy.HEADER_TIMEOUT / 4)
            client.transport.write(piece)
        await sleep(0.05)
        assert not client.lost.called
        clock.advance(proxy.HEADER_TIMEOUT / 4)
        await closed_within(client, 5)
        silent = await connect(port)
        await sleep(0.05)
        clock.advance(proxy.HEADER_TIMEOUT)
        await closed_within(silent, 5)
        assert recorder.built == []
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "header",
    [
        proxy.V2_PREFIX + b"\x21\x11\xff\xff",  # announces 64 KiB of addresses and TLVs
        b"PROXY TCP4 " + b"1" * 200,  # a v1 line longer than the protocol allows
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["v2-too-long", "v1-too-long", "not-proxy"],
)
@pytest_twisted.ensureDeferred
async def test_oversized_or_invalid_header_is_dropped_at_once(header):
    recorder = Recorder()
    port = await listen(recorder, "127.0.0.1", clock=task.Clock())  # the deadline never comes
    try:
        client = await connect(port, header)
        await closed_within(client, 5)
        assert recorder.built == []
    finally:
        await port.stopListening()


# -- the log


def test_real_daemon_log_is_private_and_shows_a_peer_escape_escaped(tmp_path, root, users_file):
    daemon = Daemon(tmp_path, root, users_file, preexec_fn=umask_022).start()
    try:
        raw = RawClient(daemon.port)
        raw.send({"type": "error", "code": "\x1b[2J\x1b]0;owned\x07", "message": "x"})
        deadline = time.monotonic() + 10
        while "reported an error" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        raw.close()
        text = daemon.log_text()
        assert "reported an error: \\x1b[2J\\x1b]0;owned\\x07" in text
        assert "\x1b" not in text and "\x07" not in text
        assert stat.S_IMODE(daemon.log.stat().st_mode) & 0o077 == 0
    finally:
        daemon.stop()
