"""Hostile load against a real daemon, with figures: `make hostile` (or `python -m bench.hostile`).

Holds HALF_OPEN unauthenticated connections (each sends half a HELLO and stops, from SOURCES
loopback addresses) and SLOW_READERS authenticated connections that ask for a large file and
never read, while a legitimate client downloads a file with the real client command. Reports
the download's time and the daemon's descriptors and memory before, during and after.
"""

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from eketwist import userdb
from tests.rawclient import HEADER, RawClient

from .common import BIN, Daemon, descriptors, make_users, raise_descriptor_limit, rss_bytes

MiB = 1024 * 1024


def _half_open(port, source):
    raw = RawClient(port, source=source)
    raw.sock.sendall(HEADER.pack(60, 0) + b'{"type":"hel')  # and never the rest
    return raw


def _slow_reader(port, source, password):
    raw = RawClient(port, source=source)
    raw.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    if raw.handshake("reader", password)["type"] != "ok":
        raise RuntimeError("slow reader could not log in")
    raw.send_control({"type": "get", "path": "big.bin"})
    return raw


def _write_random(path, size):
    with open(path, "wb") as handle:
        for _ in range(size // MiB):
            handle.write(os.urandom(MiB))


def run(workdir, half_open=1000, slow_readers=100, sources=20, legit_mib=64):
    raise_descriptor_limit()
    workdir = pathlib.Path(workdir)
    root = workdir / "root"
    root.mkdir()
    _write_random(root / "big.bin", 64 * MiB)
    _write_random(root / "legit.bin", legit_mib * MiB)
    users = workdir / "users"
    make_users(users, {"reader": ("reader pw", userdb.READ), "alice": ("alice pw", userdb.READ)})
    daemon = Daemon(workdir, root, users)
    figures = {"half_open": half_open, "slow_readers": slow_readers, "sources": sources}
    held = []
    try:
        time.sleep(0.5)
        figures["before"] = {"fds": descriptors(daemon.pid), "rss_mib": rss_bytes(daemon.pid) / MiB}
        with ThreadPoolExecutor(16) as pool:
            held += pool.map(lambda i: _half_open(daemon.port, f"127.0.{1 + i % sources}.{1 + i // sources % 250}"), range(half_open))
            held += pool.map(lambda i: _slow_reader(daemon.port, f"127.1.{i % sources}.1", "reader pw"), range(slow_readers))
        time.sleep(1.0)
        figures["during"] = {"fds": descriptors(daemon.pid), "rss_mib": rss_bytes(daemon.pid) / MiB}
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "eke-client"), "--port", str(daemon.port), "--user", "alice", "-q", "--json",
             "get", "legit.bin", str(workdir / "legit.bin")],
            capture_output=True, text=True, env=dict(os.environ, EKE_PASSWORD="alice pw"), timeout=300,
        )
        seconds = time.monotonic() - started
        summary = json.loads(result.stdout) if result.stdout else {"status": "error", "stderr": result.stderr}
        expected = hashlib.sha1((root / "legit.bin").read_bytes()).hexdigest()
        figures["legit_download"] = {
            "status": summary.get("status"),
            "verified": summary.get("files", [{}])[0].get("sha1") == expected,
            "seconds": round(seconds, 2),
            "mb_per_s": round(legit_mib * MiB / seconds / 1e6, 1),
        }
        figures["daemon_alive"] = daemon.process.poll() is None
    finally:
        for raw in held:
            raw.close()
    time.sleep(2.0)
    figures["after"] = {"fds": descriptors(daemon.pid), "rss_mib": rss_bytes(daemon.pid) / MiB}
    daemon.stop()
    for phase in ("before", "during", "after"):
        figures[phase]["rss_mib"] = round(figures[phase]["rss_mib"], 1)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--slow-readers", type=int, default=100)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--legit-mib", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        figures = run(workdir, args.half_open, args.slow_readers, args.sources, args.legit_mib)
    print(json.dumps(figures, indent=2))
    ok = figures["legit_download"]["verified"] and figures["daemon_alive"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
