"""Shared pieces of the gateway tests: the console's pinned link through a gateway, a
local viewer port bridged onto it (PROCYCMD, then plain relay), and measurements."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from secshadow.gateway.dialer import gateway_endpoint, plaintext_gateway_endpoint
from secshadow.lab.harness import GatewayProcess
from secshadow.tunnel import DeviceLink, connect_pinned
from secshadow.umstrust import UMSTrust


def trust_for(gateway: GatewayProcess) -> UMSTrust:
    return UMSTrust.from_fingerprint(gateway.fingerprint)


def endpoint_for(reactor: Any, gateway: GatewayProcess, sid: str, role: str, token: str | None = None,
                 timeout: float = 20.0, url: str | None = None) -> Any:
    """The leg endpoint of ``role`` in ``sid`` (a fresh token unless given)."""
    token = token or gateway.mint(sid, role)
    url = url or gateway.leg_url(sid, role)
    if url.startswith("ws://"):
        return plaintext_gateway_endpoint(reactor, url, token, timeout)
    return gateway_endpoint(reactor, url, token, trust_for(gateway), timeout)


def pinned_through(reactor: Any, endpoint: Any, pinned_der: bytes, timeout: float = 20.0) -> Deferred[DeviceLink]:
    """``connect_pinned`` over a gateway stream: the console's TLS runs inside the relay."""
    return connect_pinned(reactor, "gateway", 0, pinned_der, timeout=timeout,
                          endpoint_factory=lambda host, port, t: endpoint)


class _ViewerSide(Protocol):
    """A viewer connection bridged to the pinned link: sends PROCYCMD first, then relays."""

    def __init__(self, link: DeviceLink, command: bytes) -> None:
        self.link = link
        self.command = command

    def connectionMade(self) -> None:
        self.link.attach(self)
        self.link.send_command(self.command)

    def dataReceived(self, data: bytes) -> None:
        self.link.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.link.close()

    # DeviceListener
    def device_data(self, link: DeviceLink, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def device_lost(self, link: DeviceLink, reason: Failure) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def listen_viewer_port(reactor: Any, link: DeviceLink, password: str) -> Any:
    """A one-shot loopback port whose viewer is bridged onto ``link`` (the test's proxy)."""
    command = f"PROCYCMD PW_{password}".encode()
    return reactor.listenTCP(0, Factory.forProtocol(lambda: _ViewerSide(link, command)), interface="127.0.0.1")


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` in seconds (``/proc/PID/stat``)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
