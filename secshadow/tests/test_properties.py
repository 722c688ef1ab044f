"""Property-based tests (hypothesis) for the parsers test_secret/test_procy/test_imi/
test_viewers do not cover yet: certificates built from *real* DER (truncated, mutated,
re-labelled, several blocks), IMI documents with huge values and odd Unicode, the UMS
fingerprint, URL, device id and host parsers, the ITG error parser, and the ``--listen``
endpoint strings as the CLI checks them. Each parser either returns a well-formed value
or raises the project's own error class (never anything else, never the password)."""

from __future__ import annotations

import base64
import io
import json
import textwrap

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock

from secshadow import cli
from secshadow.lab import certs
from secshadow.errors import SecretError, UMSError, UsageError
from secshadow.imi import error_from_response, itg_error, secret_from_response, validate_base_url, validate_device_id
from secshadow.secret import OneTimePassword, load_secret, parse_certificate, parse_host, secret_from_document
from secshadow.tests._tls import der_of
from secshadow.umstrust import parse_fingerprint

CERT_PEM, _ = certs.generate_self_signed()
DER = der_of(CERT_PEM)
B64 = base64.b64encode(DER).decode()
PASSWORD = "464abcbd-1399-47d0-b011-eba2e67a72b0"
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pem(body: str, label: str = "CERTIFICATE", end_label: str | None = None) -> str:
    lines = "\n".join(textwrap.wrap(body, 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {end_label or label}-----\n"


# ------------------------------------------------------------------------ certificates
@SETTINGS
@given(st.integers(min_value=0, max_value=len(DER) - 1), st.sampled_from(["pem", "b64", "escaped"]))
def test_truncated_certificate_is_refused(cut: int, form: str) -> None:
    body = base64.b64encode(DER[:cut]).decode()
    text = {"pem": _pem(body), "b64": body, "escaped": _pem(body).replace("\n", "\\n")}[form]
    try:
        parse_certificate(text)
    except SecretError:
        return
    raise AssertionError("a truncated certificate was accepted")


@SETTINGS
@given(st.integers(min_value=0, max_value=len(DER) - 1), st.integers(min_value=1, max_value=255))
@example(position=12, xor=1)  # X.509 version field 2 -> 3: cryptography raises InvalidVersion
def test_mutated_der_is_refused_or_parsed_exactly(position: int, xor: int) -> None:
    mutated = bytearray(DER)
    mutated[position] ^= xor
    try:
        der = parse_certificate(base64.b64encode(bytes(mutated)).decode())
    except SecretError:
        return
    # Some bytes (e.g. inside the signature) may change and still parse: then the pin is
    # exactly those bytes, never the original certificate.
    assert der == bytes(mutated) and der != DER


@SETTINGS
@given(st.sampled_from(["PRIVATE KEY", "RSA PRIVATE KEY", "X509 CRL", "CERTIFICATE REQUEST", "PUBLIC KEY",
                        "TRUSTED CERTIFICATE"]), st.booleans())
def test_wrong_pem_labels_are_refused(label: str, mismatched_end: bool) -> None:
    text = _pem(B64, label=label if not mismatched_end else "CERTIFICATE",
                end_label=label if mismatched_end else None)
    try:
        parse_certificate(text)
    except SecretError as e:
        assert "CERTIFICATE" in e.message or "PEM" in e.message
        return
    raise AssertionError(f"a {label} block was accepted as the device certificate")


@SETTINGS
@given(st.integers(min_value=2, max_value=5), st.text(alphabet=" \n\r\t", max_size=3))
def test_several_pem_blocks_are_refused(count: int, glue: str) -> None:
    with __import__("pytest").raises(SecretError, match="PEM blocks"):
        parse_certificate(glue.join([_pem(B64)] * count))


@SETTINGS
@given(st.binary(max_size=3000))
def test_der_garbage_is_refused(blob: bytes) -> None:
    try:
        der = parse_certificate(base64.b64encode(blob).decode())
    except SecretError:
        return
    assert der == blob


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=50))
def test_odd_unicode_around_a_good_certificate(noise: str) -> None:
    try:
        der = parse_certificate(noise + _pem(B64) + noise)
    except SecretError:
        return
    assert der == DER


# ------------------------------------------------------------------------ IMI documents
huge = st.one_of(st.integers(min_value=-(10**40), max_value=10**40), st.floats(allow_nan=True),
                 st.text(min_size=0, max_size=10).map(lambda s: s * 5000),
                 st.text(alphabet=st.characters(codec="utf-8"), max_size=40))


@SETTINGS
@given(st.fixed_dictionaries({}, optional={"id": huge, "name": huge, "lastIP": huge, "unitID": huge}),
       st.fixed_dictionaries({}, optional={"certificate": st.one_of(st.just(CERT_PEM.decode()), huge),
                                           "password": st.one_of(st.just(PASSWORD), huge)}))
