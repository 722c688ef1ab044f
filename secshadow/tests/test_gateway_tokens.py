"""Gateway tokens (PyJWT, EdDSA / Ed25519), the replay cache and the relay's URLs."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from secshadow.errors import UsageError
from secshadow.gateway import tokens, wire
from secshadow.gateway.tokens import Claims, ReplayCache, TokenVerifier, mint_token
from secshadow.gateway.wire import Refusal, parse_gateway_url, session_url

NOW = 1_700_000_000.0


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def clock_at(t: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


def verifier(key: Ed25519PrivateKey, clock: Clock | None = None, **kw: float) -> TokenVerifier:
    return TokenVerifier([key.public_key()], clock or clock_at(), **kw)


def refusal(call) -> Refusal:  # type: ignore[no-untyped-def]
    with pytest.raises(Refusal) as caught:
        call()
    return caught.value


def test_minted_token_is_an_eddsa_jwt_with_the_protocol_claims(key: Ed25519PrivateKey) -> None:
    token = mint_token(key, "S1", "console", lifetime=120, now=NOW)
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "typ": "JWT"}
    claims = jwt.decode(token, key.public_key(), algorithms=["EdDSA"], options={"verify_exp": False})
    assert claims["sid"] == "S1" and claims["role"] == "console"
    assert claims["exp"] == int(NOW) + 120 and claims["iat"] == int(NOW)
    assert len(claims["jti"]) >= 20
    assert mint_token(key, "S1", "console", now=NOW) != mint_token(key, "S1", "console", now=NOW)  # fresh jti


def test_verify_returns_the_claims(key: Ed25519PrivateKey) -> None:
    token = mint_token(key, "S1", "device", lifetime=60, now=NOW, jti="j-1")
    assert verifier(key).verify(token, "S1", "device") == Claims("S1", "device", NOW + 60, "j-1")


def test_any_configured_key_verifies_for_rotation(key: Ed25519PrivateKey) -> None:
    old = Ed25519PrivateKey.generate()
    v = TokenVerifier([old.public_key(), key.public_key()], clock_at())
    assert v.verify(mint_token(key, "S1", "console", now=NOW), "S1", "console").sid == "S1"
    assert v.verify(mint_token(old, "S1", "console", now=NOW), "S1", "console").sid == "S1"


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (lambda k: None, 401, "no token"),
        (lambda k: "not a jwt", 401, "malformed token"),
        (lambda k: "a.b.c", 401, "malformed token"),
        (lambda k: mint_token(Ed25519PrivateKey.generate(), "S1", "console", now=NOW), 401, "bad token signature"),
        (lambda k: mint_token(k, "S1", "console", lifetime=10, now=NOW - 60), 401, "token expired"),
        (lambda k: mint_token(k, "S1", "console", lifetime=7200, now=NOW), 401, "token lifetime too long"),
        (lambda k: mint_token(k, "S1", "console", now=NOW, extra={"nbf": NOW + 600}), 401, "token not yet valid"),
        (lambda k: mint_token(k, "S1", "console", now=NOW, extra={"jti": 5}), 401, "token has an invalid claim"),
        (lambda k: mint_token(k, "S1", "console", now=NOW, extra={"exp": "soon"}), 401,
         "token lacks a valid 'exp' claim"),
        (lambda k: mint_token(k, "S2", "console", now=NOW), 403, "token is for another session"),
        (lambda k: mint_token(k, "S1", "device", now=NOW), 403, "token is for another role"),
    ],
    ids=["none", "garbage", "not-base64-json", "bad-signature", "expired", "too-long-lived", "not-yet-valid",
         "jti-not-string", "exp-not-number", "sid-mismatch", "role-mismatch"],
)
def test_refusals_have_the_protocol_status(key: Ed25519PrivateKey, make, status: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    token = make(key)
    r = refusal(lambda: verifier(key).verify(token, "S1", "console"))
    assert (r.status, r.reason) == (status, reason)
    if token:
        assert token not in str(r)


def test_expiry_follows_the_injected_clock_with_leeway(key: Ed25519PrivateKey) -> None:
    clock = clock_at()
    token = mint_token(key, "S1", "console", lifetime=30, now=NOW)
    v = verifier(key, clock)
    clock.advance(30 + tokens.LEEWAY)  # exactly at the end of the leeway: still valid
    assert v.verify(token, "S1", "console").sid == "S1"
    clock.advance(1)
    assert refusal(lambda: v.verify(token, "S1", "console")).reason == "token expired"


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_other_algorithms_are_refused_whatever_the_header_says(key: Ed25519PrivateKey) -> None:
    claims = {"sid": "S1", "role": "console", "exp": int(NOW) + 60, "jti": "x"}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    assert refusal(lambda: verifier(key).verify(unsigned, "S1", "console")).status == 401
    # Algorithm confusion: an HMAC token keyed with the (public) verification key.
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}"
    import hashlib
    import hmac as hmac_

    signature = base64.urlsafe_b64encode(hmac_.new(public_pem, hs.encode(), hashlib.sha256).digest()).rstrip(b"=")
    forged = f"{hs}.{signature.decode()}"
    r = refusal(lambda: verifier(key).verify(forged, "S1", "console"))
    assert (r.status, r.reason) == (401, "token not signed with EdDSA")


def test_replay_cache_refuses_a_used_jti_until_it_expires() -> None:
    clock = clock_at()
    cache = ReplayCache(clock, leeway=0)
    claims = Claims("S1", "console", NOW + 60, "jti-1")
    cache.check("jti-1")
    cache.consume(claims)
    assert (refusal(lambda: cache.check("jti-1")).status, len(cache)) == (409, 1)
    assert refusal(lambda: cache.consume(claims)).status == 409
    clock.advance(61)
    cache.check("jti-1")  # forgotten once the token itself can no longer be used
    assert len(cache) == 0


def test_replay_cache_is_bounded_and_says_so_with_503() -> None:
    clock = clock_at()
    cache = ReplayCache(clock, max_entries=3, leeway=0)
    for i in range(3):
        cache.consume(Claims("S1", "console", NOW + 10 + i, f"j{i}"))
    r = refusal(lambda: cache.consume(Claims("S1", "console", NOW + 10, "j9")))
    assert (r.status, len(cache)) == (503, 3)
    clock.advance(10.5)  # j0 expired: room for one
    cache.consume(Claims("S1", "console", NOW + 100, "j9"))
    assert len(cache) == 3


def test_key_pair_files_and_loading(tmp_path: Path) -> None:
    private, public = tokens.generate_key_pair(tmp_path)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    key = tokens.load_private_key(private)
    [pub] = tokens.load_public_keys([public])
    token = mint_token(key, "S1", "console")
    assert TokenVerifier([pub]).verify(token, "S1", "console").role == "console"
    with pytest.raises(UsageError, match="exists already"):
        tokens.generate_key_pair(tmp_path)


def test_the_gateway_refuses_a_private_key_and_other_key_types(tmp_path: Path) -> None:
    private, _ = tokens.generate_key_pair(tmp_path)
    with pytest.raises(UsageError, match="holds a private key"):
        tokens.load_public_keys([private])
    ec_pub = tmp_path / "ec.pem"
    ec_pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(UsageError, match="not an Ed25519 public key"):
        tokens.load_public_keys([ec_pub])
    with pytest.raises(UsageError, match="at least one --token-key"):
        tokens.load_public_keys([])
    with pytest.raises(UsageError, match="cannot read"):
        tokens.load_public_keys([tmp_path / "missing.pem"])


def test_token_files(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    good = tmp_path / "token"
    token = mint_token(key, "S1", "device")
    good.write_text(token + "\n")
    assert tokens.read_token_file(good) == token
    bad = tmp_path / "bad"
    bad.write_text("password=hunter2-secret")
    with pytest.raises(UsageError) as caught:
        tokens.read_token_file(bad)
    assert "hunter2" not in caught.value.message and "does not hold a JWT" in caught.value.message
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        tokens.read_token_file(empty)


def test_mint_checks_its_arguments(key: Ed25519PrivateKey) -> None:
    with pytest.raises(UsageError):
        mint_token(key, "bad sid!", "console")
    with pytest.raises(UsageError):
        mint_token(key, "S1", "viewer")
    with pytest.raises(UsageError):
        mint_token(key, "S1", "console", lifetime=0)


# -- URLs --------------------------------------------------------------------------


def test_gateway_urls() -> None:
    target = parse_gateway_url("wss://gw.example/v1/sessions/S-1_a/console")
    assert (target.host, target.port, target.sid, target.role, target.secure) == ("gw.example", 443, "S-1_a", "console", True)
    assert target.url == "wss://gw.example:443/v1/sessions/S-1_a/console"
    assert parse_gateway_url("wss://[::1]:8443/v1/sessions/x/device").url == "wss://[::1]:8443/v1/sessions/x/device"
    assert session_url("wss://gw:1/", "S1", "device") == "wss://gw:1/v1/sessions/S1/device"


@pytest.mark.parametrize("url", [
    "ws://gw/v1/sessions/S1/console",  # plaintext refused unless allowed
    "https://gw/v1/sessions/S1/console",
    "wss://gw/v1/sessions/S1/viewer",
    "wss://gw/v1/sessions//console",
    "wss://gw/v1/sessions/" + "a" * 65 + "/console",
    "wss://gw/v1/sessions/S 1/console",
    "wss://user:pw@gw/v1/sessions/S1/console",
    "wss://gw/v1/sessions/S1/console?token=x",
    "wss://gw:99999/v1/sessions/S1/console",
    "",
])
def test_bad_gateway_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        parse_gateway_url(url)


def test_plaintext_urls_only_when_allowed() -> None:
    assert parse_gateway_url("ws://127.0.0.1:80/v1/sessions/S1/console", allow_plaintext=True).secure is False


@given(sid=st.from_regex(wire.SID_RE, fullmatch=True), role=st.sampled_from(wire.ROLES),
       port=st.integers(1, 65535))
def test_url_round_trip(sid: str, role: str, port: int) -> None:
    target = parse_gateway_url(session_url(f"wss://gw.example:{port}", sid, role))
    assert (target.sid, target.role, target.port) == (sid, role, port)
    assert parse_gateway_url(target.url) == target


@given(st.text(max_size=200))
def test_any_text_is_a_url_or_a_usage_error(text: str) -> None:
    try:
        parse_gateway_url(text)
    except UsageError:
        pass
