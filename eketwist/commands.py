"""The client's commands over one authenticated connection: get, put and ls."""

import os
import stat
import time

from . import errors
from .errors import EketwistError, UsageError

FATAL = (errors.ConnectionFailed, errors.ProtocolError, errors.IntegrityError, errors.AuthenticationFailed)


def remote_basename(remote):
    name = remote.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"{remote}: not a file name")
    return name


def remote_join(directory, name):
    directory = directory.rstrip("/")
    return f"{directory}/{name}" if directory else name


class Session:
    """One authenticated connection and the transfers run over it for one command."""

    def __init__(self, client, reporter):
        self.client = client
        self.reporter = reporter
        self.first_error = None

    def failed(self, name, error, record):
        record.update(status="error", error={"code": error.code, "message": error.message})
        self.reporter.done(record)
        self.reporter.error(error.message if error.message.startswith(name) else f"{name}: {error.message}")
        if self.first_error is None:
            self.first_error = error
        if isinstance(error, FATAL) or self.client.closing:
            raise error

    async def transfer(self, direction, source, destination, **options):
        """One file, get or put; records the outcome; raises only when the connection is gone."""
        remote = source if direction == "get" else destination
        local = destination if direction == "get" else source
        record = {"remote": remote, "local": local}
        started = time.monotonic()
        try:
            if direction == "get":
                result = await self.client.get(remote, local, self.reporter.progress(), **options)
            else:
                result = await self.client.put(local, remote, self.reporter.progress(), **options)
        except errors.Exists as error:
            # Rerunning a put that was cut after the server stored the file: nothing to do.
            theirs = None if self.client.closing else await self.remote_entry(remote)
            if theirs is not None and theirs["kind"] == "file" and _same_file(os.stat(local), theirs):
                self.skipped(local, remote, "already on the server")
                return None
            self.failed(local, error, record)
            return None
        except EketwistError as error:
            self.failed(remote if direction == "get" else local, error, record)
            return None
        seconds = time.monotonic() - started
        record.update(
            status="ok", bytes=result["size"], sha1=result["sha1"], seconds=round(seconds, 6),
            resumed_from=result["resumed_from"],
        )
        moved = result["size"] - result["resumed_from"]
        rate = moved / seconds / 1e6 if seconds > 0 else 0.0
        resumed = f", resumed at {result['resumed_from']}" if result["resumed_from"] else ""
        self.reporter.say(f"{local if direction == 'get' else remote}: {result['size']} bytes verified in {seconds:.2f} s ({rate:.1f} MB/s{resumed})")
        self.reporter.done(record)
        return result

    def skipped(self, remote, local, reason):
        self.reporter.files.append({"remote": remote, "local": local, "status": "skipped", "reason": reason})
        self.reporter.say(f"{remote}: skipped ({reason})")

    async def remote_entry(self, remote):
        try:
            return await self.client.stat(remote)
        except errors.NotFound:
            return None


def _same_file(st, entry):
    return st.st_size == entry["size"] and abs(st.st_mtime - entry["mtime"]) < 1e-3


def _local_directory_target(paths, noun):
    """Split `A B C DEST` for several sources: DEST must be an existing directory."""
    *sources, destination = paths
    if not os.path.isdir(destination):
        raise UsageError(f"{destination}: with several {noun}, the last argument must be an existing directory")
    return sources, destination


async def run_get(session, args):
    reporter = session.reporter
    if len(args.paths) > 2:
        remotes, local = _local_directory_target(args.paths, "files to get")
    else:
        remotes, local = args.paths[:1], (args.paths[1] if len(args.paths) == 2 else None)
    # (remote, local path, name in a tree or None): a tree's paths are joined when transferred,
    # so that the plan shares the listing's strings instead of holding two more per file.
    plan = []
    directories = []  # (local dir, entry) to finish after their contents
    for remote in remotes:
        name = remote_basename(remote)
        if local is None:
            target = name
        elif os.path.isdir(local) or local.endswith(os.sep):
            target = os.path.join(local, name)
        else:
            target = local
        if not args.recursive:
            plan.append((remote, target, None))
            continue
        try:
            entries = await session.client.list(remote, recursive=True)
        except EketwistError as error:
            session.failed(remote, error, {"remote": remote, "local": target})
            continue
        if len(entries) == 1 and entries[0]["kind"] == "file" and entries[0]["name"] == name:
            plan.append((remote, target, None))  # a file named with -r
            continue
        os.makedirs(target, exist_ok=True)
        for entry in entries:
            source = remote_join(remote, entry["name"])
            destination = os.path.join(target, *entry["name"].split("/"))
            if entry["kind"] == "dir":
                os.makedirs(destination, exist_ok=True)
                directories.append((destination, entry))
            elif entry["kind"] == "file":
                try:
                    if _same_file(os.stat(destination), entry):
                        session.skipped(source, destination, "already complete")
                        continue
                except FileNotFoundError:
                    pass
                plan.append((remote, target, entry["name"]))
            else:
                reporter.warn(f"{source}: skipped: a {entry['kind']}, not a regular file or directory")
    reporter.overall(0, len(plan))
    for remote, target, name in plan:
        if name is not None:
            remote, target = remote_join(remote, name), os.path.join(target, *name.split("/"))
        await session.transfer("get", remote, target, resume=not args.no_resume)
    from .files import local_mode  # here: the command's start-up imports stay light

    for path, entry in sorted(directories, key=lambda item: item[0].count(os.sep), reverse=True):
        os.chmod(path, local_mode(entry["mode"]))
        os.utime(path, (entry["mtime"], entry["mtime"]))


