"""Pinned TLS to the device: accept exactly one certificate, byte for byte.

Source: ``docs/protocol.md`` section 3 (TLS facts measured with OpenSSL 4.0,
pyOpenSSL 26, Twisted 26). The rules this module keeps:

- the decision rests on DER equality of the leaf (depth 0) with the pinned
  certificate, compared in constant time; OpenSSL's own verdict (self-signed,
  expired, weak key, no name) is irrelevant and ignored;
- a mismatch fails the handshake inside OpenSSL's verify callback, so the device
  side never completes TLS and never receives an application byte;
- because the callback is not called at all for anonymous suites or resumed
  sessions, there are none: ``DEFAULT``-based ciphers without aNULL/eNULL, no
  tickets, no session cache, no renegotiation, the pin set per connection on one
  shared context that can resume nothing; and
  :func:`check_peer` re-checks the peer certificate after the handshake and again
  right before the password is written;
- no SNI: the device has no name.

Twisted's ``optionsForClientTLS``/``CertificateOptions`` are not used: they drop
``@SECLEVEL`` and insist on names and dates (``docs/protocol.md`` section 3).
"""

from __future__ import annotations

import enum
import hmac
import socket
from dataclasses import dataclass

from OpenSSL import SSL, crypto
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from secshadow.errors import PinMismatch, TLSHandshakeError, UsageError
from secshadow.secret import certificate_fingerprint


class TLSProfile(enum.Enum):
    """TLS profiles for the device connection (``--tls-profile``).

    ``MODERN``: TLS 1.2 and 1.3, OpenSSL's default security level.
    ``LEGACY``: TLS 1.0 to 1.2 at security level 0, servers without RFC 5746 secure
    renegotiation allowed; for old firmware, only when asked for, per device.
    Pinning is identical in both.
    """

    MODERN = "modern"
    LEGACY = "legacy"

    @classmethod
    def parse(cls, name: str) -> TLSProfile:
        """``"modern"``/``"legacy"`` to a profile; raises :class:`UsageError` otherwise."""
        try:
            return cls(name)
        except ValueError:
            raise UsageError(
                f"unknown TLS profile {name!r}; choose 'modern' or 'legacy'"
            ) from None


@dataclass(frozen=True)
class _ProfileSettings:
    min_version: int
    max_version: int
    ciphers: bytes
    extra_options: int = 0


# Both cipher strings start from DEFAULT and strike anonymous and null suites
# explicitly: an anonymous suite would complete a handshake with no certificate
# and the verify callback would never run.
_SETTINGS: dict[TLSProfile, _ProfileSettings] = {
    TLSProfile.MODERN: _ProfileSettings(
        min_version=SSL.TLS1_2_VERSION,
        max_version=SSL.TLS1_3_VERSION,
        ciphers=b"DEFAULT:!aNULL:!eNULL",
    ),
    TLSProfile.LEGACY: _ProfileSettings(
        min_version=SSL.TLS1_VERSION,
        # Capped at 1.2: a 1.3-capable ClientHello is ~1.5 KB and trips old stacks.
        max_version=SSL.TLS1_2_VERSION,
        ciphers=b"DEFAULT:!aNULL:!eNULL:@SECLEVEL=0",
        extra_options=SSL.OP_LEGACY_SERVER_CONNECT,
    ),
}

_ALWAYS_OPTIONS = (
    SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
)


def build_context(profile: TLSProfile) -> SSL.Context:
    """A new client context for ``profile`` (no verification set: the pin is set per
    connection). Tickets off and the session cache off, so nothing made with it can be
    resumed (a resumed session would skip the verify callback)."""
    settings = _SETTINGS[profile]
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(settings.min_version)
    context.set_max_proto_version(settings.max_version)
    context.set_cipher_list(settings.ciphers)
    context.set_options(_ALWAYS_OPTIONS | settings.extra_options)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


_SHARED: dict[TLSProfile, SSL.Context] = {}


def shared_context(profile: TLSProfile) -> SSL.Context:
    """The process's one client context for ``profile`` (:func:`build_context`), shared by
    every connection: a context costs about 12 KiB and a millisecond to build, and
    sharing it is safe because it can resume nothing and carries no pin (each
    connection sets its own verify callback)."""
    context = _SHARED.get(profile)
    if context is None:
        context = _SHARED[profile] = build_context(profile)
    return context


