"""One shadowing session: connect and pin, listen, accept the viewer, send the
command, check the hello, relay, close. All policy lives here.

States (:class:`SessionState`)::

    CONNECTING -> PINNED -> LISTENING -> AWAITING_HELLO -> RELAYING -> CLOSED
         any state ------------------------------------------------> CLOSED

Flow (``docs/protocol.md`` section 2): the device is connected and pinned
*before* the listener opens, so a wrong pin fails before a viewer is launched. If
the device drops that idle connection before the viewer arrives, the session
reconnects and pins again: the password is only used when ``PROCYCMD`` is sent.
By default one viewer is served; the listener closes as soon as it connects, and
any other connection is dropped without a byte from the device.

Every wait has a timeout (seconds, :class:`SessionOptions`); every ending closes
both sockets, releases the listener and reaps the viewer before
:meth:`ShadowSession.start`'s Deferred fires.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow import events
from secshadow.errors import (
    DeviceRejected,
    PinMismatch,
    SecShadowError,
    UsageError,
    ViewerError,
)
from secshadow.pinning import TLSProfile
from secshadow.procy import Hello, HelloParser, NotRFB, procy_command
from secshadow.relay import Splice
from secshadow.secret import ShadowSecret
from secshadow.tunnel import DeviceLink, connect_pinned
from secshadow.viewers import signal_name

log = Logger()

#: Viewer bytes kept while the device has not answered yet (RFB viewers send none).
MAX_EARLY_VIEWER_BYTES = 64 * 1024
#: Seconds a closing connection may take for its TLS goodbye before it is aborted.
CLOSE_GRACE = 2.0


def _is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and Unix socket paths (no address at all)."""
    if not host or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    PINNED = "pinned"
    LISTENING = "listening"
    AWAITING_HELLO = "awaiting-hello"
    RELAYING = "relaying"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionOptions:
    """Settings of one session; every duration is in seconds.

    ``device_host`` / ``device_port``: where the device listens (TLS from the first byte).
    ``terminator``: bytes after the command (``b""``, ``b"\\n"`` or ``b"\\r\\n"``).
    ``listen``: Twisted server endpoint string for the viewer's side, loopback by default.
    ``idle_timeout``: 0 disables it.
    ``max_viewers``: how many viewers, one after another, the session serves; each one
    after the first needs a fresh secret (``refresh_secret``), since the password
    works once. The listener stays open until the last one connected.
    """

    device_host: str
    device_port: int = 5900
    tls_profile: TLSProfile = TLSProfile.MODERN
    terminator: bytes = b""
    listen: str = "tcp:0:interface=127.0.0.1"
    connect_timeout: float = 15.0
    viewer_timeout: float = 60.0
    hello_timeout: float = 60.0
    idle_timeout: float = 0.0
    max_viewers: int = 1


class ViewerHandle(TypingProtocol):
    """A launched viewer as the session sees it (see :class:`secshadow.viewers.ViewerProcess`)."""

    name: str
    pid: int | None

    def wait(self) -> Deferred[int | None]: ...

    def terminate(self, grace: float = ...) -> Deferred[None]: ...


#: Starts a viewer for the listener at (host, port); raises ViewerError.
ViewerLauncher = Callable[[str, int], ViewerHandle]
#: Opens a pinned device connection (reconnects call it again).
DeviceConnector = Callable[[], "Deferred[DeviceLink]"]
#: Fetches a fresh shadow secret (new one-time password) for the next viewer.
SecretRefresher = Callable[[], "Deferred[ShadowSecret]"]


