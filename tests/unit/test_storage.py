"""The users file and the file service, as plain functions on real files."""

import fcntl
import hashlib
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from eketwist import errors, files, spake2plus, storage, userdb, wire

from tests.support.fixtures import slow_part_files

FAST = {"n": 1024, "r": 8, "p": 1}


def test_users_file_round_trip_and_mode(tmp_path):
    users = userdb.Users.new()
    users.by_name["zoë"] = userdb.make_user("zoë", "pw", FAST)
    path = tmp_path / "users"
    userdb.save(path, users)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = userdb.load(path)
    assert loaded.secret == users.secret
    user = loaded.by_name["zoë"]
    assert (user.w0, user.L, user.salt) == (users.by_name["zoë"].w0, users.by_name["zoë"].L, users.by_name["zoë"].salt)
    w0, w1 = spake2plus.register(b"pw", user.salt, "zoë".encode(), **FAST)
    assert spake2plus.verifier_record(w0, w1) == (user.w0, user.L)
    assert "pw" not in path.read_text().replace("p\": 1", "")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary file left


def test_user_repr_hides_the_verifier():
    user = userdb.make_user("alice", "pw", FAST)
    assert repr(user) == "User(name='alice', root=None, rights=Rights('read'))"


@pytest.mark.parametrize(
    "text, where",
    [
        ("{broken\n", "line 1"),
        ('\n# comment\n{"user": "a b", "scrypt": {"n": 1024, "r": 8, "p": 1}}\n', "line 3"),
        ('{"user": "a", "scrypt": {"n": 3000, "r": 8, "p": 1}, "salt": "00", "w0": "01", "L": "04"}', "power of two"),
        ('{"eketwist-users": 2, "secret": "00"}', "unsupported format version"),
        ("[1]\n", "line 1"),
    ],
)
def test_users_file_errors_name_the_line(tmp_path, text, where):
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(userdb.UsersFileError, match=where):
        userdb.load(path)


def test_duplicate_and_bad_point_are_refused():
    user = userdb.make_user("a", "pw", FAST).to_json()
    import json

    line = json.dumps(user)
    with pytest.raises(userdb.UsersFileError, match="appears twice"):
        userdb.parse(line + "\n" + line)
    user["L"] = "04" + "00" * 64
    with pytest.raises(userdb.UsersFileError, match="L is not a valid point"):
        userdb.parse(json.dumps(user))


def test_fake_users_are_stable_and_shaped_like_real_ones():
    users = userdb.Users(os.urandom(32), [userdb.make_user("real", "pw", FAST)])
    fake, known = users.lookup("ghost")
    again, _ = users.lookup("ghost")
    real, real_known = users.lookup("real")
    assert known is False and real_known is True
    assert (fake.salt, fake.w0, fake.L) == (again.salt, again.w0, again.L)
    assert fake.scrypt == real.scrypt and len(fake.salt) == len(real.salt)
    spake2plus.decode_point(fake.L)
    other_server, _ = userdb.Users.new().lookup("ghost")
    assert other_server.salt != fake.salt


def test_store_keeps_the_last_good_copy(tmp_path):
    from twisted.logger import Logger

    events = []
    log = Logger(observer=events.append)
    users = userdb.Users.new()
    users.by_name["a"] = userdb.make_user("a", "pw", FAST)
    path = tmp_path / "users"
    userdb.save(path, users)
    store = userdb.UsersStore(str(path), log)
    assert "a" in store.current().by_name
    path.write_text("garbage\n")
    assert "a" in store.current().by_name
    assert any("not reloaded" in e["log_format"] for e in events)
    users.by_name["b"] = userdb.make_user("b", "pw", FAST)
    userdb.save(path, users)
    assert "b" in store.current().by_name


@pytest.mark.parametrize("name", ["", "a b", "tab\tname", "x" * 65, "new\nline", "\x00"])
def test_bad_usernames(name):
    assert wire.check_username(name)


