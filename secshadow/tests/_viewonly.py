"""Helpers for the view-only integration tests: a blocking RFB 3.8 client (security
None), every client message type as bytes, and what the device's X display shows
(``xdotool getmouselocation``, an ``xev`` window that records input reaching it).

The client is written from RFC 6143 (sections 7.1 to 7.6) and the community RFB
specification (github.com/rfbproto/rfbproto) for the extensions; it shares no code with
``secshadow.rfbfilter``.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

#: Pseudo-encodings the hostile client asks for so that the device accepts the messages
#: that need them (rfbproto: EnableContinuousUpdates needs -313, ClientFence -312).
CONTINUOUS_UPDATES = -313
FENCE = -312
RAW = 0
#: Pseudo-encodings view-only strips (PROTOCOL.md section 7), asked for by the hostile client.
STRIPPED = (-257, -258, -259, -305, -308, -309, -316, 0xC0A1E5CE - (1 << 32))

XK_a, XK_Return = 0x61, 0xFF0D


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    pixel_format: bytes  # 16 bytes, RFC 6143 7.4
    name: bytes

    @property
    def bytes_per_pixel(self) -> int:
        return self.pixel_format[0] // 8


class RFBClient:
    """A blocking RFB 3.8 client with security type None (what the lab's Xvnc offers).

    ``connect()`` opens the socket; :meth:`handshake` runs RFC 6143 7.1-7.3 with the
    given ClientInit shared flag and returns the :class:`ServerInit`. Reads raise
    ``ConnectionError`` when the peer closes and ``TimeoutError`` after ``timeout``
    seconds.
    """

    def __init__(self, host: str, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.init: ServerInit | None = None

    # ------------------------------------------------------------ reading
    def recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"the server closed the connection after {len(data)} of {n} bytes")
            data += chunk
        return data

    def _u8(self) -> int:
        return self.recv_exactly(1)[0]

    def _u16(self) -> int:
        return int(struct.unpack(">H", self.recv_exactly(2))[0])

    def _u32(self) -> int:
        return int(struct.unpack(">I", self.recv_exactly(4))[0])

    # ------------------------------------------------------------ handshake
    def handshake(self, shared: bool = True) -> ServerInit:
        version = self.recv_exactly(12)
        if not version.startswith(b"RFB 003."):
            raise ConnectionError(f"not an RFB server: {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        count = self._u8()
        if count == 0:
            raise ConnectionError("the server refused: " + self.recv_exactly(self._u32()).decode(errors="replace"))
        types = self.recv_exactly(count)
        if 1 not in types:
            raise ConnectionError(f"the server does not offer security None: {list(types)}")
        self.sock.sendall(b"\x01")
        if self._u32() != 0:
            raise ConnectionError("SecurityResult failed: " + self.recv_exactly(self._u32()).decode(errors="replace"))
        self.sock.sendall(b"\x01" if shared else b"\x00")
        width, height = self._u16(), self._u16()
        pixel_format = self.recv_exactly(16)
        name = self.recv_exactly(self._u32())
        self.init = ServerInit(width, height, pixel_format, name)
        return self.init

    # ------------------------------------------------------------ sending
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        self.send(pointer_event(x, y, buttons))

    def click(self, x: int, y: int) -> None:
        self.pointer(x, y)
        self.pointer(x, y, 1)
        self.pointer(x, y, 0)

    def type_key(self, keysym: int) -> None:
        self.send(key_event(keysym, True) + key_event(keysym, False))

    # ------------------------------------------------------------ updates
    def full_update(self) -> int:
        """Ask for the whole screen (non-incremental) and read server messages until one
        FramebufferUpdate arrived; returns its number of rectangles. A round trip that
        proves everything sent before it went through the proxy and was read by the server."""
        assert self.init is not None
        self.send(update_request(False, 0, 0, self.init.width, self.init.height))
        return self.read_update()

    def read_update(self) -> int:
        """Read server messages until a FramebufferUpdate; returns its number of rectangles."""
        while True:
            kind, value = self.read_message()
            if kind == 0:
                return int(value)

    def sync(self, payload: bytes = b"sync") -> None:
        """Send a ClientFence request (after SetEncodings with :data:`FENCE`) and read
        until the server's answering ServerFence: the server has then read every
        message sent before it (rfbproto, "ClientFence")."""
        self.send(struct.pack(">BxxxIB", 248, 0x80000000, len(payload)) + payload)
        while True:
            kind, value = self.read_message()
            if kind == 248 and value == payload:
                return

    def read_message(self) -> tuple[int, object]:
        """One server message: ``(type, rectangles)`` for an update, ``(248, payload)``
        for a ServerFence, ``(type, None)`` for the others (their bytes are skipped)."""
        kind = self._u8()
        if kind == 0:  # FramebufferUpdate (RFC 6143 7.6.1)
            self.recv_exactly(1)
            rects = self._u16()
            for _ in range(rects):
                _x, _y, w, h = struct.unpack(">HHHH", self.recv_exactly(8))
                (encoding,) = struct.unpack(">i", self.recv_exactly(4))
                if encoding == RAW:
                    assert self.init is not None
                    self.recv_exactly(w * h * self.init.bytes_per_pixel)
                elif encoding not in (-223, -224):  # DesktopSize, LastRect: no payload
                    raise ConnectionError(f"unexpected encoding {encoding} in an update")
            return 0, rects
        if kind == 1:  # SetColourMapEntries
            self.recv_exactly(3)
            self.recv_exactly(6 * self._u16())
        elif kind == 3:  # ServerCutText
            self.recv_exactly(3)
            self.recv_exactly(self._u32())
        elif kind == 248:  # ServerFence (rfbproto): 3 pad, U32 flags, U8 length, payload
            self.recv_exactly(3)
            flags = self._u32()
            payload = self.recv_exactly(self._u8())
            if flags & 0x80000000:  # a request (TigerVNC measures the link with them): answer it
                self.send(struct.pack(">BxxxIB", 248, flags & 0x7, len(payload)) + payload)
                return 248, None
            return 248, payload
        elif kind not in (2, 150):  # Bell, EndOfContinuousUpdates: the type byte only
            raise ConnectionError(f"unexpected server message type {kind}")
        return kind, None

    def wait_closed(self, timeout: float = 20.0) -> bool:
        """Read (and discard) until the server closes; False if it is still open after
        ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RFBClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- client messages

def pointer_event(x: int, y: int, buttons: int = 0) -> bytes:
    return struct.pack(">BBHH", 5, buttons, x, y)


def key_event(keysym: int, down: bool) -> bytes:
    return struct.pack(">BBxxI", 4, 1 if down else 0, keysym)


def update_request(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, 1 if incremental else 0, x, y, w, h)


def set_encodings(encodings: list[int]) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings)


