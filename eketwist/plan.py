"""What `get` and `put` will do, decided before anything is done: the command line, a local tree
or a remote listing in; steps out, in order. No network and no Twisted: eketwist.commands
fetches the listings and carries the steps out.

A step names its file by the two tops, `remote` and `local`, and a "/"-joined `name` under both
(None for a top itself), joined only when the step is carried out: a listing may hold a million
entries, and the steps then share its strings instead of holding two more per file.
"""

import fnmatch
import os
import stat

from .errors import UsageError


def remote_basename(remote):
    name = remote.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"{remote}: not a file name")
    return name


def remote_join(directory, name):
    directory = directory.rstrip("/")
    return f"{directory}/{name}" if directory else name


class _Step:
    """Equal when of one kind with equal fields. Plain classes with slots, not namedtuples:
    cheap by the million all the same, and no eval per kind at every command's start."""

    __slots__ = ()

    def _values(self):
        return tuple(getattr(self, field) for field in self._fields)

    def __eq__(self, other):
        return type(self) is type(other) and self._values() == other._values()

    def __hash__(self):
        return hash((type(self), self._values()))

    def __repr__(self):
        return f"{type(self).__name__}{self._values()!r}"


class _Named(_Step):
    __slots__ = _fields = ("remote", "local", "name")

    def __init__(self, remote, local, name=None):
        self.remote = remote
        self.local = local
        self.name = name

    @property
    def remote_path(self):
        return self.remote if self.name is None else remote_join(self.remote, self.name)

    @property
    def local_path(self):
        return self.local if self.name is None else os.path.join(self.local, *self.name.split("/"))


class Transfer(_Named):
    """One file, either way; `size`, when a listing gave it (for the progress bars only)."""

    __slots__ = ("size",)

    def __init__(self, remote, local, name=None, size=None):
        _Named.__init__(self, remote, local, name)
        self.size = size


class AlreadyComplete(_Named):
    """A file of a tree the destination already has with its size and mtime: a result
    ("skipped"), from a rerun of an interrupted command."""

    __slots__ = ()


class Differs(_Named):
    """A file of a tree that the destination already has, different (its size or mtime): not
    replaced without --force, either way (put's are refused by the server)."""

    __slots__ = ()


class MakeDirectory(_Named):
    """Made (on the destination's side) before any file is transferred, parents first. Given
    `mode` and `mtime` after every transfer, contents before their parents (whatever is written
    into a directory changes its mtime); left as made when `mtime` is None."""

    __slots__ = ("mode", "mtime")
    _fields = _Named._fields + __slots__

    def __init__(self, remote, local, name=None, mode=None, mtime=None):
        _Named.__init__(self, remote, local, name)
        self.mode = mode
        self.mtime = mtime


class _Warning(_Step):
    __slots__ = _fields = ("path", "reason")

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason


class Skip(_Warning):
    """Something in a tree that is not transferred (a symlink, a device): a warning."""

    __slots__ = ()


class SkipContents(_Warning):
    """A local directory that cannot be read: made, but empty; a warning."""

    __slots__ = ()


def same_file(st, entry):
    """Whether the local file with stat `st` is the one the listing's `entry` describes."""
    return same_entry({"size": st.st_size, "mtime": st.st_mtime}, entry)


def get_arguments(paths):
    """`get REMOTE... [LOCAL]`: the remotes and LOCAL (None when not given). With several
    remotes, LOCAL must be an existing directory."""
    if len(paths) <= 2:
        return paths[:1], (paths[1] if len(paths) == 2 else None)
    *remotes, local = paths
    if not os.path.isdir(local):
        raise UsageError(f"{local}: with several files to get, the last argument must be an existing directory")
    return remotes, local


def get_target(remote, local):
    """Where `remote` is written: its name here, or inside `local` when that is a directory
    (or ends with a separator), else `local` itself."""
    name = remote_basename(remote)
    if local is None:
        return name
    if os.path.isdir(local) or local.endswith(os.sep):
        return os.path.join(local, name)
    return local


