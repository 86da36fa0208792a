"""Managing remote files, globs and sync, with the real client command against real daemons."""

import json
import os
import subprocess
import time

import pytest

from tests.support.fixtures import make_root, make_users_file
from tests.support.processes import CLIENT, WRITER_PASSWORD, Daemon, run_client, write_random


@pytest.fixture
def server(tmp_path):
    """(port, root, daemon): a daemon of this test's own (these tests change the tree)."""
    root = make_root(tmp_path)
    daemon = Daemon(tmp_path, root, make_users_file(tmp_path)).start()
    yield daemon.port, root, daemon
    daemon.stop()


def writer(port, *args, cwd=None):
    return run_client(port, *args, user="writer", password=WRITER_PASSWORD, cwd=cwd)


def make_tree(top, count=30):
    (top / "sub" / "deeper").mkdir(parents=True)
    for index in range(count):
        place = top if index % 3 == 0 else top / "sub" if index % 3 == 1 else top / "sub" / "deeper"
        write_random(place / f"file-{index:03}.bin", 1000 + index)
    (top / "notes.tmp").write_text("scratch\n")
    os.utime(top / "sub" / "file-001.bin", (1_600_000_000, 1_600_000_000))


def snapshot(top):
    """{relative path: (kind, bytes)} of a local tree."""
    seen = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs:
            seen[os.path.relpath(os.path.join(directory, name), top)] = ("dir", None)
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                seen[os.path.relpath(path, top)] = ("file", handle.read())
    return seen


# -- globs


def test_get_expands_remote_globs_and_refuses_one_that_matches_nothing(server, tmp_path):
    port, root, _ = server
    (root / "logs").mkdir()
    for name in ("a.gz", "b.gz", "c.txt", ".hidden.gz"):
        (root / "logs" / name).write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    result = run_client(port, "get", "logs/*.gz", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["a.gz", "b.gz"]  # a leading dot only by a pattern's own
    result = run_client(port, "get", "*/[c]*", str(out))
    assert result.returncode == 0 and sorted(os.listdir(out)) == ["a.gz", "b.gz", "c.txt"]
    none = run_client(port, "get", "logs/*.zip", str(out))
    assert none.returncode == 5 and "logs/*.zip: no match on the server" in none.stderr


# -- sync


def test_sync_up_and_down_transfers_what_differs_and_nothing_the_second_time(server, tmp_path):
    port, root, daemon = server
    local = tmp_path / "local"
    make_tree(local)
    first = writer(port, "--json", "sync", str(local), ":copy")
    document = json.loads(first.stdout)
    assert first.returncode == 0 and document["transfers"] == 31 and document["up_to_date"] == 0, first.stderr
    assert snapshot(root / "copy") == snapshot(local)
    assert os.stat(root / "copy" / "sub" / "file-001.bin").st_mtime == 1_600_000_000
    again = writer(port, "sync", str(local), ":copy")
    assert again.returncode == 0 and again.stdout == ""
    assert again.stderr == "nothing to do: :copy is up to date (31 files)\n"
    # One file changed, one added: two transfers, the rest left alone.
    (local / "sub" / "file-004.bin").write_bytes(b"changed")
    (local / "added.txt").write_text("new\n")
    changed = json.loads(writer(port, "--json", "sync", str(local), ":copy").stdout)
    assert changed["transfers"] == 2 and changed["up_to_date"] == 30
    assert sorted(f["remote"] for f in changed["files"]) == ["copy/added.txt", "copy/sub/file-004.bin"]
    assert snapshot(root / "copy") == snapshot(local)
    # And down again, into a new directory, then nothing.
    back = tmp_path / "back"
    assert writer(port, "sync", ":copy", str(back)).returncode == 0
    assert snapshot(back) == snapshot(local)
    assert writer(port, "sync", ":copy", str(back)).stderr == f"nothing to do: {back} is up to date (32 files)\n"


def test_sync_dry_run_prints_the_plan_and_changes_nothing(server, tmp_path):
    port, root, _ = server
    local = tmp_path / "local"
    make_tree(local, count=3)
    dry = writer(port, "sync", "-n", str(local), ":copy")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [  # in the order they would be done
        f"send {local}/file-000.bin", f"send {local}/notes.tmp", "mkdir copy/sub", "mkdir copy/sub/deeper",
        f"send {local}/sub/deeper/file-002.bin", f"send {local}/sub/file-001.bin",
    ]
    assert not (root / "copy").exists()


def test_sync_down_with_delete_and_exclude(server, tmp_path):
    port, root, _ = server
    make_tree(root / "tree", count=6)
    local = tmp_path / "mirror"
    assert writer(port, "sync", "--exclude", "*.tmp", ":tree", str(local)).returncode == 0
    assert not (local / "notes.tmp").exists() and (local / "sub" / "deeper" / "file-005.bin").exists()
    (local / "stale.txt").write_text("not on the server\n")
    (local / "keep.tmp").write_text("excluded: kept\n")
    (local / "old-dir" / "inner").mkdir(parents=True)
    os.remove(root / "tree" / "file-000.bin")
    result = writer(port, "sync", "--delete", "--exclude", "*.tmp", ":tree", str(local))
    assert result.returncode == 0, result.stderr
    assert not (local / "stale.txt").exists() and not (local / "old-dir").exists()
    assert not (local / "file-000.bin").exists() and (local / "keep.tmp").exists()


def test_sync_up_with_delete_removes_remote_files(server, tmp_path):
    port, root, _ = server
    local = tmp_path / "local"
    make_tree(local, count=6)
    assert writer(port, "sync", str(local), ":copy").returncode == 0
    (root / "copy" / "extra" / "inside").mkdir(parents=True)
    (root / "copy" / "extra" / "inside" / "x").write_text("x")
    os.remove(local / "sub" / "file-001.bin")
    result = writer(port, "--json", "sync", "--delete", str(local), ":copy")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["deletions"] == 2
    assert snapshot(root / "copy") == snapshot(local)


def test_sync_checksum_finds_a_change_that_kept_size_and_time(server, tmp_path):
    port, root, _ = server
    local = tmp_path / "local"
    make_tree(local, count=3)
    assert writer(port, "sync", str(local), ":copy").returncode == 0
    target = root / "copy" / "file-000.bin"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert writer(port, "sync", str(local), ":copy").stderr.startswith("nothing to do")
    fixed = json.loads(writer(port, "--json", "sync", "--checksum", str(local), ":copy").stdout)
    assert fixed["transfers"] == 1 and fixed["up_to_date"] == 3
    assert target.read_bytes() == (local / "file-000.bin").read_bytes()


def test_an_interrupted_sync_resumes(server, tmp_path):
    port, root, _ = server
    local = tmp_path / "local"
    local.mkdir()
    with open(local / "big.bin", "wb") as handle:
        handle.truncate(3 * 1024**3)
    (local / "small.txt").write_text("small\n")
    command = [*CLIENT, "--port", str(port), "--user", "writer", "sync", str(local), ":copy"]
    env = dict(os.environ, EKE_PASSWORD=WRITER_PASSWORD)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(name.startswith(".eke-part.") and (root / "copy" / name).stat().st_size > 0
                  for name in (os.listdir(root / "copy") if (root / "copy").exists() else [])):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(2)
    assert process.wait(30) == 130
    result = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True, timeout=120)
    document = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    big = [f for f in document["files"] if f["remote"] == "copy/big.bin"][0]
    assert big["resumed_from"] > 0 and (root / "copy" / "big.bin").stat().st_size == 3 * 1024**3


