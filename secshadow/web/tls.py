"""HTTPS for ``secshadow-web``: a given certificate, or a generated self-signed one.

:func:`load_server_tls` reads ``--tls-cert`` / ``--tls-key`` (PEM; the certificate file
may hold the chain after the leaf). :func:`generate_server_tls` makes an EC P-256
certificate valid for 825 days with the given names in its subjectAltName (always
``localhost``, ``127.0.0.1`` and ``::1``), kept in memory only; the service prints its
SHA-256 fingerprint so a person can compare it with what the browser shows. Both give a
``TLSMemoryBIOFactory`` connection creator: TLS 1.2 or newer, ``DEFAULT`` ciphers without
anonymous suites, no compression.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from secshadow.errors import UsageError
from secshadow.secret import certificate_fingerprint


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """One server context for every connection, from a certificate ``chain`` (leaf
    first) and its private ``key`` (``cryptography`` objects). ``fingerprint``: the
    leaf's SHA-256 (``AA:BB:...``). Serves ``TLSMemoryBIOFactory`` and, through
    ``getContext``, ``reactor.listenSSL``."""

    def __init__(self, chain: list[x509.Certificate], key: Any) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_cipher_list(b"DEFAULT:!aNULL:!eNULL")
        context.use_certificate(chain[0])
        for extra in chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(key)
        context.check_privatekey()
        self._context = context
        self.fingerprint = certificate_fingerprint(chain[0].public_bytes(serialization.Encoding.DER))

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        return SSL.Connection(self._context, None)

    def getContext(self) -> SSL.Context:  # noqa: N802
        return self._context


def load_server_tls(cert_path: str, key_path: str, flags: tuple[str, str] = ("--tls-cert", "--tls-key")) -> ServerTLS:
    """Server TLS from PEM files; raises :class:`UsageError` when they cannot be read or
    are not a certificate (chain) and its unencrypted key. ``flags``: the option names
    the message gives for the two files."""
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read(1024 * 1024)
        with open(key_path, "rb") as f:
            key_pem = f.read(1024 * 1024)
    except OSError as e:
        raise UsageError(f"cannot read {e.filename}: {e.strerror or e}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        return ServerTLS(chain, key)
    except Exception as e:  # noqa: BLE001 - any parse or pairing failure is a usage error
        raise UsageError(f"{flags[0]} {cert_path} / {flags[1]} {key_path} are not a PEM certificate and its "
                         f"matching unencrypted key ({type(e).__name__})") from None


def generate_server_tls(names: Iterable[str] = ()) -> ServerTLS:
    """A fresh self-signed certificate (in memory) for ``names`` (host names or IP
    addresses) plus ``localhost``, ``127.0.0.1`` and ``::1``."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = {"localhost"}, {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    for name in names:
        try:
            ips.add(ipaddress.ip_address(name))
        except ValueError:
            if name:
                dns.add(name)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secshadow-web"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secshadow")])
    san = [x509.DNSName(d) for d in sorted(dns)] + [x509.IPAddress(i) for i in sorted(ips, key=str)]
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ServerTLS([certificate], key)