@pytest.mark.parametrize(
    "requested, message",
    [("/etc/passwd", "absolute"), ("..", "'..'"), ("a/../../b", "'..'"), ("a\x00b", "NUL"), (".eke-part.x", "reserved"),
     ("out", "outside the root"), ("dirlink/passwd", "outside the root"), ("up/root/f", "outside the root"),
     ("x" * 256, "longer than 255 bytes"), ("sub/\udcff", "not UTF-8")],
)
@pytest.mark.parametrize("walk", ["openat2", "by hand"])
def test_paths_refused(tmp_path, requested, message, walk, monkeypatch):
    if walk == "by hand":
        monkeypatch.setattr(storage, "_SYS_OPENAT2", None)
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    os.symlink("/etc/passwd", root / "out")
    os.symlink("/etc", root / "dirlink")
    os.symlink("..", root / "up")
    with pytest.raises(errors.BadPath, match=message):
        storage.Root(str(root)).open_for_sending(requested)


def test_links_inside_the_root_are_followed_with_openat2_and_refused_by_hand(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    os.symlink("d", root / "alias")
    served = storage.Root(str(root))
    handle, st = served.open_for_sending("alias/f")
    handle.close()
    assert served.stat("alias")["kind"] == "symlink"  # a stat names the link itself
    monkeypatch.setattr(storage, "_SYS_OPENAT2", None)  # a kernel without openat2
    with pytest.raises(errors.BadPath):
        served.open_for_sending("alias/f")
    handle, _ = served.open_for_sending("./d//f")
    handle.close()


def test_the_root_is_dot_a_directory_like_another(tmp_path):
    served = storage.Root(str(tmp_path))
    for root in ("", ".", "./", "/."[1:] + "/."):
        assert served.stat(root)["name"] == "." and served.stat(root)["kind"] == "dir"
        with pytest.raises(errors.Exists):
            served.make_directory(root)
        with pytest.raises(errors.NotAFile):
            served.receive(root, "u", True, 0)
        with pytest.raises(errors.NotAFile):
            served.open_for_sending(root)


def test_protected_files_are_refused_whatever_leads_to_them(tmp_path):
    secret = tmp_path / "root" / "users"
    secret.parent.mkdir()
    secret.write_text("secrets")
    os.link(secret, tmp_path / "root" / "hardlink")
    st = secret.stat()
    served = storage.Root(str(tmp_path / "root"), protected=lambda: {(st.st_dev, st.st_ino)})
    for name in ("users", "hardlink"):
        with pytest.raises(errors.BadPath):
            served.open_for_sending(name)
        with pytest.raises(errors.BadPath):
            served.receive(name, "writer", force=True, size=1)
        with pytest.raises(errors.BadPath):
            served.stat(name)
    assert list(served.listing("")) == []  # not even its size and time


def test_mkdir_of_an_existing_directory_changes_nothing(tmp_path):
    (tmp_path / "other-users-root").mkdir(mode=0o755)
    served = storage.Root(str(tmp_path))
    with pytest.raises(errors.Exists, match="exists already"):
        served.make_directory("other-users-root", mode=0, mtime=0)
    st = (tmp_path / "other-users-root").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime > 0
    # Its own directories, a tree upload gives their mode and time once their contents are in.
    served.make_directory("new", mode=0o700)
    served.make_directory("new", mode=0o750, mtime=1000)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750
    assert (tmp_path / "new").stat().st_mtime == 1000
    with pytest.raises(errors.Exists):
        storage.Root(str(tmp_path)).make_directory("new", mode=0o777)  # another connection


def test_stale_partials_sweep_never_opens_a_fifo_or_follows_a_link(tmp_path):
    import threading
    import time

    (tmp_path / "deep" / "er").mkdir(parents=True)
    fifo = tmp_path / "deep" / ".eke-part.fifo"
    os.mkfifo(fifo)
    os.utime(fifo, (0, 0))
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / ".eke-part.victim").write_text("x")
    os.utime(outside / ".eke-part.victim", (0, 0))
    os.symlink(outside, tmp_path / "deep" / "er" / "link")
    stale = tmp_path / "deep" / "er" / ".eke-part.old"
    stale.write_text("x")
    os.utime(stale, (0, 0))
    result = []
    sweeper = threading.Thread(target=lambda: result.append(storage.remove_stale_parts(str(tmp_path), 3600, time.time()).names))
    sweeper.start()
    sweeper.join(5)
    assert not sweeper.is_alive(), "the sweep hangs on a FIFO"
    assert result == [1] and not stale.exists() and fifo.exists()
    assert (outside / ".eke-part.victim").exists()


