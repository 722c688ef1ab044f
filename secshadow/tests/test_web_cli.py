"""``secshadow-proxy --web`` as a console runs it: the real CLI fetches the secret from the
lab's IMI server, pins the emulator in front of a real Xvnc, and a real headless Chromium
opens the ``url`` of the ``listening`` event and shows the device's screen."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab.harness import Lab, child_environment
from secshadow.tests.conftest import require_program
from secshadow.tests._web_helpers import wait_for_pixel

pytestmark = pytest.mark.integration


def _proxy(lab: Lab, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(lab.proxy_argv("--viewer", "none", "--json", *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_environment())


def _events_until(process: subprocess.Popen[str], name: str, timeout: float = 30) -> list[dict[str, Any]]:
    assert process.stdout is not None
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if seen[-1]["event"] in (name, "error"):
            return seen
    raise AssertionError(f"no {name!r} event: {seen}")


def test_web_listening_event_and_the_page_shows_the_device(lab: Lab, browser: Any, tmp_path: Path):
    before = len(lab.device.named("procycmd"))
    audit = tmp_path / "audit.jsonl"
    started = time.monotonic()
    process = _proxy(lab, "--web", "--view-only", "--audit", str(audit))
    try:
        listening = _events_until(process, "listening")[-1]
        assert listening["event"] == "listening", listening
        assert listening["url"].startswith(f"http://127.0.0.1:{listening['port']}/")
        assert listening["websocket"].startswith(f"ws://127.0.0.1:{listening['port']}/")
        assert listening["view_only"] is True
        token = listening["websocket"].rsplit("token=", 1)[1].split("&")[0]
        assert len(token) >= 22 and token in listening["url"]  # 128 bits, base64url
        browser.get(listening["url"])
        x, y = lab.xvnc.background_point
        wait_for_pixel(browser, "#screen", x, y, lab.xvnc.background_rgb)
        print(f"secshadow-proxy --web: start to first frame in the browser {time.monotonic() - started:.2f} s")
        names = [e["event"] for e in _events_until(process, "session-started")]
        assert names[-2:] == ["viewer-connected", "session-started"]
        browser.close()  # closing the tab ends the session
        closed = _events_until(process, "closed")[-1]
        # noVNC asks for compressed encodings: the blue screen is a few hundred bytes.
        assert closed["event"] == "closed" and closed["bytes_to_viewer"] > 100 and closed["bytes_to_device"] > 0
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()
    assert lab.device.named("procycmd")[before:] == [{"event": "procycmd", "accepted": True, "reason": "ok"}]
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (record["viewer"], record["view_only"], record["result"]) == ("browser", True, "ok")
    assert token not in audit.read_text()


def test_web_with_a_native_viewer_is_a_usage_error(lab: Lab):
    process = _proxy(lab, "--web", "--viewer", "tigervnc")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--web serves a browser" in err


def test_missing_novnc_is_a_usage_error_that_says_how_to_install_it(lab: Lab, tmp_path: Path):
    process = _proxy(lab, "--web", "--novnc", str(tmp_path))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "npm" in err


def test_viewer_browser_opens_the_default_browser_without_the_token_on_argv(lab: Lab, tmp_path: Path):
    # The "default browser" is a real headless Chromium behind $BROWSER (a wrapper that
    # records its argv): the proxy hands it the mode-0600 redirect file, never the URL.
    require_program("chromium")
    argv_file, shot = tmp_path / "argv", tmp_path / "shot.png"
    wrapper = tmp_path / "browser.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {argv_file}\n'
        'exec chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking '
        f'--disable-component-update --disable-sync --user-data-dir={tmp_path / "profile"} '
        f'--window-size=900,700 --virtual-time-budget=15000 --screenshot={shot} "file://$1"\n')
    wrapper.chmod(0o700)
    env = {**child_environment(), "BROWSER": str(wrapper)}
    done = subprocess.run(lab.proxy_argv("--viewer", "browser", "--json"), capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert names[-3:] == ["viewer-connected", "session-started", "closed"]  # the browser came through the token
    listening = next(e for e in events if e["event"] == "listening")
    token = listening["websocket"].rsplit("token=", 1)[1].split("&")[0]
    opened = argv_file.read_text().split()
    assert len(opened) == 1 and opened[0].endswith("/open.html") and token not in argv_file.read_text()
    assert not Path(opened[0]).exists()  # the redirect file is gone once the session ended


def test_web_origin_and_frame_ancestors_flags_reach_the_page_and_the_websocket(lab: Lab):
    # A console serving its own noVNC from another origin (--web-origin) may open the
    # WebSocket; any other foreign origin may not; --web-frame-ancestors is the page's CSP.
    import urllib.request

    from secshadow.tests._web_helpers import websocket_handshake

    console = "https://console.example"
    process = _proxy(lab, "--web", "--web-origin", console, "--web-frame-ancestors", console)
    try:
        listening = _events_until(process, "listening")[-1]
        assert listening["event"] == "listening", listening
        with urllib.request.urlopen(listening["url"].split("#", 1)[0], timeout=10) as page:  # noqa: S310
            assert f"frame-ancestors {console}" in page.headers["Content-Security-Policy"]
        path = listening["websocket"].split(str(listening["port"]), 1)[1]
        refused, sock = websocket_handshake(listening["port"], path, origin="https://evil.example")
        sock.close()
        accepted, sock = websocket_handshake(listening["port"], path, origin=console)
        sock.close()
        assert (refused, accepted) == (403, 101)
    finally:
        process.kill()
        process.communicate()
