"""The device side of secure shadowing: a TLS server in front of a VNC server.

What a thin client does on port 5900 (PROTOCOL.md section 2, from the device's side):

1. accept TCP, complete TLS with the device certificate (server side; the console pins it);
2. read ``PROCYCMD PW_<password>`` (optionally ``\\n`` / ``\\r\\n``) with
   :class:`secshadow.procy.CommandParser`, within the firmware's command timeout;
3. have the password checked (by the IMI server in the real product: an injectable
   ``password_checker``);
4. refused: close without a single application byte; accepted: after the optional
   consent delay, connect TCP to the VNC server and relay both ways with
   :class:`secshadow.relay.Splice`, so the console's next bytes are the VNC server's
   RFB ProtocolVersion (RFC 6143 section 7.1.1).

Every step is reported as an :class:`secshadow.events.Event` to ``on_event`` (the
CLI prints them as JSON lines; tests read them). No event, log line or repr carries
the password.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from OpenSSL import SSL
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.lab.certs import certificate_sha256
from secshadow.lab.device.firmware import FirmwareProfile, ServerTLSCreator, build_server_context
from secshadow.errors import UsageError
from secshadow.events import Event, EventSink, discard
from secshadow.procy import BadCommand, CommandParser
from secshadow.relay import Splice
from secshadow.secret import OneTimePassword

log = Logger(namespace="secshadow.lab.device")

#: ``password_checker(password) -> Deferred[bool]``; True lets the console in.
PasswordChecker = Callable[[str], "Deferred[bool]"]

#: Bytes the device keeps from the console while the password is being checked;
#: a console has nothing to say before the VNC server's hello, so this is generous.
MAX_PENDING = 64 * 1024


# -- events (JSON lines of ``secshadow-device``) ----------------------------------


@dataclass(frozen=True)
class DeviceListening(Event):
    """The TLS listener is open; ``certificate_sha256`` is the certificate the console must pin."""

    name: ClassVar[str] = "listening"
    host: str
    port: int
    certificate_sha256: str


@dataclass(frozen=True)
class ConnectionAccepted(Event):
    """A TCP connection was accepted; ``peer`` is ``"host:port"``."""

    name: ClassVar[str] = "connection"
    peer: str


@dataclass(frozen=True)
class TLSEstablished(Event):
    """The TLS handshake completed; ``version`` e.g. ``"TLSv1.3"``, ``cipher`` OpenSSL's name."""

    name: ClassVar[str] = "tls"
    version: str
    cipher: str


@dataclass(frozen=True)
class CommandChecked(Event):
    """A ``PROCYCMD`` arrived and was decided. ``reason``: ``"ok"``, ``"wrong password"``,
    ``"check failed"`` (the checker raised) or ``"malformed"`` (not a PROCYCMD command)."""

    name: ClassVar[str] = "procycmd"
    accepted: bool
    reason: str


@dataclass(frozen=True)
class ConsentDecided(Event):
    """The emulated local user answered the "allow shadowing?" prompt."""

    name: ClassVar[str] = "consent"
    allowed: bool


@dataclass(frozen=True)
class VNCConnected(Event):
    """The device connected to its VNC server and started relaying; ``vnc`` is ``"host:port"``."""

    name: ClassVar[str] = "vnc-connected"
    vnc: str


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """A connection ended. ``count``: application bytes received from the console over
    TLS (the command included); ``reason`` says why it ended."""

    name: ClassVar[str] = "app-bytes"
    count: int
    reason: str


# -- password checkers -----------------------------------------------------------


class OneShotPasswordChecker:
    """Accepts fixed passwords, each once (like IMI's one-time passwords, PROTOCOL.md section 1).

    ``OneShotPasswordChecker(password, *more)``: every password given is valid for one use.
    ``__call__(candidate) -> Deferred[bool]``; a second use of a password is refused.
    ``used``: whether every password has been used.
    """

    def __init__(self, password: OneTimePassword, *more: OneTimePassword) -> None:
        self._passwords = [password, *more]
        self._used = [False] * len(self._passwords)

    @property
    def used(self) -> bool:
        return all(self._used)

    def __call__(self, candidate: str) -> Deferred[bool]:
        given = candidate.encode("ascii", "replace")
        for index, password in enumerate(self._passwords):
            # Compare with every password (no early exit), in constant time each.
            if hmac.compare_digest(given, password.reveal().encode("ascii")):
                if self._used[index]:
                    return succeed(False)
                self._used[index] = True
                return succeed(True)
        return succeed(False)

    def __repr__(self) -> str:
        return f"OneShotPasswordChecker(passwords={len(self._passwords)}, used={sum(self._used)})"


