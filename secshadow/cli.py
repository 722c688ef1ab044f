"""``secshadow-proxy``: the command line consoles drive (contract: ``docs/cli.md``).

Human-readable progress goes to standard error; with ``--json`` one JSON event per
line goes to standard output. The exit status is the contract's (0 ended normally,
2 usage, 3 ums, 4 device-unreachable, 5 tls-handshake, 6 pin-mismatch,
7 device-rejected, 8 viewer, 1 internal). This is the only module that touches the
global reactor, through :func:`twisted.internet.task.react`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import IO, Any, NoReturn, Sequence

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import provider

from secshadow import __version__, events
from secshadow.api import IMISource, SecretSource, StaticSecret, start_shadowing
from secshadow.hygiene import make_undumpable
from secshadow.errors import SecretError, SecShadowError, UsageError, ViewerError
from secshadow.observe import OneShot
from secshadow.options import SessionOptions, count, port_number, seconds
from secshadow.pinning import TLSProfile
from secshadow.procy import TERMINATORS, terminator_bytes
from secshadow.proxy import ViewerHandle, ViewerLauncher
from secshadow.secret import load_secret
from secshadow.viewers import VIEWERS, make_launcher, validate_template

PROG = "secshadow-proxy"
UMS_PASSWORD_ENV = "SECSHADOW_UMS_PASSWORD"  # noqa: S105 - a variable name


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(_redact_unrecognized(message))


def _redact_unrecognized(message: str) -> str:
    """argparse quotes unrecognised arguments; a password put on argv by mistake
    (``--ums-password X``) must not travel on into an error event or a log. Option
    names stay; everything else becomes ``<value>``."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    shown = [token.split("=", 1)[0] + ("=<value>" if "=" in token else "") if token.startswith("-")
             else "<value>" for token in message[len(prefix):].split()]
    return f"unrecognized arguments: {' '.join(shown)} (values not shown: they may hold a secret)"


def _flag_type(check: Any, name: str, **kw: Any) -> Any:
    """An argparse type from one of :mod:`secshadow.options`' validators, so flags,
    control mode and the API share one check and one message."""
    def parse(text: str) -> Any:
        try:
            return check(name, text, **kw)
        except UsageError as e:
            raise argparse.ArgumentTypeError(e.message) from None
    return parse


def _positive(name: str, allow_zero: bool = False) -> Any:
    return _flag_type(seconds, name, allow_zero=allow_zero)


def _count(name: str) -> Any:
    return _flag_type(count, name)


