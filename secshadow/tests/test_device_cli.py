"""``secshadow-device`` as a real subprocess: flags, exit codes, JSON lines, signals."""

from __future__ import annotations

import hashlib
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from secshadow.lab import certs
from secshadow.secret import certificate_fingerprint
from secshadow.tests._device_helpers import PASSWORD
from secshadow.tests._device_process import DeviceProcess, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    return path


def test_list_firmware() -> None:
    result = run_cli(["--list-firmware"])
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert "current" in names and "current-lf" in names


def _bad_flag_cases(tmp: Path, password_file: Path) -> dict[str, tuple[list[str], str]]:
    cert, key = certs.write_pair(tmp, "device")
    other_cert, _ = certs.write_pair(tmp, "other")
    ok = ["--cert", str(cert), "--key", str(key)]
    pw = ["--accept-password-file", str(password_file)]
    return {
        "unknown flag": (["--bogus"], "unrecognized arguments"),
        "no password source": (ok, "how are passwords checked"),
        "no certificate": (pw, "--cert PEM and --key PEM, or --generate-cert"),
        "cert and generate": ([*ok, *pw, "--generate-cert", str(tmp / "g")], "not both"),
        "unknown firmware": ([*ok, *pw, "--firmware", "nope"], "unknown firmware profile 'nope'"),
        "bad vnc": ([*ok, *pw, "--vnc", "localhost"], "--vnc wants HOST:PORT"),
        "bad vnc port": ([*ok, *pw, "--vnc", "127.0.0.1:99999"], "out of range"),
        "missing cert file": (["--cert", str(tmp / "none.pem"), "--key", str(key), *pw], "cannot read certificate"),
        "key of another cert": (["--cert", str(other_cert), "--key", str(key), *pw], "does not belong"),
        "ums without device": ([*ok, "--ums", "https://127.0.0.1:8443"], "--ums needs --device-id"),
        "ums without trust": ([*ok, "--ums", "https://127.0.0.1:8443", "--device-id", "27"], "exactly one of"),
        "both password sources": ([*ok, *pw, "--ums", "https://x", "--device-id", "1"], "not both"),
        "empty password file": ([*ok, "--accept-password-file", str(tmp / "empty")], "password is empty"),
        "negative timeout": ([*ok, *pw, "--command-timeout", "-1"], "timeouts must be positive"),
    }


CASES = [
    "unknown flag", "no password source", "no certificate", "cert and generate", "unknown firmware", "bad vnc",
    "bad vnc port", "missing cert file", "key of another cert", "ums without device", "ums without trust",
    "both password sources", "empty password file", "negative timeout",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_flags_exit_2_without_traceback(tmp_path: Path, password_file: Path, case: str) -> None:
    (tmp_path / "empty").write_text("\n")
    args, message = _bad_flag_cases(tmp_path, password_file)[case]
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "secshadow-device: error:" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert not (tmp_path / "g").exists()  # nothing generated when the flags are wrong


def test_generated_certificate_is_served_and_sigterm_stops(tmp_path: Path, password_file: Path) -> None:
    port_file = tmp_path / "port"
    device = DeviceProcess(
        ["--generate-cert", str(tmp_path / "certs"), "--accept-password-file", str(password_file),
         "--port-file", str(port_file)]
    )
    try:
        generated = device.named("certificate")[0]
        assert generated["certificate_sha256"] == device.certificate_sha256
        assert int(port_file.read_text()) == device.port
        key_path = Path(generated["key_path"])
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        served_pem = ssl.get_server_certificate(("127.0.0.1", device.port), timeout=5)
        served = x509.load_pem_x509_certificate(served_pem.encode())
        der = ssl.PEM_cert_to_DER_cert(served_pem)
        assert certificate_fingerprint(der) == device.certificate_sha256
        assert hashlib.sha256(der).hexdigest().upper() == device.certificate_sha256.replace(":", "")
        assert served.subject.rfc4514_string() == "O=IGEL,L=Bremen,C=DE"
        # get_server_certificate connected and left: the device reported it.
        device.wait_for("app-bytes")
        assert device.named("connection")
    finally:
        status = device.stop()
    assert status == 0
    assert "Traceback" not in device.stderr
    assert PASSWORD not in device.stderr + repr(device.events)


def test_listen_failure_is_reported(tmp_path: Path, password_file: Path) -> None:
    cert, key = certs.write_pair(tmp_path, "device")
    result = run_cli(["--cert", str(cert), "--key", str(key), "--accept-password-file", str(password_file),
                      "--listen", "tcp:1:interface=203.0.113.1"])
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_ums_mode_refuses_when_the_imi_server_is_unreachable(tmp_path: Path) -> None:
    """--ums wiring: the password goes to the IMI server; when that fails the console is
    refused silently (the device never lets a console in on an unchecked password)."""
    import socket

    cert, key = certs.write_pair(tmp_path, "device")
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    device = DeviceProcess(["--cert", str(cert), "--key", str(key), "--ums", f"https://127.0.0.1:{dead}",
                            "--device-id", "27", "--ums-insecure"])
    try:
        assert device.named("warning")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", device.port), timeout=10) as raw:
            with context.wrap_socket(raw) as conn:
                conn.sendall(b"PROCYCMD PW_" + PASSWORD.encode())
                try:
                    received = conn.recv(100)
                except (ConnectionResetError, ssl.SSLError):
                    received = b""
        assert received == b""
        assert device.wait_for("procycmd") == {"event": "procycmd", "accepted": False, "reason": "check failed"}
    finally:
        assert device.stop() == 0
    assert "WARNING" in device.stderr and "--ums-insecure" in device.stderr
    assert PASSWORD not in device.stderr + repr(device.events)
