"""The firmware matrix: every firmware profile, on every TLS stack that can play it,
against both client profiles of the real ``secshadow-proxy`` CLI.

For each (firmware, stack) row a device is started (:func:`start_device`), the proxy is
run once with ``--tls-profile modern`` and once with ``--tls-profile legacy`` (each a
fresh process with its own one-time password: ``--secret-file - --viewer none --json``),
and a raw socket plays the viewer: it connects to the ``listening`` port and reads the
12-byte RFB ProtocolVersion. Measured: the proxy's outcome (``ok`` or the contract's
error code), the negotiated TLS version and cipher (``pinned`` event), and the time
from starting the proxy process to the first RFB byte (Python start-up included).

Stacks (``docs/firmware.md`` says what each covers):

- ``emulator``: ``secshadow-device`` itself (pyOpenSSL on cryptography's OpenSSL 4.0);
- ``stunnel``: ``stunnel4`` (Debian's OpenSSL 3.0) as the device's TLS front, forwarding
  plaintext to ``secshadow-device --plaintext`` (the PROCYCMD check and relay);
- ``gnutls``: ``gnutls-serv`` (GnuTLS 3.7). It has no forwarding mode, so the row
  covers the handshake and the pin only (result ``pinned``); the proxy is stopped with
  SIGTERM before any viewer connects, so no password is ever sent to it.

Behind the device sits a tiny RFB greeter (:class:`RFBGreeter`: sends
``RFB 003.008\\n`` and drains) so the matrix is fast; ``--xvnc`` uses a real Xvnc.

Impostor rows: the device presents a same-subject twin (same name, serial, dates,
version, MD5 signature; another key) while the console pins the original; the legacy
profile must refuse it with exit 6 and the device must see no ``PROCYCMD``.

Blocking, subprocess-based code on purpose (like :mod:`secshadow.lab`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from secshadow.lab import certs
from secshadow.lab.device.firmware import PROFILES, FirmwareProfile, get_profile
from secshadow.lab.harness import ManagedProcess, child_environment, python_module

CLIENT_PROFILES = ("modern", "legacy")

#: Programs each stack needs (Debian packages: stunnel4, gnutls-bin).
STACK_PROGRAMS: dict[str, str | None] = {"emulator": None, "stunnel": "stunnel4", "gnutls": "gnutls-serv"}

#: What a stack is, for the table.
STACK_DESCRIPTIONS = {
    "emulator": "secshadow-device (pyOpenSSL, OpenSSL 4.0)",
    "stunnel": "stunnel4 (Debian OpenSSL 3.0) -> secshadow-device --plaintext",
    "gnutls": "gnutls-serv (GnuTLS 3.7), handshake and pin only",
}

_STUNNEL_VERSIONS = {"TLSv1": "TLSv1", "TLSv1.1": "TLSv1.1", "TLSv1.2": "TLSv1.2", "TLSv1.3": "TLSv1.3"}

# Debian's OpenSSL 3 refuses TLS 1.0/1.1 and RSA-1024 at its default security level
# (PROTOCOL.md section 3): stunnel's children read this file through OPENSSL_CONF.
_SECLEVEL0_OPENSSL_CONF = """\
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1
CipherString = DEFAULT:@SECLEVEL=0
"""


class MatrixError(RuntimeError):
    """A device or TLS front did not start; the message carries its last log lines."""


# -- the VNC side ---------------------------------------------------------------


class RFBGreeter:
    """A fake VNC server on 127.0.0.1: sends ``RFB 003.008\\n`` to every connection and
    reads until the peer closes. ``port``: where it listens. Enough for the matrix, which
    measures the tunnel up to the first RFB byte, not VNC itself."""

    GREETING = b"RFB 003.008\n"

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.sendall(self.GREETING)
                while connection.recv(65536):
                    pass
            except OSError:
                pass

    def stop(self) -> None:
        self._stopped = True
        self._server.close()


# -- devices ------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for programs that cannot pick one themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningDevice:
    """A device under test. ``port``: its TLS port on 127.0.0.1; ``cert_pem``: the
    certificate it presents; ``checker``: the ``secshadow-device`` process that checks
    PROCYCMD (``None`` for the gnutls stack); ``handshake_only``: no PROCYCMD flow."""

    profile: FirmwareProfile
    stack: str
    port: int
    cert_pem: bytes
    passwords: list[str]
    checker: ManagedProcess | None
    processes: list[ManagedProcess] = field(default_factory=list)
    handshake_only: bool = False

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _write_pair(workdir: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    return certs.write_pem_files(workdir, name, pair[0], pair[1])


def _wait_for_line(process: ManagedProcess, fragment: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(fragment in line for line in process.lines) or fragment in process.log_tail(50):
            return
        if process.process.poll() is not None:
            break
        time.sleep(0.02)
    raise MatrixError(f"{process.name} did not report {fragment!r}:\n{process.log_tail()}")


def _wait_for_port(process: ManagedProcess, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise MatrixError(f"{process.name} does not listen on 127.0.0.1:{port}:\n{process.log_tail()}")


def _start_checker(profile: FirmwareProfile, workdir: Path, name: str, vnc_port: int,
                   password_file: Path, tls: tuple[Path, Path] | None, cert_path: Path) -> ManagedProcess:
    argv = [*python_module("secshadow.lab.device.cli"), "--listen", "tcp:0:interface=127.0.0.1",
            "--firmware", profile.name, "--vnc", f"127.0.0.1:{vnc_port}",
            "--accept-password-file", str(password_file)]
    if tls is None:
        argv += ["--plaintext", "--cert", str(cert_path)]
    else:
        argv += ["--cert", str(tls[0]), "--key", str(tls[1])]
    process = ManagedProcess(name, argv, workdir, env=child_environment())
    try:
        process.wait_for("listening", timeout=20)
    except Exception as exc:
        process.stop()
        raise MatrixError(str(exc)) from None
    return process


def stunnel_config(profile: FirmwareProfile, accept_port: int, connect_port: int,
                   cert_path: Path, key_path: Path) -> str:
    """The stunnel4 service that plays ``profile``'s TLS stack (OpenSSL 3 server side)."""
    lines = [
        "foreground = yes", "pid =", "syslog = no", "debug = 5",
        "[device]",
        f"accept = 127.0.0.1:{accept_port}",
        f"connect = 127.0.0.1:{connect_port}",
        f"cert = {cert_path}",
        f"key = {key_path}",
        f"sslVersionMin = {_STUNNEL_VERSIONS[profile.min_tls]}",
        f"sslVersionMax = {_STUNNEL_VERSIONS[profile.max_tls]}",
        f"ciphers = {profile.cipher_string}",
    ]
    if "@SECLEVEL=0" in profile.cipher_string:
        lines.append("securityLevel = 0")
    return "\n".join(lines) + "\n"