def test_imi_document_with_huge_or_odd_fields(outer: dict, inner: dict) -> None:
    document = {**outer, "shadowSecret": inner}
    try:
        body = json.dumps(document).encode()
    except ValueError:
        return
    try:
        secret = secret_from_response(body, url="https://ums:8443", device_id="27")
    except (SecretError, UMSError) as e:
        assert PASSWORD not in e.message
        return
    assert secret.password.reveal() == PASSWORD
    assert secret.certificate_der == DER
    assert PASSWORD not in repr(secret)


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_one_time_password_of_any_text(value: str) -> None:
    try:
        password = OneTimePassword(value)
    except SecretError as e:
        assert value not in e.message or len(value) < 4
        return
    assert password.reveal() == value
    assert len(value) < 12 or value not in repr(password) + str(password) + f"{password}"


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10), st.integers(min_value=1, max_value=3000))
def test_deeply_nested_secret_json_is_refused_cleanly(value: object, depth: int) -> None:
    text = "[" * depth + json.dumps(value) + "]" * depth
    try:
        load_secret(text)
    except SecretError:
        pass
    try:
        secret_from_document(value)  # type: ignore[arg-type]
    except SecretError:
        pass


@SETTINGS
@given(st.binary(max_size=300) | st.builds(
    lambda code, msg: json.dumps({"errorCode": code, "message": msg}).encode(),
    st.text(max_size=12) | st.just("ITG-0A001"), st.text(max_size=300) | huge))
def test_itg_error_parser(body: bytes) -> None:
    result = itg_error(body)
    if result is not None:
        code, message = result
        assert code.startswith("ITG-") and len(code) == 9 and isinstance(message, str)
    error = error_from_response(500, body, url="https://ums:8443", device_id="27", secrets=(PASSWORD,))
    assert isinstance(error, UMSError) and len(error.message) < 1000


# ------------------------------------------------------------------------ small parsers
@SETTINGS
@given(st.text(max_size=120) | st.binary(min_size=32, max_size=32).map(
    lambda b: st_sep(b.hex().upper())))
def test_fingerprint_parser(text: str) -> None:
    try:
        digest = parse_fingerprint(text)
    except UsageError:
        return
    assert len(digest) == 32


def st_sep(hexed: str) -> str:
    return ":".join(hexed[i:i + 2] for i in range(0, len(hexed), 2))


@SETTINGS
@given(st.text(max_size=80) | st.builds(lambda s, h, p: f"{s}://{h}{p}", st.sampled_from(["https", "http", "ftp", ""]),
                                        st.text(max_size=20), st.text(max_size=20)))
def test_base_url_parser(url: str) -> None:
    try:
        clean = validate_base_url(url)
    except UsageError:
        return
    assert clean.startswith(("https://", "http://")) and not clean.endswith("/")
    assert all(0x20 < ord(c) < 0x7F for c in clean)


@SETTINGS
@given(st.one_of(st.text(max_size=80), st.integers(), st.none(), st.booleans(), st.floats()))
def test_device_id_and_host_parsers(value: object) -> None:
    try:
        device_id = validate_device_id(value)
    except UsageError:
        pass
    else:
        assert 1 <= len(device_id) <= 64 and "/" not in device_id and "?" not in device_id
    try:
        host = parse_host(value)
    except SecretError:
        pass
    else:
        assert host and "/" not in host and " " not in host


# ------------------------------------------------------------------------ --listen endpoints
def _cli_exit(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    d = ensureDeferred(cli.run(MemoryReactorClock(), argv, io.BytesIO(b"{}"), out, err,
                               install_signals=False, start_logging=False))
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "cli.run did not finish synchronously with an invalid secret"
    assert isinstance(results[0], int), results[0]
    return results[0], out.getvalue()


@SETTINGS
@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda kind, rest: f"{kind}:{rest}",
              st.sampled_from(["tcp", "unix", "ssl", "systemd", "tcp6", "onion", "tls"]),
              st.text(alphabet="0123456789:=/\\abcdefinterfacemodbacklogprivateKeyindexdomainINET.", max_size=40)),
))
def test_any_listen_endpoint_string_is_a_usage_error_never_internal(listen: str) -> None:
    """The secret is invalid ({}), so a valid endpoint ends with exit 2 (usage) too; what
    must never happen is exit 1 (internal) for a bad --listen."""
    code, out = _cli_exit(["--json", "--secret-file", "-", "--viewer", "none", "--listen", listen])
    assert code == 2, out


def test_listen_with_a_missing_key_file_is_a_usage_error() -> None:
    code, out = _cli_exit(["--json", "--secret-file", "-", "--viewer", "none",
                           "--listen", "ssl:0:privateKey=/nonexistent/key.pem"])
    assert code == 2, out


def test_listen_systemd_without_inherited_sockets_is_a_usage_error() -> None:
    code, out = _cli_exit(["--json", "--secret-file", "-", "--viewer", "none",
                           "--listen", "systemd:domain=INET:index=0"])
    assert code == 2, out
