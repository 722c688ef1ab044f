"""The device emulator in-process: real TLS on 127.0.0.1, a fake password checker and a
fake VNC server in the same reactor (PROTOCOL.md section 2, device side)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer

from secshadow.lab import certs
from secshadow.lab.device.emulator import DeviceEmulator, OneShotPasswordChecker
from secshadow.lab.device.firmware import get_profile
from secshadow.secret import OneTimePassword
from secshadow.tests._device_helpers import (
    HELLO,
    PASSWORD,
    AnyCertClientCreator,
    EventLog,
    FakeVNCServer,
    connect_tls,
    sleep,
)

COMMAND = b"PROCYCMD PW_" + PASSWORD.encode("ascii")


@pytest.fixture(scope="module")
def device_pair() -> tuple[bytes, bytes]:
    return certs.generate_self_signed()


class Rig:
    """A running emulator with a fake VNC server behind it."""

    def __init__(self, reactor: Any, emulator: DeviceEmulator, events: EventLog, vnc: FakeVNCServer,
                 device_port: int, vnc_port: Any) -> None:
        self.reactor = reactor
        self.emulator = emulator
        self.events = events
        self.vnc = vnc
        self.device_port = device_port
        self.vnc_port = vnc_port


async def start_rig(device_pair: tuple[bytes, bytes], checker: Any = None, profile: Any = None,
                    vnc_extra: bytes = b"", vnc_port: int | None = None) -> Rig:
    from twisted.internet import reactor

    vnc = FakeVNCServer(vnc_extra)
    listening_vnc = reactor.listenTCP(0, vnc, interface="127.0.0.1")  # type: ignore[attr-defined]
    events = EventLog()
    emulator = DeviceEmulator(
        reactor,
        profile or get_profile("current"),
        *device_pair,
        checker or OneShotPasswordChecker(OneTimePassword(PASSWORD)),
        vnc_host="127.0.0.1",
        vnc_port=vnc_port or listening_vnc.getHost().port,
        on_event=events,
    )
    port = await emulator.listen("tcp:0:interface=127.0.0.1")
    return Rig(reactor, emulator, events, vnc, port.getHost().port, listening_vnc)  # type: ignore[attr-defined]


async def stop_rig(rig: Rig) -> None:
    await rig.emulator.stop()
    for connection in rig.vnc.connections:
        connection.transport.loseConnection()  # type: ignore[union-attr]
    await rig.vnc_port.stopListening()
    await sleep(rig.reactor, 0.01)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_good_password_relays_the_vnc_server(device_pair: tuple[bytes, bytes]) -> None:
    rig = await start_rig(device_pair, vnc_extra=b"\x00" * 200_000)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        received = await client.wait_bytes(12 + 200_000).addTimeout(5, rig.reactor)
        assert received[:12] == HELLO
        assert len(received) == 12 + 200_000
        client.transport.write(HELLO)  # type: ignore[union-attr]
        await sleep(rig.reactor, 0.1)
        assert [c.received for c in rig.vnc.connections] == [HELLO]
        client.transport.loseConnection()  # type: ignore[union-attr]
        closed = await rig.events.wait("app-bytes", rig.reactor)
        assert closed["count"] == len(COMMAND) + len(HELLO)
        names = [e["event"] for e in rig.events.events]
        assert names == ["listening", "connection", "tls", "procycmd", "vnc-connected", "app-bytes"]
        assert rig.events.named("procycmd") == [{"event": "procycmd", "accepted": True, "reason": "ok"}]
        assert rig.events.named("tls")[0]["version"] in ("TLSv1.2", "TLSv1.3")
        assert PASSWORD not in repr(rig.events.events)
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_wrong_password_closes_without_a_byte(device_pair: tuple[bytes, bytes]) -> None:
    rig = await start_rig(device_pair)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(b"PROCYCMD PW_" + b"0" * 36)  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        assert rig.vnc.connections == []
        assert rig.events.named("procycmd") == [
            {"event": "procycmd", "accepted": False, "reason": "wrong password"}
        ]
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_password_is_valid_once(device_pair: tuple[bytes, bytes]) -> None:
    rig = await start_rig(device_pair)
    try:
        first = await connect_tls(rig.reactor, rig.device_port)
        first.transport.write(COMMAND)  # type: ignore[union-attr]
        assert (await first.wait_bytes(12).addTimeout(5, rig.reactor)) == HELLO
        second = await connect_tls(rig.reactor, rig.device_port)
        second.transport.write(COMMAND)  # type: ignore[union-attr]
        await second.closed.addTimeout(5, rig.reactor)
        assert second.received == b""
        assert [e["accepted"] for e in rig.events.named("procycmd")] == [True, False]
        first.transport.loseConnection()  # type: ignore[union-attr]
        await first.closed
    finally:
        await stop_rig(rig)


class ManualChecker:
    """A checker whose answer the test gives later (a slow IMI server)."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[bool]] = []
        self.seen: list[str] = []

    def __call__(self, password: str) -> defer.Deferred[bool]:
        self.seen.append(password)
        waiting: defer.Deferred[bool] = defer.Deferred()
        self.pending.append(waiting)
        return waiting


