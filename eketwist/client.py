"""The client command: `python -m eketwist.client` / `eke-client`.

Status and progress go to stderr, data (verified digests, listings, --json) to stdout. Every
failure is one line naming the file and the reason, and a distinct exit code (see --help).
Here: the command line and the connection; eketwist.commands runs the command (with the steps
eketwist.plan decides), eketwist.report shows what happens.

Twisted and the protocol machine are imported only after the Prelude has connected and
started scrypt (eketwist.prelude): the two then overlap instead of adding up.
"""

import argparse
import contextlib
import gc
import os
import signal
import sys

from . import __version__, errors
from .errors import EketwistError, UsageError
from .prelude import Prelude
from .tuning import tune_allocator

DEFAULT_PORT = 4000
# Longer than any link's silence a user would wait out; beyond it the socket calls refuse.
MAX_TIMEOUT = 365 * 24 * 3600


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines, the problem and where to look, not the whole synopsis."""

    def error(self, message):
        self.exit(errors.EXIT_USAGE, f"{self.prog}: {message}\nTry '{self.prog} --help' for more information.\n")


def port_number(text):
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}")
    return port


def seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_TIMEOUT} seconds: {text!r}")
    return value


def permission_bits(text):
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"permission bits only, 0 to 777: {text!r}")
    return mode


def _add_common_options(parser, suppress):
    """Options accepted before or after the command (`eke-client -q get x`, `eke-client get -q x`).
    --host and --port default to None: check_arguments fills them in, from the environment
    or the defaults, and knows whether they were given."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--host", default=default(None),
        help="server host name or address (default: $EKE_HOST or 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=port_number, default=default(None),
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
        "--timeout", type=seconds, default=default(30.0),
        help="give up when the server makes no progress for this many seconds (default: 30)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", default=default(False), help="print nothing but errors and results")
    parser.add_argument("--no-progress", action="store_true", default=default(False), help="no progress bars even on a terminal")
    parser.add_argument(
        "--json", action="store_true", default=default(False),
        help="print one JSON document on stdout: files, bytes, digests, seconds, status",
    )


def check_arguments(parser, args, environ=os.environ):
    """What argparse cannot check alone: the environment's defaults and options that
    contradict each other, all before connecting (a usage error names the option, exit 2)."""
    if not args.user:
        parser.error("--user is required (or set EKE_USER)")
    if args.connect:
        for option, value in (("--host", args.host), ("--port", args.port), ("--tls", args.tls)):
            if value:
                parser.error(f"{option} and --connect do not go together: the endpoint names the host and port (and can say tls: itself)")
    if args.ca_file and not args.tls:
        parser.error("--ca-file goes with --tls")
    if args.host is None:
        args.host = environ.get("EKE_HOST") or "127.0.0.1"
    if args.port is None:
        try:
            args.port = port_number(environ.get("EKE_PORT") or str(DEFAULT_PORT))
        except argparse.ArgumentTypeError as problem:
            parser.error(f"EKE_PORT: {problem}")
    _check_paths(parser, args)
    if args.tls:
        try:
            args.tls = ssl_options(args)  # read now: a bad --ca-file is a usage error
        except UsageError as problem:
            parser.error(problem.message)


def _check_paths(parser, args):
    """The command's local paths, as far as they can be judged before connecting."""
    if args.command == "sync":
        from .sync import is_remote

        if is_remote(args.source) == is_remote(args.destination):
            parser.error("sync: exactly one of SRC and DEST is remote, written :PATH (sync photos :backup/photos)")
    if args.command == "mv" and len(args.paths) < 2:
        parser.error("mv needs a SOURCE and a DEST")
    if args.command == "put":
        *sources, last = args.paths
        sources = sources or [last]
        if "-" in sources:
            parser.error("put -: reading from stdin is not supported: save it to a file and put that")
        if not args.recursive:
            for local in sources:
                if os.path.isdir(local):
                    parser.error(f"{local}: a directory: put -r sends it with its contents")
    elif args.command == "get" and args.paths[-1] == "-" and len(args.paths) > 1:
        if len(args.paths) > 2 or args.recursive:
            parser.error("get REMOTE -: one file only to stdout")
        if args.json:
            parser.error("get REMOTE - writes the file to stdout: no room for --json there")