_port = _flag_type(port_number, "--device-port")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Secure VNC shadowing of a managed thin client: fetch its shadow secret, open a "
                    "pinned TLS tunnel, send PROCYCMD, and give a VNC viewer a local port.",
        epilog="Exit codes: 0 ok, 1 internal, 2 usage, 3 ums, 4 device-unreachable, 5 tls-handshake, "
               "6 pin-mismatch, 7 device-rejected, 8 viewer. See docs/cli.md.",
    )
    src = parser.add_argument_group("where the shadow secret comes from (one of)")
    src.add_argument("--ums", metavar="URL", help="IMI server base URL, e.g. https://ums.example:8443")
    src.add_argument("--device", metavar="ID", help="the thin client's IMI id (with --ums)")
    src.add_argument("--ums-user", metavar="NAME", help="IMI user")
    src.add_argument("--ums-password-file", metavar="FILE",
                     help=f"file holding the IMI password (else ${UMS_PASSWORD_ENV}); never on argv")
    trust = src.add_mutually_exclusive_group()
    trust.add_argument("--ums-ca", metavar="FILE", help="CA or certificate PEM that signs the UMS web certificate")
    trust.add_argument("--ums-fingerprint", metavar="HEX", help="SHA-256 fingerprint of the UMS web certificate")
    trust.add_argument("--ums-insecure", action="store_true",
                       help="do not verify the UMS certificate (dangerous; warned about)")
    src.add_argument("--secret-file", metavar="FILE",
                     help="read the secret as JSON from FILE, or standard input for '-'")

    dev = parser.add_argument_group("the device and the tunnel")
    dev.add_argument("--device-host", metavar="HOST", help="device address (default: lastIP/host from the secret)")
    dev.add_argument("--device-port", metavar="PORT", type=_port, help="device TLS port (default 5900)")
    dev.add_argument("--tls-profile", choices=[p.value for p in TLSProfile], default="modern")
    dev.add_argument("--procy-terminator", choices=list(TERMINATORS), default="none")
    dev.add_argument("--listen", metavar="ENDPOINT", default="tcp:0:interface=127.0.0.1",
                     help="Twisted server endpoint for the viewer's side (default: loopback, any free port)")
    dev.add_argument("--connect-timeout", metavar="S", type=_positive("--connect-timeout"), default=15.0)
    dev.add_argument("--viewer-timeout", metavar="S", type=_positive("--viewer-timeout"), default=60.0)
    dev.add_argument("--hello-timeout", metavar="S", type=_positive("--hello-timeout"), default=60.0)
    dev.add_argument("--idle-timeout", metavar="S", type=_positive("--idle-timeout", allow_zero=True),
                     default=0.0)
    dev.add_argument("--max-viewers", metavar="N", type=_count("--max-viewers"), default=1,
                     help="serve up to N viewers one after another, each with a fresh one-time "
                          "password from the UMS (needs --ums; default 1)")

    gw = parser.add_argument_group("through a gateway relay (docs/gateway.md)")
    gw.add_argument("--gateway", metavar="URL",
                    help="reach the device through a gateway: the console's WebSocket URL, e.g. "
                         "wss://gw.example/v1/sessions/S1/console (a secret may name it as 'gateway')")
    gw.add_argument("--gateway-token-file", metavar="FILE", help="the console's gateway token (a JWT); never on argv")
    gw_trust = gw.add_mutually_exclusive_group()
    gw_trust.add_argument("--gateway-ca", metavar="FILE", help="CA or certificate PEM of the gateway's web certificate")
    gw_trust.add_argument("--gateway-fingerprint", metavar="HEX", help="SHA-256 fingerprint of the gateway's certificate")

    view = parser.add_argument_group("the viewer")
    view.add_argument("--viewer", metavar="NAME", default="auto",
                      help=f"auto, none, browser, or one of: {', '.join(VIEWERS)}")
    view.add_argument("--viewer-command", metavar="TEMPLATE",
                      help="custom viewer command with {host} {port} {display} {title}")
    view.add_argument("--view-only", action="store_true",
                      help="view-only, enforced by the proxy: keyboard, pointer, clipboard and desktop-size "
                           "messages never reach the device, whatever the viewer (the viewer is also "
                           "asked for its own view-only mode where it has one)")
    view.add_argument("--full-screen", action="store_true", help="ask the viewer for full-screen mode")
    view.add_argument("--snapshot", metavar="FILE",
                      help="instead of a viewer, save one full frame through the tunnel as PNG and exit")
    view.add_argument("--json", action="store_true", help="JSON events on standard output, one per line")
    web = parser.add_argument_group("the browser (--web, --viewer browser; docs/web.md)")
    web.add_argument("--web", action="store_true",
                     help="serve a browser instead of raw RFB: a page with noVNC and RFB over a WebSocket; "
                          "the 'listening' event gains 'url' and 'websocket' (single-use token, 60 s)")
    web.add_argument("--novnc", metavar="DIR", help="where noVNC (npm @novnc/novnc) is installed "
                     "(default: $SECSHADOW_NOVNC, then the place bin/setup-debian installs it)")
    web.add_argument("--web-frame-ancestors", metavar="ORIGINS",
                     help="origins allowed to embed the page in a frame (CSP frame-ancestors; default: none)")
    web.add_argument("--web-origin", metavar="ORIGIN", action="append", default=[],
                     help="another Origin allowed to open the WebSocket (a console running its own noVNC); "
                          "repeatable")
    parser.add_argument("--control", choices=["stdio"],
                        help="long-running mode: JSON-lines requests on stdin open and close many sessions "
                             "(see docs/cli.md, Control mode)")
    parser.add_argument("--audit", metavar="FILE",
                        help="append one JSON line per session to FILE (created with mode 0600; docs/cli.md)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages on standard error")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on standard error")
    return parser


