"""secshadow.relay.Splice: relaying, counting, closing, and backpressure."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from secshadow.relay import Splice, push_producer_of


class CountingTransport(StringTransport):
    """A StringTransport that counts loseConnection calls."""

    def __init__(self) -> None:
        super().__init__()
        self.close_calls = 0

    def loseConnection(self) -> None:
        self.close_calls += 1
        super().loseConnection()


class Wrapper:
    """A transport that is no push producer itself but wraps one (like a TLS transport)."""

    def __init__(self, inner: object) -> None:
        self.transport = inner


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def sides() -> tuple[CountingTransport, CountingTransport]:
    return CountingTransport(), CountingTransport()


def _splice(sides: tuple[CountingTransport, CountingTransport], clock: task.Clock,
            closed: list[str] | None = None) -> Splice:
    left, right = sides
    return Splice(left, right, clock, on_closed=None if closed is None else closed.append)


# ---------------------------------------------------------------- fakes


def test_start_registers_each_side_as_the_others_streaming_producer(sides, clock) -> None:
    left, right = sides
    splice = _splice(sides, clock)
    left.pauseProducing()
    splice.start()
    assert right.producer is left and right.streaming is True
    assert left.producer is right and left.streaming is True
    # start() lets both sides read.
    assert left.producerState == "producing"
    assert right.producerState == "producing"


def test_deliver_forwards_and_counts_both_ways(sides, clock) -> None:
    left, right = sides
    splice = _splice(sides, clock)
    splice.start()
    splice.deliver("left", b"RFB 003.008\n")
    splice.deliver("left", b"\x01")
    splice.deliver("right", b"RFB 003.008\n\x00\x00")
    assert right.value() == b"RFB 003.008\n\x01"
    assert left.value() == b"RFB 003.008\n\x00\x00"
    assert splice.bytes_left_to_right == 13
    assert splice.bytes_right_to_left == 14


def test_last_activity_follows_the_clock(sides, clock) -> None:
    clock.advance(100)
    splice = _splice(sides, clock)
    assert splice.last_activity == 100
    clock.advance(7.5)
    assert splice.last_activity == 100  # time alone is no activity
    splice.deliver("right", b"x")
    assert splice.last_activity == 107.5
    clock.advance(2)
    splice.deliver("left", b"y")
    assert splice.last_activity == 109.5


def test_lost_left_closes_right_once_and_reports_once(sides, clock) -> None:
    left, right = sides
    closed: list[str] = []
    splice = _splice(sides, clock, closed)
    splice.start()
    splice.deliver("left", b"before")
    splice.lost("left")
    assert right.close_calls == 1
    assert left.close_calls == 0  # it is already gone
    assert closed == ["left"]
    assert splice.closed_by == "left"
    # Producers are unregistered, so nobody pauses or resumes a dead transport.
    assert left.producer is None and right.producer is None
    # The right side's own connectionLost follows; nothing more happens.
    splice.lost("right")
    splice.lost("left")
    assert right.close_calls == 1
    assert closed == ["left"]
    # Late data is dropped, not written to a closing transport, not counted.
    clock.advance(30)
    splice.deliver("left", b"late")
    splice.deliver("right", b"late")
    assert right.value() == b"before"
    assert left.value() == b""
    assert (splice.bytes_left_to_right, splice.bytes_right_to_left) == (6, 0)
    assert splice.last_activity == 0


def test_lost_right_closes_left(sides, clock) -> None:
    left, right = sides
    closed: list[str] = []
    splice = _splice(sides, clock, closed)
    splice.start()
    splice.lost("right")
    assert (left.close_calls, right.close_calls) == (1, 0)
    assert closed == ["right"]


def test_lost_before_start_still_closes_the_other_side(sides, clock) -> None:
    left, right = sides
    closed: list[str] = []
    splice = _splice(sides, clock, closed)
    splice.lost("left")
    assert right.close_calls == 1
    assert closed == ["left"]


def test_on_closed_is_optional(sides, clock) -> None:
    splice = Splice(sides[0], sides[1], clock)
    splice.start()
    splice.lost("left")
    assert sides[1].close_calls == 1


def test_close_closes_both_and_the_following_loss_reports_once(sides, clock) -> None:
    left, right = sides
    closed: list[str] = []
    splice = _splice(sides, clock, closed)
    splice.start()
    splice.close()
    assert left.disconnecting and right.disconnecting
    assert (left.close_calls, right.close_calls) == (1, 1)
    splice.lost("right")
    splice.lost("left")
    assert closed == ["right"]


def test_push_producer_of_a_wrapping_transport_is_the_inner_one() -> None:
    inner = StringTransport()
    assert push_producer_of(inner) is inner
    assert push_producer_of(Wrapper(inner)) is inner  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        push_producer_of(Wrapper(object()))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        push_producer_of(object())  # type: ignore[arg-type]


class TLSLike:
    """Like ``TLSMemoryBIOProtocol``: a consumer that is no push producer; its ``transport`` is."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.producer: object = None
        self.written = b""

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written += data

    def loseConnection(self) -> None:
        self.transport.loseConnection()


