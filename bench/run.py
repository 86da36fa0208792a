"""`make bench`: eketwist against a raw TCP copy, OpenSSH sftp and rsync, in one run.

Every measurement is repeated and its median reported; ratios are against baselines measured
in the same run. Sections (--only): base, here (a large file on tmpfs, a 1 KiB get, handshakes,
memory, on 127.0.0.1), and the shapes users have, in bench/shapes.py (trees of small files, a
20 ms round trip through bench.delayproxy, a second sync of the tree against rsync's, a tree
ten times larger, a large file on the real disk). Writes bench/results.json (not committed).
Options: --help.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from eketwist import userdb
from eketwist.server import ServerFactory

from bench import shapes
from bench.openssh import Sshd, have_sshd
from bench.tools import MiB, drop_file, eke_transfer, median, raw_tcp, sha1_of, warm_memory
from tests.support.processes import Daemon, cpu_seconds, raise_descriptor_limit, rss_bytes, write_random

HERE = pathlib.Path(__file__).parent
USER_PASSWORD = "bench user password"
WRITER_PASSWORD = "bench writer password"
SECTIONS = ("base", *shapes.SECTIONS)


def measure_memory(workdir, root, users, out, size):
    """The server's peak RSS during each transfer against its idle RSS, in a daemon of its own:
    a get of 10 MiB, then of the large file (the two must match: no growth with size), then a
    put of it (which holds more: a split frame, a record being decrypted, the writer's two)."""
    daemon = Daemon(workdir, root, users, server_id="bench").start()
    try:
        time.sleep(0.5)
        idle = rss_bytes(daemon.pid)
        figures = {"server_idle_rss_mib": idle / MiB}
        for name, user, password, args in (
            ("get_10mib", "bench", USER_PASSWORD, ("get", "--no-resume", "medium.bin", str(out / "medium.bin"))),
            ("get_large", "bench", USER_PASSWORD, ("get", "--no-resume", "big.bin", str(out / "memory.bin"))),
            ("put_large", "writer", WRITER_PASSWORD, ("put", "--force", str(root / "big.bin"), "memory-put.bin")),
        ):
            run = eke_transfer(daemon, user, password, *args, sample_server_rss=True)
            figures[f"server_peak_rss_{name}_mib"] = run["server_peak_rss"] / MiB
            figures[f"{name}_minus_idle_mib"] = (run["server_peak_rss"] - idle) / MiB
        figures["server_rss_after_mib"] = rss_bytes(daemon.pid) / MiB
    finally:
        daemon.stop()
        for leftover in (out / "medium.bin", out / "memory.bin", root / "memory-put.bin"):
            drop_file(leftover)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="SECTIONS",
                        help=f"comma-separated, of: {', '.join(SECTIONS)} (default: all). base: the large file on tmpfs, "
                             "the 1 KiB get, handshakes, memory; the others: bench/shapes.py")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the large file (default: 1024)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each large transfer (default: 5; the machine this was built on drifts by 10-20%% between runs)")
    parser.add_argument("--small-repeat", type=int, default=10, help="runs of the 1 KiB get (default: 10)")
    parser.add_argument("--handshakes", type=int, default=3000, help="handshakes for the capacity test")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent handshaking clients")
    parser.add_argument("--idle", type=int, default=1000, help="idle authenticated connections for memory")
    parser.add_argument("--workdir", help="where to put the files (default: a temporary directory in /dev/shm)")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    shapes.add_options(parser)
    args = parser.parse_args()
    sections = [name.strip() for name in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: no section {', '.join(sorted(unknown))} (sections: {', '.join(SECTIONS)})")
    raise_descriptor_limit()
    # On tmpfs by default: the disk is then out of the comparison (fsync is free there), and what
    # is measured is each tool's own cost. (The shapes of bench/shapes.py use the real disk.)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="eke-bench-", dir=shm))
    started, load = time.monotonic(), shapes.loadavg()
    results = {}
    try:
        if "base" in sections:
            results.update(measure(args, workdir))
            results["base_seconds"] = time.monotonic() - started
        chosen = [name for name in shapes.SECTIONS if name in sections]
        if chosen:
            results.update(shapes.measure(args, chosen, workdir))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results.setdefault("machine", {"cpus": os.cpu_count()})
    results["machine"].update(loadavg_start=load, loadavg_end=shapes.loadavg())
    results["sections"] = sections
    results["bench_seconds"] = time.monotonic() - started
    pathlib.Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    if "raw_tcp" in results:
        print_table(results)
    shapes.print_tables(results)
    durations = [f"{name} {results[f'{name}_seconds'] if name == 'base' else results[name]['section_seconds']:.0f} s"
                 for name in sections]
    print(f"\n{', '.join(durations)}: {results['bench_seconds']:.0f} s in all; load average (1, 5, 15 min): "
          f"{load} at the start, {results['machine']['loadavg_end']} at the end, on {os.cpu_count()} cores")
    print(f"figures written to {args.output}")


def measure(args, workdir):
    size = args.size_mib * MiB
    root = workdir / "root"
    root.mkdir(parents=True, exist_ok=True)
    big = root / "big.bin"
    print(f"preparing a {args.size_mib} MiB file in {workdir} ...", file=sys.stderr)
    write_random(big, size)
    (root / "small.bin").write_bytes(os.urandom(1024))
    write_random(root / "medium.bin", 10 * MiB)
    expected = sha1_of(big)
    users = workdir / "users"
    store = userdb.Users.new()
    # Default scrypt cost: the small-file figure includes what a real login costs.
    store.by_name["bench"] = userdb.make_user("bench", USER_PASSWORD)
    store.by_name["writer"] = userdb.make_user("writer", WRITER_PASSWORD, {"n": 1024, "r": 8, "p": 1}, rights=userdb.READ_WRITE)
    userdb.save(users, store)
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    results = {"size_bytes": size, "repeat": args.repeat, "machine": {"cpus": os.cpu_count()}}

    print("server memory: idle, 10 MiB get, large get, large put ...", file=sys.stderr)
    results["memory"] = measure_memory(workdir, root, users, out, size)
    # The capacity test runs every handshake from one address: lift the per-address caps
    # (connections, handshake budget) to measure what the daemon can do, not its policy.
    daemon = Daemon(workdir, root, users, "--max-per-source", "100000", "--max-startups", "100000:30:200000",
                    "--max-connections", "100000", "--handshake-rate", "1000000", "--handshake-burst", "1000000",
                    server_id="bench").start()
    sshd = Sshd(workdir) if have_sshd() else None
    ciphers = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com") if sshd else ()
    runs = {name: [] for name in ("raw", "get", "put", "sftp_put", *ciphers)}
    try:
        warm = size + 512 * MiB  # what one transfer's new page cache and buffers need, and more
        # Interleaved rounds: this machine's speed drifts (shared host, memory reclaim), and
        # each round then measures every tool under the same conditions.
        for round_number in range(args.repeat):
            print(f"round {round_number + 1} of {args.repeat}: raw TCP, eketwist get and put, sftp ...", file=sys.stderr)
            warm_memory(warm)
            runs["raw"].append(raw_tcp(big, out / "raw.bin"))
            drop_file(out / "raw.bin")
            warm_memory(warm)
            run = eke_transfer(daemon, "bench", USER_PASSWORD, "get", "--no-resume", "big.bin", str(out / "eke.bin"))
            assert sha1_of(out / "eke.bin") == expected, "get: digest mismatch"
            drop_file(out / "eke.bin")
            runs["get"].append(run)
            warm_memory(warm)
            run = eke_transfer(daemon, "writer", WRITER_PASSWORD, "put", "--force", str(big), "uploaded.bin")
            assert sha1_of(root / "uploaded.bin") == expected, "put: digest mismatch"
            drop_file(root / "uploaded.bin")
            runs["put"].append(run)
            for cipher in ciphers:
                warm_memory(warm)
                runs[cipher].append(sshd.sftp_get(str(big), str(out / "sftp.bin"), cipher)[0])
                assert sha1_of(out / "sftp.bin") == expected, "sftp: digest mismatch"
                drop_file(out / "sftp.bin")
            if sshd:  # the like-for-like baseline for eketwist's put
                warm_memory(warm)
                runs["sftp_put"].append(sshd.sftp(f"put {big} {out / 'sftp-put.bin'}", ciphers[0])[0])
                assert sha1_of(out / "sftp-put.bin") == expected, "sftp put: digest mismatch"
                drop_file(out / "sftp-put.bin")
        results["raw_tcp"] = {"seconds": median(runs["raw"]), "mb_per_s": size / median(runs["raw"]) / 1e6, "runs": runs["raw"]}
        for cipher in ciphers:
            results[f"sftp_{cipher.split('@')[0]}"] = {
                "seconds": median(runs[cipher]), "mb_per_s": size / median(runs[cipher]) / 1e6, "runs": runs[cipher]}
        if sshd:
            results["sftp_put_aes128-gcm"] = {
                "seconds": median(runs["sftp_put"]), "mb_per_s": size / median(runs["sftp_put"]) / 1e6,
                "runs": runs["sftp_put"]}
        for direction in ("get", "put"):
            measured = runs[direction]
            results[f"eke_{direction}"] = {
                "seconds": median(r["seconds"] for r in measured),
                "mb_per_s": size / median(r["seconds"] for r in measured) / 1e6,
                "runs": [r["seconds"] for r in measured],
                "client_cpu_s": median(r["client_cpu"] for r in measured),
                "server_cpu_s": median(r["server_cpu"] for r in measured),
                # Client and server share this machine's cores: how many of them the transfer
                # kept busy (the cores' count is the ceiling when it is CPU-bound).
                "cores_busy": median((r["client_cpu"] + r["server_cpu"]) / r["seconds"] for r in measured),
                "client_peak_rss_mib": max(r["client_peak_rss"] for r in measured) / MiB,
                "server_peak_rss_mib": results["memory"][f"server_peak_rss_{direction}_large_mib"],
            }

        print("small files ...", file=sys.stderr)
        small_eke, small_sftp = [], []
        for _ in range(args.small_repeat):
            small_eke.append(eke_transfer(daemon, "bench", USER_PASSWORD, "get", "small.bin", str(out / "small.bin"))["seconds"])
            if sshd:
                small_sftp.append(sshd.sftp_get(str(root / "small.bin"), str(out / "small-sftp.bin"), ciphers[0])[0])
        results["eke_small_get"] = {"seconds": median(small_eke), "runs": small_eke}
        if sshd:
            results["sftp_small_get"] = {"seconds": median(small_sftp), "runs": small_sftp}

        print("handshake capacity ...", file=sys.stderr)
        results["handshakes"] = handshake_capacity(daemon, args)
        print("idle connections ...", file=sys.stderr)
        results["memory"]["per_idle_connection_kib"] = idle_cost(daemon, args.idle)
    finally:
        daemon.stop()
        if sshd:
            sshd.stop()
    if not sshd:
        results["sftp"] = "not measured: sshd is missing (make bench installs openssh-server with apt-get)"

    ratios = {}
    for direction in ("get", "put"):
        eke = results[f"eke_{direction}"]["mb_per_s"]
        ratios[f"{direction}_vs_raw_tcp"] = eke / results["raw_tcp"]["mb_per_s"]
        if "sftp_aes128-gcm" in results:
            ratios[f"{direction}_vs_sftp_aes128_gcm"] = eke / results["sftp_aes128-gcm"]["mb_per_s"]
            ratios[f"{direction}_vs_sftp_chacha20"] = eke / results["sftp_chacha20-poly1305"]["mb_per_s"]
    if "sftp_put_aes128-gcm" in results:
        ratios["put_vs_sftp_put_aes128_gcm"] = results["eke_put"]["mb_per_s"] / results["sftp_put_aes128-gcm"]["mb_per_s"]
    if "sftp_small_get" in results:
        ratios["small_get_time_vs_sftp"] = results["eke_small_get"]["seconds"] / results["sftp_small_get"]["seconds"]
    results["ratios"] = ratios
    return results


def handshake_capacity(daemon, args):
    cpu_before = cpu_seconds(daemon.pid)
    result = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", str(daemon.port), "bench", USER_PASSWORD, str(args.concurrency), str(args.handshakes)],
        capture_output=True, text=True, check=True, cwd=HERE.parent,
    )
    figures = json.loads(result.stdout.splitlines()[-1])
    server_cpu = cpu_seconds(daemon.pid) - cpu_before
    per_handshake = server_cpu / (figures["handshakes"] + 1)
    return {
        "completed": figures["handshakes"],
        "failures": figures["failures"],
        "per_second": figures["handshakes"] / figures["seconds"],
        "server_cpu_ms_per_handshake": per_handshake * 1000,
        "per_second_per_server_core": 1 / per_handshake,
    }


