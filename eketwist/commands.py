"""The client's commands over one authenticated connection: get, put and ls.

get and put look up what they need on the server (entries, listings), let eketwist.plan decide
the steps, and carry them out with one executor: they differ only in the direction of a
transfer and the side their directories are made on.
"""

import os
import stat
import sys
import time

from . import errors
from .errors import EketwistError, UsageError
from .files import local_mode
from .globs import expand_all
from .report import InOrder
from .plan import (
    MISSING, SAME, AlreadyComplete, Differs, MakeDirectory, SkipContents, Transfer, get_arguments, get_target,
    get_tree, local_state, put_target, put_tree, same_file,
)

FATAL = (
    errors.ConnectionFailed, errors.ProtocolError, errors.IntegrityError, errors.AuthenticationFailed,
    errors.Interrupted, errors.OutputClosed,
)
# Ends of the command itself, said once at its end, not for every file it cut short.
STOPPED = (errors.Interrupted, errors.OutputClosed)
# Requests a command keeps unanswered on a version 2 connection: enough to cover a link's
# round trip with small files (128 of 4 KiB is 512 KiB per round trip), few enough that the
# open part files and pending results stay small.
WINDOW = 128


async def pipelined(client, jobs):
    """Run `jobs` (each a function returning an awaitable, one request or a few) in order:
    one after another on a version 1 connection, with up to WINDOW unanswered on version 2.
    Once the connection has ended (a fatal error, already reported), the rest do not start;
    the first exception a job raises is raised here, after the others have settled."""
    if not client.pipelined:
        for job in jobs:
            await job()
        return
    from twisted.internet import defer

    window = defer.DeferredSemaphore(WINDOW)

    def start(job):
        return None if client.closing else defer.ensureDeferred(job())

    running = [window.run(start, job) for job in jobs]
    for succeeded, result in await defer.DeferredList(running, consumeErrors=True):
        if not succeeded:
            result.raiseException()


class Session:
    """One authenticated connection and the transfers run over it for one command."""

    def __init__(self, client, reporter, direction):
        self.client = client
        self.reporter = reporter
        self.direction = direction  # the command: "get", "put" or "ls"
        self.first_error = None

    def failed(self, name, error, record, report=None):
        report = report or self.reporter
        if isinstance(error, STOPPED):
            record.update(status="interrupted")
            report.done(record)
            raise error
        record.update(status="error", error={"code": error.code, "message": error.message})
        report.done(record)
        named = error.message.startswith((name, f"local {name}"))
        report.error(error.message if named else f"{name}: {error.message}")
        if self.first_error is None:
            self.first_error = error
        if isinstance(error, FATAL) or self.client.closing:
            raise error

    async def transfer(self, direction, source, destination, report=None, shown_as=None, size=None, **options):
        """One file, get or put; records the outcome (through `report`, the Reporter or its
        stand-in), the local file named `shown_as` if given; raises only when the connection
        is gone. `size`: a download's, if a listing gave it."""
        report = report or self.reporter
        remote = source if direction == "get" else destination
        local = destination if direction == "get" else source
        record = {"remote": remote, "local": shown_as or local}
        started = time.monotonic()
        try:
            if direction == "get":
                result = await self.client.get(remote, local, report.progress(size is not None), **options)
            else:
                result = await self.client.put(local, remote, report.progress(True), **options)
        except errors.Exists as error:
            # Rerunning a put that was cut after the server stored the file: nothing to do.
            theirs = None if self.client.closing else await self.remote_entry(remote)
            if theirs is not None and theirs["kind"] == "file" and same_file(os.stat(local), theirs):
                self.skipped(remote, local, UP_TO_DATE, report)
                return None
            self.failed(local, error, record, report)
            return None
        except EketwistError as error:
            # The server's errors name the remote file; ours, the local one.
            from_server = error.code in errors.WIRE_CODES and not error.message.startswith("local ")
            self.failed(remote if direction == "get" or from_server else local, error, record, report)
            return None
        seconds = result.get("seconds", time.monotonic() - started)
        record.update(
            status="ok", bytes=result["size"], sha1=result["sha1"], seconds=round(seconds, 6),
            resumed_from=result["resumed_from"],
        )
        report.verified(shown_as or local if direction == "get" else remote, result["size"], result["resumed_from"], seconds)
        report.done(record)
        return result

    def skipped(self, remote, local, reason, report=None):
        """A file not transferred, named by its source in the status line."""
        report = report or self.reporter
        report.done({"remote": remote, "local": local, "status": "skipped", "reason": reason})
        report.say(f"{remote if self.direction == 'get' else local}: skipped ({reason})")

    async def remote_entry(self, remote):
        try:
            return await self.client.stat(remote)
        except errors.NotFound:
            return None


UP_TO_DATE = "already up to date"