class _ViewerConnection(Protocol):
    """The plain-RFB side; every callback goes straight to the session."""

    def __init__(self, session: ShadowSession) -> None:
        self.session = session
        self.is_lost = False
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.session._viewer_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.session._viewer_data(self, data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.is_lost = True
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self.session._viewer_lost(self, reason)

    def when_lost(self) -> Deferred[None]:
        if self.is_lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter


class _ViewerFactory(Factory):
    noisy = False

    def __init__(self, session: ShadowSession) -> None:
        self.session = session

    def buildProtocol(self, addr: Any) -> Protocol | None:
        # Only the first viewer gets a protocol; others are closed at once.
        if not self.session._accepting_viewer():
            log.info("refusing another viewer connection from {addr}", addr=addr)
            return None
        return _ViewerConnection(self.session)


class ShadowSession:
    """One secure shadowing session for one device.

    ``reactor``: provides IReactorTCP, IReactorTime (and IReactorProcess for viewers).
    ``secret``: the :class:`ShadowSecret` (pin + one-time password).
    ``options``: :class:`SessionOptions`.
    ``on_event``: receives every :class:`secshadow.events.Event` as it happens.
    ``launch_viewer``: optional; called with the listener's (host, port).
    ``connector``: optional; defaults to :func:`secshadow.tunnel.connect_pinned` with
    the options (tests inject fakes).
    ``refresh_secret``: optional; fetches a fresh secret for each viewer after the first
    (``options.max_viewers`` > 1). Without it, later viewers are refused with a warning
    event: the one-time password was used.

    :meth:`start` returns a Deferred firing with the :class:`events.Closed` event
    after everything is closed and reaped, or failing with a :class:`SecShadowError`
    subclass (the CLI maps it to an exit code).
    """

    def __init__(
        self,
        reactor: Any,
        secret: ShadowSecret,
        options: SessionOptions,
        on_event: events.EventSink = events.discard,
        launch_viewer: ViewerLauncher | None = None,
        connector: DeviceConnector | None = None,
        refresh_secret: SecretRefresher | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._secret = secret
        self.options = options
        self._emit = on_event
        self._launch_viewer = launch_viewer
        self._connector = connector or self._default_connector
        self._refresh_secret = refresh_secret
        self._served = 0
        self._earlier_bytes = (0, 0)  # (to viewer, to device) of viewers already gone
        self._retired: list[DeviceLink] = []
        self.state = SessionState.CONNECTING
        self._device: DeviceLink | None = None
        self._connecting: Deferred[DeviceLink] | None = None
        self._port: IListeningPort | None = None
        self._viewer_conn: _ViewerConnection | None = None
        self._viewer: ViewerHandle | None = None
        self._viewer_pending = b""
        self._hello: HelloParser | None = None
        self._splice: Splice | None = None
        self._timers: dict[str, IDelayedCall] = {}
        self._done: Deferred[events.Closed] = Deferred()
        self._started_at = self._clock.seconds()
        self._finishing = False

    # ------------------------------------------------------------------ API
    def start(self) -> Deferred[events.Closed]:
        """Run the session; see the class docstring for what the Deferred fires with."""
        self._started_at = self._clock.seconds()
        self._connect_device().addCallbacks(self._on_first_pin, self._fail)
        return self._done

    def stop(self, reason: str = "stopped") -> Deferred[events.Closed]:
        """End the session now (signals, cancellation); it closes cleanly with ``reason``."""
        if not self._finishing:
            self._close(reason)
        return self._done

    # ------------------------------------------------------ device connect
    def _default_connector(self) -> Deferred[DeviceLink]:
        o = self.options
        return connect_pinned(
            self._reactor, o.device_host, o.device_port, self._secret.certificate_der,
            o.tls_profile, o.connect_timeout,
        )

    def _connect_device(self) -> Deferred[DeviceLink]:
        connecting = self._connector()
        self._connecting = connecting

        def done(result: Any) -> Any:
            self._connecting = None
            return result

        return connecting.addBoth(done)

    def _adopt(self, link: DeviceLink) -> None:
        self._device = link
        link.attach(self)
        self._emit(events.Pinned(
            device_host=self.options.device_host, device_port=self.options.device_port,
            tls_version=link.tls_version, cipher=link.cipher,
            certificate_sha256=self._secret.certificate_sha256,
        ))

    def _on_first_pin(self, link: DeviceLink) -> None:
        if self._finishing:
            link.abort()
            return
        self._adopt(link)
        self.state = SessionState.PINNED
        self._open_listener()

    # ------------------------------------------------------------ listener
    def _open_listener(self) -> None:
        try:
            endpoint = serverFromString(self._reactor, self.options.listen)
        except Exception as e:  # noqa: BLE001 - parsers raise anything (ssl: reads files)
            self._fail(UsageError(f"--listen {self.options.listen!r} is not a server endpoint: {e}"))
            return
        endpoint.listen(_ViewerFactory(self)).addCallbacks(self._on_listening, self._on_listen_error)

    def _on_listen_error(self, failure: Failure) -> None:
        if failure.check(CannotListenError):
            self._fail(UsageError(f"cannot listen on {self.options.listen!r}: {failure.getErrorMessage()}"))
        else:
            self._fail(failure)

    def _on_listening(self, port: IListeningPort) -> None:
        self._port = port
        if self._finishing:
            self._stop_listening()
            return
        address = port.getHost()
        host = getattr(address, "host", None) or getattr(address, "name", "")
        if isinstance(host, bytes):
            host = host.decode()
        number = getattr(address, "port", 0)
        self.state = SessionState.LISTENING
        self._emit(events.Listening(host=str(host), port=int(number)))
        if not _is_loopback(str(host)):
            self._emit(events.WarningEvent(
                message=f"the viewer port listens on {host}, not on loopback: anyone who can reach "
                        "it gets the device's screen without a password"))
        self._set_timer("viewer", self.options.viewer_timeout, self._viewer_timed_out)
        if self._launch_viewer is not None:
            try:
                viewer = self._launch_viewer(str(host), int(number))
            except SecShadowError as e:
                self._fail(e)
                return
            self._viewer = viewer
            if viewer.pid is not None:
                self._emit(events.ViewerStarted(viewer=viewer.name, pid=viewer.pid))
            viewer.wait().addCallback(self._viewer_exited)

    def _accepting_viewer(self) -> bool:
        return self.state is SessionState.LISTENING and self._viewer_conn is None

    def _stop_listening(self) -> Deferred[None]:
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)  # type: ignore[call-overload]

    # -------------------------------------------------------------- viewer
    def _viewer_connected(self, conn: _ViewerConnection) -> None:
        if not self._accepting_viewer():
            conn.transport.abortConnection()  # type: ignore[union-attr]
            return
        peer = conn.transport.getPeer()  # type: ignore[union-attr]
        peer_text = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', 0)}"
        if self._served > 0 and self._refresh_secret is None:
            conn.transport.abortConnection()  # type: ignore[union-attr]
            self._emit(events.WarningEvent(
                message=f"refused the viewer connection from {peer_text}: the one-time password was "
                        "used by the first viewer; another viewer needs a fresh secret from the UMS"))
            return
        self._served += 1
        self._viewer_conn = conn
        self._cancel_timer("viewer")
        # Hold the viewer until the device has answered: nothing to relay yet.
        conn.transport.pauseProducing()  # type: ignore[union-attr]
        if self._served >= self.options.max_viewers:
            self._stop_listening()
        self._emit(events.ViewerConnected(peer=peer_text))
        if self._served > 1:
            assert self._refresh_secret is not None
            log.info("viewer {n}: fetching a fresh one-time password", n=self._served)
            self.state = SessionState.CONNECTING
            self._refresh_secret().addCallback(self._use_fresh_secret).addCallbacks(self._on_repin, self._fail)
            return
        if self._device is not None and self._device.alive:
            self._send_command()
            return
        log.info("the device closed the idle connection; reconnecting and pinning again")
        self.state = SessionState.CONNECTING
        self._connect_device().addCallbacks(self._on_repin, self._fail)

    def _use_fresh_secret(self, secret: ShadowSecret) -> Deferred[DeviceLink]:
        self._secret = secret
        return self._connect_device()

    def _on_repin(self, link: DeviceLink) -> None:
        if self._finishing:
            link.abort()
            return
        self._adopt(link)
        self._send_command()

    def _send_command(self) -> None:
        assert self._device is not None
        self.state = SessionState.AWAITING_HELLO
        self._hello = HelloParser()
        try:
            self._device.send_command(procy_command(self._secret.password, self.options.terminator))
        except PinMismatch as e:
            self._fail(e)
            return
        log.info("PROCYCMD sent; waiting for the device's RFB ProtocolVersion")
        self._set_timer("hello", self.options.hello_timeout, self._hello_timed_out)

    def _viewer_data(self, conn: _ViewerConnection, data: bytes) -> None:
        if conn is not self._viewer_conn:
            return
        if self._splice is not None:
            self._splice.deliver("right", data)
            return
        self._viewer_pending += data
        if len(self._viewer_pending) > MAX_EARLY_VIEWER_BYTES:
            self._fail(ViewerError("the viewer sent too much data before the device's RFB greeting"))

    def _viewer_lost(self, conn: _ViewerConnection, reason: Failure) -> None:
        if conn is not self._viewer_conn or self._finishing:
            return
        if self._splice is not None:
            self._splice.lost("right")
            return
        self._viewer_done("viewer disconnected before the device answered")

    def _viewer_exited(self, status: int | None) -> None:
        if self._finishing:
            return
        if self._served > 0:
            if self._viewer_conn is None:
                self._close("the viewer exited")
            return
        if self._viewer_conn is None:
            self._fail(ViewerError(
                f"the viewer {self._viewer.name if self._viewer else ''} exited before connecting "
                f"({signal_name(status)}); its output is in the log"))

    # -------------------------------------------------------------- device
    def device_data(self, link: DeviceLink, data: bytes) -> None:
        if link is not self._device or self._finishing:
            return
        if self._splice is not None:
            self._splice.deliver("left", data)
            return
        if self._hello is None:
            # Before PROCYCMD a device has nothing to say; DeviceLink caps what it keeps.
            log.warn("device sent {n} bytes before PROCYCMD; ignoring them", n=len(data))
            return
        result = self._hello.feed(data)
        if result is None:
            return
        if isinstance(result, NotRFB):
            self._fail(DeviceRejected(
                f"the device answered PROCYCMD with something other than an RFB greeting: {result.reason}"))
            return
        assert isinstance(result, Hello)
        self._start_relay(result)

    def device_lost(self, link: DeviceLink, reason: Failure) -> None:
        if link is not self._device or self._finishing:
            return
        if self._splice is not None:
            self._splice.lost("left")
        elif self.state is SessionState.AWAITING_HELLO:
            self._fail(DeviceRejected(
                "the device closed the connection before the VNC greeting: wrong or expired "
                "password, or the local user refused"))
        else:
            # Idle connection dropped before the viewer came: reconnect on demand.
            log.info("the device closed the idle TLS connection; it will be reopened for the viewer")
            self._device = None

    # --------------------------------------------------------------- relay
    def _start_relay(self, hello: Hello) -> None:
        assert self._device is not None and self._viewer_conn is not None
        self._cancel_timer("hello")
        self.state = SessionState.RELAYING
        self._emit(events.SessionStarted(rfb_version=hello.version))
        splice = Splice(self._device.transport, self._viewer_conn.transport, self._clock,  # type: ignore[arg-type]
                        on_closed=self._relay_closed)
        self._splice = splice
        splice.start()
        splice.deliver("left", hello.raw + hello.rest)
        pending, self._viewer_pending = self._viewer_pending, b""
        if pending:
            splice.deliver("right", pending)
        if self.options.idle_timeout > 0:
            self._set_timer("idle", self.options.idle_timeout, self._idle_check)

    def _relay_closed(self, side: str) -> None:
        self._viewer_done("viewer disconnected" if side == "right" else "device closed the connection")

    def _viewer_done(self, reason: str) -> None:
        """One viewer's session ended: close the session, or wait for the next viewer."""
        if self._served >= self.options.max_viewers:
            self._close(reason)
            return
        splice = self._splice
        sent = (splice.bytes_left_to_right, splice.bytes_right_to_left) if splice else (0, 0)
        self._earlier_bytes = (self._earlier_bytes[0] + sent[0], self._earlier_bytes[1] + sent[1])
        self._emit(events.ViewerClosed(reason=reason, bytes_to_viewer=sent[0], bytes_to_device=sent[1]))
        for name in ("hello", "idle"):
            self._cancel_timer(name)
        if self._viewer_conn is not None and not self._viewer_conn.is_lost:
            self._viewer_conn.transport.loseConnection()  # type: ignore[union-attr]
        if self._device is not None:
            self._retired.append(self._device)
            self._device.close()
        self._splice = self._hello = self._viewer_conn = self._device = None
        self._viewer_pending = b""
        self.state = SessionState.LISTENING
        self._set_timer("viewer", self.options.viewer_timeout, self._viewer_timed_out)

    def _idle_check(self) -> None:
        assert self._splice is not None
        idle_for = self._clock.seconds() - self._splice.last_activity
        remaining = self.options.idle_timeout - idle_for
        if remaining <= 0:
            self._close(f"idle for {self.options.idle_timeout:g} s")
        else:
            self._set_timer("idle", remaining, self._idle_check)

    # -------------------------------------------------------------- timers
    def _set_timer(self, name: str, seconds: float, action: Callable[[], None]) -> None:
        self._cancel_timer(name)
        if seconds and seconds > 0:
            self._timers[name] = self._clock.callLater(seconds, self._fire_timer, name, action)

    def _fire_timer(self, name: str, action: Callable[[], None]) -> None:
        self._timers.pop(name, None)
        action()

    def _cancel_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _viewer_timed_out(self) -> None:
        if self._served > 0:
            self._close(f"no further viewer within {self.options.viewer_timeout:g} s")
            return
        self._fail(ViewerError(f"no viewer connected within {self.options.viewer_timeout:g} s (--viewer-timeout)"))

    def _hello_timed_out(self) -> None:
        self._fail(DeviceRejected(
            f"the device sent no VNC greeting within {self.options.hello_timeout:g} s after PROCYCMD "
            "(--hello-timeout); the local user may not have answered the shadowing prompt"))

    # --------------------------------------------------------------- endings
    def _close(self, reason: str) -> None:
        if self._finishing:
            return
        splice = self._splice
        earlier_to_viewer, earlier_to_device = self._earlier_bytes
        closed = events.Closed(
            reason=reason,
            bytes_to_viewer=earlier_to_viewer + (splice.bytes_left_to_right if splice else 0),
            bytes_to_device=earlier_to_device + (splice.bytes_right_to_left if splice else 0),
            duration_s=round(self._clock.seconds() - self._started_at, 3),
        )

        def report(_: Any) -> events.Closed:
            self._emit(closed)
            return closed

        self._finish().addCallback(report).chainDeferred(self._done)

    def _fail(self, error: SecShadowError | Failure) -> None:
        if self._finishing:
            return
        failure = error if isinstance(error, Failure) else Failure(error)
        self._finish(abort=True).addCallback(lambda _: failure).chainDeferred(self._done)

    def _finish(self, abort: bool = False) -> Deferred[None]:
        """Close everything; fires when sockets are closed, the listener released and the
        viewer reaped."""
        self._finishing = True
        self.state = SessionState.CLOSED
        for name in list(self._timers):
            self._cancel_timer(name)
        waits: list[Deferred[Any]] = [self._stop_listening()]
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting.addErrback(lambda _: None)
        if self._splice is not None:
            self._splice.close()
        if self._device is not None and not self._device.is_lost:
            waits.append(self._close_connection(self._device.when_lost(), self._device.transport, abort))
        if self._viewer_conn is not None and not self._viewer_conn.is_lost:
            waits.append(self._close_connection(self._viewer_conn.when_lost(),
                                                self._viewer_conn.transport, abort))
        for link in self._retired:
            if not link.is_lost:
                waits.append(self._close_connection(link.when_lost(), link.transport, abort))
        if self._viewer is not None:
            waits.append(self._viewer.terminate())
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _close_connection(self, lost: Deferred[None], transport: Any, abort: bool) -> Deferred[None]:
        """Close politely (TLS close_notify) unless aborting; abort after CLOSE_GRACE anyway."""
        if abort:
            transport.abortConnection()
            return lost
        transport.loseConnection()
        timer = self._clock.callLater(CLOSE_GRACE, transport.abortConnection)

        def cancel(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return lost.addBoth(cancel)
