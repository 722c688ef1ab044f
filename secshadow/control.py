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
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.stdio import StandardIO
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from secshadow import events
from secshadow.api import IMISource, SecretSource, Shadowing, StaticSecret, start_shadowing
from secshadow.errors import SecShadowError, UsageError
from secshadow.pinning import TLSProfile
from secshadow.procy import terminator_bytes
from secshadow.secret import parse_host, secret_from_document
from secshadow.viewers import launch, resolve_viewer, template_argv, viewer_argv

#: A console's session id: short, printable, safe in logs.
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: Longest request line accepted (a secret with a PEM certificate is a few KiB).
MAX_REQUEST_BYTES = 256 * 1024

_OPTION_FIELDS: dict[str, Callable[[Any], Any]] = {
    "tls_profile": lambda v: TLSProfile.parse(str(v)),
    "procy_terminator": lambda v: terminator_bytes(str(v)),
    "listen": str,
    "connect_timeout": float,
    "viewer_timeout": float,
    "hello_timeout": float,
    "idle_timeout": float,
    "max_viewers": int,
}


@implementer(IHalfCloseableProtocol)
class _Requests(LineOnlyReceiver):
    """Reads requests from standard input. End of input means shutdown, but standard
    output stays open (half-close) until every session reported its end."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST_BYTES

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.closed: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.controller.request(line)

    def lineLengthExceeded(self, line: bytes) -> None:
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
                 defaults: dict[str, Any], ums: Callable[[str], IMISource] | None,
                 device_host: str | None = None, device_port: int | None = None) -> None:
        self._reactor = reactor
        self._write_line = write_line
        self._say = say
        self._defaults = defaults
        self._ums = ums
        self._device_host, self._device_port = device_host, device_port
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
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
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
        source = self._source(request)
        options = dict(self._defaults)
        for key, convert in _OPTION_FIELDS.items():
            if key in request:
                try:
                    options[key] = convert(request[key])
                except (TypeError, ValueError):
                    raise UsageError(f"bad value for {key!r}") from None
        if "procy_terminator" in options:
            options["terminator"] = options.pop("procy_terminator")
        host = request.get("device_host", self._device_host)
        if host is not None:
            host = parse_host(host, "'device_host'")
        port = request.get("device_port", self._device_port)
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
            raise UsageError("'device_port' must be a number from 1 to 65535")
        viewer = self._viewer(request)

        def on_event(event: events.Event) -> None:
            payload = {**event.as_dict(), "session": session}
            if isinstance(event, events.Listening):
                self._listening[session] = {"host": event.host, "port": event.port}
            self._send(payload)

        shadowing = start_shadowing(self._reactor, source, on_event=on_event, viewer=viewer,
                                    device_host=host, device_port=port, **options)
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

    def _viewer(self, request: dict[str, Any]) -> Any:
        name = request.get("viewer", "none")
        command = request.get("viewer_command")
        if command is not None:
            if not isinstance(command, str):
                raise UsageError("'viewer_command' must be a string")
            template_argv(command, "127.0.0.1", 5900)  # validates now, not at launch
            return lambda host, port: launch(self._reactor, "custom", template_argv(command, host, port))
        if name == "none":
            return None
        if not isinstance(name, str):
            raise UsageError("'viewer' must be a viewer name")
        view_only = bool(request.get("view_only", False))
        full_screen = bool(request.get("full_screen", False))
        spec = resolve_viewer(name, view_only=view_only)
        return lambda host, port: launch(self._reactor, spec.name, viewer_argv(
            spec, host, port, view_only=view_only, full_screen=full_screen))

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
