"""The browser bridge with real programs: headless Chromium (selenium + Debian's
chromedriver) opens the page of a real WebViewerEndpoint whose viewer factory relays to
the lab's real Xvnc, and the canvas shows Xvnc's background colour. Used, expired and
foreign-origin attempts get nothing; a browser that stops reading does not grow memory.

The endpoint runs in its own process (``secshadow.tests._web_helpers``), as it does under
``secshadow-proxy --web``; the proxy's own --web path is tested in test_web_proxy.py.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab.harness import Lab, ManagedProcess, child_environment, python_module
from secshadow.tests._screens import share_of_colour
from secshadow.tests._web_helpers import (
    CANVAS_PIXEL,
    rss_kib,
    wait_for_pixel,
    websocket_handshake,
)

pytestmark = pytest.mark.integration


def start_endpoint(tmp_path: Path, target_port: int, *extra: str) -> ManagedProcess:
    process = ManagedProcess("web-endpoint", [*python_module("secshadow.tests._web_helpers"), "--target",
                                              f"127.0.0.1:{target_port}", *extra], tmp_path, env=child_environment())
    process.wait_for("listening", timeout=30)
    return process


def assert_clean_log(process: ManagedProcess) -> None:
    """No traceback and no unhandled error in the endpoint's log (call after stop())."""
    text = process.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "Unhandled" not in text, text[-3000:]


def page_state(driver: Any, timeout: float = 15.0, want: tuple[str, ...] = ("connected", "failed", "ended")) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.body.dataset.state")
        if state in want:
            return str(state)
        time.sleep(0.05)
    return str(state)


def test_the_page_shows_the_devices_real_screen(lab: Lab, browser: Any, tmp_path: Path):
    endpoint = start_endpoint(tmp_path, lab.xvnc.rfb_port)
    try:
        listening = endpoint.named("listening")[0]
        token = listening["url"].split("#token=", 1)[1].split("&")[0]
        assert listening["websocket"].endswith(f"/websocket?token={token}")
        started = time.monotonic()
        browser.get(listening["url"])
        x, y = lab.xvnc.background_point
        first_frame = wait_for_pixel(browser, "#screen", x, y, lab.xvnc.background_rgb)
        width, height = browser.execute_script(CANVAS_PIXEL, "#screen", x, y)[3:5]
        assert (width, height) == (lab.xvnc.width, lab.xvnc.height)
        assert "#" not in browser.current_url  # the token left the address bar and the history
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert share_of_colour(shot, lab.xvnc.background_rgb) > 0.3
        print(f"request to first frame: {time.monotonic() - started:.2f} s (canvas poll {first_frame:.2f} s)")
        assert endpoint.named("viewer-connected")
    finally:
        endpoint.stop()
    assert_clean_log(endpoint)


def test_the_page_and_its_files_carry_the_security_headers(lab: Lab, tmp_path: Path):
    endpoint = start_endpoint(tmp_path, lab.xvnc.rfb_port)
    try:
        base = endpoint.named("listening")[0]["url"].split("/view#", 1)[0]
        for path in ("/view", "/static/viewer.js", "/novnc/core/rfb.js"):
            with urllib.request.urlopen(base + path, timeout=10) as answer:  # noqa: S310 - loopback test URL
                assert answer.headers["Cache-Control"] == "no-store"
                csp = answer.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert answer.headers["X-Frame-Options"] == "DENY"
                if path.endswith(".js"):
                    assert answer.headers["Content-Type"].startswith("text/javascript")
        for path in ("/novnc/", "/novnc/core/", "/static/../endpoint.py"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path, timeout=10)  # noqa: S310
            assert info.value.code == 404
    finally:
        endpoint.stop()


