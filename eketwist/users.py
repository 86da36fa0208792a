"""The users command: `python -m eketwist.users` / `eke-users`.

Adds, changes and removes users in the users file, which holds verifiers only. Every change
rewrites the file atomically, keeping its mode, owner and group (0600 for a new file), under a
lock so that concurrent changes all land; a running server picks it up at its next handshake.

What was done (one line per change) and the list are the command's result: stdout. Warnings
and errors go to stderr.
"""

import argparse
import dataclasses
import getpass
import os
import sys

from . import __version__, userdb, wire
from .errors import EketwistError, UsageError

EXIT_OK, EXIT_FAILURE = 0, 1
DEFAULT_USERS = "./eke-users"


def _add_common_options(parser, suppress):
    """Options accepted before or after the command (`eke-users --users F add x`, `eke-users add x --users F`).
    On a command's parser the default is SUPPRESS, so that it does not undo a value given before."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--users", default=default(DEFAULT_USERS), metavar="FILE", help=f"the users file (default: {DEFAULT_USERS})",
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="eke-users",
        description="Manage eketwist users. The file stores a salt, scrypt cost, w0 and L = w1*P "
        "per user (SPAKE2+ verifiers), never a password. Each change is confirmed by one line on "
        "standard output.",
        epilog="exit codes: 0 success, 1 failure (e.g. no such user, unreadable file), 2 usage error",
    )
    parser.add_argument("--version", action="version", version=f"eke-users {__version__}")
    _add_common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = []
    for name, text in (("add", "add a user"), ("passwd", "change a user's password")):
        sub = commands.add_parser(name, help=text, description=text + ". The password is asked twice without echo.")
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--password-stdin", action="store_true", help="read the password from the first line of standard input")
        sub.add_argument(
            "--scrypt-n",
            type=int,
            default=userdb.DEFAULT_SCRYPT["n"],
            help="scrypt cost N, a power of two (default: %(default)s; r=8, p=1)",
        )
        if name == "add":
            _account_options(sub)
        subparsers.append(sub)
    modify = commands.add_parser(
        "modify", help="change a user's root or rights",
        description="Change a user's root or rights (at least one); the password stays.",
    )
    modify.add_argument("name", metavar="NAME")
    _account_options(modify)
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("name", metavar="NAME")
    listing = commands.add_parser("list", help="list the users")
    for sub in (*subparsers, modify, remove, listing):
        _add_common_options(sub, suppress=True)
    return parser


def _account_options(parser):
    parser.add_argument(
        "--root", metavar="DIR",
        help="the user's own root directory (default: the server's --root); 'default' to go back to it",
    )
    parser.add_argument("--rights", choices=userdb.RIGHTS, help="read (the default for new users) or read-write")


def check_args(args):
    """Usage errors that need no users file: found before taking the lock or asking a password."""
    if args.command == "modify" and args.root is None and args.rights is None:
        raise UsageError(
            f"modify {args.name}: nothing to change: give --root DIR (or --root default) and/or "
            f"--rights {'|'.join(userdb.RIGHTS)}"
        )


def read_new_password(args, stdin=sys.stdin):
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"New password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            raise ValueError("the passwords do not match")
    if not password:
        raise ValueError("the password is empty")
    return password


def _load_or_new(path, create):
    if create and not os.path.exists(path):
        return userdb.Users.new()
    return userdb.load(path)


def describe(user):
    """What the users file records about a user's account, as the confirmations show it."""
    return f"{user.rights}, {'root ' + user.root if user.root else 'server root'}"


def run(args, out=None):
    out = sys.stdout if out is None else out
    check_args(args)
    path = args.users
    problem = userdb.exposure(path)
    if problem:
        _warn(problem)
    if args.command == "list":
        users = userdb.load(path)
        for user in users.by_name.values():
            out.write(
                f"{user.name}\t{user.rights}\t{user.root or '(server root)'}\t"
                f"scrypt n={user.scrypt['n']} r={user.scrypt['r']} p={user.scrypt['p']}\n"
            )
        if not users.by_name:
            _warn(f"{path} has no users: nobody can log in")
        return EXIT_OK
    with userdb.writer_lock(path, on_wait=_say_waiting):
        done = _change(args, path)
    out.write(done + "\n")
    return EXIT_OK


def _warn(text):
    sys.stderr.write(f"eke-users: warning: {text}\n")


def _say_waiting(lock_path):
    sys.stderr.write(f"eke-users: waiting for {lock_path}: another eke-users is changing the file\n")


def _change(args, path):
    """Make the change; return the line that confirms it."""
    users = _load_or_new(path, create=args.command == "add")
    if users.by_name and not users.secret_is_stored:
        # The header was most likely lost in a hand edit. A new secret would change the answers
        # for unknown names but not for real ones, telling them apart: have the old one restored.
        raise ValueError(
            f"{path} has users but no header line, so it was written by hand: restore the header "
            f"from a backup, or put a new one first: "
            f'{{"eketwist-users": 1, "secret": "<64 hex digits, e.g. from openssl rand -hex 32>"}}'
        )
    problem = wire.check_username(args.name)
    if problem:
        raise ValueError(problem)
    previous = users.by_name.get(args.name)
    if args.command == "add" and previous is not None:
        raise ValueError(f"user {args.name!r} already exists (use passwd to change the password)")
    if args.command != "add" and previous is None:
        raise ValueError(f"no user {args.name!r} in {path}")
    if args.command == "remove":
        del users.by_name[args.name]
        done = f"removed {args.name} (was {describe(previous)})"
    elif args.command == "modify":
        user = _apply_account(args, previous)
        if user == previous:
            return f"{args.name} unchanged ({describe(user)})"
        users.by_name[args.name] = user
        done = f"modified {args.name} ({describe(user)})"
    else:
        scrypt = dict(userdb.DEFAULT_SCRYPT, n=args.scrypt_n)
        problem = userdb.check_scrypt(scrypt)
        if problem:
            raise ValueError(problem)
        password = read_new_password(args)
        user = userdb.make_user(args.name, password, scrypt)
        if previous is not None:
            user = dataclasses.replace(user, root=previous.root, rights=previous.rights, extra=previous.extra)
            done = f"changed the password of {args.name} (scrypt n={args.scrypt_n})"
        else:
            user = _apply_account(args, user)
            done = f"added {args.name} ({describe(user)})"
        users.by_name[args.name] = user
    userdb.save(path, users)
    return done


def _apply_account(args, user):
    changes: dict = {}
    if args.root is not None:
        if args.root == "default":
            changes["root"] = None
        else:
            root = os.path.abspath(args.root)
            if not os.path.isdir(root):
                raise ValueError(f"--root {args.root}: not a directory")
            changes["root"] = root
    if args.rights is not None:
        changes["rights"] = args.rights
    return dataclasses.replace(user, **changes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EketwistError as failure:
        sys.stderr.write(f"eke-users: {failure.message}\n")
        return failure.exit_code
    except (ValueError, userdb.UsersFileError, OSError) as problem:
        message = getattr(problem, "strerror", None) or str(problem)
        sys.stderr.write(f"eke-users: {message}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
