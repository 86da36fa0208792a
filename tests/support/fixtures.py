"""Shared fixtures: a users file, a root with files, a live server on 127.0.0.1, clients,
a real daemon, a world for in-memory conversations. Loaded for every layer by tests/conftest.py."""

import gc
import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from eketwist import userdb
from eketwist.client_protocol import ClientProtocol
from eketwist.server import ServerFactory

from .processes import FAST_SCRYPT, PASSWORD, WRITER_PASSWORD, Daemon


def pytest_collection_finish(session):
    """What the test process holds once the tests are collected (pytest, hypothesis, Twisted,
    every test module) stays for the whole run: freeze it out of the collector's sight. The
    server's quiet-time trim (ServerFactory._trim_when_quiet) runs a full gc.collect(), whose
    cost is the size of the whole heap: 50 to 100 ms in a test worker, after every example
    the fuzzer runs to its end (2,100 collections, 26 s of a suite run). Objects the tests make
    are still collected as before."""
    gc.collect()
    gc.freeze()


def make_users_file(directory):
    """The users file of the tests: alice (read-only) and writer (read-write)."""
    users = userdb.Users.new()
    users.by_name["alice"] = userdb.make_user("alice", PASSWORD, FAST_SCRYPT)
    users.by_name["writer"] = userdb.make_user("writer", WRITER_PASSWORD, FAST_SCRYPT, rights=userdb.READ_WRITE)
    path = directory / "eke-users"
    userdb.save(path, users)
    return path


def make_root(directory):
    """The root of the tests: hello.txt, an empty file, sub/data.bin (300,000 random bytes)."""
    root = directory / "root"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture
def users_file(tmp_path):
    return make_users_file(tmp_path)


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path)


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


def slow_part_files(monkeypatch, seconds, min_bytes=0, on_write=None):
    """From now on, part files (the only files opened "r+b") sit on a disk that takes
    `seconds` for each write of at least `min_bytes`; `on_write()` is called as one begins."""
    import time

    real_fdopen = os.fdopen

    class SlowDisk:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            if len(data) >= min_bytes:
                if on_write is not None:
                    on_write()
                time.sleep(seconds)
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real_fdopen(fd, mode, *args, **kwargs)
        return SlowDisk(file) if mode == "r+b" else file

    monkeypatch.setattr(os, "fdopen", fdopen)


def sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest.fixture
def daemon(tmp_path, root, users_file):
    started = []

    def make(*options, **kwargs):
        server = Daemon(tmp_path, root, users_file, *options, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def twistd_server(daemon):
    server = daemon()
    return server.port, server.log


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A root and users file for in-memory conversations (tests/support/conversation.py)."""
    from .conversation import make_world

    return make_world(tmp_path_factory.mktemp("world"), FAST_SCRYPT)
