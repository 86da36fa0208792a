"""The shapes users have (issue 14), each against OpenSSH in the same run: `bench.run --only ...`.

- tree: a tree of small files (1,000 of 4 KiB in 10 directories; --tree, --tree-size) by
  `get -r` and `put -r`, against `rsync -a` over ssh (pull, push) and `sftp -r` (get, put),
  on 127.0.0.1;
- latency: the same through the delaying proxy (bench.delayproxy, 10 ms each way: a 20 ms round
  trip) in front of the daemon and of the sshd; and a large file (256 MiB) by `get` against
  `sftp get` and a raw TCP copy through the same proxy (the proxy's own ceiling);
- sync: the tree again by `eke-client sync` against `rsync -a` over ssh (each with and without
  --delete), up and down, on 127.0.0.1 and through the proxy: a run with nothing changed, and
  one after 1% of the files (--sync-changed) were rewritten; every tool syncs a copy of its own,
  all of them from the same state;
- scale: a tree of 10,000 files of 1 KiB by `get -r` against one of 1,000 of 1 KiB: time per
  file, and the daemon's RSS (VmRSS) sampled during each against idle (the large tree is run
  --scale-repeat times, once by default: it takes 15 to 45 s here);
- disk: a large file (512 MiB) by `get` and `put`, written to the real disk, against `sftp`
  and against `sftp` followed by an fsync of what it wrote (`sync FILE`): eketwist makes every
  file durable before it gives it its name, sftp does not.

Trees and the large files live on the real disk (a directory under --disk-dir, /var/tmp by
default), not tmpfs: users have disks, and each tool's way with them (fsyncs or none) is part
of what they get. The large file over the 20 ms link goes to the fast work directory (tmpfs) so
that its row measures the link. Every command is timed whole (start, login, transfer); the
large files' runs start with memory pre-touched and the disk synced; rounds interleave the
tools; each row is the median of --shape-repeat runs. The trees' ratios are times, eketwist's
over the baseline's (below 1: eketwist faster); the large files' are speeds, as in the rest of
the bench (above 1: eketwist faster).
"""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from eketwist import userdb

from bench.delayproxy import DelayProxy
from bench.openssh import Sshd, have_rsync, have_sshd
from bench.tools import MiB, drop_file, eke_transfer, median, raw_tcp, run_measured, sha1_of, warm_memory
from bench.tree import change_tree, make_tree
from tests.support.processes import Daemon, rss_bytes, write_random

SECTIONS = ("tree", "latency", "sync", "scale", "disk")
CIPHER = "aes128-gcm@openssh.com"  # OpenSSH's fastest here (README.md, Performance)
USER = "shapes"
PASSWORD = "bench shapes password"
TREE_TOOLS = ("eke_get", "rsync_pull", "sftp_get", "eke_put", "rsync_push", "sftp_put")


def add_options(parser):
    parser.add_argument("--tree", type=int, default=1000, metavar="N", help="files in the tree (default: 1000)")
    parser.add_argument("--tree-size", type=int, default=4096, metavar="BYTES", help="size of each (default: 4096)")
    parser.add_argument("--shape-repeat", type=int, default=3, metavar="R",
                        help="runs of each tree, scale, disk and latency row (default: 3)")
    parser.add_argument("--latency-sftp-repeat", type=int, default=0, metavar="R",
                        help="runs of sftp -r through the proxy: 65 to 90 s each way for 1,000 files, one round trip "
                             "or more per file (default: 0, not run, so that make bench stays under 10 minutes)")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="the proxy's delay each way (default: 10)")
    parser.add_argument("--latency-size-mib", type=int, default=256, help="the large file through the proxy (default: 256)")
    parser.add_argument("--sync-changed", type=int, metavar="N",
                        help="files of the tree rewritten between a sync and the next (default: 1%% of --tree)")
    parser.add_argument("--scale-files", type=int, default=10000, help="files in the large tree (default: 10000)")
    parser.add_argument("--scale-size", type=int, default=1024, help="size of each (default: 1024)")
    parser.add_argument("--scale-repeat", type=int, default=1, metavar="R",
                        help="runs of the large tree, 15 to 45 s each here (default: 1; the 1,000 files: --shape-repeat)")
    parser.add_argument("--disk-size-mib", type=int, default=512, help="the large file on the real disk (default: 512)")
    parser.add_argument("--disk-dir", default="/var/tmp", help="a directory on the real disk (default: /var/tmp)")


