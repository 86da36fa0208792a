"""bench.delayproxy, the benchmarks' long link: it adds its delay to each direction and keeps
the bytes in order."""

import os
import socket
import threading
import time

import pytest

from bench.delayproxy import DelayProxy

DELAY_MS = 10


@pytest.fixture(scope="module")
def proxy():
    """A proxy in front of an echo server (a thread per connection)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(connection):
        with connection:
            while data := connection.recv(1 << 20):
                connection.sendall(data)

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    with listener, DelayProxy(listener.getsockname()[1], delay_ms=DELAY_MS) as running:
        yield running


def connect(proxy):
    connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def round_trip(connection):
    started = time.monotonic()
    connection.sendall(b"x")
    assert connection.recv(1) == b"x"
    return time.monotonic() - started


def test_a_round_trip_takes_the_delay_each_way(proxy):
    with connect(proxy) as connection:
        # The first one also pays for the connection's set-up, as on a real link.
        assert round_trip(connection) >= 4 * DELAY_MS / 1000
        for _ in range(3):
            assert round_trip(connection) >= 2 * DELAY_MS / 1000


def test_bytes_arrive_in_order_and_whole(proxy):
    sent = os.urandom(4 << 20)
    received = bytearray()
    with connect(proxy) as connection:

        def read():
            while len(received) < len(sent):
                received.extend(connection.recv(1 << 20) or b"")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        connection.sendall(sent)
        reader.join(5)
        # The end is forwarded after the bytes: a half-close comes back once all is echoed.
        connection.shutdown(socket.SHUT_WR)
        assert connection.recv(1) == b""
    assert bytes(received) == sent
