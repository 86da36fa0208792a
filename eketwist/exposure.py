"""What the daemon must never serve: its own files.

The users file (every salt, w0 and L, and the server secret), the directory its new copies are
written to (a user who can write there can replace it), the pidfile, the log and a TLS private
key must not lie inside any root the daemon serves: a user could download them, or with
read-write rights replace them. Checked at start-up (the daemon refuses to start) and at each
reload of the users file (a new file that adds such a root is refused).
"""

import os
import re


def _inside(path, root):
    """Is `path` the root or under it? Both are real paths."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _forms(path):
    """The real path, and the path with only its directory resolved: a symlink inside a root
    that points outside is itself replaceable by an upload."""
    path = os.path.abspath(path)
    return {os.path.realpath(path), os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))}


class Protected:
    """The daemon's own files, each with what to call it in a message."""

    def __init__(self, users, pidfile=None, logfile=None, tls_keys=()):
        self.users_directory = directory = os.path.dirname(os.path.abspath(users))
        self.entries = [
            ("the users file", users, _forms(users), "--users"),
            ("the users file's directory (where its new copies are written)", directory,
             {os.path.realpath(directory)}, "--users"),
        ]
        if pidfile:
            self.entries.append(("the pidfile", pidfile, _forms(pidfile), "twistd --pidfile"))
        if logfile:
            self.entries.append(("the log file", logfile, _forms(logfile), "twistd --logfile"))
        for key in tls_keys:
            self.entries.append(("the TLS key", key, _forms(key), "the port's privateKey="))

    def files(self):
        """The protected files themselves, for the server to refuse at each request too,
        whatever path leads to them (defence in depth: hard links, a root changed later)."""
        return [path for _, path, _, _ in self.entries if path != self.users_directory]

    def problem(self, roots):
        """A one-line message naming the first protected path inside one of `roots`, or None."""
        for root in roots:
            real_root = os.path.realpath(root)
            for what, path, forms, option in self.entries:
                if any(_inside(form, real_root) for form in forms):
                    example = " (e.g. --root ./files)" if real_root == os.path.realpath(os.curdir) else ""
                    return (
                        f"{what} {path} is inside the served root {os.path.abspath(root)}, so users could read "
                        f"or replace it: serve a directory that does not contain it{example}, or move it ({option})"
                    )
        return None

    def users_problem(self, server_root, users):
        """The check for a users file: the server's root and every user's own root."""
        return self.problem([server_root, *sorted({user.root for user in users.by_name.values() if user.root})])


_SEPARATOR = re.compile(r"(?<!\\):")


def tls_key_paths(description):
    """The files named by privateKey= and certKey= (which holds the key when privateKey= is
    absent) anywhere in an endpoint description, such as ssl: or haproxy:ssl:."""
    paths = []
    for segment in _SEPARATOR.split(description):
        name, equals, value = segment.partition("=")
        if equals and name in ("privateKey", "certKey") and value:
            paths.append(re.sub(r"\\(.)", r"\1", value))
    return paths


def twistd_files(twistd_options):
    """(pidfile, logfile) that twistd will write, from its own options (None: not a file)."""
    if twistd_options is None:
        return None, None
    pidfile = twistd_options.get("pidfile") or None
    if pidfile:
        # twistd writes the pidfile after changing to --rundir (the log file, before).
        pidfile = os.path.join(twistd_options.get("rundir") or ".", pidfile)
    logfile = twistd_options.get("logfile")
    if twistd_options.get("syslog") or twistd_options.get("logger") or logfile == "-":
        logfile = None
    elif not logfile:
        # twistd logs to stdout in the foreground and to twistd.log when it daemonizes.
        logfile = None if twistd_options.get("nodaemon") else "twistd.log"
    return pidfile, logfile
