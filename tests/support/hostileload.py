"""Hostile load against a real daemon (`make hostile`, and a shorter run in the system tests):
HALF_OPEN unauthenticated connections (each sends half a HELLO and stops, from SOURCES loopback
addresses) and SLOW_READERS authenticated connections that ask for a large file and never
read, while a legitimate client downloads a file with the real client command. Returns the
download's figures and the daemon's descriptors and memory before, during and after."""

import hashlib
import json
import os
import pathlib
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from eketwist import userdb
from eketwist.server import ServerFactory

from .processes import BIN, MiB, Daemon, descriptors, make_users, raise_descriptor_limit, rss_bytes, write_random
from .rawclient import HEADER, RawClient


def _half_open(port, source):
    raw = RawClient(port, source=source)
    raw.sock.sendall(HEADER.pack(60, 0) + b'{"type":"hel')  # and never the rest
    return raw


def _slow_reader(port, source, password):
    raw = RawClient(port, source=source, receive_buffer=4096)
    if raw.handshake("reader", password)["type"] != "ok":
        raise RuntimeError("slow reader could not log in")
    raw.send_control({"type": "get", "path": "big.bin"})
    return raw


# The daemon's listen queue holds 50 connections not yet accepted (Twisted's default backlog);
# a burst of connects from 16 threads overflows it before the daemon's next turn, and each
# connection dropped there costs its client a SYN retransmit, one second later (3 s of the
# system test's 400). They are opened in batches that fit, each accepted before the next.
BATCH = 32


def _open_half_open(pool, daemon, count, sources):
    held = []
    before = descriptors(daemon.pid)
    for start in range(0, count, BATCH):
        held += pool.map(lambda i: _half_open(daemon.port, f"127.0.{1 + i % sources}.{1 + i // sources % 250}"),
                         range(start, min(count, start + BATCH)))
        deadline = time.monotonic() + 2  # a connection the daemon turned away adds nothing
        while descriptors(daemon.pid) < before + len(held) and time.monotonic() < deadline:
            time.sleep(0.002)
    return held


def hostile_load(workdir, half_open=1000, slow_readers=100, sources=20, legit_mib=64):
    raise_descriptor_limit()
    workdir = pathlib.Path(workdir)
    root = workdir / "root"
    root.mkdir()
    write_random(root / "big.bin", 64 * MiB)
    write_random(root / "legit.bin", legit_mib * MiB)
    users = workdir / "users"
    make_users(users, {"reader": ("reader pw", userdb.READ), "alice": ("alice pw", userdb.READ)})
    daemon = Daemon(workdir, root, users, server_id="bench").start()
    figures = {"half_open": half_open, "slow_readers": slow_readers, "sources": sources}
    held = []
    try:
        time.sleep(0.5)
        figures["before"] = {"fds": descriptors(daemon.pid), "rss_mib": rss_bytes(daemon.pid) / MiB}
        with ThreadPoolExecutor(16) as pool:
            held += _open_half_open(pool, daemon, half_open, sources)
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
    # Once every connection is gone, the daemon hands back what their records used
    # QUIET_BEFORE_TRIM seconds after the last transfer ended: measured after both.
    deadline = time.monotonic() + 10
    while descriptors(daemon.pid) > figures["before"]["fds"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(ServerFactory.QUIET_BEFORE_TRIM + 0.5)
    figures["after"] = {"fds": descriptors(daemon.pid), "rss_mib": rss_bytes(daemon.pid) / MiB}
    daemon.stop()
    for phase in ("before", "during", "after"):
        figures[phase]["rss_mib"] = round(figures[phase]["rss_mib"], 1)
    return figures