def test_a_used_link_gets_nothing_the_second_time(lab: Lab, browser: Any, tmp_path: Path):
    endpoint = start_endpoint(tmp_path, lab.xvnc.rfb_port)
    try:
        listening = endpoint.named("listening")[0]
        browser.get(listening["url"])
        x, y = lab.xvnc.background_point
        wait_for_pixel(browser, "#screen", x, y, lab.xvnc.background_rgb)
        browser.switch_to.new_window("tab")
        browser.get(listening["url"])
        assert page_state(browser) == "failed"
        assert browser.execute_script(CANVAS_PIXEL, "#screen", x, y) is None
        assert "already used or has expired" in browser.find_element("id", "message").text
        status, sock = websocket_handshake(listening["port"], listening["websocket"].split(str(listening["port"]), 1)[1])
        sock.close()
        assert status == 403
        assert len(endpoint.named("viewer-connected")) == 1
    finally:
        endpoint.stop()
    assert_clean_log(endpoint)


def test_an_expired_link_gets_nothing(lab: Lab, browser: Any, tmp_path: Path):
    endpoint = start_endpoint(tmp_path, lab.xvnc.rfb_port, "--token-lifetime", "1")
    try:
        listening = endpoint.named("listening")[0]
        time.sleep(1.5)
        browser.get(listening["url"])
        assert page_state(browser) == "failed"
        assert endpoint.named("viewer-connected") == []
    finally:
        endpoint.stop()