@pytest.mark.integration
@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
@pytest.mark.parametrize("when", ["same-segment", "during-check", "after-hello", "split-crlf"])
@pytest_twisted.ensureDeferred
async def test_terminators(device_pair: tuple[bytes, bytes], terminator: bytes, when: str) -> None:
    """LF/CRLF after the password, in the same or a later segment, never reaches the VNC server."""
    checker = ManualChecker()
    rig = await start_rig(device_pair, checker=checker)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        write = client.transport.write  # type: ignore[union-attr]
        if when == "same-segment":
            write(COMMAND + terminator)
        elif when == "split-crlf":
            write(COMMAND + terminator[:1])
            await sleep(rig.reactor, 0.05)
            write(terminator[1:])
        else:
            write(COMMAND)
        for _ in range(100):
            if checker.pending:
                break
            await sleep(rig.reactor, 0.01)
        assert checker.seen == [PASSWORD]
        if when == "during-check":
            write(terminator)
            await sleep(rig.reactor, 0.05)
        checker.pending[0].callback(True)
        assert (await client.wait_bytes(12).addTimeout(5, rig.reactor)) == HELLO
        if when == "after-hello":
            write(terminator)
            await sleep(rig.reactor, 0.05)
        write(HELLO + b"\x01")
        await sleep(rig.reactor, 0.1)
        assert [c.received for c in rig.vnc.connections] == [HELLO + b"\x01"]
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
@pytest_twisted.ensureDeferred
async def test_firmware_that_requires_a_terminator(device_pair: tuple[bytes, bytes], terminator: bytes) -> None:
    rig = await start_rig(device_pair, profile=get_profile("current-lf"))
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        await sleep(rig.reactor, 0.1)
        assert rig.events.named("procycmd") == []  # still waiting for the terminator
        client.transport.write(terminator + HELLO)  # type: ignore[union-attr]
        assert (await client.wait_bytes(12).addTimeout(5, rig.reactor)) == HELLO
        await sleep(rig.reactor, 0.1)
        assert [c.received for c in rig.vnc.connections] == [HELLO]
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"RFB 003.008\n", b"PROCYCMD PW_" + b"\x00" * 36, b"procycmd pw_x"],
    ids=["http", "rfb", "control-chars", "lower-case"],
)
@pytest_twisted.ensureDeferred
async def test_garbage_command_is_closed(device_pair: tuple[bytes, bytes], garbage: bytes) -> None:
    checker = ManualChecker()
    rig = await start_rig(device_pair, checker=checker)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(garbage)  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        assert checker.seen == []
        assert rig.events.named("procycmd") == [{"event": "procycmd", "accepted": False, "reason": "malformed"}]
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_silent_console_times_out(device_pair: tuple[bytes, bytes]) -> None:
    profile = dataclasses.replace(get_profile("current"), command_timeout=0.3)
    rig = await start_rig(device_pair, profile=profile)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(b"PROCYCMD PW_464a")  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        closed = await rig.events.wait("app-bytes", rig.reactor)
        assert closed == {"event": "app-bytes", "count": 16, "reason": "command timeout"}
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_checker_error_counts_as_refusal(device_pair: tuple[bytes, bytes]) -> None:
    def broken(password: str) -> defer.Deferred[bool]:
        return defer.fail(RuntimeError("IMI server unreachable"))

    rig = await start_rig(device_pair, checker=broken)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        assert rig.events.named("procycmd")[0]["reason"] == "check failed"
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_local_user_refuses(device_pair: tuple[bytes, bytes]) -> None:
    profile = dataclasses.replace(get_profile("current-refuse"), refuse_after=0.2)
    rig = await start_rig(device_pair, profile=profile)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        assert rig.vnc.connections == []
        assert rig.events.named("consent") == [{"event": "consent", "allowed": False}]
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_consent_delay(device_pair: tuple[bytes, bytes]) -> None:
    profile = dataclasses.replace(get_profile("current-consent"), consent_delay=0.3)
    rig = await start_rig(device_pair, profile=profile)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        started = rig.reactor.seconds()
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        assert (await client.wait_bytes(12).addTimeout(5, rig.reactor)) == HELLO
        assert rig.reactor.seconds() - started >= 0.25
        assert rig.events.named("consent") == [{"event": "consent", "allowed": True}]
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_vnc_server_down_closes_silently(device_pair: tuple[bytes, bytes]) -> None:
    from twisted.internet import reactor

    spare = reactor.listenTCP(0, FakeVNCServer(), interface="127.0.0.1")  # type: ignore[attr-defined]
    dead_port = spare.getHost().port
    await spare.stopListening()
    rig = await start_rig(device_pair, vnc_port=dead_port)
    try:
        client = await connect_tls(rig.reactor, rig.device_port)
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        closed = await rig.events.wait("app-bytes", rig.reactor)
        assert closed["reason"] == "VNC server unreachable"
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_tls13_only_firmware_refuses_tls12(device_pair: tuple[bytes, bytes]) -> None:
    rig = await start_rig(device_pair, profile=get_profile("tls13-only"))
    try:
        client = await connect_tls(rig.reactor, rig.device_port, AnyCertClientCreator(SSL.TLS1_2_VERSION))
        client.transport.write(COMMAND)  # type: ignore[union-attr]
        await client.closed.addTimeout(5, rig.reactor)
        assert client.received == b""
        closed = await rig.events.wait("app-bytes", rig.reactor)
        assert closed == {"event": "app-bytes", "count": 0, "reason": "TLS handshake failed or was not completed"}
        assert rig.events.named("tls") == []
    finally:
        await stop_rig(rig)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_stop_closes_open_connections(device_pair: tuple[bytes, bytes]) -> None:
    rig = await start_rig(device_pair)
    client = await connect_tls(rig.reactor, rig.device_port)
    await client.handshake.addTimeout(5, rig.reactor)
    await stop_rig(rig)
    await client.closed.addTimeout(5, rig.reactor)
    assert client.received == b""