def loadavg():
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


class Setting:
    """What the sections share, made on first use: a directory on the real disk with the
    daemon's root and a users file, a daemon, a private sshd, the trees."""

    def __init__(self, args, fast_dir):
        self.args = args
        self.disk = pathlib.Path(tempfile.mkdtemp(prefix="eke-shapes-", dir=args.disk_dir))
        self.fast = fast_dir
        self.root = self.disk / "root"
        self.root.mkdir()
        self.sources = self.disk / "src"  # what the puts send: outside the root
        self.sources.mkdir()
        self.out = self.disk / "out"
        self.out.mkdir()
        self.users = self.disk / "users"
        store = userdb.Users.new()
        # The default scrypt cost, as `eke-users add` gives: a whole command includes a real login.
        store.by_name[USER] = userdb.make_user(USER, PASSWORD, rights=userdb.READ_WRITE)
        userdb.save(self.users, store)
        self._daemon = None
        self._sshd = None
        self.trees = set()

    @property
    def daemon(self):
        if self._daemon is None:
            self._daemon = Daemon(self.disk, self.root, self.users, server_id="bench-shapes").start()
        return self._daemon

    @property
    def sshd(self):
        if self._sshd is None and have_sshd():
            self._sshd = Sshd(self.disk)
        return self._sshd

    def tree(self, name, files, size, for_puts=True):
        """A tree in the root (for gets) and, for puts, its copy outside; its name."""
        if name not in self.trees:
            print(f"making a tree of {files} files of {size} bytes ...", flush=True, file=sys.stderr)
            make_tree(self.root / name, files, size)
            if for_puts:
                shutil.copytree(self.root / name, self.sources / name)
            self.trees.add(name)
        return name

    def close(self):
        if self._daemon is not None:
            self._daemon.stop()
        if self._sshd is not None:
            self._sshd.stop()
        subprocess.run(["rm", "-rf", str(self.disk)], check=False)


def measure(args, sections, fast_dir):
    """The selected sections' figures, by section name."""
    setting = Setting(args, fast_dir)
    results = {"disk_dir": str(setting.disk)}
    try:
        for section in sections:
            print(f"{section} ...", file=sys.stderr, flush=True)
            before, started = loadavg(), time.monotonic()
            figures = SECTION_RUNNERS[section](setting)
            figures["loadavg"] = {"before": before, "after": loadavg()}
            figures["section_seconds"] = time.monotonic() - started
            results[section] = figures
    finally:
        setting.close()
    return results


# -- trees


def same_tree(expected, got):
    """Every file of `expected` in `got` with the same bytes, and nothing more."""
    def files(top):
        return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, names in os.walk(top) for f in names)

    names = files(expected)
    if names != files(got):
        raise RuntimeError(f"{got}: not the same files as {expected}")
    for name in names:
        if (expected / name).read_bytes() != (got / name).read_bytes():
            raise RuntimeError(f"{got / name}: not the same bytes")


def tree_round(setting, name, tool, eke_port, ssh_port):
    """One timed transfer of the tree by `tool`; checked, then removed. (seconds, eketwist's run)."""
    daemon, sshd = setting.daemon, setting.sshd
    source_in_root = setting.root / name
    local_source = setting.sources / name
    if tool.endswith(("_get", "_pull")):
        expected, destination = source_in_root, setting.out / tool
    else:
        expected, destination = local_source, setting.root / f"up-{tool}"
    os.sync()  # nothing left over from the last run to write back during this one
    run = None
    if tool == "eke_get":
        run = eke_transfer(daemon, USER, PASSWORD, "get", "-r", name, str(destination), port=eke_port)
        seconds = run["seconds"]
    elif tool == "eke_put":
        run = eke_transfer(daemon, USER, PASSWORD, "put", "-r", str(local_source), destination.name, port=eke_port)
        seconds = run["seconds"]
    elif tool == "rsync_pull":
        seconds = sshd.rsync(("remote", f"{source_in_root}/"), f"{destination}/", CIPHER, port=ssh_port)[0]
    elif tool == "rsync_push":
        seconds = sshd.rsync(f"{local_source}/", ("remote", f"{destination}/"), CIPHER, port=ssh_port)[0]
    elif tool == "sftp_get":
        seconds = sshd.sftp(f"get -r {source_in_root} {destination}", CIPHER, port=ssh_port)[0]
    else:
        seconds = sshd.sftp(f"put -r {local_source} {destination}", CIPHER, port=ssh_port)[0]
    same_tree(expected, destination)
    shutil.rmtree(destination)
    return seconds, run