def test_a_deep_tree_is_listed_and_swept_without_recursion_limits(tmp_path):
    """A walk that recursed would need a frame per level. Python's limit is lowered to 100
    frames above this test's own for the test: 300 levels are past it, as 1,500 levels are past
    the default 1,000, at a twentieth of the cost (each level is opened down from the top, so
    the walks are quadratic in the depth: 1,500 levels took 7 to 23 s)."""
    import inspect
    import time

    depth = 300
    path = tmp_path
    for _ in range(depth):
        path = path / "d"
        os.mkdir(path)
    (path / ".eke-part.old").write_text("x")
    os.utime(path / ".eke-part.old", (0, 0))
    default_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 100)
    try:
        deep = list(storage.Root(str(tmp_path)).listing("", recursive=True))
        assert len(deep) == depth
        assert storage.remove_stale_parts(str(tmp_path), 3600, time.time()).names == 1
    finally:
        sys.setrecursionlimit(default_limit)
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)  # pytest's rmtree recurses


def test_open_for_sending_refuses_unreadable_files_as_an_unprivileged_user(tmp_path):
    # Root ignores file modes, so the check runs in a child that drops to nobody; the root
    # must be one nobody can enter (pytest's own temporary directories are 0700).
    import tempfile

    served = tempfile.mkdtemp(prefix="eke-unprivileged-")
    os.chmod(served, 0o755)
    secret = pathlib.Path(served) / "secret"
    secret.write_text("x")
    secret.chmod(0)
    drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
    # Import first: after dropping to nobody, root's Python installation may be unreadable.
    code = (
        "import os, sys\n"
        "from eketwist import storage, errors\n"
        f"{drop}\n"
        "try: storage.Root(os.path.dirname(sys.argv[1])).open_for_sending('secret')\n"
        "except errors.PermissionDenied as e: print(e.message)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        result = subprocess.run([sys.executable, "-c", code, str(secret)], capture_output=True, text=True, env=env)
    finally:
        subprocess.run(["rm", "-rf", served], check=True)
    assert result.stdout.strip() == "secret: permission denied on the server", result.stderr


def _part(destination, **options):
    return files.PartFile(str(destination), str(destination) + ".part", **options)


def test_part_file_renames_only_when_verified(tmp_path):
    destination = tmp_path / "f"
    part = _part(destination)
    assert stat.S_IMODE(os.stat(part.part).st_mode) == 0o600
    part.write(b"abc")
    with pytest.raises(errors.IntegrityError, match="SHA-1 does not match"):
        part.finish(3, hashlib.sha1(b"abd").digest())
    assert not destination.exists() and not os.path.exists(part.part)

    part = _part(destination)
    part.write(b"abc")
    with pytest.raises(errors.IntegrityError, match="size"):
        part.finish(4, hashlib.sha1(b"abc").digest())
    assert not destination.exists()

    part = _part(destination)
    part.write(b"abc")
    assert part.finish(3, hashlib.sha1(b"abc").digest(), mtime=1_000_000, mode=0o4751) == hashlib.sha1(b"abc").hexdigest()
    assert destination.read_bytes() == b"abc" and destination.stat().st_mtime == 1_000_000
    assert stat.S_IMODE(destination.stat().st_mode) == 0o751  # never setuid
    assert not os.path.exists(part.part)


def test_part_file_resumes_and_restarts(tmp_path):
    destination = tmp_path / "f"
    part = _part(destination)
    part.write(b"hello ")
    part.abort(keep_part=True)  # does not wait for the disk: the writer finishes, then closes
    assert part.wait_until_closed(10)
    part = _part(destination)
    assert part.size == 6
    part.resume(part.prefix_hasher()())
    part.write(b"world")
    assert part.finish(11, hashlib.sha1(b"hello world").digest()) == hashlib.sha1(b"hello world").hexdigest()
    assert destination.read_bytes() == b"hello world"

    part = _part(tmp_path / "g")
    part.write(b"stale")
    part.restart()
    part.write(b"new")
    part.finish(3, hashlib.sha1(b"new").digest())
    assert (tmp_path / "g").read_bytes() == b"new"


def test_part_file_lock_refuses_a_second_writer(tmp_path):
    first = _part(tmp_path / "f", lock=True)
    with pytest.raises(errors.Busy):
        _part(tmp_path / "f", lock=True)
    first.abort()
    _part(tmp_path / "f", lock=True).abort()


def _give_up(part, ending, content):
    """The first transfer ends: renamed into place (replacing, or not) or removed (its digest
    did not match: the removal then waits for nothing, as the writer is drained to verify)."""
    if ending == "remove":
        with pytest.raises(errors.IntegrityError):
            part.verify(len(content), hashlib.sha1(b"not " + content).digest())
    else:
        part.finish(len(content), hashlib.sha1(content).digest(), replace=ending == "replace")


@pytest.mark.parametrize("ending", ["replace", "link", "remove"])
def test_a_part_file_is_renamed_or_removed_before_its_lock_goes(tmp_path, monkeypatch, ending):
    """The lock on a part file is its holder's until its name is gone: a transfer that opens
    the name while the first renames it into place (or removes it) is told to wait, rather
    than taking a file whose name is about to go (test_racing_uploads_never_mix saw that: the
    second upload then failed to rename it, "No such file or directory")."""
    served = storage.Root(str(tmp_path))
    first = served.receive("race.bin", "writer", force=True, size=5)
    first.write(b"first")
    system_call = {"replace": "replace", "link": "link", "remove": "unlink"}[ending]
    real = getattr(os, system_call)
    meanwhile = []

    def open_again_meanwhile(*args, **kwargs):
        monkeypatch.setattr(os, system_call, real)
        try:
            meanwhile.append(served.receive("race.bin", "writer", force=True, size=7))
        except errors.Busy:
            meanwhile.append("busy")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, system_call, open_again_meanwhile)
    _give_up(first, ending, b"first")
    monkeypatch.undo()
    assert meanwhile == ["busy"]
    assert (tmp_path / "race.bin").exists() == (ending != "remove")


