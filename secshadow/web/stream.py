"""A WebSocket connection as an ordinary stream transport (RFB in binary messages).

The session's viewer protocol is built by the session's own factory, as for a TCP
viewer; it gets a :class:`StreamTransport` whose ``write`` sends one binary WebSocket
message and whose ``dataReceived`` input is the payload of each binary message the
browser sends (RFC 6455; noVNC sends every RFB message as one). A text message closes the
connection with 1003. The subprotocol ``binary`` is chosen when the browser offers it
(noVNC and websockify clients do); a browser that offers only others is refused.

Backpressure (``secshadow.relay`` cross-registers producers):

- device -> browser: :meth:`StreamTransport.registerProducer` registers the device's
  producer with the WebSocket's own socket transport, so when the browser reads slowly
  and that socket's buffer fills, Twisted pauses the device, and resumes it once the
  buffer drained. (The HTTP channel that served the upgrade registered itself there
  first; it is replaced.)
- browser -> device: :class:`StreamTransport` is a push producer; pausing it stops
  reading the WebSocket's socket.

So memory per browser session is bounded by the socket buffers plus at most
:data:`MAX_MESSAGE` bytes of one partly received message, whatever the rates.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.relay import push_producer_of

log = Logger()

#: Largest WebSocket message (and frame) accepted from the browser, bytes. RFB client
#: messages are small; only a clipboard text could be large.
MAX_MESSAGE = 1024 * 1024
#: Seconds between WebSocket pings, and how long a browser may stay silent to them.
PING_INTERVAL = 20.0
PING_TIMEOUT = 60.0
#: Seconds for the WebSocket opening and closing handshakes.
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0


@implementer(ITransport, IPushProducer, IConsumer)
class StreamTransport:
    """The transport the inner (RFB) protocol sees. ``disconnecting`` is true once
    :meth:`loseConnection` was called."""

    def __init__(self, ws: RFBWebSocketProtocol) -> None:
        self._ws = ws
        self.disconnecting = False
        raw = ws.transport
        self._peer = raw.getPeer()  # type: ignore[union-attr]
        self._host = raw.getHost()  # type: ignore[union-attr]

    # ITransport
    def write(self, data: bytes) -> None:
        if data and not self.disconnecting and self._ws.opened:
            self._ws.sendMessage(bytes(data), isBinary=True)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self._ws.sendClose(code=1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._ws.dropConnection(abort=True)

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    # IPushProducer: reading from the browser
    def _reader(self) -> IPushProducer | None:
        raw = self._ws.transport
        if raw is None:
            return None
        try:
            return push_producer_of(raw)
        except TypeError:
            return None

    def pauseProducing(self) -> None:
        reader = self._reader()
        if reader is not None:
            reader.pauseProducing()

    def resumeProducing(self) -> None:
        reader = self._reader()
        if reader is not None:
            reader.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()

    # IConsumer: writing to the browser
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        raw = self._ws.transport
        if raw is None:
            return
        raw.unregisterProducer()  # type: ignore[attr-defined]  # the HTTP channel's registration
        raw.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        raw = self._ws.transport
        if raw is not None:
            raw.unregisterProducer()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<StreamTransport over WebSocket from {self._peer}>"


class RFBWebSocketProtocol(WebSocketServerProtocol):
    """One browser's WebSocket; ``inner`` is the stream protocol it carries (set by
    :class:`RFBWebSocketFactory` before the handshake)."""

    inner: Protocol
    stream: StreamTransport | None = None
    opened = False

    def onConnect(self, request: Any) -> str | None:
        offered = list(request.protocols or [])
        if not offered:
            return None
        if "binary" in offered:
            return "binary"
        raise ConnectionDeny(ConnectionDeny.NOT_ACCEPTABLE,
                             "this server speaks RFB in binary messages (subprotocol 'binary')")

    def onOpen(self) -> None:
        self.opened = True
        self.stream = StreamTransport(self)
        self.inner.makeConnection(self.stream)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            # 1003 "unsupported data" is a protocol-level close (RFC 6455 section 7.4.1).
            self._fail_connection(self.CLOSE_STATUS_CODE_UNSUPPORTED_DATA, "binary messages only")
            return
        if self.stream is not None and not self.stream.disconnecting:
            self.inner.dataReceived(payload)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        was_open, self.opened = self.opened, False
        super().connectionLost(reason)
        if was_open:
            if reason is None or not reason.check(ConnectionDone, ConnectionLost):
                reason = Failure(ConnectionLost("the browser's WebSocket connection was lost"))
            self.inner.connectionLost(reason)


class RFBWebSocketFactory(WebSocketServerFactory):
    """Builds the one :class:`RFBWebSocketProtocol` of an accepted upgrade, carrying
    ``inner`` (the session's viewer protocol). ``url``: the WebSocket URL (for autobahn's
    bookkeeping only; no Host check)."""

    protocol = RFBWebSocketProtocol

    def __init__(self, inner: Protocol, url: str, reactor: Any = None) -> None:
        super().__init__(url=url, reactor=reactor, protocols=["binary"])
        self._inner = inner
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_MESSAGE, maxMessagePayloadSize=MAX_MESSAGE,
            autoPingInterval=PING_INTERVAL, autoPingTimeout=PING_TIMEOUT,
            openHandshakeTimeout=OPEN_TIMEOUT, closeHandshakeTimeout=CLOSE_TIMEOUT,
            failByDrop=False, perMessageCompressionAccept=lambda offers: None,
        )

    def buildProtocol(self, addr: Any) -> RFBWebSocketProtocol:
        protocol: Any = super().buildProtocol(addr)
        protocol.inner = self._inner
        return protocol
