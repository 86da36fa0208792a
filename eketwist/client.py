"""The client command: `python -m eketwist.client` / `eke-client`.

Status and progress go to stderr, data (verified digests, listings, --json) to stdout. Every
failure is one line naming the file and the reason, and a distinct exit code (see --help).

Twisted and the protocol machine are imported only after the Prelude has connected and
started scrypt (eketwist.prelude): the two then overlap instead of adding up.
"""

import argparse
import gc
import getpass
import os
import stat
import sys
import time

from . import errors
from .errors import EketwistError, UsageError
from .prelude import Prelude
from .report import Reporter
from .tuning import tune_allocator

DEFAULT_PORT = 4000
FATAL = (errors.ConnectionFailed, errors.ProtocolError, errors.IntegrityError, errors.AuthenticationFailed)


def _environ_default(name, fallback):
    return os.environ.get(name) or fallback


def _add_common_options(parser, suppress):
    """Options accepted before or after the command (`eke-client -q get x`, `eke-client get -q x`)."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--host", default=default(_environ_default("EKE_HOST", "127.0.0.1")),
        help="server host name or address (default: $EKE_HOST or 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=default(int(_environ_default("EKE_PORT", DEFAULT_PORT))),
        help=f"server TCP port (default: $EKE_PORT or {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--connect", metavar="ENDPOINT", default=default(None),
        help="a Twisted client endpoint instead of --host/--port, e.g. tcp:host=example.org:port=4000",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False),
        help="connect with TLS and verify the server's certificate for --host (the password "
        "proof still runs inside; TLS also hides your username and file names)",
    )
    parser.add_argument(
        "--ca-file", metavar="FILE", default=default(None),
        help="with --tls: trust the certificate authorities in this PEM file instead of the system's",
    )
    parser.add_argument(
        "--user", "-u", default=default(os.environ.get("EKE_USER")),
        help="your username on the server (default: $EKE_USER)",
    )
    parser.add_argument(
        "--password-file", metavar="FILE", default=default(None),
        help="read the password from the first line of FILE",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(30.0),
        help="give up when the server makes no progress for this many seconds (default: 30)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", default=default(False), help="print nothing but errors and results")
    parser.add_argument("--no-progress", action="store_true", default=default(False), help="no progress bars even on a terminal")
    parser.add_argument(
        "--json", action="store_true", default=default(False),
        help="print one JSON document on stdout: files, bytes, digests, seconds, status",
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="eke-client",
        description=(
            "Fetch and send files to an eketwist server. Client and server prove to each other "
            "that they share the password (SPAKE2+), then every byte is encrypted and "
            "authenticated, and a file appears under its name only when it is whole and its "
            "SHA-1 matches. Interrupted transfers resume when run again."
        ),
        epilog=errors.EXIT_CODES_HELP
        + "\nenvironment:\n  EKE_HOST, EKE_PORT, EKE_USER  defaults for --host, --port, --user\n"
        "  EKE_PASSWORD                  the password (otherwise --password-file or a prompt)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    get = commands.add_parser(
        "get", help="download files or directories",
        description="Download REMOTE (a path inside your root on the server) to LOCAL: by default "
        "its name in the current directory; an existing directory receives it inside. With several "
        "REMOTEs the last argument must be an existing directory. An interrupted download leaves "
        "LOCAL.part, and the same command continues from it.",
    )
    get.add_argument("paths", nargs="+", metavar="REMOTE... [LOCAL]")
    get.add_argument("-r", "--recursive", action="store_true", help="download directories and their contents")
    get.add_argument("--no-resume", action="store_true", help="start over instead of continuing a .part file")

    put = commands.add_parser(
        "put", help="upload files or directories (needs a read-write account)",
        description="Upload LOCAL to REMOTE: by default its name at the top of your root; an "
        "existing remote directory receives it inside. With several LOCALs the last argument must "
        "be an existing remote directory. An existing remote file is replaced only with --force. "
        "An interrupted upload continues when the same command is run again.",
    )
    put.add_argument("paths", nargs="+", metavar="LOCAL... [REMOTE]")
    put.add_argument("-r", "--recursive", action="store_true", help="upload directories and their contents")
    put.add_argument("-f", "--force", action="store_true", help="replace existing remote files")

    ls = commands.add_parser("ls", help="list a remote directory", description="List PATH (default: the top of your root): name, type, size and modification time, one per line, in name order.")
    ls.add_argument("path", nargs="?", default="", metavar="PATH")
    ls.add_argument("-l", "--long", action="store_true", help="long form: mode, size, date, name")
    ls.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    ls.add_argument(
        "-a", "--all", action="store_true",
        help="also list your partial uploads (interrupted puts kept for a resume; they use space)",
    )

    for sub in (get, put, ls):
        _add_common_options(sub, suppress=True)
        sub.epilog = errors.EXIT_CODES_HELP
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def read_password(args, environ=os.environ):
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\r\n")
        except OSError as problem:
            raise UsageError(f"{args.password_file}: cannot read the password: {problem.strerror}") from None
    elif "EKE_PASSWORD" in environ:
        # Taken out of the environment: os.environ would keep a copy for the process's life.
        password = environ.pop("EKE_PASSWORD")
    else:
        try:
            password = getpass.getpass(f"Password for {args.user}: ")
        except (EOFError, OSError):
            raise UsageError("no password: use --password-file, EKE_PASSWORD, or a terminal") from None
    if not password:
        raise UsageError("the password is empty")
    return password


def remote_basename(remote):
    name = remote.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"{remote}: not a file name")
    return name


def remote_join(directory, name):
    directory = directory.rstrip("/")
    return f"{directory}/{name}" if directory else name


def make_endpoint(reactor, args):
    from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS

    if args.connect:
        if args.tls:
            raise UsageError("--tls goes with --host and --port (a --connect endpoint can say tls: itself)")
        try:
            return clientFromString(reactor, args.connect)
        except (ValueError, TypeError, KeyError) as problem:
            raise UsageError(f"bad --connect endpoint: {problem}") from None
    endpoint = HostnameEndpoint(reactor, args.host, args.port, timeout=args.timeout)
    if args.tls:
        from twisted.internet import ssl

        if args.ca_file:
            try:
                with open(args.ca_file, "rb") as handle:
                    trust = ssl.Certificate.loadPEM(handle.read())
            except (OSError, ValueError, ssl.SSL.Error) as problem:
                raise UsageError(f"--ca-file {args.ca_file}: cannot read a PEM certificate: {problem}") from None
        else:
            trust = ssl.platformTrust()
        # service_identity checks the certificate's names against --host.
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(args.host, trustRoot=trust), endpoint)
    elif args.ca_file:
        raise UsageError("--ca-file goes with --tls")
    return endpoint


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


async def connect(reactor, args, password, prelude):
    """An authenticating ClientProtocol: on the Prelude's socket when there is one, else
    through the endpoint, taking the password out of `password` (see main)."""
    from twisted.internet.protocol import Factory

    from .client_protocol import ClientProtocol

    if prelude is not None:
        derived = prelude.wait()  # usually done already: scrypt ran while we were importing
        client = ClientProtocol(args.user, None, timeout=args.timeout, derived=derived)
        reactor.adoptStreamConnection(prelude.sock.fileno(), prelude.sock.family, Factory.forProtocol(lambda: client))
        prelude.sock.close()  # Twisted holds its own duplicate
        return client
    # Endpoints load TLS support (pyOpenSSL): only when the prelude was not used.
    from twisted.internet.endpoints import connectProtocol

    endpoint = make_endpoint(reactor, args)
    try:
        return await connectProtocol(endpoint, ClientProtocol(args.user, password.pop(), timeout=args.timeout))
    except Exception as problem:
        raise errors.ConnectionFailed(f"cannot connect to the server: {problem}") from None


async def run(reactor, args, password, reporter, prelude=None):
    client = await connect(reactor, args, password, prelude)
    session = Session(client, reporter)
    try:
        await client.authenticated_deferred
        # Everything is imported: spare the cyclic collector from walking those objects again
        # while data flows (its full passes were 2% of a 1 GiB put's CPU).
        gc.freeze()
        await COMMANDS[args.command](session, args)
    finally:
        # Let the last message (a goodbye or an error) reach the server before we exit.
        client.close()
        await client.when_closed.addTimeout(5, reactor).addErrback(lambda _: None)
    return session.first_error


def _load_on_first_use(name):
    """Import module `name` lazily (importlib's LazyLoader): it runs when an attribute is
    first read. twisted.python.compat imports http.cookiejar only to re-export it, and that
    import (urllib, email, http.client) was 12 ms of every command's start."""
    import importlib.util

    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # What the import system does for a submodule it loads; without it, `from http import
    # cookiejar` would look the module up again and, reading its __spec__, load it.
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def main(argv=None):
    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.user:
        parser.error("--user is required (or set EKE_USER)")
    reporter = Reporter(args)
    early = None
    # The password in a list that whoever runs scrypt empties (the Prelude, or the protocol
    # machine, which drops it once scrypt has started): no frame of ours keeps it meanwhile.
    password = []
    try:
        password.append(read_password(args))
        if not (args.connect or args.tls):
            early = Prelude(args.host, args.port, args.user, password.pop(), args.timeout)
            # No TLS on this connection: keep Twisted from loading pyOpenSSL, which it does
            # whenever it can (about 20 ms of a 1 KiB get's 270).
            sys.modules.setdefault("OpenSSL", None)
            # pycryptodome prefers cffi when it is installed and then parses C declarations
            # at import (about 20 ms); its ctypes backend, the same compiled code, does not.
            sys.modules.setdefault("cffi", None)
    except EketwistError as failure:
        early = failure

    _load_on_first_use("http.cookiejar")
    from twisted.internet import defer, task

    async def react_main(reactor):
        error = None
        try:
            if isinstance(early, EketwistError):
                raise early
            error = await run(reactor, args, password, reporter, early)
        except EketwistError as failure:
            error = failure
            if not any(f.get("error", {}).get("message") == failure.message for f in reporter.files):
                reporter.error(failure.message)
        if args.command != "ls" or error is not None:
            reporter.finish(args.command, error)
        if error is not None:
            raise SystemExit(error.exit_code)

    task.react(lambda reactor: defer.ensureDeferred(react_main(reactor)))


if __name__ == "__main__":
    main()