@pytest.mark.parametrize("ending", ["replace", "link", "remove"])
def test_a_part_file_given_up_between_its_opening_and_locking_is_opened_again(tmp_path, monkeypatch, ending):
    """A second transfer opens the part file, the first renames it into place (or removes it)
    and lets its lock go, then the second locks what it opened: no longer the part file, but
    the file just stored (which it would empty and write over in place) or a removed one
    (which it could never rename). It must notice, and start a part file of its own."""
    served = storage.Root(str(tmp_path))
    first = served.receive("race.bin", "writer", force=True, size=5)
    first.write(b"first")
    real_flock = fcntl.flock

    def first_gives_up_then_flock(fd, operation):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        _give_up(first, ending, b"first")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", first_gives_up_then_flock)
    second = served.receive("race.bin", "writer", force=True, size=7)
    monkeypatch.undo()
    assert second.size == 0, "a part file of its own, empty"
    second.restart()  # what an upload not resumed does
    if ending != "remove":
        assert (tmp_path / "race.bin").read_bytes() == b"first", "the stored file is left alone"
    second.write(b"second!")
    second.finish(7, hashlib.sha1(b"second!").digest())
    assert (tmp_path / "race.bin").read_bytes() == b"second!"
    assert [name for name in os.listdir(tmp_path) if name.startswith(files.SERVER_PART_PREFIX)] == []


