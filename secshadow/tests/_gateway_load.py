"""Load generators for the gateway tests and benchmarks: a writer that pushes a counted
byte pattern as fast as its stream lets it (a push producer honouring backpressure), a
reader that checks the pattern and may read slowly, and many idle paired sessions.

The bytes are opaque to the gateway, so no TLS runs inside here: what is measured is the
relay itself (the legs' own TLS to the gateway is on when the gateway has TLS)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

CHUNK = 64 * 1024


def pattern(offset: int, length: int) -> bytes:
    """``length`` bytes of the stream at ``offset``: byte i is ``i % 251``."""
    start = offset % 251
    block = bytes(range(251)) * (length // 251 + 2)
    return block[start:start + length]


@implementer(IPushProducer)
class Writer(Protocol):
    """Writes the pattern in ``chunk``-byte writes until ``limit`` bytes are out, pausing
    when its transport says so.

    ``sent``: bytes written; ``pauses``: how often the transport paused it.
    ``done``: fires when the connection is lost.
    """

    def __init__(self, reactor: Any, limit: int, chunk: int = CHUNK) -> None:
        self.reactor = reactor
        self.limit = limit
        self.chunk = chunk
        self.sent = 0
        self.pauses = 0
        self.paused = False
        self.stopped = False
        self.done: Deferred[None] = Deferred()
        self._scheduled = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self.paused and not self.stopped and self.sent < self.limit:
            self._scheduled = True
            self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        for _ in range(4 * CHUNK // self.chunk):
            if self.paused or self.stopped or self.sent >= self.limit:
                break
            n = min(self.chunk, self.limit - self.sent)
            self.transport.write(pattern(self.sent, n))  # type: ignore[union-attr]
            self.sent += n
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.stopped = True
        if not self.done.called:
            self.done.callback(None)


class Reader(Protocol):
    """Checks the pattern. ``rate``: bytes per second it allows itself (0: as fast as
    possible), by pausing its transport between 0.1 s windows."""

    def __init__(self, reactor: Any, rate: int = 0) -> None:
        self.reactor = reactor
        self.rate = rate
        self.received = 0
        self.corrupt = False
        self.done: Deferred[None] = Deferred()
        self._window = 0
        self._timer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if not self.corrupt and data != pattern(self.received, len(data)):
            self.corrupt = True
        self.received += len(data)
        if self.rate:
            self._window += len(data)
            if self._window >= self.rate / 10 and self._timer is None:
                self.transport.pauseProducing()  # type: ignore[union-attr]
                self._timer = self.reactor.callLater(0.1, self._next_window)

    def _next_window(self) -> None:
        self._timer = None
        self._window = 0
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def full_speed(self) -> None:
        self.rate = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.done.called:
            self.done.callback(None)


class Idle(Protocol):
    """A paired leg that sends ``hello`` once and counts what it receives."""

    def __init__(self) -> None:
        self.received = 0
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(None)


async def open_idle_sessions(endpoint_for: Any, count: int, prefix: str, batch: int = 50) -> list[Idle]:
    """``count`` paired sessions of two :class:`Idle` legs; ``endpoint_for(sid, role)``
    gives each leg's endpoint. Opened ``batch`` sessions at a time."""
    legs: list[Idle] = []
    for first in range(0, count, batch):
        waiting = []
        for i in range(first, min(first + batch, count)):
            sid = f"{prefix}-{i}"
            for role in ("device", "console"):
                waiting.append(endpoint_for(sid, role).connect(Factory.forProtocol(Idle)))
        results = await DeferredList(waiting, fireOnOneErrback=True, consumeErrors=True)
        legs += [protocol for _, protocol in results]
    return legs