class Output:
    """Where events and messages go: JSON on stdout (``--json``), words on stderr."""

    def __init__(self, json_events: bool, stdout: IO[str], stderr: IO[str], quiet: bool = False) -> None:
        self.json_events = json_events
        self.stdout = stdout
        self.stderr = stderr
        self.quiet = quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            self.stderr.write(f"{PROG}: {text}\n")
            self.stderr.flush()

    def warn(self, text: str) -> None:
        self.stderr.write(f"{PROG}: warning: {text}\n")
        self.stderr.flush()

    def event(self, event: events.Event) -> None:
        if self.json_events:
            self.stdout.write(json.dumps(event.as_dict(), sort_keys=False) + "\n")
            self.stdout.flush()
        text = describe(event)
        if isinstance(event, events.Error):
            self.stderr.write(f"{PROG}: error: {text}\n")
            self.stderr.flush()
        elif isinstance(event, events.WarningEvent):
            self.warn(text)
        elif text:
            self.say(text)


def describe(event: events.Event) -> str:
    """One human sentence per event."""
    match event:
        case events.SecretLoaded():
            return (f"shadow secret from {event.source}: device {event.device_host}:{event.device_port}, "
                    f"certificate SHA-256 {event.certificate_sha256}")
        case events.Pinned():
            return f"TLS to the device is up and pinned ({event.tls_version}, {event.cipher})"
        case events.Listening():
            return f"viewer port open on {event.host}:{event.port}"
        case events.ViewerStarted():
            return f"started viewer {event.viewer} (pid {event.pid})"
        case events.ViewerConnected():
            return f"viewer connected from {event.peer}; sending PROCYCMD"
        case events.DeviceAccepted():
            return f"the device accepted the password ({event.rfb_version}); relaying"
        case events.Closed():
            return (f"session closed: {event.reason} ({event.bytes_to_viewer} bytes to the viewer, "
                    f"{event.bytes_to_device} to the device, {event.duration_s:.1f} s)")
        case events.Error():
            return event.message
        case events.WarningEvent():
            return event.message
    return ""


def _start_logging(output: Output, verbose: bool) -> None:
    """Library log lines go to stderr: ours at info (debug with -v), Twisted's at warn."""

    @provider(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace", "")
        level = event.get("log_level", LogLevel.info)
        ours = namespace.startswith("secshadow")
        if not ours and level < LogLevel.warn:
            return
        if output.quiet and level < LogLevel.warn:
            return
        text = formatEvent(event)
        if event.get("log_failure") is not None and verbose:
            text += "\n" + event["log_failure"].getTraceback()
        output.stderr.write(f"{PROG}: {text}\n")
        output.stderr.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug if verbose else LogLevel.info)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])],
                                     redirectStandardIO=False, discardBuffer=True)


