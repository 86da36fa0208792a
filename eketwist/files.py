"""Files received whole or not at all, and the digests of files sent.

No network here. Both sides receive through `PartFile`, which only ever creates the final name
by renaming a complete, verified file, and which can be resumed. (Where a peer's paths lead on
the server's disk is eketwist.storage's job.)
"""

import collections
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import queue
import stat
import threading

from .errors import (
    Busy,
    EketwistError,
    Exists,
    IntegrityError,
    LocalIOError,
    NoSpace,
    PermissionDenied,
)
from .wire import PERMISSION_BITS

CLIENT_PART_SUFFIX = ".part"
# On the server's part files: what they will become, and for whom (JSON), so that their owner
# can see them (`ls -a`) and no one else.
PART_LABEL = "user.eketwist.upload"
# The server keeps partial uploads beside their destination under this prefix; such names are
# never listed, sent or accepted as upload targets.
SERVER_PART_PREFIX = ".eke-part."
HASH_BLOCK = 1 << 20
MODE_MASK = PERMISSION_BITS


def server_part_name(name, user):
    """The name under which the server keeps a partial upload of `name` for `user`, beside
    it: findable again by the same user for the same name, distinct for different users."""
    digest = hashlib.sha256(user.encode("utf-8") + b"\0" + name.encode("utf-8", "surrogateescape"))
    return SERVER_PART_PREFIX + digest.hexdigest()[:32]


def read_part_label(dir_fd, name):
    """The label of the part file `name` in `dir_fd` (a dict), or None: not a regular file,
    no label, or not ours to read. Opens without following a link, without blocking."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        label = json.loads(os.getxattr(fd, PART_LABEL))
        return {**label, "stat": st} if isinstance(label, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def hash_prefix(handle, length, cancelled=None):
    """SHA-1 state over the first `length` bytes of an open file, or None if it is shorter.
    Runs in a thread: hashlib releases the GIL on large buffers. `cancelled()`, asked before
    each block: true stops it (Cancelled)."""
    sha1 = hashlib.sha1()
    handle.seek(0)
    remaining = length
    buffer = bytearray(min(HASH_BLOCK, max(length, 1)))
    view = memoryview(buffer)
    while remaining:
        if cancelled is not None and cancelled():
            raise Cancelled("the hash was no longer wanted")
        got = handle.readinto(view[: min(remaining, len(buffer))])
        if not got:
            return None
        sha1.update(view[:got])
        remaining -= got
    return sha1


class Cancelled(EketwistError):
    """The work was no longer wanted (its connection had gone)."""


def hash_whole(handle, shown_name="the file", attempts=3, cancelled=None):
    """(stat, hex SHA-1) of an open regular file, read whole, with the stat it had throughout;
    a file that keeps changing while it is read is Busy. Runs in a thread; see hash_prefix for
    `cancelled`."""
    for _ in range(attempts):
        before = os.fstat(handle.fileno())
        sha1 = hash_prefix(handle, before.st_size, cancelled)
        after = os.fstat(handle.fileno())
        if sha1 is not None and DigestCache.key(before) == DigestCache.key(after):
            return after, sha1.hexdigest()
    raise Busy(f"{shown_name}: the file keeps changing while it is read; try again")


def hash_file_prefix(path, length, dir_fd=None):
    """hash_prefix over a file opened here (None if it is gone or shorter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        try:
            return hash_prefix(handle, length)
        except OSError:
            return None


def storage_error(problem, shown_name, local=False):
    """The error a failed file operation reports: on a server, what the client is told; on
    the client (`local`), one that says the problem is on this machine."""
    if local:
        if problem.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(f"local {shown_name}: no space left on this disk")
        if problem.errno == errno.EFBIG:
            return NoSpace(f"local {shown_name}: file too large for this filesystem")
        return LocalIOError(f"local {shown_name}: {problem.strerror}")
    if problem.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{shown_name}: no space left on the receiving disk")
    if problem.errno == errno.EFBIG:
        return NoSpace(f"{shown_name}: file too large for the receiving system")
    if isinstance(problem, PermissionError):
        return PermissionDenied(f"{shown_name}: permission denied")
    return LocalIOError(f"{shown_name}: {problem.strerror}")


def _fsync_directory(directory, dir_fd=None):
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DigestCache:
    """SHA-1s of files already read whole, keyed by what changes when a file does (device,
    inode, size, modification and change times), least recently used forgotten first.

    A file served again is then sent without hashing it again. Should its bytes differ from
    the cached digest without any of those changing (a disk error), the client's check fails
    and nothing is written: the cache can only turn a silent corruption into a refusal.
    """

    def __init__(self, max_entries=4096):
        self.max_entries = max_entries
        self._digests = collections.OrderedDict()

    @staticmethod
    def key(st):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, st):
        key = self.key(st)
        digest = self._digests.get(key)
        if digest is not None:
            self._digests.move_to_end(key)
        return digest

    def put(self, st, digest):
        key = self.key(st)
        self._digests[key] = digest
        self._digests.move_to_end(key)
        while len(self._digests) > self.max_entries:
            self._digests.popitem(last=False)


