"""The twistd plugin's Options and makeService: `twistd eke --port 4000 --root ./files`.

Everything that can be checked before start is checked here, and a refusal is one line on
stderr naming the option and its value, exit status 2 (twistd would print its whole help
first, and a traceback for what it finds later). A start that fails after that (a port in
use) is eketwist.service.CannotStart: one line too, exit status 1."""

import math
import os
import re
import resource
import socket
import sys

from twisted.application import internet
from twisted.python import usage

from . import __version__, exposure, guard, logs, proxy, server, service, sizes, userdb
from .tuning import tune_allocator

PROGRAM = "twistd eke"
USAGE_ERROR = 2  # as getopt-style tools do; 1 is for a start that failed

_P = guard.Policy()


# Each option's value is converted by a function that names the option in its refusal
# (usage.Options would say "Parameter type enforcement failed", naming nothing).


def _number(option, kind, lowest, lowest_allowed):
    noun = "a number" if kind is float else "a whole number"

    def coerce(text):
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: not {noun}: {text!r}") from None
        if not math.isfinite(value):
            raise usage.UsageError(f"--{option}: not a finite number: {text!r}")
        if value < lowest or (value == lowest and not lowest_allowed):
            if lowest_allowed:
                bound = "must not be negative" if lowest == 0 else f"must be at least {lowest}"
            else:
                bound = f"must be more than {lowest}"
            raise usage.UsageError(f"--{option}: {bound}: {text!r}")
        return value

    return coerce


def _positive(option):
    return _number(option, float, 0, False)


def _not_negative(option):
    return _number(option, float, 0, True)


def _count(option):
    return _number(option, int, 1, True)


def _option(name, default, doc, check=None, short=None):
    row = [name, short, default, doc]
    return row + [check(name)] if check else row


# The --help lists these groups in this order (usage.Options would sort them all by name).
_ESSENTIAL = [
    _option("port", "4000", "where to listen: a port number (TCP on all interfaces) or a Twisted endpoint such as "
            "tcp:4000:interface=127.0.0.1, ssl:..., systemd:domain=INET:name=eke, haproxy:tcp:4001", short="p"),
    _option("root", ".", "the directory whose files are served (it must not contain the users file, the "
            "pidfile, the log or a TLS key)", short="r"),
    _option("users", "./eke-users", "the users file (create it with eke-users add NAME)", short="u"),
    _option("server-id", socket.gethostname(), "this server's name in the handshake (idVerifier)"),
]
_SERVICE = [
    _option("handshake-timeout", server.DEFAULT_HANDSHAKE_TIMEOUT, "seconds a client has to authenticate",
            _positive),
    _option("idle-timeout", server.DEFAULT_IDLE_TIMEOUT, "seconds an authenticated connection may stay idle",
            _positive),
    _option("max-upload-size", None, "the largest upload accepted, in bytes (suffixes K, M, G, T; default: no "
            "limit)"),
    _option("partial-max-age", server.DEFAULT_PARTIAL_MAX_AGE, "seconds after which an abandoned partial upload "
            "is deleted (604800: 7 days)", _positive),
    _option("shutdown-grace", service.DEFAULT_SHUTDOWN_GRACE, "seconds running transfers may take to finish "
            "after SIGTERM", _positive),
    _option("trusted-proxies", None, "with a haproxy: port, the addresses or networks (CIDR) of the proxies "
            "allowed to send a PROXY header, comma-separated; connections from anywhere else are closed at once"),
]
# docs/security.md: floods and password guessing.
_HARDENING = [
    _option("max-startups", f"{_P.startups_start}:{_P.startups_rate}:{_P.startups_full}",
            "handshakes in progress, start:rate:full as OpenSSH's MaxStartups: beyond start, new connections "
            "are dropped with probability rate%, rising to 100% at full"),
    _option("max-per-source", _P.max_per_source, "connections at once from one address", _count),
    _option("max-connections", _P.max_connections, "connections at once in all", _count),
    _option("max-failures", _P.max_source_failures, "failed logins from one address within --failure-window "
            "before it is locked out", _count),
    _option("failure-window", _P.failure_window, "seconds over which failed logins are counted", _not_negative),
    _option("lockout", _P.source_lockout, "seconds an address stays locked out", _not_negative),
    _option("failure-delay", _P.delay_base, "seconds of delay after one failure; each further failure doubles "
            "it", _not_negative),
    _option("max-source-delay", _P.max_source_delay, "the largest delay for one address", _not_negative),
    _option("max-user-delay", _P.max_user_delay, "the largest delay for one username: how long guessing on a "
            "name can slow its owner", _not_negative),
    _option("handshake-rate", _P.handshake_rate, "handshakes per second one address may start (its budget of "
            "the daemon's CPU); beyond it, answers wait", _positive),
    _option("handshake-burst", _P.handshake_burst, "handshakes one address may start at once", _count),
]
_HELP_SECTIONS = [
    ("Options", [row[0] for row in _ESSENTIAL]),
    ("Service", [row[0] for row in _SERVICE]),
    ("Hardening against floods and password guessing (docs/security.md)", [row[0] for row in _HARDENING]),
]
# A help line's first option: "  -p, --port=..." or "      --server-id=...".
_HELP_ENTRY = re.compile(r"  (?:-\w,|   ) --([\w-]+)")