def build_parser():
    parser = _Parser(
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
    parser.add_argument("--version", action="version", version=f"eke-client {__version__}")
    _add_common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    get = commands.add_parser(
        "get", help="download files or directories",
        description="Download REMOTE (a path inside your root on the server) to LOCAL: by default "
        "its name in the current directory; an existing directory receives it inside; - writes it "
        "to stdout (once verified). With several REMOTEs the last argument must be an existing "
        "directory. A local file that is the same as the server's (size and modification time) is "
        "skipped; one that differs is replaced only with --force, as put does. An interrupted "
        "download leaves LOCAL.part, and the same command continues from it.",
    )
    get.add_argument("paths", nargs="+", metavar="REMOTE... [LOCAL]")
    get.add_argument("-r", "--recursive", action="store_true", help="download directories and their contents")
    get.add_argument("-f", "--force", action="store_true", help="replace local files that differ from the server's")
    get.add_argument("--no-resume", action="store_true", help="start over instead of continuing a .part file")

    put = commands.add_parser(
        "put", help="upload files or directories (needs a read-write account)",
        description="Upload LOCAL to REMOTE: by default its name at the top of your root; an "
        "existing remote directory receives it inside. With several LOCALs the last argument must "
        "be an existing remote directory. A remote file that is the same as LOCAL (size and "
        "modification time) is skipped; one that differs is replaced only with --force. "
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

    mkdir = commands.add_parser("mkdir", help="make remote directories", description="Make the remote directories PATH.")
    mkdir.add_argument("paths", nargs="+", metavar="PATH")
    mkdir.add_argument("-p", "--parents", action="store_true", help="make missing parents too; an existing directory is no error")

    rm = commands.add_parser(
        "rm", help="remove remote files",
        description="Remove the remote files PATH (globs such as 'logs/*.gz' are expanded from the "
        "server's listings; quote them). A directory needs -r, which removes it with everything in it "
        "(never following a symlink, never leaving it); partial uploads of running uploads are left.",
    )
    rm.add_argument("paths", nargs="+", metavar="PATH")
    rm.add_argument("-r", "--recursive", action="store_true", help="remove directories and their contents")
    rm.add_argument("-f", "--force", action="store_true", help="a PATH that does not exist is no error")

    rmdir = commands.add_parser("rmdir", help="remove empty remote directories", description="Remove the empty remote directories PATH.")
    rmdir.add_argument("paths", nargs="+", metavar="PATH")

    mv = commands.add_parser(
        "mv", help="rename or move remote files",
        description="Rename SOURCE to DEST on the server, atomically; into DEST if it is an existing "
        "directory (it must be, with several SOURCEs). An existing DEST is replaced only with --force.",
    )
    mv.add_argument("paths", nargs="+", metavar="SOURCE... DEST")
    mv.add_argument("-f", "--force", action="store_true", help="replace an existing DEST")

    chmod = commands.add_parser(
        "chmod", help="change remote permission bits",
        description="Set the permission bits of the remote files or directories PATH to MODE, in "
        "octal (644, 0755); setuid, setgid and sticky bits are never set.",
    )
    chmod.add_argument("mode", type=permission_bits, metavar="MODE")
    chmod.add_argument("paths", nargs="+", metavar="PATH")

    stat = commands.add_parser("stat", help="show remote entries", description="Show type, mode, size and time of each remote PATH (a symlink as itself).")
    stat.add_argument("paths", nargs="+", metavar="PATH")

    commands.add_parser("df", help="show free space and quotas", description="Show the free space of your root on the server and your quotas, if any.")

    sync = commands.add_parser(
        "sync", help="make a directory a copy of another, one side on the server",
        description="Make DEST a copy of SRC, one of them a remote directory written :PATH (: alone is "
        "your root): `sync photos :backup/photos` sends, `sync :backup/photos photos` fetches. What "
        "differs is transferred (size and modification time, or SHA-1 with --checksum), what is the "
        "same is left; a second run transfers nothing and says so. Interrupted, it resumes when run "
        "again. It never follows symlinks (they are skipped).",
    )
    sync.add_argument("source", metavar="SRC")
    sync.add_argument("destination", metavar="DEST")
    sync.add_argument("--delete", action="store_true", help="delete what SRC no longer has from DEST (excluded names are kept)")
    sync.add_argument("-n", "--dry-run", action="store_true", help="print what would be done (stdout) and change nothing")
    sync.add_argument("-c", "--checksum", action="store_true", help="compare files of equal size by SHA-1, not modification time")
    sync.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="leave out names matching PATTERN (repeatable): without '/', any name in the tree "
        "('*.tmp', 'cache'); with '/', the path from the top ('/build', 'docs/*.pdf')",
    )

    for sub in commands.choices.values():
        _add_common_options(sub, suppress=True)
        sub.epilog = errors.EXIT_CODES_HELP
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


# Tries at an interactive prompt: each a new connection, and each counted by the server.
PASSWORD_TRIES = 3


def read_password(args, reporter, environ=os.environ):
    """The password, and whether it came from the prompt (then a wrong one may be retyped)."""
    if args.password_file:
        name = args.password_file
        try:
            with open(name, encoding="utf-8") as handle:
                if os.fstat(handle.fileno()).st_mode & 0o077:
                    reporter.warn(f"{name}: others can read this password file (chmod 600 {name})")
                password = handle.readline().rstrip("\r\n")
        except OSError as problem:
            raise UsageError(f"--password-file {name}: cannot read it: {problem.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--password-file {name}: not UTF-8 text") from None
        if not password:
            raise UsageError(f"--password-file {name}: its first line is empty")
        return password, False
    if "EKE_PASSWORD" in environ:
        # Taken out of the environment: os.environ would keep a copy for the process's life.
        password = environ.pop("EKE_PASSWORD")
        if not password:
            raise UsageError("EKE_PASSWORD is empty")
        return password, False
    return prompt_password(args.user), True


def prompt_password(user):
    import getpass
    import warnings

    # Without a terminal getpass would read stdin with a warning that it may echo: refused.
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            password = getpass.getpass(f"Password for {user}: ")
        except (EOFError, OSError, getpass.GetPassWarning):
            raise UsageError("no password: use --password-file, EKE_PASSWORD, or run on a terminal") from None
    if not password:
        raise UsageError("the password is empty")
    return password


def make_endpoint(reactor, args):
    from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS

    if args.connect:
        try:
            return clientFromString(reactor, args.connect)
        except Exception as problem:  # a parser's ValueError, KeyError, an unknown plugin...
            raise UsageError(f"--connect {args.connect}: not a client endpoint: {problem}") from None
    endpoint = HostnameEndpoint(reactor, args.host, args.port, timeout=args.timeout)
    if args.tls:
        # service_identity checks the certificate's names against --host.
        endpoint = wrapClientTLS(args.tls, endpoint)
    return endpoint


def ssl_options(args):
    from twisted.internet import ssl

    if not args.ca_file:
        return ssl.optionsForClientTLS(args.host, trustRoot=ssl.platformTrust())
    try:
        with open(args.ca_file, "rb") as handle:
            pem = handle.read()
    except OSError as problem:
        raise UsageError(f"--ca-file {args.ca_file}: {problem.strerror}") from None
    try:
        trust = ssl.Certificate.loadPEM(pem)
    except Exception:  # OpenSSL.crypto.Error, and anything else its parser raises
        raise UsageError(f"--ca-file {args.ca_file}: not a PEM certificate") from None
    return ssl.optionsForClientTLS(args.host, trustRoot=trust)


def where(args):
    """The server as the user named it, for messages."""
    if args.connect:
        return args.connect
    return f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"


def _why_not_connected(problem):
    from twisted.internet import error

    reasons = [
        (error.ConnectionRefusedError, "connection refused (is the server running, on this port?)"),
        (error.DNSLookupError, "unknown host name"),
        (error.TimeoutError, "timed out"),
        (error.NoRouteError, "no route to the host"),
    ]
    for kind, reason in reasons:
        if isinstance(problem, kind):
            return reason
    if isinstance(problem, error.ConnectError) and problem.osError is not None:
        return getattr(problem.osError, "strerror", None) or str(problem.osError)
    return str(problem) or type(problem).__name__


async def connect(reactor, args, password, prelude, stop, reporter):
    """An authenticating ClientProtocol: on the Prelude's socket when there is one, else
    through the endpoint, taking the password out of `password` (see main)."""
    from twisted.internet.defer import CancelledError
    from twisted.internet.protocol import Factory

    from .client_protocol import ClientProtocol

    if prelude is not None:
        with stop.blocking():  # usually done already: scrypt ran while we were importing
            derived = prelude.wait(lambda: reporter.say(
                "waiting for the server's answer (a server delays logins from an address after failed ones)"
            ))
        client = ClientProtocol(args.user, None, timeout=args.timeout, derived=derived)
        reactor.adoptStreamConnection(prelude.sock.fileno(), prelude.sock.family, Factory.forProtocol(lambda: client))
        prelude.sock.close()  # Twisted holds its own duplicate
        return client
    # Endpoints load TLS support (pyOpenSSL): only when the prelude was not used.
    from twisted.internet.endpoints import connectProtocol

    endpoint = make_endpoint(reactor, args)
    try:
        return await connectProtocol(endpoint, ClientProtocol(args.user, password.pop(), timeout=args.timeout))
    except CancelledError:
        raise
    except Exception as problem:
        raise errors.ConnectionFailed(f"cannot connect to {where(args)}: {_why_not_connected(problem)}") from None


def certificate_names(host, port, timeout):
    """The names in the certificate of the TLS server at host:port, fetched again without
    verification only to say what they are; [] if they cannot be had."""
    import socket
    import ssl

    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout) as plain, context.wrap_socket(plain) as tls:
            der = tls.getpeercert(binary_form=True)
        names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name) for name in (*names.get_values_for_type(x509.DNSName), *names.get_values_for_type(x509.IPAddress))]