async def run_get(session, args):
    remotes, local = get_arguments(args.paths)
    remotes = await expand_all(session, remotes)
    if len(remotes) > 1 and local is not None and local != "-" and not os.path.isdir(local):
        raise UsageError(f"{local}: the globs name several files: the last argument must be an existing directory")
    if local == "-":
        await _get_to_stdout(session, remotes[0], args)
        return
    executor = Executor(session, Download())
    entries = {}
    if not args.recursive and len(remotes) > 1 and session.reporter.bars:
        # For the overall bar's total: the sizes at once, in one round trip (version 2).
        found: list = []
        await pipelined(session.client, [lambda remote=remote: _note_entry(session, remote, found) for remote in remotes])
        entries = dict(found)
    targets: dict = {}  # local name: the remote written to it
    for remote in remotes:
        target = get_target(remote, local)
        if target in targets:  # two files of one name into one directory (a glob's, say)
            session.failed(remote, errors.UsageError(
                f"{remote}: {targets[target]} is written to {target} already"), {"remote": remote, "local": target})
            continue
        targets[target] = remote
        if not args.recursive:
            step = await _get_step(session, remote, target, args.force, entries.get(remote))
            if step is not None:
                executor.add([step])
            continue
        try:
            entries = await session.client.list(remote, recursive=True)
        except EketwistError as error:
            session.failed(remote, error, {"remote": remote, "local": target})
            continue
        executor.add(get_tree(remote, target, entries, force=args.force))
    await executor.run(resume=not args.no_resume)


async def _note_entry(session, remote, found):
    try:
        found.append((remote, await session.remote_entry(remote)))
    except FATAL:
        raise
    except EketwistError:
        pass  # its GET will say what is wrong


async def _get_step(session, remote, target, force, entry=None):
    """The step of a plain get, or None when it is reported already: its local directory
    missing, or its local file already there (the same: skipped; different: refused without
    --force, like put's)."""
    record = {"remote": remote, "local": target}
    problem = _local_directory_problem(target)
    if problem is not None:
        session.failed(remote, problem, record)
        return None
    size = entry["size"] if entry is not None and entry["kind"] == "file" else None
    if force or local_state(target, None) is MISSING:
        return Transfer(remote, target, size=size)
    if entry is None:
        entry = await session.remote_entry(remote)
    if entry is None or entry["kind"] != "file":
        return Transfer(remote, target)  # its GET says what is wrong
    if local_state(target, entry) is SAME:
        return AlreadyComplete(remote, target)
    return Differs(remote, target)


def _local_directory_problem(target):
    directory = os.path.dirname(target) or "."
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        return errors.LocalIOError(f"local directory {directory} {what}")
    if not os.access(directory, os.W_OK | os.X_OK):
        return errors.LocalIOError(f"local directory {directory}: permission denied")
    return None


