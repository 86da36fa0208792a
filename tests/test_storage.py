"""The users file and the file service, as plain functions on real files."""

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from eketwist import errors, files, spake2plus, userdb

from .conftest import slow_part_files

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
    assert repr(user) == "User(name='alice', root=None, rights='read')"


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
    assert userdb.check_username(name)


@pytest.mark.parametrize(
    "requested, message",
    [("/etc/passwd", "absolute"), ("..", "'..'"), ("a/../../b", "'..'"), ("a\x00b", "NUL"), (".eke-part.x", "reserved"),
     ("out", "outside the root"), ("dirlink/passwd", "outside the root")],
)
def test_resolve_refuses(tmp_path, requested, message):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/etc/passwd", root / "out")
    os.symlink("/etc", root / "dirlink")
    with pytest.raises(errors.BadPath, match=message):
        files.resolve(str(root), requested)


def test_resolve_gives_the_root_for_empty_and_dot(tmp_path):
    assert files.resolve(str(tmp_path), "").path == str(tmp_path.resolve())
    assert files.resolve(str(tmp_path), "./").path == str(tmp_path.resolve())


def test_resolve_allows_links_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    os.symlink("d", root / "alias")
    assert files.resolve(str(root), "alias/f").path == str((root / "d" / "f").resolve())
    assert files.resolve(str(root), "./d//f").path == str((root / "d" / "f").resolve())


def test_open_for_sending_refuses_unreadable_files_as_an_unprivileged_user(tmp_path):
    # Root ignores file modes, so the check runs in a child that drops to nobody.
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    os.chmod(tmp_path, 0o755)
    drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
    # Import first: after dropping to nobody, root's Python installation may be unreadable.
    code = (
        "import os, sys\n"
        "from twisted.python.filepath import FilePath\n"
        "from eketwist import files, errors\n"
        f"{drop}\n"
        "try: files.open_for_sending(FilePath(sys.argv[1]), 'secret')\n"
        "except errors.PermissionDenied as e: print(e.message)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code, str(secret)], capture_output=True, text=True, env=env)
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
    part.resume(part.prefix_sha1())
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


def test_listing_is_sorted_hides_partials_and_recurses(tmp_path):
    from twisted.python.filepath import FilePath

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z").write_text("z")
    (tmp_path / "a").write_text("aa")
    (tmp_path / ".eke-part.0123").write_text("partial")
    os.symlink("a", tmp_path / "c")
    flat = list(files.list_entries(FilePath(str(tmp_path)), "."))
    assert [(e["name"], e["kind"]) for e in flat] == [("a", "file"), ("b", "dir"), ("c", "symlink")]
    deep = list(files.list_entries(FilePath(str(tmp_path)), ".", recursive=True))
    assert [e["name"] for e in deep] == ["a", "b", "b/z", "c"]
    assert deep[0]["size"] == 2
    assert list(files.list_entries(FilePath(str(tmp_path / "a")), "a"))[0]["name"] == "a"


def test_stale_partials_are_removed_unless_in_use(tmp_path):
    old = tmp_path / ".eke-part.old"
    busy = tmp_path / ".eke-part.busy"
    fresh = tmp_path / ".eke-part.fresh"
    for path in (old, busy, fresh):
        path.write_text("x")
    os.utime(old, (0, 0))
    os.utime(busy, (0, 0))
    holder = files.PartFile(str(tmp_path / "dest"), str(busy), lock=True)
    assert files.remove_stale_parts(str(tmp_path), max_age=3600, now=__import__("time").time()) == 1
    assert not old.exists() and busy.exists() and fresh.exists()
    holder.abort(keep_part=True)


def test_listing_skips_names_that_are_not_utf8(tmp_path):
    from twisted.python.filepath import FilePath

    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"bad-\xff-name"), os.O_CREAT | os.O_WRONLY))
    (tmp_path / "good").write_text("x")
    assert [e["name"] for e in files.list_entries(FilePath(str(tmp_path)), ".")] == ["good"]


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/passwd", "a//b", "./a", "a/", ""])
def test_client_refuses_unsafe_names_from_a_server(name):
    from eketwist.client_protocol import _checked_entry

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
