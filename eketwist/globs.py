"""Remote globs, expanded by the client from listings for every command that takes remote paths.

The shell's rules: `*`, `?` and `[...]` within one name, a leading `.` matched only by a
pattern's own; one LIST per directory level a pattern's segment has a glob in, so the server
needs nothing new. A pattern that matches nothing is an error, as in a shell that refuses to
run a command on `no matches found`.
"""

import fnmatch

from . import errors
from .plan import remote_basename, remote_join

GLOB_CHARACTERS = frozenset("*?[")


def has_glob(path):
    return not GLOB_CHARACTERS.isdisjoint(path)


def matches(name, pattern):
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


async def expand(client, pattern):
    """The remote paths `pattern` names, sorted: itself when it has no glob; NotFound when
    a glob matches nothing."""
    if not has_glob(pattern):
        return [pattern]
    segments = [segment for segment in pattern.split("/") if segment not in ("", ".")]
    found = [""]
    globbed = False
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        globbed = globbed or has_glob(segment)
        if not globbed:  # a plain prefix: taken as it is
            found = [remote_join(base, segment) for base in found]
            continue
        # From the first glob on, every name must exist (a plain one matches itself only).
        matched = []
        for base in found:
            for entry in await _directory(client, base):
                if matches(entry["name"], segment) and (last or entry["kind"] == "dir"):
                    matched.append(remote_join(base, entry["name"]))
        found = matched
    if not found:
        # As bash does by default, a pattern that matches nothing names itself: a remote name
        # with [, * or ? in it can still be given.
        try:
            await client.stat(pattern)
            return [pattern]
        except errors.NotFound:
            raise errors.NotFound(f"{pattern}: no match on the server") from None
    return sorted(found)


async def _directory(client, path):
    """The entries of the remote directory `path`; none if it is not one (or not there)."""
    try:
        entries = await client.list(path)
    except (errors.NotFound, errors.PermissionDenied):
        return []
    name = remote_basename(path) if path.strip("/") else None
    if len(entries) == 1 and entries[0]["name"] == name and entries[0]["kind"] != "dir":
        return []  # a file lists as itself
    return entries


async def expand_all(session, patterns):
    """Every pattern expanded in order; one that matches nothing is reported and left out."""
    paths = []
    for pattern in patterns:
        try:
            paths.extend(await expand(session.client, pattern))
        except errors.NotFound as error:
            session.failed(pattern, error, {"remote": pattern})
    return paths


