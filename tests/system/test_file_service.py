"""The file service end to end: a real twistd, the real client command, real files."""

import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import time

import pytest

from eketwist import userdb

from tests.support.processes import FAST_SCRYPT, WRITER_PASSWORD, run_client, start_client, write_random, BIN as VENV_BIN


def sha1(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


def writer(port, *args, **kwargs):
    return run_client(port, *args, user="writer", password=WRITER_PASSWORD, **kwargs)


def wait_for_size(path, at_least, process, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.path.getsize(path) >= at_least:
                return
        except FileNotFoundError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"finished before {at_least} bytes: {process.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {at_least} bytes")


def partials(directory):
    return [name for name in os.listdir(directory) if name.startswith(".eke-part.")]


# -- listing


def test_ls_plain_long_json_and_recursive(daemon, root, tmp_path):
    port = daemon().port
    plain = run_client(port, "ls")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [["empty", "file", "0"], ["hello.txt", "file", "13"], ["sub", "dir", "4096"]] or \
        [line.split("\t")[:2] for line in lines] == [["empty", "file"], ["hello.txt", "file"], ["sub", "dir"]]
    long = run_client(port, "ls", "-l", "sub")
    assert long.stdout.startswith("-rw") and long.stdout.rstrip().endswith(" data.bin")
    as_json = json.loads(run_client(port, "ls", "--json", "sub").stdout)
    assert as_json["status"] == "ok"
    assert as_json["entries"] == [
        {"name": "data.bin", "kind": "file", "size": 300_000,
         "mtime": pytest.approx((root / "sub" / "data.bin").stat().st_mtime),
         "mode": stat.S_IMODE((root / "sub" / "data.bin").stat().st_mode)}
    ]
    deep = run_client(port, "ls", "-R")
    assert [line.split("\t")[0] for line in deep.stdout.splitlines()] == ["empty", "hello.txt", "sub", "sub/data.bin"]
    missing = run_client(port, "ls", "nope")
    assert missing.returncode == 5 and "nope: no such file on the server" in missing.stderr
    outside = run_client(port, "ls", "../")
    assert outside.returncode == 9


def test_ls_of_a_large_directory_arrives_in_batches(daemon, root):
    many = root / "many"
    many.mkdir()
    for i in range(3000):
        (many / f"file-{i:05d}-{'x' * 40}").write_bytes(b"")
    result = run_client(daemon().port, "ls", "--json", "many")
    names = [e["name"] for e in json.loads(result.stdout)["entries"]]
    assert names == sorted(os.listdir(many)) and len(names) == 3000


# -- upload


def test_put_needs_a_read_write_account(daemon, tmp_path, root):
    port = daemon().port
    local = write_random(tmp_path / "up.bin", 1000)
    refused = run_client(port, "put", str(local))
    assert refused.returncode == 9 and "up.bin: permission denied on the server (read-only account)" in refused.stderr
    assert not (root / "up.bin").exists() and partials(root) == []


def test_put_stores_a_verified_file_and_refuses_to_clobber(daemon, tmp_path, root):
    server = daemon()
    local = write_random(tmp_path / "up.bin", 2_000_000)
    os.chmod(local, 0o640)
    os.utime(local, (1_600_000_000, 1_600_000_000.5))
    done = writer(server.port, "put", str(local))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{sha1(local)}  {local}\n"
    stored = root / "up.bin"
    assert sha1(stored) == sha1(local)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o640 and stored.stat().st_mtime == 1_600_000_000.5
    assert "writer from 127.0.0.1" in server.log_text() and "received up.bin (2000000 bytes" in server.log_text()
    write_random(local, 10)
    again = writer(server.port, "put", str(local), "up.bin")
    assert again.returncode == 10 and "up.bin: already exists on the server (use --force to replace it)" in again.stderr
    forced = writer(server.port, "put", "--force", str(local), "up.bin")
    assert forced.returncode == 0 and sha1(stored) == sha1(local)
    into_dir = writer(server.port, "put", str(local), "sub")
    assert into_dir.returncode == 0 and sha1(root / "sub" / "up.bin") == sha1(local)
    renamed = writer(server.port, "put", str(local), "sub/other-name")
    assert renamed.returncode == 0 and (root / "sub" / "other-name").exists()
    assert partials(root) == [] and partials(root / "sub") == []


def test_put_cap_and_full_disk_leave_nothing(daemon, tmp_path, root):
    capped = daemon("--max-upload-size", "1M")
    local = write_random(tmp_path / "big.bin", 2 * 1024 * 1024)
    result = writer(capped.port, "put", str(local))
    assert result.returncode == 11 and "over the server's upload limit" in result.stderr
    assert not (root / "big.bin").exists()
    capped.stop()

    def small_file_limit():  # the daemon may write files of at most 1 MiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    limited = daemon(preexec_fn=small_file_limit)
    result = writer(limited.port, "put", str(local))
    assert result.returncode == 11 and "big.bin: file too large for the receiving system" in result.stderr
    assert not (root / "big.bin").exists() and partials(root) == []
    # The daemon is still serving.
    small = write_random(tmp_path / "small.bin", 1000)
    assert writer(limited.port, "put", str(small)).returncode == 0


def test_put_on_a_full_filesystem(daemon, tmp_path, root, users_file):
    small = tmp_path / "small-fs"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here: " + mounted.stderr.decode())
    try:
        users = userdb.load(users_file)
        users.by_name["tiny"] = userdb.make_user("tiny", "tiny pw", FAST_SCRYPT, root=str(small), rights=userdb.READ_WRITE)
        userdb.save(users_file, users)
        port = daemon().port
        local = write_random(tmp_path / "big.bin", 3 * 1024 * 1024)
        result = run_client(port, "put", str(local), user="tiny", password="tiny pw")
        assert result.returncode == 11 and "no space left" in result.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])


