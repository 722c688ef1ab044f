"""Exit codes and messages the review found wrong (issue 9, item 9), and a flooding device
that flooded the log (item 10), against the real ``secshadow-proxy`` and real loopback
peers:

- a device that accepts TCP and never finishes TLS: exit 5 ``tls-handshake`` "did not
  finish within N s" (was exit 1 ``internal: TimeoutError``); a TCP connect that hangs:
  exit 4 "within N s";
- device hosts ``-x``, ``[::1]``, ``host_name``, ``a..b`` (flag or secret): exit 2 saying
  why (was exit 1 ``internal: ValueError``); an unreachable host: exit 4;
- an IPv6 listener (``tcp:0:interface=\\:\\:1``, ``tcp6:0``): exit 2 before any secret is
  fetched (was accepted);
- a failed snapshot always has a reason (was ``--snapshot failed: `` and nothing);
- a pinned device flooding before ``PROCYCMD``: one warning line with a count (was one
  line per TLS record: thousands).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from secshadow.lab.harness import python_module
from secshadow.lab.scripted import HELLO, DeviceConn, PeerClosed, ScriptedDevice, secret_json
from secshadow.tests import _stages
from secshadow.tests._stages import CERT, KEY, Backlogged, SilentDevice, wait_until

pytestmark = pytest.mark.integration


def _cli(args: list[str], secret: bytes, timeout: float = 30) -> tuple[int, list[dict[str, Any]], str, float]:
    """Run ``secshadow-proxy --json ARGS`` with ``secret`` on stdin; returns (exit status,
    events, stderr, seconds)."""
    started = time.monotonic()
    result = subprocess.run([*python_module("secshadow.cli"), "--json", *args], input=secret, capture_output=True,
                            timeout=timeout, env=_stages.proxy_env())
    events = [json.loads(line) for line in result.stdout.decode().splitlines() if line.startswith("{")]
    return result.returncode, events, result.stderr.decode(), time.monotonic() - started


def _secret(port: int, host: str = "127.0.0.1") -> bytes:
    return secret_json(CERT, str(uuid.uuid4()), port, host=host)


def _error(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events and events[-1]["event"] == "error", events
    return events[-1]


# ------------------------------------------------------------------ connect deadlines
def test_a_device_that_never_finishes_tls_is_exit_5_within_the_connect_timeout():
    with SilentDevice(CERT, KEY) as device:
        code, events, stderr, took = _cli(["--viewer", "none", "--secret-file", "-", "--connect-timeout", "1"],
                                          _secret(device.port))
        wait_until(lambda: all(c.closed_at is not None for c in device.silent), 5, "the connection closed")
    error = _error(events)
    assert (code, error["code"]) == (5, "tls-handshake"), (code, error, stderr)
    assert error["message"] == f"the TLS handshake with 127.0.0.1:{device.port} did not finish within 1 s"
    assert device.silent and device.silent[0].received[:1] == b"\x16"  # TCP was up, a ClientHello went out
    print(f"\nsilent TLS device, --connect-timeout 1: exit 5 after {took:.2f} s (process start included)")
    assert took < 5


def test_a_tcp_connect_that_hangs_is_exit_4_within_the_connect_timeout():
    backlog = Backlogged()
    try:
        code, events, stderr, took = _cli(["--viewer", "none", "--secret-file", "-", "--connect-timeout", "1"],
                                          _secret(backlog.port))
    finally:
        backlog.stop()
    error = _error(events)
    assert (code, error["code"]) == (4, "device-unreachable"), (code, error, stderr)
    assert error["message"] == f"could not connect to the device at 127.0.0.1:{backlog.port} within 1 s"
    assert took < 5


# ------------------------------------------------------------------ device hosts
@pytest.mark.parametrize("where", ["flag", "secret"])
@pytest.mark.parametrize("host, why", [
    ("-x", "a label cannot start or end with '-'"),
    ("[::1]", "write an IP address without brackets: '::1'"),
    ("host_name", "only letters, digits, '-' and '.' are allowed"),
    ("a..b", "has an empty label"),
])
def test_a_bad_device_host_is_exit_2_saying_why(host: str, why: str, where: str):
    if where == "flag":
        args, secret = [f"--device-host={host}"], _secret(5900)
    else:
        args, secret = [], _secret(5900, host=host)
    code, events, stderr, _ = _cli(["--viewer", "none", "--secret-file", "-", *args], secret)
    error = _error(events)
    assert (code, error["code"]) == (2, "usage"), (code, error)
    assert why in error["message"]
    assert error["message"].startswith("--device-host" if where == "flag" else "the secret's host")
    assert "Traceback" not in stderr and "pinned" not in [e["event"] for e in events]


@pytest.mark.parametrize("case", ["closed port", "unresolvable name"])
def test_an_unreachable_device_is_exit_4(case: str):
    if case == "closed port":
        args = ["--device-port", str(_closed_port())]
    else:
        args = ["--device-host", "no-such-device.invalid"]
    code, events, _, took = _cli(["--viewer", "none", "--secret-file", "-", "--connect-timeout", "5", *args],
                                 _secret(5900))
    error = _error(events)
    assert (code, error["code"]) == (4, "device-unreachable"), (code, error)
    assert ("cannot connect" if case == "closed port" else "no-such-device.invalid") in error["message"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ listeners
@pytest.mark.parametrize("listen", ["tcp:0:interface=\\:\\:1", "tcp6:0", "tcp6:0:interface=\\:\\:1"])
def test_an_ipv6_listener_is_refused_before_the_secret_is_used(listen: str):
    code, events, _, _ = _cli(["--viewer", "none", "--viewer-timeout", "2", "--secret-file", "-", "--listen", listen],
                              _secret(5900))
    assert [e["event"] for e in events] == ["error"]  # no secret, no device connection
    assert (code, events[0]["code"]) == (2, "usage")
    assert "IPv6 listeners are not supported" in events[0]["message"]


# ------------------------------------------------------------------ snapshots
def _hello_then_close(conn: DeviceConn) -> None:
    conn.recv_command()
    conn.send(HELLO)


def test_a_failed_snapshot_says_why(tmp_path: Path):
    with ScriptedDevice(CERT, KEY, _hello_then_close) as device:
        code, events, _, _ = _cli(["--secret-file", "-", "--snapshot", str(tmp_path / "shot.png")],
                                  _secret(device.port))
    error = _error(events)
    assert (code, error["code"]) == (8, "viewer")
    prefix = "--snapshot failed: "
    assert error["message"].startswith(prefix) and len(error["message"]) > len(prefix) + 10, error
    assert not (tmp_path / "shot.png").exists()


@pytest_twisted.ensureDeferred
async def test_a_snapshot_error_without_a_message_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """In-process CLI: an exception whose str() is empty still gives a reason."""
    from secshadow import cli, snapshot

    clients: list[socket.socket] = []

    def never_a_frame(reactor_: Any, host: str, port: int, path: str, timeout: float) -> Deferred[Any]:
        """Connects and never completes: the session's end cancels it, and a bare
        CancelledError has an empty str()."""
        clients.append(socket.create_connection((host, port), timeout=5))
        return Deferred()

    monkeypatch.setattr(snapshot, "take_snapshot", never_a_frame)
    with ScriptedDevice(CERT, KEY, _hello_then_close) as device:
        out, err = StringIO(), StringIO()
        code = await cli.run(reactor, ["--json", "--secret-file", "-", "--snapshot", str(tmp_path / "x.png")],
                             BytesIO(_secret(device.port)), out, err, install_signals=False, start_logging=False)
    for client in clients:
        client.close()
    error = json.loads(out.getvalue().splitlines()[-1])
    assert (code, error["message"]) == (8, "--snapshot failed: CancelledError")


# ------------------------------------------------------------------ log amplification
def _flood(conn: DeviceConn) -> None:
    """A pinned device that talks before PROCYCMD: 100-byte TLS records, as fast as it
    can, for up to 3 s or until the proxy closes."""
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            conn.send(b"x" * 100, timeout=1)
            conn.sent = getattr(conn, "sent", 0) + 100  # type: ignore[attr-defined]
    except (PeerClosed, TimeoutError, OSError):
        pass


def test_a_device_flooding_before_procycmd_gives_one_warning_line_with_a_count():
    with ScriptedDevice(CERT, KEY, _flood) as device:
        code, events, stderr, _ = _cli(["--viewer", "none", "--viewer-timeout", "2", "--secret-file", "-"],
                                       _secret(device.port))
        sent = sum(getattr(c, "sent", 0) for c in device.conns)
    lines = stderr.splitlines()
    flood = [line for line in lines if "before PROCYCMD" in line]
    print(f"\nflooding device: {sent} bytes sent before the proxy closed it; {len(flood)} warning line(s), "
          f"{len(lines)} stderr lines in all")
    assert len(flood) == 1, flood[:5]
    assert "bytes before PROCYCMD" in flood[0] and any(word.isdigit() for word in flood[0].split())
    assert len(lines) < 15, lines
    assert code == 8 and events[-1]["code"] == "viewer"  # the session went on waiting for a viewer
