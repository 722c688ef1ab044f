"""One shadowing session: connect and pin, listen, serve viewers, close.

The session is the loop around :class:`~secshadow.bridge.Bridge`: it connects and pins
the device eagerly (so a wrong pin fails before a viewer is launched), opens the
viewer-side endpoint, launches the viewer, runs one bridge per viewer (each later
viewer with a fresh secret, since the one-time password works once), and closes. It
knows no transport: the device side is a :class:`~secshadow.tunnel.DeviceDialer` (TCP,
or a gateway stream), the viewer side an ``IStreamServerEndpoint`` (TCP, unix, or the
browser bridge).

States change in one place (:meth:`ShadowSession._enter`), along :data:`TRANSITIONS`::

    CONNECTING -> PINNED -> LISTENING -> REPINNING -> AWAITING_HELLO -> RELAYING
                               ^   \\__________________/^                   |
                               \\______ next viewer (max_viewers) _________/
    any state -> CLOSING -> CLOSED

Every stop (:meth:`stop`, timeouts, errors) works in every state, including while
connecting: whatever is in flight is cancelled. :meth:`start`'s Deferred fires after
both sockets are closed, the listener released and the viewer reaped.
"""

from __future__ import annotations

import enum
from urllib.parse import urlsplit
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow import events
from secshadow.bridge import Bridge, BridgeEnd, ViewerConnection, close_connection
from secshadow.errors import SecShadowError, UsageError, ViewerError
from secshadow.listener import PeerCheck, ViewerDoor, ViewerHandle, ViewerLauncher, is_loopback, same_user_only
from secshadow.options import DEFAULT_DEVICE_PORT, SessionOptions
from secshadow.procy import Hello, procy_command
from secshadow.reactor import SessionReactor
from secshadow.secret import ShadowSecret
from secshadow.tunnel import DeviceDialer, DeviceLink, PinnedDialer
from secshadow.viewers import signal_name

log = Logger()
#: Re-exported: the session's collaborators' types, for embedders and tests.
__all__ = ["PeerCheck", "SecretRefresher", "SessionState", "ShadowSession", "TRANSITIONS", "ViewerHandle",
           "ViewerLauncher", "is_loopback", "same_user_only"]

#: Fetches a fresh shadow secret (new one-time password) for the next viewer.
SecretRefresher = Callable[[], "Deferred[ShadowSecret]"]


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    PINNED = "pinned"
    LISTENING = "listening"
    REPINNING = "reconnecting"
    AWAITING_HELLO = "awaiting-hello"
    RELAYING = "relaying"
    CLOSING = "closing"
    CLOSED = "closed"


S = SessionState
#: Every allowed state change; :meth:`ShadowSession._enter` refuses any other.
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.CONNECTING: frozenset({S.PINNED, S.CLOSING}),
    S.PINNED: frozenset({S.LISTENING, S.CLOSING}),
    S.LISTENING: frozenset({S.REPINNING, S.AWAITING_HELLO, S.CLOSING}),
    S.REPINNING: frozenset({S.AWAITING_HELLO, S.LISTENING, S.CLOSING}),
    S.AWAITING_HELLO: frozenset({S.RELAYING, S.LISTENING, S.CLOSING}),
    S.RELAYING: frozenset({S.LISTENING, S.CLOSING}),
    S.CLOSING: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}


