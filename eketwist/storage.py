"""A user's root on the server's disk: every path from a peer resolved by descriptors inside it.

A path checked as a string can be swapped for a symlink between the check and the open. Here
nothing is opened by a path string: each request opens the root's directory, then what lies
beneath it relative to that descriptor. On Linux (5.6 and later) that is one openat2() with
RESOLVE_BENEATH, which follows symlinks only while they stay inside the root, atomically in the
kernel; elsewhere the path is walked one component at a time with O_NOFOLLOW, and symlinks are
not followed at all. The last component of a path is then used relative to its parent's
descriptor (fstatat, mkdirat, renameat, unlinkat), so what is checked is what is used.

No network here: the server's protocol calls a `Root` per authenticated user.
"""

import ctypes
import errno
import json
import os
import stat
import sys
from typing import NamedTuple

from zope.interface import Interface, implementer

from .errors import (
    BadPath, Busy, EketwistError, Exists, LocalIOError, NotADirectory, NotAFile, NotEmpty, NotFound, PermissionDenied,
    TooLarge,
)
from .files import (
    MODE_MASK, SERVER_PART_PREFIX, DigestCache, PartFile, local_mode, read_part_label, server_part_name, storage_error,
)
from .wire import MAX_NAME_BYTES, MAX_PATH_BYTES, RIGHT_BUNDLES, RIGHTS

# A recursive listing remembers the subdirectories it has yet to enter: a bounded amount of
# memory, counted as Python holds them (the str object, its place in a tuple and a list).
MAX_PENDING_BYTES = 4 * 1024 * 1024
_PENDING_OVERHEAD = 72

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK
# A descriptor for an inode itself, for CHMOD: O_PATH where there is one (Linux; no read
# permission needed), else opened for reading without waiting on a FIFO.
_INODE_FLAGS = getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK)


