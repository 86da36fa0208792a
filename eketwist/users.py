"""The users command: `python -m eketwist.users` / `eke-users`.

Adds, changes and removes users in the users file, which holds verifiers only. Every change
rewrites the file atomically, keeping its mode, owner and group (0600 for a new file), under a
lock so that concurrent changes all land; a running server picks it up at its next handshake.

What was done (one line per change) and the list are the command's result: stdout. Warnings
and errors go to stderr, one line each, naming the file; the exit code says which kind.
"""

import argparse
import dataclasses
import getpass
import os
import signal
import sys
import textwrap
import warnings

from . import __version__, sizes, userdb, wire
from .errors import EXIT_FAILURE, EXIT_LOCAL_IO, EXIT_OK, EXIT_USAGE, EketwistError, LocalIOError, UsageError

DEFAULT_USERS = "./eke-users"
# A stolen users file lets anyone guess passwords offline at scrypt's pace: short ones fall.
MIN_PASSWORD_LENGTH = 8
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_FAILURE}    refused, nothing changed: no such user, the user exists already, or the users
       file is broken, has no header line, or could not keep its owner
  {EXIT_USAGE}    usage error: a bad option or NAME, nothing to change, a password that is
       empty, shorter than {MIN_PASSWORD_LENGTH} characters or typed differently the second time
  {EXIT_LOCAL_IO}    the users file, its directory or its lock cannot be read or written, or
       standard output cannot be written (the message names the path)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); nothing changed unless the file was already saved
"""

PASSWORD_HELP = (
    f"On a terminal the password is asked twice without echo; otherwise (or with "
    f"--password-stdin) it is the first line of standard input. It must have at least "
    f"{MIN_PASSWORD_LENGTH} characters unless --allow-short-password is given."
)


def _paragraph(text):
    """Wrapped by hand: the raw formatter that keeps the exit codes' table would not wrap it."""
    return textwrap.fill(text, 90)


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
        description=_paragraph(
            "Manage eketwist users. The file stores a salt, scrypt cost, w0 and L = w1*P per user "
            "(SPAKE2+ verifiers), never a password. Each change is confirmed by one line on standard "
            "output; warnings and errors go to standard error."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"eke-users {__version__}")
    _add_common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = []
    for name, text in (("add", "add a user"), ("passwd", "change a user's password")):
        sub = commands.add_parser(name, help=text, description=_paragraph(f"{text[0].upper()}{text[1:]}. {PASSWORD_HELP}"))
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
        "modify", help="change a user's root, rights or quotas",
        description="Change a user's root, rights or quotas (at least one); the password stays.",
    )
    modify.add_argument("name", metavar="NAME")
    _account_options(modify)
    remove = commands.add_parser("remove", help="remove a user", description="Remove a user.")
    remove.add_argument("name", metavar="NAME")
    listing = commands.add_parser(
        "list", help="list the users",
        description="List the users, one per line: name, rights, root, scrypt cost and quotas, tab-separated.",
    )
    for sub in (*subparsers, modify, remove, listing):
        _add_common_options(sub, suppress=True)
        sub.epilog = EXIT_CODES_HELP
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _account_options(parser):
    parser.add_argument(
        "--root", metavar="DIR",
        help="the user's own root directory (default: the server's --root); 'default' to go back to it",
    )
    parser.add_argument(
        "--rights", type=_rights, metavar="RIGHTS",
        help="read (the default for new users: list,read), read-write (all), or a comma-separated list of "
        f"{', '.join(userdb.RIGHT_NAMES)} (e.g. list,read,write)",
    )
    parser.add_argument(
        "--quota-bytes", type=_quota(sizes.parse_size), metavar="SIZE",
        help="the most the user's root may hold in files and partial uploads, in bytes (suffixes K, M, G, T: "
        "powers of 1024; users sharing a root share it); 'none' for no limit",
    )
    parser.add_argument(
        "--quota-files", type=_quota(_file_count), metavar="N",
        help="the most files (partial uploads included) the user's root may hold; 'none' for no limit",
    )


# What a quota option gives for 'none': the quota is removed (None is "not given").
NO_QUOTA = "none"


def _quota(parse):
    def convert(text):
        if text.strip().lower() == NO_QUOTA:
            return NO_QUOTA
        try:
            value = parse(text)
        except ValueError as problem:
            raise argparse.ArgumentTypeError(str(problem)) from None
        if value > userdb.MAX_QUOTA:
            raise argparse.ArgumentTypeError(f"too large: {text!r}")
        return value

    return convert


def _file_count(text):
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative: {text!r}")
    return value


def _rights(text):
    try:
        return userdb.parse_rights(text, comma_separated=True)
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None


