"""stunnel4 for ``bench_vs_stunnel.py``: configuration files, start, readiness, log checks.

Two roles, each one ``stunnel`` process (Debian's stunnel 5.x on the system OpenSSL 3.0,
pthread model: one thread per connection):

- the **device's TLS front** (server mode): TLS 1.3 only, ``TLS_AES_256_GCM_SHA384`` only,
  forwarding plaintext to the backend's ``procy`` listener; a second service with the
  twin certificate forwards to ``twin``;
- the **console side** (client mode), the bar secshadow is measured against: pinned with
  ``verifyPeer = yes`` + ``CAfile`` = the device certificate (the modern spelling of
  ``verify = 4``: "ignore the chain, only verify the peer certificate"), with or without
  ``sessionResume``.

Every listener is ``127.0.0.1``. stunnel's defaults set ``TCP_NODELAY`` on both of its
sockets of a connection (``stunnel -sockets``). Logs go to a file at level ``info``,
which is where stunnel names the negotiated version and suite and whether a session was
reused; :func:`log_summary` counts those lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

STUNNEL = "stunnel4" if shutil.which("stunnel4") else "stunnel"


@dataclass(frozen=True)
class Service:
    """One stunnel service: ``accept`` on 127.0.0.1, ``connect`` to 127.0.0.1.

    Server mode: ``cert``/``key`` are served. Client mode: ``ca_file`` is the pin (None:
    no verification at all, only for the control that proves the twin device works).
    """

    name: str
    accept: int
    connect: int
    cert: Path | None = None
    key: Path | None = None
    ca_file: Path | None = None
    resume: bool = False


def write_config(path: Path, log: Path, client: bool, services: list[Service]) -> Path:
    """Write a foreground stunnel configuration for ``services``; returns ``path``."""
    lines = ["foreground = yes", "pid =", "syslog = no", f"output = {log}", "debug = info", ""]
    for service in services:
        lines += [f"[{service.name}]", f"accept = 127.0.0.1:{service.accept}",
                  f"connect = 127.0.0.1:{service.connect}"]
        if client:
            lines += ["client = yes", f"sessionResume = {'yes' if service.resume else 'no'}"]
            if service.ca_file is not None:
                lines += ["verifyPeer = yes", "verifyChain = no", f"CAfile = {service.ca_file}"]
            else:
                lines += ["verifyPeer = no", "verifyChain = no"]
        else:
            assert service.cert is not None and service.key is not None
            lines += [f"cert = {service.cert}", f"key = {service.key}", "sslVersionMin = TLSv1.3",
                      "sslVersionMax = TLSv1.3", "ciphersuites = TLS_AES_256_GCM_SHA384"]
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def wait_listening(log: Path, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Block until stunnel logs that it accepts connections; RuntimeError on timeout or exit.

    (Probing the ports instead would open TLS sessions to the device and spoil the
    session counts the benchmark checks.)"""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"stunnel exited with status {process.returncode} before listening; see {log}")
        if log.exists() and "Accepting new connections" in log.read_text(errors="replace"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"stunnel did not start listening within {timeout:g} s; see {log}")
        time.sleep(0.01)


def start(config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    """Start stunnel on ``config`` (which logs to ``log_file``) and wait until it listens."""
    with open(log_file.with_suffix(".stderr"), "wb") as err:
        process = subprocess.Popen([STUNNEL, str(config)], stdin=subprocess.DEVNULL,  # noqa: S603
                                   stdout=subprocess.DEVNULL, stderr=err)
    wait_listening(log_file, process)
    return process


_LINE = re.compile(r"LOG\d\[(?P<conn>\d+)\]: (?P<text>.*)$")
_ACCEPTED = re.compile(r"Service \[(?P<service>[^\]]+)\] accepted connection")


def log_summary(log: Path) -> dict[str, Counter[str]]:
    """Per service, from a ``debug = info`` log: ``new`` / ``reused`` sessions, one
    ``"TLSv1.3 SUITE"`` count per negotiated TLS 1.3 suite, ``older`` for any older
    protocol, ``verify-failed`` for refused peer certificates."""
    summary: dict[str, Counter[str]] = {}
    service_of: dict[str, str] = {}  # stunnel's connection number -> service
    if not log.exists():
        return summary
    for line in log.read_text(errors="replace").splitlines():
        match = _LINE.search(line)
        if not match:
            continue
        conn, text = match.group("conn"), match.group("text")
        accepted = _ACCEPTED.match(text)
        if accepted:
            service_of[conn] = accepted.group("service")
        counts = summary.setdefault(service_of.get(conn, "?"), Counter())
        if text.startswith("TLS connected: new session negotiated"):
            counts["new"] += 1
        elif text.startswith("TLS connected: previous session reused"):
            counts["reused"] += 1
        elif text.startswith("TLSv1.3 ciphersuite:"):
            counts["TLSv1.3 " + text.split()[2]] += 1
        elif re.match(r"(TLSv1(\.[012])?|SSLv3) ciphersuite", text):
            counts["older"] += 1
        elif text.startswith("Rejected by CERT"):
            counts["verify-failed"] += 1
    return summary
