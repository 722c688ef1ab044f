"""The session's states, events and timeouts, with Twisted's fakes and a fake clock.

The device link is a real :class:`DeviceLink` on a ``StringTransport`` (the TLS part
is covered by test_pinning.py); the listener is ``MemoryReactorClock``'s.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection

from secshadow import events
from secshadow.lab import certs
from secshadow.errors import DeviceRejected, DeviceUnreachable, TLSHandshakeError, ViewerError
from secshadow.options import SessionOptions
from secshadow.proxy import SessionState, ShadowSession
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.tests._tls import der_of
from secshadow.tunnel import DeviceLink, connect_pinned

CERT, _ = certs.generate_self_signed()
PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"
SECRET = ShadowSecret(der_of(CERT), OneTimePassword(PASSWORD), "10.0.0.5", 5900)


class FakeLink(DeviceLink):
    """A pinned link on a StringTransport; records what the session writes."""

    def __init__(self) -> None:
        super().__init__(der_of(CERT))
        self.commands: list[bytes] = []
        transport = StringTransportWithDisconnection()
        transport.protocol = self
        self.makeConnection(transport)
        self.ready = None
        self.tls_version, self.cipher = "TLSv1.3", "TLS_AES_256_GCM_SHA384"

    def send_command(self, command: bytes) -> None:
        self.commands.append(command)
        self.transport.write(command)

    def abort(self) -> None:
        self.transport.loseConnection()


class FakeViewer:
    name = "fake"
    pid = 4242

    def __init__(self) -> None:
        self.exited: Deferred[int | None] = Deferred()
        self.terminated = False

    def wait(self) -> Deferred[int | None]:
        d: Deferred[int | None] = Deferred()
        self.exited.addBoth(lambda r: (d.callback(r), r)[1])
        return d

    def terminate(self, grace: float = 5.0) -> Deferred[None]:
        self.terminated = True
        if not self.exited.called:
            self.exited.callback(None)
        return succeed(None)


class _Reactor(MemoryReactorClock):
    """MemoryReactorClock whose fake ports report the interface they were asked for."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = super().listenTCP(port, factory, backlog, interface)
        listening._hostAddress = IPv4Address("TCP", interface or "0.0.0.0", 40123)
        return listening


class Harness:
    def __init__(self, refresh: Any = None, **options: Any) -> None:
        self.reactor = _Reactor()
        self.links: list[FakeLink] = []
        self.events: list[events.Event] = []
        self.viewer = FakeViewer()
        self.launches: list[tuple[str, int]] = []
        self.session = ShadowSession(
            self.reactor, SECRET, SessionOptions(device_host="10.0.0.5", **options),
            on_event=self.events.append, launch_viewer=self.launch, dialer=self.connect,
            refresh_secret=refresh, peer_check=None,
        )
        self.outcome: list[Any] = []
        self.session.start().addBoth(self.outcome.append)

    def connect(self, *dial_args: Any) -> Deferred[DeviceLink]:
        link = FakeLink()
        self.links.append(link)
        return succeed(link)

    def launch(self, host: str, port: int) -> FakeViewer:
        self.launches.append((host, port))
        return self.viewer

    def viewer_connects(self, port: int = 51234) -> Any:
        factory = self.reactor.tcpServers[0][1]
        address = IPv4Address("TCP", "127.0.0.1", port)
        protocol = factory.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransportWithDisconnection(peerAddress=address)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def result(self) -> Any:
        assert len(self.outcome) == 1, self.outcome
        value = self.outcome[0]
        return value.value if hasattr(value, "value") and hasattr(value, "check") else value


def test_happy_path_events_bytes_and_clean_end():
    h = Harness()
    assert h.names() == ["pinned", "listening", "viewer-started"]
    listening = h.events[1]
    assert isinstance(listening, events.Listening)
    assert h.reactor.tcpServers[0][3] == "127.0.0.1"  # loopback by default
    assert h.launches == [(listening.host, listening.port)]
    device = h.links[0]
    assert device.transport.value() == b""  # nothing before a viewer comes
    viewer = h.viewer_connects()
    assert device.commands == [f"PROCYCMD PW_{PASSWORD}".encode()]
    assert len(device.commands[0]) == 48
    assert h.session.state is SessionState.AWAITING_HELLO
    device.dataReceived(b"RFB 003.008\n")
    assert h.session.state is SessionState.RELAYING
    assert viewer.transport.value() == b"RFB 003.008\n"
    viewer.dataReceived(b"RFB 003.008\n")
    assert device.transport.value().endswith(b"RFB 003.008\n")
    device.dataReceived(b"\x00" * 100)
    viewer.transport.loseConnection()
    closed = h.result()
    assert isinstance(closed, events.Closed)
    assert closed.reason == "viewer disconnected"
    assert (closed.bytes_to_viewer, closed.bytes_to_device) == (112, 12)
    assert h.names()[-3:] == ["viewer-connected", "session-started", "closed"]
    assert not device.transport.connected and not viewer.transport.connected
    assert h.viewer.terminated
    assert h.reactor.getDelayedCalls() == []
    assert h.session.state is SessionState.CLOSED


