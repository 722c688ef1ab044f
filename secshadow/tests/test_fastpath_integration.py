"""The socket-bound device TLS and the fast relay on real loopback sockets (issue 13 item 2).

A TLS device in this process (Twisted's TLS server with a lab certificate) answers
``PROCYCMD`` with the RFB hello and then streams; the product's own
:func:`~secshadow.tunnel.connect_pinned` and :class:`~secshadow.bridge.Bridge` connect a
real TCP viewer to it. What a user relies on is checked on that path: a wrong pin still
refuses inside the handshake with no byte for the impostor; both directions stop reading
their source when the other side stops reading (memory bounded) and lose nothing; the
view-only filter still refuses input; a viewer's end closes the device with close_notify.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from secshadow.bridge import Bridge, ViewerConnection
from secshadow.errors import PinMismatch
from secshadow.fastrelay import FastSplice
from secshadow.lab import certs
from secshadow.rfbfilter import RFBFilterError, ViewOnlyFilter
from secshadow.sockettls import SocketTLS
from secshadow.tests._tls import ServerCreator
from secshadow.tunnel import connect_pinned

pytestmark = pytest.mark.integration

HELLO = b"RFB 003.008\n"
COMMAND = b"PROCYCMD PW_" + b"0" * 36
TOTAL = 24 * 1024 * 1024
BOUND = 1024 * 1024  # bytes the proxy may hold in user space for one direction


class Device(Protocol):
    """The device's application side: the hello after PROCYCMD, then ``stream`` bytes."""

    def __init__(self, stream: bytes = b"", security_types: bytes = b"") -> None:
        self.stream = stream
        self.security_types = security_types  # sent once the viewer's ProtocolVersion came
        self.received = bytearray()
        self.gone: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        first = not self.received
        self.received += data
        if first and bytes(self.received).startswith(b"PROCYCMD"):
            self.transport.write(HELLO)  # type: ignore[union-attr]
            if self.stream:
                self.transport.write(self.stream)  # type: ignore[union-attr]
        elif self.security_types and bytes(self.received) == COMMAND + HELLO:
            self.transport.write(self.security_types)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.gone.callback(None)


class Viewer(Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.made: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)


def _sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def _until(condition: Any, seconds: float = 20.0) -> Any:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        yield _sleep(0.02)
    raise AssertionError("condition not reached in time")


@defer.inlineCallbacks
def _stalled(counter: Any) -> Any:
    """Wait until ``counter()`` stops moving for 0.3 s."""
    last, still = -1, 0
    for _ in range(400):
        yield _sleep(0.05)
        value = counter()
        still, last = (still + 1, last) if value == last else (0, value)
        if still >= 6:
            return
    raise AssertionError("the relay never stalled")


@pytest.fixture
def pem() -> tuple[bytes, bytes]:
    return certs.generate_self_signed()


@defer.inlineCallbacks
def _session(pem: tuple[bytes, bytes], device: Device, view_only: bool = False) -> Any:
    """A real device port, a pinned link, a viewer connected through a Bridge."""
    server = TLSMemoryBIOFactory(ServerCreator(*pem), False, Factory.forProtocol(lambda: device))
    device_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
    link = yield connect_pinned(reactor, "127.0.0.1", device_port.getHost().port, certs.der_of(pem[0]), timeout=10)
    conns: list[ViewerConnection] = []

    def made(conn: ViewerConnection) -> None:
        conn.transport.pauseProducing()  # type: ignore[union-attr]
        conns.append(conn)

    viewer_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: ViewerConnection(made, lambda c: None)))
    viewer = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", viewer_port.getHost().port), Viewer())
    yield _until(lambda: conns)
    bridge = Bridge(reactor, conns[0], link, COMMAND, hello_timeout=10,
                    view_only=ViewOnlyFilter if view_only else None)
    bridge.start()
    yield _until(lambda: bridge.relaying)
    return link, bridge, viewer, (device_port, viewer_port)