def tree_rows(setting, name, eke_port, ssh_port, sftp_repeat):
    """Each tool's median over the rounds, and eketwist's CPU; rounds interleave the tools."""
    args = setting.args
    tools = [tool for tool in TREE_TOOLS if tool.startswith("eke") or setting.sshd is not None]
    tools = [tool for tool in tools if not tool.startswith("rsync") or have_rsync()]
    tools = [tool for tool in tools if not tool.startswith("sftp") or sftp_repeat > 0]
    runs = {tool: [] for tool in tools}
    eke_runs = {tool: [] for tool in tools if tool.startswith("eke")}
    for round_number in range(args.shape_repeat):
        for tool in tools:
            if tool.startswith("sftp") and round_number >= sftp_repeat:
                continue
            seconds, run = tree_round(setting, name, tool, eke_port, ssh_port)
            runs[tool].append(seconds)
            if run is not None:
                eke_runs[tool].append(run)
    rows = {tool: {"seconds": median(times), "runs": times} for tool, times in runs.items()}
    for tool, measured in eke_runs.items():
        rows[tool].update(
            client_cpu_s=median(r["client_cpu"] for r in measured), server_cpu_s=median(r["server_cpu"] for r in measured),
            client_peak_rss_mib=max(r["client_peak_rss"] for r in measured) / MiB,
            cpu_runs=[[r["client_cpu"], r["server_cpu"]] for r in measured])
    ratios = {}
    for eke, baseline in (("eke_get", "rsync_pull"), ("eke_put", "rsync_push"), ("eke_get", "sftp_get"), ("eke_put", "sftp_put")):
        if baseline in rows:
            ratios[f"{eke}_vs_{baseline}"] = rows[eke]["seconds"] / rows[baseline]["seconds"]
    rows["ratios"] = ratios
    return rows


def tree_description(args):
    return {"files": args.tree, "file_bytes": args.tree_size, "directories": 10, "repeat": args.shape_repeat}


def section_tree(setting):
    args = setting.args
    name = setting.tree("tree", args.tree, args.tree_size)
    ssh_port = setting.sshd.port if setting.sshd else None
    figures = tree_description(args)
    figures["127.0.0.1"] = tree_rows(setting, name, setting.daemon.port, ssh_port, args.shape_repeat)
    return figures


@contextlib.contextmanager
def over_link(setting):
    """The delaying proxy (--delay-ms each way) in front of the daemon and of the sshd (None
    without one), for a `with` block: (eketwist's proxy, the sshd's)."""
    with contextlib.ExitStack() as stack:
        eke_proxy = stack.enter_context(DelayProxy(setting.daemon.port, setting.args.delay_ms))
        ssh_proxy = stack.enter_context(DelayProxy(setting.sshd.port, setting.args.delay_ms)) if setting.sshd else None
        yield eke_proxy, ssh_proxy


def section_latency(setting):
    args = setting.args
    name = setting.tree("tree", args.tree, args.tree_size)
    figures = {"delay_ms_each_way": args.delay_ms, "round_trip_ms": 2 * args.delay_ms}
    with over_link(setting) as (eke_proxy, ssh_proxy):
        figures["tree"] = dict(tree_description(args), sftp_repeat=min(args.latency_sftp_repeat, args.shape_repeat))
        figures["tree"]["rows"] = tree_rows(setting, name, eke_proxy.port, ssh_proxy and ssh_proxy.port,
                                            args.latency_sftp_repeat)
        figures["large"] = large_over_link(setting, eke_proxy, ssh_proxy)
    return figures


