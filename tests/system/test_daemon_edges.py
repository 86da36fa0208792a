"""The daemon's edges: it never serves its own files, believes PROXY headers from trusted
proxies only, keeps its log safe to read and private, and refuses what it cannot do in one
line (no traceback, whether it stays in the foreground or daemonizes)."""

import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

import eketwist
from eketwist import proxy, server, service, tap, userdb

from tests.support.fixtures import sleep
from tests.support.processes import FAST_SCRYPT, BIN as VENV_BIN, Daemon, free_port, wait_for_port
from tests.support.rawclient import RawClient

from .test_operations import make_certificates

TWISTD = str(VENV_BIN / "twistd")


def umask_022():
    os.umask(0o022)


def twistd(cwd, *arguments, timeout=30):
    return subprocess.run(
        [TWISTD, *arguments], cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=umask_022
    )


def refusal(result):
    """The one line on stderr of a refused command line (status 2, nothing else printed)."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert result.stdout == "" and result.stderr.count("\n") == 1, output
    assert result.stderr.startswith("twistd eke: "), output
    return result.stderr.strip()


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


# -- refusals and failures: one line, no traceback, in the foreground and daemonized

MODES = {"foreground": ["--nodaemon"], "daemonized": []}


def processes_in(directory):
    """Processes working in `directory`: a daemon left behind would be one."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(directory):
                found.append(int(entry.name))
        except OSError:
            pass  # gone, or not ours to look at
    return found


