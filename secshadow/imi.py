"""The IMI client: fetch a device's shadow secret from the UMS (console side).

Flow (``docs/protocol.md`` section 1; IMI manual, "Secure VNC with IMIv2" and the
v3 login pages):

1. ``POST {base}/umsapi/v3/login`` with HTTP Basic auth -> ``200``, a ``JSESSIONID``
   cookie (``Set-Cookie``; also echoed in the body as ``{"message": "JSESSIONID=..."}``).
2. ``GET {base}/umsapi/v3/thinclients/{id}?facets=shadow``; if that path is unknown
   (``404`` without an ITG error body) ``GET {base}/umsapi/v2/thinclients/{id}?facets=shadow``
   (the documented path).
3. ``POST {base}/umsapi/v3/logout``, best effort.

Each request has one deadline, ``timeout`` seconds for the whole exchange (connect,
TLS, request, headers and body): when it passes, the connection is aborted and the
request fails with "the UMS did not answer within N s". Memory is bounded too: at most
:data:`MAX_HEADER_BYTES` are received before a response's headers are complete, and
:data:`MAX_RESPONSE_BODY` of body. The client's connections run through
:class:`_GuardedProtocol`, which sits between the transport (TCP or TLS) and Twisted's
HTTP/1.1 client protocol: it counts the bytes of each response head and can abort the
connection at any stage.

Errors are decided by the ITG ``errorCode`` of the JSON body
``{"message", "errorCode", "stackTrace"}``, not by the status alone. Everything the
server or the network does wrong is a :class:`UMSError` (exit 3); a secret whose
*content* is malformed (e.g. an empty certificate: reboot the device) stays the
:class:`SecretError` of :mod:`secshadow.secret` (exit 2). Neither the UMS password
nor the session id ever appears in a message, log line or ``repr``, in any form a
server might echo (Base64, percent-encoded: :func:`scrub`).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from http.cookiejar import CookieJar
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from secshadow.errors import UMSError, UsageError
from secshadow.secret import ShadowSecret, secret_from_document
from secshadow.umstrust import UMSTrust, failure_causes, find_ums_error

#: Largest response body read from the UMS; a thin-client document is a few KiB.
MAX_RESPONSE_BODY = 1024 * 1024
#: Largest number of bytes received before a response's headers are complete (status
#: line, header lines, folded continuation lines, and any 1xx responses before it).
MAX_HEADER_BYTES = 64 * 1024
#: Default per-request deadline in seconds: connect, TLS, request, headers and body together.
DEFAULT_TIMEOUT = 30.0

_DEVICE_ID = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9._~+/=-]{1,512}$")
_ITG_CODE = re.compile(r"^ITG-[0-9A-Z]{5}$")
_log = Logger(namespace="secshadow.imi")


def validate_base_url(url: str) -> str:
    """Check the ``--ums`` URL and return it without a trailing slash.

    Accepts ``https://host[:port][/prefix]``, or ``http://`` (plaintext: the caller
    must warn, see :attr:`IMIClient.is_plaintext`). Raises :class:`UsageError` for
    anything else; the message never repeats user info from the URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise UsageError("the UMS URL is empty (e.g. --ums https://ums.example:8443)")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UsageError("the UMS URL is malformed (e.g. --ums https://ums.example:8443)") from None
    if "@" in parts.netloc:
        raise UsageError("the UMS URL must not contain a user name or password; use --ums-user")
    if parts.scheme not in ("https", "http"):
        raise UsageError(f"the UMS URL must start with https:// (got scheme {parts.scheme!r})")
    if not parts.hostname:
        raise UsageError("the UMS URL has no host (e.g. --ums https://ums.example:8443)")
    if parts.query or parts.fragment:
        raise UsageError("the UMS URL must not have a query or fragment")
    if port == 0:
        raise UsageError("the UMS URL has port 0")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in url):
        raise UsageError("the UMS URL contains spaces, control or non-ASCII characters")
    return url.rstrip("/")


def validate_device_id(device_id: object) -> str:
    """Check an IMI device id (``"27"``): 1 to 64 letters, digits or ``. _ ~ -``.

    Raises :class:`UsageError` otherwise.
    """
    if isinstance(device_id, int) and not isinstance(device_id, bool):
        device_id = str(device_id)
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise UsageError("the device id must be 1 to 64 letters, digits or . _ ~ - (e.g. --device 27)")
    return device_id