def test_sync_refuses_two_local_or_two_remote_sides(tmp_path):
    for args in (["sync", "a", "b"], ["sync", ":a", ":b"]):
        result = subprocess.run([*CLIENT, "--user", "u", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "exactly one of SRC and DEST is remote" in result.stderr


# -- managing remote files


def test_mkdir_rm_rmdir_mv_chmod_stat_df(server, tmp_path):
    port, root, daemon = server
    assert writer(port, "mkdir", "-p", "a/b/c").returncode == 0
    assert (root / "a" / "b" / "c").is_dir()
    again = writer(port, "mkdir", "a")
    assert again.returncode == 10 and "a: already exists on the server" in again.stderr
    assert writer(port, "mkdir", "-p", "a/b").returncode == 0  # -p: there already is no error
    (root / "a" / "b" / "f1.log").write_text("1")
    (root / "a" / "b" / "f2.log").write_text("2")
    # mv: a rename, refusing to replace without --force
    assert writer(port, "mv", "a/b/f1.log", "a/renamed.log").returncode == 0
    assert (root / "a" / "renamed.log").read_text() == "1" and not (root / "a" / "b" / "f1.log").exists()
    refused = writer(port, "mv", "a/b/f2.log", "a/renamed.log")
    assert refused.returncode == 10 and "use --force" in refused.stderr
    assert writer(port, "mv", "--force", "a/b/f2.log", "a/renamed.log").returncode == 0
    assert (root / "a" / "renamed.log").read_text() == "2"
    # chmod: permission bits
    assert writer(port, "chmod", "600", "a/renamed.log").returncode == 0
    assert (root / "a" / "renamed.log").stat().st_mode & 0o777 == 0o600
    stat = json.loads(writer(port, "--json", "stat", "a/renamed.log", "a").stdout)
    assert [(e["path"], e["kind"], e["mode"]) for e in stat["entries"]] == [("a/renamed.log", "file", 0o600), ("a", "dir", stat["entries"][1]["mode"])]
    # rmdir refuses what is not empty; rm -r takes it all; a glob
    full = writer(port, "rmdir", "a/b")
    assert full.returncode == 10 and "not empty" in full.stderr
    (root / "a" / "x.tmp").write_text("x")
    (root / "a" / "y.tmp").write_text("y")
    assert writer(port, "rm", "a/*.tmp").returncode == 0
    assert not (root / "a" / "x.tmp").exists() and not (root / "a" / "y.tmp").exists()
    directory = writer(port, "rm", "a")
    assert directory.returncode == 5 and "rm -r" in directory.stderr
    assert writer(port, "rm", "-r", "a").returncode == 0 and not (root / "a").exists()
    assert writer(port, "rm", "-f", "never-was").returncode == 0
    space = json.loads(writer(port, "--json", "df").stdout)["space"]
    assert space["total"] >= space["free"] > 0
    log = daemon.log_text()
    assert "writer" in log and "a/renamed.log" in log  # every change is logged


def test_a_read_only_account_can_change_nothing(server, tmp_path):
    port, root, _ = server
    (root / "keep").mkdir()
    for args in (["mkdir", "new"], ["rm", "hello.txt"], ["rmdir", "keep"], ["mv", "hello.txt", "moved"],
                 ["chmod", "600", "hello.txt"]):
        result = run_client(port, *args)
        assert result.returncode == 9 and "permission denied" in result.stderr, (args, result.stderr)
    assert (root / "hello.txt").exists() and (root / "keep").is_dir() and not (root / "new").exists()


def test_no_operation_reaches_partial_uploads_or_the_root(server, tmp_path):
    port, root, _ = server
    part = root / ".eke-part.0123456789abcdef0123456789abcdef"
    part.write_bytes(b"someone's upload")
    for args in (["rm", part.name], ["mv", part.name, "x"], ["chmod", "644", part.name], ["rm", "-r", ""]):
        result = writer(port, *args)
        assert result.returncode in (5, 9), (args, result.stderr)
    assert part.read_bytes() == b"someone's upload" and (root / "hello.txt").exists()


def test_sync_down_never_writes_through_a_symlink_in_the_destination(server, tmp_path):
    port, root, _ = server
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "sub" / "data.bin").write_bytes(b"from the server")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.bin").write_bytes(b"precious")
    local = tmp_path / "dest"
    local.mkdir()
    (local / "sub").symlink_to(victim)
    kept = writer(port, "sync", ":tree", str(local))
    assert kept.returncode == 0 and "sub: skipped: a symlink of that name is in the way" in kept.stderr
    replaced = writer(port, "sync", "--delete", ":tree", str(local))
    assert replaced.returncode == 0, replaced.stderr
    assert (victim / "data.bin").read_bytes() == b"precious"
    assert not (local / "sub").is_symlink() and (local / "sub" / "data.bin").read_bytes() == b"from the server"


def test_a_name_that_is_not_utf8_fails_alone(server, tmp_path):
    port, root, _ = server
    (root / "in").mkdir()
    for name in (b"a", b"\xff.txt", b"c"):
        (tmp_path / os.fsdecode(name)).write_bytes(name)
    result = subprocess.run(
        [*CLIENT, "--port", str(port), "--user", "writer", "--timeout", "10", "put", "a", os.fsdecode(b"\xff.txt"), "c", "in/"],
        cwd=tmp_path, env=dict(os.environ, EKE_PASSWORD=WRITER_PASSWORD), capture_output=True, timeout=60,
    )
    assert result.returncode == 8 and b"the name is not UTF-8" in result.stderr
    assert sorted(os.listdir(root / "in")) == ["a", "c"]


def test_globs_reach_names_with_glob_characters_and_refuse_several_into_one_file(server, tmp_path):
    port, root, _ = server
    (root / "r[1].txt").write_text("literal")
    result = run_client(port, "get", "r[1].txt", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "r[1].txt").read_text() == "literal"
    several = run_client(port, "get", "*.txt", "one-file", cwd=tmp_path)
    assert several.returncode == 2 and several.stderr.count("\n") == 1
    assert "the globs name several files" in several.stderr and not (tmp_path / "one-file").exists()