@pytest_twisted.inlineCallbacks
def test_a_wrong_pin_refuses_in_the_handshake_and_the_impostor_gets_no_byte(pem):
    impostor = Device()
    twin = certs.twin_of(pem[0])
    server = TLSMemoryBIOFactory(ServerCreator(*twin), False, Factory.forProtocol(lambda: impostor))
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
    try:
        with pytest.raises(PinMismatch):
            yield connect_pinned(reactor, "127.0.0.1", port.getHost().port, certs.der_of(pem[0]), timeout=10)
        yield impostor.gone
        assert bytes(impostor.received) == b""
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_device_to_viewer_stops_when_the_viewer_stops_reading_and_loses_nothing(pem):
    payload = os.urandom(TOTAL)
    expected = hashlib.sha256(HELLO + payload).hexdigest()
    device = Device(payload)
    link, bridge, viewer, ports = yield _session(pem, device)
    try:
        assert isinstance(link.transport, SocketTLS) and isinstance(bridge.splice, FastSplice)
        viewer.transport.pauseProducing()
        splice = bridge.splice
        yield _stalled(lambda: splice.bytes_left_to_right)
        assert splice.bytes_left_to_right < TOTAL
        assert link.transport not in reactor.getReaders()  # the device is not read any more
        assert len(splice._pending) <= 16 * 1024 and link.transport.out_size == 0
        viewer.transport.resumeProducing()
        yield _until(lambda: viewer.received >= TOTAL + len(HELLO), 60)
        assert viewer.digest.hexdigest() == expected
        assert bridge.splice.bytes_left_to_right == TOTAL + len(HELLO)
        viewer.transport.loseConnection()  # the viewer's end closes the device politely
        end = yield bridge.ended()
        yield device.gone
        assert end.reason == "viewer disconnected" and end.error is None
        assert device.reason is not None and device.reason.check(ConnectionDone)  # close_notify came
    finally:
        for port in ports:
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_viewer_to_device_stops_when_the_device_stops_reading_and_loses_nothing(pem):
    device = Device()
    link, bridge, viewer, ports = yield _session(pem, device)
    try:
        device.transport.transport.pauseProducing()  # the device's TCP socket is not read
        payload = os.urandom(TOTAL)
        viewer.transport.write(payload)
        splice = bridge.splice
        yield _stalled(lambda: splice.bytes_right_to_left)
        assert splice.bytes_right_to_left < TOTAL
        assert link.transport.out_size <= BOUND and splice not in reactor.getReaders()
        device.transport.transport.resumeProducing()
        try:
            yield _until(lambda: len(device.received) >= len(COMMAND) + TOTAL, 20)
        except AssertionError:
            raise AssertionError((len(device.received), splice.bytes_right_to_left, link.transport.out_size,
                                  link.transport.state, link.transport in reactor.getWriters(),
                                  link.transport in reactor.getReaders(), splice in reactor.getReaders())) from None
        assert bytes(device.received[len(COMMAND):]) == payload
        yield bridge.stop("closed by the console")
    finally:
        for port in ports:
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_view_only_still_refuses_input_on_the_fast_path(pem):
    device = Device(security_types=b"\x01\x01")  # one type offered: None
    link, bridge, viewer, ports = yield _session(pem, device, view_only=True)
    try:
        assert isinstance(bridge.splice, FastSplice)
        viewer.transport.write(HELLO)
        yield _until(lambda: viewer.received >= len(HELLO) + 2)
        viewer.transport.write(b"\x07")  # a security type the device did not offer
        end = yield bridge.ended()
        assert isinstance(end.error, RFBFilterError) and "view-only" in end.reason
        assert bytes(device.received) == COMMAND + HELLO  # the refused byte never reached the device
    finally:
        for port in ports:
            yield port.stopListening()


def test_no_delay_sets_tcp_nodelay_on_tcp_sockets_and_leaves_others_alone():
    import socket as _socket

    from secshadow.sockettls import no_delay

    with _socket.socket() as tcp:
        assert tcp.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY) == 0
        no_delay(tcp)
        assert tcp.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY) != 0
    a, b = _socket.socketpair()
    with a, b:
        no_delay(a)  # a unix socket has no Nagle: nothing to set, nothing raised


@pytest_twisted.inlineCallbacks
def test_a_finished_link_is_not_kept_alive_by_the_log(pem):
    # A noisy connect factory logged "Starting factory" with the factory in the event,
    # and Twisted keeps the last 64 Ki events until logging begins: every finished
    # session stayed in memory in a library user that never began logging.
    import gc
    import weakref

    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        devices = Factory.forProtocol(Device)
        devices.noisy = False  # only the proxy's own factories are looked for
        server = TLSMemoryBIOFactory(ServerCreator(*pem), False, devices)
        device_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
        link = yield connect_pinned(reactor, "127.0.0.1", device_port.getHost().port, certs.der_of(pem[0]),
                                    timeout=10)
        assert isinstance(link.transport, SocketTLS)
        gone = weakref.ref(link)
        tls = link.transport
        tls.loseConnection()
        yield _until(lambda t=tls: t.state == "closed")
        yield device_port.stopListening()
        del link, tls
        yield _sleep(0.05)
    finally:
        globalLogPublisher.removeObserver(events.append)
    factories = [e for e in events if "factory" in e]
    assert factories == [], [e.get("log_format") for e in factories]
    events.clear()
    gc.collect()
    assert gone() is None