async def login(reactor, args, password, prompted, reporter, stop, prelude):
    """An authenticated ClientProtocol. A password typed at the prompt may be typed again
    after a failure, PASSWORD_TRIES times in all (each a new login the server counts)."""
    for attempt in range(1, PASSWORD_TRIES + 1):
        client = await connect(reactor, args, password, prelude, stop, reporter)
        stop.client = client
        try:
            await client.authenticated_deferred
            return client
        except errors.NameMismatch as failure:
            from twisted.internet.threads import deferToThread

            names = await deferToThread(certificate_names, args.host, args.port, args.timeout)
            held = f"; it is for {', '.join(names)}" if names else ""
            raise errors.NameMismatch(f"{failure.message}{held} (give --host one of its names)") from None
        except errors.AuthenticationFailed as failure:
            await close(reactor, client)
            if not prompted or attempt == PASSWORD_TRIES:
                raise
            reporter.error(failure.message)
            with stop.blocking():
                password.append(prompt_password(args.user))
            if client.retry_delay:
                reporter.say(
                    f"the server slows down logins from this address after failed ones: its answer "
                    f"will take {client.retry_delay:g} s"
                )
            prelude = None
        except BaseException:
            await close(reactor, client)
            raise
    raise AssertionError("unreachable")


async def close(reactor, client):
    """Let the last message (a goodbye or an error) reach the server before we exit."""
    client.close()
    await client.when_closed.addTimeout(5, reactor).addErrback(lambda _: None)


