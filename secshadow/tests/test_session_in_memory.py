"""A whole session over an in-memory transport pair: the session knows no transport.

The device side is :func:`secshadow.tunnel.connect_pinned` over an in-memory
``IStreamClientEndpoint`` (real TLS, real pinning, no socket), the viewer side an
in-memory ``IStreamServerEndpoint``; ``proxy.py`` runs unchanged. This is what the
gateway's WebSocket stream (device side) and the browser bridge (viewer side) plug into.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet.interfaces import IPushProducer
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from secshadow import events
from secshadow.api import start_shadowing
from secshadow.options import SessionOptions
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.tests._tls import ServerCreator, der_of, device_cert
from secshadow.tunnel import PinnedDialer

CERT, KEY = device_cert()
PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"
HELLO = b"RFB 003.008\n"


@implementer(IPushProducer)
class StreamTransport(FakeTransport):
    """iosim's in-memory transport, declared a push producer as TCP transports are
    (the relay cross-registers producers for backpressure)."""


def pair(server: Protocol, client: Protocol) -> IOPump:
    return connect(server, StreamTransport(server, isServer=True), client, StreamTransport(client, isServer=False),
                   greet=False)


class Pumps:
    """Every in-memory connection, pumped by the reactor every millisecond."""

    def __init__(self) -> None:
        self.pumps: list[IOPump] = []
        self._loop = LoopingCall(self.pump)
        self._loop.start(0.001)

    def pump(self) -> None:
        for pump in self.pumps:
            pump.pump()

    def stop(self) -> None:
        self._loop.stop()


class Device(Protocol):
    """The device's application side: checks the command, then greets and echoes."""

    def __init__(self) -> None:
        self.received = b""
        self.relaying = False

    def dataReceived(self, data: bytes) -> None:
        if self.relaying:
            self.transport.write(data.upper())  # type: ignore[union-attr]
            return
        self.received += data
        if self.received == f"PROCYCMD PW_{PASSWORD}".encode():
            self.relaying = True
            self.transport.write(HELLO)  # type: ignore[union-attr]


@implementer(IStreamClientEndpoint)
class MemoryClientEndpoint:
    """Connects to ``server_factory`` through an in-memory pair (no socket)."""

    def __init__(self, server_factory: Factory, pumps: Pumps) -> None:
        self._server_factory, self._pumps = server_factory, pumps

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        client = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 5900))
        server = self._server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert client is not None and server is not None
        self._pumps.pumps.append(pair(server, client))
        return succeed(client)


class _Port:
    def __init__(self) -> None:
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 5999)

    def stopListening(self) -> None:
        self.listening = False


@implementer(IStreamServerEndpoint)
class MemoryServerEndpoint:
    """Hands the session's factory to the test, which connects viewers in memory."""

    def __init__(self, pumps: Pumps) -> None:
        self._pumps = pumps
        self.factory: Any = None
        self.port = _Port()

    def listen(self, factory: Factory) -> Deferred[_Port]:
        self.factory = factory
        return succeed(self.port)

    def connect_viewer(self, viewer: Protocol) -> None:
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self._pumps.pumps.append(pair(server, viewer))


class Viewer(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == HELLO:
            self.transport.write(b"hello device")  # type: ignore[union-attr]
        elif self.received == HELLO + b"HELLO DEVICE":
            self.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_whole_session_runs_over_in_memory_transports() -> None:
    pumps = Pumps()
    device = Device()
    device_side = TLSMemoryBIOFactory(ServerCreator(CERT, KEY), False, Factory.forProtocol(lambda: device))
    dialer = PinnedDialer(reactor, lambda host, port, timeout: MemoryClientEndpoint(device_side, pumps))
    viewer_side = MemoryServerEndpoint(pumps)
    seen: list[events.Event] = []
    secret = ShadowSecret(der_of(CERT), OneTimePassword(PASSWORD), "10.0.0.5", 5900)

    def on_event(event: events.Event) -> None:
        seen.append(event)
        if isinstance(event, events.Listening):
            viewer_side.connect_viewer(viewer)

    viewer = Viewer()
    try:
        shadowing = start_shadowing(reactor, secret, SessionOptions(connect_timeout=5, viewer_timeout=5),
                                    on_event=on_event, viewer_endpoint=viewer_side, dialer=dialer)
        closed = await shadowing.done
    finally:
        pumps.stop()
    assert [e.name for e in seen] == ["secret", "pinned", "listening", "viewer-connected", "session-started",
                                      "closed"]
    assert closed.reason == "viewer disconnected"
    assert (closed.bytes_to_viewer, closed.bytes_to_device) == (len(HELLO) + 12, 12)
    assert device.received == f"PROCYCMD PW_{PASSWORD}".encode()
    assert viewer.received == HELLO + b"HELLO DEVICE"
    assert viewer_side.port.listening is False