def _read_ums_password(args: argparse.Namespace) -> str:
    if args.ums_password_file:
        try:
            with open(args.ums_password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as e:
            raise UsageError(f"cannot read --ums-password-file: {e.strerror}") from None
    else:
        password = os.environ.get(UMS_PASSWORD_ENV, "")
    if not password:
        raise UsageError(f"no UMS password: use --ums-password-file FILE or set ${UMS_PASSWORD_ENV}")
    return password


def _check_control_arguments(args: argparse.Namespace) -> None:
    for flag, value in (("--secret-file", args.secret_file), ("--device", args.device),
                        ("--snapshot", args.snapshot), ("--viewer-command", args.viewer_command)):
        if value:
            raise UsageError(f"{flag} does not apply to --control stdio: give it per session in the 'open' request")
    if args.ums is not None and not args.ums_user:
        raise UsageError("--ums needs --ums-user")
    if args.ums is not None and args.ums.lower().startswith("http://") and not args.ums_insecure:
        raise UsageError("--ums uses plain http://, which would carry the device password and "
                         "the IMI password unencrypted; use https:// (or, knowingly, --ums-insecure)")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.control:
        _check_control_arguments(args)
        return
    from_ums = args.ums is not None or args.device is not None
    if from_ums and args.secret_file is not None:
        raise UsageError("give either --ums/--device or --secret-file, not both")
    if not from_ums and args.secret_file is None:
        raise UsageError("no shadow secret: give --ums URL --device ID, or --secret-file FILE")
    if from_ums:
        if not args.ums or not args.device:
            raise UsageError("--ums and --device go together")
        if not args.ums_user:
            raise UsageError("--ums needs --ums-user")
        if args.ums.lower().startswith("http://") and not args.ums_insecure:
            raise UsageError("--ums uses plain http://, which would carry the device password and "
                             "the IMI password unencrypted; use https:// (or, knowingly, --ums-insecure)")
    elif args.ums_user or args.ums_ca or args.ums_fingerprint or args.ums_insecure or args.ums_password_file:
        raise UsageError("--ums-user/--ums-ca/--ums-fingerprint/--ums-insecure/--ums-password-file need --ums")
    explicit_viewer = args.viewer != "auto"
    if args.web and args.viewer not in ("auto", "none", "browser"):
        raise UsageError(f"--web serves a browser, not --viewer {args.viewer}: use --viewer browser or --viewer none")
    if args.web and (args.snapshot or args.viewer_command):
        raise UsageError("--web serves a browser: it does not go with --snapshot or --viewer-command")
    if args.web and args.viewer == "auto":
        args.viewer = "none"  # --web alone: the console opens the page itself
    if sum((bool(args.snapshot), bool(args.viewer_command), explicit_viewer)) > 1:
        raise UsageError("choose one of --viewer NAME, --viewer-command TEMPLATE or --snapshot FILE")
    if args.viewer_command:
        validate_template(args.viewer_command)
    if args.max_viewers > 1 and not from_ums:
        raise UsageError("--max-viewers above 1 needs --ums: the one-time password of a --secret-file "
                         "works once, and every further viewer needs a fresh one from the UMS")


def _secret_source(reactor: Any, args: argparse.Namespace, output: Output, stdin: IO[bytes]) -> SecretSource:
    """A :class:`StaticSecret` from ``--secret-file`` (read now, at most 1 MiB), or an
    :class:`IMISource` for ``--ums`` (each fetch logs in and gets a fresh password)."""
    if args.secret_file is not None:
        if args.secret_file == "-":  # noqa: S105 - standard input
            data = stdin.read(1024 * 1024 + 1)
        else:
            try:
                with open(args.secret_file, "rb") as f:
                    data = f.read(1024 * 1024 + 1)
            except OSError as e:
                raise UsageError(f"cannot read --secret-file: {e.strerror}") from None
        if len(data) > 1024 * 1024:
            raise SecretError("the shadow secret is larger than 1 MiB")
        return StaticSecret(load_secret(data))

    password, trust = _imi_access(args, output)
    output.say(f"fetching the shadow secret of device {args.device} from {args.ums}")
    return IMISource(reactor, args.ums, args.device, args.ums_user, password, trust)


def _imi_access(args: argparse.Namespace, output: Output) -> tuple[str, Any]:
    """The IMI password (file or environment) and the UMS trust the flags ask for."""
    from secshadow.umstrust import UMSTrust

    password = _read_ums_password(args)
    trust = UMSTrust.from_flags(args.ums_ca, args.ums_fingerprint, args.ums_insecure)
    if args.ums_insecure:
        output.event(events.WarningEvent(
            message="--ums-insecure: the UMS certificate is NOT verified; anyone on the path can read "
                    "the device password and substitute the device certificate"))
    return password, trust


def _audit_log(args: argparse.Namespace) -> Any:
    """``--audit FILE`` opened now (bad paths fail before a password is fetched)."""
    if not args.audit:
        return None
    from secshadow.audit import AuditLog

    return AuditLog(args.audit)


def _viewer_name(args: argparse.Namespace) -> str:
    """The viewer's name for the audit record."""
    if args.snapshot:
        return "snapshot"
    if args.viewer_command:
        return "custom"
    if args.web and args.viewer == "none":
        return "browser"
    return str(args.viewer)


def session_options(args: argparse.Namespace) -> SessionOptions:
    """The :class:`SessionOptions` the flags ask for."""
    return SessionOptions(
        device_host=args.device_host, device_port=args.device_port,
        tls_profile=TLSProfile.parse(args.tls_profile), terminator=terminator_bytes(args.procy_terminator),
        listen=args.listen, connect_timeout=args.connect_timeout, viewer_timeout=args.viewer_timeout,
        hello_timeout=args.hello_timeout, idle_timeout=args.idle_timeout, max_viewers=args.max_viewers,
        view_only=args.view_only,
    )


class SnapshotViewer:
    """A "viewer" that is an in-process RFB client saving one frame as PNG."""

    name = "snapshot"
    pid: int | None = None

    def __init__(self, reactor: Any, host: str, port: int, path: str, timeout: float) -> None:
        from secshadow.snapshot import take_snapshot

        self.error: BaseException | None = None
        self.size: tuple[int, int] | None = None
        self._ended: OneShot[int | None] = OneShot()
        self._running = take_snapshot(reactor, host, port, path, timeout=timeout)
        self._running.addCallbacks(self._ok, self._failed)

    def _ok(self, size: tuple[int, int]) -> None:
        self.size = size
        self._ended.fire(0)

    def _failed(self, failure: Any) -> None:
        self.error = failure.value
        self._ended.fire(1)

    def wait(self) -> Deferred[int | None]:
        return self._ended.when_done()

    def terminate(self, grace: float = 0) -> Deferred[None]:
        if not self._ended.done:
            self._running.cancel()
        return self.wait().addCallback(lambda _: None)


def device_dialer(reactor: Any, args: argparse.Namespace) -> Any:
    """The device side: TCP, or the gateway of ``--gateway`` / the secret (checked now)."""
    from secshadow.gateway.route import RoutedDialer

    token = None
    if args.gateway_token_file:
        from secshadow.gateway.tokens import read_token_file

        token = read_token_file(args.gateway_token_file, what="--gateway-token-file")
    return RoutedDialer(reactor, url=args.gateway, token=token, ca_file=args.gateway_ca,
                        fingerprint=args.gateway_fingerprint)


def _viewer_side(reactor: Any, args: argparse.Namespace, options: SessionOptions,
                 holder: dict[str, Any]) -> tuple[Any, ViewerLauncher | None]:
    """(viewer endpoint or ``None`` for ``--listen``, viewer launcher or ``None``),
    checked now: a missing viewer or noVNC, or a bad endpoint, fails before a one-time
    password is fetched."""
    if args.web or args.viewer == "browser":
        from secshadow.web.side import browser_side

        return browser_side(reactor, options, open_browser=args.viewer == "browser", novnc=args.novnc,
                            frame_ancestors=args.web_frame_ancestors, origins=args.web_origin)
    try:
        serverFromString(reactor, options.listen)
    except Exception as e:  # noqa: BLE001 - parsers raise anything (ssl: reads files); all mean "bad flag"
        raise UsageError(f"--listen {options.listen!r} is not a server endpoint: {e}") from None
    return None, _make_launcher(reactor, args, holder)


def _make_launcher(reactor: Any, args: argparse.Namespace, holder: dict[str, Any]) -> ViewerLauncher | None:
    if args.snapshot:
        def snapshot(host: str, port: int) -> ViewerHandle:
            viewer = SnapshotViewer(reactor, host, port, args.snapshot, timeout=args.hello_timeout + 30)
            holder["snapshot"] = viewer
            return viewer
        return snapshot
    return make_launcher(reactor, args.viewer, command=args.viewer_command, view_only=args.view_only,
                         full_screen=args.full_screen, title=lambda: holder.get("title", "secshadow"))


async def run(reactor: Any, argv: Sequence[str], stdin: IO[bytes], stdout: IO[str], stderr: IO[str],
              install_signals: bool = True, start_logging: bool = True) -> int:
    """The whole command; returns the exit status. Never raises."""
    output = Output("--json" in argv, stdout, stderr)
    try:
        args = build_parser().parse_args(list(argv))
        output = Output(args.json, stdout, stderr, quiet=args.quiet)
        if args.version:
            stdout.write(f"{PROG} {__version__}\n")
            stdout.flush()
            return 0
        if start_logging:
            _start_logging(output, args.verbose)
        _check_arguments(args)
        if args.control:
            return await _run_control(reactor, args, output, install_signals)
        return await _run_checked(reactor, args, output, stdin, install_signals)
    except SecShadowError as e:
        output.event(events.Error(code=e.code, message=e.message))
        return e.exit_code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - the contract's exit 1, with a hint where to look
        output.event(events.Error(code="internal", message=f"internal error: {type(e).__name__}: {e}"))
        if os.environ.get("SECSHADOW_DEBUG"):
            traceback.print_exc(file=stderr)
        return 1


async def _run_checked(reactor: Any, args: argparse.Namespace, output: Output, stdin: IO[bytes],
                       install_signals: bool) -> int:
    stopping: dict[str, Any] = {"reason": None, "shadowing": None}

    def stop(reason: str) -> None:
        stopping["reason"] = reason
        if stopping["shadowing"] is not None:
            stopping["shadowing"].stop(reason)

    if install_signals:
        _install_signals(reactor, stop)

    # Check everything that can be checked before a one-time password is fetched
    # (each fetch spends one): the viewer and the listener endpoint.
    holder: dict[str, Any] = {}
    options = session_options(args)
    endpoint, launcher = _viewer_side(reactor, args, options, holder)
    dialer = device_dialer(reactor, args)
    audit = _audit_log(args)

    def on_event(event: events.Event) -> None:
        if isinstance(event, events.SecretLoaded):
            holder["title"] = f"secshadow: {event.device_host}"
        output.event(event)

    source = _secret_source(reactor, args, output, stdin)
    if args.viewer == "none" and not args.snapshot and not args.viewer_command:
        output.say("--viewer none: connect your viewer to the port in the 'listening' event")
    shadowing = start_shadowing(reactor, source, options, on_event=on_event, viewer=launcher,
                                viewer_name=_viewer_name(args), viewer_endpoint=endpoint, dialer=dialer,
                                audit=audit)
    stopping["shadowing"] = shadowing
    if stopping["reason"]:
        shadowing.stop(stopping["reason"])
    try:
        await shadowing.done
    finally:
        if audit is not None:
            audit.close()
    snapshot: SnapshotViewer | None = holder.get("snapshot")
    if snapshot is not None and stopping["reason"] is None:
        if snapshot.error is not None:
            # str() of some exceptions is empty (CancelledError): never end on "failed: ".
            raise ViewerError(f"--snapshot failed: {str(snapshot.error) or type(snapshot.error).__name__}")
        if snapshot.size is None:
            raise ViewerError("--snapshot: the session ended before a full frame arrived")
        output.say(f"saved a {snapshot.size[0]}x{snapshot.size[1]} snapshot to {args.snapshot}")
    return 0


def _install_signals(reactor: Any, stop: Any) -> None:
    """Our SIGINT/SIGTERM handlers replace Twisted's (which just stop the reactor) once
    it runs, so a signal closes sessions cleanly and reports it."""

    def on_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop, f"interrupted by {signal.Signals(signum).name}")

    def install() -> None:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    reactor.callLater(0, install)


