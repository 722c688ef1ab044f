"""View-only enforced by the proxy, against the real lab (issue 10, PROTOCOL.md section 7).

The device's screen is a real Xvnc behind the device emulator. What reaches the device
is read on the device's own X display: ``xdotool getmouselocation`` for the pointer, and
an ``xev`` window holding the keyboard focus under the pointer for keys and buttons. Each
test also runs the same input without ``--view-only`` (the control), so the observation
is shown to see input when input does get through.

Figures (pointer positions, message types, inputs) are printed with ``-s``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab.harness import Lab, ManagedProcess, child_environment, python_module
from secshadow.tests._screens import close_viewer, start_xvfb
from secshadow.tests._viewonly import (
    FENCE,
    RAW,
    UNKNOWN_TYPE,
    XK_a,
    InputProbe,
    RFBClient,
    every_client_message,
    move_pointer,
    pointer_at,
    set_encodings,
)
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration

#: The xev window on the device's display: (x, y, width, height), away from the lab's
#: label (top left) and the background pixel other tests read (bottom right).
PROBE = (300, 160, 240, 160)
#: Where the viewers try to click: inside the probe, away from its centre (the start).
TARGET = (340, 190)
INPUT_EVENTS = {"KeyPress", "KeyRelease", "ButtonPress", "ButtonRelease", "MotionNotify"}


@pytest.fixture
def probe(lab: Lab, tmp_path: Path) -> Iterator[InputProbe]:
    """An xev window on the device's display with the keyboard focus, the device's
    pointer at its centre; afterwards the pointer goes back where it was."""
    require_program("xdotool")
    require_program("xev")
    display = lab.xvnc.display_name
    original = pointer_at(display)
    window = InputProbe(display, tmp_path, PROBE)
    try:
        move_pointer(display, *window.centre)
        window.settle(0.3)
        yield window
    finally:
        window.stop()
        move_pointer(display, *original)


def start_proxy(lab: Lab, tmp_path: Path, name: str, *flags: str, env: dict[str, str] | None = None
                ) -> ManagedProcess:
    return ManagedProcess(name, lab.proxy_argv("--json", *flags), tmp_path, env=env or child_environment())


def new_input(probe: InputProbe, seen_before: int) -> list[str]:
    return probe.settle()[seen_before:]


def click_and_type(lab: Lab, tmp_path: Path, probe: InputProbe, view_only: bool) -> dict[str, Any]:
    """One session with our own RFB client (``--viewer none``): move, click and type 'a'
    at :data:`TARGET`; returns the pointer before and after, the input xev saw, and the
    proxy's events."""
    display = lab.xvnc.display_name
    flags = ("--viewer", "none", *(("--view-only",) if view_only else ()))
    proxy = start_proxy(lab, tmp_path, f"click-{view_only}", *flags)
    try:
        listening = proxy.wait_for("listening")
        before = pointer_at(display)
        seen = len(probe.events())
        with RFBClient("127.0.0.1", listening["port"]) as client:
            client.handshake(shared=True)
            client.send(set_encodings([RAW, FENCE]))
            client.pointer(*TARGET)
            client.click(*TARGET)
            client.type_key(XK_a)
            client.sync()  # the device read everything above
            assert client.full_update() >= 1  # and still serves the screen
            after = pointer_at(display)
            reached = new_input(probe, seen)
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    return {"before": before, "after": after, "input": reached, "events": proxy.events, "listening": listening}


def test_a_view_only_session_moves_and_clicks_nothing_on_the_device(lab: Lab, tmp_path: Path,
                                                                      probe: InputProbe) -> None:
    run = click_and_type(lab, tmp_path, probe, view_only=True)
    print(f"\nview-only: pointer {run['before']} -> {run['after']}, input at the device: {run['input']}")
    assert run["after"] == run["before"] == probe.centre
    assert set(run["input"]) & INPUT_EVENTS == set()
    assert run["listening"]["view_only"] is True
    started = next(e for e in run["events"] if e["event"] == "session-started")
    assert started["view_only"] is True
    assert run["events"][-1]["event"] == "closed" and run["events"][-1]["reason"] == "viewer disconnected"


def test_the_same_input_without_view_only_moves_the_pointer_and_types(lab: Lab, tmp_path: Path,
                                                                       probe: InputProbe) -> None:
    run = click_and_type(lab, tmp_path, probe, view_only=False)
    print(f"\nwithout view-only: pointer {run['before']} -> {run['after']}, input at the device: {run['input']}")
    assert run["before"] == probe.centre
    assert run["after"] == TARGET
    assert {"MotionNotify", "ButtonPress", "ButtonRelease", "KeyPress", "KeyRelease"} <= set(run["input"])
    assert "view_only" not in run["listening"]
    assert "view_only" not in next(e for e in run["events"] if e["event"] == "session-started")