class WriteBehind:
    """Writes chunks (immutable bytes) to a file in a worker thread, in order. Never blocks
    its owner: `submit` says when the worker is behind, and `when_caught_up` calls back once
    it is not (the owner, a protocol machine, stops reading its peer meanwhile; blocking the
    reactor instead would stall every connection of the daemon on one slow disk).

    The receiving side hashes each record as soon as it is decrypted, while it is still in the
    CPU cache, and leaves the copy into the page cache to this thread (measured: a 1 GiB get
    went from 1.8 s to 1.25 s against hashing in the worker). File writes release the GIL, so
    the worker runs beside the reactor thread's network and AES work. A C-level SimpleQueue
    and a plain lock rather than queue.Queue, whose Condition costs several lock operations
    and thread wake-ups per chunk (measured 6% on a 1 GiB get).
    """

    # Behind: more than this many chunks not yet written. One record (up to 2 MiB) being
    # written while the next is decrypted keeps the disk busy (measured: 2 was no faster,
    # and kept 4 MiB more of the server's heap).
    QUEUE_DEPTH = 1

    def __init__(self, file):
        self._file = file
        self._error = None
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet written (or dropped)
        self._caught_up = None  # the callback waiting for _pending to fall to QUEUE_DEPTH
        self._dropping = False  # let go without writing what is queued
        self._owns_file = False  # let go: the worker closes the file when done
        self.done = threading.Event()  # set when the worker has stopped
        self._ended = False  # no more chunks: the worker stops once it has written them
        self._finished = False  # the worker has stopped (under _lock, with _owns_file)
        _WORKERS.run(self._run)

    def _run(self):
        next_chunk, write = self._chunks.get, self._file.write
        flusher = None
        while (chunk := next_chunk()) is not None:
            if self._error is None and not self._dropping:
                try:
                    written = write(chunk)
                    if written != len(chunk):  # short writes are rare: no view unless needed
                        view = memoryview(chunk)[written:]
                        while view:
                            view = view[write(view):]
                    if flusher is None:
                        flusher = _RangeFlusher(self._file.fileno(), self._file.tell() - len(chunk))
                    flusher.wrote(len(chunk))
                except BaseException as problem:  # reported to the owner at its next call
                    self._error = problem
            # Free the record now, not when the next one arrives: while the reactor decrypts
            # that one, this one would otherwise be a third record-sized buffer in the heap.
            del chunk
            with self._lock:
                self._pending -= 1
                callback = None
                if self._pending <= self.QUEUE_DEPTH:
                    callback, self._caught_up = self._caught_up, None
            if callback is not None:
                callback()
        with self._lock:  # let_go() may be deciding who closes the file right now
            close_here = self._owns_file
            self._finished = True
        if close_here:
            self._file.close()  # here: the owner may not close a descriptor this thread writes to
        self.done.set()

    def _raise(self):
        if self._error is not None:
            raise self._error

    def submit(self, chunk):
        """Queue `chunk`; True when the worker is now behind (see when_caught_up)."""
        self._raise()
        with self._lock:
            self._pending += 1
            behind = self._pending > self.QUEUE_DEPTH
        self._chunks.put(chunk)
        return behind

    def when_caught_up(self, callback):
        """Call `callback()` once the worker is no longer behind: at once if it is not, else
        from the worker thread (the owner moves it to its own thread)."""
        with self._lock:
            if self._pending > self.QUEUE_DEPTH:
                self._caught_up = callback
                return
        callback()

    def end(self):
        """No more chunks: the worker goes back to its pool once it has written them (close()
        then only waits for that). Does not wait."""
        if not self._ended:
            self._ended = True
            self._chunks.put(None)

    def close(self):
        """Wait until every chunk is written; raise the first error, if any."""
        self.end()
        self.done.wait()
        self._raise()

    def let_go(self, write_rest):
        """Stop using this writer without waiting for it (a slow disk then holds up nobody):
        it writes what is queued (or, without `write_rest`, drops it), then closes the file."""
        with self._lock:
            self._dropping = not write_rest
            self._owns_file = True
            finished = self._finished
        self.end()
        if finished:  # the worker has stopped without closing it: nothing writes to it any more
            self._file.close()


