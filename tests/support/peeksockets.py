"""Look at another process's TCP sockets from outside: their options as the kernel holds them.

pidfd_getfd (Linux 5.6+) duplicates a descriptor of another process into ours; a socket's
options belong to the socket, not the descriptor, so getsockopt on the copy reads the
original's. Needs ptrace rights over the process (our own children, or root).
"""

import ctypes
import os
import socket
import time

import pytest

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
_libc = ctypes.CDLL(None, use_errno=True)


def _steal(pidfd, fd):
    copy = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copy < 0:
        return None
    return copy


def tcp_sockets(pid):
    """{(local address, peer address): TCP_NODELAY set} for every connected TCP socket of `pid`."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError) as problem:
        pytest.skip(f"cannot open a pidfd here: {problem}")
    found = {}
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            copy = _steal(pidfd, int(name))
            if copy is None:
                if ctypes.get_errno() == 38:  # ENOSYS: an older kernel
                    pytest.skip("pidfd_getfd is not available on this kernel")
                continue
            sock = socket.socket(fileno=copy)
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    peer = sock.getpeername()[:2]
                except OSError:
                    continue  # a listening socket
                nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                found[(sock.getsockname()[:2], peer)] = nodelay
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def nodelay(pid, peer, timeout=5.0):
    """Whether `pid`'s socket connected with `peer` ((host, port): our end of the connection,
    or a listener of ours it connected to) gets TCP_NODELAY within `timeout` seconds (the
    process sets it once its event loop has seen the connection, a moment after accept)."""
    deadline = time.monotonic() + timeout
    seen = False
    while True:
        for (_, other_end), enabled in tcp_sockets(pid).items():
            if tuple(other_end) == tuple(peer):
                seen = True
                if enabled:
                    return True
        if time.monotonic() > deadline:
            if not seen:
                raise AssertionError(f"process {pid} has no socket connected with {peer}")
            return False
        time.sleep(0.05)
