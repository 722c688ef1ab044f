"""Every refusal of PROTOCOL.md section 6, against a real secshadow-gateway process.

Upgrade refusals are checked on the raw wire (a blocking TLS socket speaking HTTP/1.1
and RFC 6455 frames by hand): a complete HTTP response with the status, then the end of
the connection, and not one WebSocket frame. The console's view of the same refusals
(GatewayError, exit 9, a message naming the status) goes through gateway_endpoint.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
from typing import Any, Iterator

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.protocol import Factory, Protocol

from secshadow.errors import GatewayError
from secshadow.gateway.tokens import mint_token
from secshadow.lab.harness import GatewayProcess, start_gateway
from secshadow.tests._gateway_helpers import endpoint_for, wait_until

pytestmark = pytest.mark.integration

PAIRING_TIMEOUT = 2
TOKENS_USED: list[str] = []


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway-refusals"), "--pairing-timeout", str(PAIRING_TIMEOUT))
    try:
        yield gw
    finally:
        gw.stop()
    # Whatever was refused or accepted: no token reached the gateway's logs or events.
    log = gw.process.log_path.read_text()
    events = "\n".join(gw.process.lines)
    for token in TOKENS_USED:
        signature = token.rsplit(".", 1)[1]
        assert signature not in log and signature not in events


def mint(gw: GatewayProcess, sid: str, role: str, **kwargs: Any) -> str:
    token = gw.mint(sid, role, **kwargs)
    TOKENS_USED.append(token)
    return token


class RawLeg:
    """A blocking WebSocket client over TLS, speaking the wire by hand."""

    def __init__(self, gw: GatewayProcess, path: str, token: str | None, extra_headers: str = "") -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the gateway's own certificate is not what is tested here
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        self.sock = context.wrap_socket(raw)
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}{extra_headers}\r\n"
        ).encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        self.status = int(self.head.split(" ", 2)[1])

    def rest_until_eof(self) -> bytes:
        data = self.buffer
        while True:
            try:
                chunk = self.sock.recv(4096)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the gateway (never masked): ``(opcode, payload)``."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def close_code(self) -> int:
        """Skip to the gateway's close frame and return its code."""
        while True:
            opcode, payload = self.frame()
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])

    def close(self) -> None:
        self.sock.close()


def path(sid: str, role: str) -> str:
    return f"/v1/sessions/{sid}/{role}"


def assert_refused_on_the_wire(leg: RawLeg, status: int) -> None:
    assert leg.status == status, leg.head
    assert "Content-Length: 0" in leg.head and "Connection: close" in leg.head
    # The response is the last thing on the wire: no WebSocket frame follows a refusal.
    assert leg.rest_until_eof() == b""
    leg.close()


def refused_event(gw: GatewayProcess, sid: str, status: int) -> dict[str, Any]:
    def find() -> list[dict[str, Any]]:
        return [e for e in gw.process.named("refused") if e["sid"] == sid and e["status"] == status]

    assert wait_until(find), gw.process.log_tail()
    return find()[-1]


@pytest.mark.parametrize(("case", "status", "reason"), [
    ("no-token", 401, "no token"),
    ("bad-signature", 401, "bad token signature"),
    ("expired", 401, "token expired"),
    ("role-mismatch", 403, "token is for another role"),
    ("sid-mismatch", 403, "token is for another session"),
])
def test_token_refusals_are_http_statuses_before_any_frame(gateway: GatewayProcess, case: str, status: int,
                                                           reason: str) -> None:
    sid = f"refuse-{case}"
    token: str | None = {
        "no-token": lambda: None,
        "bad-signature": lambda: mint_token(Ed25519PrivateKey.generate(), sid, "console"),
        "expired": lambda: mint(gateway, sid, "console", lifetime=10, now=1_600_000_000),
        "role-mismatch": lambda: mint(gateway, sid, "device"),
        "sid-mismatch": lambda: mint(gateway, "another-session", "console"),
    }[case]()
    leg = RawLeg(gateway, path(sid, "console"), token)
    assert leg.head.split("\r\n")[0] == f"HTTP/1.1 {status} {reason}"
    if status == 401:
        assert 'WWW-Authenticate: Bearer realm="secshadow-gateway"' in leg.head
    assert_refused_on_the_wire(leg, status)
    event = refused_event(gateway, sid, status)
    assert (event["role"], event["reason"]) == ("console", reason)