# -- resume
# The files need only be large enough to be cut in the middle: the kill comes once a part file
# holds CUT_AT bytes, and RESUME_SIZE - CUT_AT is left to send while the test notices (5 ms
# polls; at 1 GB/s, 100 ms). 300 MiB files made these four tests 20 s of the suite.
RESUME_SIZE = 128 * 1024 * 1024
CUT_AT = 16 * 1024 * 1024


@pytest.mark.parametrize("killed", ["client", "server"])
def test_get_resumes_after_a_kill(daemon, tmp_path, root, killed):
    server = daemon()
    big = write_random(root / "big.bin", RESUME_SIZE)
    destination = tmp_path / "got.bin"
    client = start_client(server.port, "get", "big.bin", str(destination))
    wait_for_size(str(destination) + ".part", CUT_AT, client)
    if killed == "client":
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        deadline = time.monotonic() + 10
        while "get big.bin aborted" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "get big.bin aborted" in server.log_text()
    else:
        server.kill()
        assert client.wait(30) == 3
        assert "connection to the server was lost" in client.stderr.read()
        server.start()
    assert not destination.exists()
    held = os.path.getsize(str(destination) + ".part")
    assert held > 0
    result = run_client(server.port, "--json", "get", "big.bin", str(destination))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["files"][0]["resumed_from"] == held
    assert summary["files"][0]["sha1"] == sha1(big) == sha1(destination)
    assert f"resumed at {held}" in server.log_text()
    assert not os.path.exists(str(destination) + ".part")


def test_get_starts_over_when_the_file_changed_on_the_server(daemon, tmp_path, root):
    port = daemon().port
    data = write_random(root / "data.bin", 1_000_000)
    destination = tmp_path / "data.bin"
    with open(str(destination) + ".part", "wb") as handle:
        handle.write(b"not the same prefix" * 1000)
    result = run_client(port, "--json", "get", "data.bin", str(destination))
    summary = json.loads(result.stdout)
    assert result.returncode == 0 and summary["files"][0]["resumed_from"] == 0
    assert sha1(destination) == sha1(data)
    # A prefix that does match is continued.
    destination.unlink()  # (a complete local copy would be skipped as up to date)
    with open(data, "rb") as source, open(str(destination) + ".part", "wb") as part:
        part.write(source.read(400_000))
    summary = json.loads(run_client(port, "--json", "get", "data.bin", str(destination)).stdout)
    assert summary["files"][0]["resumed_from"] == 400_000 and sha1(destination) == sha1(data)


