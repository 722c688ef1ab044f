"""Gateway tokens: JWTs (RFC 7519) signed with EdDSA / Ed25519 (RFC 8037), via PyJWT.

The management server holds the private key and mints one token per leg
(:func:`mint_token`); the gateway holds public keys only (:class:`TokenVerifier`), so a
compromised gateway cannot mint sessions. Claims (PROTOCOL.md section 6):

- ``sid``: the session id, equal to the URL path's; ``role``: ``console`` or ``device``,
  equal to the path's;
- ``exp``: expiry, seconds since the epoch; ``jti``: unique id, usable once
  (:class:`ReplayCache`); ``iat`` (issued at) is added by :func:`mint_token`.

Header ``{"alg": "EdDSA", "typ": "JWT"}``; no other algorithm is accepted, whatever
the token's header says. Refusals are :class:`~secshadow.gateway.wire.Refusal` with the
HTTP status the gateway answers: 401 (no, malformed, badly signed, expired token), 403
(``sid``/``role`` differ from the path), 409 (``jti`` used before), 503 (replay cache
full). No message ever quotes the token.
"""

from __future__ import annotations

import heapq
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from twisted.logger import Logger

from secshadow.errors import UsageError
from secshadow.gateway.wire import ROLES, SID_RE, Refusal

_log = Logger(namespace="secshadow.gateway")

ALGORITHM = "EdDSA"
#: Longest token accepted, characters (a minted one is about 300).
MAX_TOKEN_LENGTH = 4096
#: Seconds of clock skew tolerated on ``exp`` and ``nbf``.
LEEWAY = 5.0
#: Default lifetime of a minted token, seconds.
DEFAULT_LIFETIME = 300.0
#: Tokens that claim to live longer than this (seconds from now) are refused: it bounds
#: how long a ``jti`` must be remembered.
MAX_LIFETIME = 3600.0
#: Most ``jti`` values remembered at once; beyond that new legs get 503 until some expire.
MAX_REPLAY_ENTRIES = 200_000

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_JTI = re.compile(r"^[\x21-\x7e]{1,128}$")


class Clock(Protocol):
    """``IReactorTime.seconds``: a reactor or ``twisted.internet.task.Clock``."""

    def seconds(self) -> float: ...


class _WallClock:
    def seconds(self) -> float:
        return time.time()


# -- keys -------------------------------------------------------------------------


def generate_key_pair(directory: str | os.PathLike[str], name: str = "gateway-token") -> tuple[Path, Path]:
    """Write a fresh Ed25519 key pair: ``DIR/NAME.key.pem`` (PKCS#8, mode 0600, for the
    management server) and ``DIR/NAME.pub.pem`` (SubjectPublicKeyInfo, for the gateway).

    Returns ``(private_path, public_path)``; raises :class:`UsageError` when DIR cannot be
    written or the private key file exists already.
    """
    folder = Path(directory)
    key = Ed25519PrivateKey.generate()
    private = folder / f"{name}.key.pem"
    public = folder / f"{name}.pub.pem"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    except FileExistsError:
        raise UsageError(f"{private} exists already; not overwriting a signing key") from None
    except OSError as e:
        raise UsageError(f"cannot write the token key pair to {folder}: {e.strerror or e}") from None
    return private, public