def every_client_message(init: ServerInit, at: tuple[int, int]) -> list[tuple[int, str, bytes]]:
    """One or more messages of every client message type PROTOCOL.md section 7 lists,
    as ``(type, label, bytes)``; the input ones click, type and move to ``at``.
    Messages that reach the device are valid for it (its own pixel format, the encodings
    continuous updates and fences need)."""
    x, y = at
    w, h = init.width, init.height
    text = b"typed into the clipboard " * 40_000  # 1 MB, skipped as it streams
    return [
        (0, "SetPixelFormat (the device's own)", b"\x00\x00\x00\x00" + init.pixel_format),
        (2, "SetEncodings Raw, ContinuousUpdates, Fence + the 8 stripped pseudo-encodings",
         set_encodings([RAW, CONTINUOUS_UPDATES, FENCE, *STRIPPED])),
        (3, "FramebufferUpdateRequest incremental", update_request(True, 0, 0, w, h)),
        (4, "KeyEvent 'a' down/up, Return down/up",
         key_event(XK_a, True) + key_event(XK_a, False) + key_event(XK_Return, True)
         + key_event(XK_Return, False)),
        (5, "PointerEvent move, button 1 down/up, button 3 down/up, wheel",
         pointer_event(x, y) + pointer_event(x, y, 1) + pointer_event(x, y, 0) + pointer_event(x, y, 4)
         + pointer_event(x, y, 0) + pointer_event(x, y, 8) + pointer_event(x, y, 0)),
        (6, "ClientCutText of 1 000 000 bytes", struct.pack(">BxxxI", 6, len(text)) + text),
        (150, "EnableContinuousUpdates", struct.pack(">BBHHHH", 150, 1, 0, 0, w, h)),
        (248, "ClientFence request, 4-byte payload", struct.pack(">BxxxIB", 248, 0x80000000 | 3, 4) + b"abcd"),
        (250, "xvp reboot", struct.pack(">BxBB", 250, 1, 4)),
        (251, "SetDesktopSize 320x240, one screen",
         struct.pack(">BxHHBx", 251, 320, 240, 1) + struct.pack(">IHHHHI", 0, 0, 0, 320, 240, 0)),
        (253, "gii injection event, absolute pointer (big endian)",
         struct.pack(">BBH", 253, 0x80, 24) + struct.pack(">BBHI", 24, 13, 0, 0) + bytes(16)),
        (255, "QEMU Extended Key Event 'a' down/up",
         struct.pack(">BBHII", 255, 0, 1, XK_a, 30) + struct.pack(">BBHII", 255, 0, 0, XK_a, 30)),
        (255, "QEMU Audio enable, set format", struct.pack(">BBH", 255, 1, 0) + struct.pack(">BBHBBI", 255, 1, 2, 3, 2, 44100)),
    ]


