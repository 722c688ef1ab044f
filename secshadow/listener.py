"""The viewer's side of a session: the listener, the launched viewer, who may connect.

:class:`ViewerDoor` opens the viewer-side ``IStreamServerEndpoint`` (TCP or unix from
``--listen``, or the browser bridge), reports ``listening`` (with the browser's ``url``
and ``websocket`` when the endpoint's port carries them), launches the viewer, refuses
streams of other local users (:func:`same_user_only`: ``SO_PEERCRED``, or the owner of
the peer's loopback TCP socket), and keeps the ``--viewer-timeout`` timer. The session
(``proxy.py``) decides what an accepted viewer gets.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow import events
from secshadow.bridge import ViewerConnection
from secshadow.errors import UsageError
from secshadow.reactor import SessionReactor

log = Logger()
#: Refused viewer streams said one by one (a ``warning`` event each); later ones are only
#: counted, and the count is said once when the session ends: another local user who
#: connects in a loop must not flood the console's event stream or log (issue 9).
SAID_REFUSALS = 5


class ViewerHandle(TypingProtocol):
    """A launched viewer as the session sees it (see :class:`secshadow.viewers.ViewerProcess`)."""

    name: str
    pid: int | None

    def wait(self) -> Deferred[int | None]: ...

    def terminate(self, grace: float = ...) -> Deferred[None]: ...


#: Starts a viewer for the listener at (host, port); raises ViewerError.
ViewerLauncher = Callable[[str, int], ViewerHandle]
#: Says why a viewer stream must be refused (``None``: serve it).
PeerCheck = Callable[[Any], "str | None"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and Unix socket paths (no address at all)."""
    if not host or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def same_user_only(transport: Any) -> str | None:
    """The default :data:`PeerCheck`: a viewer on a local socket must belong to this
    process's user (``SO_PEERCRED`` on unix sockets, the socket owner for loopback
    TCP). Streams that are not sockets (the browser bridge) carry their own
    authentication (a single-use token) and pass; so do non-loopback peers, whose
    user cannot be known (the listener warns about them)."""
    from secshadow.peercred import peer_uid

    sock = transport.getHandle() if hasattr(transport, "getHandle") else None
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        return None
    if sock.family != socket.AF_UNIX and not is_loopback(str(getattr(transport.getPeer(), "host", ""))):
        return None
    uid = peer_uid(transport)
    if uid is None:
        return "its owner could not be determined"
    if uid != os.geteuid():
        return f"it belongs to another local user (uid {uid})"
    return None


