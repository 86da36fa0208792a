"""Small frames leave at once: TCP_NODELAY on every connection of the real daemon (plain TCP,
TLS, PROXY protocol, systemd socket activation) and of the real client (its fast first round,
a --connect endpoint, TLS). Without it, a side that writes two small frames without waiting
for an answer has the second held until the peer's delayed ACK (~40 ms per small file).

The option is read from the kernel's socket itself (tests/peeksockets.py), not from our code."""

import os
import socket
import subprocess

import pytest

from tests.support.processes import CLIENT, PASSWORD, free_port, wait_for_daemon, wait_for_port
from tests.support.peeksockets import nodelay
from .test_operations import make_certificates, need, start, twistd_command


def _connect(port, proxy_header=None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if proxy_header is not None:
        sock.sendall(proxy_header)
    return sock


def _daemon_nodelay(process, port, proxy_header=None):
    sock = _connect(port, proxy_header)
    try:
        return nodelay(process.pid, sock.getsockname()[:2])
    finally:
        sock.close()


def _stop(process):
    process.terminate()
    process.wait(15)


def test_plain_tcp_daemon(root, users_file):
    port = free_port()
    process, output = start(twistd_command(root, users_file, f"tcp:{port}:interface=127.0.0.1"))
    try:
        wait_for_daemon(output.text, port, process)
        assert _daemon_nodelay(process, port) is True
    finally:
        _stop(process)


def test_tls_daemon(root, users_file, tmp_path):
    make_certificates(tmp_path, ["localhost"])
    port = free_port()
    description = f"ssl:{port}:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"
    process, output = start(twistd_command(root, users_file, description))
    try:
        wait_for_daemon(output.text, port, process)
        assert _daemon_nodelay(process, port) is True
    finally:
        _stop(process)


def test_proxy_protocol_daemon(root, users_file):
    port = free_port()
    process, output = start(twistd_command(
        root, users_file, f"haproxy:tcp:{port}:interface=127.0.0.1", "--trusted-proxies", "127.0.0.1"))
    try:
        wait_for_daemon(output.text, port, process)
        header = b"PROXY TCP4 192.0.2.33 127.0.0.1 40404 4000\r\n"
        assert _daemon_nodelay(process, port, header) is True
    finally:
        _stop(process)


def test_socket_activated_daemon(root, users_file):
    activate = need("systemd-socket-activate")
    port = free_port()
    process, output = start([activate, "-l", f"127.0.0.1:{port}", "--fdname=eke",
                             *twistd_command(root, users_file, "systemd:domain=INET:name=eke")])
    try:
        wait_for_port(port, process)
        # systemd-socket-activate execs the daemon: same process, the accepted socket is its.
        assert _daemon_nodelay(process, port) is True
    finally:
        _stop(process)


@pytest.fixture
def silent_listener():
    """A TCP listener that accepts and never answers: the client waits, connected."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


@pytest.mark.parametrize("how", ["first-round", "connect-endpoint", "tls"])
def test_client(silent_listener, tmp_path, how):
    port = silent_listener.getsockname()[1]
    options = {
        "first-round": ["--host", "127.0.0.1", "--port", str(port)],
        "connect-endpoint": ["--connect", f"tcp:host=127.0.0.1:port={port}"],
        "tls": ["--host", "localhost", "--port", str(port), "--tls", "--ca-file", str(tmp_path / "ca.pem")],
    }[how]
    if how == "tls":
        make_certificates(tmp_path, ["localhost"])
    client = subprocess.Popen(
        [*CLIENT, *options, "--user", "alice", "--timeout", "30", "ls"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, EKE_PASSWORD=PASSWORD),
    )
    try:
        silent_listener.settimeout(20)
        accepted, _ = silent_listener.accept()
        try:
            assert nodelay(client.pid, ("127.0.0.1", port)) is True
        finally:
            accepted.close()
    finally:
        client.kill()
        client.wait(10)
