"""Quotas (docs/protocol.md section 7.7): what each root holds, counted once from the disk, then
kept up to date by the server's own changes, and the room each upload reserves when it starts.

Usage is per root directory, keyed by its (st_dev, st_ino): users sharing a root share it. The
count walks the tree in a thread (`scan`); everything else here runs in the reactor thread, so
reservations are taken one at a time and uploads running together never pass a quota. After a
restart the count starts again from the disk: nothing here is saved, so nothing can drift.
"""

import os
import stat

from twisted.internet import defer

from .errors import NoSpace
from .sizes import human_size
from .storage import walk_entries


def root_key(path):
    """(st_dev, st_ino) of a root directory; OSError if it is not there."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def scan(root, unreadable=None):
    """(bytes, files): the sizes and number of the regular files under `root`, partial uploads
    included. Blocking (run it in a thread); never follows a symlink (storage.walk_entries);
    `unreadable(names)` for each directory it could not read (its files are not counted)."""
    total = files = 0
    for _, child in walk_entries(root, unreadable):
        try:
            st = child.stat(follow_symlinks=False)
        except OSError:
            continue  # gone since its directory was read
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
            files += 1
    return total, files


class Usage:
    """What one root holds, as counted (`bytes`, `files`), and the room running uploads have
    reserved beyond it. Until the first count is over, `counted` is False and the server's
    changes are not applied (the count itself sees them, or not: see README, Users)."""

    def __init__(self):
        self.bytes = 0
        self.files = 0
        self.reserved_bytes = 0
        self.reserved_files = 0
        self.counted = False
        self._waiting = []

    def __repr__(self):
        return f"<Usage {self.bytes}+{self.reserved_bytes} bytes, {self.files}+{self.reserved_files} files>"

    @property
    def used_bytes(self):
        return self.bytes + self.reserved_bytes

    @property
    def used_files(self):
        return self.files + self.reserved_files

    def when_counted(self):
        """A Deferred firing once the count is over (at once if it is)."""
        if self.counted:
            return defer.succeed(self)
        waiting = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def set_counted(self, counted):
        self.bytes, self.files = counted
        self.counted = True
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(self)

    def change(self, nbytes, nfiles):
        """The server changed the disk under this root by that much."""
        if self.counted:
            self.bytes = max(0, self.bytes + nbytes)
            self.files = max(0, self.files + nfiles)

    def freed(self, removed):
        """A storage.Removed: what a REMOVE, RENAME or sweep took off the disk."""
        self.change(-removed.bytes, -removed.files)

    def reserve(self, nbytes, nfiles):
        self.reserved_bytes += nbytes
        self.reserved_files += nfiles


class Nested:
    """The usages a change under one root counts in: that root's own, if it is tracked, and
    those of the tracked roots it lies inside (a user's root may be within another's). Read
    as `own`; changed all together, so that no root's count misses what happens in it."""

    def __init__(self, own, usages):
        self.own = own
        self.usages = usages

    def reserve(self, nbytes, nfiles):
        for usage in self.usages:
            usage.reserve(nbytes, nfiles)

    def change(self, nbytes, nfiles):
        for usage in self.usages:
            usage.change(nbytes, nfiles)

    def freed(self, removed):
        for usage in self.usages:
            usage.freed(removed)


class Accounts:
    """The server's usages, one per root that some user with a quota has. A root is counted
    when it is first tracked (at start-up, or when a reloaded users file gives a quota on a
    root not yet counted), in a thread, while the server serves."""

    def __init__(self, defer_to_thread, log):
        self._defer_to_thread = defer_to_thread
        self.log = log
        self._usages = {}
        self._paths = {}  # the real path of each tracked root (roots may nest)

    def track(self, path):
        """The Usage of the root `path`, counted from now on; None if the root is not there."""
        try:
            key = root_key(path)
        except OSError:
            return None
        usage = self._usages.get(key)
        if usage is None:
            usage = self._usages[key] = Usage()
            self._paths[key] = os.path.realpath(path)
            self._count(path, usage)
        return usage

    def nested(self, path):
        """The Nested usages of the root `path` (None when no tracked root contains it)."""
        try:
            real = os.path.realpath(path)
            own = self._usages.get(root_key(path))
        except OSError:
            return None
        usages = [self._usages[key] for key, top in self._paths.items()
                  if real == top or real.startswith(top.rstrip("/") + "/")]
        return Nested(own, usages) if usages else None

    def _count(self, path, usage):
        self.log.info("counting the files under {root} for quotas", root=path)

        def counted(result):
            usage.set_counted(result)
            self.log.info(
                "{root} holds {nbytes} bytes in {count} files (quotas)", root=path, nbytes=result[0], count=result[1],
            )

        def failed(failure):
            self.log.failure("counting the files under {root} failed", failure, root=path)
            usage.set_counted((0, 0))

        unreadable: list = []  # filled in the thread, read once it is done

        def counted_all(result):
            if unreadable:
                self.log.warn(
                    "{count} directories under {root} could not be read: their files are not in the "
                    "quota count (first: {first}); give the server read access to them and restart it",
                    count=len(unreadable), root=path, first="/".join(unreadable[0]),
                )
            counted(result)

        self._defer_to_thread(scan, path, unreadable.append).addCallbacks(counted_all, failed)

    def usage_of(self, path):
        """The Usage of the root `path` if it is tracked, else None."""
        try:
            return self._usages.get(root_key(path))
        except OSError:
            return None

    def freed(self, path, removed):
        nested = self.nested(path)
        if nested is not None:
            nested.freed(removed)


