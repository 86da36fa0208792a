"""The file service: untrusted paths resolved inside a root, and files received whole or not at all.

No network here: the server's protocol asks `open_for_sending`; the receiving side writes through
`PartFile`, which only ever creates the final name by renaming a complete, verified file.
"""

import errno
import hashlib
import hmac
import os
import stat

from twisted.python.filepath import FilePath, InsecurePath

from .errors import BadPath, IntegrityError, LocalIOError, NotAFile, NotFound, PermissionDenied

PART_SUFFIX = ".part"


def resolve(root, requested):
    """The FilePath for `requested` inside `root`, or BadPath.

    Built segment by segment (FilePath.child refuses '..', separators and NUL), then the real
    path is compared with the real root so that no symlink leads outside it.
    """
    if not isinstance(requested, str) or not requested or "\x00" in requested:
        raise BadPath("path refused: empty or contains NUL")
    if requested.startswith("/"):
        raise BadPath(f"{requested}: path refused: absolute paths are not allowed")
    segments = [seg for seg in requested.split("/") if seg not in ("", ".")]
    if ".." in segments:
        raise BadPath(f"{requested}: path refused: '..' is not allowed")
    root_path = FilePath(os.path.realpath(root))
    path = root_path
    try:
        for segment in segments:
            path = path.child(segment)
    except InsecurePath:
        raise BadPath(f"{requested}: path refused") from None
    real = os.path.realpath(path.path)
    if real != root_path.path and not real.startswith(root_path.path + os.sep):
        raise BadPath(f"{requested}: path refused: it leads outside the root")
    return FilePath(real)


def open_for_sending(path, shown_name):
    """Open a regular file for reading: (file object, os.stat_result), or a clear error."""
    try:
        # O_NOFOLLOW: the real path was checked; a symlink swapped in since is refused.
        # O_NONBLOCK: opening a FIFO must not hang the server.
        fd = os.open(path.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{shown_name}: no such file on the server") from None
    except PermissionError:
        raise PermissionDenied(f"{shown_name}: permission denied on the server") from None
    except OSError as problem:
        if problem.errno == errno.ELOOP:
            raise BadPath(f"{shown_name}: path refused") from None
        if problem.errno == errno.EISDIR:
            raise NotAFile(f"{shown_name}: is a directory") from None
        raise NotFound(f"{shown_name}: cannot open on the server: {problem.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "is a directory" if stat.S_ISDIR(st.st_mode) else "is not a regular file"
        raise NotAFile(f"{shown_name}: {kind}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb", buffering=0), st


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class PartFile:
    """Receives one file into `<destination>.part`, hashing as it goes.

    `finish` checks size and SHA-1, fsyncs and renames into place; `abort` removes the part
    file. The destination name is never created or replaced by an incomplete file.
    """

    def __init__(self, destination):
        self.destination = destination
        self.part = destination + PART_SUFFIX
        self.size = 0
        self._sha1 = hashlib.sha1()
        try:
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as problem:
            raise LocalIOError(f"{self.part}: cannot create: {problem.strerror}") from None
        self._file = os.fdopen(fd, "wb", buffering=0)

    def write(self, data):
        try:
            self._file.write(data)
        except OSError as problem:
            raise LocalIOError(f"{self.part}: cannot write: {problem.strerror}") from None
        self._sha1.update(data)
        self.size += len(data)

    def finish(self, expected_size, expected_sha1, mtime=None):
        """Verify and rename into place; return the hex SHA-1. On failure nothing is renamed."""
        digest = self._sha1.digest()
        if self.size != expected_size or not hmac.compare_digest(digest, expected_sha1):
            self.abort()
            what = "size" if self.size != expected_size else "SHA-1"
            raise IntegrityError(
                f"{os.path.basename(self.destination)}: {what} does not match; nothing was written"
            )
        try:
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), 0o666 & ~_umask())
            if mtime is not None:
                os.utime(self._file.fileno(), (mtime, mtime))
            self._file.close()
            os.replace(self.part, self.destination)
            _fsync_directory(os.path.dirname(os.path.abspath(self.destination)))
        except OSError as problem:
            self.abort()
            raise LocalIOError(f"{self.destination}: cannot finish: {problem.strerror}") from None
        return digest.hex()

    def abort(self, keep_part=False):
        if not self._file.closed:
            self._file.close()
        if not keep_part:
            try:
                os.unlink(self.part)
            except FileNotFoundError:
                pass