def check_args(args):
    """Usage errors that need no users file: found before taking the lock or asking a password."""
    if args.command == "list":
        return
    problem = wire.check_username(args.name)
    if problem:
        raise UsageError(f"NAME {args.name!r}: {problem}")
    if args.command == "modify" and all(
        value is None for value in (args.root, args.rights, args.quota_bytes, args.quota_files)
    ):
        raise UsageError(
            f"modify {args.name}: nothing to change: give --root DIR (or --root default), "
            f"--rights {'|'.join(userdb.BUNDLES)}|RIGHT,RIGHT..., --quota-bytes SIZE|none and/or --quota-files N|none"
        )
    if args.command in ("add", "passwd"):
        problem = userdb.check_scrypt(dict(userdb.DEFAULT_SCRYPT, n=args.scrypt_n))
        if problem:
            raise UsageError(f"--scrypt-n {args.scrypt_n}: {problem}")
    if getattr(args, "root", None) not in (None, "default"):
        args.root = _checked_root(args.root)


def _checked_root(root):
    try:
        root.encode("utf-8")  # the users file is UTF-8: a name from another encoding cannot go in
    except UnicodeEncodeError:
        raise UsageError(f"--root {root!r}: not a UTF-8 path") from None
    if not root or not os.path.isdir(root):
        raise UsageError(f"--root {root}: not a directory")
    return os.path.abspath(root)


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
    quota = describe_quota(user)
    return f"{user.rights}, {'root ' + user.root if user.root else 'server root'}" + (f", {quota}" if quota else "")


def describe_quota(user):
    """'quota 10.0 GiB and 1000 files', or "" without quotas."""
    limits = []
    if user.quota_bytes is not None:
        limits.append(_size_label(user.quota_bytes))
    if user.quota_files is not None:
        limits.append(f"{user.quota_files} file{'s' if user.quota_files != 1 else ''}")
    return "quota " + " and ".join(limits) if limits else ""


def _size_label(count):
    """10.0 GiB when that is exact, else 1.4 MiB (1500000 bytes)."""
    shown = sizes.human_size(count)
    return shown if sizes.parse_size(shown.replace(" ", "")) == count else f"{shown} ({count} bytes)"


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
            _write(
                out,
                f"{user.name}\t{user.rights}\t{user.root or '(server root)'}\t"
                f"scrypt n={user.scrypt['n']} r={user.scrypt['r']} p={user.scrypt['p']}\t"
                f"{describe_quota(user) or 'no quota'}\n",
            )
        if not users.by_name:
            _warn(f"{path} has no users: nobody can log in")
        return EXIT_OK
    with userdb.writer_lock(path, on_wait=_say_waiting):
        done = _change(args, path)
    try:
        _write(out, done + "\n")
    except LocalIOError as failure:
        raise LocalIOError(f"{failure.message}, but the change was made: {done}") from None
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
        raise userdb.UsersFileError(
            f"{path} has users but no header line, so it was written by hand: restore the header "
            f"from a backup, or put a new one first: "
            f'{{"eketwist-users": 1, "secret": "<64 hex digits, e.g. from openssl rand -hex 32>"}}'
        )
    previous = users.by_name.get(args.name)
    if args.command == "add" and previous is not None:
        raise userdb.UsersFileError(f"user {args.name!r} already exists in {path} (use passwd to change the password)")
    if args.command != "add" and previous is None:
        raise userdb.UsersFileError(f"no user {args.name!r} in {path}")
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
        password = read_new_password(args)
        user = userdb.make_user(args.name, password, dict(userdb.DEFAULT_SCRYPT, n=args.scrypt_n))
        if previous is not None:
            user = dataclasses.replace(
                user, root=previous.root, rights=previous.rights, extra=previous.extra,
                quota_bytes=previous.quota_bytes, quota_files=previous.quota_files,
            )
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
        changes["root"] = None if args.root == "default" else args.root
    if args.rights is not None:
        changes["rights"] = args.rights
    for quota in userdb.QUOTAS:
        value = getattr(args, quota)
        if value is not None:
            changes[quota] = None if value == NO_QUOTA else value
    return dataclasses.replace(user, **changes)


def _error(text):
    sys.stderr.write(f"eke-users: {text}\n")


def _write(out, text):
    try:
        out.write(text)
        out.flush()
    except OSError as problem:
        if out is sys.stdout:
            # Nothing more can reach it: point it at /dev/null, so that the interpreter's own
            # flush at exit does not fail again with an "Exception ignored" report.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise LocalIOError(f"standard output: {problem.strerror}") from None


def main(argv=None):
    # Like cat: `eke-users list | head -1` ends quietly when head has read enough.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a name outside an ASCII locale
    try:
        args = build_parser().parse_args(argv)
        if sys.stdout is None:  # started with it closed: a change could not be confirmed
            raise LocalIOError("standard output is closed")
        return run(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except EketwistError as failure:
        _error(failure.message)
        return failure.exit_code
    except userdb.UsersFileIOError as problem:
        _error(str(problem))
        return EXIT_LOCAL_IO
    except userdb.UsersFileError as problem:
        _error(str(problem))
        return EXIT_FAILURE
    except Exception as problem:  # a bug: still one line, never a traceback in the terminal
        _error(f"unexpected error (please report it): {type(problem).__name__}: {problem}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
