"""``secshadow-proxy --control stdio``: request validation (unit) and 20 concurrent
sessions in one process against the IMI server, the device emulator and a real Xvnc
(integration)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from secshadow.control import MAX_REQUEST_BYTES, Controller, _Requests
from secshadow.options import SessionOptions
from secshadow.lab.harness import Lab, ManagedProcess, child_environment


def _controller() -> tuple[Controller, list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []
    controller = Controller(MemoryReactorClock(), lambda text: lines.append(json.loads(text)),
                            lambda text: None, SessionOptions(), ums=None)
    return controller, lines


_SECRET = '"secret": {"certificate": "x", "password": "p"}'


@pytest.mark.parametrize("request_line, fragment", [
    (b'{"op": "open", "session": "a", "viewer_timeout": -1, ' + _SECRET.encode() + b'}',
     "--viewer-timeout must be a positive number of seconds"),
    (b'{"op": "open", "session": "a", "hello_timeout": "nan", ' + _SECRET.encode() + b'}',
     "--hello-timeout must be a positive number of seconds"),
    (b'{"op": "open", "session": "a", "max_viewers": 1e999, ' + _SECRET.encode() + b'}',
     "--max-viewers must be a whole number"),
    (b'{"op": "open", "session": "a", "connect_timeout": 1' + b"0" * 400 + b', ' + _SECRET.encode() + b'}',
     "--connect-timeout must be"),
    (b'{"op": "open", "session": "a", "idle_timeout": true, ' + _SECRET.encode() + b'}',
     "--idle-timeout must be a number"),
    (b'{"op": "open", "session": "a", "listen": "tcp:0:interface=\\\\:\\\\:1", ' + _SECRET.encode() + b'}',
     "IPv6 listeners are not supported"),
    (b'{"op": "open", "session": "a", "frobnicate": 1, ' + _SECRET.encode() + b'}', "unknown session option"),
    (b"[" * 100_000 + b"]" * 100_000, "one JSON object per line"),

    (b"not json", "one JSON object per line"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"op": "dance"}', "unknown op"),
    (b'{"op": "open"}', "'session' must be"),
    (b'{"op": "open", "session": "a b"}', "'session' must be"),
    (b'{"op": "open", "session": "a"}', "exactly one of 'device'"),
    (b'{"op": "open", "session": "a", "device": "27"}', "needs the proxy started with --ums"),
    (b'{"op": "open", "session": "a", "secret": {"certificate": "", "password": "p"}}', "reboot the device"),
    (b'{"op": "close", "session": "nope"}', "no open session"),
])
def test_bad_requests_get_an_error_event_and_nothing_starts(request_line: bytes, fragment: str):
    controller, lines = _controller()
    controller.request(request_line)
    assert controller.sessions == {}
    assert len(lines) == 1 and lines[0]["event"] == "error" and lines[0]["code"] == "usage"
    assert fragment in lines[0]["message"]
    assert controller.sessions == {}


def test_list_and_shutdown_with_no_sessions():
    controller, lines = _controller()
    controller.request(b'{"op": "list"}')
    assert lines == [{"event": "sessions", "sessions": []}]
    controller.request(b'{"op": "shutdown"}')
    assert controller.finished.called
    controller.request(b'{"op": "open", "session": "late", "device": "1"}')
    assert "shutting down" in lines[-1]["message"]


# ------------------------------------------------------------------ integration
SESSIONS = 20




def _control_argv(lab: Lab) -> list[str]:
    """``secshadow-proxy --control stdio`` with the lab's IMI flags (no --device: per request)."""
    argv = lab.proxy_argv("--control", "stdio")
    i = argv.index("--device")
    del argv[i:i + 2]
    return argv