def test_start_with_tls_like_transports_registers_the_sockets_below(clock) -> None:
    left, right = TLSLike(), TLSLike()
    left.transport.pauseProducing()
    right.transport.pauseProducing()
    splice = Splice(left, right, clock)  # type: ignore[arg-type]
    splice.start()
    assert right.producer is left.transport
    assert left.producer is right.transport
    assert left.transport.producerState == right.transport.producerState == "producing"
    splice.deliver("left", b"abc")
    assert right.written == b"abc"
    splice.lost("right")
    assert left.transport.disconnecting
    assert left.producer is None and right.producer is None


# ---------------------------------------------------------------- real sockets

TOTAL = 32 * 1024 * 1024
BUFFER_BOUND = 4 * 1024 * 1024


def _buffered(transport: Any) -> int:
    """Bytes queued in a Twisted TCP transport's user-space write buffer (FileDescriptor internals)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class SpliceEnd(Protocol):
    """One side of the splice: delivers to it and reports its loss."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.splice: Splice | None = None
        self.made: defer.Deferred[SpliceEnd] = defer.Deferred()
        self.gone: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.splice is not None, "data before the splice existed"
        self.splice.deliver(self.side, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.splice is not None:
            self.splice.lost(self.side)
        self.gone.callback(None)


class Reader(Protocol):
    """The slow consumer: starts paused; hashes what it gets."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.made: defer.Deferred[Reader] = defer.Deferred()
        self.gone: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone.callback(None)


class Writer(Protocol):
    def __init__(self) -> None:
        self.gone: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone.callback(None)


def _sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_backpressure_on_real_sockets_bounds_memory_and_loses_nothing():
    # Pair 1: writer -> left end of the splice.  Pair 2: right end of the splice -> reader.
    left_end = SpliceEnd("left")
    reader = Reader()
    port1 = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(lambda: left_end))
    port2 = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(lambda: reader))
    try:
        writer = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port1.getHost().port), Writer())
        right_end = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port2.getHost().port), SpliceEnd("right"))
        yield left_end.made
        yield reader.made

        closed: list[str] = []
        splice = Splice(left_end.transport, right_end.transport, reactor, on_closed=closed.append)
        left_end.splice = right_end.splice = splice
        splice.start()

        # Watch the intermediate buffer on every relayed chunk.
        peak = {"buffered": 0, "paused_seen": False}
        deliver = splice.deliver

        def watching_deliver(side: str, data: bytes) -> None:
            deliver(side, data)
            peak["buffered"] = max(peak["buffered"], _buffered(right_end.transport))
            peak["paused_seen"] = peak["paused_seen"] or bool(right_end.transport.producerPaused)

        splice.deliver = watching_deliver  # type: ignore[method-assign]

        payload = os.urandom(TOTAL)
        expected = hashlib.sha256(payload).hexdigest()
        writer.transport.write(payload)
        del payload

        # Wait until the relay stalls: the reader is paused, every buffer on the way fills.
        last, still = -1, 0
        for _ in range(100):
            yield _sleep(0.05)
            if splice.bytes_left_to_right == last:
                still += 1
                if still >= 6:
                    break
            else:
                last, still = splice.bytes_left_to_right, 0
        assert still >= 6, "the relay never stalled although the reader does not read"

        # The splice paused the source: it stopped reading the left socket ...
        assert splice.bytes_left_to_right < TOTAL
        assert peak["paused_seen"]
        assert right_end.transport.producerPaused
        assert left_end.transport not in reactor.getReaders()
        # ... so the bytes held in user space stayed bounded whatever the sender does.
        assert peak["buffered"] < BUFFER_BOUND, peak
        assert _buffered(right_end.transport) < BUFFER_BOUND
        assert reader.received == 0

        # The reader catches up: everything arrives, intact and in order.
        reader.transport.resumeProducing()
        for _ in range(200):
            if reader.received >= TOTAL:
                break
            yield _sleep(0.05)
        assert reader.received == TOTAL
        assert reader.digest.hexdigest() == expected
        assert splice.bytes_left_to_right == TOTAL
        assert splice.bytes_right_to_left == 0
        assert left_end.transport in reactor.getReaders()  # reading again

        # The writer hangs up: the splice closes the far side and reports once.
        writer.transport.loseConnection()
        yield left_end.gone
        yield reader.gone
        yield right_end.gone
        assert closed == ["left"]
    finally:
        for end in (left_end, reader):
            if end.transport is not None:
                end.transport.abortConnection()
        yield port1.stopListening()
        yield port2.stopListening()
