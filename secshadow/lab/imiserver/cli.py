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

Gateway tokens (PROTOCOL.md section 6), for tests and for device agents::

    secshadow-ums token --generate-key DIR
    secshadow-ums token --key DIR/gateway-token.key.pem --sid tc-27 --role device [--lifetime S] [--out FILE]

``--generate-key`` writes an Ed25519 pair (``gateway-token.key.pem``, mode 0600, for the
management server; ``gateway-token.pub.pem`` for ``secshadow-gateway --token-key``).
The token goes to ``--out`` (created with mode 0600) or to standard output; never to a log.
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


def _token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} token", description="Mint a gateway token (EdDSA JWT) for one leg.")
    p.add_argument("--generate-key", metavar="DIR", help="write a fresh Ed25519 key pair to DIR and exit")
    p.add_argument("--key", metavar="PEM", help="the Ed25519 signing key (PKCS#8 PEM)")
    p.add_argument("--sid", help="the gateway session id")
    p.add_argument("--role", choices=("console", "device"))
    p.add_argument("--lifetime", type=float, default=300.0, metavar="S", help="seconds (default: %(default)g)")
    p.add_argument("--out", metavar="FILE", help="write the token to FILE (mode 0600) instead of standard output")
    return p


def token_main(argv: list[str]) -> None:
    """``secshadow-ums token ...``: generate a signing key pair, or mint one leg's token."""
    from secshadow.gateway.tokens import generate_key_pair, load_private_key, mint_token

    args = _token_parser().parse_args(argv)
    try:
        if args.generate_key:
            private, public = generate_key_pair(args.generate_key)
            print(f"{PROG}: wrote {private} (mode 0600, keep it on the management server) and {public} "
                  "(give it to secshadow-gateway --token-key)", file=sys.stderr, flush=True)
            return
        if not (args.key and args.sid and args.role):
            raise UsageError("give --key PEM --sid SID --role console|device (or --generate-key DIR)")
        token = mint_token(load_private_key(args.key), args.sid, args.role, args.lifetime)
        if args.out:
            try:
                fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(token + "\n")
            except OSError as e:
                raise UsageError(f"cannot write --out {args.out}: {e.strerror or e}") from None
        else:
            sys.stdout.write(token + "\n")
            sys.stdout.flush()
    except UsageError as e:
        print(f"{PROG} token: error: {e.message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``secshadow-ums``; ``secshadow-ums token ...`` mints gateway tokens)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["token"]:
        token_main(arguments[1:])
        return
    args = _parser().parse_args(arguments)
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

    site = make_site(config, reactor)
    print(f"{PROG}: {len(config.users)} user(s), {len(config.devices)} device(s) configured",
          file=sys.stderr, flush=True)
    react(lambda r: Deferred.fromCoroutine(_serve(r, args, site, tls, fingerprint)))


if __name__ == "__main__":
    main()