def run_eke(site, mode, *arguments):
    """twistd as a user runs it, its pidfile and log in `site`. Returns the result and the
    log, once the pidfile is gone and no process is left (a daemonizing twistd returns as
    soon as its daemon reported, before the daemon removes the pidfile and exits)."""
    result = twistd(site, *MODES[mode], "--pidfile", "twistd.pid", "--logfile", "twistd.log", *arguments)
    deadline = time.monotonic() + 10
    while ((site / "twistd.pid").exists() or processes_in(site)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (site / "twistd.pid").exists() and not processes_in(site)
    log = (site / "twistd.log").read_text() if (site / "twistd.log").exists() else ""
    assert "Traceback" not in log, log
    return result, log


def _tls(site, broken):
    make_certificates(site, ["localhost"])
    if broken == "missing":
        (site / "cert.pem").unlink()
    else:
        (site / f"{broken}.pem").write_text("not PEM\n")
    return ["--port", f"ssl:0:interface=127.0.0.1:privateKey={site / 'key.pem'}:certKey={site / 'cert.pem'}"]


def _users_a_directory(site):
    (site / "elsewhere").mkdir()
    return ["--users", "elsewhere"]


REFUSALS = {
    "port-unknown-type": (["--port", "bogus"], "--port: unknown endpoint type 'bogus' (give a port number, or e.g. "
                          "tcp:4000:interface=127.0.0.1): 'bogus'"),
    "port-bad-argument": (["--port", "tcp:0:colour=blue"], "--port: not a valid endpoint description (got an "
                          "unexpected keyword argument 'colour'): 'tcp:0:colour=blue'"),
    "tls-certificate-missing": (lambda site: _tls(site, "missing"),
                                "--port: the TLS certificate {site}/cert.pem: No such file or directory"),
    "tls-certificate-not-pem": (lambda site: _tls(site, "cert"),
                                "--port: the TLS certificate {site}/cert.pem: no PEM certificate in it"),
    "tls-key-not-pem": (lambda site: _tls(site, "key"), "--port: the TLS key {site}/key.pem: no PEM private key in it"),
    "root-missing": (["--root", "nowhere"], "--root: no such directory: 'nowhere'"),
    "root-not-a-directory": (["--root", "eke-users"], "--root: not a directory: 'eke-users'"),
    "users-missing": (["--users", "nobody"],
                      "--users: {site}/nobody: no such file (create it with: eke-users add NAME)"),
    "users-unreadable": (_users_a_directory, "--users: {site}/elsewhere: cannot read: Is a directory"),
    "timeout-not-a-number": (["--handshake-timeout", "abc"], "--handshake-timeout: not a number: 'abc'"),
    "timeout-zero": (["--idle-timeout", "0"], "--idle-timeout: must be more than 0: '0'"),
    "grace-negative": (["--shutdown-grace", "-5"], "--shutdown-grace: must be more than 0: '-5'"),
    "age-infinite": (["--partial-max-age", "inf"], "--partial-max-age: not a finite number: 'inf'"),
    "lockout-negative": (["--lockout", "-1"], "--lockout: must not be negative: '-1'"),
    "rate-zero": (["--handshake-rate", "0"], "--handshake-rate: must be more than 0: '0'"),
    "limit-zero": (["--max-connections", "0"], "--max-connections: must be at least 1: '0'"),
    "limit-fraction": (["--handshake-burst", "2.5"], "--handshake-burst: not a whole number: '2.5'"),
    "size": (["--max-upload-size", "lots"], "--max-upload-size: not a size (e.g. 500M, 10G): 'lots'"),
    "size-infinite": (["--max-upload-size", "infG"], "--max-upload-size: not a size (e.g. 500M, 10G): 'infG'"),
    "startups": (["--max-startups", "10:200:20"], "--max-startups: rate is a percentage (0 to 100): '10:200:20'"),
    "server-id-empty": (["--server-id", ""], "--server-id: must be 1 to 255 bytes: ''"),
    "unknown-option": (["--colour", "blue"], "option --colour not recognized"),
    "missing-value": (["--root"], "option --root requires argument"),
    "extra-argument": (["files"], "unexpected argument 'files' (the options start with --)"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_option_is_one_line_naming_it(site, case, mode):
    options, expected = REFUSALS[case]
    options = options(site) if callable(options) else options
    # Later options win: each case overrides one of these.
    result, log = run_eke(site, mode, "eke", "--port", "tcp:0:interface=127.0.0.1", "--root", "files", *options)
    assert refusal(result) == "twistd eke: " + expected.format(site=site)
    assert log == ""  # refused before twistd started logging


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", ["--pidfile", "--logfile"])
def test_a_missing_directory_for_twistd_files_is_refused_before_it_forks(site, option, mode):
    arguments = [option, "missing/twistd.file", "eke", "--port", "tcp:0:interface=127.0.0.1", "--root", "files"]
    # twistd takes the last --pidfile and --logfile: these replace run_eke's.
    result = twistd(site, *MODES[mode], "--pidfile", "twistd.pid", "--logfile", "twistd.log", *arguments)
    assert refusal(result) == f"twistd eke: twistd {option}: no such directory: '{site / 'missing'}'"
    assert not processes_in(site)


@pytest.mark.parametrize("mode", MODES)
def test_a_running_daemons_pidfile_is_one_line(site, mode):
    (site / "twistd.pid").write_text(str(os.getpid()))  # this test's process: alive
    result = twistd(site, *MODES[mode], "--pidfile", "twistd.pid", "eke", "--port", "tcp:0:interface=127.0.0.1",
                    "--root", "files")
    assert refusal(result) == (f"twistd eke: twistd --pidfile: a daemon runs as PID {os.getpid()} (twistd.pid): "
                               f"stop it (kill {os.getpid()}) or choose another --pidfile")
    assert (site / "twistd.pid").read_text() == str(os.getpid())


@pytest.mark.parametrize("mode", [*MODES, "log-on-stdout"])
def test_a_port_in_use_is_one_line(site, mode):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        arguments = ["eke", "--port", f"tcp:{port}:interface=127.0.0.1", "--root", "files"]
        if mode == "log-on-stdout":  # as under systemd
            result = twistd(site, "--nodaemon", "--pidfile=", "--logfile=-", *arguments)
            log = result.stdout
        else:
            result, log = run_eke(site, mode, *arguments)
    message = f"cannot listen on 127.0.0.1:{port}: address already in use"
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    if mode == "foreground":
        assert result.stdout == "" and result.stderr == f"twistd eke: {message}\n"
    elif mode == "daemonized":
        # twistd's own words around ours, which reach it whole through its 100-byte pipe.
        assert result.stdout == "" and result.stderr == (
            f"An error has occurred: b'eketwist.service.CannotStart: {message}'\n"
            "Please look at log file for more information.\n"
        )
    else:
        assert result.stderr == ""  # the log line says it, once
    assert log.count(message) == 1 and "#critical] " + message in log


def test_a_failed_start_fits_twistds_status_pipe():
    from twisted.internet.error import CannotListenError

    for interface in ("127.0.0.1", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "a-very-long-host-name.example.com"):
        failure = service.listen_failure(
            CannotListenError(interface, 65535, OSError(98, "Address already in use")), "tcp:65535"
        )
        sent = f"1 eketwist.service.CannotStart: {failure}"  # what twistd writes, and reads 100 bytes of
        assert len(sent) <= 100 and str(failure).endswith("65535: address already in use")
    assert failure.message == f"cannot listen on {interface}:65535: address already in use"  # the log's line
    assert failure.code == 1


def test_version_is_eketwists(tmp_path):
    result = twistd(tmp_path, "eke", "--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"eketwist {eketwist.__version__}\n", "")


def test_help_lists_the_essential_options_first_and_hardening_apart(tmp_path):
    result = twistd(tmp_path, "eke", "--help")
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    order = ["--port=", "--root=", "--users=", "--server-id=", "\nService:\n", "--handshake-timeout=",
             "--shutdown-grace=", "\nHardening against floods and password guessing (docs/security.md):\n",
             "--max-startups=", "--handshake-burst=", "--help", "--version"]
    positions = [text.index(needle) for needle in order]
    assert positions == sorted(positions), text
    for name, *_ in tap.Options.optParameters:
        assert text.count(f"--{name}=") == 1, name


def test_help_into_a_closed_pipe_is_quiet(tmp_path):
    # `twistd eke --help | head -1`: the reader is gone before twistd writes.
    process = subprocess.Popen([TWISTD, "eke", "--help"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(30) == 0
    assert process.stderr.read() == b""
    process.stderr.close()


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