async def run_put(session, args):
    reporter = session.reporter
    client = session.client
    if len(args.paths) == 1:
        locals_, remote = args.paths, None
    else:
        *locals_, remote = args.paths
    into_directory = remote is None or remote.endswith("/") or len(locals_) > 1
    if remote is not None and not into_directory:
        entry = await session.remote_entry(remote)
        into_directory = entry is not None and entry["kind"] == "dir"
    elif remote is not None and remote.strip("/"):
        entry = await session.remote_entry(remote)
        if entry is None or entry["kind"] != "dir":
            raise UsageError(f"{remote}: with several files to put, the last argument must be an existing remote directory")
    plan = []  # (local, remote)
    directories = []  # (remote dir, stat): created before the files, finished after them
    for local in locals_:
        name = os.path.basename(os.path.normpath(local))
        target = remote_join(remote or "", name) if into_directory else remote
        if not (args.recursive and os.path.isdir(local)):
            plan.append((local, target))
            continue
        existing = {}
        entry = await session.remote_entry(target)
        if entry is not None and entry["kind"] == "dir":
            existing = {e["name"]: e for e in await client.list(target, recursive=True)}
        directories.append((target, os.stat(local)))
        for relative, path, st in _local_tree(local, reporter):
            destination = remote_join(target, relative)
            if stat.S_ISDIR(st.st_mode):
                directories.append((destination, st))
                continue
            theirs = existing.get(relative)
            if theirs is not None and theirs["kind"] == "file" and _same_file(st, theirs):
                session.skipped(path, destination, "already complete")
                continue
            plan.append((path, destination))
    # The whole tree is planned before anything is created on the server: a local tree that
    # cannot be read no longer leaves half of it there. Parents come before their contents.
    for target, st in directories:
        await _remote_directory(client, target, st.st_mode)
    reporter.overall(sum(_size(path) for path, _ in plan), len(plan))
    for local, target in plan:
        await session.transfer("put", local, target, force=args.force)
    for target, st in reversed(directories):  # contents before their parents: mtimes stay
        await _remote_directory(client, target, st.st_mode, st.st_mtime)


async def _remote_directory(client, remote, mode, mtime=None):
    """Make a remote directory, or give one we made its mode and time; an existing one (from
    an earlier run, or not ours) is used as it is: the server changes only what we created."""
    try:
        await client.mkdir(remote, mode=mode, mtime=mtime)
    except errors.Exists as error:
        entry = None if client.closing else await client.stat(remote)
        if entry is None or entry["kind"] != "dir":
            raise error


def _local_tree(top, reporter):
    """(relative "/"-joined name, path, lstat) of the directories and regular files under
    `top`, depth first in name order, each directory before its contents; symlinks and other
    files skipped with a warning. An explicit stack: os.walk recursed (Python 3.11), and a
    tree 1,000 levels deep raised RecursionError."""
    stack = [("", iter(_sorted_children(top, reporter)))]
    while stack:
        prefix, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        try:
            st = child.stat(follow_symlinks=False)
        except OSError as problem:
            reporter.warn(f"{child.path}: skipped: {problem.strerror}")
            continue
        if stat.S_ISLNK(st.st_mode):
            reporter.warn(f"{child.path}: skipped: a symlink")
        elif stat.S_ISDIR(st.st_mode):
            yield prefix + child.name, child.path, st
            stack.append((prefix + child.name + "/", iter(_sorted_children(child.path, reporter))))
        elif stat.S_ISREG(st.st_mode):
            yield prefix + child.name, child.path, st
        else:
            reporter.warn(f"{child.path}: skipped: not a regular file")


def _sorted_children(directory, reporter):
    try:
        with os.scandir(directory) as scan:
            return sorted(scan, key=lambda child: child.name)
    except OSError as problem:
        reporter.warn(f"{directory}: skipped its contents: {problem.strerror}")
        return []


def _size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


async def run_ls(session, args):
    entries = await session.client.list(args.path, recursive=args.recursive, partials=args.all)
    session.reporter.listing(args.path, entries, long=args.long)


COMMANDS = {"get": run_get, "put": run_put, "ls": run_ls}
