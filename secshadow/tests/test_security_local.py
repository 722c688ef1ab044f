"""The local side (issue 4, part 6): the listener binds loopback by default; with one
viewer (the default) it stops accepting once the viewer is in, and a second connection
gets no byte from the device; a Unix socket endpoint with mode 0600 keeps other local
users out entirely (see docs/security.md, "Other local users")."""

from __future__ import annotations

import pytest

import os
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted

from secshadow.lab import certs
from secshadow.secret import OneTimePassword, ShadowSecret
from secshadow.lab.scripted import HELLO, DeviceConn, PeerClosed, ScriptedDevice, recv_until_closed, run_session
from secshadow.tests._tls import der_of

CERT, KEY = certs.generate_self_signed()
SECRET = ShadowSecret(der_of(CERT), OneTimePassword(str(uuid.uuid4())), "127.0.0.1", None)


def _screen(conn: DeviceConn) -> None:
    conn.recv_command()
    conn.send(HELLO + b"SCREEN" * 100)
    try:
        while True:
            conn.recv(10)
    except (PeerClosed, TimeoutError):
        pass


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_default_listener_is_loopback_and_a_second_viewer_gets_nothing():
    device = ScriptedDevice(CERT, KEY, _screen)
    second: dict[str, Any] = {}

    def viewers(port: int) -> Any:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            first.settimeout(5)
            got = b""
            while len(got) < 12:
                got += first.recv(100)
            # the first viewer is in: the listener is closed, a second one is refused or
            # closed without a byte
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as other:
                    second["bytes"], second["closed"] = recv_until_closed(other, 2)
            except OSError as e:
                second["bytes"], second["refused"] = b"", str(e)
            time.sleep(0.2)
            return got

    try:
        run = yield run_session(SECRET, device.port, viewers)
    finally:
        device.stop()
    listening = [e for e in run.events if e.name == "listening"][0]
    assert listening.host == "127.0.0.1"
    assert not [e for e in run.events if e.name == "warning"]
    assert run.viewer.startswith(HELLO)
    assert second["bytes"] == b""
    assert second.get("refused") or second.get("closed")
    assert [e.name for e in run.events].count("viewer-connected") == 1


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_a_non_loopback_listener_is_warned_about():
    device = ScriptedDevice(CERT, KEY, _screen)

    def viewer(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return recv_until_closed(s, 1, limit=12)[0]

    try:
        run = yield run_session(SECRET, device.port, viewer, listen="tcp:0:interface=0.0.0.0")
    finally:
        device.stop()
    warnings = [e for e in run.events if e.name == "warning"]
    assert warnings and "not on loopback" in warnings[0].message


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_unix_socket_listener_with_mode_0600(tmp_path: Path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = private / "viewer.sock"
    device = ScriptedDevice(CERT, KEY, _screen)
    seen: dict[str, Any] = {}

    def viewer(port: int) -> bytes:
        seen["mode"] = stat.S_IMODE(os.stat(path).st_mode)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            return recv_until_closed(s, 2, limit=12)[0]

    try:
        run = yield run_session(SECRET, device.port, viewer, listen=f"unix:{path}:mode=600")
    finally:
        device.stop()
    listening = [e for e in run.events if e.name == "listening"][0]
    assert listening.host == str(path)
    assert not [e for e in run.events if e.name == "warning"]
    assert seen["mode"] == 0o600
    assert run.viewer.startswith(HELLO)
    assert run.exit_code == 0