def secret_forms(secret: str) -> set[str]:
    """The text forms in which a server might echo ``secret``: itself, its Base64
    (standard and URL-safe, with and without padding, of the UTF-8 bytes) and its
    percent-encodings (``quote`` with and without ``/`` safe, ``quote_plus``).

    Pass ``f"{user}:{password}"`` as a secret too: its Base64 is the HTTP Basic
    ``Authorization`` value.
    """
    raw = secret.encode("utf-8")
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(raw).decode("ascii")
        forms.update((text, text.rstrip("=")))
    return {form for form in forms if form}


def scrub(text: object, secrets: Iterable[str] = (), limit: int = 200) -> str:
    """Server-supplied ``text`` made safe to quote in a message (the one redaction).

    Every :func:`secret_forms` of every secret becomes ``<redacted>`` (compared without
    regard to case, so ``%2f`` and ``%2F`` alike); control characters, line and
    paragraph separators become spaces and runs of white space one space: one printable
    line, cut to ``limit`` characters. Not text (``None``, numbers): ``""``.
    """
    s = text if isinstance(text, str) else ""
    forms = sorted({form for secret in secrets if secret for form in secret_forms(secret)}, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, forms)), re.IGNORECASE) if forms else None
    if pattern is not None:
        s = pattern.sub("<redacted>", s)
    s = " ".join("".join(c if c.isprintable() else " " for c in s).split())
    if pattern is not None:
        s = pattern.sub("<redacted>", s)  # cleaning may have made "a  b" into a secret "a b"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def itg_error(body: bytes) -> tuple[str, str] | None:
    """``(errorCode, message)`` if ``body`` is an ITG error document, else ``None``."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, Mapping):
        return None
    code = document.get("errorCode")
    if not isinstance(code, str) or not _ITG_CODE.match(code):
        return None
    message = document.get("message")
    return code, message if isinstance(message, str) else ""


def error_from_response(
    status: int,
    body: bytes,
    *,
    url: str,
    device_id: str | None = None,
    user: str | None = None,
    secrets: tuple[str, ...] = (),
) -> UMSError:
    """The :class:`UMSError` for a non-success IMI answer (pure; never raises).

    Server text is quoted only through :func:`scrub`: every form of each of ``secrets``
    (e.g. the password, ``"user:password"``, the session id) removed, one line, at
    most 200 characters.
    """
    itg = itg_error(body)
    who = f"user {user!r}" if user else "this user"
    if itg is not None:
        code, raw_message = itg
        message = scrub(raw_message, secrets)
        detail = f"{code}: {message}" if message else code
        if code == "ITG-0A001":
            return UMSError(f"device {device_id} not found on the UMS ({detail}; {url})")
        if code == "ITG-0A018":
            return UMSError(
                f"device {device_id} is in the UMS recycle bin; restore it in the UMS Console first ({detail})"
            )
        if status == 401:
            return UMSError(
                f"the UMS did not accept the session of {who} ({detail}; HTTP 401, {url}); "
                f"it may have expired"
            )
        if code.startswith("ITG-0B"):
            return UMSError(f"the UMS refused access for {who} ({detail}; HTTP {status}, {url})")
        if code == "ITG-0C001":
            return UMSError(f"the UMS requires a licence for shadowing ({detail}; {url})")
        return UMSError(f"the UMS answered HTTP {status} with error {detail} ({url})")
    if status == 401:
        return UMSError(f"the UMS did not accept the session of {who} (HTTP 401, {url})")
    if status == 404:
        return UMSError(
            f"not found: {url} (HTTP 404); is --ums the UMS web address, e.g. https://ums:8443?"
        )
    if 300 <= status < 400:
        return UMSError(f"the UMS answered with a redirect (HTTP {status}) for {url}; give the final URL")
    return UMSError(f"bad response from the UMS: HTTP {status} for {url}")


def secret_from_response(body: bytes, *, url: str, device_id: str) -> ShadowSecret:
    """Parse a ``200`` thin-client document with ``?facets=shadow`` into a :class:`ShadowSecret`.

    Raises :class:`UMSError` ("bad response") when the body is not JSON or has the
    wrong shape (no ``shadowSecret`` object, fields not strings, another device's id),
    and :class:`SecretError` from :func:`secret_from_document` when the content is
    malformed (empty or invalid certificate, unusable password).
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise UMSError(f"bad response from the UMS: not JSON ({url})") from None
    if not isinstance(document, Mapping):
        raise UMSError(f"bad response from the UMS: expected a JSON object ({url})")
    shadow = document.get("shadowSecret")
    if shadow is None:
        raise UMSError(
            f"bad response from the UMS: the device document has no shadowSecret; does this UMS "
            f"support secure shadowing through IMI? ({url})"
        )
    if not isinstance(shadow, Mapping):
        raise UMSError(f"bad response from the UMS: shadowSecret is not an object ({url})")
    for key in ("certificate", "password"):
        if not isinstance(shadow.get(key), str):
            raise UMSError(f"bad response from the UMS: shadowSecret.{key} is missing or not text ({url})")
    returned_id = document.get("id")
    if returned_id is not None and str(returned_id) != device_id:
        raise UMSError(f"bad response from the UMS: asked for device {device_id}, got another device ({url})")
    return secret_from_document(document)


def _ssl_detail(e: SSL.Error) -> str:
    reasons = []
    for entry in e.args[0] if e.args and isinstance(e.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return "; ".join(reasons) or "handshake failed"


def connection_error(exc: BaseException | Failure, url: str, timeout: float | None = None) -> UMSError:
    """The :class:`UMSError` for a request that got no HTTP answer (pure; never raises)."""
    causes = failure_causes(exc)
    trust_error = find_ums_error(exc)
    if trust_error is not None:
        return UMSError(f"{trust_error.message} ({url})")
    for e in causes:
        if isinstance(e, (CancelledError, neterror.TimeoutError, neterror.ConnectingCancelledError)):
            limit = f" within {timeout:g} s" if timeout else ""
            return UMSError(f"the UMS did not answer{limit} ({url})")
    for e in causes:
        if isinstance(e, neterror.DNSLookupError):
            return UMSError(f"cannot resolve the UMS host name ({url})")
        if isinstance(e, neterror.ConnectionRefusedError):
            return UMSError(f"connection to the UMS refused: nothing listens there ({url})")
        if isinstance(e, SSL.Error):
            return UMSError(f"TLS handshake with the UMS failed: {_ssl_detail(e)} ({url})")
    for e in causes:
        if isinstance(e, neterror.ConnectError):
            return UMSError(f"cannot connect to the UMS: {type(e).__name__} ({url})")
        if isinstance(e, (neterror.ConnectionDone, neterror.ConnectionLost)):
            return UMSError(f"the UMS closed the connection without an answer ({url})")
    name = type(causes[0]).__name__ if causes else "unknown error"
    return UMSError(f"request to the UMS failed: {name} ({url})")


class _BodyTooLarge(Exception):
    pass


def _timeout_error(timeout: float, url: str) -> UMSError:
    return UMSError(f"the UMS did not answer within {timeout:g} s ({url})")


def _is_informational(head: bytes) -> bool:
    """Whether the header block starting with ``head`` (its first bytes) is a 1xx
    response, which Twisted's client skips before the final one. Decided as Twisted's
    parser does (status line split on spaces, ``int`` of the code); when in doubt
    (incomplete or odd status line) ``True``, so the count goes on."""
    line, newline, _ = head.partition(b"\n")
    parts = line.rstrip(b"\r").split(b" ", 2)
    if not newline or len(parts) < 2:
        return True
    try:
        code = int(parts[1])
    except ValueError:
        return True
    return 100 <= code < 200


class _GuardedProtocol(ProtocolWrapper):
    """Between the transport (TCP, or TLS on TCP) and Twisted's HTTP/1.1 client protocol.

    - Counts the bytes received from the moment a request is written (or the connection
      opens) until the final response's headers end, the blank line Twisted's parser
      (``twisted.web._newclient.HTTPParser``, lines split at ``\\n``, one ``\\r``
      stripped) ends them with. Past :data:`MAX_HEADER_BYTES` the connection is aborted:
      Twisted keeps every header line and every folded continuation line in memory.
    - :meth:`abort` closes the connection at once and makes ``error`` the reason the HTTP
      protocol sees for the loss, so the pending request or body read fails with it.
    """

    factory: _GuardFactory

    def __init__(self, factory: WrappingFactory[_GuardedProtocol], wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._abort_reason: Failure | None = None
        self._in_head = True  # before the final response's blank line
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head, to find a blank line across reads
        self._block = b""  # the first bytes of the current header block (its status line)

    def abort(self, error: UMSError) -> None:
        if self._abort_reason is None:
            self._abort_reason = Failure(error)
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def _request_starts(self) -> None:
        # No pipelining in Twisted's client: a new request means the last response is over.
        if not self._in_head:
            self._in_head, self._head_bytes, self._tail, self._block = True, 0, b"", b""

    def write(self, data: bytes) -> None:
        self._request_starts()
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self._request_starts()
        super().writeSequence(data)

    def _count_head(self, data: bytes) -> None:
        offset = 0
        while self._in_head and offset < len(data):
            if len(self._block) < 64:
                self._block += data[offset:offset + 64 - len(self._block)]
            buffer = self._tail + data[offset:]
            ends = [i for i in (buffer.find(b"\n\n"), buffer.find(b"\n\r\n")) if i >= 0]
            if not ends:
                self._head_bytes += len(data) - offset
                self._tail = buffer[-2:]
                return
            first = min(ends)
            end = first + (2 if buffer[first:first + 2] == b"\n\n" else 3)
            used = end - len(self._tail)
            self._head_bytes += used
            offset += used
            self._in_head = _is_informational(self._block)
            self._tail, self._block = b"", b""

    def dataReceived(self, data: bytes) -> None:
        if self._abort_reason is not None:
            return
        if self._in_head:
            self._count_head(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self.abort(UMSError(f"bad response from the UMS: more than {MAX_HEADER_BYTES} bytes of "
                                    f"response headers"))
                return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(self._abort_reason or reason)


class _GuardFactory(WrappingFactory[_GuardedProtocol]):
    """Wraps each connection's HTTP protocol in a :class:`_GuardedProtocol`; ``live`` is
    the owning client's set of open connections."""

    protocol = _GuardedProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, live: set[_GuardedProtocol]) -> None:
        super().__init__(wrappedFactory)
        self.live = live

    def registerProtocol(self, p: _GuardedProtocol) -> None:
        self.live.add(p)

    def unregisterProtocol(self, p: _GuardedProtocol) -> None:
        self.live.discard(p)


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """``inner`` with every connection guarded; fires with the HTTP protocol itself (as
    the connection pool expects), not with the guard around it."""

    def __init__(self, inner: IStreamClientEndpoint, live: set[_GuardedProtocol]) -> None:
        self._inner = inner
        self._live = live

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def unwrap(guard: Any) -> IProtocol:
            inner: IProtocol = guard.wrappedProtocol
            return inner

        return self._inner.connect(_GuardFactory(protocolFactory, self._live)).addCallback(unwrap)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Agent's standard endpoints (TCP for ``http``, TLS with ``trust`` for ``https``),
    guarded. ``connect_timeout``: seconds for the TCP connect."""

    def __init__(self, reactor: Any, trust: UMSTrust, connect_timeout: float, live: set[_GuardedProtocol]) -> None:
        self._reactor = reactor
        self._trust = trust
        self._connect_timeout = connect_timeout
        self._live = live

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        # validate_base_url made the host ASCII.
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._trust.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        return _GuardedEndpoint(endpoint, self._live)


class IMIClient:
    """A login with one UMS over IMI (its ``JSESSIONID`` cookie is the login's id).

    ``reactor``: provides ``IReactorTCP``/``IReactorTime`` (injected, used for the
    connections and the timeouts). ``base_url``: ``https://host:8443`` (see
    :func:`validate_base_url`). ``trust``: how the UMS certificate is verified.
    ``timeout``: seconds per request, one deadline for its whole exchange (connect,
    TLS, headers, body); then :class:`UMSError` "the UMS did not answer within N s".
    ``http_client``: anything with treq's
    ``HTTPClient.request`` signature, e.g. ``treq.testing.StubTreq`` in tests;
    by default a treq ``HTTPClient`` on an ``Agent`` using ``trust`` and a cookie jar.

    Use :meth:`fetch_shadow_secret` for the whole flow, or :meth:`login`,
    :meth:`shadow_secret`, :meth:`logout` and :meth:`close` step by step.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        trust: UMSTrust,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        http_client: Any = None,
    ) -> None:
        self.base_url = validate_base_url(base_url)
        self.trust = trust
        self.timeout = timeout
        self._reactor = reactor
        self._pool: HTTPConnectionPool | None = None
        self._live: set[_GuardedProtocol] = set()
        self.cookies: CookieJar | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 1
            self._pool.retryAutomatically = False
            endpoints = _EndpointFactory(reactor, trust, timeout, self._live)
            agent: Any = Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
            self.cookies = CookieJar()
            http_client = HTTPClient(agent, cookiejar=self.cookies)  # type: ignore[arg-type]
        self._http = http_client
        self._login_id: str | None = None
        self._user: str | None = None
        self._secrets: tuple[str, ...] = ()

    @property
    def is_plaintext(self) -> bool:
        """``True`` for an ``http://`` URL: the secret would cross the network unencrypted."""
        return self.base_url.startswith("http://")

    @property
    def logged_in(self) -> bool:
        return self._login_id is not None

    def __repr__(self) -> str:
        return f"IMIClient({self.base_url!r}, {self.trust!r}, user={self._user!r})"

    async def _request(
        self, method: str, path: str, *, auth: tuple[bytes, bytes] | None = None
    ) -> tuple[int, Headers, bytes]:
        """One request under one deadline; returns ``(status, headers, body)`` or raises
        :class:`UMSError`."""
        url = f"{self.base_url}/{path}"
        expired = False
        exchange = Deferred.fromCoroutine(self._exchange(method, url, auth))

        def expire() -> None:
            nonlocal expired
            expired = True
            for connection in list(self._live):
                connection.abort(_timeout_error(self.timeout, url))
            exchange.cancel()

        timer = self._reactor.callLater(self.timeout, expire)
        try:
            return await exchange
        except (UMSError, CancelledError):
            if expired:
                raise _timeout_error(self.timeout, url) from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _exchange(
        self, method: str, url: str, auth: tuple[bytes, bytes] | None
    ) -> tuple[int, Headers, bytes]:
        """The request and its body, without a deadline of its own (see :meth:`_request`)."""
        headers = {b"Accept": [b"application/json"]}
        if self._login_id is not None:
            # Explicit, so a plaintext test URL (where a Secure cookie is withheld) works too.
            headers[b"Cookie"] = [f"JSESSIONID={self._login_id}".encode("ascii")]
        try:
            response = await self._http.request(
                method, url, headers=headers, auth=auth, allow_redirects=False, unbuffered=True,
            )
        except Exception as e:  # noqa: BLE001 - every transport failure becomes a UMSError
            raise connection_error(e, url, self.timeout) from None
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_RESPONSE_BODY:
                raise _BodyTooLarge()
            chunks.append(data)

        try:
            await response.collect(collect)
        except Exception as e:  # noqa: BLE001
            if any(isinstance(c, _BodyTooLarge) for c in failure_causes(e)):
                raise UMSError(
                    f"bad response from the UMS: body larger than {MAX_RESPONSE_BODY} bytes ({url})"
                ) from None
            raise connection_error(e, url, self.timeout) from None
        return response.code, response.headers, b"".join(chunks)

    async def login(self, user: str, password: str) -> None:
        """``POST /umsapi/v3/login`` with Basic auth; keeps the session id.

        Raises :class:`UsageError` for an empty user name or password, or a ``:`` in
        the name; :class:`UMSError` "login refused for user X" on ``401``, and for
        every other failure.
        """
        if not isinstance(user, str) or not user or ":" in user:
            raise UsageError("the UMS user name must be non-empty and contain no ':'")
        if not isinstance(password, str) or not password:
            raise UsageError(f"the UMS password for user {user!r} is empty")
        self._user = user
        # "user:password": its Base64 is the Authorization header a server may echo.
        self._secrets = (password, f"{user}:{password}")
        url = f"{self.base_url}/umsapi/v3/login"
        _log.info("logging in to UMS at {url} as {user!r} ({trust})", url=self.base_url, user=user,
                  trust=self.trust.describe() if not self.is_plaintext else "plaintext http")
        status, headers, body = await self._request(
            "POST", "umsapi/v3/login", auth=(user.encode("utf-8"), password.encode("utf-8"))
        )
        if status == 401:
            itg = itg_error(body)
            reason = f" ({itg[0]})" if itg else ""
            raise UMSError(f"login refused for user {user!r}: wrong user name or password{reason} ({url})")
        if status != 200:
            raise error_from_response(status, body, url=url, user=user, secrets=self._secrets)
        login_id = _session_from(headers, body)
        if login_id is None:
            raise UMSError(f"bad response from the UMS: login succeeded but no JSESSIONID came back ({url})")
        self._login_id = login_id
        self._secrets = (password, f"{user}:{password}", login_id)

    async def shadow_secret(self, device_id: str) -> ShadowSecret:
        """``GET .../thinclients/{id}?facets=shadow`` (v3, then v2 if v3 is unknown).

        Needs :meth:`login` first. Returns the :class:`ShadowSecret`; raises
        :class:`UMSError` or :class:`SecretError` (see :func:`secret_from_response`).
        Each call yields a fresh one-time password.
        """
        device_id = validate_device_id(device_id)
        if self._login_id is None:
            raise UMSError("not logged in to the UMS")
        quoted = quote(device_id, safe="")
        for version in ("v3", "v2"):
            path = f"umsapi/{version}/thinclients/{quoted}?facets=shadow"
            url = f"{self.base_url}/{path}"
            status, _, body = await self._request("GET", path)
            if status == 200:
                secret = secret_from_response(body, url=url, device_id=device_id)
                _log.info(
                    "fetched shadow secret for device {device_id} (lastIP {host}, certificate SHA-256 {sha})",
                    device_id=device_id, host=secret.host, sha=secret.certificate_sha256,
                )
                return secret
            if status == 404 and version == "v3" and itg_error(body) is None:
                _log.info("the UMS has no IMI v3 thin-client path; trying the documented v2 path")
                continue
            raise error_from_response(
                status, body, url=url, device_id=device_id, user=self._user, secrets=self._secrets
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def logout(self) -> None:
        """``POST /umsapi/v3/logout``, best effort: errors are logged and ignored."""
        if self._login_id is None:
            return
        try:
            status, _, _ = await self._request("POST", "umsapi/v3/logout")
            if status != 200:
                _log.debug("UMS logout answered HTTP {status}", status=status)
        except UMSError as e:
            _log.debug("UMS logout failed: {message}", message=e.message)
        finally:
            self._login_id = None

    async def close(self) -> None:
        """Close cached connections (call once done)."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def fetch_shadow_secret(self, device_id: str, user: str, password: str) -> ShadowSecret:
        """Log in, fetch the device's shadow secret, log out (even on failure)."""
        device_id = validate_device_id(device_id)
        await self.login(user, password)
        try:
            return await self.shadow_secret(device_id)
        finally:
            await self.logout()


def _session_from(headers: Headers, body: bytes) -> str | None:
    """The JSESSIONID from ``Set-Cookie``, else from the body's ``message``."""
    for raw in headers.getRawHeaders(b"set-cookie", []):
        try:
            jar: SimpleCookie = SimpleCookie()
            jar.load(raw.decode("latin-1"))
        except CookieError:
            continue
        morsel = jar.get("JSESSIONID")
        if morsel is not None and _SESSION_ID.match(morsel.value):
            return morsel.value
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    message = document.get("message") if isinstance(document, Mapping) else None
    if isinstance(message, str) and message.startswith("JSESSIONID="):
        value = message[len("JSESSIONID="):].strip()
        if _SESSION_ID.match(value):
            return value
    return None


def fetch_shadow_secret(
    reactor: Any,
    base_url: str,
    device_id: str,
    user: str,
    password: str,
    trust: UMSTrust,
    timeout: float = DEFAULT_TIMEOUT,
) -> Deferred[ShadowSecret]:
    """Fetch one shadow secret: login, GET with ``?facets=shadow``, logout; connections closed.

    Fires with a :class:`ShadowSecret`; fails with :class:`UMSError` (exit 3),
    :class:`UsageError` for a bad URL/id/user, or :class:`SecretError` for a malformed
    secret (exit 2).
    """

    async def run() -> ShadowSecret:
        client = IMIClient(reactor, base_url, trust, timeout=timeout)
        try:
            return await client.fetch_shadow_secret(device_id, user, password)
        finally:
            await client.close()

    return Deferred.fromCoroutine(run())
