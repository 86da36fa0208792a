"""What the benchmarks share: a users file, a daemon process, and reading a process's resources."""

import os
import pathlib
import resource
import socket
import subprocess
import sys
import time

from eketwist import userdb

BIN = pathlib.Path(sys.executable).parent
FAST_SCRYPT = {"n": 1024, "r": 8, "p": 1}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process=None, timeout=20.0, what="the server"):
    """Until something accepts connections on 127.0.0.1:port; fails if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start listening on {port}") from None
            time.sleep(0.05)


def wait_for_daemon(read_log, port, process, timeout=20.0):
    """Until the daemon's own log says it listens on 127.0.0.1:port. Stricter than a connect:
    if another process held the port, a connect would reach that one."""
    needle = f"eketwist listening on 127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while needle not in read_log():
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start listening on {port}")
        time.sleep(0.05)


def _read(path):
    try:
        return pathlib.Path(path).read_text()
    except FileNotFoundError:
        return ""


def make_users(path, accounts):
    """accounts: {name: (password, rights)}; a cheap scrypt cost, this is a measurement."""
    users = userdb.Users.new()
    for name, (password, rights) in accounts.items():
        users.by_name[name] = userdb.make_user(name, password, FAST_SCRYPT, rights=rights)
    userdb.save(path, users)


def raise_descriptor_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Daemon:
    def __init__(self, directory, root, users, *options):
        self.port = free_port()
        self.log = pathlib.Path(directory) / "twistd.log"
        self.process = subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(self.log), "eke",
             "--port", f"tcp:{self.port}:interface=127.0.0.1", "--root", str(root), "--users", str(users),
             "--server-id", "bench", *options],
            cwd=directory,
        )
        wait_for_daemon(lambda: _read(self.log), self.port, self.process)

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        self.process.terminate()
        self.process.wait(15)


def descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
