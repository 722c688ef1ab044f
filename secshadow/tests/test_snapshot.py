"""The scripted RFB client: a tiny in-process RFB server (RFC 6143) for the unit tests,
real Xvnc for the integration test."""

from __future__ import annotations

import os
import stat
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


# ------------------------------------------------------------------ the file it writes (issue 9)
async def snapshot_to(path: Path) -> tuple[int, int]:
    from twisted.internet import reactor

    port = await serve("ok")
    try:
        return await take_snapshot(reactor, "127.0.0.1", port.getHost().port, path, timeout=5)
    finally:
        await port.stopListening()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_snapshot_file_is_private_whatever_the_umask(tmp_path: Path, umask_022: None) -> None:
    """The PNG shows the device's screen: mode 0600 under umask 022, also when it replaces
    an older 0644 file of the user's own, and no temporary file is left behind."""
    fresh = tmp_path / "fresh.png"
    await snapshot_to(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    old = tmp_path / "old.png"
    old.write_bytes(b"yesterday")
    old.chmod(0o644)
    await snapshot_to(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.png", "old.png"]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_planted_symlink_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """``--snapshot shot.png`` where shot.png is a symbolic link (to a file another user
    wants overwritten): refused with a reason; the link and its target stay as they were."""
    target = tmp_path / "victim.txt"
    target.write_bytes(b"precious")
    link = tmp_path / "shot.png"
    link.symlink_to(target)
    with pytest.raises(SnapshotError, match="is a symbolic link") as info:
        await snapshot_to(link)
    assert str(link) in str(info.value)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png", "victim.txt"]


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user owns needs root (chown)")
@pytest_twisted.ensureDeferred
async def test_a_file_owned_by_another_user_is_not_replaced(tmp_path: Path) -> None:
    """A file planted under the name by another user (uid 65534) is refused, unchanged,
    still theirs, and so is a symbolic link that user planted."""
    planted = tmp_path / "shot.png"
    planted.write_bytes(b"theirs")
    os.chown(planted, 65534, 65534)
    with pytest.raises(SnapshotError, match="belongs to another user") as info:
        await snapshot_to(planted)
    assert "uid 65534" in str(info.value)
    assert planted.read_bytes() == b"theirs" and planted.stat().st_uid == 65534
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    os.lchown(link, 65534, 65534)
    with pytest.raises(SnapshotError, match="is a symbolic link"):
        await snapshot_to(link)
    assert link.is_symlink() and not (tmp_path / "elsewhere.png").exists()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_stopped_snapshot_says_why(tmp_path: Path) -> None:
    """Stopping the snapshot (the session ended, SIGTERM) before a frame came gives a
    SnapshotError with a reason, never an empty one (the CLI printed "--snapshot failed: ")."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    port = await serve("silent")
    try:
        d = take_snapshot(reactor, "127.0.0.1", port.getHost().port, tmp_path / "x.png", timeout=30)
        await deferLater(reactor, 0.3, lambda: None)
        d.cancel()
        with pytest.raises(SnapshotError) as info:
            await d
        assert str(info.value) == f"snapshot client: stopped before a full frame arrived from 127.0.0.1:" \
                                  f"{port.getHost().port}"
        assert not (tmp_path / "x.png").exists()
    finally:
        await port.stopListening()
    assert [c for c in reactor.getDelayedCalls() if c.active() and c.getTime() > reactor.seconds() + 20] == []


def test_an_unwritable_destination_gives_a_reason(tmp_path: Path) -> None:
    """Every refusal names the file and says why (never an empty reason)."""
    from secshadow.snapshot import check_destination

    with pytest.raises(SnapshotError, match="no such directory") as info:
        check_destination(tmp_path / "missing" / "x.png")
    assert str(tmp_path / "missing" / "x.png") in str(info.value)
    with pytest.raises(SnapshotError, match="not a regular file"):
        check_destination(tmp_path)