class _EvilPage(http.server.BaseHTTPRequestHandler):
    websocket = ""

    def do_GET(self) -> None:  # noqa: N802
        body = ("<!DOCTYPE html><title>evil</title><script>"
                f"const ws = new WebSocket({self.websocket!r}, ['binary']);"
                "ws.onopen = () => { document.title = 'opened'; };"
                "ws.onclose = () => { if (document.title !== 'opened') document.title = 'refused'; };"
                "</script>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_foreign_origin_is_refused_even_with_the_token(lab: Lab, browser: Any, tmp_path: Path):
    endpoint = start_endpoint(tmp_path, lab.xvnc.rfb_port)
    handler = type("Handler", (_EvilPage,), {"websocket": endpoint.named("listening")[0]["websocket"]})
    evil = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        listening = endpoint.named("listening")[0]
        # A page on another origin (cross-site WebSocket hijacking) holding a leaked token:
        browser.get(f"http://localhost:{evil.server_address[1]}/")
        deadline = time.monotonic() + 10
        while browser.title not in ("opened", "refused") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert browser.title == "refused"
        path = listening["websocket"].split(str(listening["port"]), 1)[1]
        status, sock = websocket_handshake(listening["port"], path, origin="http://evil.example")
        sock.close()
        assert status == 403
        assert endpoint.named("viewer-connected") == []
        # The refusals did not use the token up: the real page still works with it.
        browser.get(listening["url"])
        x, y = lab.xvnc.background_point
        wait_for_pixel(browser, "#screen", x, y, lab.xvnc.background_rgb)
    finally:
        evil.shutdown()
        evil.server_close()
        endpoint.stop()


class _Flood:
    """A fake device that sends RFB's hello and then data as fast as it is taken."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        conn.settimeout(0.2)
        chunk = b"RFB 003.008\n" + bytes(65536 - 12)
        with conn:
            while not self.stop.is_set():
                try:
                    self.sent += conn.send(chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()


def test_a_browser_that_stops_reading_does_not_grow_memory(tmp_path: Path):
    flood = _Flood()
    endpoint = start_endpoint(tmp_path, flood.port)
    try:
        listening = endpoint.named("listening")[0]
        pid = listening["pid"]
        before = rss_kib(pid)
        path = listening["websocket"].split(str(listening["port"]), 1)[1]
        status, slow = websocket_handshake(listening["port"], path, rcvbuf=4096)
        assert status == 101
        time.sleep(3)  # the relay fills every buffer on the way, then pauses the device
        sent_early, rss_early = flood.sent, rss_kib(pid)
        time.sleep(5)
        sent_late, rss_late = flood.sent, rss_kib(pid)
        slow.close()
        print(f"device side sent {sent_early / 2**20:.1f} MiB, then {(sent_late - sent_early) / 2**20:.2f} MiB "
              f"more in 5 s; endpoint RSS {before} -> {rss_early} -> {rss_late} KiB")
        assert sent_late < 64 * 2**20  # without backpressure it would be gigabytes
        assert sent_late - sent_early < 2 * 2**20  # paused: nothing more is taken
        assert rss_late - before < 40 * 1024
        assert rss_late - rss_early < 4 * 1024
    finally:
        flood.close()
        endpoint.stop()


# ------------------------------------------------------------------ the real session


def start_session(lab: Lab, tmp_path: Path, *extra: str) -> ManagedProcess:
    process = ManagedProcess("web-session", [
        *python_module("secshadow.tests._web_helpers"), "--ums", lab.ums_url, "--ums-fingerprint",
        lab.ums_fingerprint, "--password-file", str(lab.password_file), "--device-port", str(lab.device_port),
        *extra], tmp_path, env=child_environment())
    process.wait_for("listening", timeout=30)
    return process


def test_a_real_session_shows_the_device_through_the_pinned_tunnel(lab: Lab, browser: Any, tmp_path: Path):
    before = len(lab.device.named("procycmd"))
    session = start_session(lab, tmp_path, "--view-only")
    try:
        listening = session.named("listening")[0]
        assert listening["url"].endswith("&view_only=1") and listening["view_only"] is True
        started = time.monotonic()
        browser.get(listening["url"])
        x, y = lab.xvnc.background_point
        wait_for_pixel(browser, "#screen", x, y, lab.xvnc.background_rgb)
        print(f"real session, request to first frame: {time.monotonic() - started:.2f} s; "
              f"endpoint process RSS {rss_kib(listening['pid'])} KiB")
        assert browser.find_element("id", "badge").is_displayed()
        # The link is used: a second try gets nothing (the session closed its listener once its
        # one viewer came; were it still open, the token would get 403), and the device sees
        # no second PROCYCMD.
        path = listening["websocket"].split(str(listening["port"]), 1)[1]
        try:
            status, sock = websocket_handshake(listening["port"], path)
            sock.close()
        except ConnectionRefusedError:
            status = 0
        assert status in (0, 403)
        browser.close()  # closing the tab ends the session
        session.wait_for("closed", timeout=30)
        assert session.process.wait(timeout=30) == 0
    finally:
        session.stop()
    assert lab.device.named("procycmd")[before:] == [{"event": "procycmd", "accepted": True, "reason": "ok"}]


def test_refused_upgrades_never_reach_the_device(lab: Lab, tmp_path: Path):
    before = len(lab.device.named("procycmd"))
    session = start_session(lab, tmp_path)
    try:
        listening = session.named("listening")[0]
        good = listening["websocket"].split(str(listening["port"]), 1)[1]
        wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        for path, origin in ((wrong, None), (good, "http://evil.example")):
            status, sock = websocket_handshake(listening["port"], path, origin=origin)
            sock.close()
            assert status == 403
        time.sleep(0.5)
        assert lab.device.named("procycmd")[before:] == []
        assert session.named("viewer-connected") == []
    finally:
        session.stop()


def test_a_text_message_closes_the_websocket_with_1003(lab: Lab, tmp_path: Path):
    endpoint = start_endpoint(tmp_path, lab.xvnc.rfb_port)
    try:
        listening = endpoint.named("listening")[0]
        path = listening["websocket"].split(str(listening["port"]), 1)[1]
        status, sock = websocket_handshake(listening["port"], path)
        assert status == 101
        mask = b"abcd"
        sock.sendall(b"\x81\x85" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hello")))
        received = b""
        close_1003 = re.compile(rb"\x88[\x02-\x7d]\x03\xeb")  # a close frame with status 1003
        while not close_1003.search(received):  # RFB from Xvnc may come first
            chunk = sock.recv(65536)
            assert chunk, "the connection ended without a 1003 close frame"
            received += chunk
        sock.close()
        endpoint.wait_for("viewer-lost")
    finally:
        endpoint.stop()
    assert_clean_log(endpoint)
