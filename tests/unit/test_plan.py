"""The client's planner (eketwist.plan): local trees in tmp_path and listings as plain dicts in,
steps out. No server, no reactor."""

import errno
import os
import stat
import subprocess

import pytest

from eketwist import plan
from eketwist.errors import UsageError
from eketwist.plan import AlreadyComplete, Differs, MakeDirectory, Skip, SkipContents, Transfer


def entry(name, kind="file", size=0, mtime=1_500_000_000.0, mode=0o644):
    return {"name": name, "kind": kind, "size": size, "mtime": mtime, "mode": mode}


def write(path, data=b"", mtime=1_500_000_000.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


# Names and paths


@pytest.mark.parametrize("remote, name", [("a", "a"), ("d/a", "a"), ("d/a/", "a"), ("/d/a", "a")])
def test_remote_basename(remote, name):
    assert plan.remote_basename(remote) == name


@pytest.mark.parametrize("remote", ["", "/", ".", "d/..", "d/./"])
def test_remote_basename_refuses_what_names_no_file(remote):
    with pytest.raises(UsageError, match="not a file name"):
        plan.remote_basename(remote)


@pytest.mark.parametrize("directory, joined", [("", "x"), ("d", "d/x"), ("d/", "d/x"), ("/", "x")])
def test_remote_join(directory, joined):
    assert plan.remote_join(directory, "x") == joined


def test_steps_join_their_paths_only_when_asked():
    top = Transfer("r", "l")
    assert (top.remote_path, top.local_path) == ("r", "l")
    inner = Transfer("r/", "l", "a/b")
    assert (inner.remote_path, inner.local_path) == ("r/a/b", os.path.join("l", "a", "b"))
    assert MakeDirectory("", "l", "a").remote_path == "a"


def test_steps_are_equal_only_of_one_kind():
    assert Transfer("r", "l", "n") == Transfer("r", "l", "n")
    assert Transfer("r", "l", "n") != AlreadyComplete("r", "l", "n")
    assert Skip("p", "why") != SkipContents("p", "why")
    assert MakeDirectory("r", "l") == MakeDirectory("r", "l", None, None, None) != MakeDirectory("r", "l", None, 0o755, 1.0)
    assert repr(Transfer("r", "l")) == "Transfer('r', 'l', None)"


def test_same_file_is_size_and_mtime_within_a_millisecond(tmp_path):
    st = write(tmp_path / "f", b"12345", mtime=1_500_000_000.25).stat()
    assert plan.same_file(st, entry("f", size=5, mtime=1_500_000_000.2504))
    assert not plan.same_file(st, entry("f", size=5, mtime=1_500_000_000.252))
    assert not plan.same_file(st, entry("f", size=4, mtime=1_500_000_000.25))


# get: arguments and targets


def test_get_arguments(tmp_path):
    assert plan.get_arguments(["a"]) == (["a"], None)
    assert plan.get_arguments(["a", "here"]) == (["a"], "here")
    assert plan.get_arguments(["a", "b", str(tmp_path)]) == (["a", "b"], str(tmp_path))


def test_several_remotes_need_an_existing_local_directory(tmp_path):
    not_a_directory = write(tmp_path / "file")
    for local in (tmp_path / "missing", not_a_directory):
        with pytest.raises(UsageError, match="the last argument must be an existing directory"):
            plan.get_arguments(["a", "b", str(local)])


def test_get_target(tmp_path):
    assert plan.get_target("d/a.txt", None) == "a.txt"
    assert plan.get_target("d/a.txt", str(tmp_path)) == os.path.join(str(tmp_path), "a.txt")
    assert plan.get_target("d/a.txt", "new" + os.sep) == os.path.join("new", "a.txt")
    assert plan.get_target("d/a.txt", str(tmp_path / "other.txt")) == str(tmp_path / "other.txt")
    existing_file = write(tmp_path / "exists.txt", b"old")
    assert plan.get_target("d/a.txt", str(existing_file)) == str(existing_file)  # replaced, as a file


# get -r: a listing in, steps out


def test_get_tree_of_an_empty_directory_only_makes_it(tmp_path):
    target = str(tmp_path / "empty")
    assert list(plan.get_tree("empty", target, [])) == [MakeDirectory("empty", target)]


def test_get_tree_of_a_file_named_with_r_is_that_file(tmp_path):
    target = str(tmp_path / "a.txt")
    assert list(plan.get_tree("d/a.txt", target, [entry("a.txt")])) == [Transfer("d/a.txt", target)]
    # A directory holding one file of the same name is still a directory.
    inside = [entry("a.txt", kind="dir")]
    assert list(plan.get_tree("d/a.txt", target, inside))[0] == MakeDirectory("d/a.txt", target)


def test_get_tree_in_listing_order_with_directory_modes_and_times(tmp_path):
    target = str(tmp_path / "tree")
    listing = [
        entry("a", kind="dir", mode=0o750, mtime=1.5), entry("a/x.bin", size=3), entry("a/y", kind="dir"),
        entry("a/y/z.bin"), entry("top.bin"),
    ]
    steps = list(plan.get_tree("tree", target, listing))
    assert steps == [
        MakeDirectory("tree", target),
        MakeDirectory("tree", target, "a", 0o750, 1.5),
        Transfer("tree", target, "a/x.bin"),
        MakeDirectory("tree", target, "a/y", 0o644, 1_500_000_000.0),
        Transfer("tree", target, "a/y/z.bin"),
        Transfer("tree", target, "top.bin"),
    ]
    assert steps[4].remote_path == "tree/a/y/z.bin"
    assert steps[4].local_path == os.path.join(target, "a", "y", "z.bin")


def test_get_tree_skips_files_up_to_date_here_and_replaces_others_only_with_force(tmp_path):
    target = tmp_path / "tree"
    write(target / "done.bin", b"abc")
    write(target / "changed.bin", b"abd", mtime=1_600_000_000.0)
    write(target / "short.bin", b"ab")
    listing = [entry(name, size=3) for name in ("changed.bin", "done.bin", "missing.bin", "short.bin")]
    assert list(plan.get_tree("tree", str(target), listing))[1:] == [
        Differs("tree", str(target), "changed.bin"),
        AlreadyComplete("tree", str(target), "done.bin"),
        Transfer("tree", str(target), "missing.bin"),
        Differs("tree", str(target), "short.bin"),
    ]
    # --force: what differs is replaced; what is the same still is not sent again.
    assert list(plan.get_tree("tree", str(target), listing, force=True))[1:] == [
        Transfer("tree", str(target), "changed.bin"),
        AlreadyComplete("tree", str(target), "done.bin"),
        Transfer("tree", str(target), "missing.bin"),
        Transfer("tree", str(target), "short.bin"),
    ]


def test_get_tree_skips_what_is_neither_a_file_nor_a_directory(tmp_path):
    listing = [entry("link", kind="symlink"), entry("fifo", kind="other"), entry("f")]
    steps = list(plan.get_tree("d/tree/", str(tmp_path), listing))
    assert steps[1:] == [
        Skip("d/tree/link", "a symlink, not a regular file or directory"),
        Skip("d/tree/fifo", "a other, not a regular file or directory"),
        Transfer("d/tree/", str(tmp_path), "f"),
    ]


def test_get_tree_keeps_names_as_the_server_sent_them(tmp_path):
    """Escaping is for output (eketwist.report), not for paths: a name is the file's name."""
    odd = "new\nline \x1b[2J back\\slash \u202e ünï"
    steps = list(plan.get_tree("tree", str(tmp_path), [entry("d", kind="dir"), entry(f"d/{odd}")]))
    assert steps[2:] == [Transfer("tree", str(tmp_path), f"d/{odd}")]
    assert steps[2].local_path == os.path.join(str(tmp_path), "d", odd)
    assert steps[2].remote_path == f"tree/d/{odd}"


# put: targets


def test_put_target():
    assert plan.put_target("dir/a.txt", None, into_directory=True) == "a.txt"
    assert plan.put_target("dir/tree/", "up/", into_directory=True) == "up/tree"
    assert plan.put_target("a.txt", "b.txt", into_directory=False) == "b.txt"


# put -r: a local tree in, steps out


def test_put_tree_of_an_empty_directory_only_makes_it(tmp_path):
    (tmp_path / "empty").mkdir()
    os.utime(tmp_path / "empty", (1_400_000_000, 1_400_000_000))
    top = os.stat(tmp_path / "empty")
    assert list(plan.put_tree(str(tmp_path / "empty"), "up/empty")) == [
        MakeDirectory("up/empty", str(tmp_path / "empty"), None, top.st_mode, 1_400_000_000.0),
    ]


def test_put_tree_depth_first_in_name_order_each_directory_before_its_contents(tmp_path):
    local = tmp_path / "tree"
    for name in ("b.bin", "a/z.bin", "a/b/c.bin", "a/a.bin", "c/.hidden"):
        write(local / name)
    (local / "a" / "empty").mkdir()
    steps = list(plan.put_tree(str(local), "tree"))
    assert [(type(step).__name__, step.name) for step in steps] == [
        ("MakeDirectory", None),
        ("MakeDirectory", "a"),
        ("Transfer", "a/a.bin"),
        ("MakeDirectory", "a/b"),
        ("Transfer", "a/b/c.bin"),
        ("MakeDirectory", "a/empty"),
        ("Transfer", "a/z.bin"),
        ("Transfer", "b.bin"),
        ("MakeDirectory", "c"),
        ("Transfer", "c/.hidden"),
    ]
    assert steps[4].remote_path == "tree/a/b/c.bin"
    assert steps[4].local_path == str(local / "a" / "b" / "c.bin")
    directory = steps[3]
    st = os.lstat(local / "a" / "b")
    assert (directory.mode, directory.mtime) == (st.st_mode, st.st_mtime)


def test_put_tree_local_paths_are_those_of_the_directory_as_named(tmp_path):
    write(tmp_path / "tree" / "sub" / "f")
    named = str(tmp_path / "tree") + "/"
    steps = list(plan.put_tree(named, "tree"))
    assert steps[-1].local_path == named + "sub/f"


def test_put_tree_skips_symlinks_and_special_files_with_a_reason(tmp_path):
    local = tmp_path / "tree"
    write(local / "real.bin")
    (local / "dir").mkdir()
    os.symlink("real.bin", local / "file-link")
    os.symlink("dir", local / "dir-link")  # never followed
    os.symlink("/", local / "out")
    os.mkfifo(local / "fifo")
    steps = list(plan.put_tree(str(local), "tree"))
    assert steps[1:] == [
        MakeDirectory("tree", str(local), "dir", *mode_and_mtime(local / "dir")),
        Skip(str(local / "dir-link"), "a symlink"),
        Skip(str(local / "fifo"), "not a regular file"),
        Skip(str(local / "file-link"), "a symlink"),
        Skip(str(local / "out"), "a symlink"),
        Transfer("tree", str(local), "real.bin"),
    ]


def mode_and_mtime(path):
    st = os.lstat(path)
    return st.st_mode, st.st_mtime


def test_put_tree_makes_an_unreadable_directory_and_skips_its_contents(tmp_path, monkeypatch):
    local = tmp_path / "tree"
    write(local / "locked" / "secret")
    write(local / "open" / "f")
    scandir = os.scandir

    def refusing(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    steps = list(plan.put_tree(str(local), "tree"))
    assert [type(step) for step in steps] == [MakeDirectory, MakeDirectory, SkipContents, MakeDirectory, Transfer]
    assert steps[2] == SkipContents(str(local / "locked"), "Permission denied")


def test_put_tree_skips_files_the_server_already_has(tmp_path):
    local = tmp_path / "tree"
    write(local / "done.bin", b"abc")
    write(local / "older.bin", b"abc")
    write(local / "sub" / "done.bin", b"abc")
    write(local / "was-a-dir", b"abc")
    existing = [
        entry("done.bin", size=3), entry("older.bin", size=3, mtime=1_400_000_000.0), entry("sub", kind="dir"),
        entry("sub/done.bin", size=3), entry("was-a-dir", kind="dir", size=3),
    ]
    steps = [step for step in plan.put_tree(str(local), "tree", existing) if not isinstance(step, MakeDirectory)]
    assert steps == [
        AlreadyComplete("tree", str(local), "done.bin"),
        Transfer("tree", str(local), "older.bin"),
        AlreadyComplete("tree", str(local), "sub/done.bin"),
        Transfer("tree", str(local), "was-a-dir"),
    ]


def test_put_tree_onto_a_remote_file_plans_the_whole_tree(tmp_path):
    """The destination exists on the server as a file: it has no listing, so nothing is
    complete; making the directory is where the server refuses."""
    write(tmp_path / "tree" / "f")
    steps = list(plan.put_tree(str(tmp_path / "tree"), "taken"))
    assert steps[0].remote_path == "taken" and isinstance(steps[0], MakeDirectory)
    assert steps[1:] == [Transfer("taken", str(tmp_path / "tree"), "f")]


def test_put_tree_deeper_than_the_recursion_limit(tmp_path):
    depth = 1200  # past Python's 1,000 frames; the path (2,400 bytes) within PATH_MAX
    local = path = tmp_path / "tree"
    for _ in range(depth + 1):  # os.makedirs would recurse
        path.mkdir()
        path = path / "d"
    write(path.parent / "f")
    try:
        steps = list(plan.put_tree(str(local), "tree"))
        assert len(steps) == depth + 2
        assert steps[-1:] == [Transfer("tree", str(local), "/".join(["d"] * depth) + "/f")]
        assert all(isinstance(step, MakeDirectory) and stat.S_ISDIR(step.mode) for step in steps[:-1])
    finally:
        subprocess.run(["rm", "-rf", str(local)], check=True)  # pytest's rmtree recurses


def test_put_tree_keeps_local_names_as_they_are(tmp_path):
    odd = "new\nline \x1b]0;title\x07 back\\slash"
    write(tmp_path / "tree" / odd)
    steps = list(plan.put_tree(str(tmp_path / "tree"), "up"))
    assert steps[1:] == [Transfer("up", str(tmp_path / "tree"), odd)]
    assert steps[1].remote_path == f"up/{odd}"


# -- sync


def tree(*items):
    """Entries as a recursive listing gives them: (name, kind[, size[, mtime]])."""
    entries = []
    for item in items:
        name, kind, size, mtime = (*item, 10, 1000.0)[:4] if len(item) < 4 else item
        entries.append({"name": name, "kind": kind, "size": size if kind == "file" else 0, "mtime": mtime, "mode": 0o644})
    return entries


def steps_of(source, destination, **options):
    return [step for step in plan.sync_steps("r", "l", source, destination, **options)]


def test_sync_sends_what_differs_and_skips_what_is_up_to_date():
    source = tree(("a", "file"), ("d", "dir"), ("d/b", "file", 11), ("d/c", "file", 10, 2000.0), ("new", "file"))
    destination = tree(("a", "file"), ("d", "dir"), ("d/b", "file"), ("d/c", "file"), ("old", "file"))
    assert steps_of(source, destination) == [
        MakeDirectory("r", "l"),
        AlreadyComplete("r", "l", "a"),
        MakeDirectory("r", "l", "d", 0o644, 1000.0),
        Transfer("r", "l", "d/b"),  # another size
        Transfer("r", "l", "d/c"),  # another mtime
        Transfer("r", "l", "new"),
    ]  # "old" stays without --delete


def test_sync_delete_removes_what_the_source_lacks_first_and_topmost_only():
    source = tree(("keep", "file"))
    destination = tree(("gone", "dir"), ("gone/x", "file"), ("gone/y", "dir"), ("keep", "file"), ("z", "symlink"))
    steps = steps_of(source, destination, delete=True)
    assert steps[:2] == [plan.Delete("r", "l", "gone", "dir"), plan.Delete("r", "l", "z", "symlink")]
    assert steps[2:] == [MakeDirectory("r", "l"), AlreadyComplete("r", "l", "keep")]


def test_sync_replaces_a_kind_that_is_in_the_way_only_with_delete():
    source = tree(("x", "dir"), ("x/f", "file"), ("y", "file"))
    destination = tree(("x", "file"), ("y", "dir"), ("y/inner", "file"))
    without = steps_of(source, destination)
    assert [type(step) for step in without] == [MakeDirectory, Skip, Skip]
    assert steps_of(source, destination, delete=True) == [
        plan.Delete("r", "l", "x", "file"), plan.Delete("r", "l", "y", "dir"),
        MakeDirectory("r", "l"), MakeDirectory("r", "l", "x", 0o644, 1000.0), Transfer("r", "l", "x/f"),
        Transfer("r", "l", "y"),
    ]


def test_sync_excludes_neither_send_nor_delete_and_cover_what_is_under_them():
    source = tree(("cache", "dir"), ("cache/big", "file"), ("a.tmp", "file"), ("sub", "dir"), ("sub/b.tmp", "file"),
                  ("sub/keep", "file"))
    destination = tree(("old.tmp", "file"), ("cache", "dir"), ("cache/stale", "file"), ("logs", "dir"),
                       ("logs/x", "file"), ("gone", "file"))
    steps = steps_of(source, destination, delete=True, excludes=["cache", "*.tmp", "/logs"])
    assert steps == [
        plan.Delete("r", "l", "gone", "file"),
        MakeDirectory("r", "l"), MakeDirectory("r", "l", "sub", 0o644, 1000.0), Transfer("r", "l", "sub/keep"),
    ]


def test_sync_checksum_compares_files_of_the_same_size():
    source = tree(("same-size", "file", 10, 5.0), ("other-size", "file", 12))
    destination = tree(("same-size", "file"), ("other-size", "file"))
    assert steps_of(source, destination, checksum=True)[1:] == [
        plan.Compare("r", "l", "same-size"), Transfer("r", "l", "other-size"),
    ]


def test_local_tree_is_a_listing_of_the_local_side(tmp_path):
    write(tmp_path / "d" / "f.bin", b"abc", mtime=1_600_000_000.0)
    (tmp_path / "link").symlink_to("d")
    items = list(plan.local_tree(str(tmp_path)))
    entries = [item for item in items if isinstance(item, dict)]
    assert [(e["name"], e["kind"], e["size"]) for e in entries] == [("d", "dir", 0), ("d/f.bin", "file", 3)]
    assert entries[1]["mtime"] == 1_600_000_000.0
    assert [type(item) for item in items if not isinstance(item, dict)] == [Skip]


@pytest.mark.parametrize("pattern, name, is_dir, expected", [
    ("*.tmp", "a/b/c.tmp", False, True),
    ("cache", "a/cache", True, True),
    ("cache/", "a/cache", True, True),
    ("cache/", "a/cache", False, False),  # a trailing "/": directories only
    ("docs/*.pdf", "docs/a.pdf", False, True),
    ("docs/*.pdf", "x/docs/a.pdf", False, True),  # the end of the path
    ("docs/*.pdf", "docs/sub/a.pdf", False, False),  # * stays within a name
    ("/build", "build", True, True),
    ("/build", "src/build", True, False),  # anchored at the top
])
def test_sync_excludes_follow_rsyncs_rules(pattern, name, is_dir, expected):
    assert plan.excluded(name, [pattern], is_dir) is expected
