"""``secshadow-web``: the multi-user browser console (CONTRACT.md; the UMS Web App shape).

Administrators log in with their UMS account. The service checks the login against the
UMS (IMI v3 login) and keeps only the UMS session (:class:`~secshadow.web.ums.UMSSession`),
never the password. It lists the devices from IMI ``GET /umsapi/v3/thinclients`` and
shadows one in the browser: ``POST /api/devices/{id}/shadow`` runs
:func:`secshadow.api.start_shadowing` with a secret source on that UMS session and a
:class:`~secshadow.web.endpoint.SharedSiteEndpoint` on this service's one site, and answers
once the secret was fetched and the device pinned, with the page and WebSocket paths that
hold the session's single-use token.

HTTP API (JSON bodies; errors are ``{"code", "message"}``):

=================================  ==========================================================
``POST /api/login``                ``{"user", "password"}`` -> 200 ``{"user"}`` + cookie; 401
``POST /api/logout``               204; the UMS session is logged out, shadowings end
``GET /api/session``               200 ``{"user"}``; 401 without a session
``GET /api/devices``               200 ``[{"id", "name", "lastIP"}, ...]``; 401
``POST /api/devices/{id}/shadow``  ``{"view_only": bool}`` (optional) -> 200 ``{"url",
                                   "websocket", "expires_s": 60, "view_only"}``; 4xx/5xx
=================================  ==========================================================

Protection: the session cookie is ``HttpOnly``, ``SameSite=Strict``, ``Secure`` under
HTTPS, 256 random bits (the service keeps only its SHA-256). State-changing requests
(``POST``) from a browser need a same-origin ``Origin`` (:class:`OriginPolicy`) and no
cross-site ``Sec-Fetch-Site``; otherwise 403 ``csrf``. A session ends on logout, after
``session_idle`` seconds without requests and without a running shadowing, or when the UMS
no longer accepts its session (any UMS answer 401, also found by a check every
``check_interval`` seconds while shadowing); its shadowings end with it. A shadowing ends
when its tab closes (the WebSocket closes), or when its token was not used in 60 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NoReturn, Sequence

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from secshadow import events
from secshadow.errors import SecShadowError, UMSError, UsageError
from secshadow.imi import validate_base_url, validate_device_id
from secshadow.options import SessionOptions
from secshadow.umstrust import UMSTrust
from secshadow.web.assets import NoVNCAssets, find_novnc
from secshadow.web.endpoint import STATIC_DIR, SharedSiteEndpoint, WebListeningPort, WebSite, _Page
from secshadow.web.tls import ServerTLS, generate_server_tls, load_server_tls
from secshadow.web.tokens import TOKEN_LIFETIME
from secshadow.web.ums import LoginRefused, UMSSession, UMSSessionExpired, UMSSessionSource, summaries

log = Logger()

COOKIE = b"secshadow_session"
#: Seconds a service session lives without requests and without a shadowing (IMI: 30 min).
SESSION_IDLE = 30 * 60.0
#: Seconds between UMS session checks while a shadowing runs.
CHECK_INTERVAL = 300.0
#: Largest JSON request body, bytes.
MAX_BODY = 16 * 1024
DEFAULT_LISTEN = "tcp:8444:interface=127.0.0.1"

#: HTTP status for each error code of CONTRACT.md's table.
STATUS_FOR_CODE = {"usage": 400, "ums": 502, "device-unreachable": 504, "tls-handshake": 502,
                   "pin-mismatch": 502, "device-rejected": 502, "viewer": 500, "gateway": 502, "internal": 500}


class APIError(Exception):
    """An answer other than success: ``status``, ``code``, ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


@dataclass
class UserSession:
    """One logged-in administrator: the UMS session and the running shadowings."""

    user: str
    ums: UMSSession
    shadowings: dict[int, Any] = field(default_factory=dict)
    devices: dict[int, str] = field(default_factory=dict)
    idle_timer: IDelayedCall | None = None
    check_timer: IDelayedCall | None = None
    ended: bool = False