def _print_and_exit(text):
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `twistd eke --help | head`: the reader had enough. Python would still complain when
        # it flushes stdout at exit; point stdout at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


class Options(usage.Options):
    synopsis = "[--port ENDPOINT] [--root DIR] [--users FILE] [--server-id NAME] [more options]"
    longdesc = (
        "Serve the files under --root to users who prove they know their password with "
        "SPAKE2+ (RFC 9383); every byte is then encrypted and authenticated. Users are "
        "managed with eke-users; the users file is re-read when it changes."
    )
    optParameters = _ESSENTIAL + _SERVICE + _HARDENING

    def opt_help(self):
        """Display this help and exit."""
        _print_and_exit(str(self))

    def opt_version(self):
        """Display eketwist's version and exit."""
        _print_and_exit(f"eketwist {__version__}")

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as problem:
            if self.parent is None:
                raise  # not run by twistd: the caller reports it
            # twistd would print its whole help before the problem: one line is enough.
            sys.stderr.write(f"{PROGRAM}: {problem}\n")
            raise SystemExit(USAGE_ERROR) from None

    def parseArgs(self, *extra):
        if extra:
            raise usage.UsageError(f"unexpected argument {extra[0]!r} (the options start with --)")

    def getUsage(self, width=None):
        """The options in groups, the essential ones first (see _HELP_SECTIONS)."""
        text = super().getUsage(width)
        listing, _, longdesc = text.removeprefix("Options:\n").partition("\n\n")
        entries = {}
        for line in listing.splitlines(keepends=True):
            match = _HELP_ENTRY.match(line)
            if match:
                name = match.group(1)
                entries[name] = ""
            entries[name] += line
        parts = [longdesc.strip() + "\n"] if longdesc.strip() else []
        for heading, names in _HELP_SECTIONS:
            parts.append(f"\n{heading}:\n" + "".join(entries.pop(name) for name in names))
        parts.append("\nOther:\n" + "".join(entries.values()))
        return "".join(parts)

    def postOptions(self):
        port = self["port"]
        if port.isdigit():
            self["port"] = port = f"tcp:{port}"
        self._check_proxies()
        root = self["root"]
        if not os.path.isdir(root):
            problem = "not a directory" if os.path.exists(root) else "no such directory"
            raise usage.UsageError(f"--root: {problem}: {root!r}")
        # Relative to where twistd was started, also after it changes directory.
        self["users"] = os.path.abspath(self["users"])
        pidfile, logfile = exposure.twistd_files(self.parent)
        self._check_twistd_files(pidfile, logfile)
        self["protected"] = exposure.Protected(self["users"], pidfile, logfile, exposure.tls_key_paths(port))
        self["twistd-logfile"] = logfile
        self._refuse_exposure([root])
        server_id = self["server-id"]
        if not server_id or len(server_id.encode("utf-8")) > 255:
            raise usage.UsageError(f"--server-id: must be 1 to 255 bytes: {server_id!r}")
        if self["max-upload-size"] is not None:
            self["max-upload-size"] = parse_size(self["max-upload-size"])
        self["policy"] = self._policy()
        try:
            users = userdb.load(self["users"])
        except userdb.UsersFileError as problem:
            raise usage.UsageError(f"--users: {problem}") from None
        self._refuse_exposure([user.root for user in users.by_name.values() if user.root])
        check_endpoint(port)

    def _check_proxies(self):
        behind_proxy = proxy.is_proxy_description(self["port"])
        if self["trusted-proxies"] is None:
            if behind_proxy:
                raise usage.UsageError(
                    f"--port {self['port']}: a PROXY header is believed only from the proxies listed "
                    "with --trusted-proxies ADDR[,ADDR...] (HAProxy's addresses, e.g. 127.0.0.1)"
                )
            return
        if not behind_proxy:
            raise usage.UsageError("--trusted-proxies applies only to a haproxy: port (e.g. --port haproxy:tcp:4001)")
        try:
            self["trusted-proxies"] = proxy.TrustedProxies.parse(self["trusted-proxies"])
        except ValueError as problem:
            raise usage.UsageError(f"--trusted-proxies: {problem}") from None

    def _check_twistd_files(self, pidfile, logfile):
        """twistd would find a missing directory only after it daemonized (the pidfile) or
        with a traceback (the log)."""
        if self.parent is None or self.parent.get("chroot"):
            return  # paths inside a chroot cannot be checked from outside it
        for option, path in (("--pidfile", pidfile), ("--logfile", logfile)):
            if path:
                directory = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(directory):
                    raise usage.UsageError(f"twistd {option}: no such directory: {directory!r}")
        running = _running_pid(pidfile)
        if running:  # twistd would say so in six lines
            raise usage.UsageError(f"twistd --pidfile: a daemon runs as PID {running} ({os.path.normpath(pidfile)}): "
                                   f"stop it (kill {running}) or choose another --pidfile")

    def _refuse_exposure(self, roots):
        problem = self["protected"].problem(roots)
        if problem:
            raise usage.UsageError(problem)

    def _policy(self):
        text = self["max-startups"]
        try:
            start, rate, full = (int(part) for part in text.split(":"))
        except ValueError:
            raise usage.UsageError(f"--max-startups: not start:rate:full (e.g. 1500:30:3000): {text!r}") from None
        if not 0 < start <= full:
            raise usage.UsageError(f"--max-startups: start must be more than 0 and at most full: {text!r}")
        if not 0 <= rate <= 100:
            raise usage.UsageError(f"--max-startups: rate is a percentage (0 to 100): {text!r}")
        policy = guard.Policy(
            failure_window=self["failure-window"],
            max_source_failures=self["max-failures"],
            source_lockout=self["lockout"],
            delay_base=self["failure-delay"],
            max_source_delay=self["max-source-delay"],
            max_user_delay=self["max-user-delay"],
            handshake_rate=self["handshake-rate"],
            handshake_burst=self["handshake-burst"],
            startups_start=start,
            startups_rate=rate,
            startups_full=full,
            max_per_source=self["max-per-source"],
            max_connections=self["max-connections"],
        )
        problems = policy.check()
        if problems:
            raise usage.UsageError("; ".join(f"--{problem}" for problem in problems))
        return policy


