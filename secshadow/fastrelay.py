"""The relay without Twisted's per-record Python: a TCP viewer ⇄ a socket-bound device.

When the device link runs on :class:`~secshadow.sockettls.SocketTLS` and the viewer is a
plain Twisted TCP (or unix) stream, :class:`FastSplice` takes the viewer's socket from
its Twisted transport for the time of the relay (the transport stops reading and
writing it; this object is the reactor's descriptor for that fd) and moves bytes itself:

- device → viewer: each decrypted record goes to the viewer's socket with one
  ``send``, from the buffer it was decrypted into (``SocketTLS.view_receiver``; a copy
  only when the view-only filter must see it, or for what the socket does not take);
  what the socket does not take is kept (at most one record), the device is
  paused and the rest goes out when the viewer's socket is writable, then the device
  is resumed. The view-only filter's ``from_server`` sees every record (after ServerInit
  it returns its input unchanged).
- viewer → device: ``recv`` (64 KiB), the filter's ``from_client`` when view-only is on,
  then ``SocketTLS.write``; while more than ``SocketTLS.HIGH_WATER`` bytes wait for the
  device, the viewer is not read (the device link is this object's consumer).

Memory is bounded both ways by one record plus the sockets' kernel buffers. It has
the face of :class:`~secshadow.relay.Splice` (``start``, ``deliver``, ``lost``,
``stop``, byte counts, ``last_activity``, ``closed_by``). When the relay ends
(:meth:`stop`, :meth:`lost`, or the viewer's end or error), the socket is handed back
to the Twisted transport with whatever was not sent yet, and that transport reports
the viewer's end and closes the stream as before.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer, IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.errors import SecShadowError
from secshadow.reactor import Clock
from secshadow.relay import RelayEnd, Transform
from secshadow.sockettls import Interest, SocketTLS, no_delay

_AGAIN = (BlockingIOError, InterruptedError)


def can_relay_fast(device: Any, viewer: Any) -> bool:
    """Whether ``device`` is a :class:`SocketTLS` and ``viewer`` a plain Twisted socket
    stream (TCP or unix) with nothing waiting in its write buffer."""
    return (isinstance(device, SocketTLS) and isinstance(viewer, tcp.Connection)
            and not viewer.dataBuffer and not viewer._tempDataBuffer)


@implementer(IReadWriteDescriptor, IPushProducer)
class FastSplice(RelayEnd):
    """Relays between ``device`` (``left``) and ``viewer`` (``right``) on their sockets.

    ``reactor``: the reactor both run on. ``clock``: for :attr:`last_activity` (seconds).
    ``on_closed(side)``: once, with ``"left"``/``"right"``, after the other side was told
    to close (as :class:`~secshadow.relay.Splice`). ``on_refused(error)``: a transform
    raised a :class:`SecShadowError` (the view-only filter refused the stream) while
    bytes were moved here rather than through :meth:`deliver`; the owner ends the session.
    ``left_to_right`` / ``right_to_left``: the filter's two directions, or ``None``.
    """

    def __init__(self, reactor: Any, device: SocketTLS, viewer: tcp.Connection, clock: Clock,
                 on_closed: Callable[[str], None] | None = None,
                 on_refused: Callable[[SecShadowError], None] | None = None,
                 left_to_right: Transform | None = None, right_to_left: Transform | None = None) -> None:
        self._events = Interest(reactor, self)
        self._device = device
        self._viewer = viewer
        self._sock: socket.socket = viewer.socket
        self._fd = viewer.fileno()
        self._clock = clock
        self._on_closed = on_closed
        self._on_refused = on_refused
        self._to_viewer = left_to_right
        self._to_device = right_to_left
        self._pending = b""  # device bytes the viewer's socket has not taken yet
        self._viewer_paused = False
        self._owned = False
        self.bytes_left_to_right = 0
        self.bytes_right_to_left = 0
        self.last_activity = clock.seconds()
        self.closed_by: str | None = None

    # ------------------------------------------------------------ Splice's face
    def start(self) -> None:
        """Take the viewer's socket from its transport and let both sides read."""
        self._viewer.stopReading()
        self._viewer.stopWriting()
        no_delay(self._sock)
        self._owned = True
        self._device.view_receiver = self._from_device
        self._device.registerProducer(self, True)
        self._interest()
        self._device.resumeProducing()

    def deliver(self, side: str, data: bytes) -> None:
        """Forward ``data`` received on ``side`` (the hello, early viewer bytes); a
        transform's :class:`SecShadowError` propagates to the caller."""
        if self.closed_by is not None or not self._owned:
            return
        if side == "left":
            self._send_to_viewer(data, raise_refusal=True)
        else:
            self._send_to_device(data, raise_refusal=True)

    def _side(self, side: str) -> Any:
        return self._device if side == "left" else self._viewer

    # ------------------------------------------------------------ device → viewer
    def _from_device(self, record: Any) -> None:
        if self._owned:
            self._send_to_viewer(record, raise_refusal=False)

    def _send_to_viewer(self, data: Any, raise_refusal: bool) -> None:
        """``data``: bytes, or a record's buffer valid during this call only; what is kept
        is copied (``data[:]`` is a copy of a buffer and the same object for bytes)."""
        if self._to_viewer is not None:
            data = self._transform(self._to_viewer, data[:], raise_refusal)
            if self.closed_by is not None:
                return
        self.bytes_left_to_right += len(data)
        self.last_activity = self._clock.seconds()
        if self._pending:
            self._pending += data[:]
            return
        try:
            sent = self._sock.send(data)
        except _AGAIN:
            sent = 0
        except OSError:
            self._pending = data[:]
            self._viewer_gone()
            return
        if sent < len(data):
            self._pending = data[sent:]
            self._device.pauseProducing()
            self._interest()

    def doWrite(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except _AGAIN:
            return
        except OSError:
            self._viewer_gone()
            return
        self._pending = self._pending[sent:]
        if not self._pending:
            self._interest()
            self._device.resumeProducing()

    # ------------------------------------------------------------ viewer → device
    def doRead(self) -> None:
        try:
            data = self._sock.recv(65536)
        except _AGAIN:
            return
        except OSError:
            self._viewer_gone()
            return
        if not data:
            self._viewer_gone()
            return
        self._send_to_device(data, raise_refusal=False)

    def _send_to_device(self, data: bytes, raise_refusal: bool) -> None:
        if self._to_device is not None:
            data = self._transform(self._to_device, data, raise_refusal)
            if self.closed_by is not None:
                return
        self.bytes_right_to_left += len(data)
        self.last_activity = self._clock.seconds()
        self._device.write(data)

    def pauseProducing(self) -> None:
        """The device has too much waiting: stop reading the viewer."""
        self._viewer_paused = True
        self._interest()

    def resumeProducing(self) -> None:
        self._viewer_paused = False
        self._interest()

    def stopProducing(self) -> None:
        self.stop()

    # ------------------------------------------------------------ the end
    def _transform(self, transform: Transform, data: bytes, raise_refusal: bool) -> bytes:
        try:
            return transform(data)
        except SecShadowError as e:
            if raise_refusal or self._on_refused is None:
                raise
            self.stop("refused")
            self._on_refused(e)
            return b""

    def _viewer_gone(self) -> None:
        """The viewer's socket ended or failed: let its transport find out and report it."""
        if self.closed_by is not None:
            return
        self._release()
        self._viewer.startReading()

    def _release(self) -> None:
        """Unregister from the reactor, then hand the unsent rest to the viewer's transport
        (which owns its socket again). The device stays as it is (paused or not)."""
        if not self._owned:
            return
        self._owned = False
        self._interest()
        self._device.unregisterProducer()
        self._device.view_receiver = None
        pending, self._pending = self._pending, b""
        if pending:
            self._viewer.write(pending)

    def _interest(self) -> None:
        self._events.want(self._owned and not self._viewer_paused, self._owned and bool(self._pending))

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "FastSplice"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor's report of an exception in this descriptor's handlers."""
        self._viewer_gone()