class ViewerDoor:
    """The listener and the launched viewer of one session.

    ``endpoint``: the viewer side, or ``None`` for ``listen`` (a Twisted endpoint
    string). ``accepting()``: whether a new stream may be served now. ``admit(conn)``:
    called with each accepted, connected stream. ``left(conn)``: a stream that ended
    before its bridge took it. ``timed_out()`` / ``viewer_exited(status)``: the
    ``--viewer-timeout`` ran out / the launched viewer was reaped.
    """

    def __init__(self, reactor: SessionReactor, endpoint: IStreamServerEndpoint | None, listen: str, *,
                 emit: events.EventSink, launch: ViewerLauncher | None, peer_check: PeerCheck | None,
                 accepting: Callable[[], bool], admit: Callable[[ViewerConnection], None],
                 left: Callable[[ViewerConnection], None], timed_out: Callable[[], None],
                 viewer_exited: Callable[[int | None], None]) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._listen = listen
        self._emit = emit
        self._launch = launch
        self._peer_check = peer_check
        self._accepting, self._admit, self._left = accepting, admit, left
        self._timed_out, self._viewer_exited = timed_out, viewer_exited
        self._port: IListeningPort | None = None
        self._closed = False
        self._timer: IDelayedCall | None = None
        self.viewer: ViewerHandle | None = None
        #: Streams refused so far (another user's, or after the password was used), and
        #: streams turned away while a viewer was being served.
        self.refused = 0
        self.turned_away = 0

    def open(self) -> Deferred[IListeningPort]:
        """Listen; fires with the port (not yet announced: see :meth:`announce`)."""
        try:
            endpoint = self._endpoint or serverFromString(self._reactor, self._listen)
        except Exception as e:  # noqa: BLE001 - endpoint parsers raise anything (ssl: reads files)
            raise UsageError(f"--listen {self._listen!r} is not a server endpoint: {e}") from None
        return endpoint.listen(_ViewerFactory(self)).addCallback(self._keep).addErrback(self._listen_error)

    def _keep(self, port: IListeningPort) -> IListeningPort:
        self._port = port
        if self._closed:  # the session ended while the endpoint was starting
            self.stop_listening()
        return port

    def _listen_error(self, failure: Failure) -> Failure:
        if failure.check(CannotListenError):
            return Failure(UsageError(f"cannot listen on {self._listen!r}: {failure.getErrorMessage()}"))
        return failure

    def announce(self, viewer_timeout: float, view_only: bool) -> None:
        """Report ``listening``, warn about a non-loopback listener, arm the viewer
        timer and launch the viewer (raises :class:`SecShadowError` when it cannot)."""
        assert self._port is not None
        address = self._port.getHost()
        host = getattr(address, "host", None) or getattr(address, "name", "")
        if isinstance(host, bytes):
            host = host.decode()
        port = int(getattr(address, "port", 0))
        self._emit(events.Listening(host=str(host), port=port, url=getattr(self._port, "url", None),
                                    websocket=getattr(self._port, "websocket", None),
                                    view_only=True if view_only else None))
        if not is_loopback(str(host)):
            self._emit(events.WarningEvent(
                message=f"the viewer port listens on {host}, not on loopback: anyone who can reach "
                        "it gets the device's screen without a password"))
        self.arm(viewer_timeout)
        if self._launch is not None:
            self.viewer = self._launch(str(host), port)
            if self.viewer.pid is not None:
                self._emit(events.ViewerStarted(viewer=self.viewer.name, pid=self.viewer.pid))
            self.viewer.wait().addCallback(self._viewer_exited)

    def stream_made(self, conn: ViewerConnection) -> None:
        """A stream connected: refuse it (closed at once) or admit it to the session."""
        transport: Any = conn.transport
        if not self._accepting():
            transport.abortConnection()
            return
        refusal = self._peer_check(transport) if self._peer_check is not None else None
        if refusal is not None:
            self.refuse(conn, f"{refusal}; still waiting for the viewer")
            return
        self._admit(conn)

    def refuse(self, conn: ViewerConnection, why: str) -> None:
        """Refuse an admitted stream after all (session policy), saying why."""
        conn.transport.abortConnection()  # type: ignore[union-attr]
        self.refused += 1
        if self.refused <= SAID_REFUSALS:
            more = "; further refusals are only counted" if self.refused == SAID_REFUSALS else ""
            self._emit(events.WarningEvent(
                message=f"refused the viewer connection from {conn.peer_text()}: {why}{more}"))

    def arm(self, seconds: float) -> None:
        """(Re)start the ``--viewer-timeout`` timer."""
        self.disarm()
        self._timer = self._reactor.callLater(seconds, self._fire)

    def disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fire(self) -> None:
        self._timer = None
        self._timed_out()

    def stop_listening(self) -> Deferred[None]:
        """Release the listener (idempotent)."""
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)  # type: ignore[call-overload]

    def close(self) -> list[Deferred[Any]]:
        """Stop the timer, release the listener, terminate the viewer; the Deferreds
        fire when each is done."""
        self._closed = True
        self.disarm()
        if self.refused > SAID_REFUSALS:
            self._emit(events.WarningEvent(message=f"refused {self.refused} viewer connections in all"))
            self.refused = 0
        if self.turned_away:
            log.info("turned away {n} connection(s) that came while a viewer was being served", n=self.turned_away)
            self.turned_away = 0
        waits: list[Deferred[Any]] = [self.stop_listening()]
        if self.viewer is not None:
            waits.append(self.viewer.terminate())
        return waits


class _ViewerFactory(Factory):
    noisy = False

    def __init__(self, door: ViewerDoor) -> None:
        self.door = door

    def buildProtocol(self, addr: Any) -> ViewerConnection | None:
        if not self.door._accepting():
            self.door.turned_away += 1  # counted, said once at the end (no line per connection)
            return None
        return ViewerConnection(self.door.stream_made, self.door._left)