@implementer(IOpenSSLClientConnectionCreator)
class PinnedConnectionCreator:
    """Twisted connection creator that pins the device certificate.

    ``pinned_der``: DER bytes of the one certificate to accept.
    ``profile``: :class:`TLSProfile`.
    A mismatch fails the handshake inside OpenSSL's verify callback through the TLS
    transport's ``failVerification`` with a :class:`PinMismatch`, which then becomes the
    connection's loss reason (exit 6, not a TLS failure's exit 5).
    """

    def __init__(self, pinned_der: bytes, profile: TLSProfile = TLSProfile.MODERN) -> None:
        if not pinned_der:
            raise PinMismatch("no certificate to pin: refusing to connect without a pin")
        self.profile = profile
        self.pinned_der = pinned_der

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # OpenSSL's errno/ok (self-signed, expired, key too weak) are deliberately
        # ignored: the pin is the whole decision, and it is taken at the leaf only.
        if depth != 0:
            return True
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        if hmac.compare_digest(der, self.pinned_der):
            return True
        connection.get_app_data().failVerification(Failure(pin_mismatch_error(der, self.pinned_der)))
        return False

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A memory-BIO connection for Twisted's TLS protocol (``tlsProtocol``)."""
        return self.connection_for(tlsProtocol, None)

    def connection_for(self, app: object, sock: socket.socket | None) -> SSL.Connection:
        """A client connection on the shared context with this pin as its verify callback.

        ``app``: the object whose ``failVerification(Failure)`` the pin calls on a
        mismatch. ``sock``: a connected socket to bind the connection to
        (:mod:`secshadow.sockettls`), or ``None`` for memory BIOs.
        """
        connection = SSL.Connection(shared_context(self.profile), sock)
        # The pin is this connection's own; the shared context has none.
        connection.set_verify(SSL.VERIFY_PEER, self._verify)
        connection.set_app_data(app)
        connection.set_connect_state()
        return connection


def check_peer(connection: SSL.Connection, pinned_der: bytes) -> None:
    """Re-check the pin on an established connection; call before writing the password.

    Raises :class:`PinMismatch` when the peer presented no certificate or another one.
    """
    cert = connection.get_peer_certificate()
    if cert is None:
        raise PinMismatch("the device presented no certificate; the connection is not pinned")
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    if not hmac.compare_digest(der, pinned_der):
        raise PinMismatch(
            "the device's certificate changed after the handshake "
            f"(presented {certificate_fingerprint(der)}, pinned {certificate_fingerprint(pinned_der)})"
        )


def pin_mismatch_error(presented_der: bytes, pinned_der: bytes) -> PinMismatch:
    """The error for a handshake the pin refused (exit 6)."""
    return PinMismatch(
        "the device presented a certificate that is not the pinned one "
        f"(presented SHA-256 {certificate_fingerprint(presented_der)}, pinned {certificate_fingerprint(pinned_der)}); "
        "not one byte was sent to it. If the device was re-imaged, its certificate changed: "
        "send settings to it or reboot it so the UMS learns the new one"
    )


def _openssl_reasons(failure: Failure) -> list[str]:
    """Flatten pyOpenSSL's ``[(lib, func, reason), ...]`` error list into reason strings."""
    value = failure.value
    reasons: list[str] = []
    for arg in getattr(value, "args", ()):
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    reasons.append(str(item[-1]))
    if not reasons:
        reasons.append(str(value))
    return reasons


_LEGACY_HINT = (
    " Try --tls-profile legacy for this device (TLS 1.0 to 1.2 at OpenSSL security level 0; "
    "the certificate pin stays exactly as strict)."
)


def _this_openssl() -> str:
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")


def _has(low: str, *fragments: str) -> bool:
    return any(fragment in low for fragment in fragments)