def test_no_event_carries_the_password():
    h = Harness()
    h.viewer_connects()
    h.links[0].dataReceived(b"RFB 003.008\n")
    h.session.stop("test")
    assert all(PASSWORD not in repr(e.as_dict()) for e in h.events)
    assert PASSWORD not in repr(SECRET)


def test_second_viewer_gets_nothing_from_the_device():
    h = Harness()
    h.viewer_connects()
    assert h.viewer_connects(port=51235) is None  # refused at accept
    assert h.session._door._port is None  # and the listener was released at the first accept
    assert len(h.links) == 1 and len(h.links[0].commands) == 1


def test_viewer_timeout_is_a_viewer_error_and_leaves_no_timer():
    h = Harness(viewer_timeout=60)
    h.reactor.advance(59.9)
    assert h.outcome == []
    h.reactor.advance(0.2)
    error = h.result()
    assert isinstance(error, ViewerError) and "60 s" in error.message
    assert h.viewer.terminated
    assert h.reactor.getDelayedCalls() == []


def test_hello_timeout_is_device_rejected():
    h = Harness(hello_timeout=30)
    h.viewer_connects()
    h.reactor.advance(30)
    error = h.result()
    assert isinstance(error, DeviceRejected) and "--hello-timeout" in error.message
    assert not h.links[0].transport.connected
    assert h.reactor.getDelayedCalls() == []


def test_device_closing_before_the_hello_means_rejected_password():
    h = Harness()
    viewer = h.viewer_connects()
    h.links[0].transport.loseConnection()
    error = h.result()
    assert isinstance(error, DeviceRejected)
    assert "wrong or expired password" in error.message
    assert not viewer.transport.connected
    assert viewer.transport.value() == b""


def test_garbage_instead_of_hello_is_rejected_at_once():
    h = Harness()
    viewer = h.viewer_connects()
    h.links[0].dataReceived(b"HTTP/1.1 400")
    assert isinstance(h.result(), DeviceRejected)
    assert viewer.transport.value() == b""


def test_idle_timeout_closes_a_silent_session():
    h = Harness(idle_timeout=10)
    viewer = h.viewer_connects()
    h.links[0].dataReceived(b"RFB 003.008\n")
    h.reactor.advance(6)
    viewer.dataReceived(b"x")  # traffic resets the idle period
    h.reactor.advance(6)
    assert h.outcome == []
    h.reactor.advance(4)
    closed = h.result()
    assert isinstance(closed, events.Closed) and closed.reason == "idle for 10 s"
    assert h.reactor.getDelayedCalls() == []


def test_device_dropping_the_idle_connection_is_reopened_for_the_viewer():
    h = Harness()
    first = h.links[0]
    first.transport.loseConnection()  # the device gave up waiting
    assert h.outcome == []
    h.viewer_connects()
    assert len(h.links) == 2
    assert first.commands == []  # the password went only to the new, pinned link
    assert h.links[1].commands == [f"PROCYCMD PW_{PASSWORD}".encode()]
    assert h.names().count("pinned") == 2


def test_viewer_exiting_before_connecting_is_a_viewer_error():
    h = Harness()
    h.viewer.exited.callback(1)
    error = h.result()
    assert isinstance(error, ViewerError) and "exit status 1" in error.message


def test_stop_closes_everything_and_reports_closed():
    h = Harness()
    viewer = h.viewer_connects()
    h.links[0].dataReceived(b"RFB 003.008\n")
    h.session.stop("interrupted by SIGTERM")
    closed = h.result()
    assert isinstance(closed, events.Closed) and closed.reason == "interrupted by SIGTERM"
    assert not viewer.transport.connected and not h.links[0].transport.connected
    assert h.viewer.terminated
    assert h.reactor.getDelayedCalls() == []


def test_connect_failure_fails_the_session_before_listening():
    reactor = MemoryReactorClock()
    session = ShadowSession(reactor, SECRET, SessionOptions(device_host="10.0.0.5"),
                            dialer=lambda *a: fail(DeviceUnreachable("no route")))
    outcome: list[Any] = []
    session.start().addErrback(lambda f: outcome.append(f.value))
    assert isinstance(outcome[0], DeviceUnreachable)
    assert reactor.tcpServers == []  # never listened


class _NeverEndpoint:
    def __init__(self) -> None:
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True
        return Deferred(cancel)