async def _get_to_stdout(session, remote, args):
    """`get REMOTE -`: the file is verified in a private temporary file, then copied to
    stdout: nothing unverified is ever written out."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="eke-client-") as scratch:
        local = os.path.join(scratch, "download")
        if await session.transfer("get", remote, local, resume=False, shown_as="-") is None:
            return
        try:
            with open(local, "rb") as verified:
                shutil.copyfileobj(verified, sys.stdout.buffer, 1024 * 1024)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            session.reporter.output_was_closed()
        except OSError as problem:
            raise errors.LocalIOError(f"stdout: {problem.strerror}") from None


async def run_put(session, args):
    locals_, remote, into_directory = await _put_destination(session, args.paths)
    executor = Executor(session, Upload(session.client))
    for local in locals_:
        target = put_target(local, remote, into_directory)
        if not (args.recursive and os.path.isdir(local)):
            executor.add([Transfer(target, local)])
            continue
        entry = await session.remote_entry(target)
        existing = await session.client.list(target, recursive=True) if entry is not None and entry["kind"] == "dir" else ()
        executor.add(put_tree(local, target, existing))
    await executor.run(force=args.force)


async def _put_destination(session, paths):
    """`put LOCAL... [REMOTE]`: the locals, REMOTE (None when not given), and whether the
    locals go inside it (a remote directory, which must exist when there are several)."""
    if len(paths) == 1:
        locals_, remote = paths, None
    else:
        *locals_, remote = paths
    into_directory = remote is None or remote.endswith("/") or len(locals_) > 1
    if remote is not None and not into_directory:
        entry = await session.remote_entry(remote)
        into_directory = entry is not None and entry["kind"] == "dir"
    elif remote is not None and remote.strip("/"):
        entry = await session.remote_entry(remote)
        if entry is None or entry["kind"] != "dir":
            raise UsageError(f"{remote}: with several files to put, the last argument must be an existing remote directory")
    return locals_, remote, into_directory


class Executor:
    """Carries out the steps of one get or put, fed source by source. Skips are reported as
    they are planned; nothing is made or transferred until every source is planned: a tree that
    cannot be read, or a listing that fails, leaves no half-made tree behind."""

    def __init__(self, session, direction, report_skips=True):
        self.session = session
        self.direction = direction
        self.report_skips = report_skips  # files up to date, one line each (sync counts them)
        self.directories = []
        self.transfers = []

    def add(self, steps):
        reporter = self.session.reporter
        for step in steps:
            if isinstance(step, Transfer):
                self.transfers.append(step)
            elif isinstance(step, MakeDirectory):
                self.directories.append(step)
            elif isinstance(step, AlreadyComplete):
                if self.report_skips:
                    self.session.skipped(step.remote_path, step.local_path, UP_TO_DATE)
            elif isinstance(step, Differs):
                source, destination = self.direction.ends(step)
                self.session.failed(source, self.direction.differs(destination), {"remote": step.remote_path, "local": step.local_path})
            elif isinstance(step, SkipContents):
                reporter.warn(f"{step.path}: skipped its contents: {step.reason}")
            else:  # a Skip
                reporter.warn(f"{step.path}: skipped: {step.reason}")

    async def run(self, **options):
        direction, client = self.direction, self.session.client
        # Requests are answered in the order they were sent: parents are made before their
        # contents, and contents finished before their parents (their mtimes then stay).
        await pipelined(client, [lambda step=step: direction.make_directory(step) for step in self.directories])
        self.session.reporter.overall(direction.total_bytes(self.transfers), len(self.transfers))
        if len(self.transfers) > 1 and not client.pipelined:
            self.session.reporter.warn(
                "the server speaks protocol version 1 only: files go one at a time, each costing "
                "a round trip (a server that speaks version 2 takes them back to back)"
            )
        in_order = InOrder(self.session.reporter)

        async def transfer(step):
            turn = in_order.turn()  # taken as the transfer starts: in the plan's order
            try:
                await self.session.transfer(direction.name, *direction.ends(step), report=turn, size=step.size, **options)
            finally:
                in_order.settle(turn)

        await pipelined(client, [lambda step=step: transfer(step) for step in self.transfers])
        await pipelined(client, [
            lambda step=step: direction.finish_directory(step)
            for step in reversed(self.directories) if step.mtime is not None
        ])


class Download:
    """The local side of get: directories made and finished here."""

    name = "get"

    @staticmethod
    def ends(step):
        return step.remote_path, step.local_path

    @staticmethod
    async def make_directory(step):
        """The top as the user named it (its parents made, symlinks in it followed); inside
        the tree, a directory of its own: a symlink there is never followed, whatever it
        leads to (files written through it would land outside the tree)."""
        path = step.local_path
        try:
            if step.name is None:
                os.makedirs(path, exist_ok=True)
            elif not stat.S_ISDIR(_lstat_mode(path)):
                os.mkdir(path)
        except FileExistsError:
            raise errors.LocalIOError(f"local {path}: exists and is not a directory (a symlink is not followed)") from None
        except NotADirectoryError:
            raise errors.LocalIOError(f"local {path}: a part of this path is a file, not a directory") from None
        except OSError as problem:
            raise errors.LocalIOError(f"local {path}: cannot create the directory: {problem.strerror}") from None

    @staticmethod
    async def finish_directory(step):
        try:
            fd = os.open(step.local_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, local_mode(step.mode))
                os.utime(fd, (step.mtime, step.mtime))
            finally:
                os.close(fd)
        except OSError as problem:
            raise errors.LocalIOError(f"local {step.local_path}: cannot set its mode and time: {problem.strerror}") from None

    @staticmethod
    def differs(local):
        return errors.Exists(f"local {local}: exists and differs (use --force to replace it)")

    @staticmethod
    def total_bytes(transfers):
        # What listings gave; the others' sizes are added as the server sends them.
        return sum(step.size for step in transfers if step.size is not None)


class Upload:
    """The remote side of put: directories made and finished on the server."""

    name = "put"

    def __init__(self, client):
        self.client = client

    @staticmethod
    def ends(step):
        return step.local_path, step.remote_path

    async def make_directory(self, step):
        await _remote_directory(self.client, step.remote_path, step.mode)

    async def finish_directory(self, step):
        await _remote_directory(self.client, step.remote_path, step.mode, step.mtime)

    @staticmethod
    def total_bytes(transfers):
        return sum(_size(step.local_path) for step in transfers)


def _lstat_mode(path):
    """The mode of `path` itself; 0 when there is nothing there."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def _size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


async def _remote_directory(client, remote, mode, mtime=None):
    """Make a remote directory, or give one we made its mode and time; an existing one (from
    an earlier run, or not ours) is used as it is: the server changes only what we created."""
    try:
        await client.mkdir(remote, mode=mode, mtime=mtime)
    except errors.Exists as error:
        entry = None if client.closing else await client.stat(remote)
        if entry is None or entry["kind"] != "dir":
            raise error


async def run_ls(session, args):
    entries = await session.client.list(args.path, recursive=args.recursive, partials=args.all)
    session.reporter.listing(args.path, entries, long=args.long)


COMMANDS = {"get": run_get, "put": run_put, "ls": run_ls}
