"""``secshadow-gateway``: the relay of PROTOCOL.md section 6, on autobahn over Twisted.

One :class:`GatewayLeg` per WebSocket connection. At the upgrade (``onConnect``), in
this order: the path must be a leg path (else 404), the ``Authorization: Bearer`` token
must verify against a configured public key and be current (else 401), its ``sid`` and
``role`` must be the path's (else 403), its ``jti`` must be new and the role free (else
409), and the gateway must have room (else 503). A refusal is an HTTP response with that
status and no WebSocket frame ever follows it; only an accepted token's ``jti`` is
remembered (:class:`~secshadow.gateway.tokens.ReplayCache`).

Then :class:`~secshadow.gateway.pairing.Registry` decides: pairing, 4408, limits and
ending. After ``paired`` every binary message is written unchanged to the other leg; the
gateway never looks inside (it counts bytes, nothing else).

Backpressure: when a leg is joined to its peer, the leg's *reader* (the push producer of
its socket: TCP, under TLS when there is TLS) is registered as the producer of the
peer's transport. When the peer reads slowly and its write buffer fills, Twisted pauses
the reader, so the gateway stops reading from this leg, and TCP flow control pushes back
to its sender. Memory per session is therefore bounded by the transports' buffers (about
64 KiB each way before the pause) plus one read chunk and one message (64 KiB) in
autobahn's parser, whatever the rates.

Keepalive: one :class:`~twisted.internet.task.LoopingCall` for the whole process pings
every open leg every ``ping_interval`` seconds and drops a leg from which nothing at all
(data, pong, anything) arrived for ``idle_timeout`` seconds. A leg whose reading is
paused by backpressure is not held responsible for its silence.

Messages larger than 64 KiB close the leg with 1009 (autobahn's limit, ``failByDrop``
off so the close code is sent). Permessage-deflate is never accepted (ciphertext does not
compress). Logs carry the session id, roles, byte counts, durations and close codes,
never a token: the ``Authorization`` header is read here and nowhere logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from OpenSSL import SSL
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator, IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.errors import UsageError
from secshadow.gateway import wire
from secshadow.gateway.pairing import EventSink, GatewayListening, LegRefused, Registry, Session
from secshadow.gateway.pairing import Leg as PairingLeg
from secshadow.gateway.tokens import ReplayCache, TokenVerifier
from secshadow.gateway.wire import Refusal
from secshadow.relay import push_producer_of

log = Logger(namespace="secshadow.gateway")

#: Largest upgrade request (request line and headers) accepted, bytes; a token is at most 4 KiB.
MAX_REQUEST_HEAD = 16 * 1024
#: Seconds a connection has for TLS and the WebSocket upgrade together.
OPEN_HANDSHAKE_TIMEOUT = 10.0
#: Seconds the gateway waits for a leg to answer its close frame before dropping it.
CLOSE_HANDSHAKE_TIMEOUT = 2.0


@dataclass(frozen=True)
class GatewayOptions:
    """Limits and timers, seconds unless said. ``max_sessions``: sessions at once
    (waiting or paired); ``max_connections``: WebSocket connections at once, handshakes
    included (default: two per session plus some room); ``max_duration`` /
    ``max_bytes``: per session, 0 for none."""

    pairing_timeout: float = wire.PAIRING_TIMEOUT
    ping_interval: float = wire.PING_INTERVAL
    idle_timeout: float = wire.IDLE_TIMEOUT
    max_sessions: int = 10_000
    max_connections: int = 0
    max_duration: float = 12 * 3600.0
    max_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("pairing_timeout", "ping_interval", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds")
        if self.max_sessions < 1:
            raise UsageError("--max-sessions must be at least 1")
        if self.max_duration < 0 or self.max_bytes < 0 or self.max_connections < 0:
            raise UsageError("limits must not be negative (0 means none)")

    @property
    def connection_limit(self) -> int:
        return self.max_connections or 2 * self.max_sessions + 64


@implementer(IPushProducer)
class _Reader:
    """The push producer that stops one leg's reading; registered on the peer's transport."""

    def __init__(self, leg: GatewayLeg) -> None:
        self._leg = leg
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused and self._leg.transport is not None:
            self.paused = True
            push_producer_of(self._leg.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused and self._leg.transport is not None:
            self.paused = False
            self._leg.last_rx = self._leg.gateway.clock.seconds()  # the pause was not its silence
            push_producer_of(self._leg.transport).resumeProducing()

    def stopProducing(self) -> None:
        # The peer's transport is gone; the registry closes this leg. Let it read again,
        # so its answer to the close frame arrives.
        self.resumeProducing()


class GatewayLeg(WebSocketServerProtocol):
    """One leg's WebSocket connection. ``role``/``session`` are set once the upgrade is
    accepted; ``partner`` (the other leg) once paired; ``last_rx``: when a byte last arrived (reactor time)."""

    gateway: Gateway

    def __init__(self) -> None:
        super().__init__()
        self.role = ""
        self.session: Session | None = None
        self.partner: GatewayLeg | None = None
        self.last_rx = 0.0
        self.reader = _Reader(self)
        self._gone = False

    # -- Twisted / autobahn callbacks -----------------------------------------

    def connectionMade(self) -> None:
        self.last_rx = self.gateway.clock.seconds()
        self.gateway.legs.add(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.last_rx = self.gateway.clock.seconds()
        if self.state == self.STATE_CONNECTING and len(self.data) + len(data) > MAX_REQUEST_HEAD:
            # autobahn would buffer an upgrade request of any size until its blank line.
            self.gateway.refused("", "", Refusal(431, "request header too large"), str(self.peer or "?"))
            self.failHandshake("request header too large", 431)
            return
        super().dataReceived(data)

    def onConnect(self, request: Any) -> None:
        path = str(request.path or "")
        match = wire.PATH_RE.match(path)
        sid, role = (match.group(1), match.group(2)) if match else ("", "")
        try:
            if match is None:
                raise Refusal(404, "not a session leg path")
            self.session = self.gateway.admit(sid, role, _bearer(request.headers), self)
        except Refusal as refusal:
            self.gateway.refused(sid, role, refusal, str(self.peer or "?"))
            raise ConnectionDeny(refusal.status, refusal.reason) from None
        self.role = role
        log.info("session {sid}: {role} accepted from {peer}", sid=sid, role=role, peer=self.peer)
        return None

    def onOpen(self) -> None:
        if self.session is not None:
            self.gateway.registry.opened(self.session, self.role)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        partner = self.partner
        if partner is None:
            what = "a binary" if isBinary else "a text"
            self.gateway.registry.violation(session, self.role, wire.CLOSE_POLICY, f"{what} message before paired")
            return
        if not isBinary:
            self.gateway.registry.violation(session, self.role, wire.CLOSE_UNSUPPORTED_DATA,
                                            "text message after paired")
            return
        if partner.state == partner.STATE_OPEN:  # else it is closing: nothing more goes to it
            partner.sendMessage(payload, isBinary=True)
            self.gateway.registry.relayed(session, self.role, len(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._gone:
            return
        self._gone = True
        self._unjoin()
        if self.session is not None:
            self.gateway.registry.gone(self.session, self.role,
                                       code if (wasClean and code) else wire.CLOSE_ABNORMAL,
                                       reason or ("closed" if wasClean else "connection lost"))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.gateway.legs.discard(self)
        super().connectionLost(reason)
        # autobahn reports every loss through onClose; this guards against a path that does not.
        self.onClose(False, wire.CLOSE_ABNORMAL, "connection lost")

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        # A refusal is a complete HTTP response; a load balancer must not wait for a body.
        headers = [("Content-Length", "0"), ("Connection", "close"), ("Cache-Control", "no-store")]
        if code == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="secshadow-gateway"'))
        super().sendHttpErrorResponse(code, reason, list(responseHeaders or []) + headers)

    # -- the registry's Leg interface -------------------------------------------

    def send_paired(self) -> None:
        self.sendMessage(wire.PAIRED_MESSAGE, isBinary=False)

    def join(self, peer: PairingLeg) -> None:
        assert isinstance(peer, GatewayLeg) and peer.transport is not None
        self.partner = peer
        # What this leg sends is written to the peer: when the peer's buffer is full,
        # stop reading this leg.
        peer.transport.registerProducer(self.reader, True)  # type: ignore[attr-defined]

    def close(self, code: int, reason: str) -> None:
        self._unjoin()
        if self.state == self.STATE_OPEN:
            # sendCloseFrame, not sendClose: 1001/1003/1008 are valid codes for a server
            # to send, which autobahn's public sendClose refuses.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif self.state != self.STATE_CLOSING:
            self.abort()

    def abort(self) -> None:
        self._unjoin()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    @property
    def reading_paused(self) -> bool:
        return self.reader.paused

    def _unjoin(self) -> None:
        """Stop relaying to the peer and take this leg's reader off the peer's transport."""
        peer, self.partner = self.partner, None
        if peer is not None and peer.transport is not None:
            try:
                peer.transport.unregisterProducer()  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):
                pass
        self.reader.resumeProducing()


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class GatewayFactory(WebSocketServerFactory):
    """autobahn's server factory with the relay's options; builds :class:`GatewayLeg`."""

    protocol = GatewayLeg
    noisy = False

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(server="secshadow-gateway", reactor=gateway.clock)
        self.gateway = gateway
        self.setProtocolOptions(
            maxFramePayloadSize=wire.MAX_MESSAGE,
            maxMessagePayloadSize=wire.MAX_MESSAGE,
            autoFragmentSize=0,
            failByDrop=False,  # send the close code (1009, 1002, ...) instead of only dropping
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            autoPingInterval=0,  # the gateway's own sweep pings (one timer for all legs)
            tcpNoDelay=True,
            webStatus=False,
            perMessageCompressionAccept=lambda offers: None,
            maxConnections=gateway.options.connection_limit,
        )

    def buildProtocol(self, addr: Any) -> GatewayLeg:
        leg = GatewayLeg()
        leg.factory = self
        leg.gateway = self.gateway
        return leg


class Gateway:
    """A gateway: the registry, the token checks, the WebSocket factory and the keepalive.

    ``reactor``: ``IReactorTime`` + ``IReactorTCP`` (the clock is the reactor's, which is
    wall time, as token expiry needs). ``verifier``: checks tokens; ``on_event``:
    receives :class:`~secshadow.gateway.pairing.GatewayListening`, ``refused``,
    ``paired`` and ``closed`` events.
    """

    def __init__(self, reactor: Any, verifier: TokenVerifier, options: GatewayOptions | None = None,
                 on_event: EventSink | None = None, replay: ReplayCache | None = None) -> None:
        self.clock = reactor
        self._reactor = reactor
        self.options = options or GatewayOptions()
        self._emit: EventSink = on_event or (lambda event: None)
        self.verifier = verifier
        self.replay = replay or ReplayCache(reactor)
        self.registry = Registry(
            reactor, self._emit,
            pairing_timeout=self.options.pairing_timeout,
            max_sessions=self.options.max_sessions,
            max_duration=self.options.max_duration,
            max_bytes=self.options.max_bytes,
        )
        self.legs: set[GatewayLeg] = set()
        self.factory = GatewayFactory(self)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = reactor
        self.port: IListeningPort | None = None

    # -- admission ---------------------------------------------------------------

    def admit(self, sid: str, role: str, token: str | None, leg: GatewayLeg) -> Session:
        """All upgrade checks, in PROTOCOL.md's order; raises :class:`Refusal`."""
        claims = self.verifier.verify(token, sid, role)
        self.replay.check(claims.jti)
        self.registry.check(sid, role)
        self.replay.consume(claims)  # only a token that gets in is used up
        return self.registry.reserve(sid, role, leg)

    def refused(self, sid: str, role: str, refusal: Refusal, peer: str) -> None:
        log.info("refused {role} of session {sid} from {peer}: {status} {reason}", role=role or "-",
                 sid=sid or "-", peer=peer, status=refusal.status, reason=refusal.reason)
        self._emit(LegRefused(sid=sid, role=role, status=refusal.status, reason=refusal.reason, peer=peer))

    # -- keepalive ---------------------------------------------------------------

    def sweep(self) -> None:
        """Ping every open leg; drop those silent for ``idle_timeout`` seconds."""
        now = self.clock.seconds()
        idle = self.options.idle_timeout
        for leg in list(self.legs):
            if leg.state != leg.STATE_OPEN:
                continue
            if leg.reading_paused:
                leg.last_rx = now
            elif now - leg.last_rx >= idle:
                if leg.session is not None:
                    self.registry.silent(leg.session, leg.role, idle)
                else:
                    leg.abort()
            else:
                leg.sendPing()

    # -- running -----------------------------------------------------------------

    async def _listen(self, description: str, tls: IOpenSSLServerConnectionCreator | None) -> IListeningPort:
        try:
            endpoint = serverFromString(self._reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"bad --listen endpoint {description!r}: {e}") from None
        factory: Any = self.factory if tls is None else TLSMemoryBIOFactory(tls, False, self.factory)
        factory.noisy = False
        port: IListeningPort = await endpoint.listen(factory)
        self.port = port
        if not self._sweeper.running:
            self._sweeper.start(self.options.ping_interval, now=False)
        address = port.getHost()
        host, number = str(getattr(address, "host", "?")), int(getattr(address, "port", 0))
        log.info("listening on {host}:{port} ({mode})", host=host, port=number,
                 mode="TLS" if tls is not None else "PLAINTEXT, behind a TLS front")
        self._emit(GatewayListening(host=host, port=number, tls=tls is not None))
        return port

    def listen(self, description: str, tls: IOpenSSLServerConnectionCreator | None) -> Deferred[IListeningPort]:
        """Listen on a Twisted server endpoint string (``tcp:8443``, port 0 for a free
        one), with TLS from ``tls`` (see :func:`server_tls`) or, with ``None``, in
        plaintext for a TLS-terminating front. Fires with the port after the
        ``gateway-listening`` event; fails with :class:`UsageError` for a bad string or
        the endpoint's error (``CannotListenError``)."""
        return Deferred.fromCoroutine(self._listen(description, tls))

    def stop(self) -> Deferred[None]:
        """Close every leg with 1001, stop pinging and listening."""
        if self._sweeper.running:
            self._sweeper.stop()
        self.registry.stop()
        for leg in list(self.legs):
            if leg.session is None:
                leg.abort()
        port, self.port = self.port, None
        if port is None:
            done: Deferred[None] = Deferred()
            done.callback(None)
            return done
        stopped: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopped


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The gateway's TLS: TLS 1.2+, ``DEFAULT`` ciphers without anonymous suites, one
    context for all connections, buffers released when idle (thousands of mostly idle
    connections)."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def server_tls(cert_path: str, key_path: str) -> ServerTLS:
    """TLS from a PEM certificate chain file (leaf first) and its unencrypted key.

    Raises :class:`UsageError` when a file cannot be read or they do not fit together.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    # No session cache and no tickets: legs do not resume (each dials once per session),
    # and a cache would hold memory for every past handshake.
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(b"DEFAULT:!aNULL:!eNULL")
    try:
        context.use_certificate_chain_file(cert_path.encode())
        context.use_privatekey_file(key_path.encode())
        context.check_privatekey()
    except SSL.Error as e:
        raise UsageError(
            f"--tls-cert {cert_path} / --tls-key {key_path}: not a readable PEM certificate chain and "
            f"its matching unencrypted key ({e})"
        ) from None
    return ServerTLS(context)
