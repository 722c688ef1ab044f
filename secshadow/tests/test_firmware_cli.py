"""``secshadow-device --firmware NAME`` for the old-firmware profiles, and ``--plaintext``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from OpenSSL import SSL, crypto

from secshadow.lab.certs import certificate_sha256
from secshadow.pinning import TLSProfile, build_context

from secshadow.lab.device.legacycerts import describe
from secshadow.tests._device_helpers import PASSWORD
from secshadow.tests._device_process import DeviceProcess, run_cli
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    return path


def test_legacy_tls10_generates_an_md5_v1_certificate_and_serves_it(tmp_path: Path, password_file: Path) -> None:
    require_program("openssl")
    device = DeviceProcess(["--firmware", "legacy-tls10", "--generate-cert", str(tmp_path / "c"),
                            "--accept-password-file", str(password_file)])
    try:
        generated = device.wait_for("certificate")
        info = describe(Path(generated["cert_path"]).read_bytes())
        assert (info["version"], info["signature"], info["key_bits"], info["expired"]) == (1, "md5", 1024, True)
        assert generated["certificate_sha256"] == device.certificate_sha256
        # A legacy-profile client (blocking pyOpenSSL) completes TLS 1.0 and sees that certificate.
        sock = socket.create_connection(("127.0.0.1", device.port), timeout=10)
        sock.settimeout(None)  # pyOpenSSL wants a blocking socket here
        connection = SSL.Connection(build_context(TLSProfile.LEGACY), sock)
        connection.set_connect_state()
        connection.do_handshake()
        assert connection.get_protocol_version_name() == "TLSv1"
        assert connection.get_cipher_name() == "AES128-SHA"
        served = crypto.dump_certificate(crypto.FILETYPE_PEM, connection.get_peer_certificate())
        assert certificate_sha256(served) == device.certificate_sha256
        connection.close()
        device.wait_for("app-bytes")
    finally:
        status = device.stop()
    assert status == 0, device.stderr


def test_gnutls_only_firmware_is_a_usage_error(tmp_path: Path, password_file: Path) -> None:
    require_program("openssl")
    result = run_cli(["--firmware", "legacy-3des", "--generate-cert", str(tmp_path / "c"),
                      "--accept-password-file", str(password_file)])
    assert result.returncode == 2
    assert "gnutls" in result.stderr and "Traceback" not in result.stderr


def test_plaintext_mode_listens_on_loopback_only(password_file: Path) -> None:
    result = run_cli(["--plaintext", "--listen", "tcp:0:interface=0.0.0.0",
                      "--accept-password-file", str(password_file)])
    assert result.returncode == 2
    assert "loopback only" in result.stderr


def test_list_firmware_names_the_stacks() -> None:
    result = run_cli(["--list-firmware"])
    assert result.returncode == 0
    assert "legacy-3des" in result.stdout and "[stacks: gnutls]" in result.stdout