class WebService:
    """The service: one :class:`WebSite` with the API under ``/api``.

    ``reactor``: IReactorTCP + IReactorTime (+ what sessions need). ``ums_url``, ``trust``:
    the UMS and how its web certificate is trusted. ``assets``: noVNC. ``options``: the
    :class:`SessionOptions` every shadowing starts from (``view_only`` is set per session;
    ``force_view_only`` makes every session view-only). ``audit``: an
    ``secshadow.audit.AuditLog`` or ``None``. ``secure``: served over HTTPS (the cookie
    gets ``Secure``). ``origins``: extra allowed origins. ``session_idle`` /
    ``check_interval``: seconds. ``ums_factory``: makes a :class:`UMSSession` (tests).
    ``start``: :func:`secshadow.api.start_shadowing` (tests may inject).
    """

    def __init__(self, reactor: Any, ums_url: str, trust: UMSTrust, assets: NoVNCAssets, *,
                 options: SessionOptions | None = None, force_view_only: bool = False, audit: Any = None,
                 secure: bool = False, origins: Sequence[str] = (), frame_ancestors: str | None = None,
                 session_idle: float = SESSION_IDLE, check_interval: float = CHECK_INTERVAL,
                 clock: IReactorTime | None = None, ums_timeout: float = 30.0,
                 ums_factory: Callable[[], UMSSession] | None = None,
                 start: Callable[..., Any] | None = None) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.ums_url = validate_base_url(ums_url)
        self.trust = trust
        self.options = options or SessionOptions()
        self.force_view_only = force_view_only
        self.audit = audit
        self.secure = secure
        self.session_idle = session_idle
        self.check_interval = check_interval
        self._ums_factory = ums_factory or (lambda: UMSSession(reactor, self.ums_url, trust, timeout=ums_timeout))
        if start is None:
            from secshadow.api import start_shadowing

            start = start_shadowing
        self._start: Callable[..., Any] = start
        self.website = WebSite(assets, self.clock, frame_ancestors=frame_ancestors, origins=origins,
                               index=_Page(STATIC_DIR / "app.html"))
        self.website.root.putChild(b"api", _API(self))
        self.sessions: dict[bytes, UserSession] = {}
        self.address: Any = None
        self._serial = 0

    def site(self) -> Site:
        return self.website.site()

    # ------------------------------------------------------------------ sessions
    def session_for(self, request: Request) -> UserSession | None:
        raw = request.getCookie(COOKIE)
        if not raw:
            return None
        session = self.sessions.get(_key(raw.decode("ascii", "replace")))
        if session is None or session.ended:
            return None
        self._touch(session)
        return session

    def _touch(self, session: UserSession) -> None:
        if session.idle_timer is not None and session.idle_timer.active():
            session.idle_timer.cancel()
        session.idle_timer = None
        if not session.shadowings:
            session.idle_timer = self.clock.callLater(self.session_idle, self.end_session, session,
                                                      "idle for too long")

    async def login(self, user: str, password: str) -> tuple[str, UserSession]:
        ums = self._ums_factory()
        try:
            await ums.login(user, password)
        except BaseException:
            await ums.close()
            raise
        session_id = secrets.token_urlsafe(32)
        session = UserSession(user=user, ums=ums)
        self.sessions[_key(session_id)] = session
        self._touch(session)
        log.info("UMS user {user!r} logged in", user=user)
        return session_id, session

    def end_session(self, session: UserSession, reason: str) -> Deferred[None]:
        """End ``session``: its shadowings stop, the UMS session is logged out."""
        if session.ended:
            return succeed(None)
        session.ended = True
        for key, value in list(self.sessions.items()):
            if value is session:
                del self.sessions[key]
        for timer in (session.idle_timer, session.check_timer):
            if timer is not None and timer.active():
                timer.cancel()
        session.idle_timer = session.check_timer = None
        log.info("session of UMS user {user!r} ended: {reason}", user=session.user, reason=reason)
        stops = [s.stop(reason).addErrback(lambda _: None) for s in list(session.shadowings.values())]

        async def close_ums() -> None:
            if session.ums.logged_in:
                await session.ums.logout()
            await session.ums.close()

        stops.append(ensureDeferred(close_ums()).addErrback(lambda f: log.failure("UMS logout", f)))
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def shutdown(self) -> Deferred[None]:
        """End every session (the service stops)."""
        ends = [self.end_session(s, "the service stops") for s in list(self.sessions.values())]
        self.website.tokens.clear()
        return DeferredList(ends, consumeErrors=True).addCallback(lambda _: None)

    def _ums_failed(self, session: UserSession, error: BaseException | None) -> None:
        if isinstance(error, UMSSessionExpired):
            self.end_session(session, "the UMS session expired")

    # ------------------------------------------------------------------ shadowing
    async def shadow(self, session: UserSession, device_id: str, view_only: bool,
                     client_gone: Deferred[None]) -> WebListeningPort:
        view_only = view_only or self.force_view_only
        endpoint = SharedSiteEndpoint(self.website, address=self.address, view_only=view_only)
        source = UMSSessionSource(session.ums, device_id)
        options = replace(self.options, view_only=view_only)
        self._serial += 1
        serial = self._serial

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.Closed):
                log.info("shadowing {n} of device {device} for {user!r} closed: {reason}", n=serial,
                         device=device_id, user=session.user, reason=event.reason)
            elif not isinstance(event, events.Listening):  # its url holds the token
                log.info("shadowing {n}: {event}", n=serial, event=event.name)

        shadowing = self._start(self.reactor, source, options, on_event=on_event, viewer_name="browser",
                                viewer_endpoint=endpoint, audit=self.audit)
        session.shadowings[serial] = shadowing
        session.devices[serial] = device_id
        self._touch(session)
        self._schedule_check(session)
        ready: Deferred[WebListeningPort] = Deferred()

        def listening(port: WebListeningPort) -> WebListeningPort:
            if not ready.called:
                ready.callback(port)
            return port

        def ended(result: Any) -> None:
            session.shadowings.pop(serial, None)
            session.devices.pop(serial, None)
            if not session.ended:
                self._touch(session)
            if isinstance(result, Failure):
                self._ums_failed(session, result.value)
                log.info("shadowing {n} of device {device} failed: {error}", n=serial, device=device_id,
                         error=getattr(result.value, "message", result.getErrorMessage()))
            if not ready.called:
                ready.errback(result if isinstance(result, Failure) else Failure(
                    SecShadowError(f"the session ended before the browser could connect: "
                                   f"{getattr(result, 'reason', '')}")))

        endpoint.listening.addCallback(listening)
        shadowing.done.addBoth(ended)
        client_gone.addCallback(lambda _: None if ready.called else shadowing.stop("the browser went away"))
        return await ready

    def _schedule_check(self, session: UserSession) -> None:
        if session.check_timer is not None and session.check_timer.active():
            return
        session.check_timer = self.clock.callLater(self.check_interval, self._check, session)

    def _check(self, session: UserSession) -> None:
        session.check_timer = None
        if session.ended or not session.shadowings:
            return
        device = next(iter(session.devices.values()))

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                self._ums_failed(session, result.value)
                return
            if not session.ended and session.shadowings:
                self._schedule_check(session)

        ensureDeferred(session.ums.check(device)).addBoth(done)


