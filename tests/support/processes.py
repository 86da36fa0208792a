"""Real processes for the system tests and the benchmarks: users files, random files, a
`twistd eke` daemon on 127.0.0.1, the client command, and reading a process's resources.
One copy, used by tests/ and bench/ alike (bench imports tests.support, never the reverse)."""

import hashlib
import os
import pathlib
import resource
import socket
import subprocess
import sys
import time

from eketwist import userdb

BIN = pathlib.Path(sys.executable).parent
CLIENT = [sys.executable, "-m", "eketwist.client"]
FAST_SCRYPT = {"n": 1024, "r": 8, "p": 1}
PASSWORD = "alice's secret"
WRITER_PASSWORD = "writer's secret"
MiB = 1024 * 1024
# How often a wait for a process to listen looks again (a connect or a small read): every
# daemon a test starts, about 70 in a suite run, waits half of it on average for nothing.
POLL = 0.01


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
                raise NotStarted(f"{what} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise NotStarted(f"{what} did not start listening on {port}") from None
            time.sleep(POLL)


def wait_for_daemon(read_log, port, process, timeout=20.0):
    """Until the daemon's own log says it listens on 127.0.0.1:port. Stricter than a connect:
    if another process held the port, a connect would reach that one."""
    needle = f"eketwist listening on 127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while needle not in read_log():
        if process.poll() is not None:
            raise NotStarted(f"the daemon exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise NotStarted(f"the daemon did not start listening on {port}")
        time.sleep(POLL)


class NotStarted(AssertionError):
    """A server did not start: a test failure (and a benchmark's end)."""


def _read(path):
    try:
        return pathlib.Path(path).read_text()
    except FileNotFoundError:
        return ""


def make_users(path, accounts):
    """accounts: {name: (password, rights)}; a cheap scrypt cost (tests and measurements)."""
    users = userdb.Users.new()
    for name, (password, rights) in accounts.items():
        users.by_name[name] = userdb.make_user(name, password, FAST_SCRYPT, rights=rights)
    userdb.save(path, users)


def write_random(path, size):
    """A file of `size` random bytes; returns its path. One random block repeated with a
    distinct head each time (as fast as a copy, for the GiB files of the benchmarks), so that
    nothing downstream can deduplicate it."""
    block = os.urandom(min(size, 4 * MiB) or 1)
    with open(path, "wb") as handle:
        for i in range(size // len(block)):
            handle.write(hashlib.sha256(i.to_bytes(8, "big")).digest()[: len(block)] + block[32:])
        handle.write(os.urandom(size % len(block)))
    return path


def raise_descriptor_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Daemon:
    """A real `twistd eke` process in the foreground on a 127.0.0.1 port; restartable."""

    def __init__(self, directory, root, users, *options, preexec_fn=None, server_id="e2e"):
        self.directory = pathlib.Path(directory)
        self.port = free_port()
        self.log = self.directory / "twistd.log"
        self.command = [
            str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(self.log),
            "eke", "--port", f"tcp:{self.port}:interface=127.0.0.1", "--root", str(root),
            "--users", str(users), "--server-id", server_id, *options,
        ]
        self.preexec_fn = preexec_fn
        self.process = None

    def start(self):
        offset = len(_read(self.log))  # a restart appends to the log
        self.process = subprocess.Popen(self.command, cwd=self.directory, preexec_fn=self.preexec_fn)
        wait_for_daemon(lambda: _read(self.log)[offset:], self.port, self.process)
        return self

    @property
    def pid(self):
        return self.process.pid

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)

    def log_text(self):
        return self.log.read_text()


def run_client(port, *args, password=PASSWORD, user="alice", cwd=None, extra_env=None, timeout=120):
    """The real client command; returns the CompletedProcess."""
    env = dict(os.environ, EKE_PASSWORD=password, **(extra_env or {}))
    return subprocess.run(
        [*CLIENT, *server_options(port, args), "--user", user, *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )


def server_options(port, args):
    """--port, unless the arguments name the server with --connect (the client refuses both)."""
    return [] if "--connect" in args else ["--port", str(port)]


def start_client(port, *args, password=PASSWORD, user="alice", cwd=None):
    env = dict(os.environ, EKE_PASSWORD=password)
    return subprocess.Popen(
        [*CLIENT, *server_options(port, args), "--user", user, "-q", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
    )


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
