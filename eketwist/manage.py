"""The client's commands that manage remote files (docs/protocol.md section 7.10): mkdir, rm,
rmdir, mv, chmod, stat, df. Their remote paths may be globs (eketwist.globs)."""

from . import errors
from .commands import FATAL, pipelined
from .errors import EketwistError
from .globs import expand_all
from .plan import remote_basename, remote_join

async def _each(session, paths, action):
    """`action(path)` for each path, pipelined; each outcome reported in order."""

    async def one(path):
        try:
            said = await action(path)
        except FATAL:
            raise
        except EketwistError as error:
            session.failed(path, error, {"remote": path})
            return
        session.reporter.done({"remote": path, "status": "ok"})
        if said:
            session.reporter.say(said)

    await pipelined(session.client, [lambda path=path: one(path) for path in paths])


async def run_mkdir(session, args):
    client = session.client

    async def make(path):
        if args.parents:
            made = 0
            parts = [part for part in path.split("/") if part not in ("", ".")]
            for depth in range(1, len(parts) + 1):
                made += await _make_directory(client, "/".join(parts[:depth]), exist_ok=True)
            return f"{path}: made" if made else None
        await _make_directory(client, path, exist_ok=False)
        return f"{path}: made"

    await _each(session, args.paths, make)


async def _make_directory(client, path, exist_ok):
    """1 if made, 0 if it was there already as a directory (with `exist_ok`)."""
    try:
        await client.mkdir(path)
        return 1
    except errors.Exists:
        if not exist_ok or client.closing:
            raise errors.Exists(f"{path}: already exists on the server") from None
        entry = await client.stat(path)
        if entry["kind"] != "dir":
            raise errors.Exists(f"{path}: exists on the server and is not a directory") from None
        return 0


async def run_rm(session, args):
    paths = await expand_all(session, args.paths)

    async def remove(path):
        try:
            removed = await session.client.remove(path, recursive=args.recursive)
        except errors.NotAFile:
            raise errors.NotAFile(f"{path}: a directory: rm -r removes it with its contents (rmdir, if empty)") from None
        except errors.NotFound:
            if args.force:
                return None  # as rm -f: what is not there is not an error
            raise
        return f"{path}: removed" + (f" ({removed} names)" if removed > 1 else "")

    await _each(session, paths, remove)


async def run_rmdir(session, args):
    paths = await expand_all(session, args.paths)

    async def remove(path):
        await session.client.rmdir(path)
        return f"{path}: removed"

    await _each(session, paths, remove)


async def run_mv(session, args):
    *sources, destination = args.paths
    sources = await expand_all(session, sources)
    if not sources:
        return
    entry = await session.remote_entry(destination)
    into = entry is not None and entry["kind"] == "dir"
    if len(sources) > 1 and not into:
        raise errors.UsageError(f"{destination}: with several sources, the last argument must be an existing remote directory")

    async def move(path):
        target = remote_join(destination, remote_basename(path)) if into else destination
        try:
            await session.client.rename(path, target, force=args.force)
        except errors.NotEmpty:
            raise errors.NotEmpty(f"{target}: a directory that is not empty is in the way") from None
        except errors.Exists:
            raise errors.Exists(f"{target}: already exists on the server (use --force to replace it)") from None
        return f"{path}: moved to {target}"

    await _each(session, sources, move)


async def run_chmod(session, args):
    paths = await expand_all(session, args.paths)

    async def change(path):
        await session.client.chmod(path, args.mode)
        return f"{path}: mode {args.mode:03o}"

    await _each(session, paths, change)


async def run_stat(session, args):
    paths = await expand_all(session, args.paths)
    entries = []

    async def one(path):
        try:
            entry = await session.client.stat(path)
        except FATAL:
            raise
        except EketwistError as error:
            session.failed(path, error, {"remote": path})
            return
        entries.append((path, entry))

    await pipelined(session.client, [lambda path=path: one(path) for path in paths])
    order = {path: index for index, path in enumerate(paths)}
    session.reporter.entries(sorted(entries, key=lambda item: order[item[0]]))


async def run_df(session, args):
    session.reporter.space(await session.client.space())


COMMANDS = {
    "mkdir": run_mkdir, "rm": run_rm, "rmdir": run_rmdir, "mv": run_mv, "chmod": run_chmod,
    "stat": run_stat, "df": run_df,
}