class _Workers:
    """Threads that each run one function at a time and then wait for the next, instead of a
    thread started (and joined) per file: a tree of small files was paying that for each one
    (measured with py-spy on a 1,000-file put -r: thread start and join were the server's
    largest cost after the writes). At most KEEP_IDLE wait; more are started when needed."""

    KEEP_IDLE = 16

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: list = []  # the job queues of waiting threads

    def run(self, function):
        with self._lock:
            jobs = self._idle.pop() if self._idle else None
        if jobs is None:
            jobs = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(jobs,), name="eketwist-write", daemon=True).start()
        jobs.put(function)

    def _serve(self, jobs):
        while True:
            jobs.get()()
            with self._lock:
                if len(self._idle) >= self.KEEP_IDLE:
                    return
                self._idle.append(jobs)


_WORKERS = _Workers()


class _RangeFlusher:
    """Has the kernel write a large file's bytes to disk as they come, so that the fsync
    before its rename has little left to do: each FLUSH_EVERY bytes written start their
    writeback (sync_file_range, asynchronous), and the range before them is waited for, which
    also keeps a fast network from piling up dirty pages the disk cannot take. Without
    sync_file_range (not Linux) it does nothing, and the final fsync does it all."""

    FLUSH_EVERY = 16 * 1024 * 1024
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE
    _WAIT_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, fd, offset):
        self.fd = fd
        self.start = offset  # of the range not yet handed to the kernel
        self.end = offset
        self.previous = None  # (start, length) of the range whose writeback was started

    def wrote(self, nbytes):
        """`nbytes` more are written. Raises the OSError of a failed writeback: waiting for a
        range consumes its error, which the final fsync would then not see."""
        self.end += nbytes
        if self.end - self.start < self.FLUSH_EVERY:
            return
        call = self._sync_file_range()
        if call is None:
            return
        _check(call(self.fd, self.start, self.end - self.start, self._WRITE))
        if self.previous is not None:
            _check(call(self.fd, *self.previous, self._WAIT_ALL))
        self.previous = (self.start, self.end - self.start)
        self.start = self.end

    @staticmethod
    def _sync_file_range():
        return _libc_function("sync_file_range", ("c_int", "c_int64", "c_int64", "c_uint"))


def _check(result):
    """A libc call's result: its errno as an OSError when it failed."""
    if result != 0:
        import ctypes

        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


