"""The daemon as a service: listening, readiness, reload and graceful shutdown.

- The listening service comes from `strports.service`, so a port in use stops start-up (one
  line, CannotStart); its endpoint is wrapped to announce READY=1 (sd_notify) once the port
  really listens. A `haproxy:` port takes PROXY headers from the trusted proxies only
  (eketwist.proxy).
- SIGHUP re-reads the users file (a broken one is refused, the last good copy kept).
- On stop (SIGTERM): STOPPING=1, stop accepting, close idle connections, let running
  transfers finish for up to the grace period, then close the rest (their clients resume).
"""

import errno
import gc
import signal

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from . import proxy, sdnotify
from .logs import SafeLogger

DEFAULT_SHUTDOWN_GRACE = 30.0


class CannotStart(SystemExit, Exception):
    """The daemon could not start: one line, exit status 1, no traceback.

    An Exception, so that twistd removes the pidfile and, when it daemonizes, sends
    "1 <class>: <str>" through its status pipe to the process still waiting in the terminal,
    which reads 100 bytes of it and prints them; str() is therefore kept within what is left
    (`short` when `message` does not fit). A SystemExit, so that when twistd re-raises it the
    process ends with status 1 and no traceback (which would land in the log).
    """

    PIPE_BYTES = 100

    def __init__(self, message, short=None):
        super().__init__(1)
        self.message = message
        self.short = short or message

    def __str__(self):
        room = self.PIPE_BYTES - len(f"1 {type(self).__module__}.{type(self).__qualname__}: ")
        return self.message if len(self.message.encode("ascii", "backslashreplace")) <= room else self.short


def listen_failure(problem, description):
    """A CannotStart naming where listening failed and why."""
    reason = getattr(problem, "socketError", problem)
    why = getattr(reason, "strerror", None) or str(reason)
    why = why[:1].lower() + why[1:].rstrip(".")
    hint, short = "", None
    if isinstance(problem, CannotListenError) and problem.interface is not None:
        port, interface = problem.port, problem.interface
        host = f"[{interface}]" if ":" in interface else interface
        where = f"{host}:{port}" if interface else f"port {port}"
        short = f"cannot listen on port {port}: {why}"
        if getattr(reason, "errno", None) == errno.EACCES and port < 1024:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    else:  # a UNIX socket (its path is the port), or e.g. OverflowError for tcp:99999
        where = problem.port if isinstance(problem, CannotListenError) else description
    return CannotStart(f"cannot listen on {where}: {why}{hint}", short)


@implementer(IStreamServerEndpoint)
class ListeningNotifier:
    """An endpoint that calls `on_listening(port)` once the wrapped one listens."""

    def __init__(self, endpoint, on_listening):
        self._endpoint = endpoint
        self._on_listening = on_listening

    def listen(self, factory):
        def listening(port):
            self._on_listening(port)
            return port

        return self._endpoint.listen(factory).addCallback(listening)


def listener(description, factory, trusted_proxies=None, reactor=None):
    """The listening service for an endpoint description. `haproxy:` is ours, not Twisted's:
    PROXY headers only from `trusted_proxies` (see eketwist.proxy)."""
    if not proxy.is_proxy_description(description):
        return strports.service(description, factory, reactor=reactor)
    if trusted_proxies is None:
        raise ValueError("a haproxy: port needs trusted proxies")
    listening = strports.service(proxy.inner_description(description), factory, reactor=reactor)
    listening.endpoint = proxy.TrustedProxyEndpoint(listening.endpoint, trusted_proxies, clock=reactor)
    return listening


class EketwistService(service.MultiService):
    log = SafeLogger()

    def __init__(
        self, description, factory, shutdown_grace=DEFAULT_SHUTDOWN_GRACE, reactor=None, trusted_proxies=None,
        terminal=None,
    ):
        """`terminal`: a file to tell a failed start to, besides the log (see tap)."""
        super().__init__()
        from twisted.internet import reactor as default_reactor

        self.reactor = reactor or default_reactor
        self.factory = factory
        self.shutdown_grace = shutdown_grace
        self.listener = listener(description, factory, trusted_proxies, self.reactor)
        self.listener.endpoint = ListeningNotifier(self.listener.endpoint, self._listening)
        self.description = description
        self.terminal = terminal
        self._previous_sighup = None

    def privilegedStartService(self):
        # Binds here, before twistd drops privileges, and fails start-up if it cannot.
        try:
            self.listener.privilegedStartService()
        except (CannotListenError, OSError, OverflowError) as problem:
            failure = listen_failure(problem, self.description)
            self.log.critical("{problem}", problem=failure.message)
            if self.terminal is not None:
                self.terminal.write(f"twistd eke: {failure.message}\n")
                self.terminal.flush()
            raise failure from None
        super().privilegedStartService()

    def startService(self):
        self.listener.startService()
        super().startService()
        self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        # What start-up created lives as long as the daemon: keep the cyclic collector's full
        # passes from walking it again and again.
        gc.freeze()

    def _listening(self, port):
        address = port.getHost()
        where = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
        self.log.info("eketwist listening on {address}", address=where)
        sdnotify.notify(f"READY=1\nSTATUS=listening on {where}")

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self):
        sdnotify.notify("RELOADING=1")
        self.factory.users.reload(reason="SIGHUP")
        sdnotify.notify("READY=1")

    @defer.inlineCallbacks
    def stopService(self):
        sdnotify.notify("STOPPING=1")
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        yield self.listener.stopService()
        yield self.factory.drain(self.shutdown_grace)
        yield super().stopService()
