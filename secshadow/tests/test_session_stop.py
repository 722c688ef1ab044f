"""A stop ends the session in every state (issue 9, item 1), with Twisted's fakes
(MemoryReactorClock, StringTransport): whatever is in flight is cancelled, the device link,
the viewer's stream, the listener and the viewer process are closed, ``done`` fires with
one ``closed`` event, and no delayed call is left. The real-process version of the same
promise is test_stop_stages.py.

Also here: bytes a device sends before PROCYCMD are discarded and said once, with their
count (issue 9, item 10), and never taken for the device's answer.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import LogLevel, globalLogPublisher

from secshadow import events
from secshadow.api import start_shadowing
from secshadow.bridge import CLOSE_GRACE
from secshadow.errors import DeviceRejected
from secshadow.lab import certs
from secshadow.options import SessionOptions
from secshadow.proxy import SessionState, ShadowSession
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.tests._tls import der_of
from secshadow.tests.test_proxy import FakeViewer
from secshadow.tunnel import DeviceLink, PinnedDialer

CERT, _ = certs.generate_self_signed()
PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"
SECRET = ShadowSecret(der_of(CERT), OneTimePassword(PASSWORD), "10.0.0.5", 5900)
S = SessionState


class Link(DeviceLink):
    """A pinned link on a StringTransport. ``polite_close_hangs``: loseConnection does
    nothing (a device that never answers the TLS close), so only an abort ends it."""

    def __init__(self, polite_close_hangs: bool = False) -> None:
        super().__init__(der_of(CERT))
        transport = StringTransportWithDisconnection()
        transport.protocol = self
        if polite_close_hangs:
            transport.loseConnection = lambda: None  # type: ignore[method-assign]
            transport.abortConnection = lambda: StringTransportWithDisconnection.loseConnection(transport)  # type: ignore[method-assign]
        self.makeConnection(transport)
        self.ready = None
        self.tls_version, self.cipher = "TLSv1.3", "TLS_AES_256_GCM_SHA384"

    def send_command(self, command: bytes) -> None:
        self.transport.write(command)  # type: ignore[union-attr]

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class Dials:
    """The device side: ``mode`` per dial (``"ok"``: a pinned :class:`Link`, ``"hang"``:
    a Deferred that never fires and records its cancellation)."""

    def __init__(self, *modes: str, polite_close_hangs: bool = False) -> None:
        self.modes = list(modes)
        self.links: list[Link] = []
        self.cancelled = 0
        self.polite_close_hangs = polite_close_hangs

    def __call__(self, *args: Any) -> Deferred[DeviceLink]:
        mode = self.modes.pop(0) if self.modes else "ok"
        if mode == "hang":
            def cancel(_: Deferred[DeviceLink]) -> None:
                self.cancelled += 1
            return Deferred(cancel)
        link = Link(self.polite_close_hangs)
        self.links.append(link)
        return succeed(link)


Viewer = FakeViewer  # the launched viewer, as the session sees it


class Run:
    """One session on a MemoryReactorClock with a fake viewer process."""

    def __init__(self, dials: Dials, *, refresh: Any = None, endpoint: Any = None, peer_check: Any = None,
                 **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.dials = dials
        self.events: list[events.Event] = []
        self.viewer = Viewer()
        self.session = ShadowSession(
            self.reactor, SECRET, SessionOptions(device_host="10.0.0.5", **options), on_event=self.events.append,
            launch_viewer=lambda host, port: self.viewer, dialer=dials, viewer_endpoint=endpoint,
            refresh_secret=refresh, peer_check=peer_check)
        self.outcome: list[Any] = []
        self.session.start().addBoth(self.outcome.append)

    def viewer_connects(self, port: int = 51234) -> Any:
        factory = self.reactor.tcpServers[-1][1]
        address = IPv4Address("TCP", "127.0.0.1", port)
        protocol = factory.buildProtocol(address)
        transport = StringTransportWithDisconnection(peerAddress=address)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol

    def stop_and_check(self, reason: str = "interrupted by SIGTERM") -> events.Closed:
        """Stop; the session must be over at once (or after the close grace, which a
        device that ignores the TLS close takes), with exactly one ``closed`` event."""
        assert self.outcome == [], self.outcome
        done = self.session.stop(reason)
        if not self.outcome:
            self.reactor.advance(CLOSE_GRACE)
        assert len(self.outcome) == 1, self.outcome
        closed = self.outcome[0]
        assert isinstance(closed, events.Closed), closed
        assert closed.reason == reason
        assert [e for e in self.events if isinstance(e, events.Closed)] == [closed]
        assert done.called and self.session.state is S.CLOSED
        assert self.reactor.getDelayedCalls() == []
        assert self.session._door._port is None  # no listener left
        assert all(not link.transport.connected for link in self.dials.links)  # type: ignore[union-attr]
        return closed


def test_stop_while_connecting_cancels_the_dial():
    run = Run(Dials("hang"))
    assert run.session.state is S.CONNECTING
    run.stop_and_check()
    assert run.dials.cancelled == 1
    assert run.reactor.tcpServers == []  # never listened
    assert [e.name for e in run.events] == ["closed"]


def test_stop_while_the_listener_is_being_opened():
    cancelled: list[bool] = []

    class SlowEndpoint:
        def listen(self, factory: Any) -> Deferred[Any]:
            return Deferred(lambda _: cancelled.append(True))

    run = Run(Dials("ok"), endpoint=SlowEndpoint())
    assert run.session.state is S.PINNED
    run.stop_and_check()
    assert cancelled == [True]


def test_stop_while_listening_releases_the_port_and_reaps_the_viewer():
    run = Run(Dials("ok"))
    assert run.session.state is S.LISTENING
    run.stop_and_check()
    assert run.viewer.terminated
    assert run.reactor.tcpServers  # it did listen ...
    assert run.session._door._port is None  # ... and released the port


def test_stop_while_reconnecting_after_the_device_dropped_the_idle_link():
    run = Run(Dials("ok", "hang"))
    run.dials.links[0].transport.loseConnection()  # the device gave up waiting
    viewer = run.viewer_connects()
    assert run.session.state is S.REPINNING
    run.stop_and_check()
    assert run.dials.cancelled == 1
    assert not viewer.transport.connected and viewer.transport.value() == b""


def test_stop_while_fetching_a_fresh_secret_for_the_next_viewer():
    fetches: list[Deferred[ShadowSecret]] = []
    cancelled: list[bool] = []

    def refresh() -> Deferred[ShadowSecret]:
        fetches.append(Deferred(lambda _: cancelled.append(True)))
        return fetches[-1]

    run = Run(Dials("ok"), refresh=refresh, max_viewers=2)
    first = run.viewer_connects()
    run.dials.links[0].dataReceived(b"RFB 003.008\n")
    first.transport.loseConnection()
    second = run.viewer_connects(51300)
    assert run.session.state is S.REPINNING and len(fetches) == 1
    run.stop_and_check()
    assert cancelled == [True]
    assert not second.transport.connected


def test_stop_while_awaiting_the_hello():
    run = Run(Dials("ok"), hello_timeout=60)
    viewer = run.viewer_connects()
    assert run.session.state is S.AWAITING_HELLO
    run.stop_and_check()
    assert not viewer.transport.connected and viewer.transport.value() == b""


def test_stop_while_relaying_counts_the_bytes():
    run = Run(Dials("ok"))
    viewer = run.viewer_connects()
    run.dials.links[0].dataReceived(b"RFB 003.008\n" + b"\x00" * 88)
    assert run.session.state is S.RELAYING
    closed = run.stop_and_check()
    assert (closed.bytes_to_viewer, closed.bytes_to_device) == (100, 0)
    assert not viewer.transport.connected


def test_stop_while_closing_is_the_same_close():
    run = Run(Dials("ok", polite_close_hangs=True))
    run.viewer_connects()
    run.dials.links[0].dataReceived(b"RFB 003.008\n")
    first = run.session.stop("interrupted by SIGINT")
    assert run.session.state is S.CLOSING  # the device has not answered the TLS close
    second = run.session.stop("interrupted by SIGTERM")
    assert second is first and run.outcome == []
    run.reactor.advance(CLOSE_GRACE)  # then it is aborted
    assert [e.reason for e in run.events if isinstance(e, events.Closed)] == ["interrupted by SIGINT"]
    assert run.session.state is S.CLOSED and run.reactor.getDelayedCalls() == []


@pytest.mark.parametrize("stage", ["tcp", "tls"])
def test_stop_during_the_real_connect_aborts_it(stage: str):
    """The TCP dialer itself (connect_pinned), cancelled mid-TCP and mid-TLS."""
    reactor = MemoryReactorClock()
    transport = StringTransportWithDisconnection()

    class SilentTLS:
        def connect(self, factory: Any) -> Deferred[Any]:
            protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 5900))
            transport.protocol = protocol
            protocol.makeConnection(transport)
            return succeed(protocol)

    dialer = PinnedDialer(reactor, None if stage == "tcp" else (lambda host, port, timeout: SilentTLS()))
    session = ShadowSession(reactor, SECRET, SessionOptions(device_host="10.0.0.5", connect_timeout=15),
                            dialer=dialer, peer_check=None)
    outcome: list[Any] = []
    session.start().addBoth(outcome.append)
    if stage == "tcp":
        assert len(reactor.connectors) == 1
    else:
        assert transport.value()[:1] == b"\x16"  # the ClientHello went out, no answer
    session.stop("closed by the console")
    assert isinstance(outcome[0], events.Closed) and outcome[0].reason == "closed by the console"
    if stage == "tcp":
        assert reactor.connectors[0].stoppedConnecting
    else:
        assert not transport.connected
    assert reactor.getDelayedCalls() == []  # the connect deadline is gone too


def test_api_stop_while_fetching_the_secret():
    reactor = MemoryReactorClock()
    cancelled: list[bool] = []

    class Never:
        name, refreshable = "ums", False

        def fetch(self) -> Deferred[ShadowSecret]:
            return Deferred(lambda _: cancelled.append(True))

    seen: list[events.Event] = []
    shadowing = start_shadowing(reactor, Never(), SessionOptions(), on_event=seen.append)
    assert shadowing.state == "fetching"
    outcome: list[Any] = []
    shadowing.done.addBoth(outcome.append)
    shadowing.stop("stopped by the embedding program")
    assert cancelled == [True]
    assert isinstance(outcome[0], events.Closed) and outcome[0].reason == "stopped by the embedding program"
    assert seen == outcome and reactor.getDelayedCalls() == []


# ------------------------------------------------------------------ bytes before PROCYCMD
@pytest.fixture
def warnings() -> Any:
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn and event.get("log_namespace", "").startswith("secshadow"):
            from twisted.logger import formatEvent
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_a_flood_before_procycmd_is_said_once_with_a_count(warnings: list[str]):
    link = Link()
    for _ in range(10_000):
        link.dataReceived(b"x" * 100)  # what a flooding device's TLS records become
    assert len(warnings) == 1
    assert "4100 bytes before PROCYCMD" in warnings[0] and "closing" in warnings[0]
    assert not link.transport.connected  # type: ignore[union-attr]


def test_a_few_bytes_before_procycmd_are_discarded_not_taken_for_the_hello(warnings: list[str]):
    run = Run(Dials("ok"))
    link = run.dials.links[0]
    for _ in range(3):
        link.dataReceived(b"RFB 003.008\n")  # not an answer: nothing was asked yet
    run.viewer_connects()
    assert run.session.state is S.AWAITING_HELLO  # still waiting for the real answer
    assert link.transport.value() == f"PROCYCMD PW_{PASSWORD}".encode()
    assert warnings == ["the device sent 36 bytes before PROCYCMD, when it has nothing to say; discarded them"]
    link.dataReceived(b"HTTP/1.1 400\r\n")
    assert isinstance(run.outcome[0].value, DeviceRejected)
    assert len(warnings) == 1


def test_refused_connections_are_said_five_times_then_counted():
    """Another local user connecting in a loop gets no line per connection."""
    def other_user(transport: Any) -> str | None:
        return "it belongs to another local user (uid 65534)" if transport.getPeer().port >= 60000 else None

    run = Run(Dials("ok"), peer_check=other_user)
    refused = [run.viewer_connects(60000 + n) for n in range(1000)]
    assert all(not conn.transport.connected and conn.transport.value() == b"" for conn in refused)
    assert run.session.state is S.LISTENING  # still waiting for the real viewer
    warnings = [e.message for e in run.events if isinstance(e, events.WarningEvent) and "refused" in e.message]
    assert len(warnings) == 5 and warnings[-1].endswith("; further refusals are only counted")
    assert all("uid 65534" in w for w in warnings)
    run.viewer_connects(51234)
    run.dials.links[0].dataReceived(b"RFB 003.008\n")
    run.stop_and_check("viewer disconnected")
    warnings = [e.message for e in run.events if isinstance(e, events.WarningEvent) and "refused" in e.message]
    assert warnings[5:] == ["refused 1000 viewer connections in all"]
