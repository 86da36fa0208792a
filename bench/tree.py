"""A tree of small files by the whole command: `python -m bench.tree [--files N] [--size B]
[--repeat R] [--workdir DIR]`.

`get -r` and `put -r` of N files of B bytes in 10 directories through a real daemon on 127.0.0.1
(the shape most real transfers have, where round trips per file, not bytes, cost the time).
Prints the median of R runs of each. The same tree against rsync and sftp, on 127.0.0.1 and
through a 20 ms round trip: `python -m bench.run --only tree,latency` (bench/shapes.py).
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

from tests.support.processes import PASSWORD, Daemon, make_users, run_client


def make_tree(top, files, size):
    for index in range(files):
        directory = top / f"d{index % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index}").write_bytes(os.urandom(size))


def change_tree(top, count, round_number):
    """Rewrite `count` files of the tree at `top` with new bytes of the same size (so their
    mtime is new and their size is not: a sync must notice by the mtime), spread over the tree
    and different ones each round; their paths relative to `top`."""
    names = sorted(os.path.relpath(os.path.join(d, f), top) for d, _, files in os.walk(top) for f in files)
    stride = max(len(names) // count, 1)
    chosen = names[round_number % stride::stride][:count]
    for name in chosen:
        path = pathlib.Path(top, name)
        path.write_bytes(os.urandom(path.stat().st_size))
    return chosen


def timed(port, *args, cwd):
    started = time.perf_counter()
    result = run_client(port, "-q", *args, cwd=cwd, user="writer")
    if result.returncode != 0:
        raise SystemExit(f"the client failed: {result.stderr.strip()}")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where the files go (default: a temporary directory under /var/tmp, a real disk)")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="eke-tree-", dir=args.workdir or "/var/tmp"))
    daemon = None
    try:
        root = work / "root"
        make_tree(root / "tree", args.files, args.size)
        make_users(work / "users", {"writer": (PASSWORD, "read-write")})
        daemon = Daemon(work, root, work / "users").start()
        gets, puts = [], []
        for run in range(args.repeat):
            local = work / f"get{run}"
            local.mkdir()
            gets.append(timed(daemon.port, "get", "-r", "tree", cwd=local))
            puts.append(timed(daemon.port, "put", "-r", str(local / "tree"), f"put{run}", cwd=work))
        print(f"{args.files} files of {args.size} bytes, 127.0.0.1, median of {args.repeat}: "
              f"get -r {statistics.median(gets):.2f} s, put -r {statistics.median(puts):.2f} s")
    finally:
        if daemon is not None:
            daemon.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
