"""The pinned TLS connection to the device (``docs/protocol.md`` section 2, steps 1-3).

:func:`connect_pinned` opens a stream through any ``IStreamClientEndpoint`` (TCP to the
device, or a gateway's WebSocket stream: *transports are endpoints*), runs the TLS
handshake with :class:`~secshadow.pinning.PinnedConnectionCreator`, re-checks the pin
after the handshake and fires with a :class:`DeviceLink`, or fails with exactly one of
:class:`DeviceUnreachable` (exit 4), :class:`TLSHandshakeError` (exit 5),
:class:`PinMismatch` (exit 6) or whatever the stream endpoint raised (a gateway's
:class:`~secshadow.errors.GatewayError`, exit 9). Nothing is written to the device here:
the password goes out later, through :meth:`DeviceLink.send_command`.

:class:`DeviceDialer` is what a session holds: given the secret (the pin, the device's
address) and the options, it yields a pinned link. :class:`PinnedDialer` dials over TCP
or over any endpoint factory.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet import defer, error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.errors import DeviceUnreachable, PinMismatch, SecShadowError, TLSHandshakeError
from secshadow.observe import OneShot
from secshadow.pinning import TLSProfile, check_peer, describe_handshake_failure, negotiated
from secshadow.pinning import PinnedConnectionCreator
from secshadow.reactor import quiet_factory
from secshadow.sockettls import SocketHandover, has_real_sockets

if TYPE_CHECKING:
    from secshadow.secret import ShadowSecret

log = Logger()
_CONNECTION_DONE = Failure(ierror.ConnectionDone())


class DeviceListener(TypingProtocol):
    """What a :class:`DeviceLink` reports to once a bridge owns it."""

    def device_data(self, link: DeviceLink, data: bytes) -> None: ...

    def device_lost(self, link: DeviceLink, reason: Failure) -> None: ...


@implementer(IHandshakeListener)
class DeviceLink(Protocol):
    """The application side of the TLS connection to the device.

    ``pinned_der``: the DER certificate this link must be talking to.
    ``ready``: a Deferred firing with this link once the handshake completed and the
    pin was re-checked, or failing with the mapped error. :meth:`when_lost`: a
    Deferred that fires when the connection is gone, whatever the reason.
    ``tls_version`` / ``cipher``: what was negotiated (set when ready).
    Bytes that arrive before a listener is attached (before ``PROCYCMD``, when a device
    has nothing to say) are discarded (``docs/protocol.md`` section 2, step 7) and said
    once per link, with their count, when that phase ends: at :meth:`attach`, when the
    connection is lost, or when more than :attr:`MAX_EARLY_BYTES` came (a flooding device
    is then dropped). A flood never becomes a flood of log lines.
    """

    MAX_EARLY_BYTES = 4096

    def __init__(self, pinned_der: bytes, profile: TLSProfile = TLSProfile.MODERN) -> None:
        self.pinned_der = pinned_der
        self.profile = profile
        self.ready: Deferred[DeviceLink] | None = Deferred()
        self._lost: OneShot[None] = OneShot()
        self.connected_ = False
        self.tls_version = ""
        self.cipher = ""
        self._listener: DeviceListener | None = None
        #: Bytes received before a listener was attached (discarded), and whether that
        #: has been said.
        self.early_bytes = 0
        self._early_said = False
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
            check_peer(connection, self.pinned_der)
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
        self.early_bytes += len(data)
        if self.early_bytes > self.MAX_EARLY_BYTES and not self._early_said:
            self._say_early("closing the connection")
            self._tls.abortConnection()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.connected_ = False
        if self._listener is None:
            self._say_early("discarded them")
        if self.ready is not None:
            self._fail_ready(self._handshake_error(reason))
        elif self._listener is not None:
            self._listener.device_lost(self, reason)
        self._lost.fire(None)

    # -- for the session ---------------------------------------------------
    @property
    def is_lost(self) -> bool:
        return self._lost.done

    @property
    def alive(self) -> bool:
        return self.connected_ and self.ready is None

    def when_lost(self) -> Deferred[None]:
        """A Deferred firing (with ``None``) once the connection is closed."""
        return self._lost.when_done()

    def attach(self, listener: DeviceListener | None) -> None:
        """Route further device bytes to ``listener`` (bytes that came before were
        discarded: they are no answer to a command not yet sent)."""
        self._say_early("discarded them")
        self._listener = listener

    def send_command(self, command: bytes) -> None:
        """Re-check the pin, then write ``command`` (it holds the password).

        Raises :class:`PinMismatch` (and aborts) if the peer's certificate is not the pin.
        """
        connection: SSL.Connection = self._tls.getHandle()
        try:
            check_peer(connection, self.pinned_der)
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
    def _say_early(self, outcome: str) -> None:
        """One warning per link for everything it sent before PROCYCMD."""
        if self.early_bytes and not self._early_said:
            self._early_said = True
            log.warn("the device sent {n} bytes before PROCYCMD, when it has nothing to say; {outcome}",
                     n=self.early_bytes, outcome=outcome)

    def _fail_ready(self, error: SecShadowError) -> None:
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.errback(error)

    def _handshake_error(self, reason: Failure) -> SecShadowError:
        if isinstance(reason.value, SecShadowError):
            return reason.value  # the pin refused the handshake (failVerification)
        if reason.check(SSL.Error):
            return describe_handshake_failure(reason, self.profile)
        if reason.check(CancelledError, ierror.ConnectionAborted):
            return TLSHandshakeError("the TLS handshake with the device timed out or was cancelled")
        hint = (
            " The device may run old firmware: try --tls-profile legacy for this device."
            if self.profile is TLSProfile.MODERN
            else ""
        )
        return TLSHandshakeError(
            "the device closed the connection during the TLS handshake "
            f"({reason.getErrorMessage()}).{hint}"
        )


#: Makes the stream endpoint for (host, port, timeout in seconds): TCP by default.
EndpointFactory = Callable[[str, int, float], IStreamClientEndpoint]


def tcp_endpoint(reactor: Any) -> EndpointFactory:
    """TCP to the device: a plain TCP endpoint for IP literals (no resolver round
    trip), ``HostnameEndpoint`` for names."""

    def make(host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(reactor, host, port, timeout=timeout)
        if address.version == 6:
            return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)

    return make


def _deadline_error(stage: str, host: str, port: int, timeout: float) -> SecShadowError:
    """The one mapping of "the --connect-timeout ran out" to the contract's errors."""
    if stage == "tls":
        return TLSHandshakeError(f"the TLS handshake with {host}:{port} did not finish within {timeout:g} s")
    return DeviceUnreachable(f"could not connect to the device at {host}:{port} within {timeout:g} s")


