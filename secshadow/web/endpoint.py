"""The browser as a viewer-side endpoint (PROTOCOL.md section 5; DESIGN.md "Transports are
endpoints").

:class:`WebViewerEndpoint` is an ``IStreamServerEndpoint`` like ``tcp:0``: the session
calls ``listen(factory)`` with its viewer factory and gets back a port. Instead of raw
RFB, the port is an HTTP(S) site serving a small page, noVNC, and a WebSocket at
``/websocket``. ``listen`` mints one single-use token (128 bits, 60 s); the port's
``url`` carries it in the fragment (never sent in the page request) and its
``websocket`` in the query. A WebSocket upgrade with a valid token from an allowed
``Origin`` gets the protocol built by the session's factory, over a
:class:`~secshadow.wsstream.WebSocketStream`, so the session sees an ordinary viewer
connection. Everything else is refused with 403 before the upgrade, and before the
session's factory is asked for a protocol (so the device sees no ``PROCYCMD``).

:class:`SharedSiteEndpoint` is the same on one shared :class:`WebSite` (``secshadow-web``):
``listen`` registers a token on the site and returns a port whose ``stopListening``
forgets it.

Site layout: ``/`` and ``/view`` the page (``/`` is the service's own page on a shared
site), ``/static/...`` its script and style, ``/novnc/core/...`` and
``/novnc/vendor/...`` noVNC's modules, ``/websocket?token=...`` the WebSocket.
Every answer carries :func:`secshadow.web.policy.security_headers`; the access log never
shows a query string (the token).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web import static
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from secshadow.errors import UsageError
from secshadow.web.assets import NoVNCAssets
from secshadow.web.policy import OriginPolicy, check_frame_ancestors, security_headers
from secshadow.web.stream import RFBWebSocketFactory
from secshadow.web.tokens import TOKEN_LIFETIME, TokenStore

log = Logger()

#: Our own page, script and style (package data).
STATIC_DIR = Path(__file__).resolve().parent / "static"
WEBSOCKET_PATH = "/websocket"
VIEW_PATH = "/view"


@dataclass(frozen=True)
class Ticket:
    """What a token opens: the session's viewer ``factory``, and whether the page shows
    the session as view-only."""

    factory: IProtocolFactory
    view_only: bool = False


class _Files(static.File):
    """Static files without directory listings, with JavaScript module types."""

    contentTypes = {
        **static.File.contentTypes,
        ".js": "text/javascript; charset=utf-8",
        ".mjs": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".html": "text/html; charset=utf-8",
        ".svg": "image/svg+xml",
        ".json": "application/json",
    }

    def directoryListing(self) -> Resource:
        return NoResource("Not found.")


class _Page(Resource):
    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self._path.read_bytes()


def _refuse(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return message.encode("utf-8") + b"\n"


class WebSocketGate(Resource):
    """``/websocket?token=...``: checks ``Origin`` and the token, then hands the
    connection to autobahn with the session's protocol inside."""

    isLeaf = True

    def __init__(self, site: WebSite) -> None:
        super().__init__()
        self._site = site

    def render(self, request: Request) -> bytes | int:
        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            return _refuse(request, 400, "this address takes WebSocket connections only")
        peer = request.getClientAddress()
        origin = request.getHeader(b"origin")
        if not self._site.origins.allows(origin, request.getHeader(b"host"), request.isSecure()):
            log.warn("refused a WebSocket from {peer}: foreign origin {origin}", peer=peer,
                     origin=(origin or b"").decode("latin-1")[:200])
            return _refuse(request, 403, "this origin may not open the viewer")
        token = (request.args or {}).get(b"token", [b""])[0].decode("latin-1")
        ticket = self._site.tokens.redeem(token)
        if ticket is None:
            log.warn("refused a WebSocket from {peer}: unknown, used or expired token", peer=peer)
            return _refuse(request, 403, "this viewer link was already used or has expired")
        inner: Any = ticket.factory.buildProtocol(peer)
        if inner is None:
            log.warn("refused a WebSocket from {peer}: the session accepts no viewer now", peer=peer)
            return _refuse(request, 403, "the session accepts no viewer now")
        log.info("browser viewer connecting from {peer}", peer=peer)
        scheme = "wss" if request.isSecure() else "ws"
        url = f"{scheme}://{(request.getHeader(b'host') or b'localhost').decode('latin-1')}{WEBSOCKET_PATH}"
        resource = WebSocketResource(RFBWebSocketFactory(inner, url))
        return resource.render(request)