class PartFile:
    """Receives one file into a part file beside its destination, hashing as it goes.

    The part file may already hold the start of the file from an interrupted transfer: `size`
    says how much, `prefix_sha1()` hashes it, and `resume(sha1)` continues after it (or
    `restart()` empties it). `finish` checks size and SHA-1, fsyncs, renames into place;
    `abort` removes the part file, unless asked to keep it, and closes it. The destination name is
    never created or replaced by an incomplete file. With `lock`, the part file is locked (flock)
    from its opening until it is closed, and its name is renamed or removed only meanwhile.

    With `dir_fd`, `destination` and `part` are names in that directory (the server's way: no
    path string is resolved again); the PartFile keeps its own descriptor of it. `label`, if
    given, is kept on the part file as an extended attribute (PART_LABEL) while it is one, and
    removed before it takes the destination's name.
    """

    def __init__(self, destination, part, shown_name=None, *, lock=False, private=False, dir_fd=None, label=None,
                 write_in_place=0, local=False):
        """`private`: an existing part file is used only when it is a regular file of ours,
        with no other name (a hard link would make us read and write another file), that no
        one else can write: in a directory others may write to, someone may have put anything
        under the part file's name.

        `write_in_place`: the file's first bytes, up to this many, are written by the caller's
        thread rather than a worker's: copying a few KiB into the page cache costs less than
        handing them to a worker and waiting for it at the end (measured on the client: that
        hand-over was most of a 1,000-file tree's time). A client serves no one else; a server leaves it at 0, so that a disk that
        stalls holds up only its own uploader, never the reactor.

        `local`: the client's own file; its errors say so (see storage_error)."""
        self.destination = destination
        self._local = local
        self.part = part
        self.shown_name = shown_name or os.path.basename(destination)
        self._dir_fd = None
        try:
            if dir_fd is not None:
                self._dir_fd = os.dup(dir_fd)
            fd = self._open_part(lock)
        except OSError as problem:
            self._close_directory()
            raise storage_error(problem, self.shown_name, self._local) from None
        except Busy:
            self._close_directory()
            raise
        if private:
            # Checked on the descriptor: another user's part file would read our download.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_nlink != 1:
                os.close(fd)
                self._close_directory()
                raise LocalIOError(
                    f"{part}: refusing to use it: not a regular file of yours alone (another owner, another "
                    "name for the same file, or writable by others); remove it"
                )
        os.set_blocking(fd, True)
        if label is not None:
            try:
                os.setxattr(fd, PART_LABEL, label)
            except OSError:
                pass  # a filesystem without user attributes: the part file is just not labelled
        self._labelled = label is not None
        self._file = os.fdopen(fd, "r+b", buffering=0)
        self._named = True  # the part file's name is ours: renamed or removed by us alone
        self.size = os.fstat(fd).st_size
        self._sha1 = hashlib.sha1()
        self._writer = None
        self._write_in_place = write_in_place
        self.stored = None  # after finish: the stat of the file under its final name
        self.reservation = None  # the room a quota holds for it (storage.Root.receive's)
        self.may_replace = False  # set by storage.Root.receive: whether its commit may replace
        # What the transfer left on the disk (a server's quotas count it): renamed into place,
        # replacing `replaced` (the lstat of what the name held, or None); or, given up,
        # `kept` for a resume (else removed).
        self.renamed = False
        self.replaced = None
        self.kept = False
        self._closing_writer = None  # let go by abort, still writing or closing

    # Attempts at locking the part file while its holders keep giving it up (each attempt that
    # fails means another transfer has finished with it meanwhile).
    LOCK_ATTEMPTS = 8

    def _open_part(self, lock):
        """The part file's descriptor, created if need be; with `lock`, locked (flock), and
        still under its name once locked.

        Whoever holds the lock owns the name: it is renamed into place or removed only by its
        holder, before the lock goes (see rename and abort). A descriptor opened just before
        that, and locked just after, is a file that is no longer the part file: the final
        file, or one removed. Locking it would have us empty and rewrite the final file in
        place, then fail to rename a name that is gone. So the name is looked up again once
        the lock is held, and the part file opened again (or created) if it is not ours."""
        # O_NONBLOCK: a FIFO under that name must not hang us (it is refused by the caller).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(self.LOCK_ATTEMPTS if lock else 1):
            fd = os.open(self.part, flags, 0o600, dir_fd=self._dir_fd)
            if not lock:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy() from None
            try:
                held = os.fstat(fd)
                named = os.stat(self.part, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                named = None
            except BaseException:
                os.close(fd)
                raise
            if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # renamed or removed by the transfer that held it: open the name again
        raise self._busy()

    def stat(self):
        """The part file's own stat (the file held, whatever its name now is)."""
        return os.fstat(self._file.fileno())

    def _busy(self):
        where = "local " if self._local else ""
        return Busy(f"{where}{self.shown_name}: another transfer to this file is in progress")

    def _drain(self):
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError as problem:
                raise storage_error(problem, self.shown_name, self._local) from None

    def prefix_hasher(self):
        """A function, for a thread, giving the SHA-1 state over what the part file holds now
        (for a resume), or None. It reads through descriptors of its own, taken here: `abort`
        may close ours meanwhile, and a closed descriptor's number may be reused."""
        size, part = self.size, self.part
        dir_fd = None if self._dir_fd is None else os.dup(self._dir_fd)

        def hash_prefix_now():
            try:
                return hash_file_prefix(part, size, dir_fd=dir_fd)
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)

        return hash_prefix_now

    def resume(self, sha1):
        self._drain()
        self._file.seek(self.size)
        self._sha1 = sha1

    def restart(self):
        self._drain()
        if self.size:  # an empty part file (a new one) needs no system call
            self._file.seek(0)
            self._file.truncate(0)
        self.size = 0
        self._sha1 = hashlib.sha1()

    def write(self, data):
        """Queue `data` (bytes) to be written and hashed; a write error from an earlier chunk
        is raised here or by `finish`. Returns True when the disk is behind: the caller should
        stop feeding until `when_caught_up` calls back.

        The first `write_in_place` bytes (see __init__) are written at once."""
        try:
            self._sha1.update(data)
            if self._writer is None and self.size + len(data) <= self._write_in_place:
                view, write = memoryview(data), self._file.write
                while view:
                    view = view[write(view):]
                behind = False
            else:
                if self._writer is None:
                    self._writer = WriteBehind(self._file)
                behind = self._writer.submit(data)
        except OSError as problem:
            raise storage_error(problem, self.shown_name, self._local) from None
        self.size += len(data)
        return behind

    def when_caught_up(self, callback):
        """`callback()` once the disk has caught up: at once, or later from another thread."""
        if self._writer is None:
            callback()
        else:
            self._writer.when_caught_up(callback)

    def finish(self, expected_size, expected_sha1, mtime=None, mode=None, replace=True):
        """Verify and rename into place; return the hex SHA-1. On failure nothing is renamed.

        With replace=False an existing destination is never overwritten, even one that
        appeared during the transfer (Exists). (GroupCommit does the same for many files.)"""
        digest = self.verify(expected_size, expected_sha1)
        self.commit(mtime, mode, replace)
        self.sync_directory()
        return digest

    def written(self):
        """Every byte has come: the write-behind worker, if any, is let go once it has written
        them (verify() then finds it done), rather than held until verify()."""
        if self._writer is not None:
            self._writer.end()

    def verify(self, expected_size, expected_sha1):
        """The hex SHA-1 once every byte is written and size and digest match; else the part
        file is removed and IntegrityError raised."""
        try:
            self._drain()
        except EketwistError:
            self.abort()
            raise
        digest = self._sha1.digest()
        if self.size != expected_size or not hmac.compare_digest(digest, expected_sha1):
            self.abort()
            what = "size" if self.size != expected_size else "SHA-1"
            raise IntegrityError(f"{self.shown_name}: {what} does not match; nothing was written")
        return digest.hex()

    def commit(self, mtime=None, mode=None, replace=True):
        """After verify: flush the file and give it its name. Its directory still needs
        sync_directory() before the name is durable."""
        self.settle(mtime, mode)
        self.flush()
        self.rename(replace)

    def settle(self, mtime=None, mode=None):
        """After verify: the file's final mode and mtime, and no label (see commit)."""
        with self._failing_keeps_part():
            fd = self._file.fileno()
            if self._labelled:
                try:
                    os.removexattr(fd, PART_LABEL)
                except OSError:
                    pass  # never set
            os.fchmod(fd, local_mode(0o666 if mode is None else mode))
            if mtime is not None:
                os.utime(fd, (mtime, mtime))

    def flush(self):
        """After settle: the file's bytes on disk (see commit)."""
        with self._failing_keeps_part():
            os.fsync(self._file.fileno())

    def fileno(self):
        return self._file.fileno()

    def rename(self, replace=True):
        """After flush (or a flush of the whole filesystem since settle): the file under its
        name. With replace=False an existing name is never overwritten (Exists)."""
        with self._failing_keeps_part():
            # Renamed before the file is closed, which releases its lock: the part file's name
            # is ours until it is gone (see _open_part).
            at = {"src_dir_fd": self._dir_fd, "dst_dir_fd": self._dir_fd}
            if replace:
                try:
                    self.replaced = os.stat(self.destination, dir_fd=self._dir_fd, follow_symlinks=False)
                except OSError:
                    self.replaced = None
                os.replace(self.part, self.destination, **at)
            else:
                os.link(self.part, self.destination, follow_symlinks=False, **at)  # no clobbering
                os.unlink(self.part, dir_fd=self._dir_fd)
            self._named = False
            self.renamed = True
            self._file.close()

    @contextlib.contextmanager
    def _failing_keeps_part(self):
        try:
            yield
        except FileExistsError:
            self.abort(keep_part=True)
            raise Exists(f"{self.shown_name}: already exists (use --force to replace it)") from None
        except OSError as problem:
            self.abort(keep_part=True)
            raise storage_error(problem, self.shown_name, self._local) from None

    def directory_key(self):
        """What identifies the directory the file is named in (files that share it share one
        directory flush)."""
        if self._dir_fd is not None:
            try:
                st = os.fstat(self._dir_fd)
            except OSError as problem:
                raise storage_error(problem, self.shown_name, self._local) from None
            return st.st_dev, st.st_ino
        return os.path.dirname(os.path.abspath(self.destination))

    def sync_directory(self, already_synced=False):
        """After commit: flush the directory holding the new name (unless a flush since the
        rename has done so), then note the file's stat in `stored`."""
        try:
            if not already_synced:
                _fsync_directory(os.path.dirname(os.path.abspath(self.destination)), self._dir_fd)
            self.stored = os.stat(self.destination, dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError as problem:
            raise storage_error(problem, self.shown_name, self._local) from None
        finally:
            self._close_directory()

    def abort(self, keep_part=False):
        """Give up on the file: nothing is renamed. Does not wait for the disk: the writer
        finishes what is queued (kept for a resume) or drops it, then closes the file, which
        releases its lock; `wait_until_closed` waits for that."""
        if not keep_part and self._named:
            # Removed while the lock is still held (see _open_part): once it is released, the
            # name may be another transfer's part file.
            try:
                os.unlink(self.part, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
        if self._named:
            self.kept = keep_part
        self._named = False
        writer, self._writer = self._writer, None
        if writer is not None:
            self._closing_writer = writer
            writer.let_go(write_rest=keep_part)
        elif not self._file.closed:
            self._file.close()
        self._close_directory()

    def _close_directory(self):
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def wait_until_closed(self, timeout=None):
        """After `abort`: True once the file is closed (what was kept is on disk)."""
        writer = self._closing_writer
        return writer is None or writer.done.wait(timeout)


def local_mode(mode):
    """The permission bits to give a file or directory the peer sent with `mode`: never more
    than MODE_MASK, and never more than this process's umask lets a new file have (a server
    must not make what we receive writable by the machine's other accounts)."""
    return mode & MODE_MASK & ~_umask()


def _umask():
    """The process's umask, read without changing it where the system says it (os.umask sets it, and
    another thread creating a file meanwhile would get the wrong one)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class GroupCommit:
    """Makes verified part files durable under their names, many at a time.

    One worker thread takes every file waiting: it flushes and renames each, then flushes each
    of their directories once. A tree's files share a few directories, so a batch costs one
    directory flush per directory instead of one per file, and files verified while a batch
    runs form the next. A name still appears only for a whole, verified, flushed file.
    """

    def __init__(self, defer_to_thread=None):
        if defer_to_thread is None:
            from twisted.internet import threads

            defer_to_thread = threads.deferToThread
        self._defer_to_thread = defer_to_thread
        self._waiting = []
        self._running = False

    @property
    def busy(self):
        return self._running or bool(self._waiting)

    def commit(self, part, mtime=None, mode=None, replace=True, expected=None):
        """A Deferred: once `part` is durable under its name (its stat in part.stored), None,
        or, with `expected` (size, SHA-1 digest) to verify it against first (in the worker: the
        last writes may still be under way), its hex SHA-1; or the EketwistError that prevented
        it (the part file is kept, unless it failed verification)."""
        from twisted.internet.defer import Deferred

        done = Deferred()
        self._waiting.append((part, mtime, mode, replace, expected, done))
        if not self._running:
            self._next_batch()
        return done

    def _next_batch(self):
        batch, self._waiting = self._waiting, []
        self._running = True
        self._defer_to_thread(self._commit_all, batch).addBoth(self._batch_done, batch)

    # From this many files on, a batch first has each filesystem holding them write out all
    # their bytes at once (syncfs: one journal commit instead of one per file; measured on
    # 1,000 files of 4 KiB: 0.2 s of fsyncs against 0.02 s, and creating the next files no
    # longer waits behind them). Each file is still fsynced after it, which then costs little
    # and reports a write error as that file's own (syncfs reports none before Linux 5.8, and
    # a root may hold other filesystems).
    SYNCFS_FROM = 8

    @classmethod
    def _commit_all(cls, batch):
        """In the worker: each file's outcome, its hex SHA-1 (verified here), None, or its
        EketwistError. The order is what makes a name durable only for a durable file: every
        file's bytes flushed, then renamed, then each directory flushed once."""
        outcomes: list = [None] * len(batch)
        failed = set()

        def each(step):
            for index, (part, mtime, mode, replace, expected, _) in enumerate(batch):
                if index not in failed:
                    try:
                        outcome = step(part, mtime, mode, replace, expected)
                    except EketwistError as error:
                        outcomes[index] = error
                        failed.add(index)
                    else:
                        if outcome is not None:
                            outcomes[index] = outcome

        each(lambda part, mtime, mode, replace, expected: expected and part.verify(*expected))
        each(lambda part, mtime, mode, replace, expected: part.settle(mtime, mode))
        if len(batch) - len(failed) >= cls.SYNCFS_FROM:
            _flush_filesystems(part for index, (part, *_) in enumerate(batch) if index not in failed)
        each(lambda part, *_: part.flush())
        each(lambda part, mtime, mode, replace, expected: part.rename(replace))
        synced = set()
        for index, (part, *_) in enumerate(batch):
            if index not in failed:
                try:
                    key = part.directory_key()
                    part.sync_directory(already_synced=key in synced)
                    synced.add(key)
                except EketwistError as error:
                    outcomes[index] = error
        return outcomes

    def _batch_done(self, outcomes, batch):
        from twisted.python.failure import Failure

        self._running = False
        if self._waiting:
            self._next_batch()
        if not isinstance(outcomes, list):  # a bug in the worker: every file fails with it
            outcomes = [outcomes] * len(batch)
        for outcome, (*_, done) in zip(outcomes, batch):
            if isinstance(outcome, (Exception, Failure)):
                done.errback(outcome)
            else:
                done.callback(outcome)


def _flush_filesystems(parts):
    """Have each filesystem holding one of `parts` write out its dirty data (syncfs), where the
    system has it; errors are left to each file's own fsync after this."""
    syncfs = _libc_function("syncfs", ("c_int",))
    if syncfs is None:
        return
    devices = {}
    for part in parts:
        try:
            devices.setdefault(os.fstat(part.fileno()).st_dev, part.fileno())
        except OSError:
            continue
    for fd in devices.values():
        syncfs(fd)


_LIBC_FUNCTIONS: dict = {}


def _libc_function(name, argument_types):
    """libc's function `name` through ctypes (imported only when a transfer needs it), or None
    where there is none."""
    if name not in _LIBC_FUNCTIONS:
        try:
            import ctypes

            function = getattr(ctypes.CDLL(None, use_errno=True), name)
            function.argtypes = tuple(getattr(ctypes, kind) for kind in argument_types)
            _LIBC_FUNCTIONS[name] = function
        except (ImportError, OSError, AttributeError):
            _LIBC_FUNCTIONS[name] = None
    return _LIBC_FUNCTIONS[name]