def test_a_path_that_is_not_a_leg_is_404(gateway: GatewayProcess) -> None:
    assert_refused_on_the_wire(RawLeg(gateway, "/v1/sessions/S1/viewer", mint(gateway, "S1", "console")), 404)


def test_an_oversized_upgrade_request_is_431(gateway: GatewayProcess) -> None:
    leg = RawLeg(gateway, path("big", "console"), mint(gateway, "big", "console"),
                 extra_headers="X-Padding: " + "a" * 20000 + "\r\n")
    assert leg.head.startswith("HTTP/1.1 431 request header too large")
    assert_refused_on_the_wire(leg, 431)


def test_a_role_already_connected_is_409(gateway: GatewayProcess) -> None:
    sid = "refuse-taken"
    first = RawLeg(gateway, path(sid, "console"), mint(gateway, sid, "console"))
    assert first.status == 101
    second = RawLeg(gateway, path(sid, "console"), mint(gateway, sid, "console"))
    assert second.head.startswith("HTTP/1.1 409 role already connected")
    assert_refused_on_the_wire(second, 409)
    first.close()


def test_a_replayed_jti_is_409_even_after_the_first_leg_left(gateway: GatewayProcess) -> None:
    sid = "refuse-replay"
    token = mint(gateway, sid, "console")
    first = RawLeg(gateway, path(sid, "console"), token)
    assert first.status == 101
    first.send(8, struct.pack("!H", 1000))  # leave cleanly: the role is free again
    assert first.close_code() == 1000
    first.close()
    assert wait_until(lambda: [e for e in gateway.process.named("closed") if e["sid"] == sid])
    again = RawLeg(gateway, path(sid, "console"), token)
    assert again.head.startswith("HTTP/1.1 409 token already used")
    assert_refused_on_the_wire(again, 409)
    # A fresh token for the same leg is fine.
    fresh = RawLeg(gateway, path(sid, "console"), mint(gateway, sid, "console"))
    assert fresh.status == 101
    fresh.close()


def test_pairing_timeout_closes_with_4408(gateway: GatewayProcess) -> None:
    sid = "refuse-lonely"
    leg = RawLeg(gateway, path(sid, "device"), mint(gateway, sid, "device"))
    assert leg.status == 101
    assert leg.close_code() == 4408
    leg.close()
    assert wait_until(lambda: [e for e in gateway.process.named("closed") if e["sid"] == sid])
    [closed] = [e for e in gateway.process.named("closed") if e["sid"] == sid]
    assert (closed["paired"], closed["close_code"], closed["closed_by"]) == (False, 4408, "gateway")
    assert PAIRING_TIMEOUT <= closed["duration_s"] < PAIRING_TIMEOUT + 2


def test_a_binary_message_before_paired_closes_with_1008(gateway: GatewayProcess) -> None:
    sid = "refuse-eager"
    leg = RawLeg(gateway, path(sid, "console"), mint(gateway, sid, "console"))
    leg.send(2, b"\x16\x03\x01 early TLS bytes")
    assert leg.close_code() == 1008
    leg.close()


def test_paired_legs_relay_unchanged_and_a_message_over_64_kib_closes_with_1009(gateway: GatewayProcess) -> None:
    sid = "relay-raw"
    console = RawLeg(gateway, path(sid, "console"), mint(gateway, sid, "console"))
    device = RawLeg(gateway, path(sid, "device"), mint(gateway, sid, "device"))
    for leg in (console, device):
        opcode, payload = leg.frame()
        assert (opcode, json.loads(payload)) == (1, {"type": "paired"})
    console.send(2, b"\x00\xffopaque")
    assert device.frame() == (2, b"\x00\xffopaque")
    device.send(2, bytes(65536))  # exactly the limit passes
    assert console.frame() == (2, bytes(65536))
    device.send(2, bytes(65537))
    assert device.close_code() == 1009
    assert console.close_code() == 1001  # the peer is gone: the other leg follows
    console.close()
    device.close()