def _read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64 * 1024)
    except OSError as e:
        raise UsageError(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 signing key in the PEM file at ``path`` (unencrypted PKCS#8).

    Raises :class:`UsageError` when it cannot be read or is not an Ed25519 private key.
    """
    data = _read_pem(path, "the token signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{os.fspath(path)} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{os.fspath(path)} is not an Ed25519 key (gateway tokens are EdDSA / Ed25519)")
    return key


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys in the PEM files ``paths`` (``--token-key``, one key each).

    A private key is refused on purpose: the gateway must not be able to mint tokens.
    Raises :class:`UsageError` naming the file.
    """
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        data = _read_pem(path, "--token-key")
        if b"PRIVATE KEY" in data:
            raise UsageError(
                f"--token-key {os.fspath(path)} holds a private key; give the gateway the public key "
                "only (a gateway that can sign could mint sessions)"
            )
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise UsageError(f"--token-key {os.fspath(path)} is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UsageError(f"--token-key {os.fspath(path)} is not an Ed25519 public key")
        keys.append(key)
    if not keys:
        raise UsageError("the gateway needs at least one --token-key (an Ed25519 public key, PEM)")
    return keys


# -- tokens -----------------------------------------------------------------------


def mint_token(
    private_key: Ed25519PrivateKey,
    sid: str,
    role: str,
    lifetime: float = DEFAULT_LIFETIME,
    *,
    now: float | None = None,
    jti: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed token for one leg: claims ``sid``, ``role``, ``exp`` (``now + lifetime``,
    whole seconds), ``iat`` and ``jti`` (128 random bits unless given). ``extra`` claims
    are added as they are (tests use it to make malformed tokens).

    Raises :class:`UsageError` for a malformed ``sid``, an unknown ``role`` or a
    lifetime that is not positive.
    """
    if not SID_RE.match(sid):
        raise UsageError("a gateway session id is 1 to 64 letters, digits, _ or -")
    if role not in ROLES:
        raise UsageError(f"a gateway role is 'console' or 'device', not {role!r}")
    if not lifetime > 0:
        raise UsageError("a token lifetime must be a positive number of seconds")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sid": sid,
        "role": role,
        "iat": int(issued),
        "exp": int(issued + lifetime),
        "jti": jti or secrets.token_urlsafe(16),
    }
    claims.update(extra or {})
    return jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"typ": "JWT"})


def read_token_file(path: str | os.PathLike[str], what: str = "--token-file") -> str:
    """The token (a JWT) in the file at ``path``, surrounding whitespace removed.

    Raises :class:`UsageError` when the file cannot be read, is empty or holds something
    that is not shaped like a JWT; the message never quotes the file's content.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_LENGTH + 2)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise UsageError(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from None
    if stat.S_ISREG(mode) and mode & (stat.S_IRGRP | stat.S_IROTH):
        _log.warn("{what} {path} is readable by other users; a token is a secret (chmod 600)",
                  what=what, path=os.fspath(path))
    text = data.decode("ascii", "replace").strip()
    if not text:
        raise UsageError(f"{what} {os.fspath(path)} is empty")
    if len(text) > MAX_TOKEN_LENGTH or not _JWT_SHAPE.match(text):
        raise UsageError(f"{what} {os.fspath(path)} does not hold a JWT (three base64url parts joined by dots)")
    return text


def is_token_shaped(text: object) -> bool:
    """Whether ``text`` looks like a compact JWT (no signature check)."""
    return isinstance(text, str) and len(text) <= MAX_TOKEN_LENGTH and bool(_JWT_SHAPE.match(text))


@dataclass(frozen=True)
class Claims:
    """A verified token's claims. ``exp``: seconds since the epoch."""

    sid: str
    role: str
    exp: float
    jti: str


class TokenVerifier:
    """Verifies leg tokens against the configured public keys (key rotation: any of them).

    ``clock``: seconds since the epoch (``IReactorTime.seconds``; the reactor's is wall
    time). ``leeway``: tolerated clock skew, seconds. ``max_lifetime``: a token whose
    ``exp`` lies further ahead is refused (it bounds the replay cache's memory).
    """

    def __init__(
        self,
        public_keys: Sequence[Ed25519PublicKey],
        clock: Clock | None = None,
        *,
        leeway: float = LEEWAY,
        max_lifetime: float = MAX_LIFETIME,
    ) -> None:
        if not public_keys:
            raise UsageError("a token verifier needs at least one public key")
        self._keys = list(public_keys)
        self._clock = clock or _WallClock()
        self._leeway = leeway
        self._max_lifetime = max_lifetime

    def verify(self, token: str | None, sid: str, role: str) -> Claims:
        """Check ``token`` for the leg ``(sid, role)`` named by the URL path.

        Returns the :class:`Claims`; raises :class:`Refusal` 401 (no token, malformed,
        no key verifies the signature, claims missing or of the wrong type, expired, not
        yet valid, lifetime over ``max_lifetime``) or 403 (``sid``/``role`` differ).
        The replay check is the caller's (:class:`ReplayCache`).
        """
        if not token:
            raise Refusal(401, "no token")
        if not is_token_shaped(token):
            raise Refusal(401, "malformed token")
        claims: dict[str, Any] | None = None
        for key in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    # Time claims are checked below against the injected clock.
                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                             "verify_aud": False, "verify_iss": False},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAlgorithmError:
                raise Refusal(401, "token not signed with EdDSA") from None
            except jwt.DecodeError:
                raise Refusal(401, "malformed token") from None
            except jwt.InvalidTokenError:  # PyJWT's own claim checks (e.g. a non-string jti)
                raise Refusal(401, "token has an invalid claim") from None
        if claims is None:
            raise Refusal(401, "bad token signature")
        for name, kind in (("sid", str), ("role", str), ("jti", str)):
            if not isinstance(claims.get(name), kind):
                raise Refusal(401, f"token lacks a valid {name!r} claim")
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise Refusal(401, "token lacks a valid 'exp' claim")
        if not _JTI.match(claims["jti"]):
            raise Refusal(401, "token lacks a valid 'jti' claim")
        now = self._clock.seconds()
        if now > exp + self._leeway:
            raise Refusal(401, "token expired")
        if exp - now > self._max_lifetime:
            raise Refusal(401, "token lifetime too long")
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and now + self._leeway < nbf:
            raise Refusal(401, "token not yet valid")
        if claims["sid"] != sid:
            raise Refusal(403, "token is for another session")
        if claims["role"] != role:
            raise Refusal(403, "token is for another role")
        return Claims(sid=claims["sid"], role=claims["role"], exp=float(exp), jti=claims["jti"])


class ReplayCache:
    """The ``jti`` values already used, each remembered until its token's ``exp`` (plus
    the leeway), at most ``max_entries`` at once. ``clock``: as for :class:`TokenVerifier`.
    """

    def __init__(self, clock: Clock | None = None, max_entries: int = MAX_REPLAY_ENTRIES,
                 leeway: float = LEEWAY) -> None:
        self._clock = clock or _WallClock()
        self._max = max_entries
        self._leeway = leeway
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        self._purge()
        return len(self._expiry)

    def _purge(self) -> None:
        now = self._clock.seconds()
        heap = self._heap
        while heap and heap[0][0] < now:
            _, jti = heapq.heappop(heap)
            self._expiry.pop(jti, None)

    def check(self, jti: str) -> None:
        """Raise :class:`Refusal` 409 if ``jti`` was used before (and has not expired)."""
        self._purge()
        if jti in self._expiry:
            raise Refusal(409, "token already used")

    def consume(self, claims: Claims) -> None:
        """Remember ``claims.jti`` until ``claims.exp``; raises :class:`Refusal` 409 if it
        was used before, 503 if the cache is full."""
        self.check(claims.jti)
        if len(self._expiry) >= self._max:
            raise Refusal(503, "too many live tokens; retry later")
        until = claims.exp + self._leeway
        self._expiry[claims.jti] = until
        heapq.heappush(self._heap, (until, claims.jti))
