"""``secshadow-proxy --control stdio``: many shadowing sessions in one process.

A console that shadows many devices keeps one proxy process and talks to it in JSON
lines: requests on standard input, events on standard output, every event tagged
with the ``session`` id the console chose. Each session has its own listener (and
viewer, if asked for). The request and event shapes are documented in
``docs/cli.md`` ("Control mode").

Requests::

    {"op": "open", "session": "a", "device": "27"}                 # secret from --ums
    {"op": "open", "session": "b", "secret": {...}, "device_port": 5901}
    {"op": "close", "session": "a"}
    {"op": "list"}
    {"op": "shutdown"}                                             # also: end of input

The UMS password still comes only from ``--ums-password-file`` or
``$SECSHADOW_UMS_PASSWORD``; a one-time password travels only inside ``secret``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow import events
from secshadow.api import IMISource, SecretSource, Shadowing, StaticSecret, start_shadowing
from secshadow.errors import SecShadowError, UsageError
from secshadow.options import SessionOptions
from secshadow.secret import secret_from_document
from secshadow.viewers import make_launcher

if TYPE_CHECKING:
    from secshadow.audit import AuditLog

#: A console's session id: short, printable, safe in logs.
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: Longest request line accepted (a secret with a PEM certificate is a few KiB).
MAX_REQUEST_BYTES = 256 * 1024

#: Request keys that are session options (SessionOptions.from_mapping checks them).
_OPTION_KEYS = ("tls_profile", "procy_terminator", "listen", "connect_timeout", "viewer_timeout",
                "hello_timeout", "idle_timeout", "max_viewers", "view_only", "device_host", "device_port")

#: Every key an ``open`` request may carry.
_OPEN_KEYS = frozenset({"op", "session", "device", "secret", "viewer", "viewer_command", "full_screen", "web",
                        "gateway", "gateway_token", *_OPTION_KEYS})


@implementer(IHalfCloseableProtocol)
class _Requests(Protocol):
    """Reads JSON-lines requests from standard input. A line over
    :data:`MAX_REQUEST_BYTES` gets one error and is discarded up to its newline; the
    lines after it are served. End of input means shutdown, but standard output stays
    open (half-close) until every session reported its end."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.closed: Deferred[None] = Deferred()
        self._buffer = b""
        self._discarding = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                break
            self._buffer = rest
            if self._discarding:
                self._discarding = False  # the over-long line ends here
            elif len(line) > MAX_REQUEST_BYTES:
                self._too_long()
            else:
                self.controller.request(line.rstrip(b"\r"))
        if len(self._buffer) > MAX_REQUEST_BYTES:
            self._buffer = b""
            if not self._discarding:
                self._discarding = True
                self._too_long()

    def _too_long(self) -> None:
        self.controller.reply_error(None, UsageError(f"request longer than {MAX_REQUEST_BYTES} bytes; ignored"))

    def readConnectionLost(self) -> None:
        self.controller.shutdown("standard input closed")

    def writeConnectionLost(self) -> None:
        self.controller.shutdown("standard output closed")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.controller.shutdown("standard input closed")
        if not self.closed.called:
            self.closed.callback(None)


