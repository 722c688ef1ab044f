"""The real thing: the secshadow-proxy CLI as a subprocess, the IMI server and device
emulator as subprocesses, a real Xvnc behind the device, real pixels, and the real
TigerVNC viewer on Xvfb. In CI a missing program fails these tests (conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secshadow.lab import certs
from secshadow.lab.harness import Lab, ManagedProcess, child_environment, python_module
from secshadow.snapshot import read_pixel
from secshadow.tests._screens import close_viewer, share_of_colour, start_xvfb
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration




def run_proxy(argv: list[str], stdin: bytes | None = None, timeout: float = 60) -> tuple[int, list[dict], str]:
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, env=child_environment())
    events = [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]
    return result.returncode, events, result.stderr.decode()


def names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]




def test_snapshot_through_the_tunnel_shows_the_device_screen(lab: Lab, tmp_path: Path):
    png = tmp_path / "shot.png"
    before = len(lab.device.named("procycmd"))
    code, events, stderr = run_proxy(lab.proxy_argv("--json", "--snapshot", str(png)))
    assert code == 0, stderr
    assert names(events) == ["secret", "pinned", "listening", "viewer-connected", "session-started", "closed"]
    assert events[0]["source"] == "ums"
    assert events[4]["rfb_version"] == "RFB 003.008"
    assert events[5]["bytes_to_viewer"] > 640 * 480  # a whole frame crossed the tunnel
    x, y = lab.xvnc.background_point
    assert read_pixel(png, x, y) == lab.xvnc.background_rgb
    assert lab.device.named("procycmd")[before:] == [{"event": "procycmd", "accepted": True, "reason": "ok"}]


def test_console_flow_secret_on_stdin_viewer_none(lab: Lab, tmp_path: Path):
    """What a Java console does: secret on stdin, --viewer none, its own RFB client."""
    password = lab.fresh_password()
    proxy = ManagedProcess("console-proxy", [*python_module("secshadow.cli"), "--secret-file", "-",
                                             "--viewer", "none", "--json"],
                           tmp_path, env=child_environment(), stdin=subprocess.PIPE)
    proxy.process.stdin.write(lab.secret_json(password))
    proxy.process.stdin.close()
    listening = proxy.wait_for("listening")
    assert listening["host"] == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", listening["port"]), timeout=10) as viewer:
        assert _recv_exactly(viewer, 12) == b"RFB 003.008\n"
    assert proxy.process.wait(timeout=20) == 0
    proxy.stop()
    assert names(proxy.events) == ["secret", "pinned", "listening", "viewer-connected", "session-started",
                                   "closed"]
    assert proxy.events[0]["source"] == "file"
    assert "viewer-started" not in names(proxy.events)


def test_wrong_pin_exits_6_and_the_device_never_sees_procycmd(lab: Lab, tmp_path: Path):
    twin_cert, twin_key = certs.twin_of(lab.device_cert.read_bytes())
    (tmp_path / "twin.crt").write_bytes(twin_cert)
    (tmp_path / "twin.key").write_bytes(twin_key)
    impostor = lab.start_device(cert=tmp_path / "twin.crt", key=tmp_path / "twin.key", name="impostor")
    try:
        argv = lab.proxy_argv("--json", "--viewer", "none")
        argv[argv.index("--device-port") + 1] = str(impostor.wait_for("listening")["port"])
        code, events, stderr = run_proxy(argv)
        assert code == 6, stderr
        assert names(events) == ["secret", "error"]
        assert events[-1]["code"] == "pin-mismatch"
        time.sleep(0.3)
    finally:
        impostor.stop()
    assert impostor.named("procycmd") == []
    assert [e["count"] for e in impostor.named("app-bytes")] in ([0], [])


def test_wrong_password_exits_7_with_a_clear_message(lab: Lab):
    code, events, stderr = run_proxy(
        [*python_module("secshadow.cli"), "--secret-file", "-", "--json", "--viewer-command",
         f"{sys.executable} -c \"import socket; socket.create_connection(('{{host}}', {{port}})).recv(12)\""],
        stdin=lab.secret_json("00000000-0000-0000-0000-000000000000"),
    )
    assert code == 7, stderr
    assert events[-1]["code"] == "device-rejected"
    assert "wrong or expired password" in events[-1]["message"]
    assert "00000000-0000" not in stderr + json.dumps(events)


def test_one_time_password_is_single_use(lab: Lab, tmp_path: Path):
    password = lab.fresh_password()
    first, _, err1 = run_proxy([*python_module("secshadow.cli"), "--secret-file", "-", "--json",
                                "--snapshot", str(tmp_path / "a.png")], stdin=lab.secret_json(password))
    second, events, _ = run_proxy([*python_module("secshadow.cli"), "--secret-file", "-", "--json",
                                   "--snapshot", str(tmp_path / "b.png")], stdin=lab.secret_json(password))
    assert first == 0, err1
    assert second == 7 and events[-1]["code"] == "device-rejected"
    assert not (tmp_path / "b.png").exists()


def test_a_second_viewer_gets_a_fresh_password_from_the_ums(lab: Lab, tmp_path: Path):
    accepted_before = len(lab.device.named("procycmd"))
    proxy = ManagedProcess("reconnect-proxy", lab.proxy_argv("--json", "--viewer", "none", "--max-viewers", "2"),
                           tmp_path, env=child_environment())
    listening = proxy.wait_for("listening")
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", listening["port"]), timeout=10) as viewer:
            assert _recv_exactly(viewer, 12) == b"RFB 003.008\n"
        if _ == 0:
            proxy.wait_for("viewer-closed")
    assert proxy.process.wait(timeout=20) == 0
    proxy.stop()
    assert names(proxy.events) == ["secret", "pinned", "listening", "viewer-connected", "session-started",
                                   "viewer-closed", "viewer-connected", "secret", "pinned", "session-started",
                                   "closed"]
    verdicts = lab.device.named("procycmd")[accepted_before:]
    assert [v["accepted"] for v in verdicts] == [True, True]  # two passwords, each valid once


def test_max_viewers_with_a_file_secret_is_refused_up_front(lab: Lab):
    code, events, _ = run_proxy([*python_module("secshadow.cli"), "--json", "--secret-file", "-",
                                 "--max-viewers", "2"], stdin=lab.secret_json("p" * 36))
    assert code == 2 and "works once" in events[-1]["message"]


def test_unreachable_device_exits_4(lab: Lab):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    argv = lab.proxy_argv("--json", "--viewer", "none")
    argv[argv.index("--device-port") + 1] = str(closed_port)
    code, events, _ = run_proxy(argv)
    assert code == 4 and events[-1]["code"] == "device-unreachable"


def test_untrusted_ums_certificate_exits_3(lab: Lab):
    argv = lab.proxy_argv("--json", "--viewer", "none")
    argv[argv.index("--ums-fingerprint") + 1] = "00" * 32
    code, events, stderr = run_proxy(argv)
    assert code == 3, stderr
    assert names(events) == ["error"] and events[0]["code"] == "ums"


def test_without_a_trust_flag_the_system_store_refuses_a_self_signed_ums(lab: Lab):
    argv = lab.proxy_argv("--json", "--viewer", "none")
    i = argv.index("--ums-fingerprint")
    del argv[i:i + 2]
    code, events, _ = run_proxy(argv)
    assert code == 3
    assert "--ums-fingerprint or --ums-ca" in events[-1]["message"]


def test_unknown_device_at_ums_exits_3(lab: Lab):
    argv = lab.proxy_argv("--json", "--viewer", "none")
    argv[argv.index("--device") + 1] = "999"
    code, events, _ = run_proxy(argv)
    assert code == 3 and "999" in events[-1]["message"]


def test_viewer_timeout_exits_8(lab: Lab):
    code, events, _ = run_proxy(lab.proxy_argv("--json", "--viewer", "none", "--viewer-timeout", "1"))
    assert code == 8
    assert names(events) == ["secret", "pinned", "listening", "error"]
    assert events[-1]["code"] == "viewer"


def test_hello_timeout_when_the_user_never_consents_exits_7(lab: Lab, tmp_path: Path):
    slow = lab.start_device("--consent-delay", "30", name="slow-consent")
    try:
        argv = lab.proxy_argv("--json", "--hello-timeout", "1", "--snapshot", str(tmp_path / "x.png"))
        argv[argv.index("--device-port") + 1] = str(slow.wait_for("listening")["port"])
        code, events, _ = run_proxy(argv)
    finally:
        slow.stop()
    assert code == 7 and "--hello-timeout" in events[-1]["message"]


def test_sigterm_while_waiting_closes_cleanly_and_exits_0(lab: Lab, tmp_path: Path):
    proxy = ManagedProcess("sig-proxy", lab.proxy_argv("--json", "--viewer", "none"), tmp_path,
                           env=child_environment())
    listening = proxy.wait_for("listening")
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=10) == 0
    proxy.stop()
    assert names(proxy.events)[-1] == "closed"
    assert "SIGTERM" in proxy.events[-1]["reason"]
    with pytest.raises(OSError):  # the listener is released
        socket.create_connection(("127.0.0.1", listening["port"]), timeout=2).close()


@pytest.mark.parametrize("argv, fragment", [
    (["--viewer", "none"], "no shadow secret"),
    (["--secret-file", "-", "--ums", "https://x", "--device", "1"], "not both"),
    (["--secret-file", "-", "--tls-profile", "weak"], "invalid choice"),
    (["--secret-file", "-", "--viewer-command", "vncviewer {host}"], "{port} or {display}"),
    (["--secret-file", "-", "--connect-timeout", "-3"], "positive"),
    (["--ums", "http://127.0.0.1:1", "--device", "1", "--ums-user", "u"], "unencrypted"),
    (["--secret-file", "-", "--viewer", "no-such-viewer"], "unknown viewer"),
    (["--secret-file", "-", "--listen", "bogus:1"], "not a server endpoint"),
])
def test_usage_errors_exit_2_with_an_error_event(argv: list[str], fragment: str):
    code, events, stderr = run_proxy([*python_module("secshadow.cli"), "--json", *argv], stdin=b"{}")
    assert code == 2
    assert events[-1]["event"] == "error" and events[-1]["code"] == "usage"
    assert fragment in events[-1]["message"]
    assert "Traceback" not in stderr


def test_empty_certificate_is_a_clear_usage_error_never_skipped_pinning():
    code, events, stderr = run_proxy([*python_module("secshadow.cli"), "--json", "--secret-file", "-"],
                                     stdin=b'{"certificate": "", "password": "p", "host": "127.0.0.1"}')
    assert code == 2 and "reboot the device" in events[-1]["message"]
    assert "Traceback" not in stderr


def test_real_tigervnc_viewer_on_xvfb_shows_the_device_and_ends_the_session(lab: Lab, tmp_path: Path):
    for program in ("Xvfb", "vncviewer", "import"):
        require_program(program)
    display = start_xvfb(tmp_path)
    try:
        env = child_environment({"DISPLAY": display.name})
        proxy = ManagedProcess("tiger-proxy", lab.proxy_argv("--json", "--viewer", "tigervnc"), tmp_path, env=env)
        started = proxy.wait_for("viewer-started")
        proxy.wait_for("session-started", timeout=30)
        shot = tmp_path / "xvfb.png"
        colour_share = 0.0
        for _ in range(50):  # the window maps and paints shortly after the session starts
            subprocess.run(["import", "-display", display.name, "-window", "root", str(shot)],
                           check=True, capture_output=True, timeout=20)
            colour_share = share_of_colour(shot, lab.xvnc.background_rgb)
            if colour_share > 0.25:
                break
            time.sleep(0.2)
        assert colour_share > 0.25, f"the viewer window does not show the device screen ({colour_share:.2%})"
        close_viewer(started["pid"])  # the user closes the viewer
        assert proxy.process.wait(timeout=20) == 0
        proxy.stop()
        assert names(proxy.events)[-1] == "closed"
        assert proxy.events[-1]["reason"] == "viewer disconnected"
        with pytest.raises(ProcessLookupError):
            os.kill(started["pid"], 0)  # reaped, not a zombie
    finally:
        display.stop()


# ---------------------------------------------------------------- helpers


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
