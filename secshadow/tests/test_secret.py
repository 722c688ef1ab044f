"""secshadow.secret: the shadow secret (PROTOCOL.md section 1).

Certificates are generated here with ``cryptography``; no key material is committed.
"""

from __future__ import annotations

import base64
import datetime
import json
import pickle
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from secshadow.errors import SecretError, UsageError
from secshadow.secret import (
    OneTimePassword,
    ShadowSecret,
    certificate_fingerprint,
    load_secret,
    parse_certificate,
    parse_host,
    secret_from_document,
)

PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"
IGEL_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Bremen"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IGEL"),
    ]
)


def _self_signed(key_size: int, not_before: datetime.datetime, not_after: datetime.datetime) -> bytes:
    """A self-signed device-like certificate: subject = issuer = C=DE,L=Bremen,O=IGEL, no CN, no SAN."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    cert = (
        x509.CertificateBuilder()
        .subject_name(IGEL_NAME)
        .issuer_name(IGEL_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def der2048() -> bytes:
    utc = datetime.UTC
    return _self_signed(2048, datetime.datetime(2014, 1, 1, tzinfo=utc), datetime.datetime(2037, 1, 1, tzinfo=utc))


@pytest.fixture(scope="module")
def der1024_expired() -> bytes:
    """RSA-1024 and long expired, like old firmware: still a certificate to pin."""
    utc = datetime.UTC
    return _self_signed(1024, datetime.datetime(2014, 1, 1, tzinfo=utc), datetime.datetime(2015, 1, 1, tzinfo=utc))


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode("ascii")


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode("ascii")


# ---------------------------------------------------------------- certificate forms


def test_pem_escaped_newlines_and_bare_base64_give_identical_der(der2048: bytes) -> None:
    pem = _pem(der2048)
    escaped = pem.replace("\n", "\\n")
    assert "\n" not in escaped and "\\n" in escaped
    crlf = pem.replace("\n", "\r\n")
    escaped_crlf = pem.replace("\n", "\\r\\n")
    results = {parse_certificate(form) for form in (pem, escaped, crlf, escaped_crlf, _b64(der2048))}
    assert results == {der2048}


def test_bare_base64_wrapped_in_lines_and_surrounding_whitespace(der2048: bytes) -> None:
    b64 = _b64(der2048)
    wrapped = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    assert parse_certificate("  \n" + wrapped + "\n\t ") == der2048


def test_weak_expired_rsa1024_certificate_is_accepted_as_is(der1024_expired: bytes) -> None:
    # The pin is DER equality; age and key size are irrelevant (PROTOCOL.md section 2).
    assert parse_certificate(_pem(der1024_expired)) == der1024_expired
    assert parse_certificate(_b64(der1024_expired)) == der1024_expired


@pytest.mark.parametrize("text", ["", "   ", "\n\t  \r\n", "\\n", "\\r\\n  \\n"])
def test_empty_certificate_tells_the_user_to_reboot_or_send_settings(text: str) -> None:
    with pytest.raises(SecretError) as info:
        parse_certificate(text)
    message = str(info.value)
    assert "reboot the device" in message
    assert "send settings" in message


def test_secret_error_is_a_usage_error_with_exit_code_2() -> None:
    with pytest.raises(UsageError) as info:
        parse_certificate("")
    assert info.value.exit_code == 2


def test_two_pem_blocks_are_refused(der2048: bytes, der1024_expired: bytes) -> None:
    with pytest.raises(SecretError, match="2 PEM blocks"):
        parse_certificate(_pem(der2048) + _pem(der1024_expired))
    with pytest.raises(SecretError):
        parse_certificate(_pem(der2048) + _pem(der2048))


def test_private_key_label_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    with pytest.raises(SecretError, match="PRIVATE KEY"):
        parse_certificate(pem)


def test_mismatched_begin_and_end_labels_are_refused(der2048: bytes) -> None:
    pem = _pem(der2048).replace("-----END CERTIFICATE-----", "-----END X509 CRL-----")
    with pytest.raises(SecretError):
        parse_certificate(pem)


def test_truncated_pem_is_refused(der2048: bytes) -> None:
    pem = _pem(der2048)
    without_end = pem[: pem.index("-----END")]
    with pytest.raises(SecretError, match="no complete block|incomplete PEM block"):
        parse_certificate(without_end)
    lines = pem.strip().splitlines()
    cut_body = "\n".join([lines[0], *lines[1:4], lines[-1]])  # header, a few body lines, footer
    with pytest.raises(SecretError):
        parse_certificate(cut_body)


def test_truncated_bare_base64_is_refused(der2048: bytes) -> None:
    with pytest.raises(SecretError):
        parse_certificate(_b64(der2048[: len(der2048) // 2]))


@pytest.mark.parametrize("text", ["not base64 at all!", "QUJD*", "QQ", "====", "MIIB\u00e9"])
def test_invalid_base64_is_refused(text: str) -> None:
    with pytest.raises(SecretError):
        parse_certificate(text)


def test_base64_of_something_that_is_not_a_certificate_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for der in (b"hello world", spki):
        with pytest.raises(SecretError, match="not a valid X.509 certificate"):
            parse_certificate(base64.b64encode(der).decode())
    pem_body = base64.encodebytes(b"hello world").decode()
    with pytest.raises(SecretError):
        parse_certificate(f"-----BEGIN CERTIFICATE-----\n{pem_body}-----END CERTIFICATE-----\n")


def test_non_string_certificate_and_oversized_text_are_refused(der2048: bytes) -> None:
    with pytest.raises(SecretError):
        parse_certificate(der2048)  # type: ignore[arg-type]
    with pytest.raises(SecretError, match="64 KiB"):
        parse_certificate(_pem(der2048) + " " * (64 * 1024))


def test_fingerprint_is_colon_separated_upper_hex_sha256(der2048: bytes) -> None:
    fingerprint = certificate_fingerprint(der2048)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fingerprint)
    expected = x509.load_der_x509_certificate(der2048).fingerprint(hashes.SHA256()).hex().upper()
    assert fingerprint.replace(":", "") == expected


# ---------------------------------------------------------------- document shapes


def _imi_document(der: bytes, **overrides: object) -> dict[str, object]:
    """The PROTOCOL.md section 1 sample shape."""
    document: dict[str, object] = {
        "unitID": "00E0C54DCB8E",
        "mac": "00E0C54DCB8E",
        "firmwareID": "21",
        "lastIP": "172.30.91.43",
        "shadowSecret": {"certificate": _pem(der), "password": PASSWORD},
        "id": "27",
        "name": "Curry",
        "parentID": "-1",
        "movedToBin": False,
        "objectType": "tc",
        "links": [],
    }
    document.update(overrides)
    return document


def test_imi_document_shape(der2048: bytes) -> None:
    secret = load_secret(json.dumps(_imi_document(der2048)))
    assert secret.certificate_der == der2048
    assert secret.password.reveal() == PASSWORD
    assert secret.host == "172.30.91.43"
    assert secret.port is None
    assert secret.device_id == "27"
    assert secret.device_name == "Curry"
    assert secret.certificate_sha256 == certificate_fingerprint(der2048)


def test_imi_document_with_escaped_pem_as_bytes(der2048: bytes) -> None:
    document = _imi_document(der2048)
    document["shadowSecret"] = {"certificate": _pem(der2048).replace("\n", "\\n"), "password": PASSWORD}
    secret = load_secret(json.dumps(document).encode("utf-8"))
    assert secret.certificate_der == der2048


def test_imi_document_numeric_id_and_missing_lastip(der2048: bytes) -> None:
    document = _imi_document(der2048, id=27)
    del document["lastIP"]
    secret = secret_from_document(document)
    assert secret.device_id == "27"
    assert secret.host is None
    assert secret_from_document(_imi_document(der2048, lastIP="")).host is None


def test_imi_document_with_empty_certificate_is_a_hard_error(der2048: bytes) -> None:
    document = _imi_document(der2048, shadowSecret={"certificate": "", "password": PASSWORD})
    with pytest.raises(SecretError, match="reboot the device or send settings"):
        secret_from_document(document)


@pytest.mark.parametrize(
    ("shadow", "fragment"),
    [
        ({"password": PASSWORD}, "no 'certificate' field in 'shadowSecret'"),
        ({"certificate": None, "password": PASSWORD}, "'certificate' must be a string"),
        ("a string", "'shadowSecret' must be an object"),
        ([], "'shadowSecret' must be an object"),
        (None, "'shadowSecret' must be an object"),
    ],
)
def test_imi_document_with_malformed_shadow_secret(der2048: bytes, shadow: object, fragment: str) -> None:
    with pytest.raises(SecretError) as info:
        secret_from_document(_imi_document(der2048, shadowSecret=shadow))
    assert fragment in str(info.value)


def test_imi_document_without_password_or_with_a_non_string_one(der2048: bytes) -> None:
    with pytest.raises(SecretError, match="no 'password' field"):
        secret_from_document(_imi_document(der2048, shadowSecret={"certificate": _pem(der2048)}))
    with pytest.raises(SecretError, match="'password' must be a string"):
        secret_from_document(_imi_document(der2048, shadowSecret={"certificate": _pem(der2048), "password": 42}))


def test_bare_shape_with_host_and_port(der2048: bytes) -> None:
    secret = load_secret(
        json.dumps({"certificate": _b64(der2048), "password": PASSWORD, "host": "tc-27.example", "port": 5901})
    )
    assert secret.certificate_der == der2048
    assert secret.password == OneTimePassword(PASSWORD)
    assert (secret.host, secret.port) == ("tc-27.example", 5901)
    assert secret.device_id is None and secret.device_name is None


def test_bare_shape_minimal_and_port_as_string(der2048: bytes) -> None:
    minimal = secret_from_document({"certificate": _pem(der2048), "password": PASSWORD})
    assert (minimal.host, minimal.port) == (None, None)
    as_text = secret_from_document({"certificate": _pem(der2048), "password": PASSWORD, "port": "5900"})
    assert as_text.port == 5900


@pytest.mark.parametrize("port", [0, -1, 65536, "http", "", 5900.5, True, False, [5900], {"n": 1}])
def test_bad_port_is_refused(der2048: bytes, port: object) -> None:
    with pytest.raises(SecretError, match="port"):
        secret_from_document({"certificate": _pem(der2048), "password": PASSWORD, "port": port})


@pytest.mark.parametrize("host", [5900, True, ["10.0.0.1"], {"ip": "x"}, "bad host name", "a;b", "x" * 300])
def test_bad_host_is_refused(der2048: bytes, host: object) -> None:
    with pytest.raises(SecretError, match="host"):
        secret_from_document({"certificate": _pem(der2048), "password": PASSWORD, "host": host})
    with pytest.raises(SecretError, match="host"):
        secret_from_document(_imi_document(der2048, lastIP=host))


@pytest.mark.parametrize("document", [[], "text", 3, None, True])
def test_document_that_is_not_an_object(document: object) -> None:
    with pytest.raises(SecretError, match="JSON object"):
        load_secret(json.dumps(document))


@pytest.mark.parametrize("data", [b"", b"   \n", "", b"\xff\xfe{}", b"{", "{'single': 1}"])
def test_load_secret_refuses_empty_non_utf8_and_non_json(data: bytes | str) -> None:
    with pytest.raises(SecretError):
        load_secret(data)


# ---------------------------------------------------------------- the one-time password


def test_password_never_appears_in_any_rendering() -> None:
    password = OneTimePassword(PASSWORD)
    renderings = [
        repr(password),
        str(password),
        format(password),
        format(password, "s"),
        f"{password}",
        f"{password!r}",
        f"{password!s}",
        f"{password:>60}",
        "%s" % password,  # noqa: UP031
        "%r" % (password,),  # noqa: UP031
        "{}".format(password),  # noqa: UP032
        str([password]),
        repr({"pw": password}),
    ]
    for text in renderings:
        assert PASSWORD not in text
        assert "redacted" in text
    assert password.reveal() == PASSWORD


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_password_cannot_be_pickled(protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(OneTimePassword(PASSWORD), protocol=protocol)


def test_password_equality() -> None:
    assert OneTimePassword(PASSWORD) == OneTimePassword(PASSWORD)
    assert OneTimePassword(PASSWORD) != OneTimePassword(PASSWORD.replace("4", "5"))
    assert OneTimePassword(PASSWORD) != OneTimePassword(PASSWORD + "0")
    assert OneTimePassword(PASSWORD) != PASSWORD
    assert hash(OneTimePassword("a")) == hash(OneTimePassword("a"))
    assert len({OneTimePassword("a"), OneTimePassword("a"), OneTimePassword("b")}) == 2


@pytest.mark.parametrize("value", ["", "with space", "tab\t", "new\nline", "\u00e9t\u00e9", "x" * 257, None, 1234])
def test_invalid_password_values_are_refused_without_quoting_them(value: object) -> None:
    with pytest.raises(SecretError) as info:
        OneTimePassword(value)  # type: ignore[arg-type]
    if isinstance(value, str) and value.strip():
        assert value not in str(info.value)


def test_shadow_secret_repr_hides_the_password(der2048: bytes) -> None:
    secret = load_secret(json.dumps(_imi_document(der2048)))
    for text in (repr(secret), str(secret), f"{secret}", "%s" % (secret,), str([secret])):  # noqa: UP031
        assert PASSWORD not in text
        assert "172.30.91.43" in text
        assert secret.certificate_sha256 in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_shadow_secret_is_immutable(der2048: bytes) -> None:
    secret = ShadowSecret(certificate_der=der2048, password=OneTimePassword(PASSWORD))
    with pytest.raises(AttributeError):
        secret.host = "evil.example"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        '{"certificate": "", "password": "%s", }',  # trailing comma after the password
        '{"certificate": "", "password": "%s" "host": "x"}',  # missing comma after the password
        '{"password": "%s", "certificate": ',  # truncated after the password
        '{"shadowSecret": {"password": "%s"}, "lastIP": 10.0.0.}',
    ],
)
def test_load_secret_errors_never_quote_the_password(text: str) -> None:
    data = text % PASSWORD
    with pytest.raises(SecretError) as info:
        load_secret(data)
    message = str(info.value)
    assert "not valid JSON" in message
    assert PASSWORD not in message
    assert PASSWORD[:8] not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_field_errors_never_quote_the_password(der2048: bytes) -> None:
    bad = [
        {"certificate": "garbage " + PASSWORD, "password": PASSWORD},
        {"certificate": _pem(der2048), "password": PASSWORD + " trailing"},
        {"certificate": _pem(der2048), "password": PASSWORD, "port": PASSWORD},
        {"certificate": _pem(der2048), "password": PASSWORD, "host": "tc " + PASSWORD},
    ]
    for document in bad:
        with pytest.raises(SecretError) as info:
            load_secret(json.dumps(document))
        assert PASSWORD not in str(info.value)


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
# Documents shaped like the real ones, with arbitrary values in the interesting places.
shaped_documents = st.fixed_dictionaries(
    {},
    optional={
        "certificate": json_values,
        "password": json_values,
        "host": json_values,
        "port": json_values,
        "lastIP": json_values,
        "id": json_values,
        "name": json_values,
        "shadowSecret": json_values
        | st.fixed_dictionaries({}, optional={"certificate": json_values, "password": json_values}),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(json_values, shaped_documents))
def test_arbitrary_json_documents_only_raise_secret_error(document: object) -> None:
    try:
        secret = secret_from_document(document)  # type: ignore[arg-type]
    except SecretError:
        return
    assert isinstance(secret, ShadowSecret)


@settings(max_examples=100, deadline=None)
@given(st.one_of(json_values, shaped_documents))
def test_arbitrary_json_text_only_raises_secret_error(document: object) -> None:
    try:
        text = json.dumps(document)
    except ValueError:
        return
    try:
        load_secret(text)
    except SecretError:
        pass


@settings(max_examples=500, deadline=None)
@given(
    st.text()
    | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n- \\")
    | st.builds(
        lambda a, b, c: f"{a}-----BEGIN {b}-----{c}-----END {b}-----",
        st.text(max_size=5),
        st.sampled_from(["CERTIFICATE", "PRIVATE KEY", "X"]),
        st.text(alphabet="AQIMBw=+/\n\\n", max_size=80),
    )
)
def test_arbitrary_certificate_text_only_raises_secret_error(text: str) -> None:
    try:
        der = parse_certificate(text)
    except SecretError:
        return
    x509.load_der_x509_certificate(der)


@settings(max_examples=500, deadline=None)
@given(st.binary() | st.builds(lambda b: b'{"certificate": "' + b, st.binary()))
def test_arbitrary_bytes_only_raise_secret_error(data: bytes) -> None:
    try:
        load_secret(data)
    except SecretError:
        pass


# ------------------------------------------------------------------ device hosts (issue 9)
@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("-x", "cannot start or end with '-'"),
        ("tc-27-.example", "cannot start or end with '-'"),
        ("host_name", "only letters, digits, '-' and '.'"),
        ("a..b", "empty label"),
        (".example", "empty label"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("a" * 64 + ".example", "longer than 63"),
        (".".join(["abcdefghi"] * 26), "longer than 253"),
        ("[::1]", "without brackets: '::1'"),
        ("[10.0.0.5]", "without brackets"),
        ("tc27.example:5900", "give the port separately"),
        ("127.1", "last label is all digits"),
        ("10.0.0.256", "last label is all digits"),
        ("t\u00e4st.example", "xn--"),
        ("fe80::1%not a zone", "give the port separately"),
    ],
)
def test_a_bad_device_host_is_a_usage_error_that_says_why(host: str, reason: str) -> None:
    """Hosts the review found ending as exit 1 (internal) or a late failure: now a usage
    error (exit 2) at once, naming the flag and the reason."""
    with pytest.raises(UsageError) as info:
        parse_host(host, "--device-host")
    assert info.value.exit_code == 2 and info.value.code == "usage"
    assert info.value.message.startswith("--device-host"), info.value.message
    assert reason in info.value.message, info.value.message


@pytest.mark.parametrize(
    "host",
    ["10.0.0.5", "::1", "2001:db8::5", "fe80::1%eth0", "::ffff:127.0.0.1", "localhost", "TC-27",
     "tc-27.example.com", "tc-27.example.com.", "1tc.example", "xn--tst-qla.example", "a" * 63 + ".example",
     " 10.0.0.5 "],
)
def test_a_good_device_host_is_accepted_as_written(host: str) -> None:
    assert parse_host(host, "--device-host") == host.strip()