def test_no_clobber_finish_refuses_an_existing_destination(tmp_path):
    (tmp_path / "f").write_bytes(b"theirs")
    part = _part(tmp_path / "f")
    part.write(b"mine")
    with pytest.raises(errors.Exists):
        part.finish(4, hashlib.sha1(b"mine").digest(), replace=False)
    assert (tmp_path / "f").read_bytes() == b"theirs"


def test_part_file_reports_an_unwritable_directory(tmp_path):
    with pytest.raises(errors.LocalIOError, match="No such file"):
        _part(tmp_path / "no" / "such" / "dir" / "f")


def test_listing_hides_partials_and_recurses_without_following_links(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z").write_text("z")
    (tmp_path / "a").write_text("aa")
    (tmp_path / ".eke-part.0123").write_text("partial")
    os.symlink("b", tmp_path / "c")
    served = storage.Root(str(tmp_path))
    flat = sorted((e["name"], e["kind"]) for e in served.listing(""))
    assert flat == [("a", "file"), ("b", "dir"), ("c", "symlink")]
    deep = list(served.listing(".", recursive=True))
    names = [e["name"] for e in deep]
    assert sorted(names) == ["a", "b", "b/z", "c"]
    assert names.index("b") < names.index("b/z")
    assert next(e for e in deep if e["name"] == "a")["size"] == 2
    assert [e["name"] for e in served.listing("a")] == ["a"]


def test_a_listing_holds_no_more_than_a_bounded_list_of_subdirectories(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MAX_PENDING_BYTES", 10 * (storage._PENDING_OVERHEAD + 60))
    for i in range(20):
        (tmp_path / f"d{i:02d}").mkdir()
    assert len(list(storage.Root(str(tmp_path)).listing(""))) == 20
    with pytest.raises(errors.TooLarge, match="list its subdirectories one by one"):
        list(storage.Root(str(tmp_path)).listing("", recursive=True))


def test_stale_partials_are_removed_unless_in_use(tmp_path):
    import time

    old = tmp_path / ".eke-part.old"
    busy = tmp_path / ".eke-part.busy"
    fresh = tmp_path / ".eke-part.fresh"
    for path in (old, busy, fresh):
        path.write_text("x")
    os.utime(old, (0, 0))
    os.utime(busy, (0, 0))
    holder = files.PartFile(str(tmp_path / "dest"), str(busy), lock=True)
    assert storage.remove_stale_parts(str(tmp_path), max_age=3600, now=time.time()).names == 1
    assert not old.exists() and busy.exists() and fresh.exists()
    holder.abort(keep_part=True)


def test_the_sweep_removes_only_the_stale_file_it_locked(tmp_path, monkeypatch):
    """The sweep opens a stale part file; before it locks it, an upload resumes that file and
    stores it, and the next upload starts a part file under the same name. The sweep's lock
    then succeeds on the stored file: the name it would remove is the new upload's."""
    import time

    served = storage.Root(str(tmp_path))
    stale = served.receive("up.bin", "writer", force=True, size=10)
    stale.write(b"hello")
    stale.abort(keep_part=True)  # a connection lost: kept for a resume
    assert stale.wait_until_closed(10)
    os.utime(tmp_path / files.server_part_name("up.bin", "writer"), (0, 0))
    real_flock = fcntl.flock
    later = []

    def uploads_meanwhile(fd, operation):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        resumed = served.receive("up.bin", "writer", force=True, size=10)
        resumed.resume(resumed.prefix_hasher()())
        resumed.write(b"world")
        resumed.finish(10, hashlib.sha1(b"helloworld").digest())
        later.append(served.receive("up.bin", "writer", force=True, size=3))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", uploads_meanwhile)
    assert storage.remove_stale_parts(str(tmp_path), max_age=3600, now=time.time()).names == 0
    monkeypatch.undo()
    later[0].write(b"new")
    later[0].finish(3, hashlib.sha1(b"new").digest())
    assert (tmp_path / "up.bin").read_bytes() == b"new"


def test_listing_skips_names_that_are_not_utf8(tmp_path):
    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"bad-\xff-name"), os.O_CREAT | os.O_WRONLY))
    (tmp_path / "good").write_text("x")
    assert [e["name"] for e in storage.Root(str(tmp_path)).listing("")] == ["good"]


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/passwd", "a//b", "./a", "a/", ""])
def test_client_refuses_unsafe_names_from_a_server(name):
    from eketwist.requesting import checked_entry as _checked_entry

    with pytest.raises(errors.ProtocolError):
        _checked_entry({"name": name, "kind": "file", "size": 1, "mtime": 0, "mode": 0o644})
    assert _checked_entry({"name": "a/b.txt", "kind": "file", "size": 1, "mtime": 0, "mode": 0o644})["name"] == "a/b.txt"


