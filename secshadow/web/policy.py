"""Who may open the WebSocket, and the headers every answer carries (PROTOCOL.md section 5).

**Origin.** A browser sends ``Origin`` with every WebSocket upgrade and with every
state-changing ``fetch``. A request is allowed when it carries no ``Origin`` (a
non-browser client holding the token), or when ``Origin`` is one of the configured
origins, or when it is the service's own origin *and* the ``Host`` it was sent to is an
IP address or ``localhost``. The last condition closes DNS rebinding: a page at
``http://evil.example:PORT`` whose name was rebound to our address sends
``Origin: http://evil.example:PORT`` *and* ``Host: evil.example:PORT``, which match each
other but name no address. Services reached by a name list it with ``origins``
(``secshadow-web --origin https://shadow.example``). ``Origin: null`` (sandboxed frames,
``file:`` pages) is refused.

**Headers.** ``Content-Security-Policy`` limited to this origin (scripts, styles,
connections; images also from ``data:`` for noVNC's cursor), ``frame-ancestors``
``'none'`` unless the embedding console names its own origins, ``Cache-Control:
no-store``, ``Referrer-Policy: no-referrer`` (the WebSocket URL carries the token),
``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable
from urllib.parse import urlsplit

from secshadow.errors import UsageError

NONE = "'none'"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_FRAME_SOURCE = re.compile(r"^(?:'self'|'none'|https?://[A-Za-z0-9.\-\[\]:*]+)$")


def normalize_origin(text: str) -> str:
    """``scheme://host[:port]`` in lower case, the default port left out.

    Raises :class:`UsageError` for anything that is not an http(s) origin (a path, a
    query, user info, another scheme).
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise UsageError(f"{text!r} is not an origin like https://host:port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise UsageError(f"{text!r} is not an origin like https://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"{text!r} is not an origin: no path, query or fragment")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def _host_is_address(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OriginPolicy:
    """The ``Origin`` rule above. ``origins``: extra allowed origins (e.g. a console that
    runs its own noVNC, or the service's public name), checked by
    :func:`normalize_origin` (raises :class:`UsageError`)."""

    def __init__(self, origins: Iterable[str] = ()) -> None:
        self.origins = frozenset(normalize_origin(o) for o in origins)

    def allows(self, origin: bytes | str | None, host: bytes | str | None, secure: bool) -> bool:
        """Whether a request with these ``Origin`` / ``Host`` headers may proceed."""
        if origin is None:
            return True
        if isinstance(origin, bytes):
            origin = origin.decode("latin-1")
        if isinstance(host, bytes):
            host = host.decode("latin-1")
        try:
            given = normalize_origin(origin)
        except UsageError:
            return False
        if given in self.origins:
            return True
        if not host or not _host_is_address(host):
            return False
        try:
            own = normalize_origin(f"{'https' if secure else 'http'}://{host}")
        except UsageError:
            return False
        return given == own

    def __repr__(self) -> str:
        return f"OriginPolicy({sorted(self.origins)!r})"


def check_frame_ancestors(value: str | None) -> str | None:
    """Validate a ``frame-ancestors`` source list (``'self'``, ``'none'`` or origins,
    space-separated); ``None`` keeps the default ``'none'``. Raises :class:`UsageError`."""
    if value is None:
        return None
    sources = value.split()
    if not sources or not all(_FRAME_SOURCE.match(s) for s in sources):
        raise UsageError(f"frame-ancestors {value!r}: give 'self', 'none' or origins like https://console:8443")
    return " ".join(sources)


def content_security_policy(frame_ancestors: str | None) -> str:
    """The ``Content-Security-Policy`` value; ``frame_ancestors`` from
    :func:`check_frame_ancestors` (``None``: ``'none'``)."""
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        f"frame-ancestors {frame_ancestors or NONE}",
    ])


def security_headers(frame_ancestors: str | None) -> dict[bytes, bytes]:
    """Every header above, ready for ``request.setHeader``."""
    headers = {
        b"Content-Security-Policy": content_security_policy(frame_ancestors).encode("ascii"),
        b"Cache-Control": b"no-store",
        b"Referrer-Policy": b"no-referrer",
        b"X-Content-Type-Options": b"nosniff",
        b"Cross-Origin-Opener-Policy": b"same-origin",
    }
    if frame_ancestors is None:
        headers[b"X-Frame-Options"] = b"DENY"
    return headers