def large_over_link(setting, eke_proxy, ssh_proxy):
    """The large file by get through the proxy against sftp get and raw TCP through it."""
    args = setting.args
    size = args.latency_size_mib * MiB
    source = setting.root / "wan.bin"
    if not source.exists():
        write_random(source, size)
    expected = sha1_of(source)
    out = pathlib.Path(tempfile.mkdtemp(prefix="eke-shapes-link-", dir=setting.fast))
    runs = {"raw_tcp": [], "eke_get": [], "sftp_get": []}
    try:
        for _ in range(args.shape_repeat):
            for tool in runs:
                if tool == "sftp_get" and ssh_proxy is None:
                    continue
                destination = out / f"{tool}.bin"
                warm_memory(size + 512 * MiB)
                if tool == "raw_tcp":
                    seconds = raw_tcp(source, destination, delay_ms=args.delay_ms)
                elif tool == "eke_get":
                    seconds = eke_transfer(setting.daemon, USER, PASSWORD, "get", "--no-resume", source.name,
                                           str(destination), port=eke_proxy.port)["seconds"]
                else:
                    seconds = setting.sshd.sftp(f"get {source} {destination}", CIPHER, port=ssh_proxy.port)[0]
                if sha1_of(destination) != expected:
                    raise RuntimeError(f"{tool} over the link: digest mismatch")
                drop_file(destination)
                runs[tool].append(seconds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        drop_file(source)
    figures = {"size_bytes": size, "on": "tmpfs" if str(setting.fast).startswith("/dev/shm") else str(setting.fast)}
    for tool, times in runs.items():
        if times:
            figures[tool] = {"seconds": median(times), "mb_per_s": size / median(times) / 1e6, "runs": times}
    if "sftp_get" in figures:
        figures["eke_get_speed_vs_sftp_get"] = figures["sftp_get"]["seconds"] / figures["eke_get"]["seconds"]
    figures["eke_get_speed_vs_raw_tcp"] = figures["raw_tcp"]["seconds"] / figures["eke_get"]["seconds"]
    return figures


# -- sync: the same tree again, after a few of its files changed


SYNC_TOOLS = ("eke", "eke_delete", "rsync", "rsync_delete")
SYNC_RATIOS = (("eke", "rsync"), ("eke_delete", "rsync_delete"), ("eke", "rsync_delete"))


def sync_run(setting, tool, source, destination, up, ports, expected_transfers=None):
    """One timed sync of `source` into `destination` by `tool` (remote: the one in the root or
    the sshd's), checked: the two trees the same afterwards and, for eketwist, as many files
    sent as were expected. (seconds, eketwist's run or None)"""
    eke_port, ssh_port = ports
    delete = ("--delete",) if tool.endswith("_delete") else ()
    os.sync()
    run = None
    if tool.startswith("eke"):
        remote = f":{(destination if up else source).relative_to(setting.root)}"
        ends = (str(source), remote) if up else (remote, str(destination))
        run = eke_transfer(setting.daemon, USER, PASSWORD, "--json", "sync", *delete, *ends, port=eke_port)
        seconds = run["seconds"]
        transfers = json.loads(run["out"])["transfers"]
        if expected_transfers is not None and transfers != expected_transfers:
            raise RuntimeError(f"{tool} {source} -> {destination}: {transfers} files sent, {expected_transfers} expected")
    else:
        ends = (f"{source}/", ("remote", f"{destination}/")) if up else (("remote", f"{source}/"), f"{destination}/")
        seconds = setting.sshd.rsync(*ends, CIPHER, port=ssh_port, options=delete)[0]
    same_tree(source, destination)
    return seconds, run


def sync_rows(runs, eke_runs):
    rows = {tool: {"seconds": median(times), "runs": times} for tool, times in runs.items()}
    for tool, measured in eke_runs.items():
        rows[tool].update(client_cpu_s=median(r["client_cpu"] for r in measured),
                          server_cpu_s=median(r["server_cpu"] for r in measured))
    rows["ratios"] = {f"{eke}_vs_{baseline}": rows[eke]["seconds"] / rows[baseline]["seconds"]
                      for eke, baseline in SYNC_RATIOS if baseline in rows}
    return rows


def section_sync(setting):
    """A second sync of the tree by `eke-client sync` against rsync over ssh, up and down, on
    127.0.0.1 and through the delaying proxy: with nothing changed, then with --sync-changed
    files rewritten. Each tool (and each of its --delete variants) keeps a copy of its own per
    direction and link, made by its own first sync (not timed); a round changes the two
    sources once, then every tool brings its copy up to date, then runs again with nothing to do."""
    args = setting.args
    name = setting.tree("sync", args.tree, args.tree_size)
    sources = {"up": setting.sources / name, "down": setting.root / name}
    tools = [tool for tool in SYNC_TOOLS if tool.startswith("eke") or (setting.sshd and have_rsync())]
    states = ("changed", "unchanged")
    with over_link(setting) as (eke_proxy, ssh_proxy):
        links = {"127.0.0.1": (setting.daemon.port, setting.sshd and setting.sshd.port),
                 "link": (eke_proxy.port, ssh_proxy and ssh_proxy.port)}
        copies = {(link, direction, tool): (setting.root if direction == "up" else setting.out) / f"sync-{link}-{direction}-{tool}"
                  for link in links for direction in sources for tool in tools}
        print(f"sync: first copies ({len(copies)}) ...", file=sys.stderr, flush=True)
        for (link, direction, tool), copy in copies.items():
            sync_run(setting, tool, sources[direction], copy, direction == "up", links[link])
        runs = {(link, direction, state, tool): [] for link in links for direction in sources for state in states
                for tool in tools}
        eke_runs = {key: [] for key in runs if key[-1].startswith("eke")}
        changed = max(args.tree // 100, 1) if args.sync_changed is None else args.sync_changed
        for round_number in range(args.shape_repeat):
            print(f"sync: round {round_number + 1} of {args.shape_repeat} ...", file=sys.stderr, flush=True)
            for source in sources.values():
                change_tree(source, changed, round_number)
            for link, ports in links.items():
                for direction, source in sources.items():
                    for state in states:
                        for tool in tools:
                            seconds, run = sync_run(setting, tool, source, copies[link, direction, tool], direction == "up",
                                                    ports, changed if state == "changed" else 0)
                            runs[link, direction, state, tool].append(seconds)
                            if run is not None:
                                eke_runs[link, direction, state, tool].append(run)
    figures = {"files": args.tree, "file_bytes": args.tree_size, "changed_files": changed, "repeat": args.shape_repeat,
               "round_trip_ms": 2 * args.delay_ms}
    for link in links:
        figures[link] = {
            direction: {state: sync_rows({tool: runs[link, direction, state, tool] for tool in tools},
                                         {tool: eke_runs[link, direction, state, tool] for tool in tools if tool.startswith("eke")})
                        for state in states}
            for direction in sources}
    return figures


# -- a tree ten times larger


def section_scale(setting):
    """get -r of the large tree against a tree of 1,000 files of the same size, in a daemon of
    its own (its idle RSS is then the daemon's, not what earlier sections left)."""
    args = setting.args
    trees = {"reference": (1000, setting.tree("scale1000", 1000, args.scale_size, for_puts=False), args.shape_repeat),
             "large": (args.scale_files, setting.tree("scale", args.scale_files, args.scale_size, for_puts=False),
                       args.scale_repeat)}
    directory = setting.disk / "scale-daemon"
    directory.mkdir()
    daemon = Daemon(directory, setting.root, setting.users, server_id="bench-scale").start()
    runs = {key: [] for key in trees}
    try:
        time.sleep(0.5)
        idle = rss_bytes(daemon.pid)
        for round_number in range(max(args.shape_repeat, args.scale_repeat)):
            for key, (files, name, repeat) in trees.items():
                if round_number >= repeat:
                    continue
                destination = setting.out / name
                os.sync()
                run = eke_transfer(daemon, USER, PASSWORD, "get", "-r", name, str(destination), sample_server_rss=True)
                same_tree(setting.root / name, destination)
                shutil.rmtree(destination)
                runs[key].append(run)
        after = rss_bytes(daemon.pid)
    finally:
        daemon.stop()
    figures = {"file_bytes": args.scale_size, "server_idle_rss_mib": idle / MiB,
               "server_rss_after_mib": after / MiB}
    for key, measured in runs.items():
        files = trees[key][0]
        seconds = median(r["seconds"] for r in measured)
        peak = max(r["server_peak_rss"] for r in measured)
        figures[key] = {
            "files": files, "repeat": len(measured), "seconds": seconds, "runs": [r["seconds"] for r in measured],
            "ms_per_file": seconds / files * 1000,
            "server_peak_rss_mib": peak / MiB, "server_peak_minus_idle_mib": (peak - idle) / MiB,
            "client_peak_rss_mib": max(r["client_peak_rss"] for r in measured) / MiB,
            "client_cpu_s": median(r["client_cpu"] for r in measured),
            "server_cpu_s": median(r["server_cpu"] for r in measured),
            "cpu_runs": [[r["client_cpu"], r["server_cpu"]] for r in measured],
        }
    large, reference = figures["large"], figures["reference"]
    figures["per_file_ratio_large_vs_reference"] = large["ms_per_file"] / reference["ms_per_file"]
    # What each further file costs, without the start and the login both commands pay once.
    if large["files"] != reference["files"]:
        figures["marginal_ms_per_file"] = (large["seconds"] - reference["seconds"]) / (large["files"] - reference["files"]) * 1000
    return figures


# -- a large file on the real disk


def section_disk(setting):
    args = setting.args
    size = args.disk_size_mib * MiB
    source = setting.root / "large.bin"
    write_random(source, size)
    expected = sha1_of(source)
    sshd = setting.sshd
    tools = ("eke_get", "sftp_get", "sftp_get_fsync", "eke_put", "sftp_put", "sftp_put_fsync")
    tools = [tool for tool in tools if tool.startswith("eke") or sshd is not None]
    runs = {tool: [] for tool in tools}
    try:
        for _ in range(args.shape_repeat):
            for tool in tools:
                destination = (setting.out if "get" in tool else setting.root) / f"{tool}.bin"
                warm_memory(size + 512 * MiB)
                os.sync()
                if tool == "eke_get":
                    seconds = eke_transfer(setting.daemon, USER, PASSWORD, "get", "--no-resume", source.name, str(destination))["seconds"]
                elif tool == "eke_put":
                    seconds = eke_transfer(setting.daemon, USER, PASSWORD, "put", "--force", str(source), destination.name)["seconds"]
                else:
                    verb = "get" if "get" in tool else "put"
                    started = time.monotonic()
                    sshd.sftp(f"{verb} {source} {destination}", CIPHER)
                    if tool.endswith("_fsync"):
                        run_measured(["sync", str(destination)])  # coreutils: fsync of that file
                    seconds = time.monotonic() - started
                if sha1_of(destination) != expected:
                    raise RuntimeError(f"{tool} on the disk: digest mismatch")
                drop_file(destination)
                runs[tool].append(seconds)
    finally:
        drop_file(source)
    figures = {"size_bytes": size, "repeat": args.shape_repeat, "directory": str(setting.disk)}
    for tool, times in runs.items():
        figures[tool] = {"seconds": median(times), "mb_per_s": size / median(times) / 1e6, "runs": times}
    if sshd is not None:
        for verb in ("get", "put"):
            eke = figures[f"eke_{verb}"]["seconds"]
            figures[f"eke_{verb}_speed_vs_sftp_{verb}"] = figures[f"sftp_{verb}"]["seconds"] / eke
            figures[f"eke_{verb}_speed_vs_sftp_{verb}_fsync"] = figures[f"sftp_{verb}_fsync"]["seconds"] / eke
    return figures


SECTION_RUNNERS = {"tree": section_tree, "latency": section_latency, "sync": section_sync, "scale": section_scale,
                   "disk": section_disk}


# -- the table


def print_tables(results):
    def row(name, *cells):
        print(f"  {name:<40}" + "".join(f" {cell:>18}" for cell in cells))

    def seconds(rows, tool):
        if rows and tool in rows:
            return f"{rows[tool]['seconds']:.2f} s"
        return "not run (1)" if rows is far and sftp_skipped and tool.startswith("sftp") else "-"

    def ratio(rows, key):
        return f"{rows['ratios'][key]:.2f}x" if rows and key in rows.get("ratios", {}) else "-"

    tree = results.get("tree")
    latency = results.get("latency")
    far = sftp_skipped = None  # the tree table's, which `seconds` reads
    if tree or latency:
        shape = tree or latency["tree"]
        local = tree and tree["127.0.0.1"]
        far = latency and latency["tree"]["rows"]
        # sftp was there (an sshd: the large file went through the proxy by sftp), but not run on the tree
        sftp_skipped = latency and not latency["tree"]["sftp_repeat"] and "sftp_get" in latency["large"]
        round_trip = f"{latency['round_trip_ms']:g} ms round trip" if latency else "20 ms round trip"
        print(f"\ntree: {shape['files']} files of {shape['file_bytes']} bytes in 10 directories on the real disk, "
              f"whole commands, medians of {shape['repeat']} runs"
              + (f" (sftp through the proxy: {latency['tree']['sftp_repeat']})" if latency else ""))
        row("", "127.0.0.1", round_trip)
        names = {"eke_get": "eketwist get -r", "rsync_pull": "rsync -a over ssh, pull", "sftp_get": "sftp get -r",
                 "eke_put": "eketwist put -r", "rsync_push": "rsync -a over ssh, push", "sftp_put": "sftp put -r"}
        for tool, name in names.items():
            row(name, seconds(local, tool), seconds(far, tool))
        for tool in ("eke_get", "eke_put"):
            def cpu(rows):
                return f"{rows[tool]['client_cpu_s']:.2f} / {rows[tool]['server_cpu_s']:.2f} s" if rows else "-"
            row(f"  {names[tool]}: CPU client / server", cpu(local), cpu(far))
        for key, name in (("eke_get_vs_rsync_pull", "get -r / rsync pull (time)"), ("eke_put_vs_rsync_push", "put -r / rsync push"),
                          ("eke_get_vs_sftp_get", "get -r / sftp get -r"), ("eke_put_vs_sftp_put", "put -r / sftp put -r")):
            row(name, ratio(local, key), ratio(far, key))
        if sftp_skipped:
            print("  (1) sftp -r through the proxy costs 65 to 90 s each way: run it with --latency-sftp-repeat 1")
        for label, figures in (("tree", tree), ("latency", latency)):
            if figures:
                print(f"  (load average {label}: {figures['loadavg']['before']} before, {figures['loadavg']['after']} after)")
    if latency:
        large = latency["large"]
        print(f"\nlarge file through the proxy ({latency['round_trip_ms']:g} ms round trip), {large['size_bytes'] // MiB} MiB "
              f"written to {large['on']}, medians of {len(large['eke_get']['runs'])} runs")
        row("raw TCP through the proxy (its ceiling)", f"{large['raw_tcp']['seconds']:.2f} s", f"{large['raw_tcp']['mb_per_s']:.0f} MB/s")
        row("eketwist get", f"{large['eke_get']['seconds']:.2f} s", f"{large['eke_get']['mb_per_s']:.0f} MB/s")
        if "sftp_get" in large:
            row("sftp get, aes128-gcm", f"{large['sftp_get']['seconds']:.2f} s", f"{large['sftp_get']['mb_per_s']:.0f} MB/s")
            row("eketwist get speed / sftp get", f"{large['eke_get_speed_vs_sftp_get']:.2f}x")
        row("eketwist get speed / raw TCP", f"{large['eke_get_speed_vs_raw_tcp']:.2f}x")
    sync = results.get("sync")
    if sync:
        links = ("127.0.0.1", "link")
        print(f"\nsync: a second run over {sync['files']} files of {sync['file_bytes']} bytes in 10 directories on the real "
              f"disk, with nothing changed or {sync['changed_files']} files rewritten (new bytes and mtime, same size), "
              f"whole commands, medians of {sync['repeat']} runs")
        row("", "127.0.0.1", f"{sync['round_trip_ms']:g} ms round trip")
        names = {"eke": "eketwist sync", "eke_delete": "eketwist sync --delete", "rsync": "rsync -a over ssh",
                 "rsync_delete": "rsync -a --delete"}
        for direction, way in (("up", "local -> remote"), ("down", "remote -> local")):
            for state in ("unchanged", "changed"):
                print(f"  {direction} ({way}), " + ("nothing changed" if state == "unchanged" else f"{sync['changed_files']} changed"))
                tables = [sync[link][direction][state] for link in links]
                for tool, name in names.items():
                    row(f"    {name}", *(seconds(rows, tool) for rows in tables))
                row("      eketwist sync: CPU client / server",
                    *(f"{rows['eke']['client_cpu_s']:.2f} / {rows['eke']['server_cpu_s']:.2f} s" for rows in tables))
                for eke, baseline in SYNC_RATIOS:
                    row(f"    {names[eke].replace('eketwist ', '')} / {names[baseline].replace(' over ssh', '')}",
                        *(ratio(rows, f"{eke}_vs_{baseline}") for rows in tables))
        print(f"  (load average: {sync['loadavg']['before']} before, {sync['loadavg']['after']} after)")
    scale = results.get("scale")
    if scale:
        big, small = scale["large"], scale["reference"]
        print(f"\nscale: get -r of {big['files']} files of {scale['file_bytes']} bytes against {small['files']}, "
              f"127.0.0.1, real disk, medians of {small['repeat']} and {big['repeat']} runs")
        row("", f"{small['files']} files", f"{big['files']} files")
        row("whole command", f"{small['seconds']:.2f} s", f"{big['seconds']:.2f} s")
        row("time per file", f"{small['ms_per_file']:.3f} ms", f"{big['ms_per_file']:.3f} ms")
        row(f"  ratio per file, {big['files']} / {small['files']}", "", f"{scale['per_file_ratio_large_vs_reference']:.2f}x")
        if "marginal_ms_per_file" in scale:
            row("  each file past the first 1,000 (no start, login)", "", f"{scale['marginal_ms_per_file']:.3f} ms")
        if tree and "eke_get" in tree["127.0.0.1"]:
            per_file = tree["127.0.0.1"]["eke_get"]["seconds"] / tree["files"] * 1000
            row(f"  ({tree['files']} files of {tree['file_bytes']} bytes, tree row)", f"{per_file:.3f} ms")
        row("server peak RSS (idle: %.1f MiB)" % scale["server_idle_rss_mib"], f"{small['server_peak_rss_mib']:.1f} MiB",
            f"{big['server_peak_rss_mib']:.1f} MiB")
        row("  over idle", f"+{small['server_peak_minus_idle_mib']:.1f} MiB", f"+{big['server_peak_minus_idle_mib']:.1f} MiB")
        row("client peak RSS", f"{small['client_peak_rss_mib']:.1f} MiB", f"{big['client_peak_rss_mib']:.1f} MiB")
        row("CPU client / server", f"{small['client_cpu_s']:.2f} / {small['server_cpu_s']:.2f} s",
            f"{big['client_cpu_s']:.2f} / {big['server_cpu_s']:.2f} s")
        print(f"  (server RSS after: {scale['server_rss_after_mib']:.1f} MiB; load average: "
              f"{scale['loadavg']['before']} before, {scale['loadavg']['after']} after)")
    disk = results.get("disk")
    if disk:
        print(f"\nlarge file on the real disk ({disk['directory']}), {disk['size_bytes'] // MiB} MiB, whole commands, "
              f"memory pre-touched, medians of {disk['repeat']} runs")
        row("", "get", "put")
        for name, stem in (("eketwist (fsync, rename)", "eke"), ("sftp, aes128-gcm", "sftp"), ("sftp, then fsync of its file", "sftp")):
            suffix = "_fsync" if "then" in name else ""
            if f"{stem}_get{suffix}" in disk:
                row(name, *(f"{disk[f'{stem}_{verb}{suffix}']['seconds']:.2f} s {disk[f'{stem}_{verb}{suffix}']['mb_per_s']:4.0f} MB/s"
                            for verb in ("get", "put")))
        if "eke_get_speed_vs_sftp_get" in disk:
            row("eketwist speed / sftp", *(f"{disk[f'eke_{verb}_speed_vs_sftp_{verb}']:.2f}x" for verb in ("get", "put")))
            row("eketwist speed / sftp + fsync", *(f"{disk[f'eke_{verb}_speed_vs_sftp_{verb}_fsync']:.2f}x" for verb in ("get", "put")))
        print(f"  (load average: {disk['loadavg']['before']} before, {disk['loadavg']['after']} after)")
