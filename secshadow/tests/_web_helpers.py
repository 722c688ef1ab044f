"""Helpers for the browser tests: a plain RFB relay factory (the session's stand-in), a
stand-alone endpoint process, real headless Chromium through selenium, and canvas pixels.

``python -m secshadow.tests._web_helpers --target 127.0.0.1:PORT [--view-only]`` runs a
:class:`~secshadow.web.endpoint.WebViewerEndpoint` whose viewer factory relays to
``--target`` with ``secshadow.relay.Splice``, prints one JSON line ``{"event":
"listening", "url", "websocket", "pid"}`` and then ``{"event": "viewer-connected"}`` /
``{"event": "viewer-lost"}`` as browsers come and go; it exits on SIGTERM. With
``--ums URL --ums-fingerprint HEX --password-file F --device-port P`` it runs a real
session instead (``secshadow.api.start_shadowing`` with the endpoint as its viewer side,
the lab's device 27) and prints the session's events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from secshadow.relay import Splice

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: PROTOCOL.md section 5: how the test browser is started.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _Target(Protocol):
    def __init__(self, viewer: _RelayViewer) -> None:
        self.viewer = viewer

    def connectionMade(self) -> None:
        self.viewer.target_connected(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.viewer.splice is not None
        self.viewer.splice.deliver("left", data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.viewer.splice is not None:
            self.viewer.splice.lost("left")


class _RelayViewer(Protocol):
    """What the session does, minus the device: hold the viewer, connect, splice."""

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor, self.host, self.port = reactor, host, port
        self.splice: Splice | None = None
        self.pending = b""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        _say(event="viewer-connected", peer=str(self.transport.getPeer()))  # type: ignore[union-attr]
        TCP4ClientEndpoint(self.reactor, self.host, self.port).connect(
            Factory.forProtocol(lambda: _Target(self)))

    def target_connected(self, target: _Target) -> None:
        self.splice = Splice(target.transport, self.transport, self.reactor)  # type: ignore[arg-type]
        self.splice.start()
        if self.pending:
            self.splice.deliver("right", self.pending)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.deliver("right", data)
        else:
            self.pending += data

    def connectionLost(self, reason: Any = None) -> None:
        _say(event="viewer-lost")
        if self.splice is not None:
            self.splice.lost("right")


class RelayFactory(Factory):
    """Builds one :class:`_RelayViewer` per viewer connection, relaying to host:port."""

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor, self.host, self.port = reactor, host, port

    def buildProtocol(self, addr: Any) -> Protocol:
        return _RelayViewer(self.reactor, self.host, self.port)


def _main() -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from secshadow.web.assets import find_novnc

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    from secshadow.web.endpoint import WebViewerEndpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", help="HOST:PORT of a plain RFB server to relay to")
    parser.add_argument("--ums", help="instead: a real session (start_shadowing) with the secret from this IMI server")
    parser.add_argument("--ums-fingerprint")
    parser.add_argument("--password-file")
    parser.add_argument("--device-port", type=int)
    parser.add_argument("--view-only", action="store_true")
    parser.add_argument("--token-lifetime", type=float, default=None)
    args = parser.parse_args()
    endpoint = WebViewerEndpoint(reactor, assets=find_novnc(), view_only=args.view_only)
    if args.token_lifetime is not None:
        endpoint.website.tokens.lifetime = args.token_lifetime
    if args.ums:
        _session(reactor, endpoint, args)
        return
    host, _, port = args.target.rpartition(":")

    def listening(port_: Any) -> None:
        _say(event="listening", url=port_.url, websocket=port_.websocket, pid=os.getpid(),
             port=port_.getHost().port)

    endpoint.listen(RelayFactory(reactor, host, int(port))).addCallback(listening)
    reactor.run()  # type: ignore[attr-defined]


def _session(reactor: Any, endpoint: Any, args: Any) -> None:
    """The real thing: :func:`secshadow.api.start_shadowing` with the web endpoint as its
    viewer side; every session event is printed (``listening`` with the endpoint's pid)."""
    from secshadow.api import IMISource, start_shadowing
    from secshadow.options import SessionOptions
    from secshadow.umstrust import UMSTrust

    password = Path(args.password_file).read_text().strip()
    source = IMISource(reactor, args.ums, "27", "admin", password, UMSTrust.from_fingerprint(args.ums_fingerprint))
    options = SessionOptions(device_port=args.device_port, view_only=args.view_only)

    def on_event(event: Any) -> None:
        fields = event.as_dict()
        if fields["event"] == "listening":
            fields["pid"] = os.getpid()
        _say(**fields)

    shadowing = start_shadowing(reactor, source, options, on_event=on_event, viewer_name="browser",
                                viewer_endpoint=endpoint)
    shadowing.done.addErrback(lambda f: _say(event="error", message=f.getErrorMessage()))
    shadowing.done.addBoth(lambda _: reactor.stop())
    reactor.run()


# ------------------------------------------------------------------ the browser


def chromium(profile: Path, width: int = 1024, height: int = 768) -> Any:
    """Real headless Chromium under chromedriver (selenium); call ``quit()``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


CANVAS_PIXEL = """
const canvas = document.querySelector(arguments[0] + ' canvas');
if (!canvas || !canvas.width) return null;
const d = canvas.getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data;
return [d[0], d[1], d[2], canvas.width, canvas.height];
"""


def wait_for_pixel(driver: Any, selector: str, x: int, y: int, rgb: tuple[int, int, int],
                   timeout: float = 20.0) -> float:
    """Seconds until the noVNC canvas under ``selector`` shows ``rgb`` at (x, y);
    AssertionError with the last pixel seen on timeout."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = driver.execute_script(CANVAS_PIXEL, selector, x, y)
        if last is not None and tuple(last[:3]) == rgb:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"the canvas never showed {rgb} at ({x}, {y}); last seen {last}; "
                         f"page state {driver.execute_script('return document.body.dataset.state')}")


if __name__ == "__main__":
    _main()


# ------------------------------------------------------------------ raw WebSocket clients


def websocket_handshake(port: int, path: str, origin: str | None = None, protocols: str | None = "binary",
                        rcvbuf: int | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """Open a WebSocket upgrade to 127.0.0.1:port/path by hand; returns (HTTP status,
    the connected socket). ``rcvbuf``: a small receive buffer for a slow reader."""
    import base64
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, sock


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