async def _run_control(reactor: Any, args: argparse.Namespace, output: Output, install_signals: bool) -> int:
    """``--control stdio``: serve JSON-lines requests until shutdown or end of input."""
    from secshadow.control import Controller, serve_stdio
    from secshadow.hygiene import DESCRIPTORS_PER_SESSION, raise_descriptor_limit

    soft, _ = raise_descriptor_limit()
    output.say(f"control mode: up to about {soft // DESCRIPTORS_PER_SESSION} sessions at once "
               f"(file descriptor limit {soft})")

    ums = None
    if args.ums is not None:
        password, trust = _imi_access(args, output)

        def ums(device: str) -> IMISource:
            return IMISource(reactor, args.ums, device, args.ums_user, password, trust)

    defaults = session_options(args)
    audit = _audit_log(args)
    controller, close = serve_stdio(
        reactor, lambda write: Controller(reactor, write, output.say, defaults, ums, audit=audit, web={
            "novnc": args.novnc, "frame_ancestors": args.web_frame_ancestors, "origins": args.web_origin},
            gateway_trust={"ca_file": args.gateway_ca, "fingerprint": args.gateway_fingerprint}))
    if install_signals:
        _install_signals(reactor, controller.shutdown)
    output.say("control mode: reading JSON requests on standard input")
    await controller.finished
    await close()
    if audit is not None:
        audit.close()
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    from twisted.internet import task

    arguments = sys.argv[1:] if argv is None else list(argv)
    if not make_undumpable():
        # Before any secret is read: no core file, no same-user ptrace of this process.
        sys.stderr.write(f"{PROG}: warning: could not disable core dumps for this process; a crash could "
                         "write the passwords it holds to a core file\n")

    def go(reactor: Any) -> Deferred[int]:
        return ensureDeferred(run(reactor, arguments, sys.stdin.buffer, sys.stdout, sys.stderr))

    def react_main(reactor: Any) -> Deferred[None]:
        def exit_with(code: int) -> None:
            raise SystemExit(code)
        return go(reactor).addCallback(exit_with)

    task.react(react_main)
    raise SystemExit(1)  # pragma: no cover - react() always exits


if __name__ == "__main__":
    main()