def test_aborting_a_part_file_does_not_wait_for_a_slow_disk(tmp_path, monkeypatch):
    """A connection lost during an upload aborts its part file from the reactor: that must not
    wait for the disk. What was received is still written for a resume (keep_part), or
    dropped; the writer closes the file when done."""
    import time

    slow_part_files(monkeypatch, 0.5)
    for keep_part in (True, False):
        destination = tmp_path / f"kept-{keep_part}"
        part = _part(destination, lock=True)
        assert not part.write(b"a" * 100_000)
        assert part.write(b"b" * 100_000), "two records queued on a slow disk: behind"
        started = time.monotonic()
        part.abort(keep_part=keep_part)
        assert time.monotonic() - started < 0.2, "abort waited for the disk"
        assert part.wait_until_closed(10)
        partial = tmp_path / f"kept-{keep_part}.part"
        if keep_part:
            assert partial.read_bytes() == b"a" * 100_000 + b"b" * 100_000
            _part(destination, lock=True).abort()  # the lock went with the descriptor
        else:
            assert not partial.exists()
        assert not destination.exists()


def test_partial_uploads_are_listed_to_their_owner_only(tmp_path):
    served = storage.Root(str(tmp_path))
    part = served.receive("up.bin", "writer", force=False, size=5000)
    part.write(b"x" * 5000)
    part.abort(keep_part=True)
    assert part.wait_until_closed(10)
    (tmp_path / "other").write_text("y")
    mine = {e["name"]: e for e in served.listing("", partials_of="writer")}
    assert mine["up.bin"]["kind"] == "partial" and mine["up.bin"]["size"] == 5000
    assert [e["name"] for e in served.listing("", partials_of="alice")] == ["other"]
    assert [e["name"] for e in served.listing("")] == ["other"]
    # Once stored, the file carries no trace of the label.
    part = served.receive("up.bin", "writer", force=False, size=5000)
    part.resume(hashlib.sha1(b"x" * 5000))
    part.write(b"z")
    part.finish(5001, hashlib.sha1(b"x" * 5000 + b"z").digest())
    assert os.listxattr(tmp_path / "up.bin") == []
    assert sorted(e["kind"] for e in served.listing("", partials_of="writer")) == ["file", "file"]