# -- the connection --------------------------------------------------------------


class _State(enum.Enum):
    AWAITING_COMMAND = "awaiting-command"
    CHECKING = "checking"
    CONSENT = "consent"
    CONNECTING_VNC = "connecting-vnc"
    RELAYING = "relaying"
    CLOSED = "closed"


class _VNCSide(Protocol):
    """The device's TCP connection to its VNC server; bytes go to the splice."""

    def __init__(self, device: DeviceConnection) -> None:
        self.device = device

    def connectionMade(self) -> None:
        self.device.vnc_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.device.splice is not None:
            self.device.splice.deliver("right", data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.device.splice is not None:
            self.device.splice.lost("right")


@implementer(IHandshakeListener)
class DeviceConnection(Protocol):
    """One console connection, inside TLS (the transport is a ``TLSMemoryBIOProtocol``).

    States: awaiting-command -> checking -> [consent] -> connecting-vnc -> relaying -> closed.
    """

    factory: DeviceFactory

    def __init__(self, factory: DeviceFactory) -> None:
        self.factory = factory
        profile = factory.profile
        self.state = _State.AWAITING_COMMAND
        self.parser = CommandParser(
            password_length=profile.password_length, require_terminator=profile.require_terminator
        )
        self.app_bytes = 0
        self.splice: Splice | None = None
        self._pending = b""
        self._seen_rfb = False
        self._handshake_done = False
        self._close_reason = "console closed"
        self._timer: IDelayedCall | None = None
        self._waiting: Deferred[Any] | None = None

    # Twisted callbacks

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        text = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        log.info("connection from {peer}", peer=text)
        if self.factory.plaintext:
            # Behind a TLS front (stunnel): the front did the handshake.
            self._handshake_done = True
        self.factory.connections.add(self)
        self.factory.emit(ConnectionAccepted(peer=text))
        self._timer = self.factory.reactor.callLater(
            self.factory.profile.command_timeout, self._command_timed_out
        )

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        handle: SSL.Connection = self.transport.getHandle()  # type: ignore[union-attr]
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name() or "?"
        log.info("TLS established: {version} {cipher}", version=version, cipher=cipher)
        self.factory.emit(TLSEstablished(version=version, cipher=cipher))

    def dataReceived(self, data: bytes) -> None:
        self.app_bytes += len(data)
        if self.state is _State.AWAITING_COMMAND:
            result = self.parser.feed(data)
            if result is None:
                return
            self._cancel_timer()
            if isinstance(result, BadCommand):
                log.info("malformed command: {reason}", reason=result.reason)
                self.factory.emit(CommandChecked(accepted=False, reason="malformed"))
                self._close("malformed command")
                return
            self._pending = result.rest
            self.state = _State.CHECKING
            self._check(result.password)
        elif self.state is _State.RELAYING:
            assert self.splice is not None
            data = self._strip_terminator(data)
            if data:
                self.splice.deliver("left", data)
        elif self.state is not _State.CLOSED:
            # Checking, consent or connecting: keep what the console sends (at most a
            # late LF/CRLF, normally) for the VNC server.
            self._pending += data
            if len(self._pending) > MAX_PENDING:
                self._close("console sent too much before the VNC greeting")

    def connectionLost(self, reason: Failure | None = None) -> None:
        previous, self.state = self.state, _State.CLOSED
        self._cancel_timer()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self.splice is not None:
            self.splice.lost("left")
            self._close_reason = "relay ended"
        elif not self._handshake_done:
            self._close_reason = "TLS handshake failed or was not completed"
        self.factory.connections.discard(self)
        log.info(
            "connection closed ({reason}) in state {state}, {count} application bytes received",
            reason=self._close_reason,
            state=previous.value,
            count=self.app_bytes,
        )
        self.factory.emit(ConnectionClosed(count=self.app_bytes, reason=self._close_reason))

    # steps

    def _check(self, password: str) -> None:
        waiting = maybeDeferred(self.factory.password_checker, password)
        del password  # the checker has it; nothing here keeps or logs it
        self._waiting = waiting
        waiting.addCallbacks(self._checked, self._check_failed)
        waiting.addErrback(lambda failure: log.failure("password check handling", failure))

    def _check_failed(self, failure: Failure) -> None:
        self._waiting = None
        if self.state is not _State.CHECKING:
            return
        # The checker's error (e.g. the UMS is unreachable) refuses the console, like a bad password.
        log.warn("password check failed: {error}", error=failure.getErrorMessage())
        self.factory.emit(CommandChecked(accepted=False, reason="check failed"))
        self._close("password check failed")

    def _checked(self, accepted: bool) -> None:
        self._waiting = None
        if self.state is not _State.CHECKING:
            return
        self.factory.emit(CommandChecked(accepted=bool(accepted), reason="ok" if accepted else "wrong password"))
        if not accepted:
            log.info("password refused: closing without a word")
            self._close("password refused")
            return
        profile = self.factory.profile
        clock = self.factory.reactor
        if profile.refuse_after is not None:
            self.state = _State.CONSENT
            self._timer = clock.callLater(profile.refuse_after, self._user_refused)
        elif profile.consent_delay > 0:
            self.state = _State.CONSENT
            self._timer = clock.callLater(profile.consent_delay, self._user_allowed)
        else:
            self._connect_vnc()

    def _user_refused(self) -> None:
        self._timer = None
        self.factory.emit(ConsentDecided(allowed=False))
        self._close("local user refused")

    def _user_allowed(self) -> None:
        self._timer = None
        self.factory.emit(ConsentDecided(allowed=True))
        self._connect_vnc()

    def _connect_vnc(self) -> None:
        self.state = _State.CONNECTING_VNC
        waiting = connectProtocol(self.factory.vnc_endpoint, _VNCSide(self))
        self._waiting = waiting
        waiting.addErrback(self._vnc_failed)

    def _vnc_failed(self, failure: Failure) -> None:
        self._waiting = None
        if self.state is not _State.CONNECTING_VNC:
            return
        log.error(
            "cannot connect to the VNC server at {vnc}: {error}",
            vnc=self.factory.vnc_description,
            error=failure.getErrorMessage(),
        )
        self._close("VNC server unreachable")

    def vnc_connected(self, vnc: _VNCSide) -> None:
        """Called by the VNC side's ``connectionMade``: start relaying."""
        self._waiting = None
        if self.state is not _State.CONNECTING_VNC:
            vnc.transport.loseConnection()  # type: ignore[union-attr]
            return
        assert self.transport is not None and vnc.transport is not None
        self.splice = Splice(self.transport, vnc.transport, self.factory.reactor)
        self.state = _State.RELAYING
        self.factory.emit(VNCConnected(vnc=self.factory.vnc_description))
        self.splice.start()
        pending, self._pending = self._strip_terminator(self._pending), b""
        if pending:
            self.splice.deliver("left", pending)

    # helpers

    def _strip_terminator(self, data: bytes) -> bytes:
        # With no terminator required, the parser returns after 36 password characters,
        # and the LF/CRLF a console may send arrives later: drop CR/LF until the first
        # RFB byte (an RFB client's first byte is 'R', RFC 6143 section 7.1.1).
        if self._seen_rfb:
            return data
        data = data.lstrip(b"\r\n")
        if data:
            self._seen_rfb = True
        return data

    def _command_timed_out(self) -> None:
        self._timer = None
        log.info("no complete PROCYCMD within {s} s", s=self.factory.profile.command_timeout)
        self._close("command timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self, reason: str) -> None:
        self._close_reason = reason
        self._cancel_timer()
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self, reason: str = "device stopping") -> None:
        """Close now without waiting for buffers (used by :meth:`DeviceEmulator.stop`)."""
        self._close_reason = reason
        self._cancel_timer()
        if self.splice is not None:
            self.splice.close()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class DeviceFactory(ServerFactory):
    """Makes a :class:`DeviceConnection` per console; shared configuration lives here."""

    noisy = False

    def __init__(
        self,
        reactor: Any,
        profile: FirmwareProfile,
        password_checker: PasswordChecker,
        vnc_endpoint: IStreamClientEndpoint,
        vnc_description: str,
        on_event: EventSink,
    ) -> None:
        self.reactor = reactor
        self.profile = profile
        self.password_checker = password_checker
        self.vnc_endpoint = vnc_endpoint
        self.vnc_description = vnc_description
        self.emit = on_event
        self.connections: set[DeviceConnection] = set()
        self.plaintext = False

    def buildProtocol(self, addr: Any) -> DeviceConnection:  # type: ignore[override]
        return DeviceConnection(self)


class DeviceEmulator:
    """A device: TLS listener, firmware behaviour, password check, relay to a VNC server.

    - ``reactor``: provides ``IReactorTCP`` and ``IReactorTime``.
    - ``profile``: a :class:`FirmwareProfile` (see :mod:`secshadow.lab.device.firmware`).
    - ``cert_pem`` / ``key_pem``: the device certificate and its key (PEM bytes).
    - ``password_checker``: ``password -> Deferred[bool]``; an error counts as a refusal.
    - ``vnc_host`` / ``vnc_port``: the VNC server to relay to, or ``vnc_endpoint``.
    - ``on_event``: receives the events defined in this module.
    - ``plaintext``: no TLS at all; the emulator is then only the PROCYCMD check and
      relay behind a separate TLS front (``stunnel4`` playing an old device's TLS
      stack, see ``docs/firmware.md``). Only a loopback listener is allowed. The
      certificate (the front's) is optional and only reported.

    Raises :class:`secshadow.errors.UsageError` when the certificate and key do not fit,
    or the profile cannot be served by this OpenSSL (TLS mode only).
    """

    def __init__(
        self,
        reactor: Any,
        profile: FirmwareProfile,
        cert_pem: bytes | None,
        key_pem: bytes | None,
        password_checker: PasswordChecker,
        vnc_host: str = "127.0.0.1",
        vnc_port: int = 5901,
        vnc_endpoint: IStreamClientEndpoint | None = None,
        on_event: EventSink = discard,
        plaintext: bool = False,
    ) -> None:
        assert IReactorTCP.providedBy(reactor) and IReactorTime.providedBy(reactor)
        self.reactor = reactor
        self.profile = profile
        self.plaintext = plaintext
        self.certificate_sha256 = certificate_sha256(cert_pem) if cert_pem else ""
        self._creator: ServerTLSCreator | None = None
        if not plaintext:
            if cert_pem is None or key_pem is None:
                raise UsageError("the device emulator needs a certificate and key (or plaintext mode)")
            self._creator = ServerTLSCreator(build_server_context(profile, cert_pem, key_pem))
        if vnc_endpoint is None:
            vnc_endpoint = HostnameEndpoint(reactor, vnc_host, vnc_port, timeout=10)
        self.factory = DeviceFactory(
            reactor, profile, password_checker, vnc_endpoint, f"{vnc_host}:{vnc_port}", on_event
        )
        self.factory.plaintext = plaintext
        self._on_event = on_event
        self.port: IListeningPort | None = None

    def tls_factory(self) -> TLSMemoryBIOFactory:
        """The server factory (TLS around :class:`DeviceFactory`), for callers that listen themselves."""
        if self._creator is None:
            raise UsageError("a plaintext emulator has no TLS factory")
        return TLSMemoryBIOFactory(self._creator, False, self.factory)

    async def _listen(self, description: str) -> IListeningPort:
        endpoint = serverFromString(self.reactor, description)
        factory: Any = self.factory if self.plaintext else self.tls_factory()
        port: IListeningPort = await endpoint.listen(factory)
        self.port = port
        address = port.getHost()
        host, number = getattr(address, "host", "?"), getattr(address, "port", 0)
        if self.plaintext and host not in ("127.0.0.1", "::1"):
            self.port = None
            await maybeDeferred(port.stopListening)
            raise UsageError(
                f"a plaintext emulator listens on loopback only (got {host}); add interface=127.0.0.1"
            )
        log.info("listening on {host}:{port}", host=host, port=number)
        self._on_event(DeviceListening(host=host, port=number, certificate_sha256=self.certificate_sha256))
        return port

    def listen(self, description: str = "tcp:5900:interface=127.0.0.1") -> Deferred[IListeningPort]:
        """Listen on a Twisted server endpoint string (port 0 picks a free port).

        Returns a Deferred firing with the ``IListeningPort`` after the ``listening``
        event was emitted; fails with the endpoint's error (e.g. ``CannotListenError``).
        """
        return Deferred.fromCoroutine(self._listen(description))

    def stop(self) -> Deferred[None]:
        """Stop listening and abort every open connection; fires when the port is closed."""
        for connection in list(self.factory.connections):
            connection.abort()
        if self.port is None:
            return succeed(None)
        port, self.port = self.port, None
        stopped: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopped


__all__ = [
    "ConnectionAccepted",
    "ConnectionClosed",
    "CommandChecked",
    "ConsentDecided",
    "DeviceConnection",
    "DeviceEmulator",
    "DeviceFactory",
    "DeviceListening",
    "OneShotPasswordChecker",
    "PasswordChecker",
    "TLSEstablished",
    "VNCConnected",
]
