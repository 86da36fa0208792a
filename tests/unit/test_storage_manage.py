"""Managing files through a storage.Root (docs/protocol.md section 7.10): REMOVE, RMDIR, RENAME,
CHMOD, HASH and SPACE on real files, every refusal, the rights of section 7.7, and the races a
recursive removal must survive without leaving its directory."""

import errno
import fcntl
import hashlib
import os
import subprocess
import socket
import stat

import pytest

from eketwist import errors, files, storage, wire


@pytest.fixture
def tree(tmp_path):
    """(root, outside): a root with a few kinds of names, and a directory beside it that no
    operation may touch."""
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "a.txt").write_text("a")
    (root / "d" / "e" / "b.txt").write_text("b")
    (root / "empty").mkdir()
    (root / "f.txt").write_text("hello\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    os.symlink(outside, root / "out")
    os.symlink(outside / "precious", root / "out-file")
    return root, outside


def served(root, **options):
    return storage.Root(str(root), **options)


def assert_outside_untouched(outside):
    assert (outside / "precious").read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


# -- refusals common to every operation: the root, reserved names, '..', links out, own files

OPERATIONS = {
    "remove": lambda root, path: root.remove(path),
    "remove -r": lambda root, path: root.remove(path, recursive=True),
    "rmdir": lambda root, path: root.remove_directory(path),
    "rename from": lambda root, path: root.rename(path, "new-name"),
    "rename to": lambda root, path: root.rename("f.txt", path, force=True),
    "chmod": lambda root, path: root.change_mode(path, 0o644),
}


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("path, message", [
    ("", "root"), (".", "root"), ("./", "root"), ("..", "'..'"), ("d/../f.txt", "'..'"),
    (".eke-part.0123", "reserved"), ("d/.eke-part.0123", "reserved"), ("out/precious", "outside the root"),
    ("/etc/passwd", "absolute"),
])
def test_every_operation_refuses_paths_outside_its_reach(tree, operation, path, message):
    root, outside = tree
    (root / "d" / ".eke-part.0123").write_text("partial")
    with pytest.raises(errors.BadPath, match=message):
        OPERATIONS[operation](served(root), path)
    assert (root / "f.txt").read_text() == "hello\n" and (root / "d" / ".eke-part.0123").exists()
    assert_outside_untouched(outside)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_refuses_the_servers_own_files(tree, operation):
    root, outside = tree
    users = root / "users"
    users.write_text("secrets")
    users.chmod(0o600)
    os.link(users, root / "d" / "hardlink")
    st = users.stat()
    protected = served(root, protected=lambda: {(st.st_dev, st.st_ino)})
    for name in ("users", "d/hardlink"):
        with pytest.raises(errors.BadPath):
            OPERATIONS[operation](protected, name)
    assert users.read_text() == "secrets" and (root / "d" / "hardlink").exists()
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


def test_a_recursive_remove_leaves_the_servers_own_files_and_their_directories(tree):
    root, _ = tree
    users = root / "d" / "e" / "users"
    users.write_text("secrets")
    st = users.stat()
    with pytest.raises(errors.BadPath, match="d/e/users"):
        served(root, protected=lambda: {(st.st_dev, st.st_ino)}).remove("d", recursive=True)
    assert users.read_text() == "secrets"
    assert sorted(os.listdir(root / "d")) == ["e"] and os.listdir(root / "d" / "e") == ["users"]


# -- REMOVE


def test_remove_unlinks_a_file_a_symlink_a_fifo_and_a_socket(tree):
    root, outside = tree
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    os.symlink("d", root / "dirlink")
    for name in ("f.txt", "out", "out-file", "fifo", "sock", "dirlink", "d/e/b.txt"):
        assert served(root).remove(name).names == 1
        assert not os.path.lexists(root / name)
    assert (root / "d").is_dir() and (root / "d" / "a.txt").exists()  # the link only
    assert_outside_untouched(outside)


def test_remove_of_a_directory_needs_recursive(tree):
    root, _ = tree
    with pytest.raises(errors.NotAFile, match="d/: is a directory"):
        served(root).remove("d/")
    assert (root / "d" / "a.txt").exists()
    with pytest.raises(errors.NotFound):
        served(root).remove("nothing")
    with pytest.raises(errors.NotFound):
        served(root).remove("f.txt/x")


def test_remove_recursive_removes_the_tree_and_counts_its_names(tree):
    root, outside = tree
    os.symlink(outside, root / "d" / "e" / "link-out")  # a link inside: removed as a link
    os.symlink("../..", root / "d" / "e" / "loop")
    assert served(root).remove("d", recursive=True).names == 6  # d, e, a.txt, b.txt and the two links
    assert not os.path.lexists(root / "d")
    assert served(root).remove("empty", recursive=True).names == 1
    assert served(root).remove("f.txt", recursive=True).names == 1  # a file: as without recursive
    assert sorted(os.listdir(root)) == ["out", "out-file"]
    assert_outside_untouched(outside)


def test_remove_recursive_of_a_deep_tree_holds_few_descriptors(tmp_path, monkeypatch):
    monkeypatch.setattr(storage._TreeRemoval, "HELD", 3)
    monkeypatch.setattr(storage._TreeRemoval, "BATCH", 2)
    root = tmp_path / "root"
    deep = root / "top"
    for level in range(12):
        deep = deep / f"l{level}"
        for sibling in range(3):
            (deep.parent / f"s{sibling}").mkdir(parents=True, exist_ok=True)
            (deep.parent / f"s{sibling}" / "f").write_text("x")
    deep.mkdir(parents=True)
    (deep / "last").write_text("x")
    names = sum(len(dirs) + len(names) for _, dirs, names in os.walk(root / "top")) + 1
    before = len(os.listdir("/proc/self/fd"))
    assert served(root).remove("top", recursive=True).names == names
    assert os.listdir(root) == [] and len(os.listdir("/proc/self/fd")) == before


def test_the_walk_never_follows_a_directory_swapped_for_a_symlink(tree, monkeypatch):
    """The worst moment: the walk has read `d/e` as a directory and is about to open it; it
    becomes a symlink to a directory outside the root. Only the link goes."""
    root, outside = tree
    (outside / "sub").mkdir()
    (outside / "sub" / "victim").write_text("keep me too")
    real_open = os.open
    swapped = []

    def open_then_swap(path, flags, *args, **kwargs):
        if path == "e" and flags & os.O_DIRECTORY and not swapped:
            os.rename(root / "d" / "e", root / "moved-e")
            os.symlink(outside / "sub", root / "d" / "e")
            swapped.append(True)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_then_swap)
    removed = served(root).remove("d", recursive=True)
    assert swapped and removed == (3, 1, 1)  # a.txt, the link e, d
    assert not os.path.lexists(root / "d")
    assert (outside / "sub" / "victim").read_text() == "keep me too"
    assert sorted(p.name for p in outside.iterdir()) == ["precious", "sub"]
    assert (root / "moved-e" / "b.txt").exists()  # what was moved away is out of P: left alone


