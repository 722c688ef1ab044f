"""Every viewer Debian packages, launched for real by ``secshadow-proxy --viewer NAME``
on a private Xvfb, against the lab (device emulator in front of a real Xvnc).

Each test waits for ``session-started``, takes ``import -window root`` screenshots until
the device's background colour covers a good share of the Xvfb screen (the lab's Xvnc is
640x480 on a 1024x768 Xvfb, so at most ~39 %), then closes the viewer (``close_viewer``: SIGTERM to the
pid from ``viewer-started``) and checks that the proxy ends the session with exit 0 and a
``closed`` event and that the viewer was reaped. Then the other half of the lifecycle:
a session that ends (signal, device gone, viewer timeout) terminates and reaps the viewer.

Set ``SECSHADOW_SCREENSHOT_DIR`` to keep the screenshots (``docs/images`` holds one).
In CI a missing program fails these tests (conftest.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab.harness import Lab, ManagedProcess, child_environment
from secshadow.tests.conftest import require_program
from secshadow.tests._screens import Xvfb, close_viewer, share_of_colour, start_xvfb

@pytest.fixture(autouse=True, scope="module")
def _screen_programs() -> None:
    for program in ("Xvfb", "import"):
        require_program(program)


pytestmark = pytest.mark.integration

#: Share of the Xvfb screen the device's background colour must cover.
MIN_SHARE = 0.2




@pytest.fixture
def xvfb(tmp_path: Path) -> Any:
    display = start_xvfb(tmp_path)
    try:
        yield display
    finally:
        display.stop()


def _viewer_env(display: Xvfb, tmp_path: Path) -> dict[str, str]:
    """A private HOME (viewers write their settings there) and no session bus (so GTK
    single-instance viewers such as Remmina do not hand the URI to another instance)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = child_environment({"DISPLAY": display.name, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                             "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache")})
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return env


def _screenshot_until_device_visible(display: Xvfb, lab: Lab, shot: Path, seconds: float = 10) -> float:
    share = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        subprocess.run(["import", "-display", display.name, "-window", "root", str(shot)],
                       check=True, capture_output=True, timeout=20)
        assert lab.xvnc is not None
        share = share_of_colour(shot, lab.xvnc.background_rgb)
        if share > MIN_SHARE:
            break
        time.sleep(0.2)
    keep = os.environ.get("SECSHADOW_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return share


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def _names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


# (--viewer NAME, the program it needs)
REAL_VIEWERS = [
    ("tigervnc", "xtigervncviewer"),
    ("tightvnc", "xtightvncviewer"),
    ("gvncviewer", "gvncviewer"),
    ("remote-viewer", "remote-viewer"),
    ("vinagre", "vinagre"),
    ("remmina", "remmina"),
]


@pytest.mark.parametrize("viewer, program", REAL_VIEWERS, ids=[v for v, _ in REAL_VIEWERS])
def test_real_viewer_shows_the_device_and_its_exit_closes_the_session(
        viewer: str, program: str, lab: Lab, xvfb: Xvfb, tmp_path: Path) -> None:
    require_program(program)
    started_at = time.monotonic()
    proxy = ManagedProcess(f"{viewer}-proxy", lab.proxy_argv("--json", "--viewer", viewer), tmp_path,
                           env=_viewer_env(xvfb, tmp_path))
    try:
        started = proxy.wait_for("viewer-started")
        assert started["viewer"] == viewer
        proxy.wait_for("session-started", timeout=30)
        share = _screenshot_until_device_visible(xvfb, lab, tmp_path / f"{viewer}-on-xvfb.png")
        assert share > MIN_SHARE, f"{viewer}: the screen does not show the device ({share:.1%} background colour)"

        close_viewer(started["pid"])  # the user closes the viewer
        assert proxy.process.wait(timeout=15) == 0, proxy.log_tail()
    finally:
        proxy.stop()
    assert _names(proxy.events) == ["secret", "pinned", "listening", "viewer-started", "viewer-connected",
                                    "session-started", "closed"]
    assert proxy.events[-1]["reason"] == "viewer disconnected"
    assert _gone(started["pid"])  # reaped by the proxy, not a zombie
    # The viewer's output went to the log (stderr), never to stdout: stdout is all events.
    assert len(proxy.lines) == len(proxy.events)
    assert time.monotonic() - started_at < 20


def test_a_signal_to_the_proxy_terminates_and_reaps_the_viewer(lab: Lab, xvfb: Xvfb, tmp_path: Path) -> None:
    require_program("xtigervncviewer")
    proxy = ManagedProcess("sig-proxy", lab.proxy_argv("--json", "--viewer", "tigervnc"), tmp_path,
                           env=_viewer_env(xvfb, tmp_path))
    try:
        started = proxy.wait_for("viewer-started")
        proxy.wait_for("session-started", timeout=30)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=15) == 0
    finally:
        proxy.stop()
    assert _names(proxy.events)[-1] == "closed"
    assert "SIGTERM" in proxy.events[-1]["reason"]
    assert _wait_gone(started["pid"])
    log = proxy.log_path.read_text()
    assert "[tigervnc]" in log  # the viewer's output is in the log


def test_the_device_closing_terminates_and_reaps_the_viewer(lab: Lab, xvfb: Xvfb, tmp_path: Path) -> None:
    require_program("xtigervncviewer")
    device = lab.start_device(name="doomed-device")
    try:
        argv = lab.proxy_argv("--json", "--viewer", "tigervnc")
        argv[argv.index("--device-port") + 1] = str(device.wait_for("listening")["port"])
        proxy = ManagedProcess("doomed-proxy", argv, tmp_path, env=_viewer_env(xvfb, tmp_path))
        try:
            started = proxy.wait_for("viewer-started")
            proxy.wait_for("session-started", timeout=30)
            device.stop()  # the device goes away mid-session
            assert proxy.process.wait(timeout=15) == 0
        finally:
            proxy.stop()
    finally:
        device.stop()
    assert _names(proxy.events)[-1] == "closed"
    assert _wait_gone(started["pid"])


def test_a_viewer_that_never_connects_exits_8_after_the_viewer_timeout_and_is_reaped(
        lab: Lab, tmp_path: Path) -> None:
    # A "viewer" that starts but never connects to the tunnel.
    argv = lab.proxy_argv("--json", "--viewer-timeout", "1", "--viewer-command",
                          f"{sys.executable} -c 'import time; time.sleep(60)' {{port}}")
    proxy = ManagedProcess("silent-proxy", argv, tmp_path, env=child_environment())
    try:
        started = proxy.wait_for("viewer-started")
        code = proxy.process.wait(timeout=15)
    finally:
        proxy.stop()
    assert code == 8
    assert _names(proxy.events) == ["secret", "pinned", "listening", "viewer-started", "error"]
    assert proxy.events[-1]["code"] == "viewer"
    assert _wait_gone(started["pid"])
