"""A browser's WebSocket as the viewer's stream transport (RFB in binary messages).

The session's viewer protocol is built by the session's own factory, as for a TCP
viewer; it gets a :class:`~secshadow.wsstream.WebSocketStream` (shared with the gateway's
legs) whose ``write`` sends one binary WebSocket message and whose ``dataReceived`` input
is the payload of each binary message the browser sends (RFC 6455; noVNC sends every RFB
message as one). What is the browser's own stays here: a text message closes the
connection with 1003; the subprotocol ``binary`` is chosen when the browser offers it
(noVNC and websockify clients do), and a browser that offers only others is refused;
messages from the browser are at most :data:`MAX_MESSAGE` bytes; pings every
:data:`PING_INTERVAL` seconds.

Backpressure (``secshadow.relay`` cross-registers producers):

- device -> browser: the stream's ``registerProducer`` registers the device's producer
  with the WebSocket's own socket transport, so when the browser reads slowly and that
  socket's buffer fills, Twisted pauses the device, and resumes it once the buffer
  drained. (The HTTP channel that served the upgrade registered itself there first; it
  is unregistered when the WebSocket opens.)
- browser -> device: the stream is a push producer; pausing it stops reading the
  WebSocket's socket.

So memory per browser session is bounded by the socket buffers plus at most
:data:`MAX_MESSAGE` bytes of one partly received message, whatever the rates.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from secshadow.wsstream import AutobahnSide, WebSocketStream

#: Largest WebSocket message (and frame) accepted from the browser, bytes. RFB client
#: messages are small; only a clipboard text could be large.
MAX_MESSAGE = 1024 * 1024
#: Seconds between WebSocket pings, and how long a browser may stay silent to them.
PING_INTERVAL = 20.0
PING_TIMEOUT = 60.0
#: Seconds for the WebSocket opening and closing handshakes.
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0


class RFBWebSocketProtocol(AutobahnSide, WebSocketServerProtocol):  # type: ignore[misc]  # see AutobahnSide
    """One browser's WebSocket; ``inner`` is the stream protocol it carries (set by
    :class:`RFBWebSocketFactory` before the handshake), ``stream`` its transport once
    the WebSocket is open."""

    inner: Protocol
    stream: WebSocketStream | None = None

    def onConnect(self, request: Any) -> str | None:
        offered = list(request.protocols or [])
        if not offered:
            return None
        if "binary" in offered:
            return "binary"
        raise ConnectionDeny(ConnectionDeny.NOT_ACCEPTABLE,
                             "this server speaks RFB in binary messages (subprotocol 'binary')")

    def onOpen(self) -> None:
        raw = self.transport
        raw.unregisterProducer()  # the HTTP channel that served the upgrade; the stream's writer replaces it
        self.stream = WebSocketStream(self, peer=raw.getPeer(), host=raw.getHost())
        self.stream.start(self.inner)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            # 1003 "unsupported data" is a protocol-level close (RFC 6455 section 7.4.1).
            self._fail_connection(self.CLOSE_STATUS_CODE_UNSUPPORTED_DATA, "binary messages only")
            return
        if self.stream is not None:
            self.stream.deliver(payload)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        super().connectionLost(reason)
        if self.stream is not None:
            if reason is None or not reason.check(ConnectionDone, ConnectionLost):
                reason = Failure(ConnectionLost("the browser's WebSocket connection was lost"))
            self.stream.lost(reason)

    def abort(self) -> None:
        self.dropConnection(abort=True)


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
