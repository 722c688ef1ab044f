"""``secshadow-ums``: run the reference IMI server (see :mod:`secshadow.lab.imiserver.server`).

Usage::

    secshadow-ums --config ums.json --generate-cert /tmp/ums [--listen tcp:0:interface=127.0.0.1]
    secshadow-ums --config ums.json --cert cert.pem --key key.pem [--port-file FILE]

``--listen`` takes a Twisted *stream* server endpoint string (default
``tcp:8443:interface=127.0.0.1``; port 0 picks a free port); TLS is always added on
top of it with the given or generated certificate. Progress goes to standard error.
Once listening, one JSON line goes to standard output (flushed)::

    {"event": "listening", "host": "127.0.0.1", "port": 8443, "certificate_sha256": "AA:BB:..."}

Exit status: 0 after SIGINT/SIGTERM, 2 for bad flags or configuration (a message,
never a traceback), 1 when it cannot listen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import FileLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
from twisted.logger import FilteringLogObserver, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory

from secshadow.errors import UsageError
from secshadow.lab.imiserver.server import ConfigError, generate_self_signed, load_config, load_tls, make_site

PROG = "secshadow-ums"
DEFAULT_LISTEN = "tcp:8443:interface=127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A reference IMI (IGEL UMS REST API) server for secshadow.")
    p.add_argument("--config", required=True, metavar="FILE", help="JSON configuration: users and devices")
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ENDPOINT",
        help=f"Twisted stream server endpoint; TLS is added on top (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--cert", metavar="PEM", help="server certificate (PEM)")
    p.add_argument("--key", metavar="PEM", help="server private key (PEM)")
    p.add_argument(
        "--generate-cert",
        metavar="DIR",
        help="create (or reuse) a self-signed certificate for localhost/127.0.0.1 in DIR",
    )
    p.add_argument("--port-file", metavar="FILE", help="write the listening port number to FILE")
    return p


def _format(event: dict[str, Any]) -> str | None:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return f"{PROG}: {text}\n"


def _fail(message: str, code: int) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _write_port_file(path: str, port: int) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="ascii") as f:
        f.write(f"{port}\n")
    os.replace(temporary, path)


async def _serve(reactor: Any, args: argparse.Namespace, site: Any, tls: Any, fingerprint: str) -> None:
    # react() calls this before reactor.run() installs the SIGINT/SIGTERM handlers; wait
    # for the running reactor so a signal right after the "listening" event stops cleanly.
    await deferLater(reactor, 0, lambda: None)
    if args.listen.split(":", 1)[0].lower() == "ssl":
        _fail("--listen takes a plain stream endpoint (e.g. tcp:8443:interface=127.0.0.1); TLS is added "
              "with --cert/--key or --generate-cert", 2)
    try:
        endpoint = serverFromString(reactor, args.listen)
    except (ValueError, TypeError, KeyError) as e:
        _fail(f"bad --listen endpoint {args.listen!r}: {e}", 2)
    factory = TLSMemoryBIOFactory(tls, False, site)
    factory.noisy = False
    try:
        port = await endpoint.listen(factory)
    except (CannotListenError, OSError) as e:
        _fail(f"cannot listen on {args.listen}: {e}", 1)
    address = port.getHost()
    host = getattr(address, "host", None) or str(address)
    number = getattr(address, "port", None)
    print(f"{PROG}: listening on https://{host}:{number}/ (certificate SHA-256 {fingerprint})",
          file=sys.stderr, flush=True)
    if args.port_file and isinstance(number, int):
        try:
            _write_port_file(args.port_file, number)
        except OSError as e:
            _fail(f"cannot write --port-file {args.port_file}: {e.strerror or e}", 2)
    event = {"event": "listening", "host": host, "port": number, "certificate_sha256": fingerprint}
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: print(f"{PROG}: stopping", file=sys.stderr, flush=True)
    )
    # Serve until SIGINT/SIGTERM stops the reactor; react() then exits 0.
    await Deferred()


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``secshadow-ums``)."""
    args = _parser().parse_args(argv)
    try:
        if args.generate_cert and (args.cert or args.key):
            raise ConfigError("give either --generate-cert DIR or --cert and --key, not both")
        if args.generate_cert:
            cert_path, key_path = generate_self_signed(args.generate_cert)
        elif args.cert and args.key:
            cert_path, key_path = args.cert, args.key
        else:
            raise ConfigError("give --cert PEM and --key PEM, or --generate-cert DIR")
        tls, fingerprint = load_tls(cert_path, key_path)
        config = load_config(args.config)
    except UsageError as e:
        print(f"{PROG}: error: {e.message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

    # (mypy-zope does not see Twisted's @implementer here; the types are right at runtime.)
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    observer: Any = FileLogObserver(sys.stderr, _format)
    filtered: Any = FilteringLogObserver(observer, [predicate])
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
    from twisted.internet import reactor
    from twisted.internet.task import react

    site = make_site(config, reactor)  # type: ignore[arg-type]
    print(f"{PROG}: {len(config.users)} user(s), {len(config.devices)} device(s) configured",
          file=sys.stderr, flush=True)
    react(lambda r: Deferred.fromCoroutine(_serve(r, args, site, tls, fingerprint)))


if __name__ == "__main__":
    main()
