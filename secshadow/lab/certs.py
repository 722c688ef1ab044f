"""Self-signed certificates for device emulators, impostors, IMI servers and tests.

Device certificates are shaped like IGEL's public sample (PROTOCOL.md section 1,
"Real sample"): self-signed, subject = issuer = ``C=DE, L=Bremen, O=IGEL``, no CN and
no subjectAltName. :func:`generate_self_signed` makes such a certificate by default;
``subject_cn`` / ``san_ips`` / ``san_dns`` add names for servers that need them (an
HTTPS IMI server). :func:`twin_of` makes an impostor: a certificate that looks the same
to a human (subject, issuer, serial, dates) but carries a different key, so only a
byte-for-byte pin tells them apart.

Limits of ``cryptography`` 48: it signs only with SHA-2 family hashes (no MD5/SHA-1)
and always writes X.509 v3; a "legacy firmware" certificate with an MD5 signature or
version 1 has to come from the ``openssl`` command line instead.

All PEM outputs are ``bytes``; private keys are unencrypted PKCS#8 PEM.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

#: Key types :func:`generate_self_signed` understands.
KEY_TYPES = ("rsa2048", "rsa3072", "rsa1024", "ecdsa-p256", "ecdsa-p384")

#: Hash names for ``hash_name`` (``cryptography`` refuses MD5 and SHA-1 signatures).
HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def generate_key(key_type: str = "rsa2048") -> _PrivateKey:
    """A fresh private key; ``key_type`` is one of :data:`KEY_TYPES` (ValueError otherwise)."""
    if key_type.startswith("rsa"):
        bits = {"rsa1024": 1024, "rsa2048": 2048, "rsa3072": 3072}.get(key_type)
        if bits is None:
            raise ValueError(f"unknown key type {key_type!r}; choose one of: {', '.join(KEY_TYPES)}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    curve = {"ecdsa-p256": ec.SECP256R1, "ecdsa-p384": ec.SECP384R1}.get(key_type)
    if curve is None:
        raise ValueError(f"unknown key type {key_type!r}; choose one of: {', '.join(KEY_TYPES)}")
    return ec.generate_private_key(curve())


def _name(
    subject_cn: str | None, organization: str | None, locality: str | None, country: str | None
) -> x509.Name:
    # Attribute order as in IGEL's sample: C, L, O (then CN if any).
    attributes = []
    if country:
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    if locality:
        attributes.append(x509.NameAttribute(NameOID.LOCALITY_NAME, locality))
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if subject_cn:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, subject_cn))
    return x509.Name(attributes)


def _key_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_self_signed(
    key_type: str = "rsa2048",
    subject_cn: str | None = None,
    organization: str | None = "IGEL",
    locality: str | None = "Bremen",
    country: str | None = "DE",
    days: int = 3650,
    not_before: datetime.datetime | None = None,
    san_ips: Iterable[str] = (),
    san_dns: Iterable[str] = (),
    hash_name: str = "sha256",
    serial_number: int | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key: ``(cert_pem, key_pem)``.

    ``days``: validity in days from ``not_before`` (default: one hour ago, UTC), so a
    negative ``days`` or an old ``not_before`` gives an already expired certificate.
    With no ``subject_cn``, ``san_ips`` and ``san_dns`` the certificate is name-less, like
    IGEL's device sample. ``san_ips``: IP address strings (ValueError if malformed).
    ``hash_name``: a key of :data:`HASHES`. Raises ValueError for an unknown key type or hash.
    """
    if hash_name not in HASHES:
        raise ValueError(f"unsupported signature hash {hash_name!r}; choose one of: {', '.join(HASHES)}")
    key = generate_key(key_type)
    start = not_before or (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1))
    end = start + datetime.timedelta(days=days)
    if end <= start:
        # X.509 needs notAfter >= notBefore; "expired" means both lie in the past.
        start, end = end - datetime.timedelta(days=1), end
    name = _name(subject_cn, organization, locality, country)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial_number or x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(d) for d in san_dns]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in san_ips]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # A CA-less self-signed server certificate: mark it as an end entity.
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    certificate = builder.sign(key, HASHES[hash_name]())
    return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_pair(directory: str | os.PathLike[str], name: str = "device", **kwargs: object) -> tuple[Path, Path]:
    """Generate with :func:`generate_self_signed` (``kwargs`` passed on) and write
    ``DIR/NAME.crt.pem`` and ``DIR/NAME.key.pem``; returns ``(cert_path, key_path)``.

    The key file is created with mode 0600 (never world-readable, not even briefly).
    """
    cert_pem, key_pem = generate_self_signed(**kwargs)  # type: ignore[arg-type]
    return write_pem_files(directory, name, cert_pem, key_pem)


def write_pem_files(
    directory: str | os.PathLike[str], name: str, cert_pem: bytes, key_pem: bytes
) -> tuple[Path, Path]:
    """Write an existing pair as ``DIR/NAME.crt.pem`` (0644) and ``DIR/NAME.key.pem`` (0600)."""
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    cert_path = base / f"{name}.crt.pem"
    key_path = base / f"{name}.key.pem"
    cert_path.write_bytes(cert_pem)
    # O_CREAT with 0600 so the key is never readable by others, then enforce it in case
    # the file already existed with wider permissions.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def _fresh_key_like(public_key: object) -> _PrivateKey:
    if isinstance(public_key, rsa.RSAPublicKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=public_key.key_size)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ec.generate_private_key(public_key.curve)
    raise ValueError("twin_of supports RSA and ECDSA certificates only")


def twin_of(cert_pem: bytes) -> tuple[bytes, bytes]:
    """An impostor for ``cert_pem``: ``(cert_pem, key_pem)`` with the same subject,
    issuer, serial number, validity dates and extensions, but a fresh key of the same
    type and size (and therefore a different signature and DER).

    Key-bound extensions (subject/authority key identifiers) are recomputed for the new
    key. The signature uses the original's hash when ``cryptography`` can sign with it,
    SHA-256 otherwise (MD5/SHA-1 originals). Raises ValueError for other key types.
    """
    original = x509.load_pem_x509_certificate(cert_pem)
    key = _fresh_key_like(original.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(key.public_key())
        .serial_number(original.serial_number)
        .not_valid_before(original.not_valid_before_utc)
        .not_valid_after(original.not_valid_after_utc)
    )
    for extension in original.extensions:
        if extension.oid == ExtensionOID.SUBJECT_KEY_IDENTIFIER:
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), extension.critical
            )
        elif extension.oid == ExtensionOID.AUTHORITY_KEY_IDENTIFIER:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), extension.critical
            )
        else:
            builder = builder.add_extension(extension.value, extension.critical)
    algorithm = original.signature_hash_algorithm
    digest: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 = (
        HASHES[algorithm.name]() if algorithm is not None and algorithm.name in HASHES else hashes.SHA256()
    )
    twin = builder.sign(key, digest)
    return twin.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def certificate_sha256(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, colon-separated upper-case hex (the pin's fingerprint)."""
    from secshadow.secret import certificate_fingerprint

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return certificate_fingerprint(der)


def der_of(cert_pem: bytes) -> bytes:
    """The DER bytes of a PEM certificate (pyOpenSSL: it also reads the odd legacy ones)."""
    from OpenSSL import crypto

    return crypto.dump_certificate(crypto.FILETYPE_ASN1, crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
