"""Firmware profiles of the device emulator: how a given thin-client firmware behaves.

A profile fixes the TLS server settings (versions, ciphers, OpenSSL options) and the
behaviour around ``PROCYCMD`` (PROTOCOL.md section 2): whether the command must end
with a line terminator, how long the device waits for it, how long the local user
takes to allow shadowing, or whether the user refuses. What real IGEL firmware does is
largely undocumented (PROTOCOL.md section 2, "Undocumented"); each profile says which
behaviour it stands for.

To add a profile, append a :class:`FirmwareProfile` to :data:`PROFILES` with
:func:`register`. Legacy profiles (TLS 1.0, RSA-1024, MD5 certificates) need
``cipher_string`` with ``@SECLEVEL=0`` (PROTOCOL.md section 3) and a certificate made
with the ``openssl`` command line, because ``cryptography`` cannot sign with MD5.

The TLS context is built here with pyOpenSSL directly, not with Twisted's
``CertificateOptions``, which cannot enable TLS 1.0/1.1 or security level 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from secshadow.errors import UsageError

#: TLS version names (as OpenSSL reports them) and pyOpenSSL's constants.
TLS_VERSIONS: dict[str, int] = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}


@dataclass(frozen=True)
class FirmwareProfile:
    """One emulated firmware.

    - ``min_tls`` / ``max_tls``: keys of :data:`TLS_VERSIONS`.
    - ``cipher_string``: OpenSSL cipher list for TLS <= 1.2 (e.g. ``"DEFAULT"``,
      ``"AES128-SHA:@SECLEVEL=0"``); ``tls13_ciphersuites``: TLS 1.3 suites, ``None``
      for OpenSSL's default.
    - ``ssl_options``: extra ``SSL.OP_*`` flags OR-ed into the context (e.g.
      ``SSL.OP_NO_RENEGOTIATION``, ``SSL.OP_NO_TICKET``).
    - ``require_terminator``: the firmware reads ``PROCYCMD PW_<password>`` up to ``\\n``
      (``\\r\\n`` accepted) instead of a fixed 36-character password.
    - ``password_length``: characters read after ``PW_`` when no terminator is required.
    - ``command_timeout``: seconds the device waits for the complete command after the
      TCP accept before closing.
    - ``consent_delay``: seconds between an accepted password and the connection to the
      VNC server (the local user clicking "allow").
    - ``refuse_after``: if not ``None``, the local user refuses: after an accepted
      password the device waits this many seconds and closes without a word.
    - ``key_type``: the key ``--generate-cert`` makes for this firmware (see
      :data:`secshadow.certs.KEY_TYPES`).
    """

    name: str
    description: str
    min_tls: str = "TLSv1.2"
    max_tls: str = "TLSv1.3"
    cipher_string: str = "DEFAULT"
    tls13_ciphersuites: str | None = None
    ssl_options: int = 0
    require_terminator: bool = False
    password_length: int = 36
    command_timeout: float = 30.0
    consent_delay: float = 0.0
    refuse_after: float | None = None
    key_type: str = "rsa2048"

    def __post_init__(self) -> None:
        for version in (self.min_tls, self.max_tls):
            if version not in TLS_VERSIONS:
                raise ValueError(f"firmware {self.name!r}: unknown TLS version {version!r}")
        if TLS_VERSIONS[self.min_tls] > TLS_VERSIONS[self.max_tls]:
            raise ValueError(f"firmware {self.name!r}: min_tls is above max_tls")
        if self.command_timeout <= 0 or self.consent_delay < 0:
            raise ValueError(f"firmware {self.name!r}: timeouts must be positive")

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (for ``--list-firmware``)."""
        return {
            "name": self.name,
            "description": self.description,
            "tls": f"{self.min_tls}..{self.max_tls}",
            "ciphers": self.cipher_string,
            "require_terminator": self.require_terminator,
            "consent_delay_s": self.consent_delay,
            "refuse_after_s": self.refuse_after,
            "key_type": self.key_type,
        }


#: name -> profile, in registration order.
PROFILES: dict[str, FirmwareProfile] = {}


def register(profile: FirmwareProfile) -> FirmwareProfile:
    """Add ``profile`` to :data:`PROFILES`; ValueError if the name is taken."""
    if profile.name in PROFILES:
        raise ValueError(f"firmware profile {profile.name!r} is already registered")
    PROFILES[profile.name] = profile
    return profile


def get_profile(name: str) -> FirmwareProfile:
    """The profile called ``name``; raises :class:`UsageError` listing the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(
            f"unknown firmware profile {name!r}; known: {', '.join(PROFILES)} (see --list-firmware)"
        ) from None


register(
    FirmwareProfile(
        name="current",
        description=(
            "a current IGEL OS 11 firmware: TLS 1.2-1.3 with OpenSSL's default ciphers, "
            "PROCYCMD without terminator (a trailing LF/CRLF is tolerated), no consent prompt"
        ),
    )
)
register(
    FirmwareProfile(
        name="current-lf",
        description="like 'current', but the firmware insists on a line terminator after the password",
        require_terminator=True,
    )
)
register(
    FirmwareProfile(
        name="current-consent",
        description="like 'current', with a local user who takes 2 s to allow shadowing",
        consent_delay=2.0,
    )
)
register(
    FirmwareProfile(
        name="current-refuse",
        description="like 'current', with a local user who refuses shadowing after 1 s (silent close)",
        refuse_after=1.0,
    )
)
register(
    FirmwareProfile(
        name="tls13-only",
        description="a hardened firmware that accepts TLS 1.3 only",
        min_tls="TLSv1.3",
        max_tls="TLSv1.3",
    )
)


def load_key_pair(cert_pem: bytes, key_pem: bytes) -> tuple[x509.Certificate, Any]:
    """Parse a PEM certificate and an unencrypted PEM key; raises :class:`UsageError`
    when either does not parse (the message never quotes the key)."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise UsageError("the device certificate is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise UsageError("the device key is not an unencrypted PEM private key") from None
    return certificate, key


def build_server_context(profile: FirmwareProfile, cert_pem: bytes, key_pem: bytes) -> SSL.Context:
    """A pyOpenSSL server context for ``profile`` serving ``cert_pem`` / ``key_pem``.

    Raises :class:`UsageError` when the certificate and key do not match or the profile's
    cipher settings are rejected by this OpenSSL.
    """
    certificate, key = load_key_pair(cert_pem, key_pem)
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(TLS_VERSIONS[profile.min_tls])
    context.set_max_proto_version(TLS_VERSIONS[profile.max_tls])
    # Compression off (CRIME) and the server's cipher order, like a typical appliance.
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | profile.ssl_options)
    try:
        context.set_cipher_list(profile.cipher_string.encode("ascii"))
        if profile.tls13_ciphersuites is not None:
            context.set_tls13_ciphersuites(profile.tls13_ciphersuites.encode("ascii"))
    except SSL.Error:
        raise UsageError(f"firmware {profile.name!r}: this OpenSSL rejects its cipher settings") from None
    try:
        context.use_certificate(certificate)
        context.use_privatekey(key)  # OpenSSL already refuses a key of another certificate here
        context.check_privatekey()
    except SSL.Error:
        raise UsageError("the device key does not belong to the device certificate") from None
    # The device asks for no client certificate: the console proves itself by the password.
    context.set_verify(SSL.VERIFY_NONE)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSCreator:
    """Gives Twisted's ``TLSMemoryBIOFactory`` one ``SSL.Connection`` per accepted
    connection, all sharing the profile's context (servers may share one)."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)