def _running_pid(pidfile):
    """The live process a pidfile names, or None (twistd removes a stale one itself)."""
    try:
        with open(pidfile) as handle:
            pid = int(handle.read())
        os.kill(pid, 0) if pid > 0 else None
    except PermissionError:
        return pid  # alive, someone else's
    except (TypeError, OSError, ValueError):
        return None
    return pid if pid > 0 else None


def parse_size(text):
    try:
        return sizes.parse_size(text)
    except ValueError as problem:
        raise usage.UsageError(f"--max-upload-size: {problem}") from None


_SEPARATOR = re.compile(r"(?<!\\):")


def _arguments(description):
    """The name=value arguments of an endpoint description."""
    arguments = {}
    for segment in _SEPARATOR.split(description):
        name, equals, value = segment.partition("=")
        if equals:
            arguments[name] = re.sub(r"\\(.)", r"\1", value)
    return arguments


def check_endpoint(description):
    """Parse the --port description as makeService will, and refuse it in one line naming
    what is wrong. Twisted parses when the service is made, before the daemon forks: an ssl:
    port's key and certificate are read then."""
    from twisted.internet import endpoints, reactor

    inner = proxy.inner_description(description) if proxy.is_proxy_description(description) else description
    kind = inner.split(":", 1)[0].strip().lower()
    try:
        endpoints.serverFromString(reactor, inner)
    except OSError as problem:  # a file of an ssl: port
        raise usage.UsageError(f"--port: {_tls_role(inner, problem.filename)}{problem.filename}: "
                               f"{problem.strerror}") from None
    except Exception as problem:  # any failure to parse means the description is unusable
        if kind == "ssl":
            raise usage.UsageError(f"--port: {_tls_problem(inner, problem)}") from None
        raise usage.UsageError(f"--port: {_endpoint_problem(kind, problem)}: {description!r}") from None