def idle_cost(daemon, count):
    # After the transfers, the daemon hands memory back once quiet for a second: measure
    # "before" after that, or the hand-back would be subtracted from the connections' cost.
    time.sleep(ServerFactory.QUIET_BEFORE_TRIM + 1.0)
    before = rss_bytes(daemon.pid)
    holder = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", str(daemon.port), "bench", USER_PASSWORD, "32", str(count), "--hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
    )
    json.loads(holder.stdout.readline())
    time.sleep(1.0)
    during = rss_bytes(daemon.pid)
    holder.stdin.close()
    holder.wait(30)
    return (during - before) / count / 1024


def print_table(results):
    def row(name, value, ratio=""):
        print(f"  {name:<44} {value:>14} {ratio}")

    size_mib = results["size_bytes"] // MiB
    print(f"\neketwist benchmark, {size_mib} MiB file, medians of {results['repeat']} runs, 127.0.0.1")
    raw = results["raw_tcp"]["mb_per_s"]
    row("raw TCP (sendfile -> recv_into)", f"{raw:.0f} MB/s", "(baseline)")
    sftp = results.get("sftp_aes128-gcm", {}).get("mb_per_s")
    if sftp:
        row("sftp get, aes128-gcm", f"{sftp:.0f} MB/s", f"{sftp / raw:.2f}x raw")
        chacha = results["sftp_chacha20-poly1305"]["mb_per_s"]
        row("sftp get, chacha20-poly1305", f"{chacha:.0f} MB/s", f"{chacha / raw:.2f}x raw")
        sftp_put = results["sftp_put_aes128-gcm"]["mb_per_s"]
        row("sftp put, aes128-gcm", f"{sftp_put:.0f} MB/s", f"{sftp_put / raw:.2f}x raw")
    for direction in ("get", "put"):
        eke = results[f"eke_{direction}"]
        ratio = f"{eke['mb_per_s'] / raw:.2f}x raw"
        if sftp:
            ratio += f", {eke['mb_per_s'] / sftp:.2f}x sftp get aes128-gcm"
            if direction == "put":
                ratio += f", {results['ratios']['put_vs_sftp_put_aes128_gcm']:.2f}x sftp put"
        row(f"eketwist {direction}", f"{eke['mb_per_s']:.0f} MB/s", ratio)
        row("  CPU client / server", f"{eke['client_cpu_s']:.2f} / {eke['server_cpu_s']:.2f} s",
            f"{eke['cores_busy']:.2f} of {results['machine']['cpus']} cores busy")
        row("  peak RSS client / server", f"{eke['client_peak_rss_mib']:.0f} / {eke['server_peak_rss_mib']:.0f} MiB")
    small = results["eke_small_get"]["seconds"]
    if "sftp_small_get" in results:
        row("1 KiB get, whole command: eketwist / sftp", f"{small * 1000:.0f} / {results['sftp_small_get']['seconds'] * 1000:.0f} ms",
            f"{results['ratios']['small_get_time_vs_sftp']:.2f}x sftp's time")
    else:
        row("1 KiB get, whole command", f"{small * 1000:.0f} ms")
    hs = results["handshakes"]
    row("handshakes per second (all cores)", f"{hs['per_second']:.0f}/s", f"{hs['failures']} failures")
    row("server CPU per handshake", f"{hs['server_cpu_ms_per_handshake']:.2f} ms",
        f"= {hs['per_second_per_server_core']:.0f}/s on one server core")
    memory = results["memory"]
    row("server RSS idle / peak in 10 MiB get", f"{memory['server_idle_rss_mib']:.1f} / {memory['server_peak_rss_get_10mib_mib']:.1f} MiB",
        f"(+{memory['get_10mib_minus_idle_mib']:.1f} MiB)")
    row(f"server peak RSS in {size_mib} MiB get / put", f"{memory['server_peak_rss_get_large_mib']:.1f} / {memory['server_peak_rss_put_large_mib']:.1f} MiB",
        f"(+{memory['get_large_minus_idle_mib']:.1f} / +{memory['put_large_minus_idle_mib']:.1f} MiB over idle)")
    row("server memory per idle authenticated connection", f"{memory['per_idle_connection_kib']:.1f} KiB")


if __name__ == "__main__":
    main()
