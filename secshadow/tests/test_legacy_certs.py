"""Old-firmware certificates from the openssl CLI: RSA-1024, MD5, X.509 v1, expired."""

from __future__ import annotations

import subprocess

import pytest
from cryptography import x509

from secshadow.lab.device.legacycerts import LegacyCertSpec, describe, generate_legacy_pair, legacy_twin
from secshadow.tests.conftest import require_program


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, bytes]:
    require_program("openssl")
    return generate_legacy_pair()


def test_default_is_igel_sample_made_worse(sample: tuple[bytes, bytes]) -> None:
    info = describe(sample[0])
    assert info == {"version": 1, "signature": "md5", "key_bits": 1024, "exponent": 65337, "expired": True,
                    "subject": "O=IGEL,L=Bremen,C=DE"}
    assert b"PRIVATE KEY" in sample[1]


@pytest.mark.integration
def test_openssl_itself_reads_v1_md5(sample: tuple[bytes, bytes]) -> None:
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=sample[0], capture_output=True,
                          check=True).stdout.decode()
    assert "Version: 1 (0x0)" in text
    assert "md5WithRSAEncryption" in text
    assert "Public-Key: (1024 bit)" in text
    assert "X509v3" not in text  # no extensions at all


@pytest.mark.integration
def test_sha1_v3_spec() -> None:
    require_program("openssl")
    cert, _ = generate_legacy_pair("rsa2048-sha1")
    info = describe(cert)
    assert (info["version"], info["signature"], info["key_bits"], info["expired"]) == (3, "sha1", 2048, False)


@pytest.mark.integration
def test_twin_looks_identical_but_is_another_certificate(sample: tuple[bytes, bytes]) -> None:
    twin_cert, twin_key = legacy_twin(sample[0])
    a, b = x509.load_pem_x509_certificate(sample[0]), x509.load_pem_x509_certificate(twin_cert)
    assert describe(twin_cert) == describe(sample[0])
    assert (a.subject, a.issuer, a.serial_number) == (b.subject, b.issuer, b.serial_number)
    assert (a.not_valid_before_utc, a.not_valid_after_utc) == (b.not_valid_before_utc, b.not_valid_after_utc)
    assert twin_cert != sample[0] and twin_key != sample[1]


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        LegacyCertSpec(version=2)
    with pytest.raises(ValueError):
        LegacyCertSpec(digest="md4")
