"""The gateway's pairing state (secshadow.gateway.pairing) with task.Clock and fake legs."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from secshadow.events import Event
from secshadow.gateway import wire
from secshadow.gateway.pairing import Registry, Session, SessionClosed, SessionPaired
from secshadow.gateway.wire import Refusal


class FakeLeg:
    """Records what the registry asks of a leg."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.paired = 0
        self.joined: Any = None
        self.closed: tuple[int, str] | None = None
        self.aborted = False

    def send_paired(self) -> None:
        self.paired += 1

    def join(self, peer: Any) -> None:
        self.joined = peer

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted = True


class World:
    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.events: list[Event] = []
        self.registry = Registry(self.clock, self.events.append, **options)

    def join(self, sid: str, role: str, open_: bool = True) -> tuple[Session, FakeLeg]:
        leg = FakeLeg(role)
        session = self.registry.reserve(sid, role, leg)
        if open_:
            self.registry.opened(session, role)
        return session, leg

    def closed(self) -> list[SessionClosed]:
        return [e for e in self.events if isinstance(e, SessionClosed)]

    def assert_idle(self) -> None:
        assert self.registry.sessions == {}
        assert self.clock.getDelayedCalls() == []


def test_both_legs_open_pairs_them_once() -> None:
    w = World()
    session, console = w.join("S1", "console")
    w.clock.advance(2.5)
    assert console.paired == 0
    _, device = w.join("S1", "device")
    assert (console.paired, device.paired) == (1, 1)
    assert console.joined is device and device.joined is console
    assert w.events == [SessionPaired(sid="S1", wait_s=2.5)]
    assert w.clock.getDelayedCalls() == []  # the pairing timer is gone; no duration limit set


def test_reserved_but_not_open_does_not_pair() -> None:
    w = World()
    session, console = w.join("S1", "console")
    _, device = w.join("S1", "device", open_=False)
    assert console.paired == 0
    w.registry.opened(session, "device")
    assert device.paired == 1


@pytest.mark.parametrize("state", ["waiting", "paired"])
def test_a_taken_role_or_a_paired_session_is_409(state: str) -> None:
    w = World()
    w.join("S1", "console")
    if state == "paired":
        w.join("S1", "device")
    with pytest.raises(Refusal) as caught:
        w.registry.reserve("S1", "console", FakeLeg("console"))
    assert caught.value.status == 409
    if state == "paired":
        with pytest.raises(Refusal) as caught:
            w.registry.check("S1", "device")
        assert caught.value.status == 409


def test_the_session_limit_is_503_for_new_sessions_only() -> None:
    w = World(max_sessions=2)
    w.join("S1", "console")
    w.join("S2", "console")
    with pytest.raises(Refusal) as caught:
        w.registry.check("S3", "console")
    assert caught.value.status == 503
    w.join("S2", "device")  # an existing session still pairs


def test_pairing_timeout_closes_the_waiting_leg_with_4408() -> None:
    w = World(pairing_timeout=60)
    session, console = w.join("S1", "console")
    w.clock.advance(59.9)
    assert console.closed is None
    w.clock.advance(0.1)
    assert console.closed == (4408, "pairing timeout")
    with pytest.raises(Refusal):  # a late device does not join a closing session
        w.registry.check("S1", "device")
    # The console echoes the close and is gone: the session is forgotten.
    w.registry.gone(session, "console", 4408, "pairing timeout")
    [closed] = w.closed()
    assert (closed.paired, closed.close_code, closed.closed_by, closed.duration_s) == (False, 4408, "gateway", 60.0)
    w.assert_idle()


def test_a_leg_still_in_its_handshake_is_aborted_on_timeout() -> None:
    w = World(pairing_timeout=5)
    session, console = w.join("S1", "console", open_=False)
    w.clock.advance(5)
    assert console.aborted and console.closed is None
    w.registry.gone(session, "console", wire.CLOSE_ABNORMAL, "aborted")
    assert w.closed()[0].close_code == 4408
    w.assert_idle()


def test_before_pairing_a_leg_leaving_frees_only_its_role() -> None:
    w = World(pairing_timeout=30)
    session, console = w.join("S1", "console")
    w.clock.advance(10)
    w.registry.gone(session, "console", 1000, "bye")
    # No leg is left: the session is forgotten at once, with its pairing timer.
    assert [(c.sid, c.paired, c.close_code, c.closed_by) for c in w.closed()] == [("S1", False, 1000, "console")]
    w.assert_idle()
    # With a device waiting, a console may come, go and come again.
    session, device = w.join("S2", "device")
    _, c1 = w.join("S2", "console", open_=False)
    w.registry.gone(session, "console", wire.CLOSE_ABNORMAL, "lost in handshake")
    _, c2 = w.join("S2", "console")
    assert (device.paired, c2.paired, c1.paired) == (1, 1, 0)


