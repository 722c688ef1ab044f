"""A WebSocket connection as an ordinary Twisted stream transport (bytes in binary messages).

Two places carry a byte stream over a WebSocket: a gateway leg
(:mod:`secshadow.gateway.dialer`, an autobahn client; the console's and the agent's
stream) and a browser viewer (:mod:`secshadow.web.stream`, an autobahn server). Both give
the protocol they carry a :class:`WebSocketStream`, so it sees what it would see over
TCP: ``ITransport``, ``IPushProducer`` and ``IConsumer``, which is what
``secshadow.relay.Splice`` and Twisted's TLS need for backpressure.

The stream knows no WebSocket library. It drives a :class:`WebSocketSide` (send a binary
message, close cleanly with a code, abort, pause and resume reading, the raw TCP/TLS
transport), and the side drives it back: :meth:`WebSocketStream.start` when the WebSocket
is open (or the gateway paired), :meth:`~WebSocketStream.deliver` for each binary
message's payload, :meth:`~WebSocketStream.lost` once when the connection ended.
:class:`AutobahnSide` is that side for an autobahn protocol (a mixin). What differs
between the two users stays in their modules: message size caps and splitting, what a
text message means, subprotocols, how the end is reported, timers.

Backpressure:

- peer -> stream: pausing the stream stops reading the raw socket (at most one partly
  received WebSocket message is buffered, bounded by the side's size cap);
- stream -> peer: :meth:`WebSocketStream.registerProducer` registers the writer with the
  raw socket's transport, so Twisted pauses it while that socket's write buffer is full.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol

from twisted.internet.interfaces import IAddress, IConsumer, IProtocol, IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.relay import push_producer_of

#: The WebSocket close code of :meth:`WebSocketStream.loseConnection` (RFC 6455 7.4.1).
CLOSE_NORMAL = 1000


class WebSocketSide(Protocol):
    """What a :class:`WebSocketStream` needs from the WebSocket connection under it.

    ``transport``: the raw TCP or TLS transport (``None`` before it connected).
    """

    @property
    def transport(self) -> Any: ...

    def can_send(self) -> bool:
        """The WebSocket is open for data messages (not connecting, closing or closed)."""

    def send_binary(self, payload: bytes) -> None:
        """Send ``payload`` as one binary message."""

    def close_cleanly(self, code: int) -> None:
        """Start the closing handshake with ``code``, or drop the connection if it is no
        longer open and not already closing."""

    def abort(self) -> None:
        """Drop the connection now."""

    def pause_reading(self) -> None:
        """Stop reading the raw socket."""

    def resume_reading(self) -> None:
        """Read the raw socket again (no-op unless paused)."""


def raw_reader(transport: Any) -> IPushProducer | None:
    """What stops ``transport`` (TCP or TLS) from reading, or ``None`` when it is gone or
    has none."""
    if transport is None:
        return None
    try:
        return push_producer_of(transport)
    except TypeError:
        return None


class AutobahnSide:
    """:class:`WebSocketSide` for an autobahn Twisted protocol; list it before the
    autobahn class (``class Leg(AutobahnSide, WebSocketClientProtocol)``).
    ``reading_paused``: whether this side stopped reading its socket. ``abort`` drops the
    raw transport; override it to go through autobahn instead.

    (mypy checks a class with two bases against all of them and finds autobahn's own
    ``peer`` and ``_transport_details`` declared two ways in its hierarchy; a subclass
    line carries ``# type: ignore[misc]`` for that, and for nothing of ours.)"""

    reading_paused = False

    if TYPE_CHECKING:  # provided by autobahn's protocol
        transport: Any
        state: int
        STATE_OPEN: int
        STATE_CLOSING: int
        sendMessage: Any
        sendClose: Any

    def can_send(self) -> bool:
        return bool(self.state == self.STATE_OPEN)

    def send_binary(self, payload: bytes) -> None:
        self.sendMessage(payload, isBinary=True)

    def close_cleanly(self, code: int) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(code)
        elif self.state != self.STATE_CLOSING:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def pause_reading(self) -> None:
        reader = raw_reader(self.transport)
        if reader is not None:
            self.reading_paused = True
            reader.pauseProducing()

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        reader = raw_reader(self.transport)
        if reader is not None:
            reader.resumeProducing()


@implementer(ITransport, IPushProducer, IConsumer)
class WebSocketStream:
    """The transport of the protocol a WebSocket carries.

    ``side``: the WebSocket (:class:`WebSocketSide`). ``peer`` / ``host``: what
    ``getPeer()`` / ``getHost()`` return. ``max_message``: the largest binary message
    ``write`` sends, bytes (longer writes are split); ``None`` sends one message per write.

    ``write`` drops data once a close started or while the WebSocket is not open (as a
    closing TCP transport does); ``loseConnection`` resumes reading (the peer's answer to
    the close must get in) and closes with :data:`CLOSE_NORMAL`, once; ``abortConnection``
    drops the connection; ``stopProducing`` closes cleanly, as TCP does. ``disconnecting``
    is true once a close started or the connection ended; ``paused`` while this stream's
    reading is paused.
    """

    def __init__(self, side: WebSocketSide, peer: IAddress, host: IAddress, max_message: int | None = None) -> None:
        if max_message is not None and max_message < 1:
            raise ValueError(f"max_message must be at least 1 byte, not {max_message}")
        self._side = side
        self._peer = peer
        self._host = host
        self._max_message = max_message
        self._protocol: IProtocol | None = None
        self.disconnecting = False
        self.paused = False

    # -- driven by the side ---------------------------------------------------------

    def start(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to this stream (its ``makeConnection``)."""
        self._protocol = protocol
        protocol.makeConnection(self)

    def deliver(self, payload: bytes) -> None:
        """A binary message arrived: its payload goes to the protocol's ``dataReceived``
        (dropped once a close started, as TCP stops reading)."""
        if self._protocol is not None and not self.disconnecting:
            self._protocol.dataReceived(payload)

    def lost(self, reason: Failure) -> None:
        """The connection ended: the protocol's ``connectionLost(reason)``, once."""
        self.disconnecting = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    # -- ITransport -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data or not self._side.can_send():
            return
        limit = self._max_message
        if limit is None or len(data) <= limit:
            self._side.send_binary(bytes(data))
            return
        view = memoryview(data)
        for start in range(0, len(view), limit):
            self._side.send_binary(bytes(view[start:start + limit]))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self.paused = False
        self._side.resume_reading()
        self._side.close_cleanly(CLOSE_NORMAL)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._side.abort()

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self._host

    # -- IPushProducer: reading from the peer ---------------------------------------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._side.pause_reading()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._side.resume_reading()

    def stopProducing(self) -> None:
        # As a TCP transport does: the consumer this stream produced for is gone (e.g.
        # the spliced connection closed), so close cleanly.
        self.loseConnection()

    # -- IConsumer: writing to the peer ---------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        raw = self._side.transport
        if raw is None:
            producer.stopProducing()  # as TCP does once disconnected
            return
        raw.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        raw = self._side.transport
        if raw is not None:
            raw.unregisterProducer()

    def __repr__(self) -> str:
        return f"<WebSocketStream with {self._peer}>"
