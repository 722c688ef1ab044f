"""``secshadow-agent``: the device-side end of a gateway session, in front of a device.

Like a cloud remote-access device agent (a WebSocket with a connection key on one side,
TCP to the local endpoint on the other), but the bytes it carries are the console's
pinned TLS session with the device: the agent cannot read them either. One run is one
session:

1. dial the gateway's ``device`` URL with the token and wait for ``paired``
   (:func:`secshadow.gateway.dialer.gateway_endpoint`);
2. connect TCP to ``target`` (the device's TLS port 5900, unchanged OS 11 firmware);
   what the console sends meanwhile (its TLS ClientHello) is kept, at most
   :data:`MAX_EARLY` bytes, after which reading the gateway pauses until the target is
   connected;
3. splice the two with :class:`secshadow.relay.Splice` (backpressure both ways); when
   either side ends, the other is closed.

:func:`run_agent` returns a Deferred firing with an :class:`AgentResult`, or failing
with :class:`~secshadow.errors.GatewayError` (before pairing) or
:class:`~secshadow.errors.DeviceUnreachable` (the target refused or timed out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from secshadow.errors import DeviceUnreachable
from secshadow.events import Event
from secshadow.reactor import quiet_factory
from secshadow.relay import Splice

log = Logger(namespace="secshadow.gateway")

#: Bytes from the gateway kept while the target connection comes up.
MAX_EARLY = 64 * 1024


@dataclass(frozen=True)
class AgentPaired(Event):
    """The console joined; the agent now connects to ``target`` (``"host:port"``)."""

    name: ClassVar[str] = "paired"
    sid: str
    target: str


@dataclass(frozen=True)
class TargetConnected(Event):
    """TCP to the target is up; relaying."""

    name: ClassVar[str] = "target-connected"
    target: str


@dataclass(frozen=True)
class AgentClosed(Event):
    """The session ended. ``bytes_to_target``/``bytes_to_gateway``: payload relayed each
    way; ``reason``: which side ended it."""

    name: ClassVar[str] = "closed"
    bytes_to_target: int
    bytes_to_gateway: int
    duration_s: float
    reason: str


@dataclass(frozen=True)
class AgentResult:
    """What :func:`run_agent` fires with (the same numbers as :class:`AgentClosed`)."""

    bytes_to_target: int
    bytes_to_gateway: int
    duration_s: float
    reason: str


class _TargetSide(Protocol):
    def __init__(self, agent: _GatewaySide) -> None:
        self.agent = agent

    def connectionMade(self) -> None:
        self.agent.target_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.agent.splice is not None:
            self.agent.splice.deliver("right", data)

    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        if self.agent.splice is not None:
            self.agent.splice.lost("right")


class _GatewaySide(Protocol):
    """The stream from the gateway (the console's TLS records)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.splice: Splice | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._target: _TargetSide | None = None
        self.ended = False

    def connectionMade(self) -> None:
        self.run.paired(self)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.deliver("left", data)
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > MAX_EARLY and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        self.ended = True
        if self.splice is not None:
            self.splice.lost("left")
        elif self._target is not None and self._target.transport is not None:
            self._target.transport.loseConnection()
        self.run.gateway_lost(reason)

    def target_connected(self, target: _TargetSide) -> None:
        self._target = target
        if self.ended or self.transport is None:
            if target.transport is not None:
                target.transport.loseConnection()
            return
        assert target.transport is not None
        self.splice = Splice(self.transport, target.transport, self.run.reactor,
                             on_closed=self.run.spliced_closed)
        self.run.emit(TargetConnected(target=self.run.target_text))
        self.splice.start()
        early, self._early, self._early_size = self._early, [], 0
        for chunk in early:
            self.splice.deliver("left", chunk)


class _Run:
    def __init__(self, reactor: Any, endpoint: IStreamClientEndpoint, target_host: str, target_port: int,
                 on_event: Callable[[Event], None], connect_timeout: float) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.target_host = target_host
        self.target_port = target_port
        self.target_text = f"{target_host}:{target_port}"
        self.emit = on_event
        self.connect_timeout = connect_timeout
        self.result: Deferred[AgentResult] = Deferred(self._cancel)
        self.side: _GatewaySide | None = None
        self.started = 0.0
        self.reason = ""
        self._connecting: Deferred[Any] | None = None
        self._target_failed: Failure | None = None

    def start(self) -> Deferred[AgentResult]:
        dialing = self.endpoint.connect(quiet_factory(lambda: _GatewaySide(self)))
        self._dialing = dialing
        dialing.addErrback(self._dial_failed)
        return self.result

    def _dial_failed(self, failure: Failure) -> None:
        if not self.result.called:
            self.result.errback(failure)

    def paired(self, side: _GatewaySide) -> None:
        self.side = side
        self.started = self.reactor.seconds()
        peer = side.transport.getPeer() if side.transport is not None else None
        sid = str(getattr(peer, "sid", "?"))
        log.info("paired in session {sid}; connecting to the target {target}", sid=sid, target=self.target_text)
        self.emit(AgentPaired(sid=sid, target=self.target_text))
        endpoint = HostnameEndpoint(self.reactor, self.target_host, self.target_port,
                                    timeout=max(1, int(self.connect_timeout)))
        self._connecting = connectProtocol(endpoint, _TargetSide(side))
        self._connecting.addErrback(self._target_unreachable)

    def _target_unreachable(self, failure: Failure) -> None:
        self._connecting = None
        self._target_failed = failure
        log.warn("cannot connect to the target {target}: {error}", target=self.target_text,
                 error=failure.getErrorMessage())
        if self.side is not None and self.side.transport is not None:
            self.side.transport.loseConnection()

    def spliced_closed(self, side: str) -> None:
        self.reason = "the console side closed" if side == "left" else "the target closed"

    def gateway_lost(self, reason: Failure) -> None:
        if self.result.called:
            return
        if self._target_failed is not None:
            self.result.errback(DeviceUnreachable(
                f"cannot connect to the target {self.target_text}: {self._target_failed.getErrorMessage()}"))
            return
        splice = self.side.splice if self.side is not None else None
        if not self.reason:
            self.reason = "the console side closed" if reason.check(ierror.ConnectionDone) else \
                f"the gateway relay ended ({reason.getErrorMessage()})"
        duration = round(self.reactor.seconds() - self.started, 3)
        to_target = splice.bytes_left_to_right if splice is not None else 0
        to_gateway = splice.bytes_right_to_left if splice is not None else 0
        self.emit(AgentClosed(bytes_to_target=to_target, bytes_to_gateway=to_gateway, duration_s=duration,
                              reason=self.reason))
        self.result.callback(AgentResult(to_target, to_gateway, duration, self.reason))

    def _cancel(self, result: Deferred[AgentResult]) -> None:
        self._dialing.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.side is not None and self.side.transport is not None:
            self.side.transport.abortConnection()  # type: ignore[attr-defined]


def run_agent(
    reactor: Any,
    endpoint: IStreamClientEndpoint,
    target_host: str,
    target_port: int,
    on_event: Callable[[Event], None] | None = None,
    connect_timeout: float = 15.0,
) -> Deferred[AgentResult]:
    """Run one agent session over ``endpoint`` (a gateway ``device`` leg) to
    ``target_host:target_port``; ``connect_timeout``: seconds for the TCP connect.

    Fires with an :class:`AgentResult` once both sides are closed; fails with the
    endpoint's :class:`~secshadow.errors.GatewayError` before pairing, or
    :class:`~secshadow.errors.DeviceUnreachable` when the target cannot be reached (the
    console's side is then closed at once). Cancelling aborts everything.
    """
    return _Run(reactor, endpoint, target_host, target_port, on_event or (lambda e: None), connect_timeout).start()
