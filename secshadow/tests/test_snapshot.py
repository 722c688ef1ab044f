"""The scripted RFB client: a tiny in-process RFB server (RFC 6143) for the unit tests,
real Xvnc for the integration test."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from secshadow.errors import ViewerError
from secshadow.snapshot import SnapshotError, read_pixel, take_snapshot
from secshadow.tests.conftest import require_program

WIDTH, HEIGHT = 8, 4
COLOUR = (200, 30, 90)
# 32 bpp, depth 24, little endian, true colour, 8 bits each, red at bit 16 (bytes B, G, R, X).
PIXEL_FORMAT = struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class FakeRFBServer(Protocol):
    """RFB 3.8, security type None, answers every update request with one RAW rectangle.

    ``mode``: "ok", "garbage" (not RFB), "close" (closes after the version), "silent"
    (never answers the update request), "vnc-auth" (offers only VNC Authentication).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.buffer = b""
        self.stage = "version"

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad\r\n" if self.mode == "garbage" else b"RFB 003.008\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self._step():
            pass

    def _take(self, count: int) -> bytes | None:
        if len(self.buffer) < count:
            return None
        chunk, self.buffer = self.buffer[:count], self.buffer[count:]
        return chunk

    def _step(self) -> bool:
        write = self.transport.write  # type: ignore[union-attr]
        if self.stage == "version":
            if self._take(12) is None:
                return False
            if self.mode == "close":
                self.transport.loseConnection()  # type: ignore[union-attr]
                return False
            write(b"\x01\x02" if self.mode == "vnc-auth" else b"\x01\x01")
            self.stage = "security"
            return True
        if self.stage == "security":
            if self._take(1) is None:
                return False
            if self.mode == "vnc-auth":
                write(b"\x00" * 16)  # challenge
                self.stage = "done"
                return False
            write(struct.pack("!I", 0))
            self.stage = "client-init"
            return True
        if self.stage == "client-init":
            if self._take(1) is None:
                return False
            name = b"fake"
            write(struct.pack("!HH", WIDTH, HEIGHT) + PIXEL_FORMAT + struct.pack("!I", len(name)) + name)
            self.stage = "messages"
            return True
        if self.stage == "messages" and self.buffer:
            kind = self.buffer[0]
            if kind == 0:  # SetPixelFormat
                return self._take(20) is not None
            if kind == 2:  # SetEncodings
                if len(self.buffer) < 4:
                    return False
                (count,) = struct.unpack("!H", self.buffer[2:4])
                return self._take(4 + 4 * count) is not None
            if kind == 3:  # FramebufferUpdateRequest
                if self._take(10) is None:
                    return False
                if self.mode != "silent":
                    r, g, b = COLOUR
                    pixels = bytes([b, g, r, 0]) * (WIDTH * HEIGHT)
                    write(struct.pack("!BxH", 0, 1) + struct.pack("!HHHHi", 0, 0, WIDTH, HEIGHT, 0) + pixels)
                return True
            self.transport.loseConnection()  # type: ignore[union-attr]
        return False


async def serve(mode: str) -> Any:
    from twisted.internet import reactor

    return reactor.listenTCP(0, Factory.forProtocol(lambda: FakeRFBServer(mode)), interface="127.0.0.1")  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_snapshot_of_a_fake_rfb_server(tmp_path: Path) -> None:
    from twisted.internet import reactor

    port = await serve("ok")
    try:
        path = tmp_path / "frame.png"
        size = await take_snapshot(reactor, "127.0.0.1", port.getHost().port, path, timeout=5)
        assert size == (WIDTH, HEIGHT)
        assert read_pixel(path, 0, 0) == COLOUR
        assert read_pixel(path, WIDTH - 1, HEIGHT - 1) == COLOUR
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "not a usable RFB server"),
        ("close", "closed the connection before a full frame"),
        ("silent", "no full frame"),
        ("vnc-auth", "asks for a VNC password"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_snapshot_failures(tmp_path: Path, mode: str, message: str) -> None:
    from twisted.internet import reactor

    port = await serve(mode)
    try:
        with pytest.raises(SnapshotError, match=message) as info:
            await take_snapshot(reactor, "127.0.0.1", port.getHost().port, tmp_path / "x.png", timeout=1)
        assert isinstance(info.value, ViewerError)
        assert str(info.value).startswith("snapshot client: ")
        assert not (tmp_path / "x.png").exists()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_snapshot_connection_refused(tmp_path: Path) -> None:
    from twisted.internet import reactor

    port = await serve("ok")
    number = port.getHost().port
    await port.stopListening()
    with pytest.raises(SnapshotError, match="cannot connect"):
        await take_snapshot(reactor, "127.0.0.1", number, tmp_path / "x.png", timeout=2)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_snapshot_of_real_xvnc(tmp_path: Path) -> None:
    """A real Xvnc screen: the pixel at a background spot is the colour xsetroot painted."""
    require_program("Xvnc")
    require_program("xsetroot")
    from twisted.internet import reactor

    from secshadow.lab.vnc import run_xvnc

    with run_xvnc(background="#1f6feb") as server:
        path = tmp_path / "xvnc.png"
        size = await take_snapshot(reactor, "127.0.0.1", server.rfb_port, path, timeout=15)
        assert size == (640, 480)
        assert read_pixel(path, *server.background_point) == (0x1F, 0x6F, 0xEB)
        if server.helpers:
            # The label window (white, top left) is there too: the frame is the real screen.
            assert read_pixel(path, 100, 47) == (255, 255, 255)