def test_a_hostile_client_sending_every_message_type_changes_nothing_and_an_unknown_type_exits_8(
        lab: Lab, tmp_path: Path, probe: InputProbe) -> None:
    display = lab.xvnc.display_name
    audit = tmp_path / "audit.jsonl"
    proxy = start_proxy(lab, tmp_path, "hostile", "--viewer", "none", "--view-only", "--audit", str(audit))
    try:
        listening = proxy.wait_for("listening")
        before = pointer_at(display)
        seen = len(probe.events())
        with RFBClient("127.0.0.1", listening["port"]) as client:
            init = client.handshake(shared=False)
            catalogue = every_client_message(init, TARGET)
            for _kind, _label, message in catalogue:
                client.send(message)
            client.sync()  # every message above went through the proxy and was read by the device
            assert client.full_update() >= 1
            after = pointer_at(display)
            reached = new_input(probe, seen)
            client.send(bytes([UNKNOWN_TYPE]) + bytes(15))
            assert client.wait_closed(timeout=20), "the proxy kept the session open after an unknown type"
        code = proxy.process.wait(timeout=20)
    finally:
        proxy.stop()
    kinds = sorted({kind for kind, _, _ in catalogue})
    print(f"\nhostile client: {len(kinds)} message types {kinds} in {len(catalogue)} groups "
          f"+ unknown type {UNKNOWN_TYPE}; pointer {before} -> {after}; input at the device: {reached}")
    for _kind, label, message in catalogue:
        print(f"  {label}: {len(message)} bytes")
    assert kinds == [0, 2, 3, 4, 5, 6, 150, 248, 250, 251, 253, 255]
    assert after == before == probe.centre
    assert set(reached) & INPUT_EVENTS == set()
    assert code == 8
    error = proxy.events[-1]
    assert error["event"] == "error" and error["code"] == "viewer"
    assert error["message"] == (f"the viewer sent RFB message type {UNKNOWN_TYPE}, which view-only does not "
                                "know; closing")
    assert pointer_at(display) == before
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (record["result"], record["reason"], record["view_only"]) == ("viewer", error["message"], True)


@pytest.mark.parametrize("how", ["tigervnc --view-only", "viewer-command without ViewOnly, --view-only",
                                 "viewer-command, no view-only (control)"])
def test_a_real_tigervnc_viewer_driven_by_xdotool(lab: Lab, tmp_path: Path, probe: InputProbe, how: str) -> None:
    """TigerVNC's vncviewer on Xvfb, launched by the CLI; xdotool clicks and types in its
    window. With ``--viewer tigervnc --view-only`` the viewer also gets ``-ViewOnly``;
    the custom command does not, so there only the proxy stands between the viewer's
    input and the device; the control shows that input from this viewer does arrive."""
    for program in ("Xvfb", "vncviewer"):
        require_program(program)
    display = lab.xvnc.display_name
    screen = start_xvfb(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = child_environment({"DISPLAY": screen.name, "HOME": str(home)})
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    command = "vncviewer -AlertOnFatalError=0 -ReconnectOnError=0 {host}::{port}"
    flags = {
        "tigervnc --view-only": ("--viewer", "tigervnc", "--view-only"),
        "viewer-command without ViewOnly, --view-only": ("--viewer-command", command, "--view-only"),
        "viewer-command, no view-only (control)": ("--viewer-command", command),
    }[how]
    proxy = start_proxy(lab, tmp_path, "tiger", *flags, env=env)
    try:
        started = proxy.wait_for("viewer-started")
        proxy.wait_for("session-started", timeout=30)
        viewer_env = {"DISPLAY": screen.name, "PATH": os.environ["PATH"]}
        window = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", "TigerVNC"],
                                env=viewer_env, capture_output=True, text=True, timeout=30,
                                check=True).stdout.split()[0]
        time.sleep(1.0)  # the first frame is drawn
        before = pointer_at(display)
        seen = len(probe.events())
        for args in (["windowfocus", "--sync", window],
                     ["mousemove", "--window", window, str(TARGET[0]), str(TARGET[1])],
                     ["click", "1"], ["type", "--delay", "50", "ab"], ["key", "Return"]):
            subprocess.run(["xdotool", *args], env=viewer_env, check=True, timeout=20, capture_output=True)
        time.sleep(1.0)
        after = pointer_at(display)
        reached = new_input(probe, seen)
        close_viewer(started["pid"])  # the user closes the viewer
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
        screen.stop()
    print(f"\nTigerVNC ({how}): pointer {before} -> {after}, input at the device: {reached}")
    if "control" in how:
        assert before == probe.centre and after == TARGET
        assert {"ButtonPress", "KeyPress"} <= set(reached)
    else:
        assert after == before == probe.centre
        assert set(reached) & INPUT_EVENTS == set()
        assert next(e for e in proxy.events if e["event"] == "session-started")["view_only"] is True
    assert proxy.events[-1]["event"] == "closed"