async def run(reactor, args, password, prompted, reporter, stop, prelude=None):
    # Imported here, like Twisted: never for --help or a usage error, and while scrypt runs.
    from .commands import COMMANDS, Session
    from .manage import COMMANDS as MANAGE

    client = await login(reactor, args, password, prompted, reporter, stop, prelude)
    session = Session(client, reporter, args.command)
    try:
        # Everything is imported: spare the cyclic collector from walking those objects again
        # while data flows (its full passes were 2% of a 1 GiB put's CPU).
        gc.freeze()
        from .sync import run_sync

        await {**COMMANDS, **MANAGE, "sync": run_sync}[args.command](session, args)
    finally:
        await close(reactor, client)
    return session.first_error


class Interruption:
    """SIGINT, SIGTERM and a closed output, turned into an orderly end of the command: the
    connection is cut (what has come is kept for a resume), the command's Deferreds fail with
    the cause, and it is reported like any failure (exit 128 + the signal). Twisted's own
    handlers are not installed: they stop the reactor, and the command would end silently."""

    def __init__(self):
        self.error = None
        self.reactor = None  # while the reactor runs and nothing blocks it
        self.client = None
        self.command = None  # the command's Deferred

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Ignored by whoever started us (nohup, a shell's background job): left so.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._signalled)

    def _signalled(self, signum, frame):
        if self.error is not None:  # a second time: the user means it
            os._exit(errors.EXIT_SIGNAL_BASE + signum)
        self.error = errors.Interrupted(signum)
        if self.reactor is None:
            raise self.error  # out of whatever blocks: the prompt, the first round, imports
        self.reactor.callFromThread(self._stop)

    def output_closed(self):
        """Called on the reactor's thread when stdout or stderr is a closed pipe."""
        if self.error is None:
            self.error = errors.OutputClosed()
            self._stop()

    def _stop(self):
        if self.client is not None and not self.client.closing:
            self.client.interrupt(self.error)
        elif self.command is not None:
            self.command.cancel()

    @contextlib.contextmanager
    def blocking(self):
        """Around a call that blocks the reactor's thread: a signal raises out of it."""
        reactor, self.reactor = self.reactor, None
        try:
            if self.error is not None:
                raise self.error
            yield
        finally:
            self.reactor = reactor


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
    stop = Interruption()
    stop.install()
    reporter = error = args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_arguments(parser, args)
        # Past --help and usage errors, which do without it (and its escaping's regular expressions).
        from .report import Reporter

        reporter = Reporter(args, on_output_closed=stop.output_closed)
        error = _command(args, reporter, stop)
    except EketwistError as failure:  # an interrupt before or after the reactor ran
        error = failure
    except Exception as unexpected:  # a bug: one line, the traceback only when asked for
        if os.environ.get("EKE_DEBUG"):
            raise
        error = EketwistError(
            f"unexpected failure (a bug; EKE_DEBUG=1 shows where): {type(unexpected).__name__}: {unexpected}"
        )
    sys.exit(_report_end(args, reporter, error))


def _command(args, reporter, stop):
    """Run the command on a reactor; the error that ends it, or None."""
    early = None
    prompted = False
    # The password in a list that whoever runs scrypt empties (the Prelude, or the protocol
    # machine, which drops it once scrypt has started): no frame of ours keeps it meanwhile.
    password = []
    try:
        typed, prompted = read_password(args, reporter)
        password.append(typed)
        del typed
        if not (args.connect or args.tls):
            # The imports below (Twisted, with pyOpenSSL, and the curve code) now overlap the
            # first round and scrypt in the prelude's thread: measured, a 1 KiB get takes the
            # same whether or not pyOpenSSL and cffi are kept out (379 ms both, 60 pairs).
            early = Prelude(args.host, args.port, args.user, password.pop(), args.timeout)
    except errors.Interrupted:
        raise
    except EketwistError as failure:
        early = failure

    _load_on_first_use("http.cookiejar")
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure

    async def command():
        if isinstance(early, EketwistError):
            raise early
        return await run(reactor, args, password, prompted, reporter, stop, early)

    outcome = []

    def start():
        stop.reactor = reactor
        stop.command = defer.ensureDeferred(command())
        stop.command.addBoth(outcome.append)
        stop.command.addBoth(lambda _: reactor.stop())

    _log_only_bugs(reporter)
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    stop.reactor = None
    result = outcome[0]
    if isinstance(stop.error, errors.OutputClosed):
        return stop.error  # even if all was done: some of it could not be shown
    if not isinstance(result, Failure):
        return result
    if stop.error is not None:  # whatever failed once we had cut the connection
        return stop.error
    if result.check(EketwistError):
        return result.value
    result.raiseException()


def _log_only_bugs(reporter):
    """Twisted's log goes nowhere but this: a failure nobody handled (a bug) is one line on
    stderr, not Twisted's traceback; EKE_DEBUG=1 shows it whole."""
    from twisted.logger import formatEventAsClassicLogText, globalLogBeginner

    debug = bool(os.environ.get("EKE_DEBUG"))

    def observe(event):
        failure = event.get("log_failure")
        if debug:
            sys.stderr.write(formatEventAsClassicLogText(event))
        elif failure is not None:
            reporter.error(f"unexpected failure (a bug; EKE_DEBUG=1 shows where): {failure.type.__name__}: {failure.value}")

    globalLogBeginner.beginLoggingTo([observe], discardBuffer=True, redirectStandardIO=False)


def _report_end(args, reporter, error):
    """Say how the command ended (stderr, and --json's document); its exit status."""
    if reporter is None:  # before the command line was read
        if error is not None:
            sys.stderr.write(f"eke-client: {error.message}\n")
        return error.exit_code if error is not None else 0
    if isinstance(error, errors.OutputClosed):
        return error.exit_code  # nowhere to say anything, and nothing to say
    if error is not None and not any(f.get("error", {}).get("message") == error.message for f in reporter.files):
        reporter.error(error.message)
    if args.command != "ls" or error is not None:
        reporter.finish(args.command, error)
    return error.exit_code if error is not None else 0


if __name__ == "__main__":
    main()
