"""The client side of ``secshadow-relay/1``: a gateway leg as a stream endpoint.

:func:`gateway_endpoint` returns an ``IStreamClientEndpoint``. Its ``connect(factory)``
opens TCP and TLS to the gateway (the gateway's web certificate checked by a
:class:`~secshadow.umstrust.UMSTrust`: CA file, SHA-256 fingerprint or the system
store), sends the WebSocket upgrade with ``Authorization: Bearer <token>``, waits for
the gateway's ``{"type": "paired"}`` and only then builds the protocol from ``factory``
and connects it to a :class:`GatewayStream`: a transport whose bytes travel as binary
WebSocket messages (at most 64 KiB each) through the gateway to the other leg. So
``secshadow.tunnel.connect_pinned(..., endpoint_factory=lambda host, port, timeout:
endpoint)`` runs the pinned TLS to the device inside the relay, and the device side
(``secshadow-agent``, ``secshadow-device --dial``) runs its end over the same kind of
stream.

Failures before ``paired`` are :class:`~secshadow.errors.GatewayError` (exit 9), whose
message says which: the gateway is unreachable, its certificate is not trusted, it
refused the token (HTTP 401/403/409/..., with the status and its reason), the other
side did not join in time (close 4408 from the gateway, or ``timeout`` here), or it
closed the connection. ``timeout`` (seconds) covers everything up to ``paired``.
Cancelling the ``connect`` Deferred aborts the attempt and fails it with
``CancelledError``.

:class:`GatewayStream` is a push producer (pausing it stops reading the gateway's
socket) and a consumer whose registered producer is paused when that socket's write
buffer is full, so ``secshadow.relay.Splice`` and Twisted's TLS keep memory bounded over
it as over TCP. No token is ever logged or put in a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow.errors import GatewayError, SecShadowError
from secshadow.gateway import wire
from secshadow.gateway.wire import GatewayURL, parse_gateway_url
from secshadow.umstrust import UMSTrust, find_ums_error
from secshadow.wsstream import AutobahnSide, WebSocketSide, WebSocketStream

log = Logger(namespace="secshadow.gateway")

#: Seconds without a single byte from the gateway (it pings every 20 s) before the
#: stream is considered dead; not counted while this side itself stopped reading.
SILENCE_LIMIT = wire.IDLE_TIMEOUT + wire.PING_INTERVAL

_CONNECTION_DONE = Failure(ierror.ConnectionDone())

_STATUS_MEANING = {
    401: "the gateway refused the token",
    403: "the gateway refused the token for this session or role",
    404: "the gateway has no such session path",
    409: "the gateway refused the session",
    503: "the gateway is at its limit",
}


@implementer(IAddress)
@dataclass(frozen=True)
class GatewayAddress:
    """The far end of a :class:`GatewayStream`: the gateway's ``host``/``port`` and the
    leg's ``sid``/``role``."""

    host: str
    port: int
    sid: str
    role: str


class GatewayStream(WebSocketStream):
    """The transport the inner protocol sees once paired: a
    :class:`~secshadow.wsstream.WebSocketStream` over the leg whose writes go out as
    binary messages of at most :data:`~secshadow.gateway.wire.MAX_MESSAGE` (64 KiB) and
    whose peer is the :class:`GatewayAddress`. ``loseConnection`` closes with 1000,
    ``abortConnection`` drops the socket; pausing it stops reading the gateway's socket
    and ``registerProducer`` registers on that socket's transport."""

    def __init__(self, leg: WebSocketSide, address: GatewayAddress) -> None:
        raw = leg.transport
        super().__init__(leg, peer=address, host=raw.getHost() if raw is not None else address,
                         max_message=wire.MAX_MESSAGE)
        self._address = address

    def __repr__(self) -> str:
        a = self._address
        return f"GatewayStream({a.role} of {a.sid} via {a.host}:{a.port})"


