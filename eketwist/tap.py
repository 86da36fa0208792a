"""The twistd plugin's Options and makeService: `twistd eke --port 4000 --root ./files`."""

import os
import resource
import socket

from twisted.application import internet
from twisted.python import usage

from . import exposure, guard, logs, proxy, server, service, userdb
from .tuning import tune_allocator

_P = guard.Policy()


class Options(usage.Options):
    synopsis = "[--port ENDPOINT] [--root DIR] [--users FILE] [--server-id NAME] [--trusted-proxies ADDR,...]"
    longdesc = (
        "Serve the files under --root to users who prove they know their password with "
        "SPAKE2+ (RFC 9383); every byte is then encrypted and authenticated. Users are "
        "managed with eke-users; the users file is re-read when it changes."
    )
    optParameters = [
        ["port", "p", "4000", "where to listen: a port number (TCP on all interfaces) or a Twisted "
         "endpoint such as tcp:4000:interface=127.0.0.1, ssl:..., systemd:domain=INET:name=eke"],
        ["trusted-proxies", None, None,
         "with a haproxy: port, the addresses or networks (CIDR) of the proxies allowed to send a "
         "PROXY header, comma-separated; connections from anywhere else are closed at once"],
        ["root", "r", ".", "the directory whose files are served (it must not contain the users "
         "file, the pidfile, the log or a TLS key)"],
        ["users", "u", "./eke-users", "the users file (create it with eke-users add NAME)"],
        ["server-id", None, socket.gethostname(), "this server's name in the handshake (idVerifier)"],
        ["handshake-timeout", None, server.DEFAULT_HANDSHAKE_TIMEOUT, "seconds a client has to authenticate", float],
        ["idle-timeout", None, server.DEFAULT_IDLE_TIMEOUT, "seconds an authenticated connection may stay idle", float],
        ["max-upload-size", None, None, "the largest upload accepted, in bytes (suffixes K, M, G, T; default: no limit)"],
        ["shutdown-grace", None, service.DEFAULT_SHUTDOWN_GRACE,
         "seconds running transfers may take to finish after SIGTERM", float],
        ["partial-max-age", None, server.DEFAULT_PARTIAL_MAX_AGE,
         "seconds after which an abandoned partial upload is deleted (default: 7 days)", float],
        # Hardening (docs/security.md): floods and password guessing.
        ["max-startups", None, f"{_P.startups_start}:{_P.startups_rate}:{_P.startups_full}",
         "handshakes in progress, start:rate:full as OpenSSH's MaxStartups: beyond start, new "
         "connections are dropped with probability rate%, rising to 100% at full"],
        ["max-per-source", None, _P.max_per_source, "connections at once from one address", int],
        ["max-connections", None, _P.max_connections, "connections at once in all", int],
        ["max-failures", None, _P.max_source_failures,
         "failed logins from one address within --failure-window before it is locked out", int],
        ["failure-window", None, _P.failure_window, "seconds over which failed logins are counted", float],
        ["lockout", None, _P.source_lockout, "seconds an address stays locked out", float],
        ["failure-delay", None, _P.delay_base,
         "seconds of delay after one failure; each further failure doubles it", float],
        ["max-source-delay", None, _P.max_source_delay, "the largest delay for one address", float],
        ["max-user-delay", None, _P.max_user_delay,
         "the largest delay for one username: how long guessing on a name can slow its owner", float],
        ["handshake-rate", None, _P.handshake_rate,
         "handshakes per second one address may start (its budget of the daemon's CPU); beyond "
         "it, answers wait", float],
        ["handshake-burst", None, _P.handshake_burst, "handshakes one address may start at once", int],
    ]

    def postOptions(self):
        port = self["port"]
        if port.isdigit():
            self["port"] = f"tcp:{port}"
        self._check_proxies()
        root = self["root"]
        if not os.path.isdir(root):
            raise usage.UsageError(f"--root {root}: not a directory")
        # Relative to where twistd was started, also after it changes directory.
        self["users"] = os.path.abspath(self["users"])
        pidfile, logfile = exposure.twistd_files(self.parent)
        self["protected"] = exposure.Protected(self["users"], pidfile, logfile, exposure.tls_key_paths(port))
        self["twistd-logfile"] = logfile
        self._refuse_exposure([root])
        if not self["server-id"] or len(self["server-id"].encode("utf-8")) > 255:
            raise usage.UsageError("--server-id must be 1 to 255 bytes")
        if self["max-upload-size"] is not None:
            self["max-upload-size"] = parse_size(self["max-upload-size"])
        for name in ("handshake-timeout", "idle-timeout", "partial-max-age", "shutdown-grace"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        self["policy"] = self._policy()
        try:
            users = userdb.load(self["users"])
        except userdb.UsersFileError as problem:
            raise usage.UsageError(str(problem)) from None
        self._refuse_exposure([user.root for user in users.by_name.values() if user.root])

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
            raise usage.UsageError(str(problem)) from None

    def _refuse_exposure(self, roots):
        problem = self["protected"].problem(roots)
        if problem:
            raise usage.UsageError(problem)

    def _policy(self):
        try:
            start, rate, full = (int(part) for part in self["max-startups"].split(":"))
        except ValueError:
            raise usage.UsageError("--max-startups must be start:rate:full, e.g. 1500:30:3000") from None
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
            raise usage.UsageError("; ".join(problems))
        return policy


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise usage.UsageError(f"--max-upload-size {text}: not a size") from None
    if value < 0:
        raise usage.UsageError("--max-upload-size must not be negative")
    return value


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
        options["port"], factory, options["shutdown-grace"], trusted_proxies=options["trusted-proxies"]
    )
    # Abandoned partial uploads: swept at start and then every hour (or age, if shorter).
    sweep_every = min(3600.0, options["partial-max-age"])
    internet.TimerService(sweep_every, factory.sweep_partial_uploads).setServiceParent(top)
    return top