@pytest.mark.parametrize("planted", ["a FIFO", "a hard link to a file outside", "a symlink"])
def test_something_planted_under_a_part_files_name_is_refused(tmp_path, planted):
    """The part file's name is predictable: a local account may put anything there first.
    The upload is refused, without hanging, and what the name leads to is left untouched."""
    root = tmp_path / "root"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    victim.chmod(0o600)
    part = root / files.server_part_name("up.bin", "writer")
    if planted == "a FIFO":
        os.mkfifo(part)
    elif planted == "a symlink":
        os.symlink(victim, part)
    else:
        os.link(victim, part)
    with pytest.raises(errors.BadPath, match="not the server's own file|path refused"):
        storage.Root(str(root)).receive("up.bin", "writer", force=False, size=1)
    assert victim.read_text() == "not yours" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_the_sweep_holds_few_descriptors_however_wide_the_tree(tmp_path):
    """A read-write user can make 3,000 directories: the sweep must not hold one descriptor
    each (the daemon's other connections would run out), nor skip what it could not open."""
    for i in range(3000):
        (tmp_path / f"d{i}").mkdir()
        stale = tmp_path / f"d{i}" / ".eke-part.old"
        stale.write_text("x")
        os.utime(stale, (0, 0))
    code = (
        "import resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from eketwist import storage\n"
        "print(storage.remove_stale_parts(sys.argv[1], 3600, time.time()).names)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "3000", result.stderr


def test_a_received_file_never_gets_more_than_the_umask_allows(tmp_path):
    previous = os.umask(0o027)
    try:
        part = files.PartFile(str(tmp_path / "f"), str(tmp_path / "f.part"))
        part.write(b"x")
        part.finish(1, hashlib.sha1(b"x").digest(), mode=0o7777)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o750


def _verified(tmp_path, name, data, **options):
    part = _part(tmp_path / name, **options)
    part.write(data)
    part.verify(len(data), hashlib.sha1(data).digest())
    return part


def _commit_now(function, *args):
    """GroupCommit's worker, run in this thread (the batch is whatever waits)."""
    from twisted.internet import defer

    return defer.maybeDeferred(function, *args)


@pytest.mark.parametrize("count", [3, files.GroupCommit.SYNCFS_FROM + 2])  # file by file; syncfs
def test_a_group_commit_names_each_verified_file_and_fails_only_its_own(tmp_path, count):
    from twisted.internet import defer

    held = []  # the worker's batches, run when the test says
    committer = files.GroupCommit(lambda function, *args: held.append((function, args)) or defer.Deferred())
    (tmp_path / "taken").write_bytes(b"someone else's")
    parts = [_verified(tmp_path, f"f{i}", b"%d" % i * 100) for i in range(count)]
    parts.append(_verified(tmp_path, "taken", b"ours"))
    outcomes = [committer.commit(part, mtime=1_000_000 + i, mode=0o640, replace=False) for i, part in enumerate(parts)]
    assert len(held) == 1  # the first file started a batch; the others wait for the next
    assert not (tmp_path / "f0").exists() and committer.busy
    function, args = held.pop()
    done = _commit_now(function, *args)
    committer._batch_done(done.result, args[0])
    assert len(held) == 1, "the files that waited form one batch"
    function, args = held.pop()
    assert len(args[0]) == count  # all but the first
    committer._batch_done(_commit_now(function, *args).result, args[0])
    results = []
    for outcome in outcomes:
        outcome.addBoth(results.append)
    assert results[:count] == [None] * count
    assert isinstance(results[count].value, errors.Exists)
    for i in range(count):
        st = (tmp_path / f"f{i}").stat()
        assert (tmp_path / f"f{i}").read_bytes() == b"%d" % i * 100
        assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o640 & ~files._umask(), 1_000_000 + i)
        assert parts[i].stored.st_ino == st.st_ino
        assert not (tmp_path / f"f{i}.part").exists()
    assert (tmp_path / "taken").read_bytes() == b"someone else's"
    assert (tmp_path / "taken.part").read_bytes() == b"ours", "kept: the data is not lost"
    assert not committer.busy


def test_a_part_file_writes_its_first_bytes_in_place_then_behind(tmp_path):
    part = _part(tmp_path / "f", write_in_place=10)
    part.write(b"12345")
    part.write(b"67890")
    assert part._writer is None and (tmp_path / "f.part").read_bytes() == b"1234567890"
    part.write(b"x")  # past the limit: a worker writes the rest
    assert part._writer is not None
    data = b"1234567890x"
    assert part.finish(len(data), hashlib.sha1(data).digest()) == hashlib.sha1(data).hexdigest()
    assert (tmp_path / "f").read_bytes() == data


