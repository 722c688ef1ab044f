"""RFB helpers for the view-only filter's tests: an independent reference parser,
message builders, the hex fixtures of ``data/``, and the live captures that produce them.

Regenerate the fixtures (needs Xvfb, TigerVNC's vncviewer, xdotool, node and npm)::

    python -m secshadow.tests._rfb

This runs the installed TigerVNC viewer on a private Xvfb against :func:`capture_tigervnc`'s
scripted RFB 3.8 server and records every byte the viewer sends; and it fetches noVNC with
``npm pack @novnc/novnc`` into a temporary directory and runs noVNC's own
``RFB.prototype._sendEncodings`` under node (browser globals stubbed, a fake socket that
records bytes), once as a browser without and once with WebCodecs H.264 decoding.
"""

from __future__ import annotations

import datetime
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DATA = Path(__file__).parent / "data"
TIGERVNC_FIXTURE = DATA / "tigervnc-client-rfb38.hex"
NOVNC_FIXTURE = DATA / "novnc-setencodings.hex"

#: PROTOCOL.md section 7, written out again here so the tests check the module's constant.
STRIPPED = frozenset({-257, -258, -259, -305, -308, -309, -316, 0xC0A1E5CE - (1 << 32)})
WHITELIST = frozenset({0, 2, 3, 150, 248})

NAMES = {0: "SetPixelFormat", 2: "SetEncodings", 3: "FramebufferUpdateRequest", 4: "KeyEvent",
         5: "PointerEvent", 6: "ClientCutText", 150: "EnableContinuousUpdates", 248: "ClientFence",
         250: "xvp", 251: "SetDesktopSize", 253: "gii", 255: "QEMU"}


def s32(value: int) -> int:
    """An encoding number as the signed 32-bit value on the wire."""
    return value - (1 << 32) if value >= 1 << 31 else value


# ------------------------------------------------------------------ reference parser

def split_client_messages(data: bytes) -> list[tuple[int, bytes]]:
    """Client-to-server messages (after ClientInit) as ``(type, bytes)``; written
    independently of ``rfbfilter`` from RFC 6143 7.5 and rfbproto. Raises ValueError on
    a truncated or unknown message."""
    out = []
    pos = 0
    while pos < len(data):
        kind = data[pos]
        if kind in (0, 3, 4, 5, 150, 250):
            length = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}[kind]
        elif kind == 2:
            (count,) = struct.unpack_from(">H", data, pos + 2)
            length = 4 + 4 * count
        elif kind == 6:
            (text,) = struct.unpack_from(">I", data, pos + 4)
            length = 8 + text
        elif kind == 248:
            length = 9 + data[pos + 8]
        elif kind == 251:
            length = 8 + 16 * data[pos + 6]
        elif kind == 253:
            order = ">H" if data[pos + 1] & 0x80 else "<H"
            length = 4 + struct.unpack_from(order, data, pos + 2)[0]
        elif kind == 255 and data[pos + 1] == 0:
            length = 12
        elif kind == 255 and data[pos + 1] == 1:
            length = 10 if struct.unpack_from(">H", data, pos + 2)[0] == 2 else 4
        else:
            raise ValueError(f"unknown client message type {kind} at offset {pos}")
        if pos + length > len(data):
            raise ValueError(f"truncated message type {kind} at offset {pos}")
        out.append((kind, data[pos:pos + length]))
        pos += length
    return out


def encodings_of(message: bytes) -> list[int]:
    """The S32 encodings of a whole SetEncodings message."""
    (count,) = struct.unpack_from(">H", message, 2)
    assert len(message) == 4 + 4 * count
    return list(struct.unpack_from(f">{count}i", message, 4))


def set_encodings(encodings: list[int]) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *[s32(e) for e in encodings])


