"""One viewer ⇄ one pinned device link: the command, the hello, the relay.

A :class:`Bridge` is handed a connected (and paused) viewer stream and a pinned
:class:`~secshadow.tunnel.DeviceLink`. It writes ``PROCYCMD PW_<password>`` (the link
re-checks the pin first), waits for the device's RFB ProtocolVersion
(:class:`~secshadow.procy.HelloParser`, ``hello_timeout``), then splices the two
streams (:class:`~secshadow.relay.Splice`, backpressure both ways), through the
view-only filter when asked (``docs/protocol.md`` section 7), with an idle timer. It
knows nothing of listeners, viewers' processes or secrets' sources: the session
(``proxy.py``) runs one bridge per viewer.

:attr:`Bridge.ended` fires once, after both connections are closed, with a
:class:`BridgeEnd`: the reason, the byte counts, and the error if it failed
(:class:`DeviceRejected`, :class:`PinMismatch`, :class:`ViewerError`).

Timeline::

    start() -> PROCYCMD sent -> hello (session-started) -> relaying -> ended
                       \\-- close / timeout / bad hello / filter error --> ended
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow.errors import DeviceRejected, PinMismatch, SecShadowError, ViewerError
from secshadow.observe import OneShot
from secshadow.procy import Hello, HelloParser, NotRFB
from secshadow.fastrelay import FastSplice, can_relay_fast
from secshadow.reactor import Clock
from secshadow.relay import Splice
from secshadow.sockettls import SocketTLS
from secshadow.tunnel import DeviceLink

log = Logger()

#: Viewer bytes kept while the device has not answered yet (RFB viewers send none
#: before the server's ProtocolVersion, and the viewer's stream is paused meanwhile).
MAX_EARLY_VIEWER_BYTES = 64 * 1024
#: Seconds a closing connection may take for its TLS goodbye before it is aborted.
CLOSE_GRACE = 2.0


class ViewerConnection(Protocol):
    """The viewer's stream (plain RFB over TCP, a unix socket, or a browser's
    WebSocket). Until a bridge takes it, bytes are kept (bounded) and its end is
    reported to ``on_lost``; ``on_made`` decides whether it is served at all."""

    def __init__(self, on_made: Callable[[ViewerConnection], None],
                 on_lost: Callable[[ViewerConnection], None]) -> None:
        self._on_made = on_made
        self._on_lost = on_lost
        self.bridge: Bridge | None = None
        self.pending = b""
        self._lost: OneShot[None] = OneShot()

    @property
    def is_lost(self) -> bool:
        return self._lost.done

    def when_lost(self) -> Deferred[None]:
        return self._lost.when_done()

    def peer_text(self) -> str:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", None) or getattr(peer, "name", None) or "local"
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        return f"{host}:{getattr(peer, 'port', 0)}"

    def connectionMade(self) -> None:
        self._on_made(self)

    def dataReceived(self, data: bytes) -> None:
        if self.bridge is not None:
            self.bridge.viewer_data(data)
            return
        self.pending += data
        if len(self.pending) > MAX_EARLY_VIEWER_BYTES:
            self.pending = b""
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._lost.fire(None)
        if self.bridge is not None:
            self.bridge.viewer_lost()
        else:
            self._on_lost(self)


@dataclass(frozen=True)
class BridgeEnd:
    """How one viewer's bridge ended. ``error`` is ``None`` for a normal end (either
    side closed, idle timeout, stop); byte counts are RFB bytes forwarded each way."""

    reason: str
    bytes_to_viewer: int = 0
    bytes_to_device: int = 0
    error: SecShadowError | None = None


class Bridge:
    """Runs one viewer's exchange with one pinned link (see the module docstring).

    ``clock``: a :class:`~secshadow.reactor.Clock` (seconds, callLater). ``command``: the ``PROCYCMD`` bytes (they hold the
    password: never logged). ``hello_timeout`` / ``idle_timeout``: seconds (idle 0 =
    off). ``view_only``: a factory of the filter (``rfbfilter.ViewOnlyFilter``) or
    ``None``. ``on_hello``: called with the :class:`Hello` once the device accepted.
    """

    def __init__(self, clock: Clock, viewer: ViewerConnection, link: DeviceLink, command: bytes, *,
                 hello_timeout: float, idle_timeout: float = 0.0,
                 view_only: Callable[[], Any] | None = None,
                 on_hello: Callable[[Hello], None] | None = None) -> None:
        self._clock = clock
        self.viewer = viewer
        self.link = link
        self._command = command
        self._hello_timeout = hello_timeout
        self._idle_timeout = idle_timeout
        self._filter = view_only() if view_only is not None else None
        self._on_hello = on_hello
        self._hello: HelloParser | None = None
        self.splice: Splice | FastSplice | None = None
        self._timer: IDelayedCall | None = None
        self._end: BridgeEnd | None = None
        self._ended: OneShot[BridgeEnd] = OneShot()

    # ------------------------------------------------------------------ API
    def start(self) -> None:
        """Send the command and wait for the hello; call once."""
        self.viewer.bridge = self
        self._hello = HelloParser()
        self.link.attach(self)
        try:
            self.link.send_command(self._command)
        except PinMismatch as e:
            self._finish(BridgeEnd("pin re-check failed", error=e))
            return
        log.info("PROCYCMD sent; waiting for the device's RFB ProtocolVersion")
        self._arm(self._hello_timeout, self._hello_timed_out)
        if self.viewer.is_lost:
            self.viewer_lost()

    def ended(self) -> Deferred[BridgeEnd]:
        """Fires with the :class:`BridgeEnd` once both connections are closed."""
        return self._ended.when_done()

    def stop(self, reason: str, abort: bool = False) -> Deferred[BridgeEnd]:
        """End now (session stop, signal); returns :meth:`ended`."""
        self._finish(BridgeEnd(reason, *self._counts()), abort=abort)
        return self.ended()

    @property
    def relaying(self) -> bool:
        return self.splice is not None

    # ------------------------------------------------------------ the device
    def device_data(self, link: DeviceLink, data: bytes) -> None:
        if self._end is not None:
            return
        if self.splice is not None:
            self._deliver("left", data)
            return
        assert self._hello is not None
        result = self._hello.feed(data)
        if result is None:
            return
        if isinstance(result, NotRFB):
            self._finish(BridgeEnd("bad greeting", error=DeviceRejected(
                f"the device answered PROCYCMD with something other than an RFB greeting: {result.reason}")))
            return
        assert isinstance(result, Hello)
        self._start_relay(result)

    def device_lost(self, link: DeviceLink, reason: Failure) -> None:
        if self._end is not None:
            return
        if self.splice is not None:
            self.splice.lost("left")
            return
        self._finish(BridgeEnd("device closed before the greeting", error=DeviceRejected(
            "the device closed the connection before the VNC greeting: wrong or expired "
            "password, or the local user refused")))

    # ------------------------------------------------------------ the viewer
    def viewer_data(self, data: bytes) -> None:
        if self._end is not None:
            return
        if self.splice is not None:
            self._deliver("right", data)
            return
        self.viewer.pending += data
        if len(self.viewer.pending) > MAX_EARLY_VIEWER_BYTES:
            self._finish(BridgeEnd("viewer flooded", error=ViewerError(
                "the viewer sent too much data before the device's RFB greeting")))

    def viewer_lost(self) -> None:
        if self._end is not None:
            return
        if self.splice is not None:
            self.splice.lost("right")
            return
        self._finish(BridgeEnd("viewer disconnected before the device answered"))

    # ------------------------------------------------------------ the relay
    def _start_relay(self, hello: Hello) -> None:
        self._disarm()
        filt = self._filter
        to_viewer = filt.from_server if filt is not None else None
        to_device = filt.from_client if filt is not None else None
        device, viewer = self.link.transport, self.viewer.transport
        if can_relay_fast(device, viewer):  # both on real sockets: secshadow.fastrelay
            tls, stream = cast(SocketTLS, device), cast(tcp.Connection, viewer)
            self.splice = FastSplice(tls.reactor, tls, stream, self._clock,
                                     on_closed=self._relay_closed, on_refused=self._refused,
                                     left_to_right=to_viewer, right_to_left=to_device)
        else:
            self.splice = Splice(device, viewer, self._clock,  # type: ignore[arg-type]
                                 on_closed=self._relay_closed, left_to_right=to_viewer, right_to_left=to_device)
        self.splice.start()
        if self._on_hello is not None:
            self._on_hello(hello)
        self._deliver("left", hello.raw + hello.rest)
        pending, self.viewer.pending = self.viewer.pending, b""
        if pending:
            self._deliver("right", pending)
        if self._idle_timeout > 0:
            self._arm(self._idle_timeout, self._idle_check)

    def _deliver(self, side: str, data: bytes) -> None:
        assert self.splice is not None
        try:
            self.splice.deliver(side, data)
        except SecShadowError as e:  # the view-only filter refused the stream
            self._refused(e)

    def _refused(self, e: SecShadowError) -> None:
        log.warn("closing the session: {message}", message=e.message)
        self._finish(BridgeEnd("view-only filter refused the stream", *self._counts(), error=e), abort=True)

    def _relay_closed(self, side: str) -> None:
        self._finish(BridgeEnd("viewer disconnected" if side == "right" else "device closed the connection",
                               *self._counts()))

    def _idle_check(self) -> None:
        assert self.splice is not None
        remaining = self._idle_timeout - (self._clock.seconds() - self.splice.last_activity)
        if remaining <= 0:
            self._finish(BridgeEnd(f"idle for {self._idle_timeout:g} s", *self._counts()))
        else:
            self._arm(remaining, self._idle_check)

    def _hello_timed_out(self) -> None:
        self._finish(BridgeEnd("no greeting", error=DeviceRejected(
            f"the device sent no VNC greeting within {self._hello_timeout:g} s after PROCYCMD "
            "(--hello-timeout); the local user may not have answered the shadowing prompt")))

    # ------------------------------------------------------------ the end
    def _counts(self) -> tuple[int, int]:
        splice = self.splice
        return (splice.bytes_left_to_right, splice.bytes_right_to_left) if splice else (0, 0)

    def _arm(self, seconds: float, action: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self._clock.callLater(seconds, self._fire, action)

    def _fire(self, action: Callable[[], None]) -> None:
        self._timer = None
        action()

    def _disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _finish(self, end: BridgeEnd, abort: bool = False) -> None:
        """Decide the end once; close both sides (politely unless aborting or failed);
        :attr:`ended` fires when both are gone."""
        if self._end is not None:
            return
        self._end = end
        self._disarm()
        if self.splice is not None:
            self.splice.stop()
        abort = abort or end.error is not None
        waits = [close_connection(self._clock, self.link.when_lost(), self.link.transport, abort),
                 close_connection(self._clock, self.viewer.when_lost(), self.viewer.transport, abort)]
        DeferredList(waits, consumeErrors=True).addCallback(lambda _: self._ended.fire(end))


def close_connection(clock: Clock, lost: Deferred[None], transport: Any, abort: bool) -> Deferred[None]:
    """Close ``transport`` politely (TLS close_notify) unless ``abort``; abort after
    :data:`CLOSE_GRACE` seconds anyway. ``lost`` fires when it is gone."""
    if lost.called:
        return lost
    if abort:
        transport.abortConnection()
        return lost
    transport.loseConnection()
    timer = clock.callLater(CLOSE_GRACE, transport.abortConnection)

    def cancel(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return lost.addBoth(cancel)
