"""Impostors (issue 4, part 1): real ``openssl s_server`` processes, scripted TLS servers and
our own device emulator pretend to be the device or the UMS. Each is refused with the
contract's exit code, no ``listening`` event appears (where the pin never matched), and the
impostor receives **zero** application bytes: we read its decrypted output.

Every test also carries a fake viewer: if a ``listening`` event appeared, the viewer would
connect and so trigger ``PROCYCMD``; the assertions then catch the leak.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab import certs
from secshadow.lab.harness import ManagedProcess, child_environment, python_module
from secshadow.tests import _umscerts
from secshadow.lab.scripted import (
    DeviceConn,
    HTTPScript,
    ScriptedDevice,
    SServer,
    http_response,
    names,
    run_cli,
    secret_json,
)
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration

PASSWORD = str(uuid.uuid4())
FAST = ["--viewer", "none", "--connect-timeout", "5", "--viewer-timeout", "5", "--hello-timeout", "3"]


@pytest.fixture(scope="module")
def pinned() -> tuple[bytes, bytes]:
    return certs.generate_self_signed()


@pytest.fixture
def files(tmp_path: Path, pinned: tuple[bytes, bytes]) -> dict[str, Path]:
    cert, key = pinned
    twin_cert, twin_key = certs.twin_of(cert)
    other_cert, other_key = certs.generate_self_signed(organization="Impostor")
    out = {}
    for name, data in (("real.crt", cert), ("real.key", key), ("twin.crt", twin_cert), ("twin.key", twin_key),
                       ("other.crt", other_cert), ("other.key", other_key)):
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


def _proxy_against(port: int, cert_pem: bytes, *extra: str, timeout: float = 30) -> Any:
    return run_cli(["--secret-file", "-", *FAST, *extra], stdin=secret_json(cert_pem, PASSWORD, port),
                   timeout=timeout)


def _assert_refused(run: Any, code: int, leaked: bytes) -> None:
    assert run.code == code, run.stderr
    assert names(run.events) == ["secret", "error"], run.events
    assert "listening" not in names(run.events) and not run.viewer_connected
    assert leaked == b"", leaked[:200]
    assert PASSWORD not in run.stderr + run.stdout


# ------------------------------------------------------------------- openssl s_server
@pytest.mark.parametrize("case, args, code", [
    ("same-subject twin, another key", ["-cert", "{twin.crt}", "-key", "{twin.key}"], 6),
    ("twin over TLS 1.3 only", ["-tls1_3", "-cert", "{twin.crt}", "-key", "{twin.key}"], 6),
    ("twin over TLS 1.2 only", ["-tls1_2", "-cert", "{twin.crt}", "-key", "{twin.key}"], 6),
    ("pinned certificate appended to the impostor's chain",
     ["-cert", "{other.crt}", "-key", "{other.key}", "-cert_chain", "{real.crt}"], 6),
    ("pinned certificate as chain of the twin",
     ["-tls1_2", "-cert", "{twin.crt}", "-key", "{twin.key}", "-cert_chain", "{real.crt}"], 6),
    ("anonymous suites, no certificate at all", ["-nocert", "-tls1_2", "-cipher", "aNULL:@SECLEVEL=0"], 5),
])
def test_openssl_impostor_is_refused_and_gets_zero_bytes(files: dict[str, Path], pinned: tuple[bytes, bytes],
                                                          case: str, args: list[str], code: int) -> None:
    require_program("openssl")
    argv = [str(files[a[1:-1]]) if a.startswith("{") else a for a in args]
    server = SServer(files["real.crt"].parent, argv)
    try:
        run = _proxy_against(server.port, pinned[0])
        time.sleep(0.2)
        leaked = server.app_output()
    finally:
        server.stop()
    _assert_refused(run, code, leaked)
    assert run.events[-1]["code"] == {6: "pin-mismatch", 5: "tls-handshake"}[code]


def test_control_the_genuine_certificate_does_get_procycmd(files: dict[str, Path], pinned: tuple[bytes, bytes]):
    """The zero-bytes check above can fail: s_server with the pinned key receives the command."""
    require_program("openssl")
    server = SServer(files["real.crt"].parent, ["-cert", str(files["real.crt"]), "-key", str(files["real.key"])])
    try:
        run = _proxy_against(server.port, pinned[0])
        time.sleep(0.2)
        got = server.app_output()
    finally:
        server.stop()
    assert run.code == 7, run.stderr  # s_server never sends an RFB greeting
    assert run.viewer_connected
    assert got == f"PROCYCMD PW_{PASSWORD}".encode()


def test_openssl_server_renegotiation_is_refused_before_any_byte(files: dict[str, Path],
                                                                 pinned: tuple[bytes, bytes]):
    """A TLS 1.2 s_server holding the pinned key renegotiates (stdin ``r``) after the
    handshake: the client refuses (OP_NO_RENEGOTIATION), s_server fails the connection,
    and the password never crosses it. s_server then exits (-naccept 1), so the proxy's
    reconnect for the viewer finds nobody: exit 4."""
    require_program("openssl")
    server = SServer(files["real.crt"].parent, ["-tls1_2", "-naccept", "1", "-cert", str(files["real.crt"]),
                                                "-key", str(files["real.key"])], quiet=False)
    renegotiated: dict[str, Any] = {}

    def renegotiate(process: subprocess.Popen[bytes], event: dict[str, Any]) -> None:
        deadline = time.monotonic() + 5
        while b"CIPHER is" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.command("r\n")
        try:
            renegotiated["status"] = server.process.wait(10)
        except subprocess.TimeoutExpired:
            renegotiated["status"] = None

    try:
        run = run_cli(["--secret-file", "-", *FAST], stdin=secret_json(pinned[0], PASSWORD, server.port),
                      on_listening=renegotiate, timeout=30)
        output = server.output()
    finally:
        server.stop()
    assert renegotiated["status"] is not None, "s_server did not end the connection after the refused renegotiation"
    assert b"CIPHER is" in output and b"Renegotiation" in output or b"renegotiat" in output.lower()
    assert b"PROCYCMD" not in output
    assert PASSWORD.encode() not in output
    assert names(run.events)[:3] == ["secret", "pinned", "listening"]
    assert run.code == 4, run.stderr
    assert run.viewer_bytes == b""


def test_scripted_server_renegotiating_to_another_certificate_is_refused(pinned: tuple[bytes, bytes]):
    """First handshake with the pinned certificate, then (before any viewer) a renegotiation
    to a same-subject twin; later connections present the twin. The client refuses the
    renegotiation, the server drops the connection, the proxy's reconnect for the viewer
    meets the twin: pin-mismatch (exit 6), and neither connection got a byte."""
    cert, key = pinned
    twin_cert, twin_key = certs.twin_of(cert)
    first_done = threading.Event()

    def script(conn: DeviceConn) -> None:
        if conn.index == 0:
            try:
                conn.renegotiate_to(twin_cert, twin_key)
                conn.drain(3)
            finally:
                first_done.set()
        conn.drain(5)

    device = ScriptedDevice(cert, key, script, max_version=0x0303,
                            pair_for=lambda i: (cert, key) if i == 0 else (twin_cert, twin_key))
    try:
        run = run_cli(["--secret-file", "-", *FAST], stdin=secret_json(cert, PASSWORD, device.port),
                      on_listening=lambda process, event: first_done.wait(10), timeout=30)
    finally:
        device.stop()
    first = device.conns[0]
    assert first.renegotiation_failed, first.error  # the client never completed it
    assert names(run.events)[:3] == ["secret", "pinned", "listening"]
    assert run.code == 6, run.stderr
    assert run.events[-1]["code"] == "pin-mismatch"
    assert device.accepted == 2
    assert device.app_bytes() == 0
    assert run.viewer_bytes == b""


# ------------------------------------------------------------------- the emulator
def test_device_emulator_with_a_twin_certificate_is_refused(tmp_path: Path, files: dict[str, Path],
                                                            pinned: tuple[bytes, bytes]):
    accept = tmp_path / "accept"
    accept.write_text(PASSWORD)
    impostor = ManagedProcess("impostor-emulator", [
        *python_module("secshadow.lab.device.cli"), "--listen", "tcp:0:interface=127.0.0.1",
        "--cert", str(files["twin.crt"]), "--key", str(files["twin.key"]),
        "--accept-password-file", str(accept), "--vnc", "127.0.0.1:9"], tmp_path, env=child_environment())
    try:
        port = int(impostor.wait_for("listening")["port"])
        run = _proxy_against(port, pinned[0])
        time.sleep(0.3)
    finally:
        impostor.stop()
    _assert_refused(run, 6, b"")
    assert impostor.named("procycmd") == []
    assert sum(e["count"] for e in impostor.named("app-bytes")) == 0


# ------------------------------------------------------------------- the UMS side
def _ums_args(port: int, password_file: Path, *trust: str) -> list[str]:
    return ["--ums", f"https://127.0.0.1:{port}", "--device", "27", "--ums-user", "admin",
            "--ums-password-file", str(password_file), *trust, "--viewer", "none"]


def _login_refused(index: int, request: bytes) -> bytes:
    return http_response(401, b'{"message": "no", "errorCode": "ITG-0B001"}')


@pytest.fixture
def ums_password(tmp_path: Path) -> tuple[str, Path]:
    password = "ums-" + uuid.uuid4().hex
    path = tmp_path / "ums-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password, path


def test_ums_impostor_under_fingerprint_gets_no_login(ums_password: tuple[str, Path]):
    real = _umscerts.make_leaf()
    fake = _umscerts.make_leaf()
    impostor = HTTPScript(fake.cert_pem, fake.key_pem, _login_refused)
    try:
        run = run_cli(_ums_args(impostor.port, ums_password[1], "--ums-fingerprint", real.sha256), timeout=30)
    finally:
        impostor.stop()
    assert run.code == 3, run.stderr
    assert names(run.events) == ["error"] and run.events[0]["code"] == "ums"
    assert impostor.requests == []
    assert impostor.device.app_bytes() == 0
    assert ums_password[0] not in run.stderr + run.stdout


@pytest.mark.parametrize("which", ["self-signed", "another CA", "our CA, no subjectAltName",
                                   "our CA, another name"])
def test_ums_impostor_under_ca_gets_no_login(tmp_path: Path, ums_password: tuple[str, Path], which: str):
    ca, ca_key, ca_cert = _umscerts.make_ca()
    _, other_key, other_cert = _umscerts.make_ca()
    leaf = {
        "self-signed": lambda: _umscerts.make_leaf(),
        "another CA": lambda: _umscerts.make_leaf(issuer=(other_key, other_cert)),
        "our CA, no subjectAltName": lambda: _umscerts.make_leaf(san=False, issuer=(ca_key, ca_cert)),
        "our CA, another name": lambda: _umscerts.make_leaf(cn="ums.example", dns=("ums.example",), ips=(),
                                                            issuer=(ca_key, ca_cert)),
    }[which]()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    impostor = HTTPScript(leaf.cert_pem, leaf.key_pem, _login_refused)
    try:
        run = run_cli(_ums_args(impostor.port, ums_password[1], "--ums-ca", str(tmp_path / "ca.pem")), timeout=30)
    finally:
        impostor.stop()
    assert run.code == 3, run.stderr
    assert run.events[-1]["code"] == "ums"
    assert impostor.requests == []
    assert ums_password[0] not in run.stderr + run.stdout


def test_control_the_genuine_ums_certificate_does_get_the_login(tmp_path: Path, ums_password: tuple[str, Path]):
    ca, ca_key, ca_cert = _umscerts.make_ca()
    leaf = _umscerts.make_leaf(issuer=(ca_key, ca_cert))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    genuine = HTTPScript(leaf.cert_pem, leaf.key_pem, _login_refused)
    try:
        run = run_cli(_ums_args(genuine.port, ums_password[1], "--ums-ca", str(tmp_path / "ca.pem")), timeout=30)
    finally:
        genuine.stop()
    assert run.code == 3  # login refused (401): still exit 3, but the request arrived
    assert len(genuine.requests) == 1 and genuine.requests[0].startswith(b"POST /umsapi/v3/login")
    assert b"authorization: basic" in genuine.requests[0].lower()
    assert ums_password[0] not in run.stderr + run.stdout


def test_openssl_ums_impostor_sees_zero_bytes(tmp_path: Path, ums_password: tuple[str, Path]):
    require_program("openssl")
    real = _umscerts.make_leaf()
    fake = _umscerts.make_leaf()
    (tmp_path / "fake.crt").write_bytes(fake.cert_pem)
    (tmp_path / "fake.key").write_bytes(fake.key_pem)
    server = SServer(tmp_path, ["-cert", str(tmp_path / "fake.crt"), "-key", str(tmp_path / "fake.key")])
    try:
        run = run_cli(_ums_args(server.port, ums_password[1], "--ums-fingerprint", real.sha256), timeout=30)
        time.sleep(0.2)
        leaked = server.app_output()
    finally:
        server.stop()
    assert run.code == 3, run.stderr
    assert leaked == b""
