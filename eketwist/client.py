"""The client command: `python -m eketwist.client` / `eke-client`.

Status and progress go to stderr, data (verified digests, listings, --json) to stdout. Every
failure is one line naming the file and the reason, and a distinct exit code (see --help).
Here: the password, the connection, the login and the command's end (interrupts, exit codes);
eketwist.arguments reads the command line, eketwist.commands, .manage and .sync run the
commands (with the steps eketwist.plan decides), eketwist.report shows what happens.

Twisted and the protocol machine are imported only after the Prelude has connected and
started scrypt (eketwist.prelude): the two then overlap instead of adding up.
"""

import contextlib
import gc
import os
import signal
import sys

from . import errors
from .arguments import build_parser, check_arguments
from .errors import EketwistError, UsageError
from .prelude import Prelude, host_port
from .tuning import tune_allocator

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


def where(args):
    """The server as the user named it, for messages."""
    if args.connect:
        return args.connect
    return host_port(args.host, args.port)


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
        if isinstance(problem.osError, int):  # some endpoints give the errno alone
            return os.strerror(problem.osError)
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
            if args.connect:  # its host and port are the endpoint's: name it in the endpoint
                raise errors.NameMismatch(f"{failure.message} (connect with a name it is for)") from None
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
        stop.finishing = True
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
        self.finishing = False  # the command's work is done: it only says goodbye
        self.finished = False  # the reactor has stopped: the end is being reported

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Ignored by whoever started us (nohup, a shell's background job): left so.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._signalled)

    def _signalled(self, signum, frame):
        if self.error is not None or self.finished:  # a second time, or while the end is
            os.write(2, b"eke-client: interrupted\n")  # written (to a pipe that may be full)
            os._exit(errors.EXIT_SIGNAL_BASE + signum)
        self.error = errors.Interrupted(signum)
        if self.reactor is None:
            raise self.error  # out of whatever blocks: the prompt, the first round, imports
        self.reactor.callFromThread(self._stop)

    def output_closed(self, error=None):
        """Called on the reactor's thread when stdout or stderr cannot be written: a closed
        pipe (OutputClosed), or `error` (a full disk, say)."""
        if self.error is None:
            self.error = error or errors.OutputClosed()
            self._stop()

    def _stop(self):
        if self.finishing:
            return  # all was done: the goodbye goes on, the result stands
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
    if sys.stderr is None:  # started with it closed: messages go nowhere, quietly
        sys.stderr = open(os.devnull, "w")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_arguments(parser, args)
        # Past --help and usage errors, which do without it (and its escaping's regular expressions).
        from .report import Reporter

        if sys.stdout is None:
            raise errors.LocalIOError("stdout is closed: there is nowhere to write the results")
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
    try:
        code = _report_end(args, reporter, error)
    except OSError as problem:  # stdout full or gone while the end was written
        os.write(2, f"eke-client: cannot write to stdout: {problem.strerror}\n".encode())
        code = errors.EXIT_LOCAL_IO
    sys.exit(code)


def _command(args, reporter, stop):
    """Run the command on a reactor; the error that ends it, or None."""
    early: "Prelude | EketwistError | None" = None
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

    outcome: list = []  # the command's result, or its Failure

    def start():
        stop.reactor = reactor
        stop.command = defer.ensureDeferred(command())
        stop.command.addBoth(outcome.append)
        stop.command.addBoth(lambda _: reactor.stop())

    _log_only_bugs(reporter)
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    stop.reactor = None
    stop.finished = True
    result = outcome[0]
    if isinstance(stop.error, (errors.OutputClosed, errors.LocalIOError)):
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