def split_device_bound(data: bytes, minor: int, security: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """What the device received from a view-only viewer: version, choice (3.7+), VNC
    response, ClientInit, then messages. Returns ``(client_init_byte, messages)``."""
    pos = 12 + (1 if minor >= 7 else 0) + (16 if security == 2 else 0)
    return data[pos:pos + 1], split_client_messages(data[pos + 1:])


# ------------------------------------------------------------------ hex fixtures

def read_hex(path: Path) -> list[tuple[bytes, str]]:
    """Lines ``HEX  # label``; ``#`` lines are notes. Returns ``(bytes, label)`` pairs."""
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        hexpart, _, label = line.partition("#")
        items.append((bytes.fromhex(hexpart.strip()), label.strip()))
    return items


def notes(path: Path) -> dict[str, str]:
    """``# key: value`` note lines of a fixture."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# ") and ": " in line:
            key, _, value = line[2:].partition(": ")
            found[key.strip()] = value.strip()
    return found


def write_hex(path: Path, header: list[str], items: list[tuple[bytes, str]]) -> None:
    lines = [f"# {h}" if h else "#" for h in header]
    lines += [f"{data.hex()}  # {label}" for data, label in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ TigerVNC, live

def label_client_stream(data: bytes) -> list[tuple[bytes, str]]:
    """Split a viewer's RFB 3.8 / security None stream into labelled messages."""
    items = [(data[:12], "ProtocolVersion"), (data[12:13], "security type"),
             (data[13:14], "ClientInit (shared flag)")]
    for kind, message in split_client_messages(data[14:]):
        label = NAMES.get(kind, str(kind))
        if kind == 2:
            label += " " + " ".join(str(e) for e in encodings_of(message))
        items.append((message, label))
    return items


SERVER_NAME = b"secshadow-capture"


def _pixel_format_big_endian() -> bytes:
    # 32 bpp, depth 24, big-endian, true colour: the viewer answers with SetPixelFormat.
    return struct.pack(">BBBBHHHBBBxxx", 32, 24, 1, 1, 255, 255, 255, 16, 8, 0)


class _Peer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""

    def read_until(self, predicate: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.received):  # type: ignore[operator]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"viewer stalled after {len(self.received)} bytes: {self.received.hex()}")
            readable, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if readable:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the viewer closed the connection")
                self.received += data

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if readable:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.received += data


def _has_messages(count: int, kind: int | None = None) -> object:
    def check(data: bytes) -> bool:
        if len(data) <= 14:
            return False
        try:
            messages = split_client_messages(data[14:])
        except (ValueError, struct.error):
            return False
        if kind is None:
            return len(messages) >= count
        return sum(1 for k, _ in messages if k == kind) >= count
    return check


def tigervnc_version() -> str:
    """The installed viewer's banner, e.g. ``TigerVNC Viewer 64-bit v1.12.0``."""
    result = subprocess.run(["vncviewer", "-h"], capture_output=True, text=True, timeout=20, check=False)
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("TigerVNC"):
            return line.strip()
    return "unknown"


def _xdotool(env: dict[str, str], *args: str) -> str:
    return subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=20,
                          check=True).stdout


@contextmanager
def _listening() -> Iterator[socket.socket]:
    server = socket.socket()
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        yield server
    finally:
        server.close()