def _fchmod_by_name(parent_fd, name, held, mode):
    """CHMOD without /proc: the name opened for reading (it is a regular file or a directory,
    checked on `held`, so opening it has no side effect), and changed only if it is still the
    inode `held` was."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        if not _same_file(os.fstat(fd), held):
            raise FileNotFoundError(errno.ENOENT, "replaced meanwhile")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


# What CHMOD never takes from the server, the owner of what it stores (see Root.change_mode).
OWNER_KEEPS_FILE = stat.S_IRUSR | stat.S_IWUSR
OWNER_KEEPS_DIRECTORY = OWNER_KEEPS_FILE | stat.S_IXUSR

class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine) if sys.platform == "linux" else None
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_libc = None


def _syscall_openat2(dir_fd, relative, flags):
    """(descriptor or -1, errno) of one openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)."""
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(relative), ctypes.byref(how), ctypes.sizeof(how))
    return fd, (ctypes.get_errno() if fd < 0 else 0)


def _openat2(dir_fd, relative, flags):
    """openat2(dir_fd, relative, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS); None when the
    system lacks it (then the caller walks by hand). At first use it is tried on "." once: a
    kernel before 5.6 says ENOSYS, and some seccomp filters EPERM, which would otherwise read
    as "permission denied" on every request."""
    global _libc, _SYS_OPENAT2
    if _SYS_OPENAT2 is None:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        fd, code = _syscall_openat2(dir_fd, ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            _SYS_OPENAT2 = None  # walk by hand from now on
            return None
        os.close(fd)
    for _ in range(8):
        fd, code = _syscall_openat2(dir_fd, relative, flags)
        if fd >= 0:
            return fd
        if code != errno.EAGAIN:  # EAGAIN: a rename raced the lookup; the kernel asks to retry
            break
    raise OSError(code, os.strerror(code), relative)


class Removed(NamedTuple):
    """What a change took off the disk: the names removed, and of them the regular files (their
    number and bytes), which quotas count (partial uploads included)."""

    names: int
    bytes: int = 0
    files: int = 0

    def __add__(self, other):
        return Removed(self.names + other.names, self.bytes + other.bytes, self.files + other.files)


def _freed(st):
    """Removed for one name, from its lstat."""
    return Removed(1, st.st_size, 1) if stat.S_ISREG(st.st_mode) else Removed(1)


def segments(requested):
    """The names of `requested` (a peer's "/"-separated path), or BadPath. "" and "." are the
    root; empty and "." segments are ignored. Every problem is a BadPath: the peer asked in a
    well-formed message for a name it may not have."""
    try:
        encoded = requested.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPath("path refused: not UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise BadPath(f"path refused: longer than {MAX_PATH_BYTES} bytes")
    if "\x00" in requested:
        raise BadPath("path refused: contains NUL")
    if requested.startswith("/"):
        raise BadPath(f"{requested}: path refused: absolute paths are not allowed")
    names = [name for name in requested.split("/") if name not in ("", ".")]
    if ".." in names:
        raise BadPath(f"{requested}: path refused: '..' is not allowed")
    if any(name.startswith(SERVER_PART_PREFIX) for name in names):
        raise BadPath(f"{requested}: path refused: reserved name")
    for name in names:
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise BadPath(f"{requested}: path refused: a name is longer than {MAX_NAME_BYTES} bytes")
    return names


def last_name(requested):
    """The name a path ends with, as answers name it ("." for the root)."""
    names = segments(requested)
    return names[-1] if names else "."


def open_error(problem, shown_name):
    """The error a peer sees for an OSError met while resolving or opening its path."""
    if isinstance(problem, FileNotFoundError):
        return NotFound(f"{shown_name}: no such file on the server")
    if isinstance(problem, PermissionError):
        return PermissionDenied(f"{shown_name}: permission denied on the server")
    if problem.errno in (errno.ELOOP, errno.EXDEV):
        # EXDEV: openat2 met a symlink (or "..") leading out of the root.
        return BadPath(f"{shown_name}: path refused: it leads outside the root or through a symlink")
    if problem.errno == errno.EISDIR:
        return NotAFile(f"{shown_name}: is a directory")
    if problem.errno == errno.ENOTDIR:
        return NotFound(f"{shown_name}: no such file on the server")
    if problem.errno == errno.ENAMETOOLONG:
        return BadPath(f"{shown_name}: path refused: too long")
    return NotFound(f"{shown_name}: cannot open on the server: {problem.strerror}")


def _kind(mode):
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def entry(name, st):
    """One listing entry: what `ls` shows and what a tree transfer needs."""
    return {
        "name": name,
        "kind": _kind(st.st_mode),
        "size": st.st_size,
        "mtime": st.st_mtime,
        "mode": stat.S_IMODE(st.st_mode) & MODE_MASK,
    }


def _is_utf8(name):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach us as surrogate escapes
        return False
    return True


def _open_directory_nofollow(name, dir_fd):
    """The directory `name` in `dir_fd`; ELOOP for a symlink (Linux says ENOTDIR when
    O_DIRECTORY meets one, which would read as "no such directory")."""
    try:
        return os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def _partial_entry(directory, name, user, prefix):
    """The entry of `user`'s partial upload `name` in `directory`, or None if it is not theirs."""
    label = read_part_label(directory, name)
    if label is None or label.get("user") != user or not isinstance(label.get("name"), str):
        return None
    if server_part_name(label["name"], user) != name:
        return None  # a label copied onto another file: not what it claims
    return {**entry(prefix + label["name"], label["stat"]), "kind": "partial"}


def _walk_down(fd, names):
    """A new descriptor for the directory `names` under the directory `fd`, every step opened
    with O_NOFOLLOW (never through a symlink); OSError if not."""
    current = os.dup(fd)
    try:
        for name in names:
            current, parent = _open_directory_nofollow(name, current), current
            os.close(parent)
    except OSError:
        os.close(current)
        raise
    return current


class IStorage(Interface):
    """A user's view of the server's files, the avatar twisted.cred gives an authenticated user
    (eketwist.realm): every path a request names is resolved, checked and carried out through it."""


@implementer(IStorage)
class Root:
    """One root directory, as a user's requests see it. `protected`: a callable giving the
    (device, inode) pairs never served nor replaced, whatever leads to them (the users file,
    the daemon's log: defence in depth, as the daemon refuses to start with them in a root).
    `quota`: the user's quotas.Quota (its limits and the root's usage), or None."""

    def __init__(self, path, protected=lambda: frozenset(), rights=RIGHTS, max_upload_size=None, quota=None):
        self.path = path
        self.quota = quota
        self._protected = protected
        self.rights = frozenset(rights)  # what this user may do (docs/protocol.md section 7.7)
        self.max_upload_size = max_upload_size
        self._created = set()  # (device, inode) of directories made through this object

    def __repr__(self):
        return f"<Root {self.path!r}>"

    # -- resolving

    def _open_root(self):
        try:
            return os.open(self.path, _DIRECTORY_FLAGS)
        except OSError as problem:
            raise NotFound(f"the root directory is not available on the server ({problem.strerror})") from None

    def _open_beneath(self, root_fd, names, flags):
        """A descriptor for `names` under the root, opened with `flags`; OSError if not."""
        if not names:
            return os.dup(root_fd)
        fd = _openat2(root_fd, "/".join(names), flags)
        if fd is not None:
            return fd
        # By hand: every directory on the way, and the last name, opened with O_NOFOLLOW.
        parent = _walk_down(root_fd, names[:-1])
        try:
            return os.open(names[-1], flags | os.O_NOFOLLOW, dir_fd=parent)
        finally:
            os.close(parent)

    def _parent(self, requested):
        """(descriptor of the parent directory, last name) for an operation on the name itself
        (never following it); BadPath for the root."""
        names = segments(requested)
        if not names:
            raise BadPath(f"{requested or '.'}: path refused: that is the root")
        root_fd = self._open_root()
        try:
            return self._open_beneath(root_fd, names[:-1], _DIRECTORY_FLAGS), names[-1]
        except OSError as problem:
            raise open_error(problem, requested) from None
        finally:
            os.close(root_fd)

    def _need(self, right, requested):
        """PermissionDenied naming `right` unless this user has it."""
        if right in self.rights:
            return
        shown = requested or "."
        if self.rights <= RIGHT_BUNDLES["read"]:
            raise PermissionDenied(
                f"{shown}: permission denied on the server (read-only account): your account lacks the {right} right"
            )
        raise PermissionDenied(f"{shown}: permission denied: your account lacks the {right} right")

    def _check_not_protected(self, st, shown_name):
        if (st.st_dev, st.st_ino) in self._protected():
            raise BadPath(f"{shown_name}: path refused")

    # -- requests

    def open_for_sending(self, requested):
        """A regular file, opened for reading: (file object, os.stat_result), or a clear error.
        A symlink leading inside the root is followed; devices and FIFOs are refused without
        being waited on (O_NONBLOCK)."""
        self._need("read", requested)
        names = segments(requested)
        root_fd = self._open_root()
        try:
            fd = self._open_beneath(root_fd, names, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as problem:
            raise open_error(problem, requested) from None
        finally:
            os.close(root_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "is a directory" if stat.S_ISDIR(st.st_mode) else "is not a regular file"
                raise NotAFile(f"{requested}: {kind}")
            self._check_not_protected(st, requested)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb", buffering=0), st

    def stat(self, requested):
        """The entry of one path, named as asked; a symlink is reported as one, not followed."""
        self._need("list", requested)
        names = segments(requested)
        if not names:
            root_fd = self._open_root()
            try:
                return entry(".", os.fstat(root_fd))
            finally:
                os.close(root_fd)
        parent_fd, name = self._parent(requested)
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError as problem:
            raise open_error(problem, requested) from None
        finally:
            os.close(parent_fd)
        self._check_not_protected(st, requested)
        return entry(name, st)

    def listing(self, requested, recursive=False, partials_of=None):
        """Entries under a directory, streamed in the directory's own order (never all held):
        a directory's entries, then, with `recursive`, the contents of each of its
        subdirectories in turn, named by their "/"-joined path relative to `requested`.
        Subdirectories are entered by descriptor, never through a symlink. A file lists as
        itself. With `partials_of` (a username), that user's partial uploads are listed too,
        as entries of kind "partial" named after the file they will become (everyone else's
        stay hidden). Errors about the path itself are raised by the first next()."""
        self._need("list", requested)
        names = segments(requested)
        shown = requested or "."
        root_fd = self._open_root()
        try:
            fd = self._open_beneath(root_fd, names, _DIRECTORY_FLAGS)
        except OSError as problem:
            if problem.errno != errno.ENOTDIR:
                raise open_error(problem, shown) from None
            fd = None
        finally:
            os.close(root_fd)
        if fd is None:  # not a directory: the entry of the path itself
            yield self.stat(requested)
            return
        protected = self._protected()
        # Subdirectories still to enter, by their path relative to the listed directory; their
        # names are all that is held, within a budget. Each is opened when its turn comes.
        pending = [("", fd)]
        pending_bytes = 0
        try:
            while pending:
                prefix, directory = pending.pop()
                if directory is None:
                    pending_bytes -= sys.getsizeof(prefix) + _PENDING_OVERHEAD
                    try:
                        directory = self._open_subdirectory(names, prefix)
                    except OSError:
                        continue  # gone, or swapped for something else since it was listed
                subdirectories = []
                try:
                    with os.scandir(directory) as scan:
                        for child in scan:
                            if child.name.startswith(SERVER_PART_PREFIX):
                                partial = partials_of is not None and _partial_entry(
                                    directory, child.name, partials_of, prefix
                                )
                                if partial:
                                    yield partial
                                continue
                            if not _is_utf8(child.name):
                                continue  # names no client could ask for
                            try:
                                st = child.stat(follow_symlinks=False)
                            except OSError:
                                continue  # vanished since the scan
                            if (st.st_dev, st.st_ino) in protected:
                                continue  # the daemon's own files (a hard link to them)
                            item = entry(prefix + child.name, st)
                            yield item
                            if recursive and item["kind"] == "dir":
                                pending_name = item["name"] + "/"
                                pending_bytes += sys.getsizeof(pending_name) + _PENDING_OVERHEAD
                                if pending_bytes > MAX_PENDING_BYTES:
                                    raise TooLarge(
                                        f"{shown}: too many subdirectories to list in one go; "
                                        "list its subdirectories one by one"
                                    )
                                subdirectories.append(pending_name)
                except OSError as problem:
                    raise open_error(problem, shown) from None
                finally:
                    os.close(directory)
                pending.extend((name, None) for name in reversed(subdirectories))
        finally:
            for _, directory in pending:
                if directory is not None:
                    os.close(directory)

    def _open_subdirectory(self, names, relative):
        """A descriptor for `relative` (ending in "/") under the listed directory `names`,
        every step with O_NOFOLLOW: the tree is never entered through a symlink."""
        root_fd = self._open_root()
        try:
            listed = self._open_beneath(root_fd, names, _DIRECTORY_FLAGS)
        finally:
            os.close(root_fd)
        try:
            return _walk_down(listed, relative.rstrip("/").split("/"))
        finally:
            os.close(listed)

    def make_directory(self, requested, mode=None, mtime=None):
        """Create a directory (its parent must exist), with `mode` and `mtime` if given. An
        existing directory is left as it is (Exists), unless this Root made it: a tree upload
        creates its directories first and gives them their times once their contents are in.
        The root exists, like any other directory. True when it was created here."""
        self._need("mkdir", requested)
        if not segments(requested):
            raise Exists(f"{requested or '.'}: the directory exists already (it is the root)")
        parent_fd, name = self._parent(requested)
        try:
            try:
                os.mkdir(name, 0o700 if mode is None else mode & MODE_MASK, dir_fd=parent_fd)
            except FileExistsError:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise Exists(f"{requested}: exists and is not a directory") from None
                if (st.st_dev, st.st_ino) not in self._created:
                    raise Exists(f"{requested}: the directory exists already") from None
                created = False
            else:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                self._created.add((st.st_dev, st.st_ino))
                created = True
            fd = os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
            try:
                if mode is not None:
                    os.fchmod(fd, local_mode(mode))
                if mtime is not None:
                    os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
            return created
        except EketwistError:
            raise
        except FileNotFoundError:
            raise NotFound(f"{requested}: the parent directory does not exist") from None
        except PermissionError:
            raise PermissionDenied(f"{requested}: permission denied on the server") from None
        except OSError as problem:
            raise storage_error(problem, requested) from None
        finally:
            os.close(parent_fd)

    def receive(self, requested, user, force, size):
        """A PartFile for an upload of `requested` by `user` of `size` bytes, beside its
        destination, which it will replace only with `force`. Refuses read-only accounts,
        sizes over the limit, directories, protected files, missing parents and, without
        `force`, existing names, and uploads that would pass a quota (NoSpace), before a byte
        is sent. Needs the write right, and overwrite too to replace a name that exists. The
        PartFile's `reservation` is the room it holds in the quota (quotas.Reservation), or
        None."""
        self._need("write", requested)
        cap = self.max_upload_size
        if cap is not None and size > cap:
            raise TooLarge(f"{requested}: {size} bytes is over the server's upload limit of {cap} bytes")
        if not segments(requested):
            raise NotAFile(f"{requested or '.'}: is a directory on the server (the root)")
        try:
            parent_fd, name = self._parent(requested)
        except NotFound:
            raise NotFound(f"{requested}: the directory does not exist on the server") from None
        try:
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            except OSError as problem:
                raise open_error(problem, requested) from None
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    raise NotAFile(f"{requested}: is a directory on the server")
                self._check_not_protected(st, requested)
                if not force:
                    raise Exists(f"{requested}: already exists on the server (use --force to replace it)")
                self._need("overwrite", requested)
            label = json.dumps({"user": user, "name": name}).encode("utf-8")
            part_name = server_part_name(name, user)
            try:
                before = os.stat(part_name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                before = None
            try:
                part = PartFile(name, part_name, requested, lock=True, private=True, dir_fd=parent_fd, label=label)
            except LocalIOError:
                # Put there by someone else (a FIFO, a hard link to another file): not ours.
                raise BadPath(f"{requested}: path refused: its partial upload is not the server's own file") from None
            reservation = None
            if self.quota is not None:
                # Reserved once the partial file is ours (locked): one removed meanwhile (a
                # sweep, a REMOVE) was freed already, and is not counted out a second time.
                held = part.stat()
                # (The same inode number is not enough: a file made just now may reuse the one
                # of the file removed; its size and times tell them apart.)
                existed = before is not None and DigestCache.key(before) == DigestCache.key(held)
                try:
                    reservation = self.quota.reserve(requested, size, replaced=st, partial=held if existed else None)
                except BaseException:
                    part.abort(keep_part=existed)  # one made just now goes again
                    raise
            part.reservation = reservation
            # What the commit may replace: with force, the name checked above, or, with the
            # overwrite right, whatever is there by then; without that right a name that
            # appears meanwhile is not replaced (the commit refuses it with exists).
            part.may_replace = force and (st is not None or "overwrite" in self.rights)
            return part
        finally:
            os.close(parent_fd)

    # -- managing files (docs/protocol.md section 7.10): never the root, never through the
    # last name's symlink, never the server's own files or partial uploads by their names

    def _the_name(self, requested):
        """(parent descriptor, last name, lstat of it) for an operation on the name itself."""
        parent_fd, name = self._parent(requested)
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            self._check_not_protected(st, requested)
        except OSError as problem:
            os.close(parent_fd)
            raise open_error(problem, requested) from None
        except BaseException:
            os.close(parent_fd)
            raise
        return parent_fd, name, st

    def remove(self, requested, recursive=False, user=None):
        """Remove `requested` (never following it): a file, symlink, FIFO or socket; with
        `recursive`, a directory and everything under it (see _TreeRemoval). What was removed
        (Removed; a refusal part-way carries it as `freed`). Blocking: a recursive removal runs
        in a thread. `user`: whose upload of it, running, makes it busy (as for rename)."""
        self._need("delete", requested)
        parent_fd, name, st = self._the_name(requested)
        try:
            if user is not None and _upload_running(parent_fd, server_part_name(name, user)):
                raise Busy(f"{requested}: an upload of it is in progress")
            if not stat.S_ISDIR(st.st_mode):
                try:
                    os.unlink(name, dir_fd=parent_fd)
                except OSError as problem:
                    raise _change_error(problem, requested) from None
                return _freed(st)
            if not recursive:
                raise NotAFile(f"{requested}: is a directory (remove it with rmdir, or recursively)")
            return _TreeRemoval(parent_fd, name, requested, self._protected()).run()
        finally:
            os.close(parent_fd)

    def remove_directory(self, requested):
        """Remove the empty directory `requested` (a partial upload inside counts)."""
        self._need("delete", requested)
        parent_fd, name, st = self._the_name(requested)
        try:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectory(f"{requested}: is not a directory")
            try:
                os.rmdir(name, dir_fd=parent_fd)
            except OSError as problem:
                if problem.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise NotEmpty(f"{requested}: the directory is not empty") from None
                if problem.errno == errno.ENOTDIR:  # swapped for something else meanwhile
                    raise NotADirectory(f"{requested}: is not a directory") from None
                raise _change_error(problem, requested) from None
            return Removed(1)
        finally:
            os.close(parent_fd)

    def rename(self, requested, to, force=False, user=None):
        """Rename `requested` (any kind, never followed) to `to`, in one rename(2). Without
        `force` an existing `to` is never replaced; with it, a file or symlink is, and an empty
        directory by a directory. Needs the rename right, and overwrite to replace. `user`: whose
        running upload of `requested` makes it busy. What was replaced (Removed, 0 names)."""
        self._need("rename", requested)
        source, target = segments(requested), segments(to)
        if not target:
            raise BadPath(f"{to or '.'}: path refused: that is the root")
        from_fd, from_name, st = self._the_name(requested)
        try:
            if stat.S_ISDIR(st.st_mode) and target[: len(source)] == source and target != source:
                raise BadPath(f"{to}: path refused: a directory cannot be moved into itself")
            try:
                to_fd, to_name = self._parent(to)
            except NotFound:
                raise NotFound(f"{to}: the directory does not exist on the server") from None
            try:
                if user is not None and _upload_running(from_fd, server_part_name(from_name, user)):
                    raise Busy(f"{requested}: an upload of it is in progress")
                try:
                    existing = os.stat(to_name, dir_fd=to_fd, follow_symlinks=False)
                except FileNotFoundError:
                    existing = None
                except OSError as problem:
                    raise open_error(problem, to) from None
                if existing is not None:
                    self._check_not_protected(existing, to)
                    if to_name == from_name and _same_file(os.fstat(from_fd), os.fstat(to_fd)):
                        return Removed(0)  # P itself: renamed onto itself, nothing to do
                    if not force:
                        raise Exists(f"{to}: already exists on the server (use --force to replace it)")
                    self._need("overwrite", to)
                    if stat.S_ISDIR(st.st_mode) != stat.S_ISDIR(existing.st_mode):
                        kinds = ("a directory", "a file") if stat.S_ISDIR(st.st_mode) else ("a file", "a directory")
                        raise Exists(f"{to}: {kinds[0]} cannot replace {kinds[1]}")
                try:
                    # Replacing only what was checked, by whom may: a name that appears after
                    # the check is not replaced without the overwrite right.
                    if force and (existing is not None or "overwrite" in self.rights):
                        os.rename(from_name, to_name, src_dir_fd=from_fd, dst_dir_fd=to_fd)
                    else:
                        _rename_noreplace(from_fd, from_name, to_fd, to_name, stat.S_ISDIR(st.st_mode))
                except OSError as problem:
                    replacing = existing is not None and stat.S_ISDIR(existing.st_mode)
                    raise _rename_error(problem, requested, to, replacing) from None
                if existing is None:
                    return Removed(0)
                if _same_file(st, existing):
                    # Two names of one file: rename(2) leaves both, so P would stay. It goes,
                    # as a rename over a file takes P away (force and overwrite were checked).
                    try:
                        os.unlink(from_name, dir_fd=from_fd)
                    except FileNotFoundError:
                        pass
                    except OSError as problem:
                        raise _change_error(problem, requested) from None
                return _freed(existing)._replace(names=0)
            finally:
                os.close(to_fd)
        finally:
            os.close(from_fd)

    def change_mode(self, requested, mode):
        """Set the permission bits of the file or directory `requested` to `mode & 0o777`,
        the owner's read and write (and search, for a directory) kept: the server owns what it
        stores and must keep reading it (a directory it could not read would hide its files
        from the quota count, the sweep and REMOVE). The umask does not apply; a symlink is
        refused, never followed."""
        self._need("chmod", requested)
        parent_fd, name, st = self._the_name(requested)
        try:
            try:
                fd = os.open(name, _INODE_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError as problem:
                raise open_error(problem, requested) from None
            try:
                held = os.fstat(fd)
                if not (stat.S_ISREG(held.st_mode) or stat.S_ISDIR(held.st_mode)):
                    kind = "is a symlink" if stat.S_ISLNK(held.st_mode) else "is not a regular file or a directory"
                    raise NotAFile(f"{requested}: {kind}")
                self._check_not_protected(held, requested)
                mode = (mode & MODE_MASK) | (OWNER_KEEPS_DIRECTORY if stat.S_ISDIR(held.st_mode) else OWNER_KEEPS_FILE)
                if _INODE_FLAGS == os.O_RDONLY | os.O_NONBLOCK:
                    os.fchmod(fd, mode)
                else:
                    # An O_PATH descriptor cannot be fchmod'ed; its /proc name reaches that
                    # very inode, whatever happens to the name meanwhile (and O_PATH needs no
                    # read permission: a mode 000 file can be given its bits back).
                    try:
                        os.chmod(f"/proc/self/fd/{fd}", mode)
                    except FileNotFoundError:  # no /proc (a chroot, a bare container)
                        _fchmod_by_name(parent_fd, name, held, mode)
            except OSError as problem:
                raise _change_error(problem, requested) from None
            finally:
                os.close(fd)
        finally:
            os.close(parent_fd)

    def open_for_hashing(self, requested):
        """The regular file to hash for HASH (needs the read right, refused as GET is)."""
        return self.open_for_sending(requested)

    def space(self):
        """The filesystem of the root: total bytes, bytes free to unprivileged users, free
        inodes (-1 when it has no such limit)."""
        self._need("list", ".")
        root_fd = self._open_root()
        try:
            vfs = os.fstatvfs(root_fd)
        except OSError as problem:
            raise _change_error(problem, ".") from None
        finally:
            os.close(root_fd)
        return {
            "total": vfs.f_blocks * vfs.f_frsize,
            "free": vfs.f_bavail * vfs.f_frsize,
            "files_free": vfs.f_favail if vfs.f_files else -1,
        }


def shown_name(name):
    """A name from the disk as a message may carry it (bytes that are not UTF-8 replaced)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _same_file(one, other):
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def _change_error(problem, shown):
    """The refusal for an OSError met while changing the tree (removing, renaming, chmod)."""
    if problem.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"{shown}: permission denied on the server")
    if problem.errno == errno.ENOENT:
        return NotFound(f"{shown}: no such file on the server")
    if problem.errno == errno.EBUSY:
        return Busy(f"{shown}: in use on the server")
    return storage_error(problem, shown)


def _rename_error(problem, requested, to, replacing):
    if problem.errno in (errno.ENOTEMPTY, errno.EEXIST) and replacing:
        return NotEmpty(f"{to}: the directory is not empty")
    if problem.errno == errno.EEXIST:
        return Exists(f"{to}: already exists on the server (use --force to replace it)")
    if problem.errno in (errno.EISDIR, errno.ENOTDIR):
        return Exists(f"{to}: a file and a directory cannot replace each other")
    if problem.errno == errno.EINVAL:
        return BadPath(f"{to}: path refused: a directory cannot be moved into itself")
    if problem.errno == errno.EXDEV:
        return PermissionDenied(f"{requested}: cannot be moved to {to}: another filesystem on the server")
    if problem.errno == errno.ENOENT:
        return NotFound(f"{requested}: no such file on the server")
    return _change_error(problem, requested)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(from_fd, from_name, to_fd, to_name, is_directory):
    """rename(2) that never replaces `to_name` (EEXIST instead): renameat2(RENAME_NOREPLACE)."""
    from .files import _libc_function

    renameat2 = _libc_function("renameat2", ("c_int", "c_char_p", "c_int", "c_char_p", "c_uint"))
    if renameat2 is not None:
        import ctypes

        if renameat2(from_fd, os.fsencode(from_name), to_fd, os.fsencode(to_name), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # EINVAL: a filesystem without the flag
            raise OSError(code, os.strerror(code), to_name)
    # Without renameat2: a file is linked to its new name (link never replaces) and then
    # unlinked from the old, so both names exist for a moment, but nothing is replaced. A
    # directory cannot be linked: its new name is checked first, then renamed, and a name made
    # between the check and the rename (by another user or process) would be replaced, if it
    # is an empty directory (rename(2) refuses every other case). That race is this fallback's.
    if not is_directory:
        try:
            os.link(from_name, to_name, src_dir_fd=from_fd, dst_dir_fd=to_fd, follow_symlinks=False)
        except OSError as problem:
            if problem.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
        else:
            os.unlink(from_name, dir_fd=from_fd)
            return
    try:
        os.stat(to_name, dir_fd=to_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(from_name, to_name, src_dir_fd=from_fd, dst_dir_fd=to_fd)
        return
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), to_name)


def _upload_running(dir_fd, part_name):
    """True when the partial upload `part_name` in `dir_fd` is locked by an upload now."""
    import fcntl

    try:
        fd = os.open(part_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class _TreeRemoval:
    """REMOVE with `recursive` of the directory `name` in `parent_fd`: everything under it,
    depth first, then itself. Blocking (run it in a thread).

    Confinement: each directory is entered from its parent's descriptor with O_NOFOLLOW, so a
    directory swapped for a symlink during the walk fails to open and only the link is
    removed; the walk never leaves the tree. Each directory is held by a descriptor while its
    subdirectories are removed (the deepest HELD of them at once; a shallower one whose
    descriptor was let go is opened again the same way, name by name, from the nearest one
    held). Bounded memory: a directory is read in passes of at most BATCH subdirectory names.

    Left in place, with their directories: partial uploads locked by a running upload (Busy
    once the rest is removed) and the server's own files (BadPath)."""

    BATCH = 1024
    HELD = 64
    ATTEMPTS = 3  # passes over a directory that files keep appearing in

    def __init__(self, parent_fd, name, shown, protected):
        self.parent_fd = parent_fd
        self.shown = shown
        self.protected = protected
        self.removed = 0
        self.freed = Removed(0)  # the regular files among what was removed (names counted apart)
        self.left = None  # the first refusal for something left in place
        self.frames = [_Frame(name, self._enter(parent_fd, name, shown))]

    def _enter(self, parent_fd, name, shown):
        try:
            return _open_directory_nofollow(name, parent_fd)
        except OSError as problem:
            if problem.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Busy(f"{shown}: it was replaced while it was being removed; try again") from None
            raise _change_error(problem, shown) from None

    def _path(self, depth, name=None):
        parts = [self.shown.rstrip("/")] + [shown_name(frame.name) for frame in self.frames[1 : depth + 1]]
        if name is not None:
            parts.append(shown_name(name))
        return "/".join(parts)

    def _fd(self, depth):
        """The descriptor of the directory at `depth`, opened again if it was let go (a tree
        may be thousands deep: see open_path)."""
        return open_path(
            self.frames, depth, self.parent_fd,
            lambda parent, level: self._enter(parent, self.frames[level].name, self._path(level)), self.HELD,
        )

    def run(self):
        """What was removed (Removed); or the refusal, carrying what was removed before it as
        `freed` (it stays removed)."""
        try:
            while self.frames:
                self._step()
        except EketwistError as refusal:
            refusal.freed = self.result()
            raise
        finally:
            for frame in self.frames:
                if frame.fd is not None:
                    os.close(frame.fd)
        if self.left is not None:
            self.left.freed = self.result()
            raise self.left
        return self.result()

    def result(self):
        return self.freed._replace(names=self.removed)

    def _step(self):
        depth = len(self.frames) - 1
        frame = self.frames[depth]
        directory = self._fd(depth)
        if not frame.pending and frame.more:
            self._read(frame, directory, depth)
        while frame.pending:
            name = frame.pending.pop()
            try:
                fd = _open_directory_nofollow(name, directory)
            except OSError as problem:
                if problem.errno == errno.ENOENT:
                    continue
                if problem.errno in (errno.ELOOP, errno.ENOTDIR):
                    # No longer a directory (swapped for a symlink, or anything else): it is
                    # removed as itself, never entered.
                    self._remove_entry(frame, directory, name, depth)
                    continue
                raise _change_error(problem, self._path(depth, name)) from None
            self.frames.append(_Frame(name, fd))
            hold_at_most(self.frames, self.HELD)
            return
        if frame.more:
            return  # another pass over this directory
        # Everything it held is removed (or left): the directory itself goes.
        shown = self._path(depth)
        self.frames.pop()
        os.close(directory)
        frame.fd = None
        parent = self._fd(depth - 1) if depth else self.parent_fd
        if frame.kept:
            if depth:
                self.frames[depth - 1].kept = True
                self.frames[depth - 1].skip.add(frame.name)
            return
        try:
            os.rmdir(frame.name, dir_fd=parent)
        except OSError as problem:
            if problem.errno in (errno.ENOTEMPTY, errno.EEXIST) and frame.attempts < self.ATTEMPTS:
                # Something appeared in it meanwhile (an upload committed there): once more.
                frame.more, frame.attempts = True, frame.attempts + 1
                frame.fd = self._enter(parent, frame.name, shown)
                self.frames.append(frame)
                return
            if problem.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Busy(f"{shown}: files keep appearing in it; the rest was removed") from None
            if problem.errno != errno.ENOENT:
                raise _change_error(problem, shown) from None
        else:
            self.removed += 1

    def _read(self, frame, directory, depth):
        """One pass over a directory: everything but directories removed, the names of up to
        BATCH subdirectories kept for the walk (more: another pass follows)."""
        frame.more = False
        with os.scandir(directory) as scan:
            for child in scan:
                if child.name in frame.skip:
                    continue
                try:
                    is_directory = child.is_dir(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                if is_directory:
                    if len(frame.pending) >= self.BATCH:
                        frame.more = True
                        continue
                    frame.pending.append(child.name)
                else:
                    self._remove_entry(frame, directory, child.name, depth)

    def _remove_entry(self, frame, directory, name, depth):
        """Unlink one name that is not a directory, unless it must stay."""
        try:
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as problem:
            raise _change_error(problem, self._path(depth, name)) from None
        if stat.S_ISDIR(st.st_mode):  # a directory again: entered on the next pass
            frame.more = True
            return
        if (st.st_dev, st.st_ino) in self.protected:
            self._keep(frame, name, BadPath(f"{self._path(depth, name)}: path refused: left in place"))
            return
        if name.startswith(SERVER_PART_PREFIX) and stat.S_ISREG(st.st_mode):
            try:
                unlinked = _unlink_unless_locked(directory, name)
            except OSError as problem:
                raise _change_error(problem, self._path(depth, name)) from None
            if not unlinked:
                self._keep(frame, name, Busy(
                    f"{self._path(depth)}: an upload into it is in progress; the rest was removed"
                ))
            elif unlinked is not _GONE:  # (gone meanwhile: nothing of it was removed here)
                self.removed += 1
                self.freed += _freed(unlinked)
            return
        try:
            os.unlink(name, dir_fd=directory)
        except FileNotFoundError:
            return
        except OSError as problem:
            raise _change_error(problem, self._path(depth, name)) from None
        self.removed += 1
        self.freed += _freed(st)

    def _keep(self, frame, name, refusal):
        frame.skip.add(name)
        frame.kept = True
        if self.left is None:
            self.left = refusal


class _Frame:
    """A directory of _TreeRemoval's walk: its name in its parent, its descriptor (None
    while let go), what it still has to enter."""

    def __init__(self, name, fd):
        self.name = name
        self.fd = fd
        self.pending = []  # subdirectory names read and not yet entered
        self.more = True  # a pass over it is due
        self.kept = False  # something in it stays: it stays too
        self.skip = set()  # names left in place (not read again)
        self.attempts = 0


def _unlink_unless_locked(directory, name):
    """Remove the partial upload `name` unless an upload holds its lock: the lstat of what was
    removed (a stat of size 0 if it was already gone); False if an upload holds it (or it
    became another file meanwhile: a committed upload's file, a new upload's part file)."""
    import fcntl

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        return _GONE
    except OSError:
        gone = os.stat(name, dir_fd=directory, follow_symlinks=False)
        os.unlink(name, dir_fd=directory)  # not ours to open: not an upload's either
        return gone
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        # As in _remove_if_stale: only the file locked here, still under its name, is removed.
        held = os.fstat(fd)
        try:
            named = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return _GONE
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return False
        os.unlink(name, dir_fd=directory)
        return held
    finally:
        os.close(fd)


# What _unlink_unless_locked says for a name already gone: nothing of it counts.
_GONE = os.stat_result((stat.S_IFDIR, 0, 0, 0, 0, 0, 0, 0, 0, 0))


class _WalkedDirectory:
    """A directory of walk_entries: its parent and name (a chain to the top, no path kept),
    and its descriptor while it is held."""

    __slots__ = ("parent", "name", "depth", "fd")

    def __init__(self, parent, name, fd=None):
        self.parent = parent
        self.name = name
        self.depth = parent.depth + 1 if parent is not None else 0
        self.fd = fd

    def names(self):
        chain = []
        node = self
        while node.parent is not None:
            chain.append(node.name)
            node = node.parent
        return tuple(reversed(chain))


# Directory descriptors walk_entries holds at most along its current path (deeper walks open
# the shallower ones again from the nearest held one when they come back up).
WALK_HELD = 64


def walk_entries(root, unreadable=None):
    """(directory descriptor, entry) for everything under `root` that is not a directory.
    Blocking (run it in a thread). Depth first, by descriptors, iteratively (no recursion
    limit), never through a symlink; each directory is opened from its parent's descriptor,
    held along the current path (WALK_HELD at most), so that a tree costs about one open per
    directory however deep it is, and what waits to be visited is a parent and a name each.
    What is gone meanwhile is passed over; a directory that cannot be read otherwise is given
    to `unreadable` (its names from the top). The descriptor is valid until the next entry is
    asked for."""
    try:
        top = _WalkedDirectory(None, None, os.open(root, _DIRECTORY_FLAGS))
    except OSError:
        return
    held = [top]  # the current path's directories, the top first; some may have let go
    pending = [top]
    try:
        while pending:
            node = pending.pop()
            try:
                directory = _walk_held(held, node)
            except OSError as problem:
                # Gone, or swapped for a symlink since it was seen (ELOOP), or unreadable.
                if unreadable is not None and isinstance(problem, PermissionError):
                    unreadable(node.names())
                continue
            try:
                with os.scandir(directory) as scan:
                    for child in scan:
                        if child.is_dir(follow_symlinks=False):
                            pending.append(_WalkedDirectory(node, child.name))
                        else:
                            yield directory, child
            except PermissionError:
                if unreadable is not None:
                    unreadable(node.names())
            except OSError:
                pass
    finally:
        for node in held:
            if node.fd is not None:
                os.close(node.fd)


def _walk_held(held, node):
    """`node`'s descriptor, `held` made the path to it: what is not on that path closed, the
    missing levels opened from the nearest one held (O_NOFOLLOW each), WALK_HELD at most."""
    while held[-1] is not node and not _is_ancestor(held[-1], node):
        leaving = held.pop()
        if leaving.fd is not None:
            os.close(leaving.fd)
            leaving.fd = None
    chain = []
    step = node
    while step is not held[-1]:
        chain.append(step)
        step = step.parent
    held.extend(reversed(chain))
    # held[0], the top, is never let go: no base above it is needed.
    return open_path(held, len(held) - 1, None, lambda parent, level: _open_directory_nofollow(held[level].name, parent),
                     WALK_HELD - 1, first=1)


def _is_ancestor(candidate, node):
    step = node.parent
    while step is not None and step.depth >= candidate.depth:
        if step is candidate:
            return True
        step = step.parent
    return False


def open_path(path, depth, base_fd, open_level, limit, first=0):
    """The descriptor of path[depth], in a path of directories (objects with `fd`, None when
    let go): the levels let go opened again one by one from the nearest one held (`base_fd`
    above path[0]), by `open_level(parent_fd, level)`, no recursion, each kept as the next
    steps need them, at most `limit` held from path[first] on (see hold_at_most)."""
    start = depth
    while start > 0 and path[start - 1].fd is None:
        start -= 1
    parent = path[start - 1].fd if start else base_fd
    for level in range(start, depth + 1):
        if path[level].fd is None:
            path[level].fd = open_level(parent, level)
            hold_at_most(path[: level + 1], limit, first)
        parent = path[level].fd
    return path[depth].fd


def hold_at_most(path, limit, first=0):
    """Let go of the shallowest descriptors held in path[first:] past `limit`, never the last
    one's: open_path opens them again when they are needed."""
    open_ones = [node for node in path[first:-1] if node.fd is not None]
    held = len(open_ones) + (path[-1].fd is not None)
    for node in open_ones[: max(0, held - limit)]:
        os.close(node.fd)
        node.fd = None


def remove_stale_parts(root, max_age, now):
    """Delete partial uploads under `root` untouched for `max_age` seconds and not in use; what
    was removed (Removed). Blocking (run it in a thread); opens nothing that is not a regular
    file (a FIFO with the reserved name must not hang it)."""
    removed = Removed(0)
    for directory, child in walk_entries(root):
        if child.name.startswith(SERVER_PART_PREFIX):
            removed += _remove_if_stale(directory, child.name, max_age, now)
    return removed


def _remove_if_stale(directory, name, max_age, now):
    nothing = Removed(0)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return nothing
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < max_age:
            return nothing
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while an upload holds it
        # Between the open and the lock, an upload may have resumed the file and renamed it
        # into place, or removed it: the name may now be another upload's part file (see
        # files.PartFile._open_part). Only the file locked here, still stale, is removed.
        st = os.fstat(fd)
        named = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino) or now - st.st_mtime < max_age:
            return nothing
        os.unlink(name, dir_fd=directory)
        return _freed(st)
    except OSError:
        return nothing
    finally:
        os.close(fd)
