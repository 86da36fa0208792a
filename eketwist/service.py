"""The daemon as a service: listening, readiness, reload and graceful shutdown.

- The listening service comes from `strports.service`, so a port in use stops start-up; its
  endpoint is wrapped to announce READY=1 (sd_notify) once the port really listens. A
  `haproxy:` port takes PROXY headers from the trusted proxies only (eketwist.proxy).
- SIGHUP re-reads the users file (a broken one is refused, the last good copy kept).
- On stop (SIGTERM): STOPPING=1, stop accepting, close idle connections, let running
  transfers finish for up to the grace period, then close the rest (their clients resume).
"""

import gc
import signal

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from . import proxy, sdnotify
from .logs import SafeLogger

DEFAULT_SHUTDOWN_GRACE = 30.0


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
        self, description, factory, shutdown_grace=DEFAULT_SHUTDOWN_GRACE, reactor=None, trusted_proxies=None
    ):
        super().__init__()
        from twisted.internet import reactor as default_reactor

        self.reactor = reactor or default_reactor
        self.factory = factory
        self.shutdown_grace = shutdown_grace
        self.listener = listener(description, factory, trusted_proxies, self.reactor)
        self.listener.endpoint = ListeningNotifier(self.listener.endpoint, self._listening)
        self._previous_sighup = None

    def privilegedStartService(self):
        # Binds here, before twistd drops privileges, and fails start-up if it cannot.
        self.listener.privilegedStartService()
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
