"""``secshadow-device``: run the device emulator in front of a VNC server.

Standard output carries one JSON object per line (flushed as it happens), e.g.::

    {"event": "certificate", "cert_path": "...", "key_path": "...", "certificate_sha256": "AB:..."}
    {"event": "listening", "host": "127.0.0.1", "port": 5900, "certificate_sha256": "AB:..."}
    {"event": "connection", "peer": "127.0.0.1:40312"}
    {"event": "tls", "version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    {"event": "procycmd", "accepted": true, "reason": "ok"}
    {"event": "vnc-connected", "vnc": "127.0.0.1:5901"}
    {"event": "app-bytes", "count": 1234, "reason": "relay ended"}

(``certificate`` only with ``--generate-cert``; ``consent`` with consent-prompt
firmware; ``warning`` with ``--ums-insecure``.)

``--dial URL --token-file FILE`` makes the device dial out to a gateway relay instead of
listening, like an OS 12 device (PROTOCOL.md section 6): ``{"event": "dialing", "url":
...}``, then ``{"event": "paired"}`` once the console joined, then the events above for
that one session; the process exits 0 when it ends, 9 when the gateway fails
(unreachable, certificate, token refused, pairing timeout). Progress and errors go to standard
error. No line ever contains the password. Exit status: 0 after SIGINT/SIGTERM,
2 for bad flags or files, 1 when the listener cannot be opened.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from secshadow.errors import SecShadowError, UsageError

PROG = "secshadow-device"


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def _parse_vnc(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--vnc wants HOST:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"--vnc: {port!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise UsageError(f"--vnc: port {number} is out of range 1-65535")
    return host, number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Emulate a thin client's secure-shadowing port: TLS with the device certificate, "
            "PROCYCMD one-time password check, then a relay to a VNC server."
        ),
    )
    parser.add_argument(
        "--listen",
        default="tcp:5900:interface=127.0.0.1",
        metavar="ENDPOINT",
        help="Twisted server endpoint string (default: %(default)s; port 0 picks a free port)",
    )
    certs = parser.add_argument_group("device certificate (either --cert and --key, or --generate-cert)")
    certs.add_argument("--cert", metavar="PEM", help="device certificate, PEM")
    certs.add_argument("--key", metavar="PEM", help="its private key, unencrypted PEM")
    certs.add_argument(
        "--generate-cert",
        metavar="DIR",
        help="write a fresh name-less certificate (C=DE, L=Bremen, O=IGEL) and key to DIR and use them",
    )
    parser.add_argument("--firmware", default="current", metavar="NAME", help="firmware profile (default: %(default)s)")
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help=(
            "no TLS: only the PROCYCMD check and relay, behind a separate TLS front such as stunnel4 "
            "(loopback listeners only; --cert is then optional and only reported)"
        ),
    )
    parser.add_argument("--list-firmware", action="store_true", help="list the firmware profiles and exit")
    parser.add_argument("--consent-delay", type=float, metavar="S", help="override the profile's consent delay, seconds")
    parser.add_argument(
        "--command-timeout", type=float, metavar="S", help="override how long to wait for PROCYCMD, seconds"
    )
    parser.add_argument(
        "--vnc", default="127.0.0.1:5901", metavar="HOST:PORT", help="VNC server to relay to (default: %(default)s)"
    )
    parser.add_argument("--port-file", metavar="FILE", help="write the listening port number to FILE")
    dial = parser.add_argument_group("dialing out to a gateway relay instead of listening (one session)")
    dial.add_argument("--dial", metavar="URL", help="the device leg's URL, wss://GATEWAY/v1/sessions/{sid}/device")
    dial.add_argument("--token-file", metavar="FILE", help="the device leg's token (a JWT)")
    dial.add_argument("--gateway-ca", metavar="FILE", help="CA/certificate PEM for the gateway's certificate")
    dial.add_argument("--gateway-fingerprint", metavar="HEX", help="SHA-256 of the gateway's certificate")
    dial.add_argument("--dial-timeout", type=float, default=90.0, metavar="S",
                      help="how long to wait for the console to join, seconds (default: %(default)g)")
    passwords = parser.add_argument_group("password check (either --ums ... or --accept-password-file)")
    passwords.add_argument("--ums", metavar="URL", help="IMI server that checks one-time passwords")
    passwords.add_argument("--device-id", metavar="ID", help="this device's id at the IMI server")
    passwords.add_argument("--ums-fingerprint", metavar="HEX", help="SHA-256 of the IMI server's certificate")
    passwords.add_argument("--ums-ca", metavar="FILE", help="CA/certificate PEM file for the IMI server")
    passwords.add_argument(
        "--ums-insecure", action="store_true", help="do not verify the IMI server's certificate (unsafe)"
    )
    passwords.add_argument(
        "--accept-password-file",
        metavar="FILE",
        help="accept the password in FILE, once; several lines: each password once (standalone use without an IMI server)",
    )
    return parser


@dataclasses.dataclass
class _Config:
    listen: str
    profile: Any
    cert_pem: bytes
    key_pem: bytes
    vnc_host: str
    vnc_port: int
    port_file: str | None
    checker_factory: Any  # reactor -> PasswordChecker
    plaintext: bool = False
    #: (url, token, trust, timeout) with --dial; the token is kept in memory only.
    dial: tuple[str, str, Any, float] | None = dataclasses.field(default=None, repr=False)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def _checker_factory(args: argparse.Namespace) -> Any:
    from secshadow.lab.device.emulator import OneShotPasswordChecker
    from secshadow.secret import OneTimePassword

    if args.accept_password_file and args.ums:
        raise UsageError("give either --ums or --accept-password-file, not both")
    if args.accept_password_file:
        text = _read(args.accept_password_file, "password file").decode("ascii", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        passwords = [OneTimePassword(line) for line in lines]
        checker = OneShotPasswordChecker(*passwords)
        return lambda reactor: checker
    if not args.ums:
        raise UsageError("how are passwords checked? give --ums URL --device-id ID, or --accept-password-file FILE")
    if not args.device_id:
        raise UsageError("--ums needs --device-id")
    chosen = [flag for flag, value in (
        ("--ums-fingerprint", args.ums_fingerprint), ("--ums-ca", args.ums_ca), ("--ums-insecure", args.ums_insecure)
    ) if value]
    if len(chosen) != 1:
        raise UsageError("--ums needs exactly one of --ums-fingerprint, --ums-ca, --ums-insecure")
    # Imported here: the IMI client is only needed in this mode.
    from secshadow.umstrust import UMSTrust

    trust = UMSTrust.from_flags(args.ums_ca, args.ums_fingerprint, args.ums_insecure)
    if trust.mode == "insecure":
        sys.stderr.write(
            f"{PROG}: WARNING: --ums-insecure: the IMI server's certificate is NOT verified; "
            "anyone on the path can approve passwords\n"
        )
        _print_json({"event": "warning", "message": "--ums-insecure: IMI server certificate not verified"})
    url, device_id = args.ums, args.device_id

    def factory(reactor: Any) -> Any:
        from secshadow.lab.imiserver.otpcheck import verify_otp

        return lambda password: verify_otp(reactor, url, device_id, password, trust)

    return factory


def configure(args: argparse.Namespace) -> _Config:
    """Validate flags and load files; raises :class:`UsageError` with a user-facing message."""
    from secshadow.lab import certs
    from secshadow.lab.device.firmware import build_server_context, get_profile

    profile = get_profile(args.firmware)
    overrides: dict[str, Any] = {}
    if args.consent_delay is not None:
        overrides["consent_delay"] = args.consent_delay
    if args.command_timeout is not None:
        overrides["command_timeout"] = args.command_timeout
    if overrides:
        try:
            profile = dataclasses.replace(profile, **overrides)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    vnc_host, vnc_port = _parse_vnc(args.vnc)
    dial = _dial_config(args)
    if args.generate_cert and (args.cert or args.key):
        raise UsageError("give either --cert/--key or --generate-cert, not both")
    # Every other flag is checked before --generate-cert writes files.
    checker_factory = _checker_factory(args)
    if args.generate_cert:
        from secshadow.lab.device.legacycerts import LegacyCertError

        try:
            generated = profile.generate_certificate()
        except LegacyCertError as exc:
            raise UsageError(f"cannot make the {profile.legacy_cert} certificate: {exc}") from None
        cert_path, key_path = certs.write_pem_files(args.generate_cert, "device", *generated)
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        fingerprint = certs.certificate_sha256(cert_pem)
        sys.stderr.write(f"{PROG}: generated {cert_path} (SHA-256 {fingerprint}) and {key_path}\n")
        _print_json({
            "event": "certificate",
            "cert_path": str(cert_path),
            "key_path": str(key_path),
            "certificate_sha256": fingerprint,
        })
    elif args.cert and args.key:
        cert_pem, key_pem = _read(args.cert, "certificate"), _read(args.key, "key")
    elif args.plaintext:
        cert_pem = _read(args.cert, "certificate") if args.cert else b""
        key_pem = b""
    else:
        raise UsageError("give --cert PEM and --key PEM, or --generate-cert DIR")
    if not args.plaintext:
        # Fail now, as a usage error, if OpenSSL refuses the pair or the profile.
        build_server_context(profile, cert_pem, key_pem)
    elif cert_pem:
        certs.certificate_sha256(cert_pem)  # at least a certificate
    return _Config(
        listen=args.listen,
        profile=profile,
        cert_pem=cert_pem,
        key_pem=key_pem,
        vnc_host=vnc_host,
        vnc_port=vnc_port,
        port_file=args.port_file,
        checker_factory=checker_factory,
        plaintext=args.plaintext,
        dial=dial,
    )


def _dial_config(args: argparse.Namespace) -> tuple[str, str, Any, float] | None:
    if not args.dial:
        if args.token_file or args.gateway_ca or args.gateway_fingerprint:
            raise UsageError("--token-file, --gateway-ca and --gateway-fingerprint go with --dial URL")
        return None
    if args.plaintext:
        raise UsageError("--dial needs the device's own TLS (the console pins it through the gateway); not --plaintext")
    if not args.token_file:
        raise UsageError("--dial needs --token-file FILE (the device leg's token)")
    if args.gateway_ca and args.gateway_fingerprint:
        raise UsageError("give either --gateway-ca or --gateway-fingerprint, not both")
    if not args.dial_timeout > 0:
        raise UsageError("--dial-timeout must be a positive number of seconds")
    from secshadow.gateway.dialer import gateway_trust
    from secshadow.gateway.tokens import read_token_file
    from secshadow.gateway.wire import parse_gateway_url

    target = parse_gateway_url(args.dial, what="--dial")
    if target.role != "device":
        raise UsageError("--dial must be the device leg's URL (.../device)")
    token = read_token_file(args.token_file)
    trust = gateway_trust(args.gateway_ca, args.gateway_fingerprint)
    return target.url, token, trust, args.dial_timeout


def _write_port_file(path: str, port: int) -> None:
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(target)  # atomic: a reader never sees a half-written file


async def _run(reactor: Any, config: _Config) -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    from secshadow.lab.device.emulator import ConnectionClosed, DeviceEmulator, DeviceListening
    from secshadow.events import Event

    # react() calls this before reactor.run() installs the SIGINT/SIGTERM handlers; wait
    # for the running reactor, so a signal right after the "listening" line stops cleanly.
    await deferLater(reactor, 0, lambda: None)
    session_over: Deferred[None] = Deferred()

    def on_event(event: Event) -> None:
        if isinstance(event, DeviceListening) and config.port_file:
            # Written before the "listening" line, so a reader of either finds the file.
            _write_port_file(config.port_file, event.port)
        _print_json(event.as_dict())
        if isinstance(event, ConnectionClosed) and not session_over.called:
            session_over.callback(None)

    emulator = DeviceEmulator(
        reactor,
        config.profile,
        config.cert_pem or None,
        config.key_pem or None,
        config.checker_factory(reactor),
        vnc_host=config.vnc_host,
        vnc_port=config.vnc_port,
        on_event=on_event,
        plaintext=config.plaintext,
    )
    if config.dial is not None:
        await _dial(reactor, config, emulator, session_over)
        return
    try:
        await emulator.listen(config.listen)
    except SecShadowError as exc:
        _error(exc.message)
        raise SystemExit(2) from None
    except Exception as exc:  # CannotListenError, a bad endpoint string, ...
        _error(f"cannot listen on {config.listen!r}: {exc}")
        raise SystemExit(1) from None
    sys.stderr.write(
        f"{PROG}: firmware {config.profile.name!r}{' (plaintext, behind a TLS front)' if config.plaintext else ''}, "
        f"relaying to VNC at {config.vnc_host}:{config.vnc_port}\n"
    )
    # SIGINT/SIGTERM stop the reactor (react installs the handlers); close cleanly first.
    reactor.addSystemEventTrigger("before", "shutdown", emulator.stop)
    await Deferred()  # run until the reactor stops


async def _dial(reactor: Any, config: _Config, emulator: Any, session_over: Any) -> None:
    """One session through a gateway: dial, serve the console's TLS over the stream."""
    from twisted.internet.defer import CancelledError

    from secshadow.errors import GatewayError
    from secshadow.gateway.dialer import gateway_endpoint

    assert config.dial is not None
    url, token, trust, timeout = config.dial
    endpoint = gateway_endpoint(reactor, url, token, trust, timeout)
    _print_json({"event": "dialing", "url": url})
    sys.stderr.write(f"{PROG}: firmware {config.profile.name!r}, dialing {url}, relaying to VNC at "
                     f"{config.vnc_host}:{config.vnc_port}\n")
    connecting = endpoint.connect(emulator.tls_factory())
    reactor.addSystemEventTrigger("before", "shutdown", connecting.cancel)
    reactor.addSystemEventTrigger("before", "shutdown", emulator.stop)
    try:
        await connecting
    except CancelledError:
        return  # SIGINT/SIGTERM while waiting for the console
    except GatewayError as exc:
        _error(exc.message)
        _print_json({"event": "error", "code": exc.code, "message": exc.message})
        raise SystemExit(exc.exit_code) from None
    _print_json({"event": "paired"})
    await session_over


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; exits with the process status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad flags
    if args.list_firmware:
        from secshadow.lab.device.firmware import PROFILES

        for profile in PROFILES.values():
            print(f"{profile.name:16} {profile.description} [stacks: {', '.join(profile.stacks)}]")
        sys.exit(0)
    try:
        config = configure(args)
    except SecShadowError as exc:
        _error(exc.message)
        sys.exit(2)

    from twisted.internet.task import react
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )
    # redirectStandardIO=False: standard output is reserved for the JSON lines.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    react(_run, (config,))


if __name__ == "__main__":
    main()
