"""The client command: `python -m eketwist.client` / `eke-client`.

Status goes to stderr, data (the verified SHA-1) to stdout; every failure is one line naming
the file and the reason, and a distinct exit code (see --help).
"""

import argparse
import getpass
import os
import sys
import time

from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, connectProtocol

from . import errors
from .client_protocol import ClientProtocol
from .errors import EketwistError, UsageError

DEFAULT_PORT = 4000


def build_parser():
    parser = argparse.ArgumentParser(
        prog="eke-client",
        description=(
            "Fetch files from an eketwist server. Client and server prove to each other that "
            "they share the password (SPAKE2+), then every byte is encrypted and authenticated, "
            "and a file appears under its name only when it is whole and its SHA-1 matches."
        ),
        epilog=errors.EXIT_CODES_HELP
        + "\nenvironment:\n  EKE_PASSWORD  the password (otherwise --password-file or a prompt)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="server host name or address (default: %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=DEFAULT_PORT, help="server TCP port (default: %(default)s)")
    where.add_argument(
        "--connect",
        metavar="ENDPOINT",
        help="a Twisted client endpoint instead of --host/--port, e.g. tcp:host=example.org:port=4000",
    )
    parser.add_argument("--user", "-u", required=True, help="your username on the server")
    parser.add_argument(
        "--password-file", metavar="FILE", help="read the password from the first line of FILE"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="give up when the server does not answer for this many seconds (default: %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors and the result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    get = commands.add_parser(
        "get",
        help="download a file",
        description="Download REMOTE (a path inside the server's root) to LOCAL "
        "(default: its name, in the current directory; an existing directory receives it).",
    )
    get.add_argument("remote", metavar="REMOTE")
    get.add_argument("local", metavar="LOCAL", nargs="?")
    return parser


def read_password(args, environ=os.environ):
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\r\n")
        except OSError as problem:
            raise UsageError(f"{args.password_file}: cannot read the password: {problem.strerror}") from None
    elif "EKE_PASSWORD" in environ:
        password = environ["EKE_PASSWORD"]
    else:
        try:
            password = getpass.getpass(f"Password for {args.user}: ")
        except (EOFError, OSError):
            raise UsageError("no password: use --password-file, EKE_PASSWORD, or a terminal") from None
    if not password:
        raise UsageError("the password is empty")
    return password


def local_destination(remote, local):
    name = remote.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"{remote}: not a file name")
    if local is None:
        return name
    if os.path.isdir(local) or local.endswith(os.sep):
        return os.path.join(local, name)
    return local


class TqdmProgress:
    """One progress bar on stderr per file."""

    def __init__(self):
        self._bar = None

    def start(self, name, size):
        from tqdm import tqdm

        self._bar = tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=True)

    def update(self, nbytes):
        self._bar.update(nbytes)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_endpoint(reactor, args):
    if args.connect:
        try:
            return clientFromString(reactor, args.connect)
        except (ValueError, TypeError, KeyError) as problem:
            raise UsageError(f"bad --connect endpoint: {problem}") from None
    return HostnameEndpoint(reactor, args.host, args.port, timeout=args.timeout)


async def run(reactor, args, password, out=sys.stdout, err=sys.stderr):
    endpoint = make_endpoint(reactor, args)
    try:
        client = await connectProtocol(endpoint, ClientProtocol(args.user, password, timeout=args.timeout))
    except Exception as problem:
        raise errors.ConnectionFailed(f"cannot connect to the server: {problem}") from None
    try:
        await client.authenticated_deferred
        destination = local_destination(args.remote, args.local)
        show_progress = not (args.quiet or args.no_progress) and err.isatty()
        started = time.monotonic()
        result = await client.get(args.remote, destination, TqdmProgress() if show_progress else None)
        seconds = time.monotonic() - started
        if not args.quiet:
            rate = result["size"] / seconds / 1e6 if seconds > 0 else 0.0
            err.write(f"{destination}: {result['size']} bytes verified in {seconds:.2f} s ({rate:.1f} MB/s)\n")
        out.write(f"{result['sha1']}  {destination}\n")
        out.flush()
    finally:
        # Let the last message (a goodbye or an error) reach the server before we exit.
        client.close()
        await client.when_closed.addTimeout(5, reactor).addErrback(lambda _: None)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    async def react_main(reactor):
        try:
            password = read_password(args)
            await run(reactor, args, password)
        except EketwistError as error:
            sys.stderr.write(f"eke-client: {error.message}\n")
            raise SystemExit(error.exit_code)

    task.react(lambda reactor: defer.ensureDeferred(react_main(reactor)))


if __name__ == "__main__":
    main()
