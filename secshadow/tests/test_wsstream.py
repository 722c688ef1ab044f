"""secshadow.wsstream: the one WebSocket stream transport of the gateway legs and the
browser viewer, with Twisted's fakes (StringTransport as the raw socket, a fake autobahn
protocol under the real AutobahnSide)."""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from secshadow.relay import push_producer_of
from secshadow.wsstream import CLOSE_NORMAL, AutobahnSide, WebSocketStream

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 8443)


class FakeWebSocket(AutobahnSide):
    """autobahn's side of the contract: ``state``, ``sendMessage`` (which, like
    autobahn's, raises unless open), ``sendClose``; the raw socket is a StringTransport."""

    STATE_CLOSED = WebSocketProtocol.STATE_CLOSED
    STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
    STATE_CLOSING = WebSocketProtocol.STATE_CLOSING
    STATE_OPEN = WebSocketProtocol.STATE_OPEN

    def __init__(self, raw: Any = None) -> None:
        self.state = self.STATE_OPEN
        self.transport = StringTransport() if raw is None else raw
        self.sent: list[tuple[bytes, bool]] = []
        self.close_codes: list[int | None] = []

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        if self.state != self.STATE_OPEN:
            raise RuntimeError("autobahn: Attempt to send on a closed protocol")
        assert type(payload) is bytes
        self.sent.append((payload, isBinary))

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        self.close_codes.append(code)
        self.state = self.STATE_CLOSING


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost.append(reason)


def make(max_message: int | None = None, raw: Any = None) -> tuple[WebSocketStream, FakeWebSocket, Recorder]:
    ws = FakeWebSocket(raw)
    stream = WebSocketStream(ws, peer=PEER, host=HOST, max_message=max_message)
    inner = Recorder()
    stream.start(inner)
    return stream, ws, inner


# -- writing -------------------------------------------------------------------------


def test_a_long_write_is_split_into_binary_messages_of_at_most_max_message() -> None:
    stream, ws, _ = make(max_message=10)
    stream.write(bytes(range(25)))
    assert ws.sent == [(bytes(range(10)), True), (bytes(range(10, 20)), True), (bytes(range(20, 25)), True)]
    stream.write(bytearray(b"0123456789"))  # exactly the cap: one message, as bytes
    assert ws.sent[-1] == (b"0123456789", True)
    stream.writeSequence([b"ab", b"cd"])
    assert ws.sent[-1] == (b"abcd", True)
    stream.write(b"")
    assert len(ws.sent) == 5


def test_without_a_cap_each_write_is_one_message() -> None:
    stream, ws, _ = make(max_message=None)
    stream.write(memoryview(b"x" * 3_000_000))
    assert [(len(p), binary) for p, binary in ws.sent] == [(3_000_000, True)]


def test_a_cap_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        WebSocketStream(FakeWebSocket(), peer=PEER, host=HOST, max_message=0)


def test_writes_while_the_websocket_is_not_open_are_dropped_not_raised() -> None:
    stream, ws, _ = make()
    ws.state = ws.STATE_CLOSING  # the peer started closing: autobahn's sendMessage would raise
    stream.write(b"late record")
    assert ws.sent == []


# -- reading, pause and resume ------------------------------------------------------


def test_messages_reach_the_protocol_and_the_end_is_reported_once() -> None:
    stream, _, inner = make()
    assert inner.transport is stream and inner.connected
    stream.deliver(b"one")
    stream.deliver(b"two")
    assert inner.received == [b"one", b"two"]
    end = Failure(ConnectionDone())
    stream.lost(end)
    stream.lost(Failure(ConnectionDone()))
    assert inner.lost == [end] and stream.disconnecting
    stream.deliver(b"after the end")
    assert inner.received == [b"one", b"two"]


