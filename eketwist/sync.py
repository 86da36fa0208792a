"""`eke-client sync SRC DEST`: make DEST a copy of SRC, one of them remote (written `:PATH`).

Both trees are listed (the remote one in one recursive LIST), eketwist.plan.sync_steps decides,
and the steps run pipelined through the same executor as get -r and put -r: a tree in which 10
files of 1,000 changed costs its listing and those 10 transfers, not a round trip per file.
"""

import os
import shutil

from . import errors, files
from .commands import FATAL, Download, Executor, Upload, pipelined
from .errors import EketwistError, UsageError
from .plan import (
    AlreadyComplete, Compare, Delete, MakeDirectory, Transfer, local_tree, remote_basename, sync_steps,
)


def is_remote(argument):
    return argument.startswith(":")


async def run_sync(session, args):
    up = is_remote(args.destination)
    remote = (args.destination if up else args.source)[1:]
    local = args.source if up else args.destination
    client = session.client
    remote_tree = await _remote_tree(client, remote, must_exist=not up)
    direction: "Upload | Download"
    if up:
        if not os.path.isdir(local):
            raise errors.LocalIOError(f"local {local}: not a directory")
        source, destination, direction = list(local_tree(local)), remote_tree, Upload(client)
    else:
        source, destination, direction = remote_tree, _local_side(local, remote_tree), Download()
    steps = list(sync_steps(remote, local, source, destination, delete=args.delete,
                            excludes=args.exclude, checksum=args.checksum))
    steps = await _compared(session, steps)
    if args.dry_run:
        _plan_shown(session, steps, up)
        return
    deletions = [step for step in steps if isinstance(step, Delete)]
    await pipelined(client, [lambda step=step: _delete(session, direction, step) for step in deletions])
    executor = Executor(session, direction, report_skips=False)
    executor.add(step for step in steps if not isinstance(step, Delete))
    await executor.run(**({"force": True} if up else {"resume": True}))
    _summary(session, steps, local if not up else f":{remote}")


async def _remote_tree(client, remote, must_exist):
    """The remote directory's recursive listing; [] if it is not there and need not be."""
    try:
        entries = await client.list(remote, recursive=True)
    except errors.NotFound:
        if must_exist:
            raise
        return []
    top = remote_basename(remote) if remote.strip("/") else None
    if len(entries) == 1 and entries[0]["kind"] != "dir" and entries[0]["name"] == top:
        raise UsageError(f":{remote}: sync copies directories; this is a file (get or put it)")
    return entries


def _local_side(local, remote_tree):
    """The local destination's tree ([] when it is not there yet), without the .part files
    of downloads to resume: they are neither sent to the comparison nor deleted."""
    if not os.path.exists(local):
        return []
    if not os.path.isdir(local):
        raise errors.LocalIOError(f"local {local}: not a directory")
    wanted = {entry["name"] for entry in remote_tree if entry["kind"] == "file"}
    suffix = files.CLIENT_PART_SUFFIX
    return [
        item for item in local_tree(local, others=True)
        if isinstance(item, dict) and not (item["name"].endswith(suffix) and item["name"][: -len(suffix)] in wanted)
    ]


async def _compared(session, steps):
    """Compare steps settled by SHA-1: ours hashed here (in a thread), theirs by HASH,
    pipelined; the same digest is up to date, another is sent."""
    from twisted.internet import threads

    async def settle(index, step):
        theirs = await session.client.hash(step.remote_path)
        ours = await threads.deferToThread(files.hash_file_prefix, step.local_path, theirs["size"])
        same = ours is not None and ours.hexdigest() == theirs["sha1"] and os.path.getsize(step.local_path) == theirs["size"]
        kind = AlreadyComplete if same else Transfer
        steps[index] = kind(step.remote, step.local, step.name)

    steps = list(steps)
    comparisons = [(index, step) for index, step in enumerate(steps) if isinstance(step, Compare)]
    await pipelined(session.client, [lambda index=index, step=step: settle(index, step) for index, step in comparisons])
    return steps


async def _delete(session, direction, step):
    shown = step.remote_path if isinstance(direction, Upload) else step.local_path
    try:
        if isinstance(direction, Upload):
            await session.client.remove(step.remote_path, recursive=step.kind == "dir")
        elif step.kind == "dir":
            shutil.rmtree(step.local_path)  # by descriptors on Linux: never follows a symlink
        else:
            os.unlink(step.local_path)
    except FATAL:
        raise
    except EketwistError as error:
        session.failed(shown, error, {"remote": step.remote_path, "local": step.local_path})
        return
    except OSError as problem:
        session.failed(shown, errors.LocalIOError(f"local {shown}: cannot delete it: {problem.strerror}"),
                       {"remote": step.remote_path, "local": step.local_path})
        return
    session.reporter.done({"remote": step.remote_path, "local": step.local_path, "status": "deleted"})
    session.reporter.say(f"{shown}: deleted")


def _plan_shown(session, steps, up):
    """--dry-run: what would be done, one line each on stdout (or in --json's files)."""
    reporter = session.reporter
    for step in steps:
        if isinstance(step, Delete):
            action, name = "delete", step.remote_path if up else step.local_path
        elif isinstance(step, Transfer):
            action, name = "send" if up else "receive", step.local_path if up else step.remote_path
        elif isinstance(step, MakeDirectory) and step.name is not None:
            action, name = "mkdir", step.remote_path if up else step.local_path
        else:
            continue
        reporter.planned(action, name, {"remote": step.remote_path, "local": step.local_path})
    _summary(session, steps, None, planned=True)


def _summary(session, steps, destination, planned=False):
    """The last line, and --json's counts: what was done (or, planned, would be), from the
    outcomes; failures are counted apart."""
    reporter = session.reporter
    same = sum(isinstance(step, AlreadyComplete) for step in steps)
    if planned:
        sent = sum(isinstance(step, Transfer) for step in steps)
        deleted = sum(isinstance(step, Delete) for step in steps)
        failed = 0
    else:
        statuses = [record["status"] for record in reporter.files]
        sent, deleted, failed = statuses.count("ok"), statuses.count("deleted"), statuses.count("error")
    reporter.extra.update(up_to_date=same, transfers=sent, deletions=deleted, failures=failed)
    if not sent and not deleted and not failed:
        reporter.say(f"nothing to do: {destination or 'the destination'} is up to date ({same} files)")
        return
    verb = "would be" if planned else "were"
    trouble = f", {failed} failed" if failed else ""
    reporter.say(f"sync: {sent} files {verb} transferred, {deleted} {verb} deleted, {same} up to date{trouble}")
