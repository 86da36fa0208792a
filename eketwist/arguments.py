"""The client command's command line: its options and commands, and every check that can be
made before connecting (a usage error names the option, exit 2, in two lines)."""

import argparse
import os

from . import __version__, errors
from .errors import UsageError

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
    if args.ca_file and args.connect:
        parser.error("--ca-file and --connect do not go together: a tls: endpoint names what it trusts (trustRoots=)")
    if args.ca_file and not args.tls:
        parser.error("--ca-file goes with --tls")
    if args.host is None:
        args.host = environ.get("EKE_HOST") or "127.0.0.1"
    try:
        if not args.host or args.host.encode("idna") == b"":
            raise UnicodeError("empty")
    except UnicodeError:
        parser.error(f"--host: not a host name or address: {args.host!r}")
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
    elif args.command == "get" and len(args.paths) > 2 and args.paths[-1] != "-":
        from .plan import get_arguments

        try:
            get_arguments(args.paths)
        except UsageError as problem:
            parser.error(problem.message)
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
        help="leave out names matching PATTERN (repeatable), by rsync's rules: without '/', any name "
        "in the tree ('*.tmp', 'cache'); a trailing '/', directories only; with '/', the end of the "
        "path ('docs/*.pdf'); a leading '/', from the top ('/build')",
    )

    for sub in commands.choices.values():
        _add_common_options(sub, suppress=True)
        sub.epilog = errors.EXIT_CODES_HELP
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


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
