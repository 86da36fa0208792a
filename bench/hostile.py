"""Hostile load against a real daemon, with figures: `make hostile` (or `python -m bench.hostile`).

Holds HALF_OPEN unauthenticated connections (each sends half a HELLO and stops, from SOURCES
loopback addresses) and SLOW_READERS authenticated connections that ask for a large file and
never read, while a legitimate client downloads a file with the real client command. Reports
the download's time and the daemon's descriptors and memory before, during and after.

Then two attacks of docs/security.md, measured: LISTINGS connections from one address each ask
for the listing of a directory of LISTING_FILES files and never read it (the daemon's memory
must stay bounded); and telling usernames apart by time: HELLO answered for known and unknown
names, and SHARE answered for a name that just logged in and one that did not, interleaved,
with the difference in means over its standard error (a z-score: under 2 tells nothing).
"""

import argparse
import statistics
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from eketwist import userdb
from eketwist.connection import CLOSE_GRACE
from tests.support.hostileload import hostile_load
from tests.support.processes import BIN, Daemon, make_users, rss_bytes
from tests.support.rawclient import RawClient

MiB = 1024 * 1024


def _stalled_listing(port, source, password, path):
    raw = RawClient(port, source=source, receive_buffer=4096)
    if raw.handshake("reader", password)["type"] != "ok":
        raise RuntimeError("lister could not log in")
    raw.send_control({"type": "list", "path": path, "recursive": True})
    return raw


def stalled_listings(workdir, listings=60, files=200_000):
    """The daemon's memory while `listings` connections from one address each stall the
    listing of a directory of `files` files."""
    workdir = pathlib.Path(workdir)
    root = workdir / "root"
    (root / "many").mkdir(parents=True)
    for i in range(files):
        os.close(os.open(root / "many" / f"file-{i:07d}-{'x' * 24}", os.O_CREAT | os.O_WRONLY, 0o644))
    users = workdir / "users"
    make_users(users, {"reader": ("reader pw", userdb.READ)})
    daemon = Daemon(workdir, root, users, "--idle-timeout", "2", server_id="bench").start()
    figures = {"listings": listings, "files": files}
    held = []
    try:
        time.sleep(0.5)
        figures["before_rss_mib"] = round(rss_bytes(daemon.pid) / MiB, 1)
        with ThreadPoolExecutor(8) as pool:
            held += pool.map(lambda i: _stalled_listing(daemon.port, "127.3.0.1", "reader pw", "many"), range(listings))
        time.sleep(2.0)
        figures["during_rss_mib"] = round(rss_bytes(daemon.pid) / MiB, 1)
        # Past the idle timeout and the grace a closing connection gives its peer to read the
        # ERROR: the server has cut them itself.
        time.sleep(2.0 + CLOSE_GRACE + 2.0)
        figures["closed_by_server"] = sum(1 for raw in held if _closed(raw))
        time.sleep(2.0)
        figures["after_rss_mib"] = round(rss_bytes(daemon.pid) / MiB, 1)
    finally:
        for raw in held:
            raw.close()
        daemon.stop()
    return figures


def _closed(raw):
    raw.sock.settimeout(0.5)
    try:
        return raw.closed_by_peer()
    except OSError:
        return False


def _hello_seconds(port, source, name):
    raw = RawClient(port, source=source)
    try:
        started = time.perf_counter()
        raw.send({"type": "hello", "version": 1, "user": name})
        raw.recv()
        return time.perf_counter() - started
    finally:
        raw.close()


def _share_seconds(port, source, name):
    from eketwist import spake2plus

    raw = RawClient(port, source=source)
    try:
        raw.send({"type": "hello", "version": 1, "user": name})
        raw.recv()
        _, share = spake2plus.prover_share(12345)
        started = time.perf_counter()
        raw.send({"type": "share", "share": share.hex()})
        raw.recv()
        return time.perf_counter() - started
    finally:
        raw.close()


def _z(first, second):
    spread = (statistics.variance(first) / len(first) + statistics.variance(second) / len(second)) ** 0.5
    return round((statistics.mean(first) - statistics.mean(second)) / spread, 2) if spread else 0.0


def name_timing(workdir, rounds=250):
    """Known vs unknown names by the time of the answers (interleaved, a fresh address each)."""
    workdir = pathlib.Path(workdir)
    root = workdir / "root"
    root.mkdir()
    users = workdir / "users"
    make_users(users, {"alice": ("alice pw", userdb.READ), "bob": ("bob pw", userdb.READ)})
    # Every share counts as a failure: room for the measurement's own guesses.
    daemon = Daemon(workdir, root, users, "--max-failures", "1000000", "--failure-delay", "0",
                    "--handshake-rate", "100000", "--handshake-burst", "100000", server_id="bench").start()
    try:
        result = subprocess.run(
            [str(BIN / "eke-client"), "--port", str(daemon.port), "--user", "alice", "-q", "ls"],
            capture_output=True, text=True, env=dict(os.environ, EKE_PASSWORD="alice pw"), timeout=60,
        )
        if result.returncode:
            raise RuntimeError(f"alice could not log in: {result.stderr}")
        source = iter(f"127.4.{i // 250}.{1 + i % 250}" for i in range(10 * rounds))
        hello = {"known": [], "unknown": []}
        share = {"logged in": [], "unknown": []}
        probes = [
            (hello["known"], _hello_seconds, "bob"), (hello["unknown"], _hello_seconds, "bom"),
            (share["logged in"], _share_seconds, "alice"), (share["unknown"], _share_seconds, "alicf"),
        ]
        for _ in range(rounds):
            # A new order each round: each probe's connection leaves work behind it (its close,
            # its log lines), which would otherwise always slow the same next probe.
            random.shuffle(probes)
            for times, probe, name in probes:
                times.append(probe(daemon.port, next(source), name))
    finally:
        daemon.stop()
    ms = lambda values: round(statistics.mean(values) * 1000, 3)  # noqa: E731
    return {
        "rounds": rounds,
        "hello_ms": {kind: ms(values) for kind, values in hello.items()},
        "hello_z": _z(hello["known"], hello["unknown"]),
        "share_ms": {kind: ms(values) for kind, values in share.items()},
        "share_z": _z(share["logged in"], share["unknown"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--slow-readers", type=int, default=100)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--legit-mib", type=int, default=64)
    parser.add_argument("--listings", type=int, default=60)
    parser.add_argument("--listing-files", type=int, default=200_000)
    parser.add_argument("--timing-rounds", type=int, default=250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        figures = hostile_load(workdir, args.half_open, args.slow_readers, args.sources, args.legit_mib)
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as workdir:  # a real disk, not a tmpfs
        figures["stalled_listings"] = stalled_listings(workdir, args.listings, args.listing_files)
    with tempfile.TemporaryDirectory() as workdir:
        figures["name_timing"] = name_timing(workdir, args.timing_rounds)
    print(json.dumps(figures, indent=2))
    ok = figures["legit_download"]["verified"] and figures["daemon_alive"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