def start_device(profile: FirmwareProfile | str, stack: str = "emulator", workdir: Path | None = None,
                 *, vnc_port: int, passwords: int = 2, pair: tuple[bytes, bytes] | None = None,
                 name: str | None = None) -> RunningDevice:
    """Start ``profile`` on ``stack`` in ``workdir`` (default: a new temporary directory);
    one line for a test, e.g. ``start_device("legacy-tls10", "stunnel", tmp, vnc_port=g.port)``.

    ``passwords``: how many one-time passwords the device accepts (each once; see
    :attr:`RunningDevice.passwords`). ``pair``: ``(cert_pem, key_pem)`` to serve instead
    of a fresh certificate of the profile's kind (an impostor). Raises :class:`MatrixError`
    or ValueError (the stack cannot play the profile).
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    if stack not in profile.stacks:
        raise ValueError(f"firmware {profile.name!r} cannot be played by {stack!r} (only {profile.stacks})")
    program = STACK_PROGRAMS[stack]
    if program is not None and shutil.which(program) is None:
        raise MatrixError(f"{program} is not installed (bin/setup-debian installs it)")
    work = workdir or Path(tempfile.mkdtemp(prefix="secshadow-matrix-"))
    os.chmod(work, 0o700)
    label = name or f"{profile.name}-{stack}"
    pair = pair or profile.generate_certificate()
    cert_path, key_path = _write_pair(work, label, pair)
    secret_words = [str(uuid.uuid4()) for _ in range(passwords)]
    password_file = work / f"{label}.passwords"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(secret_words) + "\n")
    device = RunningDevice(profile, stack, 0, pair[0], secret_words, None)
    try:
        if stack == "emulator":
            device.checker = _start_checker(profile, work, label, vnc_port, password_file,
                                            (cert_path, key_path), cert_path)
            device.processes.append(device.checker)
            device.port = int(device.checker.wait_for("listening")["port"])
        elif stack == "stunnel":
            device.checker = _start_checker(profile, work, f"{label}-plain", vnc_port, password_file,
                                            None, cert_path)
            device.processes.append(device.checker)
            plain_port = int(device.checker.wait_for("listening")["port"])
            device.port = free_port()
            config = work / f"{label}.stunnel.conf"
            config.write_text(stunnel_config(profile, device.port, plain_port, cert_path, key_path))
            openssl_conf = work / f"{label}.openssl.cnf"
            openssl_conf.write_text(_SECLEVEL0_OPENSSL_CONF)
            front = ManagedProcess(label, ["stunnel4", str(config)], work,
                                   env=child_environment({"OPENSSL_CONF": str(openssl_conf)}))
            device.processes.append(front)
            _wait_for_port(front, device.port, 15)
        else:  # gnutls
            assert profile.gnutls_priority is not None
            device.port = free_port()
            device.handshake_only = True
            front = ManagedProcess(label, [
                "gnutls-serv", "--port", str(device.port), "--priority", profile.gnutls_priority,
                "--x509certfile", str(cert_path), "--x509keyfile", str(key_path),
                "--disable-client-cert", "--echo",
            ], work, env=child_environment())
            device.processes.append(front)
            _wait_for_line(front, "listening", 15)
        return device
    except BaseException:
        device.stop()
        raise


# -- one console run ----------------------------------------------------------


@dataclass
class ClientResult:
    """One ``secshadow-proxy`` run. ``outcome``: ``ok`` (the viewer got the RFB hello),
    ``pinned`` (handshake-only stack: TLS and the pin succeeded) or the error code."""

    client_profile: str
    outcome: str
    exit_code: int | None
    tls_version: str = ""
    cipher: str = ""
    first_rfb_byte_s: float | None = None
    message: str = ""

    def cell(self) -> str:
        if self.outcome in ("ok", "pinned"):
            return self.outcome
        return f"{self.outcome} (exit {self.exit_code})"


def _wait_any(proxy: ManagedProcess, names: Sequence[str], timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in proxy.events:
            if event.get("event") in names:
                return event
        if proxy.process.poll() is not None and not proxy._reader.is_alive():
            break
        time.sleep(0.005)
    for event in proxy.events:
        if event.get("event") in names:
            return event
    return None


def run_client(device: RunningDevice, client_profile: str, password: str, workdir: Path,
               pinned_pem: bytes | None = None, timeout: float = 30.0) -> ClientResult:
    """Run ``secshadow-proxy --tls-profile CLIENT_PROFILE`` once against ``device``,
    pinning ``pinned_pem`` (default: what the device serves)."""
    secret = json.dumps({
        "certificate": (pinned_pem or device.cert_pem).decode(), "password": password,
        "host": "127.0.0.1", "port": device.port,
    }).encode()
    argv = [*python_module("secshadow.cli"), "--secret-file", "-", "--viewer", "none", "--json",
            "--tls-profile", client_profile, "--procy-terminator", device.profile.procy_terminator,
            "--connect-timeout", "10", "--hello-timeout", "20", "--viewer-timeout", "20"]
    started = time.monotonic()
    proxy = ManagedProcess(f"proxy-{device.profile.name}-{device.stack}-{client_profile}-{secrets.token_hex(3)}",
                           argv, workdir, env=child_environment(), stdin=subprocess.PIPE)
    assert proxy.process.stdin is not None
    proxy.process.stdin.write(secret)
    proxy.process.stdin.close()
    first_byte: float | None = None
    try:
        event = _wait_any(proxy, ("listening", "error"), timeout)
        if event is not None and event["event"] == "listening":
            if device.handshake_only:
                proxy.process.terminate()  # before any viewer: no PROCYCMD, ever
            else:
                with socket.create_connection(("127.0.0.1", event["port"]), timeout=timeout) as viewer:
                    viewer.settimeout(timeout)
                    data = b""
                    try:
                        while len(data) < 12:
                            chunk = viewer.recv(12 - len(data))
                            if not chunk:
                                break
                            if not data:
                                first_byte = time.monotonic() - started
                            data += chunk
                    except OSError:
                        pass
        try:
            proxy.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    finally:
        exit_code = proxy.stop()
    pinned = next((e for e in proxy.events if e.get("event") == "pinned"), {})
    error = next((e for e in proxy.events if e.get("event") == "error"), None)
    session = any(e.get("event") == "session-started" for e in proxy.events)
    if error is not None:
        outcome, message = str(error.get("code")), str(error.get("message", ""))
    elif device.handshake_only and pinned:
        outcome, message = "pinned", ""
    elif session and first_byte is not None:
        outcome, message = "ok", ""
    else:
        outcome, message = "internal", f"unexpected run (exit {exit_code}): {proxy.log_tail(5)}"
    return ClientResult(client_profile, outcome, exit_code, str(pinned.get("tls_version", "")),
                        str(pinned.get("cipher", "")), first_byte if outcome == "ok" else None, message)


# -- the matrix ---------------------------------------------------------------


@dataclass
class MatrixRow:
    """One firmware on one stack: both client runs and what was expected."""

    firmware: str
    stack: str
    certificate: str
    modern: ClientResult
    legacy: ClientResult
    expect_modern: str
    expect_legacy: str
    impostor: bool = False
    procycmd_seen: int | None = None  # PROCYCMD commands the device saw (None: cannot tell)

    @property
    def as_expected(self) -> bool:
        ok = self.modern.outcome == self.expect_modern and self.legacy.outcome == self.expect_legacy
        if self.impostor and self.procycmd_seen:
            return False
        return ok


def _expected(profile: FirmwareProfile, stack: str, impostor: bool) -> tuple[str, str]:
    def adjust(code: str) -> str:
        if impostor and code in ("ok", "device-rejected"):
            return "pin-mismatch"
        if stack == "gnutls" and code in ("ok", "device-rejected"):
            return "pinned"
        return code

    return adjust(profile.expect_modern), adjust(profile.expect_legacy)


def _certificate_label(profile: FirmwareProfile) -> str:
    return profile.legacy_cert or f"{profile.key_type}-sha256"


def run_row(profile: FirmwareProfile, stack: str, workdir: Path, vnc_port: int, impostor: bool = False) -> MatrixRow:
    """Start the device, run modern then legacy, stop it."""
    label = f"{profile.name}-{stack}{'-impostor' if impostor else ''}"
    genuine = profile.generate_certificate()
    pair = genuine
    if impostor:
        from secshadow.lab.device.legacycerts import legacy_twin

        pair = legacy_twin(genuine[0]) if profile.legacy_cert else certs.twin_of(genuine[0])
    device = start_device(profile, stack, workdir, vnc_port=vnc_port, pair=pair, name=label)
    try:
        results = [run_client(device, client, password, workdir, pinned_pem=genuine[0])
                   for client, password in zip(CLIENT_PROFILES, device.passwords, strict=True)]
    finally:
        device.stop()
    seen = len(device.checker.named("procycmd")) if device.checker is not None else None
    expect_modern, expect_legacy = _expected(profile, stack, impostor)
    return MatrixRow(profile.name, stack, _certificate_label(profile) + (" (twin)" if impostor else ""),
                     results[0], results[1], expect_modern, expect_legacy, impostor, seen)


def plan(profiles: Sequence[str] | None = None, stacks: Sequence[str] | None = None,
         impostors: bool = True) -> list[tuple[FirmwareProfile, str, bool]]:
    """The rows to run: (profile, stack, impostor?). Impostor rows for ``legacy-tls10``."""
    chosen = [get_profile(name) for name in profiles] if profiles else list(PROFILES.values())
    rows: list[tuple[FirmwareProfile, str, bool]] = []
    for profile in chosen:
        for stack in profile.stacks:
            if stacks and stack not in stacks:
                continue
            rows.append((profile, stack, False))
    if impostors:
        for profile in chosen:
            if profile.name == "legacy-tls10":
                rows += [(profile, stack, True) for stack in profile.stacks if not stacks or stack in stacks]
    return rows


def run_matrix(rows: Sequence[tuple[FirmwareProfile, str, bool]], workdir: Path, vnc_port: int,
               workers: int = 2) -> list[MatrixRow]:
    """Run ``rows`` (see :func:`plan`), ``workers`` at a time; results in ``rows`` order."""
    def one(item: tuple[FirmwareProfile, str, bool]) -> MatrixRow:
        profile, stack, impostor = item
        return run_row(profile, stack, workdir, vnc_port, impostor)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, rows))


# -- the report ---------------------------------------------------------------


def _negotiated(row: MatrixRow) -> str:
    parts = []
    for result in (row.modern, row.legacy):
        if result.tls_version:
            parts.append(f"{result.client_profile}: {result.tls_version} {result.cipher}")
    return "; ".join(parts) or "-"


def _timing(row: MatrixRow) -> str:
    values = [f"{r.first_rfb_byte_s:.2f}" if r.first_rfb_byte_s is not None else "-" for r in (row.modern, row.legacy)]
    return " / ".join(values)


def format_table(rows: Sequence[MatrixRow]) -> str:
    """A Markdown table: firmware, stack, modern, legacy, negotiated, first RFB byte."""
    lines = [
        "| firmware | certificate | stack | modern | legacy | negotiated | first RFB byte, s (modern / legacy) | as expected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.firmware}{' impostor' if row.impostor else ''} | {row.certificate} | {row.stack} | "
            f"{row.modern.cell()} | {row.legacy.cell()} | {_negotiated(row)} | {_timing(row)} | "
            f"{'yes' if row.as_expected else 'NO'} |"
        )
    return "\n".join(lines)


def format_messages(rows: Sequence[MatrixRow]) -> str:
    """What the user read for each failure (one line per distinct message)."""
    seen: dict[str, list[str]] = {}
    for row in rows:
        for result in (row.modern, row.legacy):
            if result.message:
                seen.setdefault(result.message, []).append(
                    f"{row.firmware}{' impostor' if row.impostor else ''}/{row.stack}/{result.client_profile}")
    return "\n".join(f"- {', '.join(where)}: \"{message}\"" for message, where in seen.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secshadow-matrix",
        description="Run every firmware profile on every TLS stack against both client TLS profiles.",
    )
    parser.add_argument("--firmware", action="append", metavar="NAME", help="only this profile (repeatable)")
    parser.add_argument("--stack", action="append", choices=sorted(STACK_PROGRAMS), help="only this stack")
    parser.add_argument("--no-impostors", action="store_true", help="skip the impostor rows")
    parser.add_argument("--workers", type=int, default=2, help="rows run in parallel (default: %(default)s)")
    parser.add_argument("--xvnc", action="store_true", help="relay to a real Xvnc instead of the RFB greeter")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table and messages to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``secshadow-matrix``: exit 0 when every row is as expected, 1 otherwise, 2 on usage errors."""
    args = build_parser().parse_args(argv)
    try:
        rows = plan(args.firmware, args.stack, impostors=not args.no_impostors)
    except Exception as exc:  # UsageError for an unknown profile
        sys.stderr.write(f"secshadow-matrix: error: {exc}\n")
        sys.exit(2)
    missing = sorted({STACK_PROGRAMS[s] or "" for _, s, _ in rows} - {""} - {
        p for p in STACK_PROGRAMS.values() if p and shutil.which(p)})
    if missing:
        sys.stderr.write(f"secshadow-matrix: skipping stacks whose programs are missing: {', '.join(missing)}\n")
        rows = [r for r in rows if STACK_PROGRAMS[r[1]] not in missing]
    work = Path(tempfile.mkdtemp(prefix="secshadow-matrix-"))
    os.chmod(work, 0o700)
    greeter: Any = None
    xvnc: Any = None
    try:
        if args.xvnc:
            from secshadow.lab.vnc import start_xvnc

            xvnc = start_xvnc(label="secshadow matrix")
            vnc_port = xvnc.rfb_port
        else:
            greeter = RFBGreeter()
            vnc_port = greeter.port
        started = time.monotonic()
        results = run_matrix(rows, work, vnc_port, workers=args.workers)
        elapsed = time.monotonic() - started
    finally:
        if greeter is not None:
            greeter.stop()
        if xvnc is not None:
            xvnc.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(r) | {"as_expected": r.as_expected} for r in results], indent=2))
    else:
        print(format_table(results))
        print()
        print(format_messages(results))
        print(f"\n{len(results)} rows in {elapsed:.1f} s")
    if args.markdown:
        Path(args.markdown).write_text(format_table(results) + "\n\n" + format_messages(results) + "\n")
    sys.exit(0 if all(r.as_expected for r in results) else 1)


if __name__ == "__main__":
    main()
