"""The firmware matrix in CI: every profile on the emulator, stunnel4 (Debian OpenSSL 3)
and gnutls-serv (GnuTLS), each against the real secshadow-proxy CLI with both TLS profiles.

Done criteria of the legacy-firmware issue: legacy reaches every profile except the
3DES-only one, which is reported clearly; modern refuses the weak ones with exit 5 and a
hint naming --tls-profile legacy; a same-subject impostor is refused with exit 6 under
legacy at TLS 1.0, and no PROCYCMD reaches it. One matrix run (~15-25 s) serves all tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from secshadow.lab import matrix
from secshadow.lab.device.firmware import PROFILES
from secshadow.lab.harness import child_environment
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WEAK = {"legacy-tls10", "legacy-tls11", "legacy-no-renego", "legacy-3des"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Any:
    for program in ("openssl", "stunnel4", "gnutls-serv"):
        require_program(program)
    greeter = matrix.RFBGreeter()
    try:
        yield matrix.run_matrix(matrix.plan(), tmp_path_factory.mktemp("matrix"), greeter.port, workers=2)
    finally:
        greeter.stop()


def _row(rows: list[matrix.MatrixRow], firmware: str, stack: str, impostor: bool = False) -> matrix.MatrixRow:
    return next(r for r in rows if (r.firmware, r.stack, r.impostor) == (firmware, stack, impostor))


def test_every_row_is_as_expected(rows: list[matrix.MatrixRow]) -> None:
    table = matrix.format_table(rows)
    assert all(r.as_expected for r in rows), table + "\n" + matrix.format_messages(rows)


def test_all_three_stacks_and_every_profile_ran(rows: list[matrix.MatrixRow]) -> None:
    assert {r.stack for r in rows} == {"emulator", "stunnel", "gnutls"}
    assert {r.firmware for r in rows} == set(PROFILES)


def test_legacy_reaches_everything_but_3des(rows: list[matrix.MatrixRow]) -> None:
    for row in rows:
        if row.impostor or row.firmware in ("legacy-3des", "tls13-only", "current-refuse"):
            continue
        assert row.legacy.outcome in ("ok", "pinned"), (row.firmware, row.stack, row.legacy.message)
    tls10 = [_row(rows, "legacy-tls10", stack) for stack in ("emulator", "stunnel", "gnutls")]
    assert {(r.legacy.tls_version, r.legacy.cipher) for r in tls10} == {("TLSv1", "AES128-SHA")}
    assert _row(rows, "legacy-tls10", "stunnel").legacy.first_rfb_byte_s is not None


def test_3des_only_device_is_reported_as_unreachable_by_any_profile(rows: list[matrix.MatrixRow]) -> None:
    row = _row(rows, "legacy-3des", "gnutls")
    assert (row.legacy.outcome, row.legacy.exit_code) == ("tls-handshake", 5)
    assert "3DES" in row.legacy.message and "No --tls-profile can reach it" in row.legacy.message


def test_modern_refuses_weak_devices_with_exit_5_and_a_legacy_hint(rows: list[matrix.MatrixRow]) -> None:
    weak = [r for r in rows if r.firmware in WEAK and not r.impostor]
    assert len(weak) >= 8
    for row in weak:
        assert (row.modern.outcome, row.modern.exit_code) == ("tls-handshake", 5), row
        assert "--tls-profile legacy" in row.modern.message
    assert "RFC 5746" in _row(rows, "legacy-no-renego", "gnutls").modern.message
    assert "TLS 1.0 or 1.1" in _row(rows, "legacy-tls10", "stunnel").modern.message


@pytest.mark.parametrize("stack", ["emulator", "stunnel", "gnutls"])
def test_same_subject_impostor_is_refused_at_tls10_under_legacy(rows: list[matrix.MatrixRow], stack: str) -> None:
    row = _row(rows, "legacy-tls10", stack, impostor=True)
    assert (row.legacy.outcome, row.legacy.exit_code) == ("pin-mismatch", 6)
    if stack != "gnutls":  # the PROCYCMD check sits behind the TLS front: it saw nothing
        assert row.procycmd_seen == 0


def test_slow_consent_shows_in_the_time_to_the_first_rfb_byte(rows: list[matrix.MatrixRow]) -> None:
    slow, fast = _row(rows, "current-consent", "emulator"), _row(rows, "current", "emulator")
    assert slow.modern.first_rfb_byte_s is not None and fast.modern.first_rfb_byte_s is not None
    assert slow.modern.first_rfb_byte_s - fast.modern.first_rfb_byte_s > 1.5


def test_the_matrix_command_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "secshadow-matrix"), "--firmware", "current", "--stack", "emulator",
         "--no-impostors"],
        capture_output=True, text=True, timeout=60, env=child_environment(),
    )
    assert result.returncode == 0, result.stderr
    assert "| current | rsa2048-sha256 | emulator | ok | ok |" in result.stdout


def test_docs_list_every_profile() -> None:
    text = (ROOT / "docs" / "firmware.md").read_text()
    for name in PROFILES:
        assert f"| {name} " in text