@pytest.mark.parametrize("killed", ["client", "server"])
def test_put_resumes_after_a_kill(daemon, tmp_path, root, killed):
    server = daemon()
    local = write_random(tmp_path / "up.bin", RESUME_SIZE)
    env = dict(os.environ, EKE_PASSWORD=WRITER_PASSWORD)
    client = subprocess.Popen(
        [str(VENV_BIN / "eke-client"), "--port", str(server.port), "--user", "writer", "-q", "put", str(local)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 60
    while not (partials(root) and os.path.getsize(root / partials(root)[0]) > CUT_AT):
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.005)
    if killed == "client":
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    else:
        server.kill()
        assert client.wait(30) == 3
        server.start()
    time.sleep(0.2)
    assert not (root / "up.bin").exists()
    assert stat.S_IMODE(os.stat(root / partials(root)[0]).st_mode) == 0o600
    if killed == "client":
        assert "put up.bin aborted after" in server.log_text() and "kept for a resume" in server.log_text()
    held = os.path.getsize(root / partials(root)[0])
    result = writer(server.port, "--json", "put", str(local))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert 0 < summary["files"][0]["resumed_from"] <= held
    assert sha1(root / "up.bin") == sha1(local) == summary["files"][0]["sha1"]
    assert "resumed at" in server.log_text()
    assert partials(root) == []


def test_put_starts_over_when_the_local_file_changed(daemon, tmp_path, root):
    port = daemon().port
    local = write_random(tmp_path / "up.bin", 1_000_000)
    # A partial from an earlier upload of different content.
    from eketwist import files

    stale = root / files.server_part_name("up.bin", "writer")
    with open(stale, "wb") as handle:
        handle.write(os.urandom(500_000))
    summary = json.loads(writer(port, "--json", "put", str(local)).stdout)
    assert summary["status"] == "ok" and summary["files"][0]["resumed_from"] == 0
    assert sha1(root / "up.bin") == sha1(local)


def test_racing_uploads_never_mix(daemon, tmp_path, root, users_file):
    users = userdb.load(users_file)
    users.by_name["other"] = userdb.make_user("other", "other pw", FAST_SCRYPT, rights=userdb.READ_WRITE)
    userdb.save(users_file, users)
    port = daemon().port
    first = write_random(tmp_path / "a.bin", 20 * 1024 * 1024)
    second = write_random(tmp_path / "b.bin", 20 * 1024 * 1024)
    digests = {sha1(first), sha1(second)}
    for _ in range(3):
        clients = [
            subprocess.Popen([*start_args(port, "writer", WRITER_PASSWORD), "put", "--force", str(first), "race.bin"],
                             env=dict(os.environ, EKE_PASSWORD=WRITER_PASSWORD), stderr=subprocess.PIPE, text=True),
            subprocess.Popen([*start_args(port, "other", "other pw"), "put", "--force", str(second), "race.bin"],
                             env=dict(os.environ, EKE_PASSWORD="other pw"), stderr=subprocess.PIPE, text=True),
            subprocess.Popen([*start_args(port, "writer", WRITER_PASSWORD), "put", "--force", str(second), "race.bin"],
                             env=dict(os.environ, EKE_PASSWORD=WRITER_PASSWORD), stderr=subprocess.PIPE, text=True),
        ]
        codes = [c.wait(120) for c in clients]
        # Same user and path at once: one of them is told to come back later.
        assert all(code in (0, 12) for code in codes), [c.stderr.read() for c in clients]
        assert sha1(root / "race.bin") in digests
    assert partials(root) == []


def start_args(port, user, password):
    return [str(VENV_BIN / "eke-client"), "--port", str(port), "--user", user, "-q"]


# -- several files and trees


def make_tree(base):
    (base / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (base / "empty-dir").mkdir()
    (base / "empty-file").write_bytes(b"")
    write_random(base / "top.bin", 200_000)
    write_random(base / "nested" / "mid.bin", 300_000)
    write_random(base / "nested" / "deeper" / "deepest" / "low.bin", 1000)
    os.chmod(base / "top.bin", 0o755)
    os.chmod(base / "nested" / "mid.bin", 0o600)
    os.chmod(base / "nested" / "deeper", 0o750)
    os.symlink("top.bin", base / "a-link")
    for i, path in enumerate(sorted(base.rglob("*"), reverse=True)):
        if not path.is_symlink():
            os.utime(path, (1_500_000_000 + i, 1_500_000_000 + i * 1.25))
    os.utime(base, (1_400_000_000, 1_400_000_000))


def snapshot(base):
    result = {}
    for path in sorted(base.rglob("*")):
        st = path.lstat()
        relative = str(path.relative_to(base))
        if path.is_symlink():
            result[relative] = "symlink"
        elif path.is_dir():
            result[relative] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime)
        else:
            result[relative] = ("file", sha1(path), stat.S_IMODE(st.st_mode), st.st_mtime)
    return result


def test_tree_round_trip_is_identical(daemon, tmp_path, root):
    port = daemon().port
    tree = tmp_path / "tree"
    tree.mkdir()
    make_tree(tree)
    up = writer(port, "--json", "put", "-r", str(tree))
    assert up.returncode == 0, up.stderr
    assert "a-link: skipped: a symlink" in up.stderr
    expected = {k: v for k, v in snapshot(tree).items() if v != "symlink"}
    assert snapshot(root / "tree") == expected
    down = tmp_path / "down"
    down.mkdir()
    got = run_client(port, "get", "-r", "tree", str(down))
    assert got.returncode == 0, got.stderr
    assert snapshot(down / "tree") == expected
    # Run again: everything complete is skipped.
    again = json.loads(run_client(port, "--json", "get", "-r", "tree", str(down)).stdout)
    assert again["status"] == "ok" and {f["status"] for f in again["files"]} == {"skipped"}
    again_up = json.loads(writer(port, "--json", "put", "-r", str(tree)).stdout)
    assert {f["status"] for f in again_up["files"]} == {"skipped"}


def test_interrupted_tree_download_resumes(daemon, tmp_path, root):
    port = daemon().port
    tree = root / "big-tree"
    (tree / "d").mkdir(parents=True)
    for i in range(4):
        write_random(tree / "d" / f"f{i}.bin", 60 * 1024 * 1024)
    down = tmp_path / "down"
    down.mkdir()
    client = start_client(port, "get", "-r", "big-tree", str(down))
    wait_for_size(str(down / "big-tree" / "d" / "f2.bin.part"), 1024 * 1024, client)
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    summary = json.loads(run_client(port, "--json", "get", "-r", "big-tree", str(down)).stdout)
    files = {os.path.basename(f["remote"]): f for f in summary["files"]}
    # f1 is flushed and named while f2 comes: the kill may find it whole but not yet named,
    # and then it is resumed from its end (nothing sent again).
    assert files["f0.bin"]["status"] == "skipped"
    assert files["f1.bin"]["status"] == "skipped" or files["f1.bin"]["resumed_from"] == 60 * 1024 * 1024
    assert files["f2.bin"]["status"] == "ok" and files["f2.bin"]["resumed_from"] > 0
    assert files["f3.bin"]["status"] == "ok" and files["f3.bin"]["resumed_from"] == 0
    for i in range(4):
        assert sha1(down / "big-tree" / "d" / f"f{i}.bin") == sha1(tree / "d" / f"f{i}.bin")


def test_several_files_at_once(daemon, tmp_path, root):
    port = daemon().port
    dest = tmp_path / "dest"
    dest.mkdir()
    result = run_client(port, "--json", "get", "hello.txt", "sub/data.bin", "missing.txt", "empty", str(dest))
    summary = json.loads(result.stdout)
    assert result.returncode == 5  # the first failure decides the exit code
    assert [f["status"] for f in summary["files"]] == ["ok", "ok", "error", "ok"]
    assert summary["files"][2]["error"]["code"] == "not-found"
    assert "missing.txt: no such file on the server" in result.stderr
    assert sha1(dest / "data.bin") == sha1(root / "sub" / "data.bin") and (dest / "empty").exists()
    not_a_dir = run_client(port, "get", "hello.txt", "empty", str(tmp_path / "nope"))
    assert not_a_dir.returncode == 2
    uploads = [write_random(tmp_path / f"u{i}", 5000) for i in range(3)]
    put = writer(port, "put", *map(str, uploads), "sub/")
    assert put.returncode == 0, put.stderr
    assert all(sha1(root / "sub" / u.name) == sha1(u) for u in uploads)
    assert writer(port, "put", *map(str, uploads), "no-such-dir/").returncode != 0


def test_per_user_roots_and_environment_variables(daemon, tmp_path, users_file):
    own = tmp_path / "bobs-root"
    own.mkdir()
    (own / "mine.txt").write_text("bob's")
    subprocess.run(
        [str(VENV_BIN / "eke-users"), "--users", str(users_file), "add", "bob", "--password-stdin",
         "--scrypt-n", "1024", "--root", str(own), "--rights", "read-write"],
        input="bob's password\n", text=True, check=True,
    )
    port = daemon().port
    env = {"EKE_HOST": "127.0.0.1", "EKE_PORT": str(port), "EKE_USER": "bob", "EKE_PASSWORD": "bob's password"}
    listing = subprocess.run(
        [str(VENV_BIN / "eke-client"), "ls"], capture_output=True, text=True, env=dict(os.environ, **env)
    )
    assert listing.returncode == 0 and listing.stdout.split("\t")[0] == "mine.txt"
    assert run_client(port, "get", "hello.txt", user="bob", password="bob's password", cwd=tmp_path).returncode == 5
    subprocess.run([str(VENV_BIN / "eke-users"), "--users", str(users_file), "modify", "bob", "--rights", "read"], check=True)
    local = write_random(tmp_path / "x.bin", 10)
    assert run_client(port, "put", str(local), user="bob", password="bob's password").returncode == 9
    listed = subprocess.run([str(VENV_BIN / "eke-users"), "--users", str(users_file), "list"], capture_output=True, text=True).stdout
    assert f"bob\tread\t{own}" in listed


def test_rerun_of_a_completed_put_is_not_an_error(daemon, tmp_path, root):
    port = daemon().port
    local = write_random(tmp_path / "done.bin", 5000)
    assert writer(port, "put", str(local)).returncode == 0
    again = json.loads(writer(port, "--json", "put", str(local)).stdout)
    assert again["status"] == "ok" and again["files"][0]["status"] == "skipped"
    write_random(local, 5000)  # now different: a real conflict
    assert writer(port, "put", str(local)).returncode == 10


def test_stale_partial_uploads_are_swept(daemon, root):
    stale = root / ".eke-part.0123456789abcdef"
    fresh = root / "sub" / ".eke-part.fedcba9876543210"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    server = daemon("--partial-max-age", "3600")
    deadline = time.monotonic() + 10
    while stale.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stale.exists() and fresh.exists()
    assert "removed 1 stale partial uploads" in server.log_text()
    # Partial names are invisible and untouchable through the protocol.
    assert ".eke-part" not in run_client(server.port, "ls", "-R").stdout
    assert run_client(server.port, "get", "sub/.eke-part.fedcba9876543210").returncode == 9


def test_data_path_moves_64_mib_both_ways_with_large_records(daemon, tmp_path, root):
    """The benchmark is not a test; this is the cheap check that the fast path stays correct."""
    from eketwist import wire

    assert wire.DATA_CHUNK >= 128 * 1024 and wire.DATA_CHUNK <= wire.MAX_RECORD_PLAINTEXT
    port = daemon().port
    source = write_random(root / "sixty-four.bin", 64 * 1024 * 1024 + 12345)  # not a whole number of records
    got = run_client(port, "--json", "get", "sixty-four.bin", str(tmp_path / "down.bin"))
    assert got.returncode == 0 and sha1(tmp_path / "down.bin") == sha1(source) == json.loads(got.stdout)["files"][0]["sha1"]
    again = run_client(port, "--json", "get", "sixty-four.bin", str(tmp_path / "again.bin"))  # served from the digest cache
    assert json.loads(again.stdout)["files"][0]["sha1"] == sha1(tmp_path / "again.bin") == sha1(source)
    up = writer(port, "--json", "put", str(tmp_path / "down.bin"), "uploaded.bin")
    assert up.returncode == 0 and sha1(root / "uploaded.bin") == sha1(source)


def test_write_behind_lets_go_of_each_chunk_once_written(tmp_path):
    """The writer drops a record as soon as it is written, not when the next one arrives:
    otherwise an upload keeps a third record-sized buffer alive (the server's heap grew by
    10-12 MiB instead of 8 during a 1 GiB put). It never blocks its owner: `submit` says when
    it is behind, and `when_caught_up` calls back once it is not."""
    import threading
    import weakref

    from eketwist.files import WriteBehind

    class Chunk(bytearray):  # bytes cannot be weakly referenced; a bytearray subclass can
        pass

    with open(tmp_path / "written", "wb", buffering=0) as handle:
        writer = WriteBehind(handle)
        first = Chunk(os.urandom(100_000))
        first_gone = weakref.ref(first)
        behind = [writer.submit(first)]
        del first
        behind += [writer.submit(Chunk(b"next")) for _ in range(WriteBehind.QUEUE_DEPTH)]
        assert behind[-1], "QUEUE_DEPTH + 1 chunks not yet written: the writer is behind"
        caught_up = threading.Event()
        seen = []

        def on_caught_up():  # called as soon as the first chunk is written
            seen.append(first_gone() is None)
            caught_up.set()

        writer.when_caught_up(on_caught_up)
        assert caught_up.wait(10)
        assert seen == [True], "the writer still held a chunk it had written"
        writer.close()
    assert (tmp_path / "written").stat().st_size == 100_000 + 4 * WriteBehind.QUEUE_DEPTH


def test_ls_a_shows_your_partial_uploads(daemon, root):
    from eketwist import storage

    part = storage.Root(str(root)).receive("big.iso", "writer", force=False, size=1)
    part.write(os.urandom(45_000))
    part.abort(keep_part=True)
    assert part.wait_until_closed(10)
    port = daemon().port
    shown = writer(port, "ls", "-a").stdout
    assert any(line.split("\t")[:3] == ["big.iso", "partial", "45000"] for line in shown.splitlines()), shown
    assert "big.iso" not in writer(port, "ls").stdout
    assert "big.iso" not in run_client(port, "ls", "-a").stdout  # another user's: never shown


@pytest.mark.parametrize("where", ["the top", "inside"])
def test_get_r_over_a_local_file_says_so_without_a_traceback(daemon, tmp_path, root, where):
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "sub" / "f.txt").write_text("x")
    down = tmp_path / "down"
    down.mkdir()
    if where == "the top":
        (down / "tree").write_text("a file where the directory should go")
        blocked = down / "tree"
    else:
        (down / "tree").mkdir()
        (down / "tree" / "sub").write_text("a file where the directory should go")
        blocked = down / "tree" / "sub"
    result = run_client(daemon().port, "get", "-r", "tree", str(down))
    assert result.returncode == 8, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(blocked) in result.stderr and "not a directory" in result.stderr
    assert blocked.is_file()  # left as it was


