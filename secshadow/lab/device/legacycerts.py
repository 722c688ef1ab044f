"""Old-firmware device certificates, made with the ``openssl`` command line.

``cryptography`` signs only with SHA-2 and always writes X.509 v3 (``secshadow.lab.certs``);
devices in the field present certificates like IGEL's public sample (PROTOCOL.md
section 1): RSA-1024 with public exponent 65337, ``md5WithRSAEncryption``, subject =
issuer = ``C=DE, L=Bremen, O=IGEL``, no CN, no SAN, sometimes X.509 v1, often expired.

Recipe (measured with Debian's OpenSSL 3.0 CLI):

- ``openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -pkeyopt
  rsa_keygen_pubexp:65337`` for the key (PKCS#8 PEM);
- ``openssl req -new`` for a request with the name in IGEL's order (C, L, O);
- ``openssl ca -selfsign -md md5 -startdate ... -enddate ...`` to sign it: unlike
  ``openssl x509 -req`` it takes arbitrary dates (``x509 -days`` refuses values below
  -1, so it cannot make an expired certificate). Without an extensions section the
  result is **X.509 v1**; with one it is v3. MD5 and SHA-1 signing need no security
  level change in the CLI (only TLS use of such keys does).

Everything happens in a private temporary directory that is removed afterwards; the
caller gets PEM bytes. Nothing here is meant for production certificates.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

#: IGEL's sample name, in its attribute order.
IGEL_SUBJECT = "/C=DE/L=Bremen/O=IGEL"


class LegacyCertError(RuntimeError):
    """The ``openssl`` program is missing or refused a step; the message carries its stderr."""


@dataclass(frozen=True)
class LegacyCertSpec:
    """What to make.

    - ``key_bits`` / ``exponent``: RSA key size and public exponent (IGEL's sample: 1024, 65337).
    - ``digest``: signature hash for ``openssl ca -md`` (``md5``, ``sha1``, ``sha256``).
    - ``version``: 1 (no extensions) or 3 (basicConstraints CA:FALSE, subjectKeyIdentifier).
    - ``not_before`` / ``not_after``: validity, UTC.
    - ``subject``: an ``openssl`` slash-separated name.
    - ``serial``: the serial number (random when ``None``).
    """

    key_bits: int = 1024
    exponent: int = 65337
    digest: str = "md5"
    version: int = 1
    not_before: datetime.datetime = datetime.datetime(2014, 1, 1, tzinfo=datetime.UTC)
    not_after: datetime.datetime = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    subject: str = IGEL_SUBJECT
    serial: int | None = None

    def __post_init__(self) -> None:
        if self.version not in (1, 3):
            raise ValueError("version must be 1 or 3")
        if self.digest not in ("md5", "sha1", "sha256"):
            raise ValueError(f"unsupported digest {self.digest!r}")
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be after not_before")


#: Named certificate kinds the firmware profiles refer to.
SPECS: dict[str, LegacyCertSpec] = {
    # IGEL's sample made worse: v1 and expired (firmware from around 2014).
    "rsa1024-md5-v1-expired": LegacyCertSpec(),
    # A TLS 1.1-era certificate: RSA-2048, SHA-1, v3, still within its dates.
    "rsa2048-sha1": LegacyCertSpec(
        key_bits=2048, exponent=65537, digest="sha1", version=3,
        not_before=datetime.datetime(2016, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2046, 1, 1, tzinfo=datetime.UTC),
    ),
}

_CA_CONFIG = """\
[ ca ]
default_ca = device
[ device ]
database = {dir}/index.txt
new_certs_dir = {dir}/new
serial = {dir}/serial
policy = anything
preserve = yes
unique_subject = no
email_in_dn = no
{extensions_line}
[ anything ]
countryName = optional
stateOrProvinceName = optional
localityName = optional
organizationName = optional
organizationalUnitName = optional
commonName = optional
[ v3_device ]
basicConstraints = critical, CA:FALSE
subjectKeyIdentifier = hash
"""


def openssl_program() -> str:
    """Path of the ``openssl`` CLI; :class:`LegacyCertError` when it is not installed."""
    path = shutil.which("openssl")
    if path is None:
        raise LegacyCertError("the openssl command line is not installed (Debian: apt-get install openssl)")
    return path


def _run(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60)  # noqa: S603 - fixed argv
    if result.returncode != 0:
        raise LegacyCertError(
            f"{' '.join(argv[:2])} failed (exit {result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()[-500:]}"
        )


def _openssl_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y%m%d%H%M%SZ")


def generate_legacy_pair(spec: LegacyCertSpec | str = "rsa1024-md5-v1-expired",
                         key_pem: bytes | None = None) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)`` for ``spec`` (a :class:`LegacyCertSpec` or a key of :data:`SPECS`).

    ``key_pem``: sign this existing key instead of generating one.
    Raises :class:`LegacyCertError` when ``openssl`` is missing or fails, KeyError for an
    unknown spec name.
    """
    if isinstance(spec, str):
        spec = SPECS[spec]
    openssl = openssl_program()
    work = Path(tempfile.mkdtemp(prefix="secshadow-legacycert-"))
    try:
        os.chmod(work, 0o700)
        (work / "new").mkdir()
        (work / "index.txt").write_text("")
        serial = spec.serial if spec.serial is not None else int.from_bytes(os.urandom(8), "big") >> 1
        hex_serial = f"{serial or 1:X}"
        (work / "serial").write_text(("0" * (len(hex_serial) % 2)) + hex_serial + "\n")
        (work / "ca.cnf").write_text(_CA_CONFIG.format(
            dir=work, extensions_line="x509_extensions = v3_device" if spec.version == 3 else ""))
        key_path = work / "key.pem"
        if key_pem is None:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            _run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{spec.key_bits}",
                  "-pkeyopt", f"rsa_keygen_pubexp:{spec.exponent}", "-out", str(key_path)], work)
        else:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key_pem)
        _run([openssl, "req", "-new", "-key", str(key_path), "-subj", spec.subject, "-out", "req.pem"], work)
        _run([openssl, "ca", "-config", "ca.cnf", "-selfsign", "-keyfile", str(key_path), "-in", "req.pem",
              "-md", spec.digest, "-startdate", _openssl_time(spec.not_before),
              "-enddate", _openssl_time(spec.not_after), "-batch", "-notext", "-out", "cert.pem"], work)
        return (work / "cert.pem").read_bytes(), key_path.read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def legacy_twin(cert_pem: bytes) -> tuple[bytes, bytes]:
    """An impostor for an old certificate: same subject, issuer, serial, dates, version,
    signature hash and key size, but a fresh key (so another DER). Unlike
    :func:`secshadow.lab.certs.twin_of` it keeps MD5/SHA-1 and X.509 v1, so it looks exactly
    like the original to anyone who does not compare bytes."""
    original = x509.load_pem_x509_certificate(cert_pem)
    public = original.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("legacy_twin supports RSA certificates only (use secshadow.lab.certs.twin_of)")
    algorithm = original.signature_hash_algorithm
    digest = algorithm.name if algorithm is not None else "sha256"
    subject = "".join(
        f"/{attribute.rfc4514_attribute_name}={attribute.value!s}" for attribute in original.subject
    )
    spec = LegacyCertSpec(
        key_bits=public.key_size,
        exponent=public.public_numbers().e,
        digest=digest,
        version=1 if original.version is x509.Version.v1 else 3,
        not_before=original.not_valid_before_utc,
        not_after=original.not_valid_after_utc,
        subject=subject,
        serial=original.serial_number,
    )
    return generate_legacy_pair(spec)


def describe(cert_pem: bytes) -> dict[str, object]:
    """What matters about a device certificate, for docs and tests:
    ``version``, ``signature`` (hash name), ``key_bits``, ``exponent``, ``expired``, ``subject``."""
    certificate = x509.load_pem_x509_certificate(cert_pem)
    public = certificate.public_key()
    algorithm = certificate.signature_hash_algorithm
    numbers = getattr(public, "public_numbers", lambda: None)()
    return {
        "version": 1 if certificate.version is x509.Version.v1 else 3,
        "signature": algorithm.name if algorithm is not None else "none",
        "key_bits": getattr(public, "key_size", 0),
        "exponent": getattr(numbers, "e", None),
        "expired": certificate.not_valid_after_utc < datetime.datetime.now(datetime.UTC),
        "subject": certificate.subject.rfc4514_string(),
    }


__all__ = ["IGEL_SUBJECT", "LegacyCertError", "LegacyCertSpec", "SPECS", "describe", "generate_legacy_pair",
           "legacy_twin", "openssl_program"]