# ---------------------------------------------------------------------- the API


def _json_body(request: Request) -> dict[str, Any]:
    assert request.content is not None
    raw = request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise APIError(413, "usage", "the request body is too large")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "usage", "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "usage", "the request body must be a JSON object")
    return body


_SHADOW_PATH = re.compile(r"^devices/([^/]+)/shadow$")


class _API(Resource):
    isLeaf = True

    def __init__(self, service: WebService) -> None:
        super().__init__()
        self.service = service

    def render(self, request: Request) -> int:
        gone: Deferred[None] = Deferred()
        request.notifyFinish().addBoth(lambda r: gone.callback(None) if isinstance(r, Failure) else None)
        ensureDeferred(self._answer(request, gone))
        return NOT_DONE_YET

    async def _answer(self, request: Request, gone: Deferred[None]) -> None:
        try:
            status, body = await self._route(request, gone)
        except APIError as e:
            status, body = e.status, {"code": e.code, "message": e.message}
        except LoginRefused:
            status, body = 401, {"code": "ums", "message": "The UMS refused this user name or password."}
        except UMSSessionExpired:
            status, body = 401, {"code": "ums", "message": "The UMS session has expired: please log in again."}
        except SecShadowError as e:
            status, body = STATUS_FOR_CODE.get(e.code, 500), {"code": e.code, "message": e.message}
        except Exception:  # noqa: BLE001 - a bug: logged, answered without details
            log.failure("internal error in {path}", path=request.path)
            status, body = 500, {"code": "internal", "message": "internal error; see the service log"}
        if gone.called or request.finished:
            return
        request.setResponseCode(status)
        if body is None:
            request.finish()
            return
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()

    def _check_origin(self, request: Request) -> None:
        site = request.getHeader(b"sec-fetch-site")
        if site is not None and site.lower() not in (b"same-origin", b"none"):
            raise APIError(403, "csrf", "refused: the request came from another site")
        if not self.service.website.origins.allows(request.getHeader(b"origin"), request.getHeader(b"host"),
                                                   request.isSecure()):
            raise APIError(403, "csrf", "refused: the request came from another origin")

    def _session(self, request: Request) -> UserSession:
        session = self.service.session_for(request)
        if session is None:
            raise APIError(401, "unauthenticated", "Please log in with your UMS account.")
        return session

    async def _route(self, request: Request, gone: Deferred[None]) -> tuple[int, Any]:
        path = "/".join(p.decode("utf-8", "replace") for p in (request.postpath or []))
        method = request.method
        if method == b"POST":
            self._check_origin(request)
        if path == "login" and method == b"POST":
            return await self._login(request)
        if path == "logout" and method == b"POST":
            session = self.service.session_for(request)
            if session is not None:
                await self.service.end_session(session, "logged out")
            request.addCookie(COOKIE, b"", path=b"/", httpOnly=True, secure=self.service.secure,
                              sameSite="strict", max_age=b"0")
            return 204, None
        if path == "session" and method == b"GET":
            return 200, {"user": self._session(request).user}
        if path == "devices" and method == b"GET":
            session = self._session(request)
            try:
                devices = await session.ums.devices()
            except UMSError as e:
                self.service._ums_failed(session, e)
                raise
            return 200, summaries(devices)
        match = _SHADOW_PATH.match(path)
        if match and method == b"POST":
            session = self._session(request)
            body = _json_body(request)
            view_only = body.get("view_only", False)
            if not isinstance(view_only, bool):
                raise APIError(400, "usage", "view_only must be true or false")
            device_id = validate_device_id(match.group(1))
            port = await self.service.shadow(session, device_id, view_only, gone)
            return 200, {"url": port.url, "websocket": port.websocket, "expires_s": int(TOKEN_LIFETIME),
                         "view_only": port.view_only}
        if path in ("login", "logout", "session", "devices") or match:
            raise APIError(405, "usage", "method not allowed")
        raise APIError(404, "usage", "no such API path")

    async def _login(self, request: Request) -> tuple[int, Any]:
        body = _json_body(request)
        user, password = body.get("user"), body.get("password")
        if not isinstance(user, str) or not user or not isinstance(password, str) or not password:
            raise APIError(400, "usage", "give the UMS user name and password")
        session_id, session = await self.service.login(user, password)
        request.addCookie(COOKIE, session_id.encode("ascii"), path=b"/", httpOnly=True, secure=self.service.secure,
                          sameSite="strict")
        return 200, {"user": session.user}


