"""Command lines: ``secshadow-gateway`` and ``secshadow-agent``.

``secshadow-gateway --listen ENDPOINT (--tls-cert PEM --tls-key PEM | --plaintext)
--token-key PUB.pem [--token-key ...] [--pairing-timeout S] [limits] [--json]``

With ``--json`` standard output carries one JSON object per line (flushed)::

    {"event": "gateway-listening", "host": "0.0.0.0", "port": 8443, "tls": true}
    {"event": "refused", "sid": "S1", "role": "console", "status": 401, "reason": "token expired", "peer": "tcp4:..."}
    {"event": "paired", "sid": "S1", "wait_s": 0.42}
    {"event": "closed", "sid": "S1", "paired": true, "duration_s": 12.5, "bytes_console_to_device": 789,
     "bytes_device_to_console": 123456, "close_code": 1000, "closed_by": "console", "reason": "closed"}

Logs go to standard error; no line ever holds a token. Exit status: 0 after
SIGINT/SIGTERM, 2 for bad flags or files, 1 when it cannot listen.

``secshadow-agent --gateway URL --token-file FILE --target HOST:PORT
[--gateway-ca FILE | --gateway-fingerprint HEX] [--json]``: one session (see
:mod:`secshadow.gateway.agent`); events ``paired``, ``target-connected``, ``closed``, or
``error`` with a ``code``. Exit status: 0 after the session ran, 9 gateway failure
(unreachable, certificate, token refused, pairing timeout), 4 target unreachable,
2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from secshadow.errors import SecShadowError, UsageError
from secshadow.events import Event


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _start_logging(prog: str) -> None:
    import txaio

    txaio.use_twisted()
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
    )

    def format_line(event: dict[str, Any]) -> str | None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        return f"{prog}: {text}\n"

    # autobahn logs the raw upgrade request (Authorization header included) at debug
    # level only: keep every logger at info.
    txaio.set_global_log_level("info")  # type: ignore[attr-defined]
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    # autobahn repeats every refusal and close in its own words; ours carry the session.
    predicate.setLogLevelForNamespace("autobahn", LogLevel.error)
    observer: Any = FilteringLogObserver(FileLogObserver(sys.stderr, format_line), [predicate])
    # redirectStandardIO=False: standard output is reserved for the JSON lines.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _raise_fd_limit() -> None:
    """A gateway holds two sockets per session: use the hard limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# -- secshadow-gateway ---------------------------------------------------------------

GATEWAY = "secshadow-gateway"


def gateway_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=GATEWAY,
        description="The secshadow-relay/1 gateway: pairs a console and a device leg per session id and "
                    "relays their (end-to-end TLS) bytes without reading them.",
    )
    p.add_argument("--listen", default="tcp:8443", metavar="ENDPOINT",
                   help="Twisted stream server endpoint, TLS added on top (default: %(default)s)")
    p.add_argument("--tls-cert", metavar="PEM", help="the gateway's certificate chain, PEM, leaf first")
    p.add_argument("--tls-key", metavar="PEM", help="its private key, unencrypted PEM")
    p.add_argument("--plaintext", action="store_true",
                   help="no TLS: ONLY behind a TLS-terminating load balancer on a private network; "
                        "tokens then cross that network in clear")
    p.add_argument("--token-key", action="append", default=[], metavar="PUB.pem",
                   help="Ed25519 public key that signs leg tokens (repeat for key rotation); required")
    p.add_argument("--pairing-timeout", type=float, default=60.0, metavar="S",
                   help="how long the first leg waits for the second, seconds (default: %(default)g)")
    p.add_argument("--ping-interval", type=float, default=20.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="drop a leg silent this long, seconds (default: %(default)g)")
    p.add_argument("--max-sessions", type=int, default=10_000, metavar="N",
                   help="sessions at once, waiting or paired; beyond: 503 (default: %(default)d)")
    p.add_argument("--max-connections", type=int, default=0, metavar="N",
                   help="WebSocket connections at once, handshakes included (default: 2 x sessions + 64)")
    p.add_argument("--max-session-duration", type=float, default=12 * 3600.0, metavar="S",
                   help="end a session after S seconds with 4410; 0: never (default: %(default)g)")
    p.add_argument("--max-session-bytes", type=int, default=0, metavar="N",
                   help="end a session after N payload bytes with 4413; 0: no limit (default)")
    p.add_argument("--max-token-lifetime", type=float, default=3600.0, metavar="S",
                   help="refuse tokens valid for longer than S seconds from now (default: %(default)g)")
    p.add_argument("--port-file", metavar="FILE", help="write the listening port number to FILE")
    p.add_argument("--json", action="store_true", help="JSON events on standard output, one per line")
    return p