def _server_init(port: int) -> tuple[int, int, bytes]:
    """A minimal RFB client (RFC 6143 7.1-7.3): version, security type None, ClientInit
    (shared), ServerInit. Returns (width, height, desktop name)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.settimeout(20)
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                assert chunk, "connection closed during the RFB handshake"
                data += chunk
            return data
        assert read(12) == b"RFB 003.008\n"
        sock.sendall(b"RFB 003.008\n")
        count = read(1)[0]
        types = read(count)
        assert 1 in types, f"security types {list(types)} lack None"
        sock.sendall(b"\x01")
        assert read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
        sock.sendall(b"\x01")  # ClientInit: shared, so 20 viewers coexist on one Xvnc
        width, height = struct.unpack("!HH", read(4))
        read(16)  # pixel format
        name = read(struct.unpack("!I", read(4))[0])
        return width, height, name


@pytest.mark.integration
def test_twenty_concurrent_sessions_in_one_control_process(lab: Lab, tmp_path: Path):
    argv = _control_argv(lab)
    proxy = ManagedProcess("control", argv, tmp_path, env=child_environment(), stdin=subprocess.PIPE)
    assert proxy.process.stdin is not None
    started = time.monotonic()
    for n in range(SESSIONS):
        proxy.process.stdin.write(json.dumps({"op": "open", "session": f"d{n}", "device": "27"}).encode() + b"\n")
    proxy.process.stdin.flush()
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(ports) < SESSIONS and time.monotonic() < deadline:
        for event in proxy.named("listening"):
            ports[event["session"]] = event["port"]
        errors = proxy.named("error")
        assert not errors, errors
        time.sleep(0.05)
    all_listening = time.monotonic() - started
    assert len(ports) == SESSIONS and len(set(ports.values())) == SESSIONS  # one listener each

    proxy.process.stdin.write(b'{"op": "list"}\n')
    proxy.process.stdin.flush()
    listing = proxy.wait_for("sessions")["sessions"]
    assert sorted(s["session"] for s in listing) == sorted(ports)

    # Every session reaches the real Xvnc through its own pinned tunnel, at the same time.
    sockets_open = time.monotonic()
    sizes = [_server_init(port) for port in ports.values()]
    assert all((w, h) == (lab.xvnc.width, lab.xvnc.height) for w, h, _ in sizes)
    handshakes = time.monotonic() - sockets_open

    proxy.process.stdin.close()  # end of input: shut down
    assert proxy.process.wait(timeout=30) == 0
    proxy.stop()
    closed = {e["session"] for e in proxy.named("closed")}
    assert closed == set(ports)
    print(f"\n{SESSIONS} sessions: all listening after {all_listening:.2f} s; "
          f"{SESSIONS} RFB handshakes through the tunnels in {handshakes:.2f} s")


@pytest.mark.integration
def test_close_one_session_while_others_run(lab: Lab, tmp_path: Path):
    argv = _control_argv(lab)
    proxy = ManagedProcess("control-close", argv, tmp_path, env=child_environment(), stdin=subprocess.PIPE)
    assert proxy.process.stdin is not None
    for name in ("keep", "drop"):
        proxy.process.stdin.write(json.dumps({"op": "open", "session": name, "device": "27"}).encode() + b"\n")
    proxy.process.stdin.write(b'{"op": "open", "session": "keep", "device": "27"}\n')  # duplicate id
    proxy.process.stdin.flush()
    duplicate = proxy.wait_for("error")
    assert duplicate["session"] == "keep" and "already open" in duplicate["message"]
    deadline = time.monotonic() + 30
    while len(proxy.named("listening")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.process.stdin.write(b'{"op": "close", "session": "drop"}\n')
    proxy.process.stdin.flush()
    closed = proxy.wait_for("closed")
    assert closed["session"] == "drop" and closed["reason"] == "closed by the console"
    keep_port = next(e["port"] for e in proxy.named("listening") if e["session"] == "keep")
    assert _server_init(keep_port)[:2] == (lab.xvnc.width, lab.xvnc.height)
    proxy.process.stdin.write(b'{"op": "shutdown"}\n')
    proxy.process.stdin.flush()
    assert proxy.process.wait(timeout=20) == 0
    proxy.stop()
    assert {e["session"] for e in proxy.named("closed")} == {"keep", "drop"}


def test_an_over_long_line_gets_one_error_and_the_next_lines_are_served():
    controller, lines = _controller()
    reader = _Requests(controller)
    # One read holds the start of a huge line; later reads finish it and carry good requests.
    reader.dataReceived(b'{"op": "list", "pad": "' + b"x" * (MAX_REQUEST_BYTES + 10))
    reader.dataReceived(b"x" * (MAX_REQUEST_BYTES * 2))
    reader.dataReceived(b'"}\n{"op": "list"}\n{"op": "dance"}\n')
    assert [line["event"] for line in lines] == ["error", "sessions", "error"]
    assert "longer than" in lines[0]["message"] and "unknown op" in lines[2]["message"]


def test_an_over_long_line_inside_one_read_does_not_swallow_the_requests_after_it():
    controller, lines = _controller()
    reader = _Requests(controller)
    reader.dataReceived(b"y" * (MAX_REQUEST_BYTES + 1) + b'\n{"op": "list"}\n{"op": "list"}\n')
    assert [line["event"] for line in lines] == ["error", "sessions", "sessions"]


@pytest.mark.integration
def test_control_mode_web_session_gets_a_page_and_a_websocket_that_reach_the_device(lab: Lab, tmp_path: Path):
    from secshadow.tests._web_helpers import websocket_handshake

    argv = _control_argv(lab)
    proxy = ManagedProcess("control-web", argv, tmp_path, env=child_environment(), stdin=subprocess.PIPE)
    assert proxy.process.stdin is not None
    proxy.process.stdin.write(b'{"op": "open", "session": "w", "device": "27", "web": true}\n')
    proxy.process.stdin.write(b'{"op": "open", "session": "bad", "device": "27", "web": "yes"}\n')
    proxy.process.stdin.flush()
    error = proxy.wait_for("error")
    assert error["session"] == "bad" and "'web' must be true or false" in error["message"]
    listening = proxy.wait_for("listening")
    assert listening["session"] == "w" and listening["url"].startswith(f"http://127.0.0.1:{listening['port']}/")
    path = listening["websocket"].split(str(listening["port"]), 1)[1]
    status, sock = websocket_handshake(listening["port"], path)
    try:
        assert status == 101
        started = proxy.wait_for("session-started")
        assert started["session"] == "w"
    finally:
        sock.close()
    proxy.process.stdin.write(b'{"op": "shutdown"}\n')
    proxy.process.stdin.flush()
    assert proxy.process.wait(timeout=20) == 0
    proxy.stop()