class _ClientLeg(AutobahnSide, WebSocketClientProtocol):  # type: ignore[misc]  # see AutobahnSide
    """The WebSocket connection to the gateway; reports to its :class:`_Attempt`; the
    :class:`~secshadow.wsstream.WebSocketSide` of its :class:`GatewayStream`."""

    attempt: _Attempt

    def __init__(self) -> None:
        super().__init__()
        self.http_status: tuple[int, str] | None = None
        self.loss: Failure | None = None
        self.last_rx = 0.0
        self._watchdog: LoopingCall | None = None

    def connectionMade(self) -> None:
        self.last_rx = self.attempt.clock.seconds()
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.last_rx = self.attempt.clock.seconds()
        super().dataReceived(data)

    def failHandshake(self, reason: str) -> None:
        # The gateway answered the upgrade with something other than 101: keep its status.
        line = getattr(self, "http_status_line", None) or ""
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            self.http_status = (int(parts[1]), parts[2].strip() if len(parts) > 2 else "")
        super().failHandshake(reason)

    def onOpen(self) -> None:
        self._watchdog = LoopingCall(self._check_silence)
        self._watchdog.clock = self.attempt.clock
        self._watchdog.start(wire.PING_INTERVAL, now=False)
        self.attempt.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.attempt.message(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        self.attempt.closed(self, wasClean, code, reason or "")

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.loss = reason
        super().connectionLost(reason)

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.last_rx = self.attempt.clock.seconds()  # silence while paused is ours
        super().resume_reading()

    def _check_silence(self) -> None:
        now = self.attempt.clock.seconds()
        if self.reading_paused:
            self.last_rx = now
        elif now - self.last_rx > SILENCE_LIMIT:
            log.warn("no byte from the gateway for {s:.0f} s; dropping the connection", s=now - self.last_rx)
            self.attempt.silent = True
            self.abort()


class _Attempt:
    """One ``connect()``: stages ``tcp`` -> ``upgrade`` -> ``pairing`` -> ``paired``."""

    def __init__(self, endpoint: GatewayEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.clock = endpoint.reactor
        self.factory = factory
        self.stage = "tcp"
        self.leg: _ClientLeg | None = None
        self.stream: GatewayStream | None = None
        self.silent = False
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None

    # -- driving ----------------------------------------------------------------

    def start(self) -> Deferred[IProtocol]:
        endpoint = self.endpoint
        target = endpoint.target
        ws_factory = WebSocketClientFactory(
            target.url,
            headers={"Authorization": f"Bearer {endpoint.token}"},
            useragent="secshadow",
            reactor=endpoint.reactor,
        )
        ws_factory.setProtocolOptions(
            maxFramePayloadSize=wire.MAX_MESSAGE,
            maxMessagePayloadSize=wire.MAX_MESSAGE,
            autoFragmentSize=0,
            failByDrop=False,
            openHandshakeTimeout=0,  # the attempt's own deadline covers it
            closeHandshakeTimeout=2,
            autoPingInterval=0,
            tcpNoDelay=True,
        )
        ws_factory.noisy = False

        def build(addr: Any) -> _ClientLeg:
            leg = _ClientLeg()
            leg.factory = ws_factory
            leg.attempt = self
            self.leg = leg
            return leg

        ws_factory.buildProtocol = build  # type: ignore[method-assign]
        stream_endpoint: IStreamClientEndpoint = HostnameEndpoint(
            endpoint.reactor, target.host, target.port, timeout=max(1, int(endpoint.timeout))
        )
        if target.secure:
            creator = endpoint.trust.creatorForNetloc(target.host.encode("idna"), target.port)
            stream_endpoint = wrapClientTLS(creator, stream_endpoint)
        self._timer = self.clock.callLater(endpoint.timeout, self._deadline)
        self._connecting = stream_endpoint.connect(ws_factory)
        self._connecting.addCallbacks(self._tcp_connected, self._tcp_failed)
        return self.result

    def _tcp_connected(self, leg: Any) -> None:
        self._connecting = None
        if self.stage == "tcp":
            self.stage = "upgrade"

    def _tcp_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError, ierror.ConnectingCancelledError):
            return  # our own cancel or deadline already answered
        t = self.endpoint.target
        where = f"{t.host}:{t.port}"
        if failure.check(ierror.DNSLookupError):
            message = f"the gateway is unreachable: cannot resolve {t.host!r}"
        elif failure.check(ierror.ConnectError, ierror.TimeoutError):
            message = f"the gateway is unreachable: cannot connect to {where}: {failure.getErrorMessage()}"
        else:
            message = f"the gateway is unreachable: connecting to {where} failed: {failure.getErrorMessage()}"
        self._fail(GatewayError(message))

    def opened(self, leg: _ClientLeg) -> None:
        self.stage = "pairing"
        log.info("connected to the gateway as the {role} of session {sid}; waiting for the other side",
                 role=self.endpoint.target.role, sid=self.endpoint.target.sid)

    def message(self, leg: _ClientLeg, payload: bytes, is_binary: bool) -> None:
        if self.stage == "paired":
            if is_binary and self.stream is not None:
                self.stream.deliver(payload)
            elif not is_binary:
                log.warn("ignoring a text message from the gateway after pairing")
            return
        if is_binary or not _is_paired(payload):
            self._fail(GatewayError("the gateway sent something other than {\"type\": \"paired\"} before pairing"))
            leg.sendCloseFrame(code=wire.CLOSE_POLICY, reasonUtf8=b"unexpected message before paired")
            return
        self._paired(leg)

    def _paired(self, leg: _ClientLeg) -> None:
        if self.result.called:
            leg.abort()
            return
        self.stage = "paired"
        self._cancel_timer()
        t = self.endpoint.target
        address = GatewayAddress(t.host, t.port, t.sid, t.role)
        try:
            inner = self.factory.buildProtocol(address)
        except Exception as e:  # noqa: BLE001 - reported through the Deferred like Twisted's endpoints do
            leg.abort()
            self.result.errback(e)
            return
        if inner is None:
            leg.abort()
            self.result.errback(ierror.NoProtocol())
            return
        self.stream = GatewayStream(leg, address)
        log.info("paired: session {sid} through {host}:{port}", sid=t.sid, host=t.host, port=t.port)
        self.stream.start(inner)
        self.result.callback(inner)

    def closed(self, leg: _ClientLeg, was_clean: bool, code: int | None, reason: str) -> None:
        self._cancel_timer()
        if self.stage == "paired":
            if self.stream is not None:
                if was_clean and code == wire.CLOSE_NORMAL:
                    self.stream.lost(_CONNECTION_DONE)
                else:
                    detail = "no byte from the gateway for too long" if self.silent else f"close code {code}: {reason}"
                    self.stream.lost(Failure(ierror.ConnectionLost(f"the gateway relay ended ({detail})")))
            return
        if not self.result.called:
            self._fail(self._describe_close(leg, was_clean, code, reason))

    # -- failures ----------------------------------------------------------------

    def _describe_close(self, leg: _ClientLeg, was_clean: bool, code: int | None, reason: str) -> SecShadowError:
        t = self.endpoint.target
        other = "device" if t.role == "console" else "console"
        if leg.http_status is not None:
            status, phrase = leg.http_status
            meaning = _STATUS_MEANING.get(status, "the gateway refused the upgrade")
            return GatewayError(f"{meaning}: HTTP {status} {phrase}".rstrip())
        if code == wire.CLOSE_PAIRING_TIMEOUT:
            return GatewayError(
                f"pairing timeout: the {other} side did not join gateway session {t.sid} in time "
                f"(the gateway closed with {code})"
            )
        loss = leg.loss
        if loss is not None:
            trust_error = find_ums_error(loss)
            if trust_error is not None:
                return GatewayError(f"the gateway's certificate is not trusted: {_gateway_wording(trust_error.message)}")
            if loss.check(SSL.Error):
                return GatewayError(f"TLS with the gateway at {t.host}:{t.port} failed: {loss.getErrorMessage()}")
        if self.stage == "upgrade":
            return GatewayError(
                f"the gateway at {t.host}:{t.port} closed the connection during the TLS/WebSocket handshake"
                + (f" ({reason})" if reason else "")
            )
        return GatewayError(
            f"the gateway closed the connection before the {other} side joined (close code {code}"
            + (f": {reason})" if reason else ")")
        )

    def _deadline(self) -> None:
        self._timer = None
        t = self.endpoint.target
        limit = f"{self.endpoint.timeout:g} s"
        other = "device" if t.role == "console" else "console"
        if self.stage == "tcp":
            error = GatewayError(f"the gateway is unreachable: no connection to {t.host}:{t.port} within {limit}")
        elif self.stage == "upgrade":
            error = GatewayError(f"the gateway at {t.host}:{t.port} did not complete TLS and the upgrade within {limit}")
        else:
            error = GatewayError(f"pairing timeout: the {other} side did not join gateway session {t.sid} within {limit}")
        self._fail(error)
        self._abort()

    def _fail(self, error: BaseException) -> None:
        self._cancel_timer()
        if not self.result.called:
            self.result.errback(Failure(error))

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        self._cancel_timer()
        self._abort()

    def _abort(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        if self.leg is not None:
            self.leg.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _is_paired(payload: bytes) -> bool:
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(message, dict) and message.get("type") == "paired"


def _gateway_wording(message: str) -> str:
    """UMSTrust speaks of the UMS and its flags; say gateway instead."""
    return message.replace("--ums-", "--gateway-").replace("UMS", "gateway")


@implementer(IStreamClientEndpoint)
class GatewayEndpoint:
    """An ``IStreamClientEndpoint`` for one leg; see the module docstring and
    :func:`gateway_endpoint`. ``target``: the parsed URL."""

    def __init__(self, reactor: Any, target: GatewayURL, token: str, trust: UMSTrust, timeout: float) -> None:
        self.reactor = reactor
        self.target = target
        self.token = token
        self.trust = trust
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Dial, upgrade, wait for ``paired``; fires with the protocol built from
        ``protocolFactory`` (already connected to its :class:`GatewayStream`), or fails
        with :class:`GatewayError`; cancelling aborts (``CancelledError``)."""
        return _Attempt(self, protocolFactory).start()

    def __repr__(self) -> str:
        return f"GatewayEndpoint({self.target.url}, token=<redacted>, trust={self.trust!r})"


def gateway_endpoint(reactor: Any, url: str, token: str, trust: UMSTrust, timeout: float) -> IStreamClientEndpoint:
    """The endpoint for the leg at ``url`` (``wss://HOST[:PORT]/v1/sessions/{sid}/{role}``).

    ``token``: the leg's JWT (sent as ``Authorization: Bearer``, never logged).
    ``trust``: how the gateway's web certificate is checked (``UMSTrust.from_ca_file``,
    ``from_fingerprint`` or ``system``). ``timeout``: seconds from ``connect`` until
    ``paired``. Raises :class:`~secshadow.errors.UsageError` for a malformed URL or an
    empty token; connection failures come through the ``connect`` Deferred as
    :class:`GatewayError`.
    """
    target = parse_gateway_url(url)
    return _endpoint(reactor, target, token, trust, timeout)


def gateway_trust(ca_file: str | None = None, fingerprint: str | None = None) -> UMSTrust:
    """How the gateway's web certificate is trusted, from ``--gateway-ca FILE`` or
    ``--gateway-fingerprint HEX`` (at most one), else the system's CA store with the
    host-name check. Raises :class:`~secshadow.errors.UsageError` (worded for the
    ``--gateway-*`` flags) for both at once, an unreadable CA file or a bad fingerprint."""
    from secshadow.errors import UsageError

    if ca_file and fingerprint:
        raise UsageError("give either --gateway-ca or --gateway-fingerprint, not both")
    try:
        if ca_file:
            return UMSTrust.from_ca_file(ca_file)
        if fingerprint:
            return UMSTrust.from_fingerprint(fingerprint)
    except UsageError as e:
        raise UsageError(_gateway_wording(e.message)) from None
    return UMSTrust.system()


#: Seconds by which :func:`gateway_endpoint_factory` makes the endpoint's own deadline
#: come before ``connect_pinned``'s, so a pairing timeout is reported as the gateway's.
DEADLINE_MARGIN = 0.25


def gateway_endpoint_factory(reactor: Any, url: str, token: str, trust: UMSTrust) -> Callable[
        [str, int, float], IStreamClientEndpoint]:
    """An ``endpoint_factory`` for :func:`secshadow.tunnel.connect_pinned` /
    ``PinnedDialer``: ``(host, port, timeout) -> gateway_endpoint(...)`` whose deadline
    ends :data:`DEADLINE_MARGIN` seconds before ``connect_pinned``'s own (same
    ``timeout``), so a device side that never joins fails with this module's
    :class:`GatewayError` (exit 9) rather than ``connect_pinned``'s "device unreachable"
    (exit 4). ``host``/``port`` are ignored: the URL names the way. The URL and token are
    checked now (:class:`~secshadow.errors.UsageError`). A token is single use: a second
    connect needs a new one.
    """
    target = parse_gateway_url(url)
    _endpoint(reactor, target, token, trust, 1.0)  # validate now, not at the first connect

    def make(host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        return _endpoint(reactor, target, token, trust, max(timeout - DEADLINE_MARGIN, timeout / 2))

    return make


def _endpoint(reactor: Any, target: GatewayURL, token: str, trust: UMSTrust, timeout: float) -> GatewayEndpoint:
    from secshadow.errors import UsageError

    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token.strip()):
        raise UsageError("the gateway token is empty or malformed")
    if not timeout > 0:
        raise UsageError("the gateway timeout must be a positive number of seconds")
    return GatewayEndpoint(reactor, target, token.strip(), trust, timeout)


def plaintext_gateway_endpoint(reactor: Any, url: str, token: str, timeout: float) -> IStreamClientEndpoint:
    """As :func:`gateway_endpoint` for a ``ws://`` URL on a loopback address: a leg on
    the same host as a plaintext gateway (tests, benchmarks, a sidecar behind a TLS
    front). Refuses anything but loopback with :class:`~secshadow.errors.UsageError`."""
    from secshadow.errors import UsageError

    target = parse_gateway_url(url, allow_plaintext=True)
    if target.secure:
        raise UsageError("plaintext_gateway_endpoint is for ws:// URLs; use gateway_endpoint")
    if not wire.is_loopback(target.host):
        raise UsageError("a ws:// gateway URL is only allowed on a loopback address")
    return _endpoint(reactor, target, token, UMSTrust.insecure(), timeout)