# ---------------------------------------------------------------------- the program


def _listen_interface(description: str) -> str | None:
    match = re.search(r"(?:^|:)interface=((?:\\.|[^:])*)", description)
    return match.group(1).replace("\\", "") if match else None


def _is_loopback_listen(description: str) -> bool:
    import ipaddress

    interface = _listen_interface(description)
    if interface is None:
        return False
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secshadow-web",
        description="Shadow managed devices in the browser: administrators log in with their UMS account, "
                    "pick a device and watch it in the tab.")
    parser.add_argument("--ums", required=True, metavar="URL", help="the UMS, e.g. https://ums.example:8443")
    trust = parser.add_argument_group("how the UMS web certificate is trusted (default: the system CA store)")
    trust.add_argument("--ums-ca", metavar="FILE")
    trust.add_argument("--ums-fingerprint", metavar="HEX")
    trust.add_argument("--ums-insecure", action="store_true", help="no verification (warned about)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ENDPOINT",
                        help="Twisted server endpoint (default: %(default)s)")
    parser.add_argument("--tls-cert", metavar="PEM", help="HTTPS certificate (chain) file")
    parser.add_argument("--tls-key", metavar="PEM", help="its unencrypted key")
    parser.add_argument("--generate-cert", action="store_true",
                        help="HTTPS with a fresh self-signed certificate (printed fingerprint); implied when "
                             "listening beyond loopback without --tls-cert")
    parser.add_argument("--origin", action="append", default=[], metavar="URL",
                        help="an origin browsers reach the service by, e.g. https://shadow.example (repeatable)")
    parser.add_argument("--frame-ancestors", metavar="SOURCES",
                        help="origins that may embed the pages in a frame (default: none)")
    parser.add_argument("--novnc", metavar="DIR", help="where noVNC is (default: $SECSHADOW_NOVNC or the install "
                                                       "location of bin/setup-debian)")
    parser.add_argument("--audit", metavar="FILE", help="append one JSON line per shadowing (mode 0600)")
    parser.add_argument("--view-only", action="store_true", help="every shadowing is view-only")
    parser.add_argument("--device-port", type=int, default=None, metavar="PORT",
                        help="the devices' TLS port (default: from the UMS, else 5900)")
    parser.add_argument("--tls-profile", choices=("modern", "legacy"), default="modern")
    parser.add_argument("--procy-terminator", choices=("none", "lf", "crlf"), default="none")
    parser.add_argument("--session-idle", type=float, default=SESSION_IDLE, metavar="S",
                        help="seconds a login lasts without activity (default: %(default)g)")
    parser.add_argument("--json", action="store_true", help="machine-readable events on standard output")
    return parser