def test_pause_and_resume_stop_and_restart_reading_the_raw_socket() -> None:
    stream, ws, _ = make()
    raw = ws.transport
    assert ITransport.providedBy(stream) and IPushProducer.providedBy(stream) and IConsumer.providedBy(stream)
    assert push_producer_of(stream) is stream  # relay.Splice pauses the stream itself
    stream.pauseProducing()
    assert raw.producerState == "paused" and stream.paused and ws.reading_paused
    raw.producerState = "producing"  # so a second pause would show
    stream.pauseProducing()
    assert raw.producerState == "producing"  # paused once, not twice
    raw.producerState = "paused"
    stream.resumeProducing()
    assert raw.producerState == "producing" and not stream.paused and not ws.reading_paused
    raw.producerState = "paused"
    stream.resumeProducing()
    assert raw.producerState == "paused"  # a resume without a pause touches nothing


def test_under_tls_the_socket_under_the_tls_transport_is_paused() -> None:
    class TLSLike:
        """Like TLSMemoryBIOProtocol: a transport that is no push producer, over one."""

        def __init__(self) -> None:
            self.transport = StringTransport()

    tls = TLSLike()
    stream, _, _ = make(raw=tls)
    stream.pauseProducing()
    assert tls.transport.producerState == "paused"
    stream.resumeProducing()
    assert tls.transport.producerState == "producing"


# -- producers writing into the stream ----------------------------------------------


def test_register_producer_goes_to_the_raw_socket_and_a_gone_socket_stops_it() -> None:
    stream, ws, _ = make()
    raw = ws.transport
    producer = StringTransport()
    stream.registerProducer(producer, True)
    assert raw.producer is producer and raw.streaming is True
    with pytest.raises(RuntimeError):
        stream.registerProducer(StringTransport(), True)  # as TCP: one producer at a time
    stream.unregisterProducer()
    assert raw.producer is None
    ws.transport = None  # the socket is gone
    late = StringTransport()
    stream.registerProducer(late, True)
    assert late.producerState == "stopped"
    stream.unregisterProducer()  # no socket: nothing to do, no error


# -- closing ---------------------------------------------------------------------------


def test_lose_connection_closes_once_with_1000_after_resuming_reading() -> None:
    stream, ws, _ = make()
    stream.pauseProducing()
    stream.loseConnection()
    assert ws.close_codes == [CLOSE_NORMAL] == [1000]
    assert ws.transport.producerState == "producing"  # the peer's answer to the close must get in
    assert stream.disconnecting and not stream.paused
    stream.loseConnection()
    stream.stopProducing()
    assert ws.close_codes == [1000]
    stream.write(b"late")
    stream.deliver(b"late")
    assert ws.sent == []


def test_stop_producing_closes_cleanly_as_tcp_does() -> None:
    stream, ws, _ = make()
    stream.stopProducing()
    assert ws.close_codes == [1000] and not ws.transport.disconnected


def test_lose_connection_drops_a_websocket_that_is_no_longer_open() -> None:
    closing, ws_closing, _ = make()
    ws_closing.state = ws_closing.STATE_CLOSING  # the closing handshake is under way: wait for it
    closing.loseConnection()
    assert ws_closing.close_codes == [] and not ws_closing.transport.disconnected
    closed, ws_closed, _ = make()
    ws_closed.state = ws_closed.STATE_CLOSED
    closed.loseConnection()
    assert ws_closed.close_codes == [] and ws_closed.transport.disconnected


def test_abort_drops_the_socket_and_may_be_repeated_or_follow_a_close() -> None:
    stream, ws, _ = make()
    stream.abortConnection()
    stream.abortConnection()
    assert ws.transport.disconnected and stream.disconnecting and ws.close_codes == []
    stream.write(b"late")
    assert ws.sent == []
    closing, ws2, _ = make()
    closing.loseConnection()
    closing.abortConnection()  # a close that takes too long can still be cut short
    assert ws2.close_codes == [1000] and ws2.transport.disconnected


def test_addresses_and_repr() -> None:
    stream, _, _ = make()
    assert stream.getPeer() == PEER and stream.getHost() == HOST
    assert "192.0.2.7" in repr(stream)