def _connect_error(failure: Failure, host: str, port: int, timeout: float) -> Failure:
    """Map a failed stream connect to the contract's errors (a SecShadowError passes)."""
    where = f"{host}:{port}"
    if failure.check(SecShadowError, CancelledError):
        return failure
    if failure.check(ierror.TimeoutError):  # the endpoint's own timer (the same --connect-timeout)
        return Failure(_deadline_error("tcp", host, port, timeout))
    if failure.check(ierror.DNSLookupError):
        return Failure(DeviceUnreachable(f"cannot resolve the device host {host!r}"))
    if failure.check(ierror.ConnectError):
        return Failure(DeviceUnreachable(f"cannot connect to the device at {where}: {failure.getErrorMessage()}"))
    return failure


def connect_pinned(
    reactor: IReactorTime,
    host: str,
    port: int,
    pinned_der: bytes,
    profile: TLSProfile = TLSProfile.MODERN,
    timeout: float = 15.0,
    endpoint_factory: EndpointFactory | None = None,
) -> Deferred[DeviceLink]:
    """Connect to ``host:port``, handshake, pin. ``timeout`` (seconds) covers the stream
    connect and TLS together.

    Returns a Deferred firing with a ready :class:`DeviceLink`; it fails with
    :class:`DeviceUnreachable`, :class:`TLSHandshakeError`, :class:`PinMismatch` or the
    stream endpoint's own :class:`SecShadowError`. Cancelling it aborts the attempt at
    any stage and fails it with ``CancelledError``.
    """
    creator = PinnedConnectionCreator(pinned_der, profile)
    stream = (endpoint_factory or tcp_endpoint(reactor))(host, port, timeout)
    links: list[DeviceLink] = []
    stage = ["tcp"]

    def build() -> DeviceLink:
        link = DeviceLink(pinned_der, profile)
        links.append(link)
        return link

    connecting: Deferred[Any]
    if endpoint_factory is None and has_real_sockets(reactor):
        # TCP to the device: TLS on the socket itself (secshadow.sockettls), same pin.
        connecting = stream.connect(quiet_factory(lambda: SocketHandover(reactor, build, creator.connection_for)))
    else:
        connecting = wrapClientTLS(creator, stream).connect(quiet_factory(build))

    def cancel(_: Deferred[DeviceLink]) -> None:
        connecting.cancel()
        for link in links:
            link.abort()

    result: Deferred[DeviceLink] = Deferred(cancel)

    def on_stream(link: DeviceLink | SocketHandover) -> Deferred[DeviceLink]:
        stage[0] = "tls"
        assert link.ready is not None
        return link.ready

    connecting.addCallback(on_stream).addErrback(_connect_error, host, port, timeout).chainDeferred(result)  # type: ignore[call-overload]
    # One deadline for the stream and TLS together (--connect-timeout); addTimeout
    # turns the cancellation it causes into defer.TimeoutError.
    result.addTimeout(timeout, reactor)

    def on_deadline(failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError):
            return Failure(_deadline_error(stage[0], host, port, timeout))
        return failure

    return result.addErrback(on_deadline)


class DeviceDialer(TypingProtocol):
    """Opens a pinned link to the device a secret names (reconnects call it again).

    ``secret``: the :class:`~secshadow.secret.ShadowSecret` (its certificate is the pin;
    it may name a gateway route). ``host``/``port``, ``profile`` and ``timeout``
    (seconds) come from the session; returns a Deferred as :func:`connect_pinned` does.
    ``transport``: ``"tcp"`` or ``"gateway"``, what the last dial used (the audit record's).
    """

    transport: str

    def __call__(self, secret: ShadowSecret, host: str, port: int, profile: TLSProfile,
                 timeout: float) -> Deferred[DeviceLink]: ...


class PinnedDialer:
    """A :class:`DeviceDialer` over ``endpoint_factory`` (TCP unless given another)."""

    def __init__(self, reactor: Any, endpoint_factory: EndpointFactory | None = None, transport: str = "tcp") -> None:
        self._reactor = reactor
        self._endpoint_factory = endpoint_factory
        self.transport = transport

    def __call__(self, secret: ShadowSecret, host: str, port: int, profile: TLSProfile,
                 timeout: float) -> Deferred[DeviceLink]:
        return connect_pinned(self._reactor, host, port, secret.certificate_der, profile, timeout,
                              self._endpoint_factory)
