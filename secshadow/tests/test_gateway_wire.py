"""What the gateway sees: only TLS records. The deployment shape of docs/gateway.md, for
real: stunnel4 terminates TLS in front of a ``--plaintext`` gateway (the load balancer),
and a recording forwarder between the two captures every byte the gateway process reads
and writes. A full session (real Xvnc, agent, PROCYCMD with a fresh password, a full
frame) runs through it; the capture must show TLS records and nothing else inside the
WebSocket frames, relayed unchanged from one leg to the other.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.protocols import portforward

from secshadow.lab import certs
from secshadow.lab.harness import GatewayProcess, Lab, start_agent, start_gateway
from secshadow.lab.vnc import free_tcp_port
from secshadow.snapshot import read_pixel, take_snapshot
from secshadow.tests._gateway_helpers import listen_viewer_port, pinned_through, wait_until
from secshadow.tests.conftest import require_program

pytestmark = pytest.mark.integration


class _RecordingClient(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:
        self.peer.record[1] += data  # type: ignore[attr-defined]
        super().dataReceived(data)


class _RecordingClientFactory(portforward.ProxyClientFactory):
    protocol = _RecordingClient


class _RecordingServer(portforward.ProxyServer):
    clientProtocolFactory = _RecordingClientFactory

    def connectionMade(self) -> None:
        self.record = [bytearray(), bytearray()]  # (to the gateway, from the gateway)
        self.factory.records.append(self.record)  # type: ignore[attr-defined]
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.record[0] += data
        super().dataReceived(data)


class RecordingForwarder(portforward.ProxyFactory):
    protocol = _RecordingServer

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.records: list[list[bytearray]] = []


def ws_frames(stream: bytes) -> tuple[str, list[tuple[int, bytes]]]:
    """Split one direction of a captured WebSocket connection: ``(HTTP head, frames)``
    with frames as ``(opcode, unmasked payload)`` (RFC 6455 section 5.2)."""
    head, _, rest = stream.partition(b"\r\n\r\n")
    frames: list[tuple[int, bytes]] = []
    i = 0
    while i < len(rest):
        b0, b1 = rest[i], rest[i + 1]
        i += 2
        n = b1 & 0x7F
        if n == 126:
            n, i = int.from_bytes(rest[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(rest[i:i + 8], "big"), i + 8
        mask = b""
        if b1 & 0x80:
            mask, i = rest[i:i + 4], i + 4
        payload = bytes(rest[i:i + n])
        i += n
        if mask and payload:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        frames.append((b0 & 0x0F, payload))
    return head.decode("latin-1"), frames


def tls_records(stream: bytes) -> list[tuple[int, int]]:
    """Parse ``stream`` as back-to-back TLS records (RFC 8446 section 5.1): ``(type,
    length)`` each. Fails unless every byte belongs to a well-formed record."""
    records = []
    i = 0
    while i < len(stream):
        assert i + 5 <= len(stream), f"truncated record header at {i}"
        content_type, version, length = stream[i], int.from_bytes(stream[i + 1:i + 3], "big"), \
            int.from_bytes(stream[i + 3:i + 5], "big")
        assert content_type in (20, 21, 22, 23), f"not a TLS content type at {i}: {content_type}"
        assert version in (0x0301, 0x0303), f"not a TLS record version at {i}: {version:#06x}"
        assert 0 < length <= 2**14 + 256, f"bad TLS record length at {i}: {length}"
        records.append((content_type, length))
        i += 5 + length
    assert i == len(stream)
    return records


@pytest.fixture
def stunnel_front(tmp_path: Path) -> Iterator[tuple[GatewayProcess, RecordingForwarder, int, str]]:
    """A plaintext gateway <- recording forwarder <- stunnel4 (TLS) : the load balancer shape."""
    stunnel = require_program("stunnel4")
    from twisted.internet import reactor

    gateway = start_gateway(tmp_path, plaintext=True)
    forwarder = RecordingForwarder("127.0.0.1", gateway.port)
    listening = reactor.listenTCP(0, forwarder, interface="127.0.0.1")  # type: ignore[attr-defined]
    cert, key = certs.write_pair(tmp_path, "lb", key_type="ecdsa-p256", subject_cn="lb", organization="lab",
                                 locality=None, country=None, san_ips=["127.0.0.1"])
    front_port = free_tcp_port()
    config = tmp_path / "lb.conf"
    config.write_text("\n".join([
        "foreground = yes", "pid =", "syslog = no", f"output = {tmp_path / 'lb.log'}", "",
        "[gateway]", f"accept = 127.0.0.1:{front_port}", f"connect = 127.0.0.1:{listening.getHost().port}",
        f"cert = {cert}", f"key = {key}", "",
    ]))
    process = subprocess.Popen([stunnel, str(config)], stdin=subprocess.DEVNULL)  # noqa: S603
    try:
        import socket

        assert wait_until(lambda: _accepts(socket, front_port), timeout=10), "stunnel did not start"
        yield gateway, forwarder, front_port, certs.certificate_sha256(cert.read_bytes())
    finally:
        process.terminate()
        process.wait(timeout=10)
        listening.stopListening()
        gateway.stop()


def _accepts(socket: Any, port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_the_gateway_relays_tls_records_only_unchanged_between_the_legs(
    lab: Lab, stunnel_front: tuple[GatewayProcess, RecordingForwarder, int, str], tmp_path: Path
) -> None:
    from twisted.internet import reactor

    from secshadow.gateway.dialer import gateway_endpoint
    from secshadow.umstrust import UMSTrust

    gateway, forwarder, front_port, front_fingerprint = stunnel_front
    sid = "wire-capture"
    device_url = f"wss://127.0.0.1:{front_port}/v1/sessions/{sid}/device"
    agent = start_agent(gateway, sid, lab.device_port, "--gateway-fingerprint", front_fingerprint, url=device_url)
    password = lab.fresh_password()
    endpoint = gateway_endpoint(reactor, f"wss://127.0.0.1:{front_port}/v1/sessions/{sid}/console",
                                gateway.mint(sid, "console"), UMSTrust.from_fingerprint(front_fingerprint), 20)
    link = await pinned_through(reactor, endpoint, certs.der_of(lab.device_cert.read_bytes()))
    port = listen_viewer_port(reactor, link, password)
    png = tmp_path / "through-lb.png"
    try:
        await take_snapshot(reactor, "127.0.0.1", port.getHost().port, png, timeout=20)
    finally:
        await port.stopListening()
    await link.when_lost()
    assert lab.xvnc is not None and read_pixel(png, *lab.xvnc.background_point) == lab.xvnc.background_rgb
    assert agent.process.wait(timeout=20) == 0, agent.log_tail()
    agent.stop()
    assert wait_until(lambda: [e for e in gateway.process.named("closed") if e["sid"] == sid])

    legs: dict[str, dict[str, Any]] = {}
    for to_gateway, from_gateway in forwarder.records:
        request, frames_in = ws_frames(bytes(to_gateway))
        response, frames_out = ws_frames(bytes(from_gateway))
        if f"/v1/sessions/{sid}/" not in request:
            continue  # a readiness probe
        role = "console" if f"/{sid}/console " in request else "device"
        assert response.startswith("HTTP/1.1 101")
        legs[role] = {
            "in": b"".join(p for op, p in frames_in if op == 2),
            "out": b"".join(p for op, p in frames_out if op == 2),
            "text_out": [p for op, p in frames_out if op == 1],
            "raw": bytes(to_gateway) + bytes(from_gateway),
        }
    assert set(legs) == {"console", "device"}
    console, device = legs["console"], legs["device"]
    # Relayed in order and unchanged, both ways.
    assert console["in"] == device["out"] and device["in"] == console["out"]
    assert console["text_out"] == device["text_out"] == [b'{"type": "paired"}']
    # Only TLS records: the handshake, then application data; a full frame's worth of it.
    to_device, to_console = tls_records(console["in"]), tls_records(device["in"])
    assert to_device[0][0] == 22 and to_console[0][0] == 22  # ClientHello, ServerHello
    assert sum(length for kind, length in to_console if kind == 23) > lab.xvnc.width * lab.xvnc.height
    # Not one byte of the secrets or the protocol inside, anywhere on the gateway's wire.
    for leg in (console, device):
        for needle in (b"PROCYCMD", password.encode(), b"RFB 003", b"RFB 00"):
            assert needle not in leg["raw"]