def test_a_tree_of_hundreds_of_files_round_trips_with_requests_in_flight(daemon, tmp_path, root):
    """Version 2 pipelines the tree: small files inline, larger ones after READY, all with
    their contents, modes and mtimes; the reports come in the plan's order."""
    port = daemon().port
    tree = tmp_path / "many"
    modes = (0o600, 0o640, 0o644, 0o755)
    for i in range(300):
        path = tree / f"d{i % 7}" / (f"sub{i % 3}" if i % 2 else "") / f"f{i:03}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(i * 37 if i % 100 else 1_500_000))  # 0 bytes to 1.5 MB
        os.chmod(path, modes[i % 4])
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i * 1.5))
    expected = snapshot(tree)
    up = writer(port, "--json", "put", "-r", str(tree))
    assert up.returncode == 0, up.stderr
    sent = json.loads(up.stdout)["files"]
    assert len(sent) == 300 and {f["status"] for f in sent} == {"ok"}
    assert [f["remote"] for f in sent] == sorted(f["remote"] for f in sent), "reported in the plan's order"
    assert snapshot(root / "many") == expected
    down = tmp_path / "down"
    down.mkdir()
    got = run_client(port, "--json", "get", "-r", "many", str(down))
    assert got.returncode == 0, got.stderr
    assert snapshot(down / "many") == expected
    assert not list(down.rglob("*.part")) and not list((root / "many").rglob(".eke-part.*"))