def describe_handshake_failure(failure: Failure, profile: TLSProfile) -> TLSHandshakeError:
    """Turn an OpenSSL handshake failure into a plain-words :class:`TLSHandshakeError` (exit 5).

    Only what the client sees is available: OpenSSL's reason strings (the device's alert,
    or the client's own refusal). The message says what most likely happened and what to
    try; under the modern profile it names ``--tls-profile legacy`` whenever that may
    help. It never suggests an automatic retry: one attempt per run, the profile is a
    per-device decision. The raw OpenSSL reasons follow in brackets.

    - protocol version alert / ``unsupported protocol``: the device speaks no version of
      the profile (modern: it is older than TLS 1.2; legacy: it wants TLS 1.3, or SSL 3);
    - ``wrong version number``: the answer is not TLS at all (e.g. plain VNC on the port);
    - ``unsafe legacy renegotiation disabled``: no RFC 5746 secure renegotiation;
    - handshake-failure alert / ``no shared cipher``: no suite in common; under legacy
      that means the device has only suites this OpenSSL dropped (3DES, RC4, export) and
      no profile can reach it;
    - small keys / weak signatures / small DH groups refused by the security level.
    """
    reasons = _openssl_reasons(failure)
    text = "; ".join(reasons)
    low = text.lower()
    modern = profile is TLSProfile.MODERN
    prefix = "TLS handshake with the device failed: "
    if _has(low, "wrong version number", "packet length too long", "record layer failure", "http request"):
        return TLSHandshakeError(
            f"{prefix}the device did not answer in TLS at all; the port may serve plain VNC (RFB) "
            "or another protocol, not secure shadowing. Check --device-port and that secure shadowing "
            f"is enabled on the device [{text}]."
        )
    if _has(low, "unsupported protocol", "protocol version", "version too low", "no protocols available"):
        if modern:
            what = (
                "the device only offers a TLS version older than 1.2 (TLS 1.0 or 1.1, as firmware from "
                "before about 2017 does), and the modern profile accepts only TLS 1.2 and 1.3."
            )
            return TLSHandshakeError(f"{prefix}{what}{_LEGACY_HINT} [{text}]")
        return TLSHandshakeError(
            f"{prefix}the device accepts none of TLS 1.0, 1.1 and 1.2 (the legacy profile's range): it most "
            "likely requires TLS 1.3, so use the modern profile (the default), or it speaks only SSL 3.0, "
            f"which no profile supports [{text}]."
        )
    if _has(low, "unsafe legacy renegotiation"):
        if modern:
            return TLSHandshakeError(
                f"{prefix}the device's TLS stack does not support secure renegotiation (RFC 5746), which the "
                "modern profile requires; old OpenSSL builds (before 0.9.8m, 2010) lack it."
                f"{_LEGACY_HINT} [{text}]"
            )
        return TLSHandshakeError(f"{prefix}the device's TLS stack lacks secure renegotiation (RFC 5746) [{text}].")
    if _has(low, "ee key too small", "ca key too small", "ca md too weak", "dh key too small", "bad dh value",
            "key too small", "legacy sigalg", "wrong signature type", "insufficient security"):
        if modern:
            return TLSHandshakeError(
                f"{prefix}the device uses a key, signature or Diffie-Hellman group that the modern profile "
                f"considers too weak (as old firmware does).{_LEGACY_HINT} [{text}]"
            )
        return TLSHandshakeError(
            f"{prefix}the device's key, signature or Diffie-Hellman group is refused even at security "
            f"level 0 by this OpenSSL ({_this_openssl()}) [{text}]."
        )
    if _has(low, "no shared cipher", "no cipher", "handshake failure", "sslv3 alert", "tls alert"):
        if modern:
            return TLSHandshakeError(
                f"{prefix}the device offers no cipher suite the modern profile accepts (it offers only old "
                f"suites).{_LEGACY_HINT} If the legacy profile fails the same way, the device offers only "
                f"suites this OpenSSL no longer has (3DES, RC4) and no profile can reach it [{text}]."
            )
        return TLSHandshakeError(
            f"{prefix}the device offers only cipher suites that this OpenSSL ({_this_openssl()}) no longer "
            "implements, most likely 3DES (DES-CBC3-SHA), RC4 or export suites. No --tls-profile can reach "
            f"it: update the device's firmware so it offers AES suites [{text}]."
        )
    if _has(low, "unexpected eof", "connection lost", "connection was closed", "connection reset"):
        hint = (
            " Old firmware sometimes hangs up on a modern ClientHello: try --tls-profile legacy for this device."
            if modern else ""
        )
        return TLSHandshakeError(f"the device closed the connection during the TLS handshake [{text}].{hint}")
    hint = " The device may run old firmware: try --tls-profile legacy for this device." if modern else ""
    return TLSHandshakeError(f"{prefix}[{text}].{hint}")


def negotiated(connection: SSL.Connection) -> tuple[str, str]:
    """(protocol version name, cipher name) of an established connection."""
    return (
        connection.get_protocol_version_name() or "unknown",
        connection.get_cipher_name() or "unknown",
    )