class _Root(Resource):
    """Adds the security headers to every answer, then routes."""

    def __init__(self, site: WebSite) -> None:
        super().__init__()
        self._site = site

    def _headers(self, request: Request) -> None:
        for name, value in self._site.headers.items():
            request.setHeader(name, value)

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        self._headers(request)
        return super().getChildWithDefault(path, request)

    def render_GET(self, request: Request) -> bytes:
        self._headers(request)
        return self._site.index.render_GET(request)


class AccessLogSite(Site):
    """A ``Site`` whose access log is method, path (never the query: tokens travel
    there) and status."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        log.info("{method} {path} -> {code}", method=request.method.decode("ascii", "replace"),
                 path=(request.path or b"").decode("utf-8", "replace"), code=request.code)


class WebSite:
    """One browser site: page, noVNC, WebSocket gate and token store.

    ``assets``: the :class:`NoVNCAssets` to serve. ``clock``: for token expiry.
    ``frame_ancestors``: who may frame the page (``None``: nobody). ``origins``: extra
    allowed ``Origin`` values (:class:`OriginPolicy`). ``index``: the resource for ``/``
    (default: the viewer page). ``token_lifetime``: seconds.

    :attr:`root` is the ``twisted.web`` resource tree (add children such as ``api``);
    :meth:`site` the ``Site`` to listen with. Raises :class:`UsageError` for a bad
    ``frame_ancestors`` or origin.
    """

    def __init__(self, assets: NoVNCAssets, clock: IReactorTime, *, frame_ancestors: str | None = None,
                 origins: Iterable[str] = (), index: Resource | None = None,
                 token_lifetime: float = TOKEN_LIFETIME) -> None:
        self.assets = assets
        self.tokens: TokenStore[Ticket] = TokenStore(clock, token_lifetime)
        self.origins = OriginPolicy(origins)
        self.headers = security_headers(check_frame_ancestors(frame_ancestors))
        viewer = _Page(STATIC_DIR / "viewer.html")
        self.index: Any = index or viewer
        self.root = _Root(self)
        self.root.putChild(b"", self.index)
        self.root.putChild(VIEW_PATH.strip("/").encode(), viewer)
        self.root.putChild(b"static", _Files(str(STATIC_DIR)))
        novnc = Resource()
        novnc.putChild(b"core", _Files(str(assets.core)))
        novnc.putChild(b"vendor", _Files(str(assets.vendor)))
        self.root.putChild(b"novnc", novnc)
        self.root.putChild(WEBSOCKET_PATH.strip("/").encode(), WebSocketGate(self))

    def site(self) -> Site:
        return AccessLogSite(self.root)

    def paths(self, token: str, view_only: bool) -> tuple[str, str]:
        """The page path (token in the fragment) and the WebSocket path (token in the query)."""
        fragment = f"token={token}" + ("&view_only=1" if view_only else "")
        return f"{VIEW_PATH}#{fragment}", f"{WEBSOCKET_PATH}?token={token}"


def _url_host(address: Any) -> str:
    host = getattr(address, "host", "127.0.0.1")
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("0.0.0.0", "", "::"):  # noqa: S104 - a wildcard listener: name loopback in URLs
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return str(host)


def _is_tls(description: str) -> bool:
    return description.split(":", 1)[0].lower() in ("ssl", "tls")


@implementer(IListeningPort)
class WebListeningPort:
    """What :meth:`WebViewerEndpoint.listen` fires with: ``getHost()`` and
    ``stopListening()`` of the HTTP listener, plus ``url`` (the page, token in the
    fragment), ``websocket`` (token in the query) and ``view_only``. ``stopListening``
    also forgets the token if it was not used. The token is a secret: it is not in
    ``repr``."""

    def __init__(self, port: IListeningPort | None, tokens: TokenStore[Ticket], token: str, url: str,
                 websocket: str, view_only: bool, on_stop: Callable[[], None] | None = None) -> None:
        self._port = port
        self._tokens = tokens
        self._token = token
        self.url = url
        self.websocket = websocket
        self.view_only = view_only
        self._on_stop = on_stop
        self.stopped = False

    def startListening(self) -> None:
        """Already listening."""

    def stopListening(self) -> Deferred[None]:
        if not self.stopped:
            self.stopped = True
            self._tokens.revoke(self._token)
            if self._on_stop is not None:
                self._on_stop()
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        result = port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)

    def getHost(self) -> Any:
        return self._port.getHost() if self._port is not None else self._host

    _host: Any = None

    def __repr__(self) -> str:
        return f"<WebListeningPort {self.websocket.split('?', 1)[0]} view_only={self.view_only}>"


@implementer(IStreamServerEndpoint)
class WebViewerEndpoint:
    """The ``--web`` viewer endpoint: one HTTP(S) site per session.

    ``reactor``: IReactorTCP + IReactorTime. ``listen``: a Twisted server endpoint string
    (``tcp:0:interface=127.0.0.1`` by default; an ``ssl:`` string makes the URLs
    ``https``/``wss``). ``assets``: :class:`NoVNCAssets` (see
    :func:`secshadow.web.assets.find_novnc`). ``view_only``: the page shows the session as
    view-only (enforcement is the session's). ``frame_ancestors``: origins that may embed
    the page in a frame (``None``: none). ``origins``: extra allowed ``Origin`` values (a
    console running its own noVNC). ``clock``: for the token's 60 s (default: reactor).

    ``listen(factory)`` fires with a :class:`WebListeningPort`; a listen string that is not
    an endpoint raises :class:`UsageError` here, at construction.
    """

    def __init__(self, reactor: Any, listen: str = "tcp:0:interface=127.0.0.1", *, assets: NoVNCAssets,
                 view_only: bool = False, frame_ancestors: str | None = None, clock: IReactorTime | None = None,
                 origins: Iterable[str] = ()) -> None:
        try:
            self._endpoint = serverFromString(reactor, listen)
        except Exception as e:  # noqa: BLE001 - endpoint parsers raise anything
            raise UsageError(f"--listen {listen!r} is not a server endpoint: {e}") from None
        self._reactor = reactor
        self._description = listen
        self.view_only = view_only
        self.website = WebSite(assets, clock or reactor, frame_ancestors=frame_ancestors, origins=origins)
        #: The :class:`WebListeningPort` of the last :meth:`listen` (``None`` before).
        self.port: WebListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803 - the interface's name
        scheme = "https" if _is_tls(self._description) else "http"
        site = self.website

        def listening(port: IListeningPort) -> IListeningPort:
            address = port.getHost()
            base = f"{scheme}://{_url_host(address)}:{getattr(address, 'port', 0)}"
            ws_base = ("wss" if scheme == "https" else "ws") + base[len(scheme):]
            token = site.tokens.mint(Ticket(protocolFactory, self.view_only))
            page, websocket = site.paths(token, self.view_only)
            self.port = WebListeningPort(port, site.tokens, token, base + page, ws_base + websocket,
                                         self.view_only, on_stop=site.tokens.clear)
            return self.port

        return self._endpoint.listen(site.site()).addCallback(listening)

    def __repr__(self) -> str:
        return f"WebViewerEndpoint({self._description!r}, view_only={self.view_only})"


@implementer(IStreamServerEndpoint)
class SharedSiteEndpoint:
    """A session's viewer endpoint on a shared :class:`WebSite` (``secshadow-web``).

    ``listen(factory)`` registers a token on ``website`` and fires with a
    :class:`WebListeningPort` whose ``url`` / ``websocket`` are paths on the site
    (``/view#token=...``, ``/websocket?token=...``) and whose ``getHost()`` is
    ``address`` (the site's listening address). :attr:`listening` fires with that port
    too (the service answers the shadow request then).
    """

    def __init__(self, website: WebSite, *, address: Any = None, view_only: bool = False) -> None:
        self.website = website
        self.address = address
        self.view_only = view_only
        self.port: WebListeningPort | None = None
        self.listening: Deferred[WebListeningPort] = Deferred()

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        token = self.website.tokens.mint(Ticket(protocolFactory, self.view_only))
        page, websocket = self.website.paths(token, self.view_only)
        port = WebListeningPort(None, self.website.tokens, token, page, websocket, self.view_only)
        port._host = self.address
        self.port = port
        if not self.listening.called:
            self.listening.callback(port)
        return succeed(port)
