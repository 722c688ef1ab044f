"""The wire of ``secshadow-relay/1`` (PROTOCOL.md section 6): URLs, limits, close codes.

``wss://GATEWAY/v1/sessions/{sid}/{role}``: ``sid`` is 1 to 64 characters of
``[A-Za-z0-9_-]``, ``role`` is ``console`` or ``device``. The token is a JWT in
``Authorization: Bearer`` on the upgrade request (:mod:`secshadow.gateway.tokens`).
After both legs are there the gateway sends the text message ``{"type": "paired"}`` to
each; binary messages are then an opaque byte stream, at most :data:`MAX_MESSAGE` bytes
each.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from secshadow.errors import UsageError

PROTOCOL_NAME = "secshadow-relay/1"
ROLES = ("console", "device")
SID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PATH_RE = re.compile(r"^/v1/sessions/([A-Za-z0-9_-]{1,64})/(console|device)$")

#: Largest binary message (and frame) either way, bytes; a larger one closes with 1009.
MAX_MESSAGE = 64 * 1024
#: Seconds between the gateway's WebSocket pings to each leg.
PING_INTERVAL = 20.0
#: Seconds a leg may stay silent (no byte at all, pongs included) before it is dropped.
IDLE_TIMEOUT = 60.0
#: Seconds the first leg of a session waits for the second (gateway default).
PAIRING_TIMEOUT = 60.0
#: The text message announcing the pairing, as the gateway sends it.
PAIRED_MESSAGE = b'{"type": "paired"}'

# Close codes (RFC 6455 section 7.4; 4000-4999 are the application's).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_ABNORMAL = 1006  # never sent: what a dropped connection is reported as
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_PAIRING_TIMEOUT = 4408
CLOSE_SESSION_EXPIRED = 4410
CLOSE_SESSION_BYTES = 4413


@dataclass(frozen=True)
class GatewayURL:
    """A parsed leg URL. ``secure``: ``wss`` (``ws`` only where explicitly allowed)."""

    secure: bool
    host: str
    port: int
    sid: str
    role: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}/v1/sessions/{self.sid}/{self.role}"

    @property
    def path(self) -> str:
        return f"/v1/sessions/{self.sid}/{self.role}"

    def __str__(self) -> str:
        return self.url


def parse_gateway_url(url: str, *, what: str = "--gateway", allow_plaintext: bool = False) -> GatewayURL:
    """Parse ``wss://HOST[:PORT]/v1/sessions/{sid}/{role}`` (port 443 by default).

    ``allow_plaintext``: also accept ``ws://`` (port 80 by default); only for a leg that
    runs behind a TLS-terminating front on the same host, never a default.
    Raises :class:`UsageError` naming ``what`` for anything else.
    """
    if not isinstance(url, str) or not url or len(url) > 2048 or any(ch.isspace() for ch in url):
        raise UsageError(f"{what} must be a wss:// URL like wss://gw.example/v1/sessions/S1/console")
    try:
        parts = urlsplit(url)
        port_value = parts.port
    except ValueError as e:
        raise UsageError(f"{what}: malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme == "ws" and not allow_plaintext:
        raise UsageError(f"{what} must use wss:// (TLS to the gateway); ws:// is refused")
    if scheme not in ("wss", "ws"):
        raise UsageError(f"{what} must be a wss:// URL, not {scheme or 'a relative'}://...")
    if parts.username or parts.password:
        raise UsageError(f"{what} must not carry credentials; the token goes in a file")
    if parts.query or parts.fragment:
        raise UsageError(f"{what} must not have a query or fragment")
    host = parts.hostname or ""
    if not host:
        raise UsageError(f"{what} has no host")
    match = PATH_RE.match(parts.path)
    if match is None:
        raise UsageError(
            f"{what} path must be /v1/sessions/{{sid}}/console or /v1/sessions/{{sid}}/device "
            "(sid: 1 to 64 letters, digits, _ or -)"
        )
    port = port_value if port_value is not None else (443 if scheme == "wss" else 80)
    if not 1 <= port <= 65535:
        raise UsageError(f"{what}: port {port} is out of range")
    return GatewayURL(secure=scheme == "wss", host=host, port=port, sid=match.group(1), role=match.group(2))


def session_url(base: str, sid: str, role: str) -> str:
    """``base`` (``wss://host[:port]``, a trailing slash allowed) plus the leg path.

    Raises :class:`UsageError` for a bad ``sid`` or ``role``.
    """
    if not SID_RE.match(sid):
        raise UsageError("a gateway session id is 1 to 64 letters, digits, _ or -")
    if role not in ROLES:
        raise UsageError(f"a gateway role is 'console' or 'device', not {role!r}")
    return f"{base.rstrip('/')}/v1/sessions/{sid}/{role}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IP literal or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Refusal(Exception):
    """A leg refused at the upgrade: ``status`` is the HTTP status (401, 403, 409, 503,
    404), ``reason`` a short phrase for the status line and the logs (never a token)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"