def _tls_files(description):
    """{path: what it is} for an ssl: description's key and certificate (Twisted's defaults)."""
    arguments = _arguments(description)
    key = arguments.get("privateKey", "server.pem")
    certificate = arguments.get("certKey") or key
    if certificate == key:
        return {key: "the TLS certificate and key"}
    return {certificate: "the TLS certificate", key: "the TLS key"}


def _tls_role(description, filename):
    roles = {os.path.abspath(path): role for path, role in _tls_files(description).items()}
    return roles[filename] + " " if filename in roles else ""


def _endpoint_problem(kind, problem):
    if isinstance(problem, ValueError) and str(problem).startswith("Unknown endpoint type"):
        return f"unknown endpoint type {kind!r} (give a port number, or e.g. tcp:4000:interface=127.0.0.1)"
    if kind == "systemd" and isinstance(problem, (KeyError, IndexError)):
        return "no such socket passed by systemd (socket activation, FileDescriptorName=)"
    # "_parseTCP() got an unexpected keyword argument 'foo'": the function's name says nothing.
    return "not a valid endpoint description (" + re.sub(r"^\w+\(\) ", "", str(problem)) + ")"


def _tls_problem(description, problem):
    """OpenSSL does not say which file it could not load: look at them."""
    files = _tls_files(description)
    for path, role in files.items():
        try:
            with open(path, "rb") as handle:
                text = handle.read()
        except OSError as unreadable:
            return f"{role} {path}: {unreadable.strerror}"
        if "certificate" in role and b"-----BEGIN CERTIFICATE-----" not in text:
            return f"{role} {path}: no PEM certificate in it"
        if "key" in role and not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            return f"{role} {path}: no PEM private key in it"
    return f"{' and '.join(f'{role} {path}' for path, role in files.items())}: {problem}"


def raise_descriptor_limit(policy, log=None):
    """Connections need descriptors: raise the soft limit to the hard one, and keep the
    connection cap within what the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = policy.max_connections + 64  # files being sent or received, the listening port, logs
    if soft < wanted and soft != resource.RLIM_INFINITY:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        policy.max_connections = max(1, soft - 64)
        if log is not None:
            log.warn("descriptor limit {soft}: at most {count} connections", soft=soft, count=policy.max_connections)


def _terminal_for_failures(twistd_options):
    """Where a failed start is told besides the log: the terminal, when twistd stays in the
    foreground and its log goes elsewhere. (A daemonizing twistd tells its terminal itself;
    a log on stdout already shows it.)"""
    if twistd_options is None or not twistd_options.get("nodaemon"):
        return None
    logfile = twistd_options.get("logfile")
    to_stdout = logfile in ("-", "", None) and not twistd_options.get("syslog") and not twistd_options.get("logger")
    return None if to_stdout else sys.stderr  # still the terminal: twistd redirects it later


def makeService(options):
    if options.get("twistd-logfile"):
        logs.restrict_log_file(options["twistd-logfile"])  # before twistd opens it
    tune_allocator()
    policy = options["policy"]
    raise_descriptor_limit(policy, server.ServerFactory.log)
    factory = server.ServerFactory(
        root=options["root"],
        users_path=options["users"],
        server_id=options["server-id"],
        handshake_timeout=options["handshake-timeout"],
        idle_timeout=options["idle-timeout"],
        max_upload_size=options["max-upload-size"],
        partial_max_age=options["partial-max-age"],
        policy=policy,
        protected_paths=options["protected"].files(),
    )
    protected, server_root = options["protected"], factory.root
    factory.users.check = lambda users: protected.users_problem(server_root, users)
    top = service.EketwistService(
        options["port"], factory, options["shutdown-grace"], trusted_proxies=options["trusted-proxies"],
        terminal=_terminal_for_failures(options.parent),
    )
    # Abandoned partial uploads: swept at start and then every hour (or age, if shorter).
    sweep_every = min(3600.0, options["partial-max-age"])
    internet.TimerService(sweep_every, factory.sweep_partial_uploads).setServiceParent(top)
    return top