class Controller:
    """Runs sessions on request. ``write_line(text)`` sends one JSON line to the console;
    ``say(text)`` a human line to standard error. ``defaults``: session option values
    from the command line; ``ums``: an :class:`IMISource` factory for ``device`` ids
    (``None`` without ``--ums``). :attr:`finished` fires once shutdown completed."""

    def __init__(self, reactor: Any, write_line: Callable[[str], None], say: Callable[[str], None],
                 defaults: SessionOptions, ums: Callable[[str], IMISource] | None,
                 audit: AuditLog | None = None, web: dict[str, Any] | None = None,
                 gateway_trust: dict[str, Any] | None = None) -> None:
        self._reactor = reactor
        self._write_line = write_line
        self._say = say
        self._defaults = defaults
        self._ums = ums
        self._audit = audit
        self._web = web or {}  # --novnc, --web-frame-ancestors, --web-origin of the process
        self._gateway_trust = gateway_trust or {}  # --gateway-ca / --gateway-fingerprint
        self.sessions: dict[str, Shadowing] = {}
        self._listening: dict[str, dict[str, Any]] = {}
        self.finished: Deferred[None] = Deferred()
        self._shutting_down = False

    # ------------------------------------------------------------ output
    def _send(self, payload: dict[str, Any]) -> None:
        self._write_line(json.dumps(payload))

    def reply_error(self, session: str | None, error: SecShadowError) -> None:
        self._send({"event": "error", "session": session, "code": error.code, "message": error.message})
        self._say(f"[{session or '-'}] error: {error.message}")

    # ------------------------------------------------------------ requests
    def request(self, line: bytes) -> None:
        """Serve one request line; any error becomes one ``error`` event and the
        daemon goes on (a bad line never ends the other sessions)."""
        try:
            self._request(line)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the daemon
            self.reply_error(None, SecShadowError(f"internal error serving a request: {type(e).__name__}"))

    def _request(self, line: bytes) -> None:
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            self.reply_error(None, UsageError("a request must be one JSON object per line"))
            return
        if not isinstance(request, dict):
            self.reply_error(None, UsageError("a request must be a JSON object"))
            return
        op = request.get("op")
        session = request.get("session")
        try:
            if op == "open":
                self._open(request)
            elif op == "close":
                self._close(self._known(session))
            elif op == "list":
                self._list()
            elif op == "shutdown":
                self.shutdown("shutdown requested")
            else:
                raise UsageError(f"unknown op {op!r}; use open, close, list or shutdown")
        except SecShadowError as e:
            self.reply_error(session if isinstance(session, str) else None, e)

    def _known(self, session: Any) -> str:
        if not isinstance(session, str) or session not in self.sessions:
            raise UsageError(f"no open session {session!r}")
        return session

    def _open(self, request: dict[str, Any]) -> None:
        if self._shutting_down:
            raise UsageError("shutting down; no new sessions")
        session = request.get("session")
        if not isinstance(session, str) or not _SESSION_ID.match(session):
            raise UsageError("'session' must be 1 to 64 characters from letters, digits and . _ : -")
        if session in self.sessions:
            raise UsageError(f"session {session!r} is already open")
        unknown = sorted(set(request) - _OPEN_KEYS)
        if unknown:
            raise UsageError(f"unknown session option(s): {', '.join(map(str, unknown))}")
        options = SessionOptions.from_mapping({k: request[k] for k in _OPTION_KEYS if k in request},
                                              base=self._defaults)
        source = self._source(request)
        endpoint, viewer = self._viewer_side(request, options)
        dialer = self._dialer(request)

        def on_event(event: events.Event) -> None:
            payload = {**event.as_dict(), "session": session}
            if isinstance(event, events.Listening):
                self._listening[session] = {"host": event.host, "port": event.port}
            self._send(payload)

        shadowing = start_shadowing(self._reactor, source, options, on_event=on_event, viewer=viewer,
                                    viewer_name=_viewer_name(request), viewer_endpoint=endpoint,
                                    dialer=dialer, audit=self._audit)
        self.sessions[session] = shadowing
        self._say(f"[{session}] opened")
        shadowing.done.addErrback(self._failed, session).addBoth(self._ended, session)

    def _source(self, request: dict[str, Any]) -> SecretSource:
        if ("device" in request) == ("secret" in request):
            raise UsageError("give exactly one of 'device' (an IMI id, needs --ums) or 'secret'")
        if "secret" in request:
            return StaticSecret(secret_from_document(request["secret"]))
        if self._ums is None:
            raise UsageError("'device' needs the proxy started with --ums and --ums-user")
        device = request["device"]
        if not isinstance(device, (str, int)) or isinstance(device, bool):
            raise UsageError("'device' must be an IMI id")
        return self._ums(str(device))

    def _dialer(self, request: dict[str, Any]) -> Any:
        """TCP, or the gateway of the request's ``gateway`` / ``gateway_token`` or its secret."""
        from secshadow.gateway.route import RoutedDialer

        url, token = request.get("gateway"), request.get("gateway_token")
        for key, value in (("gateway", url), ("gateway_token", token)):
            if value is not None and not isinstance(value, str):
                raise UsageError(f"'{key}' must be a string")
        return RoutedDialer(self._reactor, url=url, token=token, **self._gateway_trust)

    def _viewer_side(self, request: dict[str, Any], options: SessionOptions) -> tuple[Any, Any]:
        """(viewer endpoint or ``None``, launcher or ``None``) for one ``open`` request."""
        web = request.get("web", False)
        if not isinstance(web, bool):
            raise UsageError("'web' must be true or false")
        if web or request.get("viewer") == "browser":
            if request.get("viewer", "none") not in ("none", "browser") or "viewer_command" in request:
                raise UsageError("'web' serves a browser: use 'viewer': 'browser' or 'none'")
            from secshadow.web.side import browser_side

            return browser_side(self._reactor, options, open_browser=request.get("viewer") == "browser",
                                **self._web)
        return None, self._viewer(request)

    def _viewer(self, request: dict[str, Any]) -> Any:
        name = request.get("viewer", "none")
        command = request.get("viewer_command")
        if command is not None and not isinstance(command, str):
            raise UsageError("'viewer_command' must be a string")
        if not isinstance(name, str):
            raise UsageError("'viewer' must be a viewer name")
        full_screen = request.get("full_screen", False)
        if not isinstance(full_screen, bool):
            raise UsageError("'full_screen' must be true or false")
        return make_launcher(self._reactor, name, command=command, view_only=request.get("view_only") is True,
                             full_screen=full_screen)

    def _close(self, session: str) -> None:
        self.sessions[session].stop("closed by the console")

    def _list(self) -> None:
        listing = [
            {"session": name, "state": shadowing.state, "listening": self._listening.get(name)}
            for name, shadowing in sorted(self.sessions.items())
        ]
        self._send({"event": "sessions", "sessions": listing})

    # ------------------------------------------------------------ endings
    def _failed(self, failure: Failure, session: str) -> None:
        value = failure.value
        if isinstance(value, SecShadowError):
            self.reply_error(session, value)
        else:
            self.reply_error(session, SecShadowError(
                f"internal error: {type(value).__name__}: {failure.getErrorMessage()}"))

    def _ended(self, result: Any, session: str) -> None:
        self.sessions.pop(session, None)
        self._listening.pop(session, None)
        self._say(f"[{session}] ended")
        if self._shutting_down and not self.sessions and not self.finished.called:
            self.finished.callback(None)

    def shutdown(self, reason: str) -> Deferred[None]:
        """Stop every session (each reports ``closed``); :attr:`finished` fires after."""
        if not self._shutting_down:
            self._shutting_down = True
            self._say(f"shutting down ({reason}); {len(self.sessions)} session(s) open")
            for shadowing in list(self.sessions.values()):
                shadowing.stop(reason)
            if not self.sessions and not self.finished.called:
                self.finished.callback(None)
        return self.finished


def _viewer_name(request: dict[str, Any]) -> str:
    """The viewer's name for the audit record."""
    if request.get("viewer_command"):
        return "custom"
    if request.get("web") is True:
        return "browser"
    return str(request.get("viewer", "none"))


def serve_stdio(reactor: Any, controller_factory: Callable[[Callable[[str], None]], Controller]
                ) -> tuple[Controller, Callable[[], Deferred[None]]]:
    """Attach a :class:`Controller` to this process's standard input and output.

    Returns the controller and a function that, once the controller has finished,
    flushes standard output and fires when it is closed.
    """
    holder: dict[str, Any] = {}

    def write_line(text: str) -> None:
        holder["transport"].write(text.encode("utf-8") + b"\n")

    controller = controller_factory(write_line)
    protocol = _Requests(controller)
    holder["transport"] = StandardIO(protocol, reactor=reactor)

    def close() -> Deferred[None]:
        holder["transport"].loseConnection()
        return protocol.closed

    return controller, close