def _gateway_setup(args: argparse.Namespace, reactor: Any) -> tuple[Any, Any]:
    from secshadow.gateway.pairing import GatewayListening
    from secshadow.gateway.server import Gateway, GatewayOptions, server_tls
    from secshadow.gateway.tokens import TokenVerifier, load_public_keys

    if args.listen.split(":", 1)[0].lower() in ("ssl", "tls"):
        raise UsageError("--listen takes a plain stream endpoint (e.g. tcp:8443); TLS comes from --tls-cert/--tls-key")
    if args.plaintext and (args.tls_cert or args.tls_key):
        raise UsageError("give either --tls-cert/--tls-key or --plaintext, not both")
    if not args.plaintext and not (args.tls_cert and args.tls_key):
        raise UsageError("give --tls-cert PEM and --tls-key PEM (or --plaintext behind a TLS-terminating front)")
    if not args.max_token_lifetime > 0:
        raise UsageError("--max-token-lifetime must be a positive number of seconds")
    keys = load_public_keys(args.token_key)
    tls = None if args.plaintext else server_tls(args.tls_cert, args.tls_key)
    options = GatewayOptions(
        pairing_timeout=args.pairing_timeout,
        ping_interval=args.ping_interval,
        idle_timeout=args.idle_timeout,
        max_sessions=args.max_sessions,
        max_connections=args.max_connections,
        max_duration=args.max_session_duration,
        max_bytes=args.max_session_bytes,
    )

    def on_event(event: Event) -> None:
        if isinstance(event, GatewayListening) and args.port_file:
            # Written before the "gateway-listening" line, so a reader of either finds it.
            tmp = f"{args.port_file}.tmp"
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{event.port}\n")
            os.replace(tmp, args.port_file)  # atomic: a reader never sees half a number
        if args.json:
            _print_json(event.as_dict())

    verifier = TokenVerifier(keys, reactor, max_lifetime=args.max_token_lifetime)
    return Gateway(reactor, verifier, options, on_event), tls


async def _serve_gateway(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.error import CannotListenError

    await deferLater(reactor, 0, lambda: None)  # signal handlers are installed now
    try:
        gateway, tls = _gateway_setup(args, reactor)
    except SecShadowError as e:
        sys.stderr.write(f"{GATEWAY}: error: {e.message}\n")
        raise SystemExit(2) from None
    if tls is None:
        sys.stderr.write(
            f"{GATEWAY}: WARNING: --plaintext: no TLS on this listener. Run it only behind a "
            "TLS-terminating load balancer on a private network.\n"
        )
        if args.json:
            _print_json({"event": "warning", "message": "--plaintext: no TLS on the listener"})
    try:
        await gateway.listen(args.listen, tls)
    except UsageError as e:
        sys.stderr.write(f"{GATEWAY}: error: {e.message}\n")
        raise SystemExit(2) from None
    except (CannotListenError, OSError) as e:
        sys.stderr.write(f"{GATEWAY}: error: cannot listen on {args.listen}: {e}\n")
        raise SystemExit(1) from None
    reactor.addSystemEventTrigger("before", "shutdown", gateway.stop)
    await Deferred()


def gateway_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``secshadow-gateway``."""
    args = gateway_parser().parse_args(argv)
    _raise_fd_limit()
    _start_logging(GATEWAY)
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(_serve_gateway(reactor, args)))


# -- secshadow-agent -----------------------------------------------------------------

AGENT = "secshadow-agent"


def agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=AGENT,
        description="The device-side end of one gateway session: dial the gateway, and once the console "
                    "joined, splice the stream to a device's TLS port.",
    )
    p.add_argument("--gateway", required=True, metavar="URL",
                   help="the device leg's URL, wss://GATEWAY/v1/sessions/{sid}/device")
    p.add_argument("--token-file", required=True, metavar="FILE", help="the device leg's token (a JWT)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the device's TLS port, e.g. 10.0.0.5:5900")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--gateway-ca", metavar="FILE", help="CA/certificate PEM that the gateway's certificate chains to")
    trust.add_argument("--gateway-fingerprint", metavar="HEX", help="SHA-256 of the gateway's certificate")
    p.add_argument("--timeout", type=float, default=90.0, metavar="S",
                   help="how long to wait for the console to join, seconds (default: %(default)g)")
    p.add_argument("--connect-timeout", type=float, default=15.0, metavar="S",
                   help="TCP connect to the target, seconds (default: %(default)g)")
    p.add_argument("--json", action="store_true", help="JSON events on standard output, one per line")
    return p


def parse_host_port(text: str, what: str = "--target") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> ``(host, port)``; raises :class:`UsageError`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{what} wants HOST:PORT with a port from 1 to 65535, got {text!r}")
    return host, int(port)


async def _run_agent(reactor: Any, args: argparse.Namespace) -> None:
    from secshadow.gateway.agent import run_agent
    from secshadow.gateway.dialer import gateway_endpoint, gateway_trust
    from secshadow.gateway.tokens import read_token_file

    await deferLater(reactor, 0, lambda: None)

    def fail(error: SecShadowError) -> None:
        sys.stderr.write(f"{AGENT}: error: {error.message}\n")
        if args.json:
            _print_json({"event": "error", "code": error.code, "message": error.message})
        raise SystemExit(error.exit_code)

    try:
        host, port = parse_host_port(args.target)
        token = read_token_file(args.token_file)
        trust = gateway_trust(args.gateway_ca, args.gateway_fingerprint)
        endpoint = gateway_endpoint(reactor, args.gateway, token, trust, args.timeout)
    except SecShadowError as e:
        fail(e)
    del token

    def on_event(event: Event) -> None:
        if args.json:
            _print_json(event.as_dict())

    sys.stderr.write(f"{AGENT}: dialing {args.gateway}; the console's stream will go to {host}:{port}\n")
    try:
        result = await run_agent(reactor, endpoint, host, port, on_event, args.connect_timeout)
    except SecShadowError as e:
        fail(e)
    sys.stderr.write(f"{AGENT}: session over ({result.reason}): {result.bytes_to_target} bytes to the target, "
                     f"{result.bytes_to_gateway} bytes back, {result.duration_s:.1f} s\n")


def agent_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``secshadow-agent``."""
    args = agent_parser().parse_args(argv)
    _start_logging(AGENT)
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(_run_agent(reactor, args)))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m secshadow.gateway.cli gateway|agent ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gateway"]:
        gateway_main(argv[1:])
    elif argv[:1] == ["agent"]:
        agent_main(argv[1:])
    else:
        sys.stderr.write("usage: python -m secshadow.gateway.cli gateway|agent [options]\n")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
