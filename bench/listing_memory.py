"""What a listing costs the client: `python -m bench.listing_memory [--entries N] [--name-bytes B]`.

A hostile server (tests/support/hostileserver.py) sends N entries whose names are B bytes long; the
real client runs `ls` (output to /dev/null). Reports the client's peak RSS, and the cost per
entry against an empty listing.
"""

import argparse
import os
import subprocess
import sys

from tests.support.hostileserver import HostileServer, Tree, entry, make_alice

PASSWORD = "listing memory"


def peak_rss(alice, listing):
    """The client's peak RSS in bytes, and its exit code."""
    server = HostileServer(alice, Tree(listing))
    env = dict(os.environ, EKE_PASSWORD=PASSWORD)
    command = [sys.executable, "-m", "eketwist.client", "--port", str(server.port), "--user", "alice", "ls"]
    with open(os.devnull, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        error = process.stderr.read().decode()
    server.stop()
    return usage.ru_maxrss * 1024, process.returncode, error


def names(count, name_bytes):
    for i in range(count):
        number = f"{i:08d}"
        yield entry(number + "x" * max(0, name_bytes - len(number)), size=i, mtime=1_700_000_000.5 + i)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=150_000)
    parser.add_argument("--name-bytes", type=int, default=4000)
    options = parser.parse_args()
    alice = make_alice(PASSWORD)
    empty, _, _ = peak_rss(alice, [])
    full, code, error = peak_rss(alice, names(options.entries, options.name_bytes))
    print(f"{options.entries} entries, names of {options.name_bytes} bytes: client exit {code}, "
          f"peak RSS {empty / 2**20:.1f} MiB empty, {full / 2**20:.1f} MiB full, "
          f"{(full - empty) / options.entries:.0f} bytes per entry")
    if code:
        print(error.strip())


if __name__ == "__main__":
    main()
