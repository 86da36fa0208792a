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
import warnings

from . import __version__, userdb, wire
from .errors import EketwistError, LocalIOError, UsageError

EXIT_OK, EXIT_FAILURE = 0, 1
DEFAULT_USERS = "./eke-users"
# A stolen users file lets anyone guess passwords offline at scrypt's pace: short ones fall.
MIN_PASSWORD_LENGTH = 8
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

PASSWORD_HELP = (
    f"On a terminal the password is asked twice without echo; otherwise (or with "
    f"--password-stdin) it is the first line of standard input. It must have at least "
    f"{MIN_PASSWORD_LENGTH} characters unless --allow-short-password is given."
)


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
        epilog=f"exit codes: 0 success, 1 failure (e.g. no such user, unreadable file), 2 usage error (also an "
        f"unacceptable password), {EXIT_INTERRUPTED} interrupted",
    )
    parser.add_argument("--version", action="version", version=f"eke-users {__version__}")
    _add_common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = []
    for name, text in (("add", "add a user"), ("passwd", "change a user's password")):
        sub = commands.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. {PASSWORD_HELP}")
        sub.add_argument("name", metavar="NAME")
        sub.add_argument(
            "--password-stdin", action="store_true",
            help="read the password from the first line of standard input even on a terminal",
        )
        sub.add_argument(
            "--allow-short-password", action="store_true",
            help=f"accept a password shorter than {MIN_PASSWORD_LENGTH} characters (with a stolen "
            "users file, short passwords are found quickly)",
        )
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


def read_new_password(args, stdin=None):
    stdin = sys.stdin if stdin is None else stdin
    if stdin is None:
        raise UsageError("no password: standard input is closed")
    if args.password_stdin or not stdin.isatty():
        password = _read_line(stdin)
    else:
        password = _prompt(f"New password for {args.name}: ")
        if _prompt("Again: ") != password:
            raise UsageError("the passwords do not match; nothing changed")
    if not password:
        raise UsageError("the password is empty")
    if len(password) < MIN_PASSWORD_LENGTH and not args.allow_short_password:
        raise UsageError(
            f"the password is shorter than {MIN_PASSWORD_LENGTH} characters: choose a longer one "
            f"(or give --allow-short-password)"
        )
    return password


def _read_line(stdin):
    # Bytes, decoded here: the same UTF-8 whatever the locale says.
    try:
        line = stdin.buffer.readline()
    except OSError as problem:
        raise LocalIOError(f"standard input: cannot read the password: {problem.strerror}") from None
    if not line:
        raise UsageError("no password: standard input is empty")
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise UsageError("the password on standard input is not UTF-8 text") from None


def _prompt(text):
    try:
        with warnings.catch_warnings():
            # getpass falls back to echoing the password, with a warning: refuse instead.
            warnings.simplefilter("error", getpass.GetPassWarning)
            return getpass.getpass(text)
    except getpass.GetPassWarning:
        raise UsageError("cannot turn off echo on this terminal: use --password-stdin") from None
    except (EOFError, KeyboardInterrupt) as stop:
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # the prompt's line is still open
        if isinstance(stop, EOFError):
            raise UsageError("no password: end of input at the prompt") from None
        raise


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
    except KeyboardInterrupt:
        sys.stderr.write("eke-users: interrupted\n")
        return EXIT_INTERRUPTED
    except EketwistError as failure:
        sys.stderr.write(f"eke-users: {failure.message}\n")
        return failure.exit_code
    except (ValueError, userdb.UsersFileError, OSError) as problem:
        message = getattr(problem, "strerror", None) or str(problem)
        sys.stderr.write(f"eke-users: {message}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