@pytest_twisted.ensureDeferred
async def test_the_console_sees_each_failure_as_a_gateway_error_saying_which(gateway: GatewayProcess) -> None:
    from twisted.internet import reactor

    from secshadow.gateway.dialer import gateway_endpoint
    from secshadow.lab.vnc import free_tcp_port
    from secshadow.umstrust import UMSTrust

    async def attempt(sid: str, token: str | None = None, timeout: float = 10, endpoint: Any = None) -> str:
        endpoint = endpoint or endpoint_for(reactor, gateway, sid, "console", token=token or mint(gateway, sid, "console"),
                                            timeout=timeout)
        with pytest.raises(GatewayError) as caught:
            await endpoint.connect(Factory.forProtocol(Protocol))
        assert caught.value.exit_code == 9
        return caught.value.message

    assert await attempt("c-401", mint_token(Ed25519PrivateKey.generate(), "c-401", "console")) == \
        "the gateway refused the token: HTTP 401 bad token signature"
    assert await attempt("c-403", mint(gateway, "c-403", "device")) == \
        "the gateway refused the token for this session or role: HTTP 403 token is for another role"
    holder = RawLeg(gateway, path("c-409", "console"), mint(gateway, "c-409", "console"))
    assert await attempt("c-409") == "the gateway refused the session: HTTP 409 role already connected"
    holder.close()
    assert await attempt("c-4408") == (
        "pairing timeout: the device side did not join gateway session c-4408 in time (the gateway closed with 4408)")
    assert await attempt("c-deadline", timeout=1.5) == \
        "pairing timeout: the device side did not join gateway session c-deadline within 1.5 s"
    url = gateway.leg_url("c-cert", "console")
    untrusted = gateway_endpoint(reactor, url, mint(gateway, "c-cert", "console"),
                                 UMSTrust.from_fingerprint("AB" * 32), 10)
    message = await attempt("c-cert", endpoint=untrusted)
    assert message.startswith("the gateway's certificate is not trusted: the gateway certificate does not match "
                              "--gateway-fingerprint")
    closed_port = free_tcp_port()
    nowhere = gateway_endpoint(reactor, f"wss://127.0.0.1:{closed_port}/v1/sessions/c-x/console",
                               mint(gateway, "c-x", "console"), UMSTrust.from_fingerprint(gateway.fingerprint), 10)
    assert (await attempt("c-x", endpoint=nowhere)).startswith(
        f"the gateway is unreachable: cannot connect to 127.0.0.1:{closed_port}")
    # Every deadline and watchdog of those attempts is gone.
    leftovers = [c for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
                 if "_Attempt" in repr(c.func) or "_ClientLeg" in repr(c.func)]
    assert leftovers == []


@pytest_twisted.ensureDeferred
async def test_connect_pinned_reports_a_device_that_never_joins_as_exit_9(gateway: GatewayProcess) -> None:
    from twisted.internet import reactor

    from secshadow.gateway.dialer import gateway_endpoint_factory
    from secshadow.lab import certs
    from secshadow.tunnel import connect_pinned
    from secshadow.umstrust import UMSTrust

    factory = gateway_endpoint_factory(reactor, gateway.leg_url("nobody-joins", "console"),
                                       mint(gateway, "nobody-joins", "console"), UMSTrust.from_fingerprint(gateway.fingerprint))
    pin = certs.der_of(certs.generate_self_signed()[0])
    with pytest.raises(GatewayError) as caught:
        await connect_pinned(reactor, "gateway", 0, pin, timeout=1.5, endpoint_factory=factory)
    assert caught.value.exit_code == 9
    assert caught.value.message == ("pairing timeout: the device side did not join gateway session nobody-joins "
                                    "within 1.25 s")


@pytest_twisted.ensureDeferred
async def test_cancelling_the_connect_aborts_the_leg(gateway: GatewayProcess) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError
    from twisted.internet.task import deferLater

    sid = "cancelled"
    connecting = endpoint_for(reactor, gateway, sid, "console").connect(Factory.forProtocol(Protocol))
    await deferLater(reactor, 0.5, lambda: None)  # connected and waiting for the device by now
    connecting.cancel()
    with pytest.raises(CancelledError):
        await connecting
    await deferLater(reactor, 0.3, lambda: None)  # the abort reaches the gateway
    assert wait_until(lambda: [e for e in gateway.process.named("closed") if e["sid"] == sid], timeout=5)
    closed = [e for e in gateway.process.named("closed") if e["sid"] == sid]
    assert closed[0]["paired"] is False and closed[0]["closed_by"] == "console"
    leftovers = [c for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
                 if "_Attempt" in repr(c.func) or "_ClientLeg" in repr(c.func)]
    assert leftovers == []