def get_tree(remote, target, entries, force=False):
    """The steps of `get -r` from `remote` to the local `target`, given the remote's recursive
    listing `entries` (as the server sends them: parents before their contents). A local file
    that differs is replaced only with `force`."""
    if len(entries) == 1 and entries[0]["kind"] == "file" and entries[0]["name"] == remote_basename(remote):
        yield Transfer(remote, target)  # a file named with -r
        return
    yield MakeDirectory(remote, target)
    for entry in entries:
        kind = entry["kind"]
        if kind == "dir":
            yield MakeDirectory(remote, target, entry["name"], entry["mode"], entry["mtime"])
        elif kind == "file":
            step = Transfer(remote, target, entry["name"], entry["size"])
            here = local_state(step.local_path, entry)
            if here is SAME:
                yield AlreadyComplete(remote, target, entry["name"])
            elif here is DIFFERENT and not force:
                yield Differs(remote, target, entry["name"])
            else:
                yield step
        else:
            yield Skip(remote_join(remote, entry["name"]), f"a {kind}, not a regular file or directory")


MISSING, SAME, DIFFERENT = "missing", "same", "different"


def local_state(path, entry):
    """Whether the local `path` is MISSING, the SAME file as the listing's `entry`, or a
    DIFFERENT one (any file, with no `entry`; a directory there is left for the transfer to
    report)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there (a file where a directory goes
        return MISSING  # is reported when the directory is made)
    if not stat.S_ISREG(st.st_mode):
        return MISSING
    return SAME if entry is not None and same_file(st, entry) else DIFFERENT


def put_target(local, remote, into_directory):
    """Where `local` is stored: under its own name at the top of the root or inside `remote`
    when `into_directory`, else as `remote`."""
    name = os.path.basename(os.path.normpath(local))
    return remote_join(remote or "", name) if into_directory else remote


def put_tree(local, target, existing=()):
    """The steps of `put -r` from the local directory `local` to the remote `target`, given
    the recursive listing `existing` of `target` (empty when it is not a remote directory).

    Directories and regular files, depth first in name order, each directory before its
    contents; symlinks (never followed) and other files are skipped with a reason."""
    theirs = {entry["name"]: entry for entry in existing}
    top = os.stat(local)  # followed: the user named it
    yield MakeDirectory(target, local, None, top.st_mode, top.st_mtime)
    for item in local_tree(local):
        if isinstance(item, _Warning):
            yield item
        elif item["kind"] == "dir":
            yield MakeDirectory(target, local, item["name"], item["mode"], item["mtime"])
        else:
            entry = theirs.get(item["name"])
            complete = entry is not None and entry["kind"] == "file" and same_entry(item, entry)
            yield (AlreadyComplete if complete else Transfer)(target, local, item["name"])


def local_tree(local, others=False):
    """The directories and regular files under the local directory `local`, as entries like a
    recursive LIST's ({name, kind, size, mtime, mode}, names relative and "/"-joined), depth
    first in name order, each directory before its contents; what is not sent, as a Skip or
    SkipContents, or, with `others` (a destination's tree, where they may be in the way), as
    entries of kind "symlink" or "other". An explicit stack: os.walk recursed (Python 3.11), and a tree 1,000 levels
    deep raised RecursionError."""
    stack = [("", _children(local))]
    while stack:
        prefix, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        if isinstance(child, SkipContents):
            yield child
            continue
        try:
            st = child.stat(follow_symlinks=False)
        except OSError as problem:
            yield Skip(child.path, problem.strerror)
            continue
        name = prefix + child.name
        if not _is_utf8(child.name):
            yield Skip(child.path, "its name is not UTF-8, which the protocol needs")
        elif others and not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "other"
            yield {"name": name, "kind": kind, "size": 0, "mtime": st.st_mtime, "mode": st.st_mode}
        elif stat.S_ISLNK(st.st_mode):
            yield Skip(child.path, "a symlink")
        elif stat.S_ISDIR(st.st_mode):
            yield {"name": name, "kind": "dir", "size": 0, "mtime": st.st_mtime, "mode": st.st_mode}
            stack.append((name + "/", _children(child.path)))
        elif stat.S_ISREG(st.st_mode):
            yield {"name": name, "kind": "file", "size": st.st_size, "mtime": st.st_mtime, "mode": st.st_mode}
        else:
            yield Skip(child.path, "not a regular file")


def _is_utf8(name):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes os.fsdecode kept as surrogates
        return False
    return True


def same_entry(ours, theirs):
    """Whether two entries describe the same file: size and mtime (to the millisecond)."""
    return ours["size"] == theirs["size"] and abs(ours["mtime"] - theirs["mtime"]) < 1e-3


# -- sync: the destination made a copy of the source


class Delete(_Named):
    """Something the destination has and the source does not (sync --delete); a directory
    goes with all it holds. `kind` as its listing said."""

    __slots__ = ("kind",)
    _fields = _Named._fields + __slots__

    def __init__(self, remote, local, name, kind):
        _Named.__init__(self, remote, local, name)
        self.kind = kind


class Compare(_Named):
    """A file of the same size on both sides, compared by SHA-1 (sync --checksum) before it is
    sent or skipped."""

    __slots__ = ()


def excluded(name, patterns, is_dir=False):
    """rsync's rules: a pattern ending in "/" matches directories only; one with another "/"
    matches the end of the path, segment for segment (`*` stays within a name), or, with a
    leading "/", the path from the top; one without matches the last name. So a directory
    excluded keeps all it holds out too (sync_steps does not descend into it)."""
    segments = name.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if not is_dir:
                continue
            pattern = pattern.rstrip("/")
        anchored = pattern.startswith("/")
        wanted = pattern.strip("/").split("/")
        if len(wanted) > len(segments) or (anchored and len(wanted) != len(segments)):
            continue
        tail = segments[-len(wanted):]
        if all(fnmatch.fnmatchcase(part, want) for part, want in zip(tail, wanted)):
            return True
    return False


def sync_steps(remote, local, source, destination, *, delete=False, excludes=(), checksum=False):
    """The steps that make the destination a copy of the source: `source` and `destination`,
    their trees as entries (parents before contents; Skips among the source's pass through),
    named relative to the tops `remote` and `local`. Deletions first (they free space and
    clear the way for what replaces them), topmost only; then directories, files, and what
    needs comparing. Excluded names are neither sent nor deleted, nor anything under them."""
    theirs = {entry["name"]: entry for entry in destination}
    ours = set()
    skipped_dirs: list = []  # excluded directories: what is under them is left alone on both sides
    later: list = [MakeDirectory(remote, local)]
    deletions: list = []
    gone: list = []  # deleted destination names: what is under them goes with them

    def under(name, tops):
        return any(name.startswith(top + "/") for top in tops)

    for entry in source:
        if isinstance(entry, _Warning):
            later.append(entry)
            continue
        name = entry["name"]
        if under(name, skipped_dirs):
            continue
        if excluded(name, excludes, entry["kind"] == "dir"):
            if entry["kind"] == "dir":
                skipped_dirs.append(name)
            ours.add(name)  # an excluded name on the other side is kept
            continue
        ours.add(name)
        there = theirs.get(name)
        if entry["kind"] == "dir":
            if there is not None and there["kind"] != "dir":
                if not delete:
                    later.append(Skip(name, f"a {there['kind']} of that name is in the way (sync --delete replaces it)"))
                    skipped_dirs.append(name)
                    continue
                deletions.append(Delete(remote, local, name, there["kind"]))
                gone.append(name)
            later.append(MakeDirectory(remote, local, name, entry["mode"], entry["mtime"]))
        else:
            if there is not None and there["kind"] != "file":
                if not delete:
                    later.append(Skip(name, f"a {there['kind']} of that name is in the way (sync --delete replaces it)"))
                    continue
                deletions.append(Delete(remote, local, name, there["kind"]))
                gone.append(name)
                there = None
            if there is None:
                later.append(Transfer(remote, local, name, entry["size"]))
            elif entry["size"] != there["size"]:
                later.append(Transfer(remote, local, name, entry["size"]))
            elif checksum:
                later.append(Compare(remote, local, name))
            elif same_entry(entry, there):
                later.append(AlreadyComplete(remote, local, name))
            else:
                later.append(Transfer(remote, local, name, entry["size"]))
    if delete:
        for entry in destination:  # parents first: a deleted directory takes its contents
            name = entry["name"]
            if name in ours or under(name, gone) or under(name, skipped_dirs):
                continue
            if excluded(name, excludes, entry["kind"] == "dir"):
                skipped_dirs.append(name)
                continue
            gone.append(name)
            deletions.append(Delete(remote, local, name, entry["kind"]))
    yield from deletions
    yield from later


def _children(directory):
    """An iterator over `directory`'s entries in name order, or over the one SkipContents
    saying why it cannot be read."""
    try:
        with os.scandir(directory) as scan:
            return iter(sorted(scan, key=lambda child: child.name))
    except OSError as problem:
        return iter((SkipContents(directory, problem.strerror),))
