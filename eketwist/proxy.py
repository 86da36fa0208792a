"""PROXY protocol (HAProxy), accepted from trusted proxies only.

Twisted's `haproxy:` endpoint believes a PROXY header from anyone, and starts the wrapped
protocol before the header has arrived. Here instead:
- a connection whose TCP peer is not in --trusted-proxies is closed at accept, before a byte
  is read (buildProtocol returns None);
- the header must be whole within HEADER_TIMEOUT seconds of the connection (a deadline that
  trickled bytes do not extend) and is at most MAX_HEADER bytes, else the connection is cut;
- the eketwist protocol is built and connected only once the header is parsed, so from its
  connectionMade on, transport.getPeer() is the client's address (a v2 LOCAL header, HAProxy's
  health check, leaves the proxy's own).
"""

import ipaddress

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from . import guard
from .logs import SafeLogger

HEADER_TIMEOUT = 5.0
V1_MAX = 107  # the PROXY protocol's own limit for a v1 line, CRLF included
# v2: 16 bytes and the addresses, plus TLVs (ALPN, authority, unique id, TLS details).
MAX_HEADER = 4096
V1_PREFIX = b"PROXY "
V2_PREFIX = V2Parser.PREFIX


def is_proxy_description(description):
    return description.split(":", 1)[0].strip().lower() == "haproxy"


def inner_description(description):
    """The listening endpoint behind `haproxy:`."""
    return description.split(":", 1)[1]


class TrustedProxies:
    """The addresses (and networks) allowed to send a PROXY header."""

    def __init__(self, networks):
        self.networks = tuple(networks)

    def __repr__(self):
        return ",".join(str(network) for network in self.networks)

    @classmethod
    def parse(cls, text):
        """`ADDR[,ADDR...]`: IP addresses or CIDR networks. Raises ValueError."""
        networks = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=True))
            except ValueError as problem:
                raise ValueError(f"--trusted-proxies {item}: {problem}") from None
        if not networks:
            raise ValueError("--trusted-proxies needs at least one address")
        return cls(networks)

    def trust(self, address):
        host = getattr(address, "host", None)
        if not host:
            return False  # not an IP peer (e.g. a UNIX socket): not listed, not trusted
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def header_length(buffer):
    """The length of the PROXY header at the start of `buffer`: an int once known, None while
    more bytes are needed. Raises InvalidProxyHeader for anything else or anything too long."""
    if buffer[:12] == V2_PREFIX[: len(buffer)] and len(buffer) < 16:
        return None
    if buffer.startswith(V2_PREFIX):
        if buffer[12] & 0xF0 != 0x20:
            raise InvalidProxyHeader()
        length = 16 + int.from_bytes(buffer[14:16], "big")
        if length > MAX_HEADER:
            raise InvalidProxyHeader()
        return length if len(buffer) >= length else None
    if buffer[:6] == V1_PREFIX[: len(buffer)]:
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(buffer) >= V1_MAX:
            raise InvalidProxyHeader()
        return None
    raise InvalidProxyHeader()


class ProxiedConnection(HAProxyProtocolWrapper):
    """Reads the PROXY header, then builds the eketwist protocol and relays to it."""

    def __init__(self, factory):
        super().__init__(factory, None)
        self._buffer = b""
        self._deadline = None

    def logPrefix(self):
        return "eketwist (PROXY)"

    def makeConnection(self, transport):
        directlyProvides(self, providedBy(transport))
        self.transport = transport
        self.connected = 1
        self.factory.registerProtocol(self)
        # One deadline from the start: trickling bytes does not move it.
        self._deadline = self.factory.clock.callLater(self.factory.header_timeout, self._too_late)

    def _too_late(self):
        self._deadline = None
        self._drop("no PROXY header in time")

    def _drop(self, why):
        if self.factory.log_limiter.allow(why):
            self.factory.log.info(
                "dropped a connection from proxy {proxy}: {why}", proxy=_describe(self.transport.getPeer()), why=why
            )
        self.transport.abortConnection()

    def dataReceived(self, data):
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._proxyInfo is not None:
            return  # dropped (the wrapped factory refused), the rest is of no use
        self._buffer += data  # at most MAX_HEADER bytes are ever kept
        try:
            length = header_length(self._buffer)
            if length is None:
                return
            header, rest = self._buffer[:length], self._buffer[length:]
            parser = V2Parser() if header.startswith(V2_PREFIX) else V1Parser()
            info, _ = parser.feed(header)
        except InvalidProxyHeader:
            self._drop("not a valid PROXY header")
            return
        self._buffer = b""
        self._cancel_deadline()
        self._proxyInfo = info
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and self.wrappedProtocol is not None and not _closing(self.transport):
            protocol.dataReceived(rest)

    def _cancel_deadline(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason):
        self._cancel_deadline()
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None


def _closing(transport):
    return transport.disconnecting or getattr(transport, "_aborting", False)


def _describe(address):
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"


class TrustedProxyFactory(HAProxyWrappingFactory):
    protocol = ProxiedConnection
    noisy = False
    log = SafeLogger()

    def __init__(self, wrappedFactory, trusted, clock=None, header_timeout=HEADER_TIMEOUT):
        super().__init__(wrappedFactory)
        if clock is None:
            from twisted.internet import reactor as clock
        self.trusted = trusted
        self.clock = clock
        self.header_timeout = header_timeout
        self.log_limiter = guard.LogLimiter(clock)

    def buildProtocol(self, addr):
        if not self.trusted.trust(addr):
            # Closed at accept: nothing is read from a peer that is not a trusted proxy.
            if self.log_limiter.allow("untrusted"):
                self.log.warn(
                    "refused a PROXY protocol connection from {peer}: not in --trusted-proxies ({trusted})",
                    peer=_describe(addr), trusted=repr(self.trusted),
                )
            return None
        return self.protocol(self)


@implementer(IStreamServerEndpoint)
class TrustedProxyEndpoint:
    """Listens with `endpoint`, taking PROXY headers from `trusted` peers only."""

    def __init__(self, endpoint, trusted, clock=None, header_timeout=HEADER_TIMEOUT):
        self._endpoint = endpoint
        self._trusted = trusted
        self._clock = clock
        self._header_timeout = header_timeout

    def listen(self, factory):
        return self._endpoint.listen(TrustedProxyFactory(factory, self._trusted, self._clock, self._header_timeout))
