"""How the bench runs and times each tool: whole commands with their CPU and peak RSS, memory
pre-touched before a timed transfer, a process's RSS sampled while a block runs, the raw TCP
copy that is every throughput's ceiling, and the eketwist client command."""

import contextlib
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from bench.delayproxy import DelayProxy
from tests.support.processes import BIN, cpu_seconds, rss_bytes

MiB = 1024 * 1024


def sha1_of(path):
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def warm_memory(size):
    """Touch `size` bytes of fresh memory and give it back, just before a timed transfer.

    On a VM with free-page reporting (virtio-balloon), memory the guest frees is handed back to
    the host; the next first touch of each page then costs a hypervisor fault. Writing 1 GiB to
    tmpfs measured 0.3 s with memory backed and 0.6 to 1.9 s without, varying run to run. Every
    tool's run starts after this, so each finds memory in the same state and what is measured
    is the tool, not the host's reclaim. In a child process: a child forked from a parent that
    had touched this much memory would report it as its own peak RSS."""
    subprocess.run([sys.executable, "-c", WARM, str(size)], check=True)


WARM = """
import mmap, sys
try:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
except AttributeError:  # not Linux: nothing to do
    sys.exit()
mmap.mmap(-1, int(sys.argv[1]), flags=flags).close()
"""


def drop_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RssSampler:
    """Peak VmRSS of a process while a block runs (sampled every 25 ms: more often slowed
    the transfers measured by about 2%)."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = rss_bytes(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.025):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_measured(command, env=None, stdin=None):
    """Run a command; (wall seconds, CPU seconds, peak RSS bytes, stdout)."""
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin:
        process.stdin.write(stdin.encode())
        process.stdin.close()
    out = process.stdout.read()
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {err.decode(errors='replace')[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, out


# -- the raw TCP baseline


RAW_SENDER = """
import socket, sys
port, path = int(sys.argv[1]), sys.argv[2]
with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as handle:
    sock.sendfile(handle)
"""


def raw_tcp(source, destination, delay_ms=None):
    """The file over a plain socket: sendfile in one process, recv_into + write in this one;
    through the delaying proxy when `delay_ms` is given (started before the clock)."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, contextlib.ExitStack() as stack:
        port = listener.getsockname()[1]
        if delay_ms is not None:
            port = stack.enter_context(DelayProxy(port, delay_ms)).port
        started = time.monotonic()
        sender = subprocess.Popen([sys.executable, "-c", RAW_SENDER, str(port), str(source)])
        conn, _ = listener.accept()
        buffer = bytearray(256 * 1024)
        view = memoryview(buffer)
        with conn, open(destination, "wb", buffering=0) as out:
            while True:
                got = conn.recv_into(buffer)
                if not got:
                    break
                out.write(view[:got])
            os.fsync(out.fileno())
        wall = time.monotonic() - started
        sender.wait()
    return wall


# -- eketwist


def client_command(port, user, *args):
    return [str(BIN / "eke-client"), "--port", str(port), "--user", user, "-q", "--no-progress", *args]


def eke_transfer(daemon, user, password, *args, sample_server_rss=False, port=None):
    """One run of the client command. The server's RSS is sampled only when asked: the timed
    runs leave it out, as the sftp runs do (the memory phase measures it). `port`: to go
    through something in front of the daemon (the delaying proxy)."""
    env = dict(os.environ, EKE_PASSWORD=password)
    command = client_command(port or daemon.port, user, *args)
    cpu_before = cpu_seconds(daemon.pid)
    if sample_server_rss:
        with RssSampler(daemon.pid) as sampler:
            wall, cpu, rss, out = run_measured(command, env=env)
    else:
        sampler = None
        wall, cpu, rss, out = run_measured(command, env=env)
    return {"seconds": wall, "client_cpu": cpu, "client_peak_rss": rss,
            "server_cpu": cpu_seconds(daemon.pid) - cpu_before,
            "server_peak_rss": sampler.peak if sampler else None, "out": out}


def median(values):
    return statistics.median(values)