def test_a_view_only_viewer_asking_for_exclusive_access_does_not_disconnect_the_first(
        lab: Lab, tmp_path: Path) -> None:
    """Two sessions (two one-time passwords) to the same device. The first viewer
    controls (no view-only, shared). A second, view-only one sends ClientInit shared=0;
    the proxy forces shared=1, so Xvnc (DisconnectClients=1 by default) keeps the first.
    The control: the same second viewer without view-only does disconnect the first."""
    outcomes = {}
    for second_view_only in (True, False):
        first = start_proxy(lab, tmp_path, f"first-{second_view_only}", "--viewer", "none")
        second = start_proxy(lab, tmp_path, f"second-{second_view_only}", "--viewer", "none",
                             *(("--view-only",) if second_view_only else ()))
        try:
            with RFBClient("127.0.0.1", first.wait_for("listening")["port"]) as controller:
                controller.handshake(shared=True)
                controller.send(set_encodings([RAW, FENCE]))
                controller.sync()
                with RFBClient("127.0.0.1", second.wait_for("listening")["port"]) as watcher:
                    watcher.handshake(shared=False)
                    watcher.send(set_encodings([RAW, FENCE]))
                    watcher.sync()
                    assert watcher.full_update() >= 1
                    time.sleep(0.5)
                    try:
                        controller.sync(b"after")
                        controller.full_update()
                        outcomes[second_view_only] = "connected"
                    except (ConnectionError, OSError):
                        outcomes[second_view_only] = "disconnected"
                    first_closed = [e for e in first.events if e["event"] == "closed"]
            assert first.process.wait(timeout=20) == 0
            assert second.process.wait(timeout=20) == 0
        finally:
            first.stop()
            second.stop()
        if second_view_only:
            assert first_closed == [], "the first session ended while the view-only one was connected"
    print(f"\nfirst viewer when a second asks for exclusive access: view-only second -> {outcomes[True]}, "
          f"second without view-only -> {outcomes[False]}")
    assert outcomes == {True: "connected", False: "disconnected"}


def test_control_mode_view_only_per_session(lab: Lab, tmp_path: Path, probe: InputProbe) -> None:
    """``"view_only": true`` in an ``open`` request filters that session only."""
    display = lab.xvnc.display_name
    proxy = ManagedProcess("control-vo", [
        *python_module("secshadow.cli"), "--control", "stdio", "--ums", lab.ums_url, "--ums-user", "admin",
        "--ums-password-file", str(lab.password_file), "--ums-fingerprint", lab.ums_fingerprint,
        "--device-port", str(lab.device_port)], tmp_path, env=child_environment(), stdin=subprocess.PIPE)
    try:
        positions = {}
        for session, view_only in (("watch", True), ("drive", False)):
            proxy.process.stdin.write(json.dumps({"op": "open", "session": session, "device": "27",
                                                  "view_only": view_only}).encode() + b"\n")
            proxy.process.stdin.flush()
            listening = next(e for e in _wait_session(proxy, session, "listening"))
            assert listening.get("view_only") is (True if view_only else None)
            before = pointer_at(display)
            with RFBClient("127.0.0.1", listening["port"]) as client:
                client.handshake()
                client.send(set_encodings([RAW, FENCE]))
                client.click(*TARGET)
                client.sync()
                positions[session] = (before, pointer_at(display))
            next(_wait_session(proxy, session, "closed"))
        proxy.process.stdin.close()
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    print(f"\ncontrol mode: view_only=true pointer {positions['watch'][0]} -> {positions['watch'][1]}; "
          f"view_only=false {positions['drive'][0]} -> {positions['drive'][1]}")
    assert positions["watch"] == (probe.centre, probe.centre)
    assert positions["drive"] == (probe.centre, TARGET)


def _wait_session(proxy: ManagedProcess, session: str, name: str, timeout: float = 20.0) -> Iterator[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in proxy.events:
            if event.get("session") == session and event.get("event") == name:
                yield event
                return
        time.sleep(0.05)
    raise AssertionError(f"no {name!r} event for session {session!r}: {proxy.events}\n{proxy.log_tail()}")
