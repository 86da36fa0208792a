"""The client command: `python -m eketwist.client` / `eke-client`.

Status and progress go to stderr, data (verified digests, listings, --json) to stdout. Every
failure is one line naming the file and the reason, and a distinct exit code (see --help).
Here: the command line and the connection; eketwist.commands runs the command (with the steps
eketwist.plan decides), eketwist.report shows what happens.

Twisted and the protocol machine are imported only after the Prelude has connected and
started scrypt (eketwist.prelude): the two then overlap instead of adding up.
"""

import argparse
import gc
import getpass
import os
import sys

from . import errors
from .errors import EketwistError, UsageError
from .prelude import Prelude
from .tuning import tune_allocator

DEFAULT_PORT = 4000


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
    # Imported here, like Twisted: never for --help or a usage error, and while scrypt runs.
    from .commands import COMMANDS, Session

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
    # Past --help and usage errors, which do without it (and its escaping's regular expressions).
    from .report import Reporter

    reporter = Reporter(args)
    early = None
    # The password in a list that whoever runs scrypt empties (the Prelude, or the protocol
    # machine, which drops it once scrypt has started): no frame of ours keeps it meanwhile.
    password = []
    try:
        password.append(read_password(args))
        if not (args.connect or args.tls):
            # The imports below (Twisted, with pyOpenSSL, and the curve code) now overlap the
            # first round and scrypt in the prelude's thread: measured, a 1 KiB get takes the
            # same whether or not pyOpenSSL and cffi are kept out (379 ms both, 60 pairs).
            early = Prelude(args.host, args.port, args.user, password.pop(), args.timeout)
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