def test_connect_timeout_covers_tcp():
    reactor = MemoryReactorClock()
    endpoint = _NeverEndpoint()
    outcome: list[Any] = []
    connect_pinned(reactor, "10.0.0.5", 5900, der_of(CERT), timeout=15,
                   endpoint_factory=lambda h, p, t: endpoint).addErrback(lambda f: outcome.append(f.value))
    reactor.advance(14.9)
    assert outcome == []
    reactor.advance(0.2)
    assert isinstance(outcome[0], DeviceUnreachable) and "15 s" in outcome[0].message
    assert endpoint.cancelled
    assert reactor.getDelayedCalls() == []


class _SilentTLSEndpoint:
    """TCP connects, but the 'device' never answers the ClientHello."""

    def __init__(self) -> None:
        self.transport = StringTransportWithDisconnection()

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 5900))
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        return succeed(protocol)


def test_connect_timeout_covers_the_tls_handshake():
    reactor = MemoryReactorClock()
    endpoint = _SilentTLSEndpoint()
    outcome: list[Any] = []
    connect_pinned(reactor, "10.0.0.5", 5900, der_of(CERT), timeout=15,
                   endpoint_factory=lambda h, p, t: endpoint).addErrback(lambda f: outcome.append(f.value))
    assert endpoint.transport.value()[:1] == b"\x16"  # a ClientHello went out
    reactor.advance(15)
    assert isinstance(outcome[0], TLSHandshakeError)
    assert not endpoint.transport.connected
    assert reactor.getDelayedCalls() == []


@pytest.mark.parametrize("terminator", [b"", b"\n", b"\r\n"])
def test_terminator_follows_the_command(terminator: bytes):
    h = Harness(terminator=terminator)
    h.viewer_connects()
    assert h.links[0].commands == [f"PROCYCMD PW_{PASSWORD}".encode() + terminator]


def test_listening_event_carries_the_loopback_port_and_no_warning():
    h = Harness()
    assert h.events[1] == events.Listening(host="127.0.0.1", port=40123)
    assert not [e for e in h.events if isinstance(e, events.WarningEvent)]


def test_a_non_loopback_listener_is_warned_about():
    h = Harness(listen="tcp:0:interface=0.0.0.0")
    warnings = [e for e in h.events if isinstance(e, events.WarningEvent)]
    assert len(warnings) == 1 and "not on loopback" in warnings[0].message


SECOND_PASSWORD = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def test_a_second_viewer_gets_a_fresh_password_and_its_own_device_connection():
    refreshed: list[int] = []

    def refresh() -> Deferred[ShadowSecret]:
        refreshed.append(1)
        return succeed(ShadowSecret(SECRET.certificate_der, OneTimePassword(SECOND_PASSWORD), "10.0.0.5", 5900))

    h = Harness(refresh=refresh, max_viewers=2, viewer_timeout=30)
    first = h.viewer_connects()
    h.links[0].dataReceived(b"RFB 003.008\n")
    first.transport.loseConnection()
    assert h.outcome == []  # the session waits for the next viewer
    assert h.names()[-1] == "viewer-closed"
    assert h.session.state is SessionState.LISTENING
    h.viewer_connects(port=51300)
    assert refreshed == [1]
    assert h.links[1].commands == [f"PROCYCMD PW_{SECOND_PASSWORD}".encode()]
    assert h.links[0].commands == [f"PROCYCMD PW_{PASSWORD}".encode()]  # no reuse of the used password
    h.links[1].dataReceived(b"RFB 003.008\n")
    h.links[1].transport.loseConnection()
    closed = h.result()
    assert isinstance(closed, events.Closed) and closed.reason == "device closed the connection"
    assert closed.bytes_to_viewer == 24  # both greetings
    assert h.reactor.getDelayedCalls() == []


def test_without_a_fresh_secret_a_later_viewer_is_refused_with_a_reason():
    h = Harness(max_viewers=2)
    first = h.viewer_connects()
    h.links[0].dataReceived(b"RFB 003.008\n")
    first.transport.loseConnection()
    second = h.viewer_connects(port=51301)
    assert second is not None and not second.transport.connected
    assert second.transport.value() == b""
    warning = [e for e in h.events if isinstance(e, events.WarningEvent)][-1]
    assert "one-time password was used" in warning.message
    assert len(h.links) == 1  # no new device connection, no password sent anywhere


def test_no_further_viewer_ends_the_session_normally():
    h = Harness(refresh=lambda: succeed(SECRET), max_viewers=3, viewer_timeout=20)
    first = h.viewer_connects()
    h.links[0].dataReceived(b"RFB 003.008\n")
    first.transport.loseConnection()
    h.reactor.advance(20)
    closed = h.result()
    assert isinstance(closed, events.Closed) and closed.reason == "no further viewer within 20 s"
    assert h.reactor.getDelayedCalls() == []