def _emit(args: argparse.Namespace, event: dict[str, Any], text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    sys.stderr.write(f"secshadow-web: {text}\n")
    sys.stderr.flush()


def _start_logging() -> None:
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
    from twisted.logger import textFileLogObserver

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
                                     redirectStandardIO=False)


async def serve(reactor: Any, args: argparse.Namespace) -> None:
    """Start the service from parsed flags; fires when it stops (never, until a signal)."""
    trust = UMSTrust.from_flags(args.ums_ca, args.ums_fingerprint, args.ums_insecure)
    if args.ums_insecure:
        _emit(args, {"event": "warning", "message": "--ums-insecure: the UMS certificate is not verified"},
              "WARNING: --ums-insecure: the UMS certificate is not verified; anyone in between can read "
              "the shadow secrets")
    assets = find_novnc(args.novnc)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key")
    tls: ServerTLS | None = None
    if args.tls_cert:
        tls = load_server_tls(args.tls_cert, args.tls_key)
    elif args.generate_cert or not _is_loopback_listen(args.listen):
        interface = _listen_interface(args.listen)
        tls = generate_server_tls([interface] if interface else [])
    mapping: dict[str, Any] = {"tls_profile": args.tls_profile, "procy_terminator": args.procy_terminator}
    if args.device_port is not None:
        mapping["device_port"] = args.device_port
    options = SessionOptions.from_mapping(mapping)
    audit = None
    if args.audit:
        from secshadow.audit import AuditLog

        audit = AuditLog(args.audit)
    service = WebService(reactor, args.ums, trust, assets, options=options, force_view_only=args.view_only,
                         audit=audit, secure=tls is not None, origins=args.origin,
                         frame_ancestors=args.frame_ancestors, session_idle=args.session_idle)
    try:
        endpoint = serverFromString(reactor, args.listen)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--listen {args.listen!r} is not a server endpoint: {e}") from None
    factory: Any = service.site()
    if tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, factory)
    try:
        port = await endpoint.listen(factory)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot listen on {args.listen!r}: {e}") from None
    address = port.getHost()
    service.address = address
    host = getattr(address, "host", "127.0.0.1")
    if host in ("0.0.0.0", "::"):  # noqa: S104
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{address.port}/"
    event: dict[str, Any] = {"event": "web-listening", "url": url}
    text = f"listening on {url}"
    if tls is not None:
        event["certificate_sha256"] = tls.fingerprint
        text += f" (certificate SHA-256 {tls.fingerprint})"
    _emit(args, event, text)
    stopped: Deferred[None] = Deferred()

    def before_shutdown() -> Deferred[None]:
        return service.shutdown().addBoth(lambda _: port.stopListening())

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    await stopped


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``secshadow-web``: exit 2 on bad flags or missing noVNC, 3 when the UMS is unusable."""
    from twisted.internet import reactor

    args = build_parser().parse_args(argv)
    _start_logging()
    result: dict[str, int] = {"code": 0}

    def failed(failure: Failure) -> None:
        error = failure.value
        if isinstance(error, SecShadowError):
            _emit(args, {"event": "error", "code": error.code, "message": error.message},
                  f"error: {error.message}")
            result["code"] = error.exit_code
        else:
            log.failure("secshadow-web failed", failure)
            result["code"] = 1
        if reactor.running:
            reactor.stop()

    def start() -> None:
        ensureDeferred(serve(reactor, args)).addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.run()
    sys.exit(result["code"])

if __name__ == "__main__":
    main()