#: A client message type that neither RFC 6143 nor rfbproto defines.
UNKNOWN_TYPE = 0x7B


# ---------------------------------------------------------------- the device's X display

def _xdotool(display: str, *args: str) -> str:
    env = {"DISPLAY": display, "PATH": "/usr/bin:/bin:/usr/local/bin"}
    return subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=20,
                          check=True).stdout


def pointer_at(display: str) -> tuple[int, int]:
    """Where the X pointer is on ``display`` (``xdotool getmouselocation``)."""
    values = dict(line.split("=", 1) for line in _xdotool(display, "getmouselocation", "--shell").split())
    return int(values["X"]), int(values["Y"])


def move_pointer(display: str, x: int, y: int) -> None:
    """Move the X pointer locally on ``display`` (the device's own user, not RFB)."""
    _xdotool(display, "mousemove", "--sync", str(x), str(y))


_XEV_EVENT = re.compile(r"^(\w+) event, serial")


class InputProbe:
    """An ``xev`` window on the device's display that records the keyboard, button and
    motion events reaching it; it holds the keyboard focus, so any key the device gets
    lands here. ``geometry``: ``(x, y, width, height)`` on the display."""

    NAME = "secshadow-input-probe"

    def __init__(self, display: str, workdir: Path, geometry: tuple[int, int, int, int]) -> None:
        self.display = display
        self.geometry = geometry
        self.log = workdir / f"xev-{time.monotonic_ns()}.log"
        x, y, w, h = geometry
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                ["xev", "-display", display, "-geometry", f"{w}x{h}+{x}+{y}", "-name", self.NAME,
                 "-event", "keyboard", "-event", "button", "-event", "mouse"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        window = _xdotool(display, "search", "--sync", "--onlyvisible", "--name", self.NAME).split()[0]
        _xdotool(display, "windowfocus", "--sync", window)
        self.window = window

    @property
    def centre(self) -> tuple[int, int]:
        x, y, w, h = self.geometry
        return x + w // 2, y + h // 2

    def events(self) -> list[str]:
        """Names of the input events xev printed so far, e.g. ``["MotionNotify", "KeyPress"]``."""
        text = self.log.read_text(errors="replace")
        return [m.group(1) for line in text.splitlines() if (m := _XEV_EVENT.match(line))
                and m.group(1) in ("KeyPress", "KeyRelease", "ButtonPress", "ButtonRelease", "MotionNotify")]

    def settle(self, seconds: float = 0.5) -> list[str]:
        """The events after ``seconds`` of quiet (xev prints as they come)."""
        time.sleep(seconds)
        return self.events()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
