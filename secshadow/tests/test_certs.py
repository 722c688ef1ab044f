"""Certificates shaped like IGEL's device sample (PROTOCOL.md section 1) and their impostors."""

from __future__ import annotations

import datetime
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from secshadow.lab import certs
from secshadow.secret import certificate_fingerprint, parse_certificate


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_default_certificate_is_name_less_like_igels_sample() -> None:
    cert_pem, key_pem = certs.generate_self_signed()
    cert = load(cert_pem)
    assert cert.subject.rfc4514_string() == "O=IGEL,L=Bremen,C=DE"
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    # The project's own secret parser accepts it as a device certificate to pin.
    assert parse_certificate(cert_pem.decode()) == der(cert)


def test_twin_has_same_names_and_dates_but_another_key() -> None:
    original_pem, _ = certs.generate_self_signed(days=30)
    twin_pem, twin_key_pem = certs.twin_of(original_pem)
    original, twin = load(original_pem), load(twin_pem)
    assert twin.subject == original.subject and twin.issuer == original.issuer
    assert twin.serial_number == original.serial_number
    assert twin.not_valid_before_utc == original.not_valid_before_utc
    assert twin.not_valid_after_utc == original.not_valid_after_utc
    assert twin.public_key().public_numbers() != original.public_key().public_numbers()  # type: ignore[union-attr]
    assert der(twin) != der(original)
    assert certificate_fingerprint(der(twin)) != certificate_fingerprint(der(original))
    twin_key = serialization.load_pem_private_key(twin_key_pem, None)
    assert twin_key.public_key().public_numbers() == twin.public_key().public_numbers()  # type: ignore[union-attr]


def test_twin_of_an_ecdsa_certificate_with_names() -> None:
    original_pem, _ = certs.generate_self_signed("ecdsa-p256", subject_cn="ums.test", san_dns=["ums.test"])
    twin = load(certs.twin_of(original_pem)[0])
    assert isinstance(twin.public_key(), ec.EllipticCurvePublicKey)
    san = twin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ums.test"]


def test_names_and_addresses_for_a_server() -> None:
    cert = load(certs.generate_self_signed(subject_cn="ums", san_ips=["127.0.0.1"], san_dns=["localhost"])[0])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ums"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_expired_certificate() -> None:
    start = datetime.datetime(2014, 1, 1, tzinfo=datetime.UTC)
    cert = load(certs.generate_self_signed(not_before=start, days=365)[0])
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)


def test_unknown_key_type_and_hash() -> None:
    with pytest.raises(ValueError, match="unknown key type"):
        certs.generate_self_signed("dsa512")
    with pytest.raises(ValueError, match="unsupported signature hash"):
        certs.generate_self_signed(hash_name="md5")


def test_write_pair_key_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert_path, key_path = certs.write_pair(tmp_path / "sub", "device", key_type="ecdsa-p256")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load(cert_path.read_bytes()).subject.rfc4514_string() == "O=IGEL,L=Bremen,C=DE"
    assert certs.certificate_sha256(cert_path.read_bytes()) == certificate_fingerprint(
        der(load(cert_path.read_bytes()))
    )
