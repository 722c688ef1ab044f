"""Firmware profiles against both client profiles, in memory with real OpenSSL handshakes,
and the plain-words diagnosis of handshake failures."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.python.failure import Failure

from secshadow.lab.device.emulator import OneShotPasswordChecker
from secshadow.lab.device.firmware import PROFILES, ServerTLSCreator, build_server_context, get_profile
from secshadow.errors import TLSHandshakeError, UsageError
from secshadow.pinning import TLSProfile, describe_handshake_failure
from secshadow.secret import OneTimePassword
from secshadow.tests._tls import der_of, pinned_pair
from secshadow.tests.conftest import require_program

REQUIRED = {"current", "current-lf", "current-consent", "current-refuse", "legacy-tls10", "legacy-tls11",
            "legacy-no-renego", "legacy-3des"}


def test_the_issue_s_profiles_exist_and_are_documented() -> None:
    assert REQUIRED <= set(PROFILES)
    for profile in PROFILES.values():
        summary = profile.summary()
        assert summary["description"] and summary["stacks"]
        assert profile.expect_modern and profile.expect_legacy


def test_legacy_tls10_is_the_old_sample() -> None:
    profile = get_profile("legacy-tls10")
    assert (profile.min_tls, profile.max_tls) == ("TLSv1", "TLSv1")
    assert profile.cipher_string.startswith("AES128-SHA")
    assert profile.legacy_cert == "rsa1024-md5-v1-expired"
    assert {"emulator", "stunnel", "gnutls"} <= set(profile.stacks)


@pytest.mark.parametrize("name", ["legacy-3des", "legacy-no-renego"])
def test_gnutls_only_profiles_are_refused_by_the_openssl_emulator_with_a_pointer(name: str) -> None:
    from secshadow.lab import certs

    cert, key = certs.generate_self_signed()
    with pytest.raises(UsageError, match="gnutls"):
        build_server_context(get_profile(name), cert, key)


EMULATOR_PROFILES = [p.name for p in PROFILES.values() if p.emulator_capable]


@pytest.mark.integration
@pytest.mark.parametrize("name", EMULATOR_PROFILES)
@pytest.mark.parametrize("client", list(TLSProfile))
def test_emulator_profile_handshake_matches_its_expectation(name: str, client: TLSProfile) -> None:
    profile = get_profile(name)
    if profile.legacy_cert:
        require_program("openssl")
    cert, key = profile.generate_certificate()
    server = ServerTLSCreator(build_server_context(profile, cert, key))
    hs = pinned_pair(der_of(cert), server, client)
    expected = profile.expect_modern if client is TLSProfile.MODERN else profile.expect_legacy
    if expected == "tls-handshake":
        assert len(hs.errors) == 1 and isinstance(hs.errors[0], TLSHandshakeError)
        if client is TLSProfile.MODERN:
            assert "--tls-profile legacy" in hs.errors[0].message
        else:
            assert "modern profile" in hs.errors[0].message  # tls13-only: use modern
    else:  # the TLS part succeeds (a refusing user closes later, after PROCYCMD)
        assert hs.errors == [] and hs.link.alive


def _fail(*reasons: str) -> Failure:
    return Failure(SSL.Error([("SSL routines", "", reason) for reason in reasons]))


def test_diagnosis_old_version_names_the_legacy_profile() -> None:
    error = describe_handshake_failure(_fail("tlsv1 alert protocol version"), TLSProfile.MODERN)
    assert "TLS 1.0 or 1.1" in error.message and "--tls-profile legacy" in error.message
    assert error.exit_code == 5


def test_diagnosis_version_under_legacy_points_to_tls13_not_to_legacy() -> None:
    error = describe_handshake_failure(_fail("unsupported protocol"), TLSProfile.LEGACY)
    assert "TLS 1.3" in error.message and "--tls-profile legacy" not in error.message


def test_diagnosis_3des_only_under_legacy_says_no_profile_can_reach_it() -> None:
    error = describe_handshake_failure(_fail("sslv3 alert handshake failure"), TLSProfile.LEGACY)
    assert "3DES" in error.message and "No --tls-profile can reach it" in error.message
    assert "Try --tls-profile" not in error.message


def test_diagnosis_no_cipher_under_modern_suggests_legacy_and_explains_the_3des_case() -> None:
    error = describe_handshake_failure(_fail("tls alert handshake failure"), TLSProfile.MODERN)
    assert "--tls-profile legacy" in error.message and "3DES" in error.message


def test_diagnosis_missing_secure_renegotiation() -> None:
    error = describe_handshake_failure(_fail("unsafe legacy renegotiation disabled"), TLSProfile.MODERN)
    assert "RFC 5746" in error.message and "--tls-profile legacy" in error.message


def test_diagnosis_plain_vnc_on_the_port_is_not_blamed_on_tls_versions() -> None:
    for profile in TLSProfile:
        error = describe_handshake_failure(_fail("wrong version number"), profile)
        assert "plain VNC" in error.message and "--tls-profile legacy" not in error.message


def test_diagnosis_weak_key_under_modern() -> None:
    error = describe_handshake_failure(_fail("dh key too small"), TLSProfile.MODERN)
    assert "too weak" in error.message and "--tls-profile legacy" in error.message


def test_several_one_time_passwords_each_once() -> None:
    checker = OneShotPasswordChecker(OneTimePassword("a" * 36), OneTimePassword("b" * 36))
    results: list[bool] = []
    for candidate in ("a" * 36, "a" * 36, "c" * 36, "b" * 36):
        checker(candidate).addCallback(results.append)
    assert results == [True, False, False, True]
    assert checker.used and "a" * 36 not in repr(checker)
