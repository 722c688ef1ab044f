"""Test helpers for the device emulator: a TLS client that accepts any certificate,
a fake VNC server, an event recorder and a TLS-terminating console relay.

Everything runs in the test's reactor (pytest-twisted); nothing here pins: the
emulator tests are about the device's side of PROTOCOL.md section 2.
"""

from __future__ import annotations

from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from secshadow.events import Event
from secshadow.relay import Splice

HELLO = b"RFB 003.008\n"
PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"


@implementer(IOpenSSLClientConnectionCreator)
class AnyCertClientCreator:
    """A real pyOpenSSL client: fresh context per connection, any server certificate accepted."""

    def __init__(self, max_version: int | None = None) -> None:
        self.max_version = max_version
        self.connections: list[SSL.Connection] = []

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        if self.max_version is not None:
            context.set_max_proto_version(self.max_version)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        self.connections.append(connection)
        return connection


@implementer(IHandshakeListener)
class RecordingClient(Protocol):
    """Records what arrives; ``closed`` fires when the connection is lost."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.handshake: defer.Deferred[None] = defer.Deferred()
        self._waiters: list[tuple[int, defer.Deferred[bytes]]] = []

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiter in list(self._waiters):
            if len(self.received) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(self.received)

    def connectionLost(self, reason: Any = None) -> None:
        for _, waiting in self._waiters:
            waiting.errback(ConnectionError(f"closed after {len(self.received)} bytes"))
        self._waiters.clear()
        self.closed.callback(None)

    def wait_bytes(self, count: int) -> defer.Deferred[bytes]:
        if len(self.received) >= count:
            return defer.succeed(self.received)
        waiting: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((count, waiting))
        return waiting


async def connect_tls(reactor: Any, port: int, creator: AnyCertClientCreator | None = None) -> RecordingClient:
    """Connect a :class:`RecordingClient` over TLS to ``127.0.0.1:port``."""
    endpoint = wrapClientTLS(creator or AnyCertClientCreator(), TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    client = RecordingClient()
    await connectProtocol(endpoint, client)
    return client


class FakeVNCConnection(Protocol):
    """Sends an RFB ProtocolVersion at once, then ``extra``; records what it receives."""

    def __init__(self, server: FakeVNCServer) -> None:
        self.server = server
        self.received = b""

    def connectionMade(self) -> None:
        self.server.connections.append(self)
        self.transport.write(HELLO + self.server.extra)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class FakeVNCServer(Factory):
    """A plain TCP "VNC server" for unit tests (only the first 12 bytes are RFB)."""

    noisy = False

    def __init__(self, extra: bytes = b"") -> None:
        self.extra = extra
        self.connections: list[FakeVNCConnection] = []

    def buildProtocol(self, addr: Any) -> FakeVNCConnection:
        return FakeVNCConnection(self)


class EventLog:
    """An event sink that keeps every event's dict and can wait for one by name."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[dict[str, Any]]]] = []

    def __call__(self, event: Event) -> None:
        record = event.as_dict()
        self.events.append(record)
        for waiter in list(self._waiters):
            if waiter[0](record):
                self._waiters.remove(waiter)
                waiter[1].callback(record)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def wait(self, name: str, reactor: Any, timeout: float = 5.0) -> defer.Deferred[dict[str, Any]]:
        for record in self.events:
            if record["event"] == name:
                return defer.succeed(record)
        waiting: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiters.append((lambda r: r["event"] == name, waiting))
        return waiting.addTimeout(timeout, reactor)


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class _ConsoleSide(Protocol):
    """The plain side of :class:`ConsoleRelay` (what the RFB client connects to)."""

    def __init__(self, relay: ConsoleRelay) -> None:
        self.relay = relay
        self.splice: Splice | None = None
        self.device: _DeviceSide | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        device = _DeviceSide(self)
        endpoint = wrapClientTLS(
            AnyCertClientCreator(), TCP4ClientEndpoint(self.relay.reactor, "127.0.0.1", self.relay.device_port)
        )
        connectProtocol(endpoint, device).addErrback(lambda _: self.transport.loseConnection())  # type: ignore[union-attr]

    def device_ready(self, device: _DeviceSide) -> None:
        self.device = device
        device.transport.write(  # type: ignore[union-attr]
            b"PROCYCMD PW_" + self.relay.password.encode("ascii") + self.relay.terminator
        )
        self.splice = Splice(self.transport, device.transport, self.relay.reactor)  # type: ignore[arg-type]
        self.splice.start()

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.deliver("left", data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.splice is not None:
            self.splice.lost("left")
        elif self.device is not None and self.device.transport is not None:
            self.device.transport.loseConnection()


class _DeviceSide(Protocol):
    def __init__(self, console: _ConsoleSide) -> None:
        self.console = console

    def connectionMade(self) -> None:
        self.console.device_ready(self)

    def dataReceived(self, data: bytes) -> None:
        if self.console.splice is not None:
            self.console.splice.deliver("right", data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.console.splice is not None:
            self.console.splice.lost("right")
        else:
            self.console.transport.loseConnection()  # type: ignore[union-attr]


class ConsoleRelay(Factory):
    """A test-only stand-in for the console proxy: plain TCP in, TLS (no pinning) to the
    device, ``PROCYCMD PW_<password>`` first, then a byte relay."""

    noisy = False

    def __init__(self, reactor: Any, device_port: int, password: str, terminator: bytes = b"") -> None:
        self.reactor = reactor
        self.device_port = device_port
        self.password = password
        self.terminator = terminator

    def buildProtocol(self, addr: Any) -> _ConsoleSide:
        return _ConsoleSide(self)