def test_the_walk_never_follows_a_swap_made_while_it_reads_a_directory(tree, monkeypatch):
    """Swapped between the scan that named `d/e` a directory and its opening, through
    os.scandir: at the end of the scan of `d`."""
    root, outside = tree
    (outside / "victim-dir").mkdir()
    (outside / "victim-dir" / "x").write_text("x")
    real_scandir = os.scandir
    swapped = []

    class Scan:
        def __init__(self, fd):
            self.scan = real_scandir(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.scan.close()

        def __iter__(self):
            for child in self.scan:
                yield child
            if not swapped and (root / "d" / "e").is_dir() and not (root / "d" / "e").is_symlink():
                os.rename(root / "d" / "e", root / "elsewhere")
                os.symlink(outside / "victim-dir", root / "d" / "e")
                swapped.append(True)

    monkeypatch.setattr(os, "scandir", Scan)
    served(root).remove("d", recursive=True)
    assert swapped and not os.path.lexists(root / "d")
    assert (outside / "victim-dir" / "x").read_text() == "x"
    assert sorted(p.name for p in outside.iterdir()) == ["precious", "victim-dir"]


def test_partial_uploads_inside_are_removed_unless_an_upload_holds_them(tree):
    root, _ = tree
    running = root / "d" / "e" / ".eke-part.running"
    running.write_bytes(b"half")
    stale = root / "d" / ".eke-part.stale"
    stale.write_bytes(b"old")
    (root / "d" / "other").mkdir()
    (root / "d" / "other" / "g").write_text("g")
    fd = os.open(running, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as files.PartFile holds it while an upload runs
        with pytest.raises(errors.Busy, match="d/e: an upload into it is in progress; the rest was removed"):
            served(root).remove("d", recursive=True)
        assert running.read_bytes() == b"half"
        # The upload's file and its directories stay; everything else went.
        assert sorted(os.listdir(root / "d")) == ["e"] and os.listdir(root / "d" / "e") == [".eke-part.running"]
    finally:
        os.close(fd)
    assert served(root).remove("d", recursive=True).names == 3  # once the upload is over
    assert not (root / "d").exists()


def test_a_real_uploads_partial_file_stops_a_recursive_remove(tree):
    root, _ = tree
    part = served(root).receive("d/e/new.bin", "writer", force=False, size=10)
    try:
        with pytest.raises(errors.Busy):
            served(root).remove("d", recursive=True)
    finally:
        part.abort(keep_part=False)
    assert os.listdir(root / "d" / "e") == []


def test_a_permission_refused_by_the_filesystem_keeps_what_was_removed(tree, monkeypatch):
    """The filesystem says no (here: an unlink refused as a read-only directory of another
    account would refuse it; the tests may run as root, whom modes do not stop)."""
    root, _ = tree
    real_unlink = os.unlink

    def refusing_unlink(name, *args, **kwargs):
        if name == "b.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing_unlink)
    with pytest.raises(errors.PermissionDenied, match="d/e/b.txt: permission denied on the server"):
        served(root).remove("d", recursive=True)
    assert not (root / "d" / "a.txt").exists() and (root / "d" / "e" / "b.txt").exists()


# -- RMDIR


def test_rmdir_removes_an_empty_directory_only(tree):
    root, outside = tree
    assert served(root).remove_directory("empty/") == (1, 0, 0)
    assert not (root / "empty").exists()
    with pytest.raises(errors.NotEmpty, match="d: the directory is not empty"):
        served(root).remove_directory("d")
    for name in ("f.txt", "out", "out-file"):  # a symlink to a directory is not one
        with pytest.raises(errors.NotADirectory):
            served(root).remove_directory(name)
    with pytest.raises(errors.NotFound):
        served(root).remove_directory("nothing")
    (root / "p").mkdir()
    (root / "p" / ".eke-part.abc").write_text("partial")
    with pytest.raises(errors.NotEmpty):
        served(root).remove_directory("p")
    assert_outside_untouched(outside)


# -- RENAME


def test_rename_a_file_a_directory_and_a_symlink_as_themselves(tree):
    root, outside = tree
    served(root).rename("f.txt", "d/e/g.txt")
    assert (root / "d" / "e" / "g.txt").read_text() == "hello\n" and not (root / "f.txt").exists()
    served(root).rename("d", "empty/d2")
    assert (root / "empty" / "d2" / "a.txt").exists()
    served(root).rename("out", "link")
    assert os.readlink(root / "link") == str(outside)
    assert_outside_untouched(outside)


@pytest.mark.parametrize("renameat2", ["renameat2", "fallback"])
def test_rename_never_replaces_without_force(tree, monkeypatch, renameat2):
    if renameat2 == "fallback":
        monkeypatch.setitem(files._LIBC_FUNCTIONS, "renameat2", None)
    root, outside = tree
    (root / "g.txt").write_text("other")
    for source, target in [("f.txt", "g.txt"), ("f.txt", "d"), ("d", "empty"), ("empty", "f.txt"), ("out", "g.txt")]:
        with pytest.raises(errors.Exists, match="use --force"):
            served(root).rename(source, target)
    assert (root / "f.txt").read_text() == "hello\n" and (root / "g.txt").read_text() == "other"
    served(root).rename("f.txt", "h.txt")
    served(root).rename("empty", "empty2")
    assert (root / "h.txt").read_text() == "hello\n" and (root / "empty2").is_dir()
    assert not os.path.lexists(root / "f.txt") and not os.path.lexists(root / "empty")
    assert_outside_untouched(outside)


def test_rename_with_force_replaces_a_file_and_an_empty_directory_only(tree):
    root, outside = tree
    (root / "g.txt").write_text("other")
    served(root).rename("f.txt", "g.txt", force=True)
    assert (root / "g.txt").read_text() == "hello\n"
    served(root).rename("g.txt", "out-file", force=True)  # the link goes, not what it named
    assert (root / "out-file").read_text() == "hello\n" and not (root / "out-file").is_symlink()
    (root / "full").mkdir()
    (root / "full" / "x").write_text("x")
    with pytest.raises(errors.NotEmpty):
        served(root).rename("d", "full", force=True)
    with pytest.raises(errors.Exists, match="a directory cannot replace a file"):
        served(root).rename("d", "out-file", force=True)
    with pytest.raises(errors.Exists, match="a file cannot replace a directory"):
        served(root).rename("out-file", "empty", force=True)
    served(root).rename("d", "empty", force=True)
    assert (root / "empty" / "a.txt").exists()
    assert_outside_untouched(outside)


def test_rename_refusals(tree):
    root, _ = tree
    with pytest.raises(errors.BadPath, match="into itself"):
        served(root).rename("d", "d/e/inside")
    os.symlink("d/e", root / "alias")
    with pytest.raises(errors.BadPath, match="into itself"):  # the kernel's check, through a link
        served(root).rename("d", "alias/inside")
    with pytest.raises(errors.NotFound, match="nothing: no such file"):
        served(root).rename("nothing", "x")
    with pytest.raises(errors.NotFound, match="no/x: the directory does not exist"):
        served(root).rename("f.txt", "no/x")
    with pytest.raises(errors.NotFound):
        served(root).rename("f.txt", "f.txt/x")
    served(root).rename("f.txt", "./f.txt")  # onto itself: nothing happens
    assert (root / "f.txt").exists()


def test_rename_of_a_path_with_an_upload_running_is_busy(tree):
    root, _ = tree
    part = served(root).receive("f.txt", "writer", force=True, size=10)
    try:
        with pytest.raises(errors.Busy):
            served(root).rename("f.txt", "g.txt", user="writer")
        served(root).rename("f.txt", "g.txt", user="someone else")  # not theirs
    finally:
        part.abort(keep_part=True)
    assert (root / "g.txt").exists()


# -- CHMOD


def test_chmod_sets_the_bits_given_without_the_umask(tree):
    root, outside = tree
    served(root).change_mode("f.txt", 0o777)
    assert stat.S_IMODE((root / "f.txt").stat().st_mode) == 0o777
    served(root).change_mode("f.txt", 0o6755)  # setuid and setgid are never set
    assert stat.S_IMODE((root / "f.txt").stat().st_mode) == 0o755
    # The owner (the server) keeps reading and writing what it stores: a directory it could
    # not read would hide its files from the quota count, the sweep and REMOVE.
    served(root).change_mode("d", 0)
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o700
    served(root).change_mode("f.txt", 0)
    assert stat.S_IMODE((root / "f.txt").stat().st_mode) == 0o600
    served(root).change_mode("d", 0o1750)  # nor sticky
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o750
    for name in ("out", "out-file"):
        with pytest.raises(errors.NotAFile, match="is a symlink"):
            served(root).change_mode(name, 0o777)
    os.mkfifo(root / "fifo")
    with pytest.raises(errors.NotAFile):
        served(root).change_mode("fifo", 0o777)
    with pytest.raises(errors.NotFound):
        served(root).change_mode("nothing", 0o777)
    assert stat.S_IMODE((outside / "precious").stat().st_mode) != 0o777
    assert_outside_untouched(outside)


# -- HASH and SPACE


def test_hash_gives_the_whole_files_sha1_with_its_stat(tree):
    root, _ = tree
    data = os.urandom(3 * files.HASH_BLOCK + 5)
    (root / "big").write_bytes(data)
    handle, st = served(root).open_for_hashing("big")
    with handle:
        hashed, digest = files.hash_whole(handle)
    assert digest == hashlib.sha1(data).hexdigest() and hashed.st_size == len(data)
    for name, error in [("d", errors.NotAFile), ("nothing", errors.NotFound), ("out-file", errors.BadPath), ("", errors.NotAFile)]:
        with pytest.raises(error):
            served(root).open_for_hashing(name)


def test_space_is_the_filesystem_of_the_root(tree):
    root, _ = tree
    space = served(root).space()
    vfs = os.statvfs(root)
    assert space["total"] == vfs.f_blocks * vfs.f_frsize
    assert abs(space["free"] - vfs.f_bavail * vfs.f_frsize) < 64 * 2**20
    assert space["files_free"] == -1 if not vfs.f_files else space["files_free"] > 0


# -- rights (section 7.7)

NEEDS = [
    ("list", lambda r: r.stat("f.txt")),
    ("list", lambda r: next(r.listing("d"))),
    ("list", lambda r: r.space()),
    ("read", lambda r: r.open_for_sending("f.txt")[0].close()),
    ("read", lambda r: r.open_for_hashing("f.txt")[0].close()),
    ("write", lambda r: r.receive("new.txt", "u", force=False, size=1).abort(keep_part=False)),
    ("write", lambda r: r.receive("new.txt", "u", force=True, size=1).abort(keep_part=False)),
    ("overwrite", lambda r: r.receive("f.txt", "u", force=True, size=1).abort(keep_part=False)),
    ("delete", lambda r: r.remove("f.txt")),
    ("delete", lambda r: r.remove("d", recursive=True)),
    ("delete", lambda r: r.remove_directory("empty")),
    ("rename", lambda r: r.rename("f.txt", "g.txt")),
    ("overwrite", lambda r: r.rename("f.txt", "d/a.txt", force=True)),
    ("mkdir", lambda r: r.make_directory("new")),
    ("chmod", lambda r: r.change_mode("f.txt", 0o600)),
]


@pytest.mark.parametrize("right, operation", NEEDS)
def test_each_request_needs_its_right(tmp_path, right, operation):
    allowed, refused = tmp_path / "allowed", tmp_path / "refused"
    for root in (allowed, refused):
        (root / "d" / "e").mkdir(parents=True)
        (root / "d" / "a.txt").write_text("a")
        (root / "empty").mkdir()
        (root / "f.txt").write_text("hello\n")
    operation(served(allowed, rights=wire.RIGHTS))
    with pytest.raises(errors.PermissionDenied) as raised:
        operation(served(refused, rights=set(wire.RIGHTS) - {right}))
    assert type(raised.value) is errors.PermissionDenied
    assert raised.value.message.endswith(f": permission denied: your account lacks the {right} right")
    assert (refused / "f.txt").read_text() == "hello\n" and (refused / "d" / "a.txt").exists()
    assert (refused / "empty").is_dir() and sorted(os.listdir(refused)) == ["d", "empty", "f.txt"]


def test_a_read_only_account_is_told_so(tree):
    root, _ = tree
    reader = served(root, rights=wire.RIGHT_BUNDLES["read"])
    with pytest.raises(errors.PermissionDenied) as raised:
        reader.remove("f.txt")
    assert raised.value.message == (
        "f.txt: permission denied on the server (read-only account): your account lacks the delete right"
    )
    assert reader.stat("f.txt")["kind"] == "file"


def test_mkdir_says_whether_it_made_the_directory(tree):
    root, _ = tree
    made = served(root)
    assert made.make_directory("x") is True
    assert made.make_directory("x", mode=0o700) is False  # its own: the mode and time only


def test_change_error_codes():
    assert type(storage._change_error(OSError(errno.EROFS, "ro"), "p")) is errors.PermissionDenied
    assert type(storage._change_error(OSError(errno.EBUSY, "busy"), "p")) is errors.Busy


@pytest.mark.parametrize("appearing, outcome", [(1, 5), (10, errors.Busy)])
def test_files_appearing_in_a_directory_being_emptied(tree, monkeypatch, appearing, outcome):
    """An upload committed into a directory just emptied: the walk reads it again (a few
    times), then gives up with busy."""
    root, _ = tree
    real_rmdir = os.rmdir
    made = []

    def rmdir_after_a_commit(name, *args, **kwargs):
        if name == "e" and len(made) < appearing:
            made.append(True)
            (root / "d" / "e" / f"committed{len(made)}").write_text("late")
        return real_rmdir(name, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir_after_a_commit)
    if outcome is errors.Busy:
        with pytest.raises(errors.Busy, match="d/e: files keep appearing in it"):
            served(root).remove("d", recursive=True)
    else:
        assert served(root).remove("d", recursive=True).names == outcome  # d, e, a.txt, b.txt and the late file
        assert not (root / "d").exists()


def test_a_rename_across_filesystems_is_refused(tree, monkeypatch):
    root, _ = tree

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "rename", cross_device)
    with pytest.raises(errors.PermissionDenied, match="another filesystem"):
        served(root).rename("f.txt", "g.txt", force=True)


def test_a_file_that_keeps_changing_while_hashed_is_busy(tree, monkeypatch):
    root, _ = tree
    real_hash_prefix = files.hash_prefix

    def hash_while_someone_writes(handle, length, cancelled=None):
        with open(root / "f.txt", "a") as writer:
            writer.write("more")
        return real_hash_prefix(handle, length, cancelled)

    monkeypatch.setattr(files, "hash_prefix", hash_while_someone_writes)
    handle, _ = served(root).open_for_hashing("f.txt")
    with handle, pytest.raises(errors.Busy, match="f.txt: the file keeps changing"):
        files.hash_whole(handle, "f.txt")


def test_a_recursive_remove_of_a_tree_deeper_than_the_recursion_limit(tmp_path):
    """1,200 levels (made by descriptors: the path is longer than PATH_MAX): removed whole,
    without recursion, and with no descriptor left open."""
    root = tmp_path / "root"
    root.mkdir()
    current = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(1200):
        name = "t" if level == 0 else "a"
        os.mkdir(name, dir_fd=current)
        deeper = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
        os.close(current)
        current = deeper
        if level % 200 == 0:  # a file every 200 levels: 6 in all
            os.close(os.open(f"f{level}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=current))
    os.close(current)
    before = len(os.listdir("/proc/self/fd"))
    try:
        removed = served(root).remove("t", recursive=True)
    finally:  # pytest's own clean-up of old runs recurses: it must never meet such a tree
        subprocess.run(["rm", "-rf", str(root / "t")], check=True)
    assert removed.names == 1200 + 6 and removed.files == 6 and os.listdir(root) == []
    assert len(os.listdir("/proc/self/fd")) == before


def test_rename_over_another_name_of_the_same_file_takes_the_first_name_away(tree):
    root, _ = tree
    (root / "one").write_text("same")
    os.link(root / "one", root / "two")
    freed = served(root).rename("one", "two", force=True)
    assert not (root / "one").exists() and (root / "two").read_text() == "same"
    assert (freed.bytes, freed.files) == (4, 1)  # a name less: a file less for a quota


def test_chmod_works_without_proc(tree, monkeypatch):
    root, _ = tree
    real_chmod = os.chmod

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real_chmod(path, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", no_proc)
    served(root).change_mode("f.txt", 0o640)
    assert stat.S_IMODE((root / "f.txt").stat().st_mode) == 0o640


def test_the_walk_of_a_deep_tree_holds_few_descriptors_and_opens_each_directory_about_once(tmp_path, monkeypatch):
    """walk_entries (the quota count, the sweep): a comb 300 deep, a file beside the path at
    every level, so that the walk goes down and comes back up: every file found, at most
    WALK_HELD descriptors held, and about one open per directory (reopening whole paths made
    20,000 directories at depth 2,000 cost 100 s)."""
    root = tmp_path / "root"
    root.mkdir()
    current = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(300):
        os.mkdir("d", dir_fd=current)
        os.mkdir(f"s{level}", dir_fd=current)
        os.close(os.open(f"s{level}/f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=current))
        deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
        os.close(current)
        current = deeper
    os.close(current)
    opens = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *args, **kwargs: opens.append(args[0]) or real_open(*args, **kwargs))
    before = len(os.listdir("/proc/self/fd"))
    most = 0
    found = 0
    try:
        for _, entry in storage.walk_entries(str(root)):
            found += entry.name == "f"
            most = max(most, len(os.listdir("/proc/self/fd")) - before)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    assert found == 300
    assert most <= storage.WALK_HELD + 2
    assert len(opens) <= 2 * 600  # 600 directories: reopening paths would be some 300 x 300 / 2
