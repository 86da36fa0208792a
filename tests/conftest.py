"""Shared fixtures: a users file, a root with files, a live server on 127.0.0.1, clients."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from eketwist import userdb
from eketwist.client_protocol import ClientProtocol
from eketwist.server import ServerFactory

FAST_SCRYPT = {"n": 1024, "r": 8, "p": 1}
PASSWORD = "alice's secret"
VENV_BIN = pathlib.Path(sys.executable).parent


@pytest.fixture
def users_file(tmp_path):
    users = userdb.Users.new()
    users.by_name["alice"] = userdb.make_user("alice", PASSWORD, FAST_SCRYPT)
    path = tmp_path / "eke-users"
    userdb.save(path, users)
    return path


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture
def factory(root, users_file):
    return ServerFactory(root=str(root), users_path=str(users_file), server_id="test-server")


@pytest.fixture
def server_port(factory):
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def connect_client(port, user="alice", password=PASSWORD):
    """A connected ClientProtocol (not yet authenticated)."""
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), ClientProtocol(user, password))


async def authenticated_client(port, user="alice", password=PASSWORD):
    client = await connect_client(port, user, password)
    await client.authenticated_deferred
    return client


def sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process=None, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def twistd_server(tmp_path, root, users_file):
    """A real `twistd eke` process in the foreground on an ephemeral 127.0.0.1 port."""
    port = free_port()
    log = tmp_path / "twistd.log"
    process = subprocess.Popen(
        [
            str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(log),
            "eke", "--port", f"tcp:{port}:interface=127.0.0.1", "--root", str(root),
            "--users", str(users_file), "--server-id", "e2e",
        ],
        cwd=tmp_path,
    )
    try:
        wait_for_port(port, process)
        yield port, log
    finally:
        process.terminate()
        process.wait(10)