def test_after_pairing_either_closing_closes_the_other_and_reports_the_session() -> None:
    w = World()
    session, console = w.join("S1", "console")
    _, device = w.join("S1", "device")
    w.registry.relayed(session, "console", 700)
    w.registry.relayed(session, "device", 123_456)
    w.clock.advance(12.5)
    w.registry.gone(session, "console", 1000, "viewer done")
    assert device.closed == (1000, "the console closed")
    with pytest.raises(Refusal):
        w.registry.check("S1", "console")  # closing: no new leg
    w.registry.gone(session, "device", 1000, "the console closed")
    [closed] = w.closed()
    assert closed.as_dict() == {
        "event": "closed", "sid": "S1", "paired": True, "duration_s": 12.5,
        "bytes_console_to_device": 700, "bytes_device_to_console": 123_456,
        "close_code": 1000, "closed_by": "console", "reason": "viewer done",
    }
    w.assert_idle()


def test_a_dropped_leg_closes_the_other_with_1001() -> None:
    w = World()
    session, console = w.join("S1", "console")
    _, device = w.join("S1", "device")
    w.registry.gone(session, "device", wire.CLOSE_ABNORMAL, "connection lost")
    assert console.closed == (1001, "the device is gone")
    w.registry.gone(session, "console", 1001, "the device is gone")
    assert (w.closed()[0].close_code, w.closed()[0].closed_by) == (1006, "device")


def test_a_violation_before_pairing_closes_only_that_leg_with_its_code() -> None:
    w = World(pairing_timeout=20)
    session, console = w.join("S1", "console")
    w.registry.violation(session, "console", 1008, "a binary message before paired")
    assert console.closed == (1008, "a binary message before paired")
    w.registry.gone(session, "console", 1008, "echo")
    closed = w.closed()[0]
    assert (closed.close_code, closed.closed_by, closed.reason) == (1008, "gateway", "a binary message before paired")
    w.assert_idle()


@pytest.mark.parametrize(("options", "code"), [({"max_duration": 3600}, 4410), ({"max_bytes": 1000}, 4413)])
def test_per_session_limits(options: dict[str, Any], code: int) -> None:
    w = World(**options)
    session, console = w.join("S1", "console")
    _, device = w.join("S1", "device")
    if "max_duration" in options:
        w.clock.advance(3600)
    else:
        w.registry.relayed(session, "device", 999)
        assert device.closed is None
        w.registry.relayed(session, "console", 2)
    assert console.closed is not None and console.closed[0] == code
    assert device.closed is not None and device.closed[0] == code
    w.registry.gone(session, "console", code, "")
    w.registry.gone(session, "device", code, "")
    assert (w.closed()[0].close_code, w.closed()[0].closed_by) == (code, "gateway")
    w.assert_idle()


def test_a_silent_leg_is_dropped_and_reported_as_the_gateways_1001() -> None:
    w = World()
    session, console = w.join("S1", "console")
    _, device = w.join("S1", "device")
    w.registry.silent(session, "device", 60)
    assert device.aborted
    w.registry.gone(session, "device", wire.CLOSE_ABNORMAL, "aborted")
    assert console.closed == (1001, "the device is gone")
    w.registry.gone(session, "console", 1001, "")
    closed = w.closed()[0]
    assert (closed.close_code, closed.closed_by, closed.reason) == (1001, "gateway", "silent for 60 s")


def test_stop_closes_every_leg_with_1001() -> None:
    w = World()
    s1, a = w.join("S1", "console")
    _, b = w.join("S1", "device")
    s2, c = w.join("S2", "device")
    w.registry.stop()
    assert [x.closed for x in (a, b, c)] == [(1001, "gateway shutting down")] * 3
    for session, role in ((s1, "console"), (s1, "device"), (s2, "device")):
        w.registry.gone(session, role, 1001, "")
    w.assert_idle()


def test_duplicate_gone_is_harmless() -> None:
    w = World()
    session, console = w.join("S1", "console")
    w.registry.gone(session, "console", 1000, "")
    w.registry.gone(session, "console", 1000, "")
    assert len(w.closed()) == 1
    w.assert_idle()