def test_a_large_part_file_is_written_to_disk_as_it_comes(tmp_path, monkeypatch):
    """The write-behind worker has the kernel write each range out (sync_file_range) as the
    file grows, so that the fsync before the rename has little left: every range but the
    last is on its way to the disk before finish()."""
    calls = []
    real = files._RangeFlusher._sync_file_range()
    if real is None:
        pytest.skip("no sync_file_range on this system")

    def recording(fd, offset, length, flags):
        calls.append((offset, length, flags))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(files._RangeFlusher, "FLUSH_EVERY", 64 * 1024)
    monkeypatch.setattr(files._RangeFlusher, "_sync_file_range", staticmethod(lambda: recording))
    part = _part(tmp_path / "f")
    chunks = [os.urandom(40 * 1024) for _ in range(10)]
    for chunk in chunks:
        part.write(chunk)
    data = b"".join(chunks)
    assert part.finish(len(data), hashlib.sha1(data).digest()) == hashlib.sha1(data).hexdigest()
    assert (tmp_path / "f").read_bytes() == data
    started = [(offset, length) for offset, length, flags in calls if flags == 2]
    assert started == [(offset, 80 * 1024) for offset in range(0, len(data), 80 * 1024)]  # 2 chunks each
    waited = [(offset, length) for offset, length, flags in calls if flags == 7]
    assert waited == started[:-1], "each range waited for once the next one is started"


def test_a_failed_writeback_of_a_range_fails_the_file(tmp_path, monkeypatch):
    """Waiting for a range's writeback consumes its error: the final fsync would then succeed
    on bytes that never reached the disk. The error is the file's."""
    import ctypes
    import errno

    def failing(fd, offset, length, flags):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(files._RangeFlusher, "FLUSH_EVERY", 64 * 1024)
    monkeypatch.setattr(files._RangeFlusher, "_sync_file_range", staticmethod(lambda: failing))
    part = _part(tmp_path / "f")
    data = os.urandom(200 * 1024)
    with pytest.raises(errors.LocalIOError, match="Input/output error"):  # at the next write or at the end
        for chunk in (data[:100 * 1024], data[100 * 1024:]):
            part.write(chunk)
        part.finish(len(data), hashlib.sha1(data).digest())
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("written, rights, kept", [
    ("read", {"list", "read"}, "read"),
    ("read-write", set(wire.RIGHTS), "read-write"),
    (["read", "list"], {"list", "read"}, "read"),
    (["chmod", "list", "write"], {"chmod", "list", "write"}, ["list", "write", "chmod"]),
    ([], set(), []),
])
def test_rights_in_the_users_file_are_bundles_or_lists(written, rights, kept):
    import json

    record = dict(userdb.make_user("a", "pw", FAST).to_json(), rights=written)
    user = userdb.parse(json.dumps(record)).by_name["a"]
    assert user.rights == rights and isinstance(user.rights, userdb.Rights)
    assert user.to_json()["rights"] == kept


def test_a_users_file_without_rights_gives_read_and_old_files_keep_their_meaning():
    import json

    record = userdb.make_user("a", "pw", FAST).to_json()
    del record["rights"]
    assert userdb.parse(json.dumps(record)).by_name["a"].rights == {"list", "read"}


@pytest.mark.parametrize("written, problem", [
    ("write", "rights must be read or read-write, or a list of rights"), (["list", "delete-all"], "unknown right 'delete-all'"),
    ([1], "unknown right '1'"), ({"list": True}, "rights must be read or read-write"), (5, "rights must be"),
])
def test_rights_that_are_not_rights_are_refused_naming_the_line(written, problem):
    import json

    record = dict(userdb.make_user("a", "pw", FAST).to_json(), rights=written)
    with pytest.raises(userdb.UsersFileError, match=f"line 1: .*{problem}"):
        userdb.parse(json.dumps(record))
