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

Which TLS stack plays a profile (``stacks``; see ``docs/firmware.md``):

- ``emulator``: this module's pyOpenSSL server (cryptography's bundled OpenSSL 4.0);
- ``stunnel``: ``stunnel4`` on Debian's OpenSSL 3.0 as the device's TLS front,
  forwarding plaintext to ``secshadow-device --plaintext`` (which checks PROCYCMD);
- ``gnutls``: ``gnutls-serv`` (GnuTLS 3.7) with ``gnutls_priority``; it cannot forward,
  so it covers the TLS handshake and the pin only. It is the only stack here that can
  still offer 3DES and turn RFC 5746 secure renegotiation off.

``expect_modern`` / ``expect_legacy``: the outcome the console should get with each
client profile, as a ``secshadow-proxy`` error code (``"ok"`` for a session that reached
the RFB greeting); the matrix (``secshadow.lab.matrix``) checks them.
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

#: TLS stacks that can play a firmware (see the module docstring).
STACKS = ("emulator", "stunnel", "gnutls")

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
      :data:`secshadow.lab.certs.KEY_TYPES`).
    - ``legacy_cert``: if set, a key of :data:`secshadow.lab.device.legacycerts.SPECS`: the
      certificate is made with the ``openssl`` CLI instead (MD5/SHA-1, X.509 v1, expired).
    - ``stacks``: the TLS stacks that can play this firmware (``emulator``, ``stunnel``,
      ``gnutls``; see the module docstring).
    - ``gnutls_priority``: the ``gnutls-serv --priority`` string for the ``gnutls`` stack.
    - ``secure_renegotiation``: False for a TLS stack without RFC 5746; only GnuTLS can
      still do that (``%DISABLE_SAFE_RENEGOTIATION``), OpenSSL always offers it.
    - ``procy_terminator``: what the console must send after the password
      (``--procy-terminator``).
    - ``expect_modern`` / ``expect_legacy``: expected outcome per client profile.
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
    legacy_cert: str | None = None
    stacks: tuple[str, ...] = ("emulator",)
    gnutls_priority: str | None = None
    secure_renegotiation: bool = True
    procy_terminator: str = "none"
    expect_modern: str = "ok"
    expect_legacy: str = "ok"

    def __post_init__(self) -> None:
        unknown = set(self.stacks) - set(STACKS)
        if unknown or not self.stacks:
            raise ValueError(f"firmware {self.name!r}: unknown TLS stacks {sorted(unknown)}")
        if "gnutls" in self.stacks and not self.gnutls_priority:
            raise ValueError(f"firmware {self.name!r}: the gnutls stack needs gnutls_priority")
        if not self.secure_renegotiation and set(self.stacks) != {"gnutls"}:
            raise ValueError(f"firmware {self.name!r}: only GnuTLS can turn secure renegotiation off")
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
            "certificate": self.legacy_cert or self.key_type,
            "stacks": list(self.stacks),
            "gnutls_priority": self.gnutls_priority,
            "secure_renegotiation": self.secure_renegotiation,
            "procy_terminator": self.procy_terminator,
            "expect_modern": self.expect_modern,
            "expect_legacy": self.expect_legacy,
        }

    @property
    def emulator_capable(self) -> bool:
        """Whether the pyOpenSSL emulator itself can serve this firmware."""
        return "emulator" in self.stacks

    def generate_certificate(self) -> tuple[bytes, bytes]:
        """A fresh ``(cert_pem, key_pem)`` of this firmware's kind (``legacy_cert`` needs
        the ``openssl`` CLI; raises :class:`secshadow.lab.device.legacycerts.LegacyCertError`)."""
        if self.legacy_cert is not None:
            from secshadow.lab.device.legacycerts import generate_legacy_pair

            return generate_legacy_pair(self.legacy_cert)
        from secshadow.lab import certs

        return certs.generate_self_signed(key_type=self.key_type)


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
        stacks=("emulator", "stunnel"),
    )
)
register(
    FirmwareProfile(
        name="current-ecdsa",
        description="a current firmware with an ECDSA P-256 certificate, TLS 1.2-1.3",
        key_type="ecdsa-p256",
    )
)
register(
    FirmwareProfile(
        name="current-lf",
        description="like 'current', but the firmware insists on a line terminator after the password",
        require_terminator=True,
        procy_terminator="lf",
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
        expect_modern="device-rejected",
        expect_legacy="device-rejected",
    )
)
register(
    FirmwareProfile(
        name="tls13-only",
        description="a hardened firmware that accepts TLS 1.3 only (the legacy profile, capped at 1.2, cannot)",
        min_tls="TLSv1.3",
        max_tls="TLSv1.3",
        expect_legacy="tls-handshake",
    )
)
register(
    FirmwareProfile(
        name="legacy-tls10",
        description=(
            "firmware from around 2014: TLS 1.0 only, AES128-SHA only, a self-signed RSA-1024 "
            "(exponent 65337) MD5 X.509 v1 certificate, expired (IGEL's public sample, made worse)"
        ),
        min_tls="TLSv1",
        max_tls="TLSv1",
        cipher_string="AES128-SHA:@SECLEVEL=0",
        key_type="rsa1024",
        legacy_cert="rsa1024-md5-v1-expired",
        stacks=("emulator", "stunnel", "gnutls"),
        gnutls_priority="NORMAL:-VERS-ALL:+VERS-TLS1.0:-CIPHER-ALL:+AES-128-CBC:-KX-ALL:+RSA:-MAC-ALL:+SHA1",
        expect_modern="tls-handshake",
    )
)
register(
    FirmwareProfile(
        name="legacy-tls11",
        description="firmware from around 2016: TLS 1.1 only, SHA-1 signed RSA-2048 certificate, CBC suites",
        min_tls="TLSv1.1",
        max_tls="TLSv1.1",
        cipher_string="ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA:@SECLEVEL=0",
        legacy_cert="rsa2048-sha1",
        stacks=("emulator", "stunnel", "gnutls"),
        gnutls_priority="NORMAL:-VERS-ALL:+VERS-TLS1.1",
        expect_modern="tls-handshake",
    )
)
register(
    FirmwareProfile(
        name="legacy-no-renego",
        description=(
            "a TLS stack without RFC 5746 secure renegotiation (OpenSSL before 0.9.8m), TLS 1.0-1.2; "
            "GnuTLS only: OpenSSL servers always offer secure renegotiation"
        ),
        min_tls="TLSv1",
        max_tls="TLSv1.2",
        cipher_string="DEFAULT:@SECLEVEL=0",
        legacy_cert="rsa1024-md5-v1-expired",
        stacks=("gnutls",),
        gnutls_priority="NORMAL:-VERS-ALL:+VERS-TLS1.2:+VERS-TLS1.1:+VERS-TLS1.0:%DISABLE_SAFE_RENEGOTIATION",
        secure_renegotiation=False,
        expect_modern="tls-handshake",
    )
)
register(
    FirmwareProfile(
        name="legacy-3des",
        description=(
            "firmware that offers only 3DES (DES-CBC3-SHA) over TLS 1.0; OpenSSL 4.0 has no 3DES "
            "suites any more, so no client profile can reach it (GnuTLS only)"
        ),
        min_tls="TLSv1",
        max_tls="TLSv1",
        cipher_string="DES-CBC3-SHA:@SECLEVEL=0",
        legacy_cert="rsa1024-md5-v1-expired",
        stacks=("gnutls",),
        gnutls_priority="NORMAL:-VERS-ALL:+VERS-TLS1.0:-CIPHER-ALL:+3DES-CBC:-KX-ALL:+RSA:-MAC-ALL:+SHA1",
        expect_modern="tls-handshake",
        expect_legacy="tls-handshake",
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
    if not profile.emulator_capable:
        raise UsageError(
            f"firmware {profile.name!r} cannot be served by this emulator's OpenSSL "
            f"({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}); it needs the {' or '.join(profile.stacks)} "
            "stack: run it with secshadow-matrix or secshadow.lab.matrix.start_device()"
        )
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
