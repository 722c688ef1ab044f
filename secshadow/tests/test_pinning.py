"""Pinning with real OpenSSL handshakes in memory (docs/protocol.md section 3)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from secshadow.lab import certs
from secshadow.errors import PinMismatch, TLSHandshakeError, UsageError
from secshadow.pinning import PinnedConnectionCreator, TLSProfile, build_context, check_peer, shared_context
from secshadow.tests._tls import ServerCreator, der_of, pinned_pair

CERT, KEY = certs.generate_self_signed()  # name-less, like IGEL's sample
PINNED = der_of(CERT)


def test_right_pin_completes_and_negotiates_tls13():
    hs = pinned_pair(PINNED, ServerCreator(CERT, KEY))
    assert hs.errors == [] and hs.link.alive
    assert hs.link.tls_version == "TLSv1.3"
    hs.link.send_command(b"PROCYCMD PW_x")
    hs.flush()
    assert bytes(hs.server.received) == b"PROCYCMD PW_x"


def test_expired_nameless_rsa1024_certificate_is_accepted_when_pinned():
    # OpenSSL's verdict (expired, self-signed, weak key, no name) must not matter: only the pin.
    cert, key = certs.generate_self_signed(key_type="rsa1024", days=-30)
    hs = pinned_pair(der_of(cert), ServerCreator(cert, key, ciphers=b"DEFAULT:@SECLEVEL=0"))
    assert hs.errors == [] and hs.link.alive


def test_wrong_pin_is_a_pin_mismatch_and_the_server_gets_no_application_byte():
    twin_cert, twin_key = certs.twin_of(CERT)
    hs = pinned_pair(PINNED, ServerCreator(twin_cert, twin_key))
    assert len(hs.errors) == 1 and isinstance(hs.errors[0], PinMismatch)
    assert certs.certificate_sha256(twin_cert) in hs.errors[0].message
    assert not hs.link.alive
    # Even a write attempted after the failure never reaches the impostor.
    hs.link.transport.write(b"PROCYCMD PW_secret")
    hs.flush()
    assert bytes(hs.server.received) == b""


def test_anonymous_server_without_certificate_fails_the_handshake():
    # An aNULL-only server: the client offers no anonymous suite, so no handshake at all.
    server = ServerCreator(None, None, ciphers=b"aNULL:@SECLEVEL=0", max_version=SSL.TLS1_2_VERSION)
    hs = pinned_pair(PINNED, server)
    assert len(hs.errors) == 1 and isinstance(hs.errors[0], TLSHandshakeError)
    assert not isinstance(hs.errors[0], PinMismatch)  # no certificate: a TLS failure, not a pin verdict
    assert hs.server.received == bytearray()


def test_legacy_profile_pins_exactly_as_strictly():
    twin_cert, twin_key = certs.twin_of(CERT)
    server = ServerCreator(twin_cert, twin_key, ciphers=b"DEFAULT:@SECLEVEL=0",
                           min_version=SSL.TLS1_VERSION, max_version=SSL.TLS1_VERSION)
    hs = pinned_pair(PINNED, server, TLSProfile.LEGACY)
    assert len(hs.errors) == 1 and isinstance(hs.errors[0], PinMismatch)
    assert hs.server.received == bytearray()


def test_legacy_reaches_a_tls10_server_that_modern_refuses_with_a_hint():
    server = ServerCreator(CERT, KEY, ciphers=b"AES128-SHA:@SECLEVEL=0",
                           min_version=SSL.TLS1_VERSION, max_version=SSL.TLS1_VERSION)
    legacy = pinned_pair(PINNED, server, TLSProfile.LEGACY)
    assert legacy.errors == [] and legacy.link.tls_version == "TLSv1"
    modern = pinned_pair(PINNED, server, TLSProfile.MODERN)
    assert len(modern.errors) == 1 and isinstance(modern.errors[0], TLSHandshakeError)
    assert "--tls-profile legacy" in modern.errors[0].message
    assert "TLS 1.0" in modern.errors[0].message


def test_check_peer_refuses_a_connection_without_or_with_another_certificate():
    class NoCert:
        def get_peer_certificate(self):
            return None

    with pytest.raises(PinMismatch, match="no certificate"):
        check_peer(NoCert(), PINNED)  # type: ignore[arg-type]
    twin_cert, _ = certs.twin_of(CERT)

    class Other:
        def get_peer_certificate(self):
            from OpenSSL import crypto
            return crypto.load_certificate(crypto.FILETYPE_PEM, twin_cert)

    with pytest.raises(PinMismatch, match="changed"):
        check_peer(Other(), PINNED)  # type: ignore[arg-type]


def test_contexts_never_resume_or_renegotiate():
    a = build_context(TLSProfile.MODERN)
    options = a.set_options(0)
    for flag in (SSL.OP_NO_TICKET, SSL.OP_NO_RENEGOTIATION, SSL.OP_NO_COMPRESSION):
        assert options & flag
    assert not options & SSL.OP_LEGACY_SERVER_CONNECT
    assert build_context(TLSProfile.LEGACY).set_options(0) & SSL.OP_LEGACY_SERVER_CONNECT


def test_empty_pin_is_refused_before_any_connection():
    with pytest.raises(PinMismatch):
        PinnedConnectionCreator(b"")


def test_profile_names():
    assert TLSProfile.parse("legacy") is TLSProfile.LEGACY
    with pytest.raises(UsageError):
        TLSProfile.parse("weak")


def test_the_shared_context_carries_no_pin_each_connection_has_its_own():
    # Two handshakes through the one shared context, one after the other: the right pin
    # passes, a wrong pin right after it still fails (the pin is per connection), and a
    # third connection with the right pin is a full handshake again (no session to resume).
    assert shared_context(TLSProfile.MODERN) is shared_context(TLSProfile.MODERN)
    assert shared_context(TLSProfile.MODERN) is not shared_context(TLSProfile.LEGACY)
    first = pinned_pair(PINNED, ServerCreator(CERT, KEY))
    assert first.errors == [] and first.link.tls_version == "TLSv1.3"
    twin_cert, _ = certs.twin_of(CERT)
    wrong = pinned_pair(der_of(twin_cert), ServerCreator(CERT, KEY))
    assert len(wrong.errors) == 1 and isinstance(wrong.errors[0], PinMismatch)
    again = pinned_pair(PINNED, ServerCreator(CERT, KEY))
    assert again.errors == []
    from OpenSSL._util import lib  # test-only: pyOpenSSL exposes no session_reused()

    assert lib.SSL_session_reused(again.link.transport.getHandle()._ssl) == 0
    assert shared_context(TLSProfile.MODERN).get_session_cache_mode() == SSL.SESS_CACHE_OFF
