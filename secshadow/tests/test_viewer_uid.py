"""Another local user does not get the screen (issue 9, item 5), with the real
``secshadow-proxy``, the lab's IMI server, device emulator and Xvnc. The "attacker" is a
child of this (root) test that drops to uid 65534 and connects to the viewer port the
moment the ``listening`` event names it, before the real viewer (it wins the race the
review's attacker won 3 of 3 times):

- loopback TCP: it receives no byte, the device sees no ``PROCYCMD`` for it, a ``warning``
  event says so, and the session keeps waiting for the real viewer, which then works;
- ``--max-viewers 2``: after the first viewer left, the other user is refused too, and
  the second real viewer works (two passwords, both from the UMS, both accepted);
- ``--listen unix:PATH``: the socket is mode 0600 by default, so the other user cannot
  even connect; with an explicit ``mode=666`` it connects and ``SO_PEERCRED`` refuses it.

What remains (root, other processes of the same uid) is in docs/security.md.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab.harness import Lab, ManagedProcess
from secshadow.tests import _stages

NOBODY = 65534
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="needs Linux and root (to start a client process of another uid)"),
]


def connect_as_nobody(family: int, address: Any, read_for: float = 3.0) -> dict[str, Any]:
    """Fork a child that drops to uid/gid 65534, connects to ``address`` and reads until
    the peer closes or ``read_for`` seconds pass. Returns ``{"bytes": N, "closed": bool,
    "error": str | None}`` (``error``: the connect failed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        report: dict[str, Any] = {"bytes": 0, "closed": False, "error": None}
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(address)
            except ConnectionResetError:
                # The proxy accepted and aborted the stream before connect() returned:
                # refused as fast as it gets, with no byte (a reset, not a missing listener).
                report["closed"] = True
            except OSError as e:
                report["error"] = f"{type(e).__name__}: {e}"
            if not report["closed"] and report["error"] is None:
                deadline = time.monotonic() + read_for
                s.settimeout(0.2)
                while time.monotonic() < deadline:
                    try:
                        chunk = s.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        report["closed"] = True
                        break
                    if not chunk:
                        report["closed"] = True
                        break
                    report["bytes"] += len(chunk)
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    return report


def rfb_server_init(sock: socket.socket) -> tuple[int, int]:
    """A minimal RFB client (RFC 6143 7.1-7.3, security None); returns the framebuffer size."""
    sock.settimeout(20)

    def read(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "closed during the RFB handshake"
            data += chunk
        return data

    assert read(12) == b"RFB 003.008\n"
    sock.sendall(b"RFB 003.008\n")
    assert 1 in read(read(1)[0])
    sock.sendall(b"\x01")
    assert read(4) == b"\x00\x00\x00\x00"
    sock.sendall(b"\x01")
    width, height = struct.unpack("!HH", read(4))
    read(16)
    read(struct.unpack("!I", read(4))[0])
    return width, height


def _proxy(lab: Lab, tmp_path: Path, name: str, *extra: str) -> ManagedProcess:
    return ManagedProcess(name, lab.proxy_argv("--json", "--viewer", "none", "--viewer-timeout", "30", *extra),
                          tmp_path, env=_stages.proxy_env())


def _verdicts(lab: Lab, before: int) -> list[bool]:
    assert lab.device is not None
    return [v["accepted"] for v in lab.device.named("procycmd")[before:]]


def _wait_warning(proxy: ManagedProcess, count: int) -> dict[str, Any]:
    _stages.wait_until(lambda: len(proxy.named("warning")) >= count, 10, "a warning event")
    return proxy.named("warning")[count - 1]


def test_another_users_tcp_connection_is_refused_and_the_real_viewer_then_works(lab: Lab, tmp_path: Path):
    assert lab.device is not None and lab.xvnc is not None
    before = len(lab.device.named("procycmd"))
    proxy = _proxy(lab, tmp_path, "uid-tcp")
    try:
        port = proxy.wait_for("listening")["port"]
        attacker = connect_as_nobody(socket.AF_INET, ("127.0.0.1", port))
        assert attacker == {"bytes": 0, "closed": True, "error": None}, attacker
        warning = _wait_warning(proxy, 1)
        assert proxy.process.poll() is None and not proxy.named("closed")  # still waiting
        with socket.create_connection(("127.0.0.1", port), timeout=10) as viewer:
            assert rfb_server_init(viewer) == (lab.xvnc.width, lab.xvnc.height)
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    assert "uid 65534" in warning["message"] and "refused" in warning["message"]
    assert [e["event"] for e in proxy.events].count("viewer-connected") == 1
    assert _verdicts(lab, before) == [True]  # one PROCYCMD: the real viewer's


def test_with_max_viewers_a_later_connection_of_another_user_is_refused(lab: Lab, tmp_path: Path):
    assert lab.device is not None and lab.xvnc is not None
    before = len(lab.device.named("procycmd"))
    proxy = _proxy(lab, tmp_path, "uid-max-viewers", "--max-viewers", "2")
    try:
        port = proxy.wait_for("listening")["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            assert rfb_server_init(first)[0] == lab.xvnc.width
        proxy.wait_for("viewer-closed")
        attacker = connect_as_nobody(socket.AF_INET, ("127.0.0.1", port))
        assert attacker == {"bytes": 0, "closed": True, "error": None}, attacker
        warning = _wait_warning(proxy, 1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            assert rfb_server_init(second)[0] == lab.xvnc.width
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
    assert "uid 65534" in warning["message"]
    names = [e["event"] for e in proxy.events]
    assert names.count("secret") == 2 and names.count("viewer-connected") == 2  # no password fetched for it
    assert _verdicts(lab, before) == [True, True]


@pytest.mark.parametrize("mode", ["default", "666"])
def test_a_unix_listener_keeps_other_users_out(lab: Lab, tmp_path: Path, mode: str):
    assert lab.device is not None and lab.xvnc is not None
    # A directory everyone may enter, so the socket's own mode (or SO_PEERCRED) is the
    # only thing between the other user and the viewer port.
    directory = Path(tempfile.mkdtemp(prefix="secshadow-uid-"))
    os.chmod(directory, 0o755)  # noqa: S103 - on purpose: the socket must be the only barrier
    path = directory / "viewer.sock"
    listen = f"unix:{path}" + ("" if mode == "default" else f":mode={mode}")
    before = len(lab.device.named("procycmd"))
    proxy = _proxy(lab, tmp_path, f"uid-unix-{mode}", "--listen", listen)
    try:
        proxy.wait_for("listening")
        socket_mode = stat.S_IMODE(os.stat(path).st_mode)
        attacker = connect_as_nobody(socket.AF_UNIX, str(path))
        assert attacker["bytes"] == 0, attacker
        if mode == "666":
            warning = _wait_warning(proxy, 1)
        with socket.socket(socket.AF_UNIX) as viewer:
            viewer.connect(str(path))
            assert rfb_server_init(viewer) == (lab.xvnc.width, lab.xvnc.height)
        assert proxy.process.wait(timeout=20) == 0
    finally:
        proxy.stop()
        path.unlink(missing_ok=True)
        directory.rmdir()
    if mode == "default":
        assert socket_mode == 0o600
        assert attacker["bytes"] == 0 and "PermissionError" in (attacker["error"] or ""), attacker
        assert not proxy.named("warning")  # it never got in
    else:
        assert socket_mode == 0o666
        assert attacker == {"bytes": 0, "closed": True, "error": None}, attacker
        assert "uid 65534" in warning["message"]
    assert _verdicts(lab, before) == [True]
