"""Single-use browser tokens (PROTOCOL.md section 5).

A token is 128 random bits from :func:`secrets.token_bytes`, written in base64url without
padding (22 characters). It is bound to one value (the prepared session's viewer
factory), valid :data:`TOKEN_LIFETIME` seconds after it was minted unless it was used,
and works once: :meth:`TokenStore.redeem` removes it. The store keeps only the SHA-256
of each token, so looking a token up never compares the secret itself byte by byte, and
a memory dump of the store holds no usable token.

Tokens are secrets: nothing here logs them, and :class:`TokenStore`'s ``repr`` shows only
how many are pending.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Callable, Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Random bytes in a token (128 bits).
TOKEN_BYTES = 16
#: Seconds a token stays valid when it is not used.
TOKEN_LIFETIME = 60.0

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{22}$")

T = TypeVar("T")


def new_token() -> str:
    """A fresh token: 16 random bytes as 22 base64url characters (no padding)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode("ascii")


def looks_like_token(text: object) -> bool:
    """True when ``text`` has a token's shape (22 base64url characters)."""
    return isinstance(text, str) and _TOKEN.match(text) is not None


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


class TokenStore(Generic[T]):
    """Pending tokens, each bound to a value of type ``T``.

    ``clock``: an ``IReactorTime`` (the reactor, or ``task.Clock`` in tests).
    ``lifetime``: seconds a token stays valid unless used.
    """

    def __init__(self, clock: IReactorTime, lifetime: float = TOKEN_LIFETIME) -> None:
        if lifetime <= 0:
            raise ValueError("lifetime must be positive (seconds)")
        self._clock = clock
        self.lifetime = lifetime
        self._pending: dict[bytes, tuple[T, IDelayedCall, Callable[[], None] | None]] = {}

    def mint(self, value: T, on_expire: Callable[[], None] | None = None) -> str:
        """A new token bound to ``value``; ``on_expire`` is called if it expires unused."""
        token = new_token()
        key = _key(token)
        timer = self._clock.callLater(self.lifetime, self._expire, key)
        self._pending[key] = (value, timer, on_expire)
        return token

    def redeem(self, token: object) -> T | None:
        """The value bound to ``token``, once; ``None`` for an unknown, used, expired or
        malformed token."""
        if not looks_like_token(token):
            return None
        assert isinstance(token, str)
        entry = self._pending.pop(_key(token), None)
        if entry is None:
            return None
        value, timer, _ = entry
        if timer.active():
            timer.cancel()
        return value

    def revoke(self, token: str) -> bool:
        """Forget ``token`` unused (its session ended first); True if it was pending."""
        return self.redeem(token) is not None

    def clear(self) -> None:
        """Forget every pending token and cancel their timers."""
        pending, self._pending = self._pending, {}
        for _, timer, _ in pending.values():
            if timer.active():
                timer.cancel()

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"<TokenStore: {len(self._pending)} pending, lifetime {self.lifetime:g} s>"

    def _expire(self, key: bytes) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None and entry[2] is not None:
            entry[2]()
