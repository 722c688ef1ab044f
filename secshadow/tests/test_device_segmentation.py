"""Property: however TCP/TLS splits the console's bytes, the VNC server receives exactly
the console's RFB bytes (never the command, never a stray LF/CRLF terminator).

Runs the emulator's connection protocol on in-memory transports (``StringTransport``,
``MemoryReactorClock``) with a synchronous checker, so hypothesis can try many splits.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from secshadow.lab import certs
from secshadow.lab.device.emulator import DeviceEmulator
from secshadow.lab.device.firmware import get_profile
from secshadow.tests._device_helpers import HELLO, PASSWORD

PAIR = certs.generate_self_signed("ecdsa-p256")
COMMAND = b"PROCYCMD PW_" + PASSWORD.encode("ascii")


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects instantly to an in-memory "VNC server" transport."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


def run(profile_name: str, stream: bytes, cuts: list[int]) -> tuple[StringTransport, MemoryEndpoint, list[str]]:
    endpoint = MemoryEndpoint()
    events: list[str] = []
    emulator = DeviceEmulator(
        MemoryReactorClock(), get_profile(profile_name), *PAIR,
        lambda password: succeed(password == PASSWORD),
        vnc_endpoint=endpoint, on_event=lambda event: events.append(event.name),
    )
    connection = emulator.factory.buildProtocol(None)
    console = StringTransport()
    connection.makeConnection(console)
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        if cut > start:
            connection.dataReceived(stream[start:cut])
            start = cut
    return console, endpoint, events


@settings(max_examples=200, deadline=None)
@given(
    terminator=st.sampled_from([b"", b"\n", b"\r\n"]),
    rfb=st.binary(max_size=40).map(lambda tail: HELLO + tail),
    cuts=st.lists(st.integers(min_value=1, max_value=120), max_size=8),
)
def test_any_segmentation_delivers_exactly_the_rfb_bytes(terminator: bytes, rfb: bytes, cuts: list[int]) -> None:
    console, endpoint, events = run("current", COMMAND + terminator + rfb, cuts)
    assert [t.value() for t in endpoint.transports] == [rfb]
    assert console.value() == b""  # the fake VNC server's hello is not part of this test
    assert events == ["connection", "procycmd", "vnc-connected"]


@settings(max_examples=100, deadline=None)
@given(
    terminator=st.sampled_from([b"\n", b"\r\n"]),
    cuts=st.lists(st.integers(min_value=1, max_value=70), max_size=6),
)
def test_terminator_firmware_any_segmentation(terminator: bytes, cuts: list[int]) -> None:
    _, endpoint, _ = run("current-lf", COMMAND + terminator + HELLO, cuts)
    assert [t.value() for t in endpoint.transports] == [HELLO]


@settings(max_examples=100, deadline=None)
@given(password=st.text(alphabet="0123456789abcdef-", min_size=36, max_size=36).filter(lambda p: p != PASSWORD))
def test_any_wrong_password_is_refused_without_a_byte(password: str) -> None:
    console, endpoint, events = run("current", b"PROCYCMD PW_" + password.encode() + HELLO, [])
    assert endpoint.transports == []
    assert console.value() == b""
    assert console.disconnecting
    assert events == ["connection", "procycmd"]