class ShadowSession:
    """One secure shadowing session for one device.

    ``reactor``: a :class:`~secshadow.reactor.SessionReactor` (TCP, time, processes).
    ``secret``: the :class:`ShadowSecret` (pin + one-time password + device address).
    ``options``: :class:`SessionOptions`. ``on_event``: receives every
    :class:`secshadow.events.Event`. ``launch_viewer``: optional; called with the
    listener's (host, port). ``dialer``: the device side (default: TCP,
    :class:`~secshadow.tunnel.PinnedDialer`). ``viewer_endpoint``: the viewer side
    (default: ``options.listen``); a port it yields may carry ``url``/``websocket``,
    which go into the ``listening`` event. ``refresh_secret``: fetches a fresh secret
    for each viewer after the first; without it later viewers are refused with a
    warning. ``peer_check``: refuses viewer streams of other local users (default
    :func:`same_user_only`). ``view_only``: a factory of the view-only filter, used when
    ``options.view_only``.

    :meth:`start` returns a Deferred firing with the :class:`events.Closed` event after
    everything is closed and reaped, or failing with a :class:`SecShadowError` subclass.
    """

    def __init__(self, reactor: SessionReactor, secret: ShadowSecret, options: SessionOptions, *,
                 on_event: events.EventSink = events.discard, launch_viewer: ViewerLauncher | None = None,
                 dialer: DeviceDialer | None = None, viewer_endpoint: IStreamServerEndpoint | None = None,
                 refresh_secret: SecretRefresher | None = None, peer_check: PeerCheck | None = same_user_only,
                 view_only: Callable[[], Any] | None = None) -> None:
        self._reactor = reactor
        self._secret = secret
        self.options = options
        self.device_host = options.device_host or secret.host or _gateway_host(secret)
        self.device_port = options.device_port or secret.port or DEFAULT_DEVICE_PORT
        if not self.device_host:
            raise UsageError("the secret names no device address (no lastIP/host): pass a device host")
        self._emit = on_event
        self._dial: DeviceDialer = dialer or PinnedDialer(reactor)
        self._refresh_secret = refresh_secret
        self._door = ViewerDoor(reactor, viewer_endpoint, options.listen, emit=on_event, launch=launch_viewer,
                                peer_check=peer_check, accepting=lambda: self.accepting_viewer,
                                admit=self._viewer_arrived, left=self._viewer_left_early,
                                timed_out=self._viewer_timed_out, viewer_exited=self._viewer_exited)
        if options.view_only and view_only is None:
            from secshadow.rfbfilter import ViewOnlyFilter

            view_only = ViewOnlyFilter
        self._view_only = view_only if options.view_only else None
        self.state = S.CONNECTING
        self._pending: Deferred[Any] | None = None  # the one operation in flight (dial, refresh)
        self._idle_link: DeviceLink | None = None  # pinned, waiting for a viewer
        self._viewer_conn: ViewerConnection | None = None
        self._bridge: Bridge | None = None
        self._served = 0
        self._bytes = (0, 0)  # (to viewer, to device) of bridges already ended
        self._done: Deferred[events.Closed] = Deferred()
        self._started_at = reactor.seconds()

    # ------------------------------------------------------------------ API
    def start(self) -> Deferred[events.Closed]:
        """Run the session; see the class docstring for what the Deferred fires with."""
        self._started_at = self._reactor.seconds()
        self._run(self._dial_device(), self._first_pin)
        return self._done

    def stop(self, reason: str = "stopped") -> Deferred[events.Closed]:
        """End the session now, in any state (signals, ``close``, API ``stop``)."""
        self._close(reason)
        return self._done

    @property
    def transport(self) -> str:
        """``"tcp"`` or ``"gateway"``: how the device was reached (the audit record's)."""
        return self._dial.transport

    @property
    def accepting_viewer(self) -> bool:
        return self.state is S.LISTENING and self._viewer_conn is None

    @property
    def bytes_relayed(self) -> tuple[int, int]:
        """(to viewer, to device) so far, over every viewer."""
        current = (self._bridge.splice.bytes_left_to_right, self._bridge.splice.bytes_right_to_left) \
            if self._bridge is not None and self._bridge.splice is not None else (0, 0)
        return self._bytes[0] + current[0], self._bytes[1] + current[1]

    # -------------------------------------------------------------- states
    def _enter(self, state: SessionState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"session state {self.state.value} -> {state.value} is not allowed")
        log.debug("session: {old} -> {new}", old=self.state.value, new=state.value)
        self.state = state

    def _run(self, operation: Deferred[Any], then: Callable[[Any], None]) -> None:
        """Track ``operation`` as the one thing in flight, so any stop can cancel it
        (:meth:`_abandon`); an abandoned operation's outcome is ignored (a link it
        still yields is aborted)."""
        self._pending = operation

        def succeeded(result: Any) -> None:
            if self._pending is not operation:
                if isinstance(result, DeviceLink):
                    result.abort()
                return
            self._pending = None
            then(result)

        def failed(failure: Failure) -> None:
            if self._pending is operation:
                self._pending = None
                self._fail(failure)

        operation.addCallbacks(succeeded, failed)

    def _abandon(self) -> None:
        """Cancel the operation in flight, if any (its outcome is then ignored)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _dial_device(self) -> Deferred[DeviceLink]:
        o = self.options
        return maybeDeferred(self._dial, self._secret, self.device_host, self.device_port, o.tls_profile,
                             o.connect_timeout)

    def _pinned(self, link: DeviceLink) -> bool:
        if self.state in (S.CLOSING, S.CLOSED):
            link.abort()
            return False
        self._emit(events.Pinned(
            device_host=self.device_host, device_port=self.device_port, tls_version=link.tls_version,
            cipher=link.cipher, certificate_sha256=self._secret.certificate_sha256))
        return True

    # ------------------------------------------------------------ listener
    def _first_pin(self, link: DeviceLink) -> None:
        if not self._pinned(link):
            return
        self._enter(S.PINNED)
        self._idle_link = link
        link.when_lost().addCallback(self._idle_link_lost, link)
        self._run(maybeDeferred(self._door.open), self._listening)

    def _idle_link_lost(self, _: None, link: DeviceLink) -> None:
        if self._idle_link is link:
            log.info("the device closed the idle TLS connection; it will be reopened for the viewer")
            self._idle_link = None

    def _listening(self, port: IListeningPort) -> None:
        self._enter(S.LISTENING)
        try:
            self._door.announce(self.options.viewer_timeout, self.options.view_only)
        except SecShadowError as e:  # the viewer could not be started
            self._fail(e)

    def _viewer_arrived(self, conn: ViewerConnection) -> None:
        if self._served > 0 and self._refresh_secret is None:
            self._door.refuse(conn, "the one-time password was used by the first viewer; another viewer "
                                    "needs a fresh secret from the UMS")
            return
        transport: Any = conn.transport
        self._served += 1
        self._viewer_conn = conn
        self._door.disarm()
        transport.pauseProducing()  # nothing to relay until the device has answered
        if self._served >= self.options.max_viewers:
            self._door.stop_listening()
        self._emit(events.ViewerConnected(peer=conn.peer_text()))
        link, self._idle_link = self._idle_link, None
        if self._served == 1 and link is not None and link.alive:
            self._bridge_to(link)
            return
        if link is not None:
            link.close()
        self._enter(S.REPINNING)
        if self._served > 1:
            assert self._refresh_secret is not None
            log.info("viewer {n}: fetching a fresh one-time password", n=self._served)
            self._run(self._refresh_secret().addCallback(self._use_secret), self._repinned)
        else:
            log.info("the device closed the idle connection; reconnecting and pinning again")
            self._run(self._dial_device(), self._repinned)

    def _use_secret(self, secret: ShadowSecret) -> Deferred[DeviceLink]:
        self._secret = secret
        return self._dial_device()

    def _repinned(self, link: DeviceLink) -> None:
        if self._pinned(link):
            self._bridge_to(link)

    def _bridge_to(self, link: DeviceLink) -> None:
        assert self._viewer_conn is not None
        self._enter(S.AWAITING_HELLO)
        bridge = Bridge(self._reactor, self._viewer_conn, link,
                        procy_command(self._secret.password, self.options.terminator),
                        hello_timeout=self.options.hello_timeout, idle_timeout=self.options.idle_timeout,
                        view_only=self._view_only, on_hello=self._hello)
        self._bridge = bridge
        bridge.ended().addCallback(self._bridge_ended, bridge)
        bridge.start()

    def _hello(self, hello: Hello) -> None:
        self._enter(S.RELAYING)
        self._emit(events.DeviceAccepted(rfb_version=hello.version,
                                         view_only=True if self.options.view_only else None))

    def _viewer_left_early(self, conn: ViewerConnection) -> None:
        """The viewer went away while its link was being (re)pinned."""
        if conn is self._viewer_conn and self.state is S.REPINNING:
            self._viewer_done(BridgeEnd("viewer disconnected before the device answered"))

    def _bridge_ended(self, end: BridgeEnd, bridge: Bridge) -> None:
        if bridge is self._bridge and self.state not in (S.CLOSING, S.CLOSED):
            self._viewer_done(end)

    def _viewer_done(self, end: BridgeEnd) -> None:
        """One viewer's exchange ended: fail, close, or wait for the next viewer."""
        self._bytes = (self._bytes[0] + end.bytes_to_viewer, self._bytes[1] + end.bytes_to_device)
        self._bridge = None
        if end.error is not None:
            self._fail(end.error)
            return
        if self._served >= self.options.max_viewers:
            self._close(end.reason)
            return
        self._abandon()
        self._viewer_conn = None
        self._emit(events.ViewerClosed(reason=end.reason, bytes_to_viewer=end.bytes_to_viewer,
                                       bytes_to_device=end.bytes_to_device))
        self._enter(S.LISTENING)
        self._door.arm(self.options.viewer_timeout)

    def _viewer_exited(self, status: int | None) -> None:
        if self.state in (S.CLOSING, S.CLOSED) or self._viewer_conn is not None:
            return
        if self._served > 0:
            self._close("the viewer exited")
        else:
            name = self._door.viewer.name if self._door.viewer else ""
            self._fail(ViewerError(f"the viewer {name} exited before connecting ({signal_name(status)}); "
                                   "its output is in the log"))

    def _viewer_timed_out(self) -> None:
        if self._served > 0:
            self._close(f"no further viewer within {self.options.viewer_timeout:g} s")
        else:
            self._fail(ViewerError(
                f"no viewer connected within {self.options.viewer_timeout:g} s (--viewer-timeout)"))

    # --------------------------------------------------------------- endings
    def _close(self, reason: str) -> None:
        if self.state in (S.CLOSING, S.CLOSED):
            return
        started = self._started_at

        def report(_: Any) -> events.Closed:
            to_viewer, to_device = self.bytes_relayed
            closed = events.Closed(reason=reason, bytes_to_viewer=to_viewer, bytes_to_device=to_device,
                                   duration_s=round(self._reactor.seconds() - started, 3))
            self._emit(closed)
            return closed

        self._finish(reason, abort=False).addCallback(report).chainDeferred(self._done)

    def _fail(self, error: SecShadowError | Failure) -> None:
        if self.state in (S.CLOSING, S.CLOSED):
            return
        failure = error if isinstance(error, Failure) else Failure(error)
        self._finish("failed", abort=True).addCallback(lambda _: failure).chainDeferred(self._done)

    def _finish(self, reason: str, abort: bool) -> Deferred[None]:
        """Close everything in any state; fires when sockets are closed, the listener
        released and the viewer reaped."""
        self._enter(S.CLOSING)
        self._abandon()
        waits: list[Deferred[Any]] = self._door.close()
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            waits.append(bridge.stop(reason, abort=abort).addCallback(self._count_bridge))
        elif self._viewer_conn is not None and not self._viewer_conn.is_lost:
            waits.append(close_connection(self._reactor, self._viewer_conn.when_lost(),
                                          self._viewer_conn.transport, abort))
        link, self._idle_link = self._idle_link, None
        if link is not None and not link.is_lost:
            waits.append(close_connection(self._reactor, link.when_lost(), link.transport, abort))

        def closed(_: Any) -> None:
            self._enter(S.CLOSED)

        return DeferredList(waits, consumeErrors=True).addCallback(closed)

    def _count_bridge(self, end: BridgeEnd) -> None:
        self._bytes = (self._bytes[0] + end.bytes_to_viewer, self._bytes[1] + end.bytes_to_device)


def _gateway_host(secret: ShadowSecret) -> str:
    """For a device reached only through a gateway (no ``lastIP``): the gateway's host,
    for events and the audit record."""
    route = getattr(secret, "gateway", None)
    return (urlsplit(route.url).hostname or "") if route is not None else ""
