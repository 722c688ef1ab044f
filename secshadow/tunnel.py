"""The pinned TLS connection to the device (``docs/protocol.md`` section 2, steps 1-3).

:func:`connect_pinned` opens TCP, runs the TLS handshake with
:class:`~secshadow.pinning.PinnedConnectionCreator`, re-checks the pin after the
handshake and fires with a :class:`DeviceLink`, or fails with exactly one of
:class:`DeviceUnreachable` (exit 4), :class:`TLSHandshakeError` (exit 5) or
:class:`PinMismatch` (exit 6). Nothing is written to the device here: the
password goes out later, through :meth:`DeviceLink.send_command`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.errors import DeviceUnreachable, PinMismatch, SecShadowError, TLSHandshakeError
from secshadow.pinning import (
    PinnedConnectionCreator,
    TLSProfile,
    check_peer,
    describe_handshake_failure,
    negotiated,
    pin_mismatch_error,
)

log = Logger()
_CONNECTION_DONE = Failure(ierror.ConnectionDone())


class DeviceListener(TypingProtocol):
    """What a :class:`DeviceLink` reports to once the session owns it."""

    def device_data(self, link: DeviceLink, data: bytes) -> None: ...

    def device_lost(self, link: DeviceLink, reason: Failure) -> None: ...


@implementer(IHandshakeListener)
class DeviceLink(Protocol):
    """The application side of the TLS connection to the device.

    ``ready``: a Deferred firing with this link once the handshake completed and the
    pin was re-checked, or failing with the mapped error. :meth:`when_lost`: a
    Deferred that fires when the connection is gone, whatever the reason.
    ``tls_version`` / ``cipher``: what was negotiated (set when ready).
    Bytes that arrive before a listener is attached are kept (at most
    :attr:`MAX_EARLY_BYTES`) and handed over on :meth:`attach`.
    """

    MAX_EARLY_BYTES = 4096

    def __init__(self, creator: PinnedConnectionCreator) -> None:
        self._creator = creator
        self.ready: Deferred[DeviceLink] | None = Deferred()
        self._lost_waiters: list[Deferred[None]] = []
        self.is_lost = False
        self.connected_ = False
        self.tls_version = ""
        self.cipher = ""
        self._listener: DeviceListener | None = None
        self._early = b""
        self.bytes_received = 0

    @property
    def _tls(self) -> Any:
        """The TLS transport (``TLSMemoryBIOProtocol``): getHandle, abortConnection."""
        return self.transport

    # -- Twisted callbacks -------------------------------------------------
    def connectionMade(self) -> None:
        self.connected_ = True

    def handshakeCompleted(self) -> None:
        connection: SSL.Connection = self._tls.getHandle()
        try:
            check_peer(connection, self._creator.check.pinned_der)
        except PinMismatch as e:
            self._fail_ready(e)
            self._tls.abortConnection()
            return
        self.tls_version, self.cipher = negotiated(connection)
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._listener is not None:
            self._listener.device_data(self, data)
            return
        self._early += data
        if len(self._early) > self.MAX_EARLY_BYTES:
            log.warn("device sent {n} bytes before PROCYCMD; closing", n=len(self._early))
            self._early = b""
            self._tls.abortConnection()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:  # type: ignore[override]
        self.connected_ = False
        if self.ready is not None:
            self._fail_ready(self._handshake_error(reason))
        elif self._listener is not None:
            self._listener.device_lost(self, reason)
        self.is_lost = True
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- for the session ---------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.connected_ and self.ready is None

    def when_lost(self) -> Deferred[None]:
        """A Deferred firing (with ``None``) once the connection is closed."""
        if self.is_lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def attach(self, listener: DeviceListener) -> None:
        """Route further device bytes to ``listener``; replays bytes kept so far."""
        self._listener = listener
        early, self._early = self._early, b""
        if early:
            listener.device_data(self, early)

    def send_command(self, command: bytes) -> None:
        """Re-check the pin, then write ``command`` (it holds the password).

        Raises :class:`PinMismatch` (and aborts) if the peer's certificate is not the pin.
        """
        connection: SSL.Connection = self._tls.getHandle()
        try:
            check_peer(connection, self._creator.check.pinned_der)
        except PinMismatch:
            self._tls.abortConnection()
            raise
        self.transport.write(command)  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.connected_:
            self._tls.abortConnection()

    def close(self) -> None:
        if self.connected_:
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- internals ---------------------------------------------------------
    def _fail_ready(self, error: SecShadowError) -> None:
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.errback(error)

    def _handshake_error(self, reason: Failure) -> SecShadowError:
        check = self._creator.check
        if check.matched is False:
            return pin_mismatch_error(check)
        if reason.check(SSL.Error):
            return describe_handshake_failure(reason, self._creator.profile)
        if reason.check(CancelledError, ierror.ConnectionAborted):
            return TLSHandshakeError("the TLS handshake with the device timed out or was cancelled")
        hint = (
            " The device may run old firmware: try --tls-profile legacy for this device."
            if self._creator.profile is TLSProfile.MODERN
            else ""
        )
        return TLSHandshakeError(
            "the device closed the connection during the TLS handshake "
            f"({reason.getErrorMessage()}).{hint}"
        )


EndpointFactory = Callable[[str, int, float], IStreamClientEndpoint]


def connect_pinned(
    reactor: IReactorTime,
    host: str,
    port: int,
    pinned_der: bytes,
    profile: TLSProfile = TLSProfile.MODERN,
    timeout: float = 15.0,
    endpoint_factory: EndpointFactory | None = None,
) -> Deferred[DeviceLink]:
    """Connect to ``host:port``, handshake, pin. ``timeout`` (seconds) covers TCP and TLS.

    Returns a Deferred firing with a ready :class:`DeviceLink`; it fails with
    :class:`DeviceUnreachable`, :class:`TLSHandshakeError` or :class:`PinMismatch`.
    Cancelling it aborts the attempt.
    """
    creator = PinnedConnectionCreator(pinned_der, profile)
    tcp: IStreamClientEndpoint
    if endpoint_factory is None:
        tcp = HostnameEndpoint(reactor, host, port, timeout=timeout)
    else:
        tcp = endpoint_factory(host, port, timeout)
    endpoint = wrapClientTLS(creator, tcp)
    links: list[DeviceLink] = []

    def build() -> DeviceLink:
        link = DeviceLink(creator)
        links.append(link)
        return link

    stage = {"name": "tcp"}
    connecting = endpoint.connect(Factory.forProtocol(build))  # type: ignore[arg-type]

    def cancel(result: Deferred[DeviceLink]) -> None:
        if stage["name"] == "tcp":
            connecting.cancel()
        for link in links:
            link.abort()

    result: Deferred[DeviceLink] = Deferred(cancel)

    def on_tcp(link: DeviceLink) -> Deferred[DeviceLink]:
        stage["name"] = "tls"
        assert link.ready is not None
        return link.ready

    def on_tcp_error(failure: Failure) -> Failure:
        if failure.check(SecShadowError):
            return failure
        where = f"{host}:{port}"
        if failure.check(CancelledError):
            if stage["name"] == "tls":
                return Failure(TLSHandshakeError(f"the TLS handshake with {where} did not finish within {timeout:g} s"))
            return Failure(DeviceUnreachable(f"could not connect to the device at {where} within {timeout:g} s"))
        if failure.check(ierror.ConnectingCancelledError):
            return Failure(DeviceUnreachable(f"could not connect to the device at {where} within {timeout:g} s"))
        if failure.check(ierror.DNSLookupError):
            return Failure(DeviceUnreachable(f"cannot resolve the device host {host!r}"))
        if failure.check(ierror.TimeoutError):
            return Failure(DeviceUnreachable(f"connecting to the device at {where} timed out after {timeout:g} s"))
        if failure.check(ierror.ConnectError):
            return Failure(DeviceUnreachable(f"cannot connect to the device at {where}: {failure.getErrorMessage()}"))
        return failure

    connecting.addCallback(on_tcp).addErrback(on_tcp_error).chainDeferred(result)  # type: ignore[call-overload]
    # One deadline for TCP and TLS together (--connect-timeout).
    result.addTimeout(timeout, reactor)  # type: ignore[arg-type]

    def on_timeout(failure: Failure) -> Failure:
        if failure.check(ierror.TimeoutError, CancelledError) and not failure.check(SecShadowError):
            if stage["name"] == "tls":
                return Failure(TLSHandshakeError(
                    f"the TLS handshake with {host}:{port} did not finish within {timeout:g} s"))
            return Failure(DeviceUnreachable(f"could not connect to the device at {host}:{port} within {timeout:g} s"))
        return failure

    result.addErrback(on_timeout)
    return result
