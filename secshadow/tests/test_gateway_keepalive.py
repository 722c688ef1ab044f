"""Keepalive and limits on the real gateway process, with its timers shortened by flags:
pings, a silent leg dropped (and its peer closed), the client's own watchdog against a
silent gateway, the global session limit (503) and the per-session duration (4410)."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from secshadow.gateway import dialer
from secshadow.lab.harness import start_gateway
from secshadow.tests._gateway_helpers import endpoint_for, wait_until
from secshadow.tests.test_gateway_refusals import RawLeg, path

pytestmark = pytest.mark.integration


def closed_events(gateway: Any, sid: str) -> list[dict[str, Any]]:
    return [e for e in gateway.process.named("closed") if e["sid"] == sid]


def test_pings_and_a_silent_leg_is_dropped_with_its_peer(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--ping-interval", "0.5", "--idle-timeout", "2")
    try:
        sid = "silent"
        quiet = RawLeg(gateway, path(sid, "device"), gateway.mint(sid, "device"))  # never answers a ping
        polite = RawLeg(gateway, path(sid, "console"), gateway.mint(sid, "console"))
        assert quiet.frame()[0] == 1 and polite.frame()[0] == 1  # paired
        started = time.monotonic()
        pings = 0
        while True:
            opcode, payload = polite.frame()
            if opcode == 9:  # ping: answer it, as every WebSocket client does
                pings += 1
                polite.send(10, payload)
            elif opcode == 8:
                break
        waited = time.monotonic() - started
        assert struct.unpack("!H", payload[:2])[0] == 1001  # the peer is gone
        assert pings >= 2 and 1.5 <= waited < 4
        assert quiet.rest_until_eof().count(b"\x89") >= 2  # it was pinged too, then dropped
        assert wait_until(lambda: closed_events(gateway, sid))
        closed = closed_events(gateway, sid)[0]
        assert (closed["close_code"], closed["closed_by"], closed["reason"]) == (1001, "gateway", "silent for 2 s")
    finally:
        gateway.stop()


def test_global_session_limit_and_session_duration(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--max-sessions", "1", "--max-session-duration", "1")
    try:
        a = RawLeg(gateway, path("first", "console"), gateway.mint("first", "console"))
        assert a.status == 101
        full = RawLeg(gateway, path("second", "console"), gateway.mint("second", "console"))
        assert full.head.startswith("HTTP/1.1 503 gateway at its session limit")
        full.close()
        b = RawLeg(gateway, path("first", "device"), gateway.mint("first", "device"))  # same session: fine
        assert b.status == 101
        assert a.close_code() == 4410 and b.close_code() == 4410  # one second after pairing
        a.close()
        b.close()
        assert wait_until(lambda: closed_events(gateway, "first"))
        assert closed_events(gateway, "first")[0]["close_code"] == 4410
    finally:
        gateway.stop()


@pytest_twisted.ensureDeferred
async def test_the_client_drops_a_gateway_that_went_silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor

    # A gateway that never pings (as if it hung after pairing), and a client watchdog of 1.5 s.
    gateway = start_gateway(tmp_path, "--ping-interval", "3600", "--idle-timeout", "7200")
    monkeypatch.setattr(dialer, "SILENCE_LIMIT", 1.5)
    monkeypatch.setattr(dialer.wire, "PING_INTERVAL", 0.5)

    class Leg(Protocol):
        def connectionMade(self) -> None:
            self.lost: Deferred[str] = Deferred()
            self.at = 0.0

        def connectionLost(self, reason: Any = None) -> None:
            self.at = time.monotonic()
            self.lost.callback(reason.getErrorMessage())

    try:
        device = endpoint_for(reactor, gateway, "hung", "device").connect(Factory.forProtocol(Leg))
        console = await endpoint_for(reactor, gateway, "hung", "console").connect(Factory.forProtocol(Leg))
        device_leg = await device
        paired_at = time.monotonic()
        messages = [await console.lost, await device_leg.lost]
        # Whichever leg's watchdog fires first drops its stream; the gateway then closes the other.
        assert any("no byte from the gateway for too long" in m for m in messages), messages
        first = min(console.at, device_leg.at)
        assert 1.0 <= first - paired_at < 4  # silence counts from the last byte, "paired"
    finally:
        gateway.stop()
    assert [c for c in reactor.getDelayedCalls() if "LoopingCall" in repr(c.func)] == []  # type: ignore[attr-defined]