def capture_tigervnc(workdir: Path) -> bytes:
    """Every byte TigerVNC's vncviewer sends to a scripted RFB 3.8 server (security None,
    ServerInit 64x48 big-endian, so the viewer also sends SetPixelFormat). The server
    answers the first update request, sends a ServerFence request, then ``xdotool``
    clicks and types ``a`` into the viewer's window; returns the viewer's bytes."""
    from secshadow.lab.harness import child_environment
    from secshadow.tests._screens import start_xvfb

    xvfb = start_xvfb(workdir)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = child_environment({"DISPLAY": xvfb.name, "HOME": str(home)})
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    viewer: subprocess.Popen[bytes] | None = None
    try:
        with _listening() as server:
            port = server.getsockname()[1]
            viewer = subprocess.Popen(["vncviewer", "-AlertOnFatalError=0", "-ReconnectOnError=0",
                                       f"127.0.0.1::{port}"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sock, _ = server.accept()
        with sock:
            peer = _Peer(sock)
            sock.sendall(b"RFB 003.008\n")
            peer.read_until(lambda d: len(d) >= 12, 20)
            sock.sendall(b"\x01\x01")  # one security type: None
            peer.read_until(lambda d: len(d) >= 13, 20)
            sock.sendall(struct.pack(">I", 0))  # SecurityResult OK
            peer.read_until(lambda d: len(d) >= 14, 20)
            sock.sendall(struct.pack(">HH", 64, 48) + _pixel_format_big_endian()
                         + struct.pack(">I", len(SERVER_NAME)) + SERVER_NAME)
            peer.read_until(_has_messages(1, kind=3), 20)
            # One raw rectangle covering the screen (32 bpp), then the next request.
            sock.sendall(struct.pack(">BxHHHHHi", 0, 1, 0, 0, 64, 48, 0) + bytes(64 * 48 * 4))
            peer.read_until(_has_messages(2, kind=3), 20)
            # A ServerFence request (BlockBefore | BlockAfter, payload "abcd"): the viewer answers.
            sock.sendall(struct.pack(">BxxxIB", 248, 0x80000003, 4) + b"abcd")
            peer.read_until(_has_messages(1, kind=248), 20)
            window = _xdotool(env, "search", "--name", SERVER_NAME.decode()).split()[-1]
            _xdotool(env, "windowfocus", "--sync", window)
            _xdotool(env, "mousemove", "--window", window, "10", "10")
            _xdotool(env, "click", "1")
            _xdotool(env, "key", "a")
            peer.read_until(_has_messages(2, kind=4), 20)
            peer.read_for(0.5)
            return peer.received
    finally:
        if viewer is not None:
            viewer.terminate()
            try:
                viewer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                viewer.kill()
                viewer.wait()
        xvfb.stop()


# ------------------------------------------------------------------ noVNC, under node

_NODE_PROBE = r"""
// Load noVNC's real core/rfb.js under node with the few browser globals it touches at
// import time, then run its own _sendEncodings with a socket that records bytes.
const [rfbPath, h264] = [process.argv[2], process.argv[3] === "h264"];
const noop = () => {};
globalThis.window = globalThis;
globalThis.addEventListener = noop;
if (typeof navigator === "undefined") {
  globalThis.navigator = { userAgent: "node", platform: "Linux", maxTouchPoints: 0 };
}
globalThis.removeEventListener = noop;
globalThis.MutationObserver = class { observe() {} disconnect() {} };
globalThis.WebSocket = { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 };
globalThis.RTCDataChannel = { CONNECTING: "connecting" };
globalThis.document = { createElement: () => ({ getContext: () => null, style: {} }),
                        addEventListener: noop, documentElement: {} };
if (h264) {
  // A browser whose WebCodecs decodes H.264: noVNC probes it by decoding one frame.
  globalThis.EncodedVideoChunk = class { constructor(init) { Object.assign(this, init); } };
  globalThis.VideoDecoder = class {
    static async isConfigSupported() { return { supported: true }; }
    constructor(init) { this.init = init; }
    configure() {}
    decode() { this.init.output({ close: noop }); }
    async flush() {}
  };
}
const { default: RFB } = await import(rfbPath);
const bytes = [];
const sock = {
  sQpush8(v) { bytes.push(v & 0xff); },
  sQpush16(v) { bytes.push((v >> 8) & 0xff, v & 0xff); },
  sQpush32(v) { bytes.push((v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff); },
  flush: noop,
};
// The state noVNC has after ServerInit at full depth, with its default quality (6)
// and compression (2) levels.
RFB.prototype._sendEncodings.call({ _fbDepth: 24, _qualityLevel: 6, _compressionLevel: 2, _sock: sock });
process.stdout.write(Buffer.from(bytes).toString("hex"));
"""


def novnc_set_encodings(root: Path, workdir: Path, h264: bool) -> bytes:
    """The SetEncodings message noVNC in ``root`` (holding ``core/rfb.js``) sends."""
    probe = workdir / "novnc-probe.mjs"
    probe.write_text(_NODE_PROBE, encoding="utf-8")
    result = subprocess.run(["node", str(probe), (root / "core" / "rfb.js").resolve().as_uri(),
                             "h264" if h264 else "plain"],
                            capture_output=True, text=True, timeout=60, check=True)
    return bytes.fromhex(result.stdout.strip())


def novnc_version(root: Path) -> str:
    return str(json.loads((root / "package.json").read_text(encoding="utf-8"))["version"])


# ------------------------------------------------------------------ regeneration

def _write_tigervnc_fixture(workdir: Path) -> None:
    data = capture_tigervnc(workdir)
    today = datetime.date.today().isoformat()
    write_hex(TIGERVNC_FIXTURE, [
        "Bytes a real TigerVNC viewer sent to a scripted RFB server (viewer -> server).",
        f"viewer: {tigervnc_version()}",
        f"produced: {today}, by `python -m secshadow.tests._rfb` (secshadow/tests/_rfb.py, capture_tigervnc):",
        "  vncviewer -AlertOnFatalError=0 -ReconnectOnError=0 127.0.0.1::PORT on a private Xvfb;",
        "  the server speaks RFB 3.8, offers security None, sends ServerInit 64x48 (32 bpp",
        "  big-endian, so the viewer answers with SetPixelFormat), answers the first update request",
        "  with one raw rectangle, sends a ServerFence request; then xdotool clicks at (10,10) and",
        "  types 'a' in the viewer's window. One message per line, as split by _rfb.split_client_messages.",
        "",
    ], label_client_stream(data))


def _write_novnc_fixture(workdir: Path) -> None:
    subprocess.run(["npm", "pack", "--silent", "@novnc/novnc"], cwd=workdir, check=True, timeout=300,
                   capture_output=True)
    tarball = next(workdir.glob("novnc-novnc-*.tgz"))
    subprocess.run(["tar", "xzf", tarball.name], cwd=workdir, check=True)
    root = workdir / "package"
    version = novnc_version(root)
    items = []
    for h264, label in ((False, "without-h264"), (True, "with-h264")):
        message = novnc_set_encodings(root, workdir, h264)
        items.append((message, f"{label}: " + " ".join(str(e) for e in encodings_of(message))))
    write_hex(NOVNC_FIXTURE, [
        "The SetEncodings message noVNC sends after ServerInit (viewer -> server).",
        f"novnc: {version}",
        f"produced: {datetime.date.today().isoformat()}, by `python -m secshadow.tests._rfb` "
        "(secshadow/tests/_rfb.py, novnc_set_encodings):",
        f"  `npm pack @novnc/novnc` ({tarball.name}) into a temporary directory, then noVNC's own",
        "  RFB.prototype._sendEncodings run under node with browser globals stubbed and a socket",
        "  that records bytes; state: 24-bit depth, qualityLevel 6, compressionLevel 2 (its defaults).",
        "  'without-h264': a browser without WebCodecs H.264 decoding; 'with-h264': one with it.",
        "",
    ], items)


def main() -> int:  # pragma: no cover - run by hand to refresh the fixtures
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tigervnc_fixture(Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        _write_novnc_fixture(Path(tmp))
    print(f"wrote {TIGERVNC_FIXTURE} and {NOVNC_FIXTURE}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.umask(0o022)
    raise SystemExit(main())