class Quota:
    """A user's limits on their root's usage (either may be None: no such limit). The usage is
    looked up at each use: a root counted after this user logged in is accounted from then."""

    def __init__(self, accounts, path, quota_bytes=None, quota_files=None):
        self._accounts = accounts
        self.path = path
        self.quota_bytes = quota_bytes
        self.quota_files = quota_files

    @property
    def limited(self):
        return self.quota_bytes is not None or self.quota_files is not None

    @property
    def usage(self):
        return self._accounts.usage_of(self.path)

    def when_counted(self):
        """A Deferred firing when this user's usage is known: at once without limits."""
        usage = self.usage if self.limited else None
        return defer.succeed(None) if usage is None else usage.when_counted()

    @property
    def counted(self):
        usage = self.usage
        return not self.limited or usage is None or usage.counted

    def reserve(self, shown, size, replaced=None, partial=None):
        """Room for an upload of `size` bytes to the path `shown`, replacing `replaced` (the
        lstat of what is there now, or None), resuming or restarting its own partial upload
        `partial` (its lstat, or None): a Reservation, or None when the root is not counted.
        NoSpace, naming the quota, when the upload would pass one."""
        nested = self._accounts.nested(self.path)
        if nested is None:
            return None
        usage = nested.own
        part_bytes, part_files = _regular(partial)
        # What the disk will hold more while the upload runs: the file it replaces stays until
        # the new one takes its place (and may be removed or renamed meanwhile, by anyone
        # sharing the root), so its room is not lent to the upload; settle() gives it back.
        need_bytes = max(0, size - part_bytes)
        need_files = max(0, 1 - part_files)
        if usage is None or not usage.counted:  # no limit of our own to check (yet)
            return Reservation(nested, need_bytes, need_files, part_bytes, part_files)
        if self.quota_bytes is not None and usage.used_bytes + need_bytes > self.quota_bytes:
            raise NoSpace(
                f"{shown}: over your quota of {human_size(self.quota_bytes)} ({human_size(usage.used_bytes)} used)"
            )
        if self.quota_files is not None and usage.used_files + need_files > self.quota_files:
            raise NoSpace(f"{shown}: over your quota of {self.quota_files} files ({usage.used_files} used)")
        return Reservation(nested, need_bytes, need_files, part_bytes, part_files)

    def freed(self, removed):
        nested = self._accounts.nested(self.path)
        if nested is not None:
            nested.freed(removed)

    def space(self):
        """SPACE's quota members (docs/protocol.md section 7.10): none without limits."""
        usage = self.usage
        members: dict = {}
        if self.quota_bytes is not None:
            members.update(quota_bytes=self.quota_bytes, used_bytes=usage.used_bytes if usage else 0)
        if self.quota_files is not None:
            members.update(quota_files=self.quota_files, used_files=usage.used_files if usage else 0)
        return members


def _regular(st):
    """(bytes, 1) for a regular file's lstat, else (0, 0): what counts in a usage."""
    if st is not None and stat.S_ISREG(st.st_mode):
        return st.st_size, 1
    return 0, 0


class Reservation:
    """The room one upload holds from its PUT to its end, and what its partial file counted for
    when it started (`part_bytes`, `part_files`: a partial file on the disk is in the usage).
    `settle` turns it into usage by what the upload left on the disk."""

    def __init__(self, usage, nbytes, nfiles, part_bytes, part_files):
        self.usage = usage  # a Nested: the reservation counts in every root it lies in
        self.bytes = nbytes
        self.files = nfiles
        self.part_bytes = part_bytes
        self.part_files = part_files
        usage.reserve(nbytes, nfiles)
        self.settled = False

    def cancel(self):
        """Nothing was opened: the room goes back."""
        self._release()

    def settle(self, part):
        """The upload is over: its files.PartFile was renamed into place (replacing
        `part.replaced`), kept for a resume (counted at its size now), or removed."""
        if self.settled:
            return
        self._release()
        if part.renamed:
            replaced_bytes, replaced_files = _regular(part.replaced)
            self.usage.change(
                part.size - self.part_bytes - replaced_bytes, 1 - self.part_files - replaced_files,
            )
        elif part.kept:
            self.usage.change(part.size - self.part_bytes, 1 - self.part_files)
        else:
            self.usage.change(-self.part_bytes, -self.part_files)

    def _release(self):
        if not self.settled:
            self.settled = True
            self.usage.reserve(-self.bytes, -self.files)
