"""Two connected transports spliced together, with backpressure both ways.

This is Twisted's ``twisted.protocols.portforward`` pattern: each transport is
registered as the streaming producer of the other, so when one side's write
buffer fills (its reader is slow), the other side stops reading from its socket.
Memory stays bounded by the transports' own buffers whatever the rates.

The protocols on both sides call :meth:`Splice.deliver` from ``dataReceived`` and
:meth:`Splice.lost` from ``connectionLost``; they keep their own state machines
(the proxy's handshake, the emulator's password check) and hand over to the
splice once the stream is plain RFB.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IPushProducer, ITransport

from secshadow.reactor import Clock

#: Rewrites the bytes of one direction before they are written (the view-only filter).
Transform = Callable[[bytes], bytes]


def push_producer_of(transport: ITransport) -> IPushProducer:
    """The object that stops ``transport`` from reading when paused.

    A TCP transport is its own push producer. A TLS transport
    (``TLSMemoryBIOProtocol``) is not: pausing the TCP transport under it stops the
    ciphertext, and with it the plaintext.
    """
    if IPushProducer.providedBy(transport):
        return transport
    inner = getattr(transport, "transport", None)
    if inner is not None and IPushProducer.providedBy(inner):
        return inner
    raise TypeError(f"{transport!r} is not a push producer and wraps none")


class RelayEnd:
    """How a relay ends, the same for :class:`Splice` and
    :class:`secshadow.fastrelay.FastSplice`.

    :meth:`lost` (a side lost its connection) closes the other side once and reports the
    side to ``on_closed``; :meth:`stop` marks the relay ended (:attr:`closed_by`: the side
    that closed first, or the reason given) and lets the relay release what it holds
    (``_release``); the owner closes the transports.
    """

    closed_by: str | None = None
    _on_closed: Callable[[str], None] | None = None

    def _side(self, side: str) -> Any:
        """The transport of ``side`` (``"left"``: the device, ``"right"``: the viewer)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Give back what the relay holds (producers, descriptors); called once."""

    def lost(self, side: str) -> None:
        """``side`` lost its connection: close the other side (once)."""
        if self.closed_by is not None:
            return
        self.stop(side)
        self._side("right" if side == "left" else "left").loseConnection()
        if self._on_closed is not None:
            self._on_closed(side)

    def stop(self, by: str = "stopped") -> None:
        """Stop relaying (further bytes are dropped) and release; the owner closes the
        transports."""
        if self.closed_by is not None:
            return
        self.closed_by = by
        self._release()


class Splice(RelayEnd):
    """Relays bytes between ``left`` and ``right``, counting them.

    ``left`` / ``right``: connected transports that are also push producers (TCP and
    TLS transports are). ``clock``: for :attr:`last_activity` (seconds, reactor time).
    ``on_closed``: called once, with the side name that closed first (``"left"`` or
    ``"right"``), after the other side was told to close.
    ``left_to_right`` / ``right_to_left``: optional transforms of each direction's bytes
    (the view-only filter); byte counts are of what was forwarded, after the transform.
    A transform that raises stops the relay: the exception propagates to the caller of
    :meth:`deliver`, which closes the session.
    """

    def __init__(
        self,
        left: ITransport,
        right: ITransport,
        clock: Clock,
        on_closed: Callable[[str], None] | None = None,
        left_to_right: Transform | None = None,
        right_to_left: Transform | None = None,
    ) -> None:
        self._transports = {"left": left, "right": right}
        self._left_to_right = left_to_right
        self._right_to_left = right_to_left
        self._clock = clock
        self._on_closed = on_closed
        self.bytes_left_to_right = 0
        self.bytes_right_to_left = 0
        self.last_activity = clock.seconds()
        self.closed_by: str | None = None
        self._started = False

    def start(self) -> None:
        """Cross-register the producers and let both sides read."""
        left, right = self._transports["left"], self._transports["right"]
        # A consumer's producer is the *other* side: when right's buffer is full,
        # Twisted pauses left, which then stops reading its socket, and vice versa.
        right.registerProducer(push_producer_of(left), True)  # type: ignore[attr-defined]
        left.registerProducer(push_producer_of(right), True)  # type: ignore[attr-defined]
        self._started = True
        for transport in (left, right):
            push_producer_of(transport).resumeProducing()

    def deliver(self, side: str, data: bytes) -> None:
        """Forward ``data`` received on ``side`` to the other side."""
        if self.closed_by is not None:
            return
        if side == "left":
            if self._left_to_right is not None:
                data = self._left_to_right(data)
            self.bytes_left_to_right += len(data)
            self._transports["right"].write(data)
        else:
            if self._right_to_left is not None:
                data = self._right_to_left(data)
            self.bytes_right_to_left += len(data)
            self._transports["left"].write(data)
        self.last_activity = self._clock.seconds()

    def _side(self, side: str) -> ITransport:
        return self._transports[side]

    def _release(self) -> None:
        """Unregister the cross-registered producers."""
        if self._started:
            for transport in self._transports.values():
                try:
                    transport.unregisterProducer()  # type: ignore[attr-defined]
                except (AttributeError, RuntimeError):
                    pass

    def close(self) -> None:
        """Close both sides now (timeouts, signals)."""
        for transport in self._transports.values():
            transport.loseConnection()
